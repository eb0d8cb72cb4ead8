source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=62896b1cc74eebd6ab73025d742e61e21fc9036f DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name --format=csv,noheader
(DEFT_SNAP_SWEEP=default,wide0.75,wide1 DEFT_SNAP_TABLE=none python -m scripts.kernel_snapshots > $OUT/s13_call7_wide_new.log 2>&1; mv $OUT/kernel_snapshots_*.csv $OUT/kernel_snapshots_2026-12-05_s13f_wide_new.csv)
grep "geomean" $OUT/s13_call7_wide_new.log; grep -A28 "^sweep (graph" $OUT/s13_call7_wide_new.log | head -29
DEFT_TL_VARIANTS='flatten=deft_flatten;node_chunk=deft_node_chunk' DEFT_TL_SNAPS=fewshot_16k_w50_step200 DEFT_TL_PLOT=fewshot_16k_w50_step200 DEFT_TL_TAG=s13g python -m scripts.timeline_probe > $OUT/s13_call7_timeline.log 2>&1; tail -4 $OUT/s13_call7_timeline.log
