"""The native (C) core of DeFT's host plan, loaded through ctypes: one call derives a tree's DFS order,
entry indices, subtree sizes and seen lengths, two calls build a plan bit-identical to the numpy
:func:`~deft.kernels.kv_groups.build_groups`.

The plan's numpy version costs about a hundred calls of a microsecond's fixed overhead each on trees of
tens of nodes; here the same work is a few microseconds plus the per-token copies. ``plan_native.c`` is
compiled on first use with ``$CC`` (default ``cc``) into a per-user cache
(``$XDG_CACHE_HOME/deft/native``, else ``~/.cache/deft/native``), keyed by the source and the compiler
command. Without a compiler it warns once and every caller uses numpy; ``DEFT_NATIVE_PLAN=0`` turns it
off. A tree whose arrays the C code cannot index safely (only invalid trees) also goes to numpy.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deft.kernels.kv_groups import LPT_BIG, LPT_PROGRAM, LPT_SMALL, SECTIONS, KVGroups, small_tile_rows
from deft.tree import DecodingTree

SOURCE = Path(__file__).with_name("plan_native.c")
#: -O3: gcc's -O2 leaves the per-token copies unvectorised (about 2.5x slower on the largest trees)
CFLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
#: False turns the native path off for this process (``DEFT_NATIVE_PLAN=0`` sets it at import)
ENABLED = os.environ.get("DEFT_NATIVE_PLAN", "1") != "0"

_H_SIZE = 40  # int64 slots of the workspace header (plan_native.c); 0..17 are read back here
_H_CHUNK = 35  # header slot of the chunk size used (H_CHUNK)
_DFS_FAILED = -(1 << 63)  # deft_tree_derive's code for a walk that left its bounds (never, for any parent array)
_MODE_ID = {"flatten": 0, "node": 1, "node_chunk": 2}  # as in the C source
_I64 = np.dtype(np.int64)
_I32 = np.dtype(np.int32)
_P64 = ctypes.POINTER(ctypes.c_int64)
_P32 = ctypes.POINTER(ctypes.c_int32)
_VIEW = {_I64: ctypes.c_int64.from_buffer, _I32: ctypes.c_int32.from_buffer}
_view64 = ctypes.c_int64.from_buffer

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_lock = threading.Lock()
_local = threading.local()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deft" / "native"


def _compile() -> Path:
    """The shared library for the current source and compiler: the cached one, or compiled now."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc).encode(), " ".join(CFLAGS).encode(),
                                      platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]  # fmt: skip
    uid = os.getuid() if hasattr(os, "getuid") else 0
    dirs = (_cache_dir(), Path(tempfile.gettempdir()) / f"deft-native-{uid}")
    for d in dirs:
        if (d / f"plan_{key}.so").exists():
            return d / f"plan_{key}.so"
    err: OSError | None = None
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".plan_{key}.", suffix=".so")
        except OSError as e:  # not writable: try the next directory
            err = e
            continue
        os.close(fd)
        try:
            res = subprocess.run([*cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
                raise OSError(f"{' '.join(cc)} failed: {last}")
            os.replace(tmp, d / f"plan_{key}.so")  # atomic: concurrent workers each compile, the last wins
            return d / f"plan_{key}.so"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"no writable cache directory ({err})")


def _load() -> ctypes.CDLL | None:
    """The loaded library, or None (with one warning per process) when it cannot be built or loaded."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        try:
            lib = ctypes.CDLL(str(_compile()))
            i64, ptr = ctypes.c_int64, _P64
            lib.deft_tree_derive.argtypes = [i64, ptr, ptr, i64, ptr, ptr, ptr]
            lib.deft_tree_derive.restype = i64
            lib.deft_plan_size.argtypes = [i64, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64,
                                           ctypes.c_double, i64, i64, i64, ptr, i64, i64, ptr, i64]  # fmt: skip
            lib.deft_plan_size.restype = i64
            lib.deft_plan_fill.argtypes = [ptr, _P32]
            lib.deft_plan_fill.restype = None
            lib.deft_order_tiles.argtypes = [_P32, i64, i64, i64, i64, i64, i64, ctypes.c_double, ctypes.c_double, ptr]
            lib.deft_order_tiles.restype = i64
            lib.deft_prompt_partition.argtypes = [_P32, i64, i64, i64, i64, i64, ptr, ptr]
            lib.deft_prompt_partition.restype = i64
            lib.deft_wide_tokens.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, ptr, ptr]
            lib.deft_wide_tokens.restype = None
            _lib = lib
        except Exception as e:  # no compiler, no write access, a loader error: numpy does the work
            _load_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"deft: native plan unavailable ({_load_error}); using numpy", RuntimeWarning, stacklevel=3)
    return _lib


def native_available() -> bool:
    """Whether plans and tree derivations use the C code (enabled, compiled and loaded)."""
    return ENABLED and _load() is not None


def _buf(a: np.ndarray, dtype: np.dtype):
    """A ctypes scalar at ``a``'s first element (passed by reference where the C code takes a pointer:
    cheaper than ``a.ctypes``), of a contiguous writable copy when ``a`` is not one already (the view
    keeps it alive); None for an empty array."""
    if a.size == 0:
        return None
    if a.dtype is dtype:
        try:
            return _VIEW[dtype](a)
        except (TypeError, ValueError, BufferError):  # not contiguous, or read-only
            pass
    return _VIEW[dtype](np.array(a, dtype=dtype, order="C"))


def _workspace(need: int) -> tuple[np.ndarray, ctypes.c_int64]:
    """This thread's int64 workspace (the two plan calls share it; ctypes drops the GIL between them)."""
    ws = getattr(_local, "ws", None)
    if ws is None or ws[0].size < need:
        arr = np.empty(max(need, 2 * (ws[0].size if ws is not None else 0), 1 << 12), dtype=np.int64)
        ws = _local.ws = (arr, _view64(arr))
    return ws


