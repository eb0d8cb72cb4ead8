source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=21c39d2d7bdac435b77ca5034c04fdb3a2408aa7 DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name --format=csv,noheader
(DEFT_SNAP_SWEEP=default,sb32_ss5,wide0.9,sb32_ss5_again python -m scripts.kernel_snapshots > $OUT/s13_call5_confirm.log 2>&1; mv $OUT/kernel_snapshots_*.csv $OUT/kernel_snapshots_2026-12-05_s13e_confirm.csv)
grep "geomean" $OUT/s13_call5_confirm.log; grep -A40 "^sweep (graph" $OUT/s13_call5_confirm.log | head -38; grep -A40 "^snapshot " $OUT/s13_call5_confirm.log | head -40
