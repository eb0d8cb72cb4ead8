"""One GPU per bench process when a launcher runs several jobs at once (joblib on a multi-GPU host)."""

from __future__ import annotations

import fcntl
import os
import tempfile

import torch

_HELD: dict[str, object] = {}


def claim_gpu(device: str = "cuda") -> str:
    """Pick a free GPU by taking an exclusive lock file per GPU, keep it for the process, and return it.

    With one visible GPU, or an explicit index (``cuda:1``), or ``CUDA_VISIBLE_DEVICES`` narrowed to one
    device by a scheduler (SLURM), this is just ``cuda:0`` / the given device. Processes that find every
    GPU taken wait on GPU ``pid % n`` (joblib starts at most as many workers as GPUs, so this is rare).
    """
    if "device" in _HELD:
        return _HELD["device"]  # type: ignore[return-value]
    n = torch.cuda.device_count()
    if ":" in device or n <= 1:
        dev = device if ":" in device else "cuda:0"
        torch.cuda.set_device(torch.device(dev))
        _HELD["device"] = dev
        return dev
    lock_dir = os.environ.get("DEFT_GPU_LOCK_DIR", tempfile.gettempdir())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "_")
    chosen = None
    for i in range(n):
        f = open(os.path.join(lock_dir, f"deft-gpu-{visible}-{i}.lock"), "w")  # noqa: SIM115 (held for the process)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        chosen, _HELD["lock"] = i, f
        break
    if chosen is None:
        chosen = os.getpid() % n
        f = open(os.path.join(lock_dir, f"deft-gpu-{visible}-{chosen}.lock"), "w")  # noqa: SIM115
        fcntl.flock(f, fcntl.LOCK_EX)
        _HELD["lock"] = f
    dev = f"cuda:{chosen}"
    torch.cuda.set_device(chosen)
    _HELD["device"] = dev
    return dev


def gpu_count() -> int:
    """Visible CUDA devices (at least 1, so a launcher's ``n_jobs`` is never 0)."""
    return max(1, torch.cuda.device_count())
