source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=$1 DEFT_TRACES_DIR=.cache/traces
mkdir -p $OUT/pb $OUT/snap_w $OUT/snap_r
OUT=$OUT/pb python -m scripts.pattern_bandwidth 2>&1 | grep -v Warn
B='deft_flatten:{"branch_heads":true'
DEFT_L2_FLUSH=read DEFT_GT_SNAPS=fewshot_16k_w50_step200,fewshot_16k_w50_step399 DEFT_GT_REPS=5 DEFT_GT_TAG=s19f_read DEFT_GT_VARIANTS="flatten=deft_flatten;bh16s3_sp0=$B,\"branch_spread\":0}" \
  OUT=/tmp/tl timeout 150 python -m scripts.gluon_timeline 2>&1 | grep -v Warning | tail -5
tar -czf $OUT/tl.tgz -C /tmp tl
for m in write read; do
DEFT_L2_FLUSH=$m DEFT_PROMPT_VARIANT=base DEFT_SNAP_SWEEP=default DEFT_SNAP_TABLE=flatten,node_chunk OUT=$OUT/snap_${m:0:1} timeout 200 python -m scripts.kernel_snapshots 2>&1 | grep -v Warn | tail -14
done