def tree_derive(tree: DecodingTree) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int | None] | None:
    """``(dfs_order, tin, subtree_size, node_seen_len, unique_kv_tokens)`` of ``tree`` in one C call,
    exactly as :class:`DecodingTree` derives them in Python (the last two None when a query names no
    node), or None when the native code is off."""
    if not ENABLED:
        return None
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    parent, slot_ptr, qn, qv = tree.parent, tree.slot_ptr, tree.query_node, tree.query_visible
    n = parent.size
    if n == 0:
        return None
    out = np.empty(7 * n + 1, dtype=np.int64)
    if slot_ptr.size == n + 1 and qn.size == qv.size:
        try:  # the usual case, DecodingTree's own arrays: contiguous, writable int64
            if not (parent.dtype is _I64 and slot_ptr.dtype is _I64 and qn.dtype is _I64 and qv.dtype is _I64):
                raise TypeError
            ins = (_view64(parent), _view64(slot_ptr), qn.size, _view64(qn) if qn.size else None,
                   _view64(qv) if qn.size else None)  # fmt: skip
        except (TypeError, ValueError, BufferError):
            ins = (_buf(parent, _I64), _buf(slot_ptr, _I64), qn.size, _buf(qn, _I64), _buf(qv, _I64))
    else:  # malformed: the walk only; numpy reports the rest
        ins = (_buf(parent, _I64), None, 0, None, None)
    rc = lib.deft_tree_derive(n, *ins, _view64(out))
    if rc == _DFS_FAILED:
        return None
    reached = rc if rc >= 0 else -1 - rc
    if rc < 0:
        return out[:reached], out[n : 2 * n], out[2 * n : 3 * n], None, None
    return out[:reached], out[n : 2 * n], out[2 * n : 3 * n], out[3 * n : 4 * n], int(out[7 * n])


_policies: dict[tuple[int, ...], tuple[np.ndarray, ctypes.c_int64]] = {}


