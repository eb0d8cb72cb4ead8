"""OmegaConf resolvers the bench configs use: ``${add:a,b}`` (generation lengths) and ``${gpu_count:}``."""

from __future__ import annotations

from omegaconf import OmegaConf


def _add(*xs):
    return sum(xs)


def register() -> None:
    """Register once per process (idempotent; composing a config without them fails to resolve)."""
    from deft.bench.devices import gpu_count

    if not OmegaConf.has_resolver("add"):
        OmegaConf.register_new_resolver("add", _add)
    if not OmegaConf.has_resolver("gpu_count"):
        OmegaConf.register_new_resolver("gpu_count", gpu_count)
