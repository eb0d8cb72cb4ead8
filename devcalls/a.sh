set -x
source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=$1 DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
B='deft_flatten:{"branch_heads":true'
DEFT_GT_REST_ALONE=1 DEFT_GT_REPS=5 DEFT_GT_TAG=s19a DEFT_GT_VARIANTS="flatten=deft_flatten;bh16s3=$B};bh16s5=$B,\"branch_stages\":5};bh32s3=$B,\"branch_block_n\":32};bh16s3_ps13=$B,\"prompt_share\":1.3};bh16s3_ps15=$B,\"prompt_share\":1.5};bh16s5_ps13=$B,\"branch_stages\":5,\"prompt_share\":1.3};bh16s5_ps15=$B,\"branch_stages\":5,\"prompt_share\":1.5};bh16s3_rc100_ps13=$B,\"rest_chunk\":100,\"prompt_share\":1.3}" \
  OUT=$OUT/tl timeout 480 python -m scripts.gluon_timeline 2>&1 | grep -v Warning | tail -40
