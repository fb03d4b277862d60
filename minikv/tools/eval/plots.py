"""Plots of evaluation records and policy reports (matplotlib, an optional extra: pip install minikv[plot]): quality
vs measured cache ratio, depth heatmaps, surviving positions, D2O's per-layer report, Ada-KV's per-head budgets."""
from __future__ import annotations

from pathlib import Path

from minikv.io import require
from minikv.generate import generate
from minikv.tools.common import format_rows, pyplot as _plt, save_figure as _save
from minikv.tools.eval.records import group_by as _by, mean as _mean, scored as _ok, summary

def quality_vs_ratio(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Mean score against mean measured cache ratio, one line per policy, one panel per (task, question mode); error
    bars: the tables' 95% intervals (records.summary)."""
    plt, groups = _plt(), _by(_ok(records), "task", "question")
    require(groups, "no finished records to plot")
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, ((task, qmode), recs) in zip(axes[0], groups.items()):
        for (p,), of_p in _by(recs, "policy").items():   # points: (mean measured ratio, mean score, low, high, budget)
            pts = sorted((_mean(r["cache_ratio"] for r in rs), *summary(rs)[:3], b or "-")
                         for (b,), rs in _by(of_p, "budget").items())
            xs, ys, lo, hi, labels = zip(*pts)
            style = dict(marker="*", ms=12, ls="none") if len(pts) == 1 else dict(marker="o")
            err = [[max(0.0, a - b) for a, b in pairs] for pairs in (zip(ys, lo), zip(hi, ys))]   # max(0, NaN) = 0
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=p, **style)
            for x, y, b in zip(xs, ys, labels):
                if b != "-":
                    ax.annotate(b, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel="measured cache ratio (live entries / full cache)",
               ylabel="perplexity (lower is better)" if task == "ppl" else "score",
               title=task if qmode == "none" else f"{task} (question-{qmode})", xlim=(0, 1.05))
        if task != "ppl":                             # perplexity keeps a linear axis fitted to its values
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    legend = {}                                       # one entry per policy over all panels
    for ax in axes[0]:
        legend.update({lab: h for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in legend})
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle((title + ": " if title else "") + "bars = 95% intervals (Wilson; perplexity: bootstrap over texts)")
    fig.tight_layout()
    return _save(fig, plt, path)

