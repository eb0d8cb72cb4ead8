"""Where a measurement was taken: GPU, package versions, git commit, date. Computed once per process."""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from deft.bench.timing import l2_flush_mode

_REPO = Path(__file__).resolve().parents[2]

#: GPU name fragments -> results folder (``results/<slug>/``); anything else is slugified
_KNOWN_GPUS = ("h200", "h100", "h800", "a100", "a800", "a10g", "l40s", "l40", "l4", "4090", "3090", "v100", "t4", "mi300x", "mi250")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def git_state() -> tuple[str, bool]:
    """(short commit, dirty) of the repository this package runs from; ``dirty`` means uncommitted changes
    to tracked files outside ``results/`` (a run rewriting the tables it reports on is not a code change).

    Outside a git checkout (a copied working tree on a GPU machine) the environment says it:
    ``DEFT_GIT_COMMIT`` and ``DEFT_GIT_DIRTY=1``; otherwise ``('unknown', False)``.
    """
    if os.environ.get("DEFT_GIT_COMMIT"):
        return os.environ["DEFT_GIT_COMMIT"][:12], os.environ.get("DEFT_GIT_DIRTY", "0") not in ("0", "", "false")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"], cwd=_REPO, capture_output=True, text=True, timeout=10
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def gpu_name(device: torch.device | str | None = None) -> str:
    """Marketing name of the CUDA device in use, or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(dev)


def gpu_slug(name: str) -> str:
    """Short folder name for a device: ``NVIDIA H100 80GB HBM3`` -> ``h100``, no GPU -> ``cpu``."""
    low = name.lower()
    for key in _KNOWN_GPUS:
        if re.search(rf"(?<![a-z0-9]){key}(?![0-9])", low):
            return key
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "cpu"


@functools.cache
def software() -> dict[str, str]:
    """Versions of everything that can change a number: python, torch, CUDA, triton, optional libraries."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer-python") or _version("flashinfer"),
        "xformers": _version("xformers"),
        "numpy": _version("numpy"),
    }


def provenance(device: torch.device | str | None = None) -> dict[str, object]:
    """Columns saying where and when a row was measured."""
    commit, dirty = git_state()
    name = gpu_name(device)
    return {
        "gpu_name": name,
        "gpu": gpu_slug(name),
        **software(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "l2_flush": l2_flush_mode(),
        "git_commit": commit,
        "git_dirty": dirty,
        "host": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
