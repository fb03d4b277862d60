"""Views of Ada-KV's per-head budgets (a policy's report()): a text table and a heads x layers heatmap."""
from __future__ import annotations

from pathlib import Path
from minikv.errors import BadInput, MissingExtra


def head_budget_matrix(report: dict, row: int = 0) -> tuple[list[int], list[list[int]]]:
    """(layers, budgets[layer][head]) for one batch row from report["head_budgets"] (total entries incl. window)."""
    per_layer = report.get("head_budgets")
    if per_layer is None:
        raise BadInput(f"report of policy {report.get('policy')!r} has no 'head_budgets' (not an Ada-KV policy?)")
    layers = sorted(per_layer, key=int)                      # JSON round trips turn layer keys into strings
    return [int(l) for l in layers], [list(per_layer[l][row]) for l in layers]


def format_head_budgets(report: dict, row: int = 0) -> str:
    """A table: one line per compressed layer, the budget of each KV head, and the layer's min / max / sum."""
    layers, m = head_budget_matrix(report, row)
    if not layers:
        return "no layer was compressed (the prompt fits the budget)"
    H = len(m[0])
    width = max(5, max(len(str(x)) for r in m for x in r))
    head = "layer " + " ".join(f"{'h' + str(i):>{width}}" for i in range(H)) + f" {'min':>{width}} {'max':>{width}} {'sum':>{width + 1}}"
    lines = [f"{report.get('policy', '?')} budget {report.get('budget')} (alpha {report.get('alpha')}, "
             f"{report.get('variant')}): entries per KV head incl. window, batch row {row}", head]
    for l, r in zip(layers, m):
        lines.append(f"{l:>5} " + " ".join(f"{x:>{width}}" for x in r) +
                     f" {min(r):>{width}} {max(r):>{width}} {sum(r):>{width + 1}}")
    return "\n".join(lines)


def plot_head_budgets(report: dict, path: str | Path, row: int = 0) -> Path:
    """Heatmap of per-head budgets (heads x layers) written to `path` (needs matplotlib: pip install minikv[plot])."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("plot_head_budgets needs matplotlib; install it with `pip install matplotlib` "
                          "(or `pip install minikv[plot]`), or use format_head_budgets for a text table") from None
    layers, m = head_budget_matrix(report, row)
    if not layers:
        raise BadInput("nothing to plot: no layer was compressed (the prompt fits the budget)")
    grid = [[m[j][i] for j in range(len(layers))] for i in range(len(m[0]))]      # (heads, layers)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(layers) + 2), max(2, 0.4 * len(grid) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.set_xticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_yticks(range(len(grid)))
    ax.set_title(f"{report.get('policy', '?')} budget {report.get('budget')}: entries per head", fontsize=9)
    fig.colorbar(im, ax=ax, label="entries (incl. window)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