def _policy_view(policy: tuple[int, int, int, int]) -> ctypes.c_int64:
    """A chunk policy as the int64[4] the C code reads, made once per distinct policy (a method has one)."""
    key = tuple(int(x) for x in policy)
    got = _policies.get(key)
    if got is None:
        arr = np.array(key, dtype=np.int64)
        got = _policies[key] = (arr, _view64(arr))
    return got[1]


@dataclass(frozen=True)
class NativePlanArgs:
    """A plan's configuration checked and converted once for the C calls (:func:`prepare_plan`): what
    :func:`build_prepared` passes for every tree."""

    scalars: tuple
    group: int
    order: tuple | None  # (small_m, mix, slots) when the tiles are ordered longest first


def prepare_plan(
    group: int,
    mode: str,
    chunk_size: int,
    block_m_max: int,
    snap: float,
    wide_budget: int = 0,
    few_split: int = 0,
    chunk_policy: tuple[int, int, int, int] | None = None,
    lpt_small_m: int | None = None,
    lpt_mix: tuple[float, float] = (0.0, 0.0),
    fill_tiles: bool = False,
    fill_small: int = 0,
    leaf_split: bool = False,
) -> NativePlanArgs | None:
    """The tree-independent arguments of :func:`build_groups_native`, checked and converted once (a method
    plans every step with the same ones); None when the C code cannot take them (the caller uses numpy)."""
    auto = mode != "node" and chunk_size == 0 and chunk_policy is not None
    if (
        mode not in _MODE_ID or not 1 <= group < 1 << 20 or not -(1 << 40) < block_m_max < 1 << 40
        or not -1e18 < snap < 1e18 or (mode != "node" and not auto and not 1 <= chunk_size < 1 << 62)
        or not 0 <= wide_budget < 1 << 30 or not 0 <= few_split < 1 << 30 or not 0 <= fill_small < 1 << 30
        or (auto and not (len(chunk_policy) == 4 and min(chunk_policy) >= 0 and max(chunk_policy) < 1 << 40))
        or (lpt_small_m is not None and not -(1 << 40) < lpt_small_m < 1 << 40)
        or not (0.0 <= lpt_mix[0] < 1e18 and 0.0 <= lpt_mix[1] < 1e18)
    ):  # fmt: skip
        return None
    policy = _policy_view(chunk_policy) if auto else None
    scalars = (int(group), _MODE_ID[mode], int(chunk_size) if mode != "node" else 0, int(block_m_max), float(snap),
               int(wide_budget), int(few_split) if mode == "flatten" else 0, int(bool(leaf_split)), policy,
               int(bool(fill_tiles)), int(fill_small))  # fmt: skip
    order = None if lpt_small_m is None else (int(lpt_small_m), float(lpt_mix[0]), float(lpt_mix[1]))
    return NativePlanArgs(scalars, int(group), order)


def build_groups_native(
    tree: DecodingTree,
    group: int,
    mode: str,
    chunk_size: int,
    block_m_max: int,
    out_alloc: Callable[[int], np.ndarray] | None,
    snap: float,
    wide_budget: int = 0,
    few_split: int = 0,
    chunk_policy: tuple[int, int, int, int] | None = None,
    lpt_small_m: int | None = None,
    lpt_mix: tuple[float, float] = (0.0, 0.0),
    fill_tiles: bool = False,
    fill_small: int = 0,
    leaf_split: bool = False,
) -> KVGroups | None:
    """:func:`~deft.kernels.kv_groups.build_groups` in C, for a tree with queries (the caller checks the
    mode and chunk size); None when the native code is off or cannot take these inputs. ``chunk_policy``
    ``(kv_heads, chunk_min, chunk_max, target_programs)`` with ``chunk_size`` 0: the C code picks the chunk size
    from the tree's seen tokens (:func:`~deft.kernels.kv_groups.auto_chunk_size`), saving the caller a tree
    derivation. ``lpt_small_m``: order the tiles longest first in the same pass
    (:func:`~deft.kernels.kv_groups.order_tiles_longest_first`, small tiles from this ``small_m``; ``lpt_mix``: its
    ``(mix, slots)``). ``fill_tiles``: a chunk's query slices fill a tile each, the rest last (else near-equal);
    ``fill_small``: rows of a small tile (0: none), whose rest the wide nodes' budget does not count.
    ``leaf_split``: with ``few_split``, a chunk of leaves only is few too.
    The same as :func:`prepare_plan` then :func:`build_prepared`."""
    if not ENABLED:
        return None
    args = prepare_plan(group, mode, chunk_size, block_m_max, snap, wide_budget, few_split, chunk_policy,
                        lpt_small_m, lpt_mix, fill_tiles, fill_small, leaf_split)  # fmt: skip
    return None if args is None else build_prepared(tree, args, out_alloc)


