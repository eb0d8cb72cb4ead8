"""Figures from result files only, plus the picture of a decoding tree with its DeFT-Flatten chunks.

- ``speedup_<gpu>.png``: DeFT-Flatten's attention speedup over each baseline vs prompt length, one panel
  per workload setting (few-shot widths, reasoning templates, speculative tree sizes);
- ``io_breakdown.png``: IO per category per method (analytic, one prompt length per workload setting);
- ``bandwidth_<gpu>.png``: achieved bandwidth (unique K/V bytes / time) as a fraction of measured copy
  bandwidth, per method and snapshot;
- ``tree_chunks.png``: a decoding tree laid out on its DFS-ordered token axis, with the chunk boundaries
  DeFT-Flatten's plan cuts (across node boundaries) and the queries each chunk serves.

Run as ``python -m scripts.plots`` (Hydra config ``conf/reproduce.yaml``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from deft.bench.results import IO_FIELDS, load_results  # noqa: E402
from scripts.tables import DISPLAY, REF, _latest, _methods, _with_labels, gpu_folders  # noqa: E402

_SAVE = {"dpi": 130, "bbox_inches": "tight", "metadata": {"Software": None}}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path


def speedup_figure(df: pd.DataFrame, path: Path, gpu: str) -> Path | None:
    a = df[(df["bench"] == "attention") & (df["kind"] == "aggregate")]
    if "bench.steps" in a:
        a = a[a["bench.steps"].isna()]
    if a.empty or REF not in set(a["method"]):
        return None
    a = _latest(_with_labels(a), ["label", "prompt_len", "method", "model", "dtype"])
    labels = sorted(a["label"].unique())
    n = len(labels)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, lbl in zip(axes.flat, labels, strict=False):
        piv = a[a["label"] == lbl].pivot_table(index="prompt_len", columns="method", values="total_attn_ms", aggfunc="first")
        if REF not in piv:
            continue
        for m in _methods(piv.columns):
            if m == REF:
                continue
            s = (piv[m] / piv[REF]).dropna()
            ax.plot(s.index / 1000, s.values, marker="o", ms=3, label=DISPLAY.get(m, m))
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set_title(lbl, fontsize=9)
        ax.set_xlabel("prompt length (k tokens)", fontsize=8)
        ax.set_ylabel("speedup of DeFT-Flatten", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(5, len(lab)) or 1, fontsize=7, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Attention speedup of DeFT-Flatten over each method ({gpu}; time per trace, all layers)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, path)


def io_breakdown_figure(df: pd.DataFrame, path: Path, prompt_len: int = 4000) -> Path | None:
    d = df[(df["bench"] == "io") & (df["kind"] == "aggregate")]
    if "bench.steps" in d:
        d = d[d["bench.steps"].isna()]
    if d.empty:
        return None
    d = _latest(_with_labels(d), ["label", "prompt_len", "method", "model", "dtype"])
    picks = []
    for lbl, g in d.groupby("label"):
        p = prompt_len if (g["prompt_len"] == prompt_len).any() else int(g["prompt_len"].min())
        picks.append((lbl, p))
    cats = [c for c in IO_FIELDS if c != "io_total"]
    n = len(picks)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (lbl, p) in zip(axes.flat, picks, strict=False):
        g = d[(d["label"] == lbl) & (d["prompt_len"] == p)].set_index("method")
        ms = _methods(g.index)
        bottom = np.zeros(len(ms))
        for i, c in enumerate(cats):
            v = g.loc[ms, c].to_numpy(dtype=float) / 1e9
            ax.bar(range(len(ms)), v, bottom=bottom, color=colors[i % 10], label=c[3:])
            bottom += v
        floor = float(g["floor_total"].iloc[0]) / 1e9
        ax.axhline(floor, color="k", ls="--", lw=0.8, label="floor")
        ax.set_yscale("log")
        ax.set_xticks(range(len(ms)), [DISPLAY.get(m, m) for m in ms], rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{lbl}, prompt {p}", fontsize=9)
        ax.set_ylabel("GB over the trace (all layers)", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=7, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle("HBM traffic by category (analytic io(); dashed: unique K/V + q + o floor)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return _save(fig, path)


def bandwidth_figure(df: pd.DataFrame, path: Path, gpu: str) -> Path | None:
    s = df[(df["bench"] == "attention") & (df["kind"] == "step")]
    if "bench.steps" in s:
        s = s[s["bench.steps"].notna()]
    if s.empty:
        return None
    s = _latest(_with_labels(s), ["label", "prompt_len", "step", "method", "model", "dtype"])
    s = s.assign(case=[f"{lbl}\np{int(p)} s{int(st)}" for lbl, p, st in zip(s["label"], s["prompt_len"], s["step"], strict=True)])
    piv = s.pivot_table(index="case", columns="method", values="bw_fraction", aggfunc="first")
    ms = _methods(piv.columns)
    x = np.arange(len(piv.index))
    wdt = 0.8 / max(1, len(ms))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(x) + 2), 3.6))
    for i, m in enumerate(ms):
        ax.bar(x + i * wdt - 0.4 + wdt / 2, piv[m].to_numpy(dtype=float), wdt, label=DISPLAY.get(m, m))
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xticks(x, piv.index, fontsize=6)
    ax.set_ylabel("unique K/V bytes / time\n÷ measured copy bandwidth", fontsize=8)
    ax.set_title(f"Achieved bandwidth as a fraction of the HBM floor ({gpu}, one layer per snapshot step)", fontsize=9)
    ax.legend(fontsize=6, ncol=min(6, len(ms)), loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- tree picture
def example_tree():
    """A small reasoning-like tree: a prompt, three thoughts, and a second level under two of them."""
    from deft.tree import DecodingTree

    parent = [-1, 0, 0, 0, 1, 1, 3, 3, 3]
    lens = [300, 70, 45, 90, 40, 25, 60, 30, 20]
    slots, s = [], 0
    for n in lens:
        slots.append(list(range(s, s + n)))
        s += n
    queries = [(i, lens[i]) for i in (2, 4, 5, 6, 7, 8)]
    return DecodingTree.from_lists(parent, slots, queries, n_slots=s)


def flatten_chunks(tree, chunk_size: int = 128) -> tuple[np.ndarray, list[tuple[int, int]], str]:
    """Chunk boundaries on the DFS token axis and each chunk's query range, from DeFT-Flatten's own plan
    when ``deft.kernels`` is importable; otherwise equal cuts of the axis (said in the returned note)."""
    try:
        from deft.attention import AttentionShape
        from deft.kernels.deft_flatten import DeftFlatten

        g = DeftFlatten(chunk_size=chunk_size).groups(tree, AttentionShape(32, 8, 128, "bfloat16", 1))
        if hasattr(g, "records"):
            t = g.records("tiles")
            lo, hi, qlo, qhi = t["tok_lo"], t["tok_hi"], t["q_lo"], t["q_hi"]
        else:  # the earlier packed layout, one section per tile field
            lo, hi = g.section("tile_tok_lo"), g.section("tile_tok_hi")
            qlo, qhi = g.section("tile_q_lo"), g.section("tile_q_hi")
        chunks: dict[tuple[int, int], list[int]] = {}
        for a, b, c, d in zip(lo.tolist(), hi.tolist(), qlo.tolist(), qhi.tolist(), strict=True):
            r = chunks.setdefault((a, b), [c, d])
            r[0], r[1] = min(r[0], c), max(r[1], d)
        keys = sorted(chunks)
        bounds = np.array([k[0] for k in keys] + [keys[-1][1]])
        return bounds, [tuple(chunks[k]) for k in keys], f"chunks from DeftFlatten(chunk_size={chunk_size}).groups()"
    except Exception as e:  # noqa: BLE001 (the picture must still come out, and say how it was made)
        n = tree.unique_kv_tokens
        k = max(1, -(-n // chunk_size))
        bounds = (np.arange(k + 1) * n) // k
        return bounds, [], f"fallback: equal cuts of the DFS axis (DeFT-Flatten plan unavailable: {type(e).__name__})"


def tree_figure(path: Path, tree=None, chunk_size: int = 128) -> Path:
    tree = tree if tree is not None else example_tree()
    seen = tree.node_seen_len
    order = tree.dfs_order
    nodes = order[seen[order] > 0]
    off = np.concatenate([[0], np.cumsum(seen[nodes])])
    start = dict(zip(nodes.tolist(), off[:-1].tolist(), strict=True))
    depth = tree.depth
    bounds, qranges, note = flatten_chunks(tree, chunk_size)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    colors = plt.get_cmap("Set2").colors
    for i, v in enumerate(nodes.tolist()):
        y = -int(depth[v])
        ax.barh(y, seen[v], left=start[v], height=0.5, color=colors[i % len(colors)], edgecolor="k", lw=0.5)
        ax.text(start[v] + seen[v] / 2, y, f"n{v}\n{int(seen[v])}", ha="center", va="center", fontsize=6)
        p = int(tree.parent[v])
        if p >= 0:
            ax.plot([start[p] + seen[p], start[v]], [-int(depth[p]) - 0.25, y + 0.25], color="0.5", lw=0.6)
    qn = tree.query_node
    for j in range(tree.n_queries):
        v = int(qn[j])
        x = start[v] + int(tree.query_visible[j]) - 0.5
        ax.plot([x], [-int(depth[v]) - 0.42], marker="^", color="crimson", ms=5)
    ybot = -int(depth.max()) - 1.2
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        ax.axvline(a, color="navy", lw=0.8, ls="--")
        ax.barh(ybot, b - a, left=a, height=0.35, color="lightsteelblue" if i % 2 == 0 else "steelblue", edgecolor="navy", lw=0.5)
        label = f"chunk {i}"
        if qranges:
            label += f"\n{qranges[i][1] - qranges[i][0]} q"
        ax.text((a + b) / 2, ybot, label, ha="center", va="center", fontsize=6)
    ax.axvline(bounds[-1], color="navy", lw=0.8, ls="--")
    ax.set_yticks([-d for d in range(int(depth.max()) + 1)] + [ybot], [f"depth {d}" for d in range(int(depth.max()) + 1)] + ["chunks"], fontsize=7)
    ax.set_xlabel("K/V tokens in DFS order (the flattened tree)", fontsize=8)
    ax.set_title(
        f"DeFT-Flatten: the tree's K/V in DFS order cut into near-equal chunks across node boundaries\n"
        f"(red ▲: a query at its newest token; each chunk serves the queries below its nodes; {note})",
        fontsize=8,
    )
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def build_all(results_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    root = Path(results_dir)
    out = Path(out_dir) if out_dir else root / "figures"
    written: list[Path | None] = []
    for gpu in gpu_folders(root):
        df = load_results(root, gpu=gpu)
        written.append(speedup_figure(df, out / f"speedup_{gpu}.png", gpu))
        written.append(bandwidth_figure(df, out / f"bandwidth_{gpu}.png", gpu))
    io = load_results(root, bench="io")
    if not io.empty:
        io = io.assign(_cpu=(io["gpu"] == "cpu").astype(int)).sort_values(["_cpu", "date"]).drop_duplicates("run_key", keep="last")
        written.append(io_breakdown_figure(io, out / "io_breakdown.png"))
    written.append(tree_figure(out / "tree_chunks.png"))
    return [p for p in written if p is not None]


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path="../conf", config_name="reproduce")
    def _app(cfg: DictConfig) -> None:
        for p in build_all(cfg.results_dir, cfg.get("figures_dir")):
            print(f"wrote {p}")

    _app()


if __name__ == "__main__":
    main()
