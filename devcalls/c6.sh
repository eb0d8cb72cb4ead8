source scripts/device_env.sh >/tmp/env.log 2>&1
export DEFT_GIT_COMMIT=9f3a941760f1f47d0f5d4e063bcb231ec9ed9981 DEFT_TRACES_DIR=.cache/traces
nvidia-smi --query-gpu=name --format=csv,noheader
touch /tmp/mark
B="traces_dir=.cache/traces bench.progress=false results_dir=results hydra.sweep.dir=/tmp/x"
python -m deft.bench -m experiment=snapshots bench.force=true $B > $OUT/s13_call6_snap_bench.log 2>&1; echo snapshots rc=$?
for e in few_shot reasoning speculative; do python -m deft.bench -m experiment=paper_$e method=deft_flatten,deft_node_chunk,deft_node $B > $OUT/s13_call6_sweep_paper_$e.log 2>&1; echo sweep $e rc=$?; done
for e in few_shot reasoning speculative; do python -m deft.bench -m experiment=e2e_$e method=deft_flatten bench.cuda_graphs=true bench.overlap=true $B > $OUT/s13_call6_e2e_$e.log 2>&1; echo e2e $e rc=$?; done
find results -newer /tmp/mark -name '*.csv*' | tar czf $OUT/rows.tgz -T -
find results -newer /tmp/mark -name '*.csv*' | wc -l
