"""Tree decoding loop: prefill the prompt, then per step plan once and run every layer through the method.

A step (:meth:`TreeDecoder.step`): the branch controller applies the trace's events (slots allocated and
freed in the engine's pool), the sequence tree manager lists the queries, the method plans once, the
model runs all layers with the method's attention between the dense parts (K/V of the step's tokens
written at their ``query_slot``), and each query's greedy token is logged. The trace decides the
tree's shape, so every method does exactly the same work. No host sync inside a step: CUDA events
around the step and around attention in every layer are read after the step's one sync (the greedy
tokens coming back to the host).

With ``overlap`` the loop runs one step ahead: step t+1 is advanced, planned and uploaded while the GPU
still runs step t (the trace decides the next tree and the greedy tokens are fed on the device, so
nothing waits for step t's output), then launched, and only then is step t read back, once step t+1's
start event (which follows every upload of its plan) has completed. Two sets of events and pinned
staging buffers alternate between steps; a step's metrics are the same, except ``step_ms``, which
becomes the time between two steps' completions.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deft.attention import AttentionMethod, Plan
from deft.engine.branch import BranchController, KVNeeds, kv_needs
from deft.engine.model import ModelArgs, Transformer, build_model
from deft.engine.sequence_tree import SequenceTree, StepBatch
from deft.kv_pool import KVPool, SlotAllocator

TOKEN_MODES = ("greedy", "fixed")
#: padded query counts captured in CUDA graphs: powers of two to 8, then multiples of 8
GRAPH_ALIGN = 8


def graph_bucket(n: int) -> int:
    """Padded query count of the CUDA graphs that serve ``n`` queries."""
    if n <= GRAPH_ALIGN:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // GRAPH_ALIGN) * GRAPH_ALIGN


class _Timer:
    """CUDA events on a GPU (recorded, read after the step's sync), host clock on a CPU (ops are synchronous)."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = [torch.cuda.Event(enable_timing=True) for _ in range(n)] if self.cuda else [0.0] * n

    def mark(self, i: int) -> None:
        if self.cuda:
            self.marks[i].record()
        else:
            self.marks[i] = time.perf_counter()

    def ms(self, a: int, b: int) -> float:
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b])
        return (self.marks[b] - self.marks[a]) * 1e3


#: a step whose attention time exceeds this many times the run's median is counted as slow (a stall: a kernel
#: compiled or loaded mid-run, a garbage-collector pass, a synchronising allocation)
SLOW_FACTOR = 3.0


