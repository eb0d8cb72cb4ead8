"""Profile a few engine decode steps with torch.profiler: where host and device time go per step.

    python -m scripts.profile_e2e bench=e2e case=sorting128ToT workload.prompt_len=16000 method=deft_flatten \
        bench.max_steps=30

Same config (and overrides) as ``python -m deft.bench``; prints the top operators by self CPU time and by
device time, and the median step metrics of the run. A diagnostic, not a benchmark: the profiler adds
host overhead to every launch.
"""

from __future__ import annotations

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from deft.bench.resolvers import register
    from deft.engine.model import ModelArgs, build_model
    from deft.engine.runner import TreeDecoder, kv_needs

    register()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = instantiate(cfg.method)
    trace = instantiate(cfg.workload).trace()
    steps = int(cfg.bench.get("max_steps") or 30)
    args = ModelArgs.from_config(cfg.model, dtype=cfg.bench.get("dtype"))
    model = build_model(args, dev, None, 0)
    dec = TreeDecoder(model, method, kv_needs(trace, steps).slots, dev, bool(cfg.bench.get("cuda_graphs", False)))
    dec.run(trace, min(steps, 5), 0)  # JIT and warm-up, outside the profile
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (dev.type == "cuda")
    with torch.profiler.profile(activities=acts) as prof:
        res = dec.run(trace, steps, 0)
    rows = res.rows(True)
    import pandas as pd

    df = pd.DataFrame([r for r in rows if r.get("kind") == "step"])
    cols = [c for c in ("step_ms", "plan_ms", "launch_ms", "gpu_ms", "attn_ms", "overhead_ms") if c in df]
    print(f"{method.name}: median over {len(df)} profiled steps:", df[cols].median().round(3).to_dict())
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=28, max_name_column_width=40))
    if dev.type == "cuda":
        print(ka.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=40))


if __name__ == "__main__":
    main()
