"""A model of one DeFT partial launch on the GPU: each (tile, KV head) program priced in µs by its class, and the
launch as greedy list scheduling onto the resident slots (the GPU starts a grid's programs in order as slots free).

Host-side and cheap (a few numpy calls and one short heap loop), so a plan can compare a few candidate cuts of the
same tree with it (``DeftAttention.wide_pick``). The rates are fitted (``scripts/schedule_model.py``'s ``fit_rates``)
on session 13's per-program H100 timelines; they rank alternatives, they do not predict a step's µs (the reduction,
the launch and co-running effects are not in them).
"""

from __future__ import annotations

import heapq

import numpy as np

from deft.kernels.kv_groups import FLAG_CONTIG, FLAG_MASK, FLAG_SHIFT, TILE_FIELDS, KVGroups

#: µs per program by class: (fixed, per unmasked token, per masked token). H100, fitted on session 13's timelines
#: (``results/h100/timeline/timeline_2026-12-05_s13*.csv.gz``, 11,400 programs): big affine r = 0.98, big gathered
#: r = 0.99, small r = 0.61 (a small program's time varies with what runs beside it). The big masked tiles measured
#: (Medusa's, about one 64-token block each) cost their fixed 10.8 µs whatever their length, so the fit prices their
#: masked tokens at nothing: a fit to tiles of a single length, not a claim about longer ones.
US_RATES: dict[str, tuple[float, float, float]] = {
    "big_affine": (7.7, 0.0192, 0.0472),
    "big_gathered": (5.8, 0.0472, 0.0472),
    "big_masked": (10.8, 0.0192, 0.0),
    "small": (3.6, 0.0435, 0.0435),
}


#: class codes of :func:`program_codes`, in :data:`US_RATES`' order
CLASSES = tuple(US_RATES)


def class_codes(small: np.ndarray, masked: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Class indices into :data:`CLASSES` from per-program flags: small, else masked, else affine or gathered."""
    code = np.where(np.asarray(masked, dtype=bool), 2, 1 - np.asarray(affine, dtype=np.int64))
    code[np.asarray(small, dtype=bool)] = 3
    return code


def program_codes(g: KVGroups, group: int, small_rows: int = 16) -> np.ndarray:
    """Each tile's class as an index into :data:`CLASSES`, in tile order: a big tile (rows over ``small_rows``) is
    affine when its first phase is over consecutive slots (``FLAG_CONTIG``) and it has no masked phase."""
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    small = (t[:, 3] - t[:, 2]).astype(np.int64) * group <= small_rows
    return class_codes(small, (t[:, 5] & FLAG_MASK) != 0, (t[:, 5] & FLAG_CONTIG) != 0)


def program_class(g: KVGroups, group: int, small_rows: int = 16) -> np.ndarray:
    """Each tile's class (a key of :data:`US_RATES`), in tile order (see :func:`program_codes`)."""
    return np.asarray(CLASSES)[program_codes(g, group, small_rows)]


def program_us(g: KVGroups, group: int, small_rows: int = 16, rates: dict | None = None) -> np.ndarray:
    """Modelled µs of each tile's program (the same for every KV head), in tile order: the fixed and per-token costs of
    its class (``rates``, default :data:`US_RATES`), its unmasked and masked phases priced apart."""
    rates = {} if rates is None else rates  # a class it lacks keeps US_RATES' price
    r = np.array([rates.get(c, US_RATES[c]) for c in CLASSES])  # [class, (fixed, per token, per masked token)]
    t = g.section("tiles").reshape(-1, len(TILE_FIELDS))
    n_tok = (t[:, 1] - t[:, 0]).astype(np.float64)
    unmasked = (t[:, 5] >> FLAG_SHIFT).astype(np.float64)
    rc = r[program_codes(g, group, small_rows)]
    return rc[:, 0] + rc[:, 1] * unmasked + rc[:, 2] * (n_tok - unmasked)


def makespan(costs: np.ndarray, slots: int) -> float:
    """Greedy list scheduling of ``costs`` in order onto ``slots`` identical slots: when the last one ends."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if len(costs) <= slots:
        return float(np.max(costs, initial=0.0))
    free = [0.0] * slots
    for c in costs.tolist():
        heapq.heapreplace(free, free[0] + c)
    return max(free)


def lpt_makespan(g: KVGroups, group: int, small_rows: int, slots_per_head: int) -> float:
    """Modelled µs of a launch of plan ``g``: its programs longest first on ``slots_per_head`` slots (the resident
    programs per KV head; a tile's KV heads start together, so one head's share of the slots models them all)."""
    return makespan(np.sort(program_us(g, group, small_rows))[::-1], max(1, int(slots_per_head)))
