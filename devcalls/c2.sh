source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=a23334df64a9366ceea6a6ca559e3584e9334399 DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name --format=csv,noheader
(DEFT_SNAP_SWEEP=default,ss5 python -m scripts.kernel_snapshots > $OUT/s13_call2_ss5.log 2>&1; mv $OUT/kernel_snapshots_*.csv $OUT/kernel_snapshots_2026-12-05_s13b_ss5.csv)
grep -A30 "^sweep (graph" $OUT/s13_call2_ss5.log | head -20; grep -A14 "^snapshot " $OUT/s13_call2_ss5.log | head -40
DEFT_SPLIT_SWEEP=1 DEFT_SPLIT_KNOBS='[{"small_stages":5},{"small_stages":5,"block_n":32}]' DEFT_SPLIT_PROMPT=0 python -m scripts.split_probe > $OUT/s13_call2_branches.log 2>&1; tail -6 $OUT/s13_call2_branches.log
mv $OUT/split_probe_*.csv $OUT/split_probe_2026-12-05_s13b_branches.csv
DEFT_TL_VARIANTS='flatten=deft_flatten;ss5=deft_flatten:{"small_stages":5}' DEFT_TL_SNAPS=fewshot_16k_w50_step200,sorting128ToT,medusa64 DEFT_TL_PLOT=none DEFT_TL_TAG=s13b python -m scripts.timeline_probe > $OUT/s13_call2_timeline.log 2>&1; tail -8 $OUT/s13_call2_timeline.log
