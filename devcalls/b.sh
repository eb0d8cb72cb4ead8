source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=$1 DEFT_TRACES_DIR=.cache/traces
B='deft_flatten:{"branch_heads":true'
V="flatten=deft_flatten;bh16s3=$B};bh16s5=$B,\"branch_stages\":5};bh16s3_sp0=$B,\"branch_spread\":0};bh32s3=$B,\"branch_block_n\":32}"
V="$V;bh16s3_ps13=$B,\"prompt_share\":1.3};bh16s3_ps15=$B,\"prompt_share\":1.5};bh16s5_ps13=$B,\"branch_stages\":5,\"prompt_share\":1.3};bh16s5_ps15=$B,\"branch_stages\":5,\"prompt_share\":1.5}"
V="$V;bh16s3_sp2=$B,\"branch_spread\":2}"
DEFT_GT_SNAPS=fewshot_16k_w50_step200,fewshot_16k_w50_step399 DEFT_GT_REST_ALONE=1 DEFT_GT_REPS=5 DEFT_GT_TAG=s19b DEFT_GT_VARIANTS="$V" \
  OUT=/tmp/tl timeout 500 python -m scripts.gluon_timeline 2>&1 | grep -v Warning | tail -22
tar -czf $OUT/tl.tgz -C /tmp tl
