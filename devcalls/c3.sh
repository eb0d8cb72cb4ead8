source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=92c510ab83f99205bf6821d478c5bf5bc7b50f2d DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name --format=csv,noheader
(DEFT_SNAP_SWEEP=default,wide0.7,wide0.75,wide0.8,wide1 DEFT_SNAP_TABLE=none python -m scripts.kernel_snapshots > $OUT/s13_call3_wide.log 2>&1; mv $OUT/kernel_snapshots_*.csv $OUT/kernel_snapshots_2026-12-05_s13c_wide.csv)
grep -B2 -A50 "^sweep (graph" $OUT/s13_call3_wide.log | grep -v "^done" | head -52
DEFT_TL_VARIANTS='w09=deft_flatten;w075=deft_flatten:{"wide_waves":0.75};w08=deft_flatten:{"wide_waves":0.8};w1=deft_flatten:{"wide_waves":1.0}' DEFT_TL_SNAPS=fewshot_16k_w50_step200,fewshot_16k_w50_step1,fewshot_4k_w50_step200 DEFT_TL_PLOT=none DEFT_TL_TAG=s13c python -m scripts.timeline_probe > $OUT/s13_call3_timeline.log 2>&1; tail -13 $OUT/s13_call3_timeline.log
