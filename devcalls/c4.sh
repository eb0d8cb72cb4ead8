source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=d14689dd0c471171759923843dc9a4d744573428 DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name --format=csv,noheader
(DEFT_SNAP_SWEEP=default,sb32,sb32_ss5,sb16_ss5 DEFT_SNAP_TABLE=none python -m scripts.kernel_snapshots > $OUT/s13_call4_sb.log 2>&1; mv $OUT/kernel_snapshots_*.csv $OUT/kernel_snapshots_2026-12-05_s13d_sb.csv)
grep -B2 -A40 "^sweep (graph" $OUT/s13_call4_sb.log | grep -v "^done" | head -42
DEFT_SPLIT_SWEEP=1 DEFT_SPLIT_KNOBS='[{"small_block":32},{"small_block":32,"small_stages":5},{"small_block":16,"small_stages":5}]' DEFT_SPLIT_PROMPT=0 python -m scripts.split_probe > $OUT/s13_call4_branches.log 2>&1; tail -7 $OUT/s13_call4_branches.log
mv $OUT/split_probe_*.csv $OUT/split_probe_2026-12-05_s13d_branches.csv
DEFT_TL_VARIANTS='flatten=deft_flatten;sb32ss5=deft_flatten:{"small_block":32,"small_stages":5}' DEFT_TL_SNAPS=fewshot_16k_w50_step200,sorting128ToT,fewshot_4k_w50_step200 DEFT_TL_PLOT=none DEFT_TL_TAG=s13d python -m scripts.timeline_probe > $OUT/s13_call4_timeline.log 2>&1; tail -7 $OUT/s13_call4_timeline.log