@dataclass
class RunResult:
    """Per-step metrics and run totals of one decode run."""

    trace: str
    prompt_len: int
    kv_capacity: int
    engine: str
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    peak_mem_gb: float = float("nan")
    steps: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run's aggregate row (definitions in the README's engine section)."""
        col = {k: np.asarray([s[k] for s in self.steps], dtype=np.float64) for k in self.steps[0]} if self.steps else {}

        def q(k: str, p: float) -> float:
            return float(np.percentile(col[k], p)) if col else float("nan")

        def tot(k: str) -> float:
            return float(col[k].sum()) if col else 0.0

        n = len(self.steps)
        decode = tot("step_ms")
        gpu = tot("gpu_ms")
        digest = hashlib.sha1(np.concatenate(self.tokens).astype(np.int64).tobytes()).hexdigest()[:12] if self.tokens else ""
        return {
            "kind": "aggregate",
            "trace": self.trace,
            "prompt_len": self.prompt_len,
            "engine": self.engine,
            "steps": n,
            "total_queries": int(tot("n_queries")),
            "e2e_ms": self.e2e_ms,
            "ttft_ms": self.ttft_ms,
            "decode_ms": decode,
            "tpot_ms": decode / n if n else float("nan"),
            "tokens_per_s": tot("n_queries") / (decode * 1e-3) if decode else float("nan"),
            "step_ms_median": q("step_ms", 50),
            "step_ms_p90": q("step_ms", 90),
            "gpu_ms_total": gpu,
            "attn_ms_total": tot("attn_ms"),
            "attn_share": tot("attn_ms") / gpu if gpu else float("nan"),
            "attn_ms_max": float(col["attn_ms"].max()) if col else float("nan"),
            "attn_slow_steps": int((col["attn_ms"] > SLOW_FACTOR * np.median(col["attn_ms"])).sum()) if col else 0,
            "plan_ms_total": tot("plan_ms"),
            "plan_ms_median": q("plan_ms", 50),
            "replay_ms_median": q("replay_ms", 50),
            "host_ms_median": q("host_ms", 50),
            "launch_ms_median": q("launch_ms", 50),
            "launch_cpu_ms_median": q("launch_cpu_ms", 50),
            "overhead_ms_median": q("overhead_ms", 50),
            "overhead_ms_p90": q("overhead_ms", 90),
            "peak_mem_gb": self.peak_mem_gb,
            "kv_capacity": self.kv_capacity,
            "kv_peak_slots": int(col["kv_live"].max()) if col else 0,
            "kv_occupancy_peak": float(col["kv_live"].max() / self.kv_capacity) if col else 0.0,
            "kv_occupancy_mean": float(col["kv_live"].mean() / self.kv_capacity) if col else 0.0,
            "greedy_digest": digest,
        }

    def rows(self, step_rows: bool = True) -> list[dict[str, Any]]:
        head = {"trace": self.trace, "prompt_len": self.prompt_len, "engine": self.engine}
        rows = [self.summary()]
        if step_rows:
            rows += [{"kind": "step", **head, **s} for s in self.steps]
        return rows


class _GraphBucket:
    """Static buffers and the ``n_layers + 1`` graphs of one padded query count."""

    def __init__(self, size: int, dec: TreeDecoder) -> None:
        a = dec.model.args
        self.size = size
        self.idx = torch.zeros(2 * size, dtype=torch.int64, device=dec.device)
        self.idx[:size] = dec.pad_slot
        self.slots, self.pos = self.idx[:size], self.idx[size:]
        self.o = torch.zeros(size, a.n_heads, a.head_dim, dtype=a.torch_dtype, device=dec.device)
        self.q: list[torch.Tensor | None] = [None] * a.n_layers
        self.x: list[torch.Tensor | None] = [None] * a.n_layers
        self.logits: torch.Tensor | None = None
        self.toks: torch.Tensor | None = None
        self.graphs: list[torch.cuda.CUDAGraph] = []


class StepGraphs:
    """Piecewise CUDA graphs of a decode step, one set per padded query count.

    Segment 0 embeds and runs layer 0 up to attention; segment ``i`` finishes layer ``i-1`` and runs layer
    ``i`` up to attention; the last finishes the last layer, applies the LM head and picks greedy tokens.
    Attention runs eagerly between segments, so every method works unchanged (its plan differs per step).
    Padding rows write K/V to a reserved slot no tree uses. On a CPU the segments run eagerly: same
    buffers and padding, which is what the tests check.
    """

    def __init__(self, dec: TreeDecoder) -> None:
        self.dec = dec
        self.buckets: dict[int, _GraphBucket] = {}
        self.capture = dec.device.type == "cuda"
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None

    def _segments(self, b: _GraphBucket) -> list[Callable[[], None]]:
        dec, m = self.dec, self.dec.model
        kp, vp = dec.pool.k, dec.pool.v
        L = m.args.n_layers

        def first() -> None:
            x = m.embed(dec.slot_token.index_select(0, b.slots))
            b.cos, b.sin = m.rope(b.pos)
            b.x[0] = x
            b.q[0] = m.pre_attention(0, x, b.cos, b.sin, b.slots, kp[0], vp[0])

        def middle(i: int) -> Callable[[], None]:
            def seg() -> None:
                x = m.post_attention(i - 1, b.x[i - 1], b.o)
                b.x[i] = x
                b.q[i] = m.pre_attention(i, x, b.cos, b.sin, b.slots, kp[i], vp[i])

            return seg

        def last() -> None:
            x = m.post_attention(L - 1, b.x[L - 1], b.o)
            b.logits = m.head(x)
            b.toks = b.logits.argmax(-1)
            dec.next_tok.index_copy_(0, b.slots, b.toks)

        return [first, *(middle(i) for i in range(1, L)), last]

    def prepare(self, counts) -> None:
        """Build (capture on a GPU) the buckets serving these query counts, largest first."""
        for size in sorted({graph_bucket(int(n)) for n in counts if n > 0} - set(self.buckets), reverse=True):
            b = _GraphBucket(size, self.dec)
            segs = self._segments(b)
            if self.capture:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for seg in segs:  # warm-up: cuBLAS handles, lazy buffers
                        seg()
                torch.cuda.current_stream().wait_stream(s)
                for seg in segs:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.mempool):
                        seg()
                    b.graphs.append(g)
                torch.cuda.synchronize(self.dec.device)
            else:
                b.graphs = segs  # type: ignore[assignment]
            self.buckets[size] = b

    def forward(self, n: int, idx_dev: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step of ``n`` queries; ``idx_dev`` holds the padded slots then positions. Returns (logits, tokens)."""
        b = self.buckets.get(graph_bucket(n))
        if b is None:
            self.prepare([n])
            b = self.buckets[graph_bucket(n)]
        b.idx.copy_(idx_dev)
        run = (lambda g: g.replay()) if self.capture else (lambda g: g())
        run(b.graphs[0])
        for i in range(self.dec.model.args.n_layers):
            self.dec.attend(i, b.q[i][:n], plan, out=b.o[:n])
            run(b.graphs[i + 1])
        return b.logits[:n], b.toks[:n]


