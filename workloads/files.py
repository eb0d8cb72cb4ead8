"""Where the DeFT authors' trace templates live, and reading them with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workloads.trace import TraceError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: default traces directory, relative to the repository root (a shared copy beside the checkout)
DEFAULT_TRACES_DIR = "../shared/data/traces"
#: where `make traces` (scripts/fetch_traces.sh) puts the authors' files when the shared copy is absent
FETCHED_TRACES_DIR = REPO_ROOT / "traces"


def traces_dir(configured: str | Path | None = None) -> Path:
    """The traces directory: ``configured`` (relative paths against the repo root), else the shared copy,
    else ``<repo>/traces``; one clear error line if none exists."""
    first = Path(configured if configured else DEFAULT_TRACES_DIR).expanduser()
    if not first.is_absolute():
        first = REPO_ROOT / first
    for d in (first, FETCHED_TRACES_DIR):
        if d.is_dir():
            return d.resolve()
    raise TraceError(
        f"no traces directory: {first} and {FETCHED_TRACES_DIR} do not exist; run `make traces` to fetch the "
        f"DeFT authors' templates, or set workload.traces_dir=<dir>"
    )


def template_path(file: str | Path, kind: str, configured_dir: str | Path | None = None) -> Path:
    """Path of a template file: ``file`` itself if it is absolute, else ``<traces_dir>/<kind>/<file>``."""
    p = Path(file).expanduser()
    if p.is_absolute():
        if not p.is_file():
            raise TraceError(f"trace file {p} does not exist")
        return p
    base = traces_dir(configured_dir) / kind
    path = base / p
    if not path.is_file():
        have = sorted(x.name for x in base.glob("*.json")) if base.is_dir() else []
        raise TraceError(f"trace file {path} does not exist; {kind} files there: {', '.join(have) or 'none'}")
    return path


def load_json(path: Path) -> Any:
    """Parse a JSON file; malformed content is a :class:`TraceError` naming the file and position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path.name}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot be read ({e})") from None
