"""Print or plot what D2O did, from `D2O.report()` (or `GenerationResult.policy_report`).

format_d2o_report(report) -> str    a per-layer table: F_l, L*w_l, ratio, S_h / S_r, merged vs dropped, final tau
plot_d2o_report(report, path)       three panels: per-layer ratio bars, merged vs dropped bars, tau over decode steps
Batch row 0 is shown where values differ per row. matplotlib is optional (pip install minikv[plot]).
"""
from __future__ import annotations

import math
from pathlib import Path
from minikv.errors import BadInput, MissingExtra


def _num(x, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _check(report: dict) -> list[dict]:
    if report.get("policy") != "d2o":
        raise BadInput(f"not a D2O report (policy = {report.get('policy')!r})")
    if "layers" not in report:
        raise BadInput("the D2O report has no per-layer data: the policy has not been run on a prompt yet")
    return report["layers"]


def format_d2o_report(report: dict) -> str:
    """A per-layer table of D2O's decisions (row 0 of the batch)."""
    layers = _check(report)
    head = (f"D2O budget {report['budget']} (rho row 0 = {_num(report['rho'][0])}), heavy_share "
            f"{report['heavy_share']}, n_sink {report['n_sink']}, merge {report['merge_weights']}, "
            f"when {report['when']}, allocation {report['allocation']}, alpha {report['alpha']}, beta {report['beta']}"
            + ("" if report.get("tau_override") is None else f", tau fixed at {report['tau_override']}"))
    cols = f"{'layer':>5} {'F':>6} {'L*w':>6} {'ratio':>6} {'S_h':>6} {'S_r':>6} {'merged':>8} {'dropped':>8} " \
           f"{'merge%':>7} {'tau':>7}"
    lines = [head, cols, "-" * len(cols)]
    tot_m = tot_d = 0
    for x in layers:
        full = x["full"][0] if x["full"] else False
        ratio = "full" if full else _num(x["ratio"][0] if x["ratio"] else None)
        sh, sr = x["S_h"][0], x["S_r"][0]
        n = x["merged"] + x["dropped"]
        tot_m, tot_d = tot_m + x["merged"], tot_d + x["dropped"]
        lines.append(f"{x['layer']:>5} {_num(x['F']):>6} {_num(x['Lw']):>6} {ratio:>6} "
                     f"{'-' if sh < 0 else sh:>6} {'-' if sr < 0 else sr:>6} {x['merged']:>8} {x['dropped']:>8} "
                     f"{_num(100 * x['merged'] / n if n else None, '{:.1f}'):>7} {_num(x['tau'][0]):>7}")
    n = tot_m + tot_d
    lines.append(f"{'all':>5} {'':>6} {'':>6} {'':>6} {'':>6} {'':>6} {tot_m:>8} {tot_d:>8} "
                 f"{_num(100 * tot_m / n if n else None, '{:.1f}'):>7}")
    return "\n".join(lines)


def plot_d2o_report(report: dict, path: str | Path) -> Path:
    """Save a figure: per-layer ratio, merged vs dropped per layer, tau over decode steps (row 0)."""
    layers = _check(report)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("plot_d2o_report needs matplotlib: pip install matplotlib (or minikv[plot])") from None
    idx = [x["layer"] for x in layers]
    ratio = [1.0 if (x["full"] and x["full"][0]) else (x["ratio"][0] if x["ratio"] else float("nan"))
             for x in layers]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    colors = ["tab:gray" if x["protected"] else "tab:blue" for x in layers]
    ax[0].bar(idx, ratio, color=colors)
    ax[0].axhline(report["rho"][0], color="k", lw=0.8, ls="--", label=f"rho = {report['rho'][0]:.3g}")
    ax[0].set(title="per-layer ratio (gray: protected)", xlabel="layer", ylabel="r_l")
    ax[0].legend()
    merged = [x["merged"] for x in layers]
    dropped = [x["dropped"] for x in layers]
    ax[1].bar(idx, merged, label="merged")
    ax[1].bar(idx, dropped, bottom=merged, label="dropped")
    ax[1].set(title="evicted entries", xlabel="layer", ylabel="entries (all rows, heads)")
    ax[1].legend()
    hists = [h for h in report["tau_history"] if h]
    if hists:
        # Many layers make a spaghetti plot: show the mean over compressed layers and the min-max band.
        n = min(map(len, hists))
        steps = range(n)
        cols = [[h[t] for h in hists] for t in steps]
        ax[2].fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.3, label="min-max over layers")
        ax[2].plot(steps, [sum(c) / len(c) for c in cols], lw=0.8, label=f"mean of {len(hists)} layers")
        ax[2].legend()
    ax[2].set(title="threshold tau (row 0)", xlabel="compression step", ylabel="tau")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