def depth_heatmaps(records: list[dict], path: str | Path) -> Path:
    """Mean score over (length, depth), one panel per (policy, budget), for records that have a depth."""
    plt, recs = _plt(), [r for r in _ok(records) if r.get("depth") is not None]
    require(recs, "no records with a depth (passkey, needle, ruler-lite multikey/multivalue) to plot")
    panels = _by(recs, "task", "policy", "budget")
    lengths, depths = sorted({r["length"] for r in recs}), sorted({r["depth"] for r in recs})
    cols, rows = min(4, len(panels)), -(-len(panels) // min(4, len(panels)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.2, 2.8 * rows + 0.4), squeeze=False,
                             constrained_layout=True)
    for ax, ((task, p, b), rs) in zip(axes.flat, panels.items()):
        cell = _by(rs, "depth", "length")
        stats = [[summary(cell.get((d, n), [])) for n in lengths] for d in depths]
        im = ax.imshow([[x[0] for x in row] for row in stats], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(f"{p}" + (f" @ {b}" if b else "") + (f"\n{task}" if len({t for t, _, _ in panels}) > 1 else ""),
                     fontsize=9)
        ax.set(xlabel="length (tokens)", ylabel="depth")
        for i, row in enumerate(stats):
            for j, (m, lo, hi, k) in enumerate(row):
                if k:
                    ax.text(j, i, f"{m:.2f} n={k}\n[{lo:.2f}, {hi:.2f}]", ha="center", va="center", fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    fig.suptitle("mean score over prompt length × needle depth, n prompts, [95% Wilson interval]")
    return _save(fig, plt, path)

def surviving_positions(model, ids: list[int], policy, layer: int, head: int,
                        question: list[int] | None = None) -> list[int]:
    """Positions still cached in (layer, KV head) after prefill and the first decode step (D2O compresses there),
    with the question appended uncompressed when given: the data of the strip plot."""
    res = generate(model, [ids], policy, max_new_tokens=2, stop_ids=[], keep_cache=True,
                   question=[question] if question else None)
    pos = res.cache.layers[layer].pos[0, head]                               # (S,)
    return sorted(int(p) for p in pos[pos >= 0].tolist())

def survival_strip(rows: list[tuple[str, list[int]]], n_tokens: int, path: str | Path, layer: int, head: int,
                   marks: list[tuple[int, int, str]] | None = None, title: str | None = None) -> Path:
    """One strip per policy: a tick at every surviving position; marks = (start, end, label) spans (the needle);
    `title` is put before the default title."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.4))
    for i, (label, positions) in enumerate(rows):
        ax.vlines(positions, i - 0.38, i + 0.38, lw=0.6, color=f"C{i % 10}")
        ax.text(n_tokens * 1.005, i, f"{len(positions)}", va="center", fontsize=7)
    for start, end, text in marks or []:
        ax.axvspan(start, end, color="red", alpha=0.25, lw=0)
        ax.text((start + end) / 2, len(rows) - 0.4, text, color="red", ha="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set(ylim=(len(rows) - 0.2, -0.6), xlim=(0, n_tokens), xlabel="position (right margin: entries kept)",
           title=(title or "") + f"positions kept in layer {layer}, KV head {head} after prefill + 1 decode step")
    fig.tight_layout()
    return _save(fig, plt, path)

# ---- policy reports (the common report: options, and per layer each row's state; row 0 is shown) --------------------
def _d2o_layers(report: dict) -> list[dict]:
    require(report.get("policy") == "d2o", f"not a D2O report (policy = {report.get('policy')!r})")
    require("F" in (report.get("layers") or [{}])[0],
            "the D2O report has no per-layer data: the policy has not been run on a prompt yet")
    return report["layers"]

def _num(x, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"

def format_d2o_report(report: dict) -> str:
    """A per-layer table of D2O's decisions (row 0; merged / dropped: all rows), with the options above it."""
    rows = [{"layer": x["layer"], "F": _num(x["F"][0]), "L*w": _num(x["Lw"][0]),
             "ratio": "full" if x["full"][0] else _num(x["ratio"][0]), "S_h": x["S_h"][0],
             "S_r": x["S_r"][0], "merged": sum(x["merged"]), "dropped": sum(x["dropped"]), "tau": _num(x["tau"][0])}
            for x in _d2o_layers(report)]
    rows.append({"layer": "all", "merged": sum(r["merged"] for r in rows), "dropped": sum(r["dropped"] for r in rows)})
    for r in rows:
        n = r["merged"] + r["dropped"]
        r["merge%"] = _num(100 * r["merged"] / n if n else None, 1)
        r.update({k: "-" for k in ("S_h", "S_r") if r.get(k, 0) < 0})
    options = ", ".join(f"{k} {v}" for k, v in report.items() if k not in ("policy", "budget", "layers") and v is not None)
    head = f"D2O budget {report['budget']} (rho row 0 = {_num(report['layers'][0]['rho'][0])}), {options}"
    return head + "\n" + format_rows(rows, ["layer", "F", "L*w", "ratio", "S_h", "S_r", "merged", "dropped", "merge%",
                                            "tau"])

def plot_d2o_report(report: dict, path: str | Path) -> Path:
    """Three panels: per-layer ratio (gray: protected), merged vs dropped per layer, tau over compression steps."""
    layers, plt = _d2o_layers(report), _plt()
    idx, rho = [x["layer"] for x in layers], layers[0]["rho"][0]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].bar(idx, [x["ratio"][0] for x in layers],
              color=["tab:gray" if x["protected"][0] else "tab:blue" for x in layers])
    ax[0].axhline(rho, color="k", lw=0.8, ls="--", label=f"rho = {rho:.3g}")
    ax[0].set(title="per-layer ratio (gray: protected)", xlabel="layer", ylabel="r_l")
    merged = [sum(x["merged"]) for x in layers]
    ax[1].bar(idx, merged, label="merged")
    ax[1].bar(idx, [sum(x["dropped"]) for x in layers], bottom=merged, label="dropped")
    ax[1].set(title="evicted entries", xlabel="layer", ylabel="entries (all rows, heads)")
    hists = [x["tau_history"][0] for x in layers if x["tau_history"][0]]
    if hists:                                # the mean over compressed layers and the min-max band, not 30 lines
        cols = [[h[t] for h in hists] for t in range(min(map(len, hists)))]
        ax[2].fill_between(range(len(cols)), [min(c) for c in cols], [max(c) for c in cols], alpha=0.3,
                           label="min-max over layers")
        ax[2].plot(range(len(cols)), [sum(c) / len(c) for c in cols], lw=0.8, label=f"mean of {len(hists)} layers")
    ax[2].set(title="threshold tau (row 0)", xlabel="compression step", ylabel="tau")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    return _save(fig, plt, path)

def head_budget_matrix(report: dict) -> tuple[list[int], list[list[int]]]:
    """(compressed layers, budgets[layer][head]) of row 0: entries per KV head, window included."""
    require(any("head_budget" in x for x in report.get("layers", [])),
            f"report of policy {report.get('policy')!r} has no head_budgets (not an Ada-KV report?)")
    layers = [x for x in report["layers"] if any(x["compressed"])]
    return [x["layer"] for x in layers], [x["head_budget"][0] for x in layers]

def format_head_budgets(report: dict) -> str:
    """One line per compressed layer: the budget of each KV head (entries incl. window), min / max / sum."""
    layers, m = head_budget_matrix(report)
    if not layers:
        return "no layer was compressed (the prompt fits the budget)"
    return format_rows([{"layer": l, **{f"h{i}": x for i, x in enumerate(r)}, "min": min(r), "max": max(r),
                         "sum": sum(r)} for l, r in zip(layers, m)])

def plot_head_budgets(report: dict, path: str | Path) -> Path:
    """Heatmap of per-head budgets (heads x layers)."""
    layers, m = head_budget_matrix(report)
    require(layers, "nothing to plot: no layer was compressed (the prompt fits the budget)")
    plt, grid = _plt(), [list(heads) for heads in zip(*m)]                        # (heads, layers)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(layers) + 2), max(2, 0.4 * len(grid) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_yticks(range(len(grid)))
    ax.set(xlabel="layer", ylabel="KV head")
    ax.set_title(f"{report.get('policy', '?')} budget {report.get('budget')}: entries per head", fontsize=9)
    fig.colorbar(im, ax=ax, label="entries (incl. window)")
    fig.tight_layout()
    return _save(fig, plt, path)
