source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=$1 DEFT_TRACES_DIR=.cache/traces
B='deft_flatten:{"branch_heads":true'
V="flatten=deft_flatten;bh16s5=$B,\"branch_stages\":5};bh16s3_sp0=$B,\"branch_spread\":0};bh16s5_ps13=$B,\"branch_stages\":5,\"prompt_share\":1.3}"
for pv in base s3; do
DEFT_GT_PROMPT_VARIANT=$pv DEFT_GT_SNAPS=fewshot_16k_w50_step200,fewshot_16k_w50_step399 DEFT_GT_REPS=5 DEFT_GT_TAG=s19d_$pv DEFT_GT_VARIANTS="$V" \
  OUT=/tmp/tl timeout 250 python -m scripts.gluon_timeline 2>&1 | grep -v Warning | tail -9
done
tar -czf $OUT/tl.tgz -C /tmp tl
