"""Plots of evaluation records (matplotlib, an optional extra: pip install minikv[plot]).

  quality_vs_ratio(records, path)      the main plot: mean score vs mean measured cache ratio, one line per policy
  depth_heatmaps(records, path)        needle / passkey score over length × depth, one panel per (policy, budget)
  survival_strip(rows, path)           which positions survive in one layer / KV head, per policy
  surviving_positions(model, ids, policy, layer, head)   the data of that strip: the cache's `pos` after prefill
                                       and the first decode step
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from minikv.errors import BadInput, MissingExtra


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("plots need matplotlib: pip install matplotlib (or pip install minikv[plot])") from None
    return plt


def _ok(records):
    return [r for r in records if not r.get("error") and r.get("score") is not None]


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def quality_points(records: list[dict]) -> dict[str, list[tuple[float, float, str]]]:
    """policy -> [(mean measured ratio, mean score, budget label)] sorted by ratio."""
    cells = defaultdict(list)
    for r in _ok(records):
        cells[(r["policy"], r["budget"])].append(r)
    out = defaultdict(list)
    for (p, b), rs in cells.items():
        out[p].append((_mean(r["cache_ratio"] for r in rs), _mean(r["score"] for r in rs), b or "-"))
    return {p: sorted(v) for p, v in out.items()}


def quality_vs_ratio(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Mean score against mean measured cache ratio, one line per policy, one panel per (task, question mode)."""
    plt = _plt()
    groups = defaultdict(list)
    for r in _ok(records):
        groups[(r["task"], r["question"])].append(r)
    if not groups:
        raise BadInput("no finished records to plot")
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, ((task, qmode), recs) in zip(axes[0], groups.items()):
        for p, pts in quality_points(recs).items():
            xs, ys, labels = zip(*pts)
            style = dict(marker="*", ms=12, ls="none") if len(pts) == 1 else dict(marker="o")
            ax.plot(xs, ys, label=p, **style)
            for x, y, b in pts:
                if b != "-":
                    ax.annotate(b, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ppl = task == "ppl"
        ax.set(xlabel="measured cache ratio (live entries / full cache)",
               ylabel="perplexity (lower is better)" if ppl else "score",
               title=task if qmode == "none" else f"{task} (question-{qmode})", xlim=(0, 1.05))
        if not ppl:                                   # perplexity keeps a linear axis fitted to its values
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    legend = {}                                       # one entry per policy over all panels
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)   # beside, not on, the data
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def depth_heatmaps(records: list[dict], path: str | Path) -> Path:
    """Mean score over (length, depth), one panel per (policy, budget), for records that have a depth."""
    plt = _plt()
    recs = [r for r in _ok(records) if r.get("depth") is not None]
    if not recs:
        raise BadInput("no records with a depth (passkey, needle, ruler-lite multikey/multivalue) to plot")
    panels = list(dict.fromkeys((r["task"], r["policy"], r["budget"]) for r in recs))
    lengths = sorted({r["length"] for r in recs})
    depths = sorted({r["depth"] for r in recs})
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.2, 2.8 * rows + 0.4), squeeze=False,
                             constrained_layout=True)
    im = None
    for ax, (task, p, b) in zip(axes.flat, panels):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                vals = [r["score"] for r in recs if (r["task"], r["policy"], r["budget"], r["length"], r["depth"])
                        == (task, p, b, n, d)]
                if vals:
                    grid[i][j] = _mean(vals)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(f"{p}" + (f" @ {b}" if b else "") + (f"\n{task}" if len({t for t, _, _ in panels}) > 1 else ""),
                     fontsize=9)
        ax.set_xlabel("length (tokens)", fontsize=8)
        ax.set_ylabel("depth", fontsize=8)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    fig.suptitle("score over prompt length × needle depth")
    return _save(fig, plt, path)


def surviving_positions(model, ids: list[int], policy, layer: int, head: int,
                        question: list[int] | None = None) -> list[int]:
    """Positions still cached in (layer, KV head) after prefill and the first decode step (D2O compresses there),
    with the question appended uncompressed when given: the data of the strip plot."""
    from minikv.generate import generate
    L, H = model.cfg.num_hidden_layers, model.cfg.num_key_value_heads
    if not 0 <= layer < L or not 0 <= head < H:
        raise BadInput(f"layer must be in [0, {L}) and head in [0, {H}), got layer={layer}, head={head}")
    res = generate(model, [ids], policy, max_new_tokens=2, stop_ids=[], keep_cache=True,
                   question=[question] if question else None)
    pos = res.cache.layers[layer].pos[0, head]                               # (S,)
    return sorted(int(p) for p in pos[pos >= 0].tolist())


def survival_strip(rows: list[tuple[str, list[int]]], n_tokens: int, path: str | Path, layer: int, head: int,
                   marks: list[tuple[int, int, str]] | None = None, title: str | None = None) -> Path:
    """One strip per policy: a tick at every surviving position; marks = (start, end, label) spans (the needle)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.4))
    for i, (label, positions) in enumerate(rows):
        ax.vlines(positions, i - 0.38, i + 0.38, lw=0.6, color=f"C{i % 10}")
        ax.text(n_tokens * 1.005, i, f"{len(positions)}", va="center", fontsize=7)
    for start, end, text in marks or []:
        ax.axvspan(start, end, color="red", alpha=0.25, lw=0)
        ax.text((start + end) / 2, len(rows) - 0.4, text, color="red", ha="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.2)
    ax.set_xlim(0, n_tokens)
    ax.invert_yaxis()
    ax.set_xlabel("position (right margin: entries kept)")
    ax.set_title(title or f"positions kept in layer {layer}, KV head {head} after prefill + 1 decode step")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")   # keeps a legend placed beside the axes
    plt.close(fig)
    return path
