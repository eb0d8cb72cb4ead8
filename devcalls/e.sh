source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=$1
mkdir -p $OUT/pb200 $OUT/pb399
OUT=$OUT/pb200 python -m scripts.pattern_bandwidth 2>&1 | grep -v Warn
DEFT_PB_BRANCH=19950 OUT=$OUT/pb399 python -m scripts.pattern_bandwidth 2>&1 | grep -v Warn