@dataclass(eq=False)
class _Step:
    """A step between its host preparation and its completion (the overlapped engine holds two)."""

    b: StepBatch
    plan: Plan
    meta: torch.Tensor
    k: int  # padded query count (CUDA graphs) or the query count
    turn: int  # which of the two timer / staging sets the step uses
    replay_ms: float
    tree_ms: float
    t_host: float  # host clock when the step's plan started (after the controller and the sequence tree)
    t0: float
    t1: float
    t_up: float
    t_launched: float = 0.0
    launch_cpu_ms: float = 0.0
    logits: Any = None
    tok_host: Any = None
    done: Any = None  # CUDA event after the step's last kernel (None on a CPU)
    consumed: Any = None  # CUDA event after the step's uploads, before its first kernel


class TreeDecoder:
    """The engine: model, KV pool, attention method; prefill, decode steps, and metrics of a trace run."""

    def __init__(
        self,
        model: Transformer,
        method: AttentionMethod,
        kv_capacity: int,
        device: str | torch.device | None = None,
        cuda_graphs: bool = False,
        tokens: str = "greedy",
        seed: int = 0,
        check: bool = True,
        full_check_every: int = 1,
        overlap: bool = False,
    ) -> None:
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        a: ModelArgs = model.args
        self.model = model
        self.method = method
        self.device = torch.device(device) if device is not None else model.output.weight.device
        self.shape = a.attention_shape()
        self.kv_capacity = int(kv_capacity)
        self.capacity = self.kv_capacity + 1  # one reserved slot takes the K/V of CUDA-graph padding rows
        self.pool = KVPool(a.n_layers, self.capacity, a.n_kv_heads, a.head_dim, a.torch_dtype, self.device)
        self.pad_slot = self.kv_capacity
        self.tokens = tokens
        self.seed = int(seed)
        self.check = check
        self.full_check_every = int(full_check_every)  # see SequenceTree
        # per slot: its input token, and the greedy token predicted from it
        self.slot_token = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)
        self.next_tok = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)
        self._run_takes_out = "out" in inspect.signature(method.run).parameters
        self.graphs = StepGraphs(self) if cuda_graphs else None
        self.engine = ("cuda_graphs" if self.device.type == "cuda" else "graph_segments") if cuda_graphs else "eager"
        # overlap: plan step t + 1 on the host while the GPU runs step t (the trace, not the tokens, decides the
        # tree, so the next plan never waits for this step's output); two sets of events and staging buffers
        self.overlap = bool(overlap)
        if self.overlap:
            self.engine += "+overlap"
        L = a.n_layers
        # [attn start, attn end] per layer, then step start (after its uploads), step end
        self._timers = [_Timer(self.device, 2 * L + 2) for _ in range(2)]
        self._t = self._timers[0]
        self._turn = 0
        self._host_bufs: list[torch.Tensor | None] = [None, None]
        self._tok_bufs: list[torch.Tensor | None] = [None, None]
        self._last_done: float | None = None

    # ------------------------------------------------------------------ pieces of a step
    def attend(self, i: int, q: torch.Tensor, plan: Plan, out: torch.Tensor | None = None) -> torch.Tensor:
        """The method's attention for layer ``i``, between two timing marks (no sync)."""
        self._t.mark(2 * i)
        if out is not None and self._run_takes_out:
            o = self.method.run(q, self.pool.k[i], self.pool.v[i], plan, out=out)
        else:
            o = self.method.run(q, self.pool.k[i], self.pool.v[i], plan)
            if out is not None:
                out.copy_(o)
        self._t.mark(2 * i + 1)
        return o

    def _forward_eager(self, qs: torch.Tensor, pos: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.embed(self.slot_token.index_select(0, qs))
        cos, sin = m.rope(pos)
        for i in range(m.args.n_layers):
            q = m.pre_attention(i, x, cos, sin, qs, self.pool.k[i], self.pool.v[i])
            x = m.post_attention(i, x, self.attend(i, q, plan))
        logits = m.head(x)
        toks = logits.argmax(-1)
        self.next_tok.index_copy_(0, qs, toks)
        return logits, toks

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy of the step's index arrays (pinned staging on a GPU, one buffer per turn)."""
        t = torch.from_numpy(host)
        if self.device.type != "cuda":
            return t
        buf = self._host_bufs[self._turn]
        if buf is None or buf.numel() < t.numel():
            buf = self._host_bufs[self._turn] = torch.empty(max(t.numel(), 1024) * 2, dtype=torch.int64, pin_memory=True)
        buf = buf[: t.numel()]
        # safe: this buffer's last copy (two steps ago) preceded an event the host has waited for since
        buf.copy_(t)
        return buf.to(self.device, non_blocking=True)

    def _feed_tokens(self, new_slot: torch.Tensor, src_slot: torch.Tensor, new_pos: torch.Tensor) -> None:
        """Input token of each slot first seen this step: greedy from the token before it, or a fixed hash."""
        if new_slot.numel() == 0:
            return
        if self.tokens == "greedy":
            tok = self.next_tok.index_select(0, src_slot)
        else:
            tok = (new_slot * 1000003 + new_pos * 7919 + self.seed) % self.model.args.vocab_size
        self.slot_token.index_copy_(0, new_slot, tok)

    @torch.inference_mode()
    def prefill(self, prompt_slots: np.ndarray) -> torch.Tensor:
        """Seeded random prompt tokens through the causal forward; their K/V land in ``prompt_slots``."""
        n = prompt_slots.size
        g = torch.Generator().manual_seed(self.seed)
        toks = torch.randint(self.model.args.vocab_size, (n,), generator=g).to(self.device)
        slots = torch.from_numpy(prompt_slots).to(self.device)
        self.slot_token.index_copy_(0, slots, toks)
        logits = self.model.prefill(toks, slots, self.pool.k, self.pool.v)
        self.next_tok[slots[-1]] = logits.argmax()
        return logits

    @torch.inference_mode()
    def step(
        self, b: StepBatch, replay_ms: float = 0.0, tree_ms: float = 0.0
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """One decode step of an advanced batch (``replay_ms``, ``tree_ms``: host time already spent on it by the
        branch controller and the sequence tree manager); returns its metrics, logits and greedy tokens."""
        p = self._launch(self._prepare(b, replay_ms, tree_ms, time.perf_counter()))
        return self._finish(p, p.done)

    def _prepare(self, b: StepBatch, replay_ms: float, tree_ms: float, t_host: float) -> _Step:
        """Host side of a step: the method's plan and the upload of the step's index arrays (no sync)."""
        self._turn ^= 1
        t0 = time.perf_counter()
        plan = self.method.plan(b.tree, self.shape, self.device)
        t1 = time.perf_counter()
        n = b.n_queries
        if self.graphs is not None:
            pad = graph_bucket(n) - n
            qs_h = np.concatenate([b.query_slot, np.full(pad, self.pad_slot, np.int64)])
            pos_h = np.concatenate([b.position, np.zeros(pad, np.int64)])
            host = np.concatenate([qs_h, pos_h, b.new_slot, b.src_slot, b.new_position])
            k = n + pad
        else:
            host, k = b.packed(), n
        meta = self._upload(host)
        return _Step(b, plan, meta, k, self._turn, replay_ms, tree_ms, t_host, t0, t1, time.perf_counter())

    def _launch(self, p: _Step, keep_logits: bool = False) -> _Step:
        """Queue the step's kernels (and its greedy tokens' copy to the host); no sync."""
        timer = self._timers[p.turn]
        self._t = timer
        timer.mark(-2)  # step start; also 'inputs consumed': every H2D copy of the step's plan and metadata precedes it
        c_up = time.thread_time()
        n, m, k = p.b.n_queries, p.b.new_slot.size, p.k
        meta = p.meta
        qs, pos = meta[:k], meta[k : 2 * k]
        self._feed_tokens(meta[2 * k : 2 * k + m], meta[2 * k + m : 2 * k + 2 * m], meta[2 * k + 2 * m :])
        if self.graphs is not None:
            logits, toks = self.graphs.forward(n, meta[: 2 * k], p.plan)
            if keep_logits:  # the bucket's buffer is overwritten by the next step of its size
                logits = logits.clone()
        else:
            logits, toks = self._forward_eager(qs, pos, p.plan)
        if self.device.type == "cuda":
            buf = self._tok_bufs[p.turn]
            if buf is None or buf.numel() < n:
                buf = self._tok_bufs[p.turn] = torch.empty(max(n, 256) * 2, dtype=torch.int64, pin_memory=True)
            tok_host = buf[:n]
            tok_host.copy_(toks, non_blocking=True)
        else:
            tok_host = toks
        timer.mark(-1)
        p.logits, p.tok_host = logits, tok_host
        p.t_launched, p.launch_cpu_ms = time.perf_counter(), (time.thread_time() - c_up) * 1e3
        p.done = timer.marks[-1] if self.device.type == "cuda" else None
        p.consumed = timer.marks[-2] if self.device.type == "cuda" else None
        return p

    def _finish(self, p: _Step, wait_for: Any) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """Wait for ``wait_for`` (this step's end event, or the next step's inputs-consumed event, which follows
        it on the stream) and read the step's metrics; the step's tokens come back with it."""
        if wait_for is not None:
            wait_for.synchronize()
        t3 = time.perf_counter()
        timer = self._timers[p.turn]
        L = self.model.args.n_layers
        gpu = timer.ms(2 * L, 2 * L + 1)
        if self.overlap and self._last_done is not None:
            step_ms = (t3 - self._last_done) * 1e3  # steps overlap: the period between two completions
        else:
            step_ms = p.replay_ms + p.tree_ms + (t3 - p.t_host) * 1e3
        self._last_done = t3
        rec = {
            "step": p.b.step,
            "n_queries": p.b.n_queries,
            "n_nodes": p.b.tree.n_nodes,
            "kv_live": p.b.n_live,
            "replay_ms": p.replay_ms,
            "tree_ms": p.tree_ms,
            "plan_ms": (p.t1 - p.t0) * 1e3,
            "host_ms": p.replay_ms + p.tree_ms + (p.t_up - p.t0) * 1e3,
            "launch_ms": (p.t_launched - p.t_up) * 1e3,
            # CPU time this thread spent in that launch loop: close to launch_ms when the host is busy
            # launching, lower when it waited (a blocking call, or the OS running something else)
            "launch_cpu_ms": p.launch_cpu_ms,
            "step_ms": step_ms,
            "gpu_ms": gpu,
            "attn_ms": sum(timer.ms(2 * i, 2 * i + 1) for i in range(L)),
            "overhead_ms": step_ms - gpu,
        }
        return rec, p.logits, p.tok_host.clone()

    # ------------------------------------------------------------------ a run
    def needs(self, trace, max_steps: int | None = None) -> KVNeeds:
        """The trace's KV needs, checked against this pool: raises before any step if it cannot hold them."""
        needs = kv_needs(trace, max_steps)
        needs.check(self.kv_capacity)
        return needs

    @torch.inference_mode()
    def run(
        self,
        trace,
        max_steps: int | None = None,
        warmup_steps: int = 0,
        on_step: Callable[[StepBatch, torch.Tensor, torch.Tensor], None] | None = None,
        progress: bool = False,
    ) -> RunResult:
        """Prefill and decode ``trace`` (its first ``max_steps`` steps), after an untimed warm-up of ``warmup_steps``."""
        needs = self.needs(trace, max_steps)
        if self.graphs is not None:
            self.graphs.prepare(needs.query_counts)
        if warmup_steps:
            self._decode(trace, min(warmup_steps, needs.steps), None)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        res = self._decode(trace, needs.steps, on_step, progress)
        if cuda:
            res.peak_mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        return res

    @staticmethod
    def _record(res: RunResult, p: _Step, out: tuple[dict[str, Any], torch.Tensor, torch.Tensor], on_step) -> None:
        rec, logits, toks = out
        res.steps.append(rec)
        res.tokens.append(toks.numpy())
        if on_step is not None:
            on_step(p.b, logits, toks)

    def _decode(self, trace, steps: int, on_step, progress: bool = False) -> RunResult:
        allocator = SlotAllocator(self.kv_capacity)  # never hands out the pad slot (the pool's last row)
        self.pool.allocator = allocator
        seq = SequenceTree(self.capacity, self.check, self.full_check_every)
        ctrl = BranchController(trace, allocator, steps)
        res = RunResult(trace.name, int(trace.prompt_len), self.kv_capacity, self.engine)
        t_start = time.perf_counter()
        it = iter(ctrl)
        state = next(it, None)
        if state is None:
            return res
        prompt = seq.prefill(state.tree, trace.prompt_len)
        self.prefill(prompt).argmax().item()  # TTFT: the first token on the host
        res.ttft_ms = (time.perf_counter() - t_start) * 1e3
        bar = tqdm(total=steps, desc=f"{getattr(self.method, 'name', 'decode')} {trace.name} ({self.engine})", unit="step",
                   disable=not progress, leave=False, mininterval=2.0)  # fmt: skip
        self._last_done = None
        pending: _Step | None = None  # the overlapped engine's step still on the GPU
        while state is not None:
            bar.update(1)
            t0 = time.perf_counter()
            b = seq.advance(state)
            t_tree = time.perf_counter()
            p = self._prepare(b, ctrl.replay_ms[-1], (t_tree - t0) * 1e3, t_tree)
            p = self._launch(p, keep_logits=on_step is not None)
            if pending is not None:  # the previous step: done once this one's inputs are on the GPU
                self._record(res, pending, self._finish(pending, p.consumed), on_step)
            if self.overlap:
                pending = p
            else:
                self._record(res, p, self._finish(p, p.done), on_step)
            state = next(it, None)
        if pending is not None:
            self._record(res, pending, self._finish(pending, pending.done), on_step)
        res.e2e_ms = (time.perf_counter() - t_start) * 1e3
        bar.close()
        return res


def run_e2e(cfg, method: AttentionMethod, workload) -> list[dict[str, Any]]:
    """``bench=e2e``: build the model (``cfg.model``), replay ``workload``'s trace through ``method``; metric rows."""
    b = cfg.bench
    dev = str(cfg.get("device", "auto"))
    device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
    args = ModelArgs.from_config(cfg.model, dtype=b.get("dtype"))
    trace = workload.trace()
    max_steps = b.get("max_steps")
    needs = kv_needs(trace, max_steps)
    capacity = int(b.get("kv_capacity") or needs.slots)
    needs.check(capacity)  # before the model is even built
    method.check_available()
    model = build_model(args, device, cfg.model.get("weights"), int(cfg.model.get("seed", 0)))
    dec = TreeDecoder(model, method, capacity, device, bool(b.get("cuda_graphs", False)), str(b.get("tokens", "greedy")),
                      int(cfg.get("seed", 0)), full_check_every=int(b.get("kv_check_every", 1)),
                      overlap=bool(b.get("overlap", False)))  # fmt: skip
    try:
        res = dec.run(trace, max_steps, int(b.get("warmup_steps", 0)), progress=bool(b.get("progress", True)))
        rows = res.rows(bool(b.get("step_rows", True)))
        rows[0]["model_gb"] = args.n_params * torch.empty((), dtype=args.torch_dtype).element_size() / 2**30
        rows[0]["kv_pool_gb"] = args.n_layers * dec.capacity * args.attention_shape().kv_token_bytes / 2**30
        return rows
    finally:
        # a multirun builds the next 16 GB model in this process: free this one (the graphs hold a cycle) first
        dec.graphs = None
        del dec, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