def build_prepared(
    tree: DecodingTree, prep: NativePlanArgs, out_alloc: Callable[[int], np.ndarray] | None = None
) -> KVGroups | None:
    """One tree's plan in C with arguments from :func:`prepare_plan`; None when the native code is off or
    the tree is one it declines (no nodes or no queries, malformed arrays, too many tokens: numpy then)."""
    if not ENABLED:
        return None
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    parent, slot_ptr, slots, qn, qv = tree.parent, tree.slot_ptr, tree.slots, tree.query_node, tree.query_visible
    n, nq = parent.size, qn.size
    if n == 0 or nq == 0 or slot_ptr.size != n + 1 or qv.size != nq:
        return None
    try:  # the usual case, DecodingTree's own arrays: contiguous, writable int64
        if not (parent.dtype is _I64 and slot_ptr.dtype is _I64 and slots.dtype is _I64 and qn.dtype is _I64
                and qv.dtype is _I64):  # fmt: skip
            raise TypeError
        args = (n, _view64(parent), _view64(slot_ptr), slots.size, _view64(slots), nq, _view64(qn), _view64(qv),
                *prep.scalars)  # fmt: skip
    except (TypeError, ValueError, BufferError):
        args = (n, _buf(parent, _I64), _buf(slot_ptr, _I64), slots.size, _buf(slots, _I64), nq, _buf(qn, _I64),
                _buf(qv, _I64), *prep.scalars)  # fmt: skip
    ws, ws_buf = _workspace(_H_SIZE + 13 * n + 6 * nq + 64)
    rc = lib.deft_plan_size(*args, ws_buf, ws.size)
    while rc == 1:  # more chunks than the workspace holds: it says how much it needs (twice at most)
        ws, ws_buf = _workspace(int(ws[0]))
        rc = lib.deft_plan_size(*args, ws_buf, ws.size)
    if rc != 0:
        return None
    h = ws[:18].tolist()
    used_chunk = int(ws[_H_CHUNK])
    total, n_tiles = h[1], h[2]
    packed = np.empty(total, dtype=_I32) if out_alloc is None else out_alloc(total)
    try:
        dst = _VIEW[_I32](packed) if packed.dtype is _I32 and packed.size == total and total else None
    except (TypeError, ValueError, BufferError):
        dst = None
    tmp = None
    if dst is None:  # an out_alloc array C cannot write into directly: fill a fresh one and copy
        tmp = np.empty(total, dtype=_I32)
        dst = _VIEW[_I32](tmp)
    lib.deft_plan_fill(ws_buf, dst)
    classes = -1
    if prep.order is not None:  # the tiles section starts the packed array; the plan's workspace is free again
        small_m, mix, slots_ = prep.order
        classes = _order_tiles(lib, dst, n_tiles, prep.group, small_tile_rows(prep.group, h[7], small_m), mix, slots_)
    if tmp is not None:
        packed[...] = tmp
    sec = h[10:18]
    return KVGroups(
        packed=packed,
        offsets=dict(zip(SECTIONS, zip(sec[:-1], sec[1:], strict=True), strict=True)),
        n_tiles=n_tiles,
        n_chunks=h[3],
        n_tokens=h[4],
        n_partials=h[5],
        max_parts=h[6],
        rows=h[7],
        chunk_size=used_chunk,
        classes=classes,
    )

