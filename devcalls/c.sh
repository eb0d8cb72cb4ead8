source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=$1 DEFT_TRACES_DIR=.cache/traces
( time timeout 330 python -m deft.bench -m experiment=paper_few_shot method=deft_flatten workload.width=50 workload.prompt_len=16000,20000 \
  method.branch_heads=false,true method.branch_spread=0,1 method.branch_stages=3,5 traces_dir=.cache/traces bench.progress=false \
  results_dir=/tmp/res hydra.sweep.dir=/tmp/x ) 2>&1 | grep -v Warning | tail -5
tar -czf $OUT/res.tgz -C /tmp res
timeout 200 python -m pytest -q -p no:warnings tests/test_branch_heads.py 2>&1 | tail -3
