source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=e78404cfec389a80f498c6417bed713b5e7173ca DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
(DEFT_SNAP_SWEEP=default,fill,fill_rc1024,fill_rc512,fill_rc256 DEFT_SNAP_TABLE=none python -m scripts.kernel_snapshots > $OUT/s13_call1_fill.log 2>&1; mv $OUT/kernel_snapshots_*.csv $OUT/kernel_snapshots_2026-12-05_s13a_fill.csv) 
grep -A60 "^sweep" $OUT/s13_call1_fill.log | head -50
DEFT_SPLIT_LAYOUT=1 DEFT_SPLIT_PROMPT=0 python -m scripts.split_probe > $OUT/s13_call1_layout.log 2>&1; tail -8 $OUT/s13_call1_layout.log
mv $OUT/split_probe_*.csv $OUT/split_probe_2026-12-05_s13a_layout.csv
DEFT_TL_VARIANTS='flatten=deft_flatten;fill512=deft_flatten:{"fill_tiles":true,"rest_chunk":512};fill1024=deft_flatten:{"fill_tiles":true,"rest_chunk":1024}' DEFT_TL_SNAPS=fewshot_16k_w50_step200,fewshot_16k_w50_step1 DEFT_TL_PLOT=fewshot_16k_w50_step200 DEFT_TL_TAG=s13a python -m scripts.timeline_probe > $OUT/s13_call1_timeline.log 2>&1; tail -12 $OUT/s13_call1_timeline.log
ls $OUT