def _order_tiles(
    lib: ctypes.CDLL, tiles, n: int, group: int, small_rows: int, mix: float = 0.0, slots: float = 0.0
) -> int:
    """``deft_order_tiles`` on ``n`` tile records at ``tiles`` (a ctypes int32 at the first), scratch from this
    thread's workspace; returns the tile classes the plan holds (:func:`~deft.kernels.kv_groups.tile_classes`)."""
    _, scratch = _workspace(6 * max(n, 1))
    return int(lib.deft_order_tiles(tiles, n, group, small_rows, LPT_BIG, LPT_SMALL, LPT_PROGRAM, float(mix),
                                    float(slots), scratch))  # fmt: skip


def order_tiles_native(tiles: np.ndarray, group: int, small_rows: int, mix: float = 0.0, slots: float = 0.0) -> bool:
    """:func:`~deft.kernels.kv_groups.order_tiles_longest_first`'s reorder in C, in place on ``tiles``
    (``[n, 6]`` int32, C-contiguous, writable); False (nothing done) when the native code is off or cannot
    take the array. Plans order their tiles in :func:`build_groups_native`; this is the same sort on its own."""
    if not ENABLED or tiles.ndim != 2 or tiles.shape[1] != 6 or tiles.dtype is not _I32:
        return False
    lib = _lib if _lib is not None else _load()
    if lib is None or not (0 <= group < 1 << 30 and -(1 << 40) < small_rows < 1 << 40):
        return False
    try:
        buf = _VIEW[_I32](tiles)
    except (TypeError, ValueError, BufferError):  # not contiguous, or read-only
        return False
    _order_tiles(lib, buf, tiles.shape[0], int(group), int(small_rows), mix, slots)
    return True


def prompt_partition_native(
    tiles: np.ndarray, group: int, small_rows: int, max_rows: int, min_tokens: int
) -> tuple[int, int] | None:
    """:func:`~deft.kernels.prompt_gluon.partition_prompt_tiles`' reorder in C, in place on ``tiles`` (``[n, 6]``
    int32, C-contiguous, writable): (the Gluon kernel's tiles, its pairs), or None (nothing done) when the native
    code is off or cannot take the array."""
    if not ENABLED or tiles.ndim != 2 or tiles.shape[1] != 6 or tiles.dtype is not _I32:
        return None
    lib = _lib if _lib is not None else _load()
    if lib is None or not (0 <= group < 1 << 30 and all(-(1 << 40) < x < 1 << 40 for x in (small_rows, max_rows, min_tokens))):
        return None
    try:
        buf = _VIEW[_I32](tiles)
    except (TypeError, ValueError, BufferError):  # not contiguous, or read-only
        return None
    n = tiles.shape[0]
    ws, scratch = _workspace(9 * max(n, 1) + 1)
    pairs = ctypes.c_int64.from_buffer(ws, (ws.size - 1) * 8)  # the workspace's last slot, past the scratch
    mine = int(lib.deft_prompt_partition(buf, n, group, small_rows, max_rows, min_tokens, scratch, pairs))
    return mine, int(pairs.value)


def wide_tokens_native(tree: DecodingTree, group: int, block_m: int) -> tuple[int, int] | None:
    """(seen tokens of the wide nodes, the most rows any has) for ``DeftAttention._prompt_share``, in C from the
    tree's native derivation: a wide node has more than ``block_m`` rows (queries in its subtree x ``group``). None
    when the native code is off or the tree has no native derivation."""
    if not ENABLED:
        return None
    lib = _lib if _lib is not None else _load()
    d = tree._native if lib is not None else None
    if d is None or d[3] is None:
        return None
    order, _, _, seen, _ = d
    n, nq = tree.n_nodes, tree.n_queries
    ws, scratch = _workspace(n + 2)
    out = _view64(ws[n:])
    lib.deft_wide_tokens(n, order.size, _buf(order, _I64), _buf(tree.parent, _I64), _buf(seen, _I64), nq,
                         _buf(tree.query_node, _I64) if nq else None, group, block_m, scratch, out)  # fmt: skip
    return int(ws[n]), int(ws[n + 1])
