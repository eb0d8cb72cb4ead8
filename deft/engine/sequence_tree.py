"""Sequence tree manager: the tree of each step, its queries, and which pool slots hold written K/V.

Per step it turns a :class:`~deft.tree.DecodingTree` into what the model needs: each query's own slot
(where its K/V goes), its position (0-based, for RoPE), and for tokens new this step the slot of the
token before it (whose greedy prediction becomes the new token's input). It also keeps KV accounting
honest: a freed slot must hold K/V and leave the tree, every slot of the tree must be written (prompt
at prefill, or a query's own token now or earlier), and no slot may stay held once the tree drops it.
All of it is vectorised numpy over the step's queries and slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deft.tree import DecodingTree


class KVAccountingError(RuntimeError):
    """The trace's tree and the KV pool disagree (a slot read before written, freed twice, or leaked)."""


@dataclass(frozen=True, eq=False)
class StepBatch:
    """One step's queries as the model runs them."""

    step: int
    tree: DecodingTree
    query_slot: np.ndarray  # [n] own token's slot: K/V written there this step
    position: np.ndarray  # [n] 0-based position in the sequence (RoPE)
    new_slot: np.ndarray  # [m] slots whose token first appears this step
    src_slot: np.ndarray  # [m] slot of the token before each new one
    new_position: np.ndarray  # [m]
    freed: np.ndarray
    n_live: int  # slots holding K/V of the tree after this step's writes

    @property
    def n_queries(self) -> int:
        return int(self.query_slot.size)

    def packed(self) -> np.ndarray:
        """All index arrays in one int64 vector: one host-to-device copy per step."""
        return np.concatenate([self.query_slot, self.position, self.new_slot, self.src_slot, self.new_position])


def prefix_len(parent: np.ndarray, node_len: np.ndarray) -> np.ndarray:
    """Tokens in each node's strict ancestors, by pointer jumping: O(nodes x log depth) numpy, no per-node Python."""
    up = parent.copy()
    acc = np.where(up >= 0, node_len[np.maximum(up, 0)], 0)
    while (up >= 0).any():
        has = up >= 0
        a = np.maximum(up, 0)
        acc = acc + np.where(has, acc[a], 0)
        up = np.where(has, up[a], -1)
    return acc


class SequenceTree:
    """Keeps the current tree and which of the pool's ``capacity`` slots hold K/V."""

    def __init__(self, capacity: int, check: bool = True, full_check_every: int = 1) -> None:
        """``check``: verify the KV accounting every step: freed slots held K/V and the count of written
        slots equals the tree's tokens (O(freed + queries)). ``full_check_every``: also verify that every
        slot of the tree holds K/V (O(tree tokens): ~30 us a step at 36k tokens) on the first step and then
        every that many steps; 0 never, 1 every step."""
        self.capacity = int(capacity)
        self.check = check
        self.full_check_every = int(full_check_every)
        self._n_steps = 0
        self.written = np.zeros(self.capacity, dtype=bool)
        self.n_written = 0
        self.tree: DecodingTree | None = None
        self.prompt_slots: np.ndarray | None = None

    def prefill(self, tree: DecodingTree, prompt_len: int) -> np.ndarray:
        """The prompt's slots (the root's first ``prompt_len``), marked written by the prefill."""
        root_slots = tree.node_slots(tree.root)
        if root_slots.size < prompt_len:
            raise KVAccountingError(f"the first tree's root holds {root_slots.size} slots, fewer than the {prompt_len}-token prompt")
        self.prompt_slots = root_slots[:prompt_len].copy()
        self.written[self.prompt_slots] = True
        self.n_written = int(prompt_len)
        return self.prompt_slots

    def advance(self, state) -> StepBatch:
        """Apply a step (``state.step``, ``state.tree``, ``state.freed``) and return its queries."""
        tree: DecodingTree = state.tree
        freed = np.asarray(state.freed, dtype=np.int64)
        w = self.written
        if freed.size:
            if self.check and not w[freed].all():
                bad = freed[~w[freed]]
                raise KVAccountingError(f"step {state.step}: freed slots {bad[:8].tolist()} hold no K/V (double free?)")
            w[freed] = False
            self.n_written -= int(freed.size)
        qslot = tree.query_slot
        new_q = np.flatnonzero(~w[qslot])
        new_slot = qslot[new_q]
        w[new_slot] = True
        self.n_written += int(new_slot.size)
        full = self.full_check_every > 0 and self._n_steps % self.full_check_every == 0
        self._n_steps += 1
        if self.check:
            if full and not w[tree.slots].all():
                bad = tree.slots[~w[tree.slots]]
                raise KVAccountingError(
                    f"step {state.step}: slots {bad[:8].tolist()} are in the tree but hold no K/V "
                    f"(neither prompt nor the own token of a query in this or an earlier step)"
                )
            if self.n_written != tree.total_tokens:
                raise KVAccountingError(
                    f"step {state.step}: {self.n_written} slots hold K/V but the tree has {tree.total_tokens} tokens: "
                    f"{self.n_written - tree.total_tokens} slots left the tree without being freed"
                )
        qn, qv = tree.query_node, tree.query_visible
        position = prefix_len(tree.parent, tree.node_len)[qn] + qv - 1
        own = tree.slot_ptr[qn] + qv - 1
        par = tree.parent[qn]
        if ((qv == 1) & (par < 0)).any():
            raise KVAccountingError(f"step {state.step}: a query sits on the root's first token (nothing precedes it)")
        prev = np.where(qv > 1, own - 1, tree.slot_ptr[np.maximum(par, 0) + 1] - 1)
        self.tree = tree
        return StepBatch(
            step=int(state.step),
            tree=tree,
            query_slot=qslot,
            position=position,
            new_slot=new_slot,
            src_slot=tree.slots[prev[new_q]],
            new_position=position[new_q],
            freed=freed,
            n_live=self.n_written,
        )
