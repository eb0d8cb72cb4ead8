"""The bench app: ``python -m deft.bench [workload=... method=... model=... bench=attention|io|e2e]``.

Sweeps are Hydra multirun: ``python -m deft.bench -m method=deft_flatten,radix workload.width=20,50``,
or a paper sweep: ``python -m deft.bench -m experiment=paper_few_shot``. Each job writes one CSV under
``results/<gpu>/<bench>/``; a rerun skips jobs whose file exists (``bench.force=true`` redoes them).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from deft.bench.app import run_job
from deft.bench.resolvers import register

register()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    return run_job(cfg)


if __name__ == "__main__":
    main()
