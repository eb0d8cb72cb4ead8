"""One-line reasons why an optional-package baseline cannot run here (no GPU, package missing or broken).

Nothing here imports the optional packages at module import time, so every baseline module imports on a
CPU machine that lacks them.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

import torch

#: how to get the GPU-only packages (the GPU machine has no network: wheels travel in .whl/)
INSTALL_HINT = {
    "flashinfer": "pip install flashinfer-python==0.5.3, or `make wheels` here and `source scripts/device_env.sh` on the GPU machine",
    "xformers": "pip install xformers==0.0.35, or `make wheels` here and `source scripts/device_env.sh` on the GPU machine",
}


def no_cuda() -> str | None:
    """Why there is no usable CUDA device, or ``None``."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch sees none)"
    return None


@cache
def import_problem(module: str) -> str | None:
    """Why ``module`` cannot be imported, in one line, or ``None`` once it imports."""
    if importlib.util.find_spec(module) is None:
        return f"{module} not installed ({INSTALL_HINT.get(module, 'pip install ' + module)})"
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install must give one line, never a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{module} failed to import: {type(e).__name__}: {first}"[:300]
    return None


def gpu_package_problem(module: str) -> str | None:
    """The first reason a GPU-only method that needs ``module`` cannot run: no GPU, then the package."""
    return no_cuda() or import_problem(module)
