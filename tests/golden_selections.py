"""Golden selections: which positions every policy keeps, step by step, frozen from the compacting store.

What the golden vectors are: for each case of CASES (a policy, its budget and options, a tiny float64 model, one or
two prompts), `run_case` runs `minikv.generate.prefill` and then STEPS greedy `decode_step`s, and records after the
prefill and after every step
    pos     [layer][row][kv head] -> the sorted live positions (store.pos >= 0)
    token   [row] the greedy token (argmax of the logits)
    max     [row] the largest logit;  lse  [row] the logsumexp of the logits (floats)
and for D2O, after the last step, each layer's `tau`, `merged`, `dropped` from `policy.report(cache)["layers"]`
(tau NaN is stored as null). tests/test_store_equivalence.py compares the current code with them.

Generated from commit 9851210 (the compacting store: live entries in slots [0, length), in position order) with
    git -C /work/main worktree add --detach /tmp/minikv_old 9851210
    cd /work/main && PYTHONPATH=/tmp/minikv_old python3 tests/golden_selections.py --write
which writes tests/data/golden_selections.json (the path of the minikv it ran and its commit are recorded there).

Why frozen: the fixed-capacity store frees slots in place (pos = -1) and writes new entries into free slots, so slot
order no longer equals position order, and every tie-break reads the position (older wins). That rewrite must keep
EXACTLY the positions the compacting store kept, for every policy, at every step. Do not regenerate the file from
the new code: that would make the comparison vacuous. Regenerate it only from 9851210 (e.g. after adding a case).

Only public API present in both stores is used: prefill, decode_step, get_policy, cache.layers[i].pos, report.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

from conftest import tiny_model

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_selections.json"
STEPS = 10                       # greedy decode steps after the prefill
SOURCE_COMMIT = "9851210"

# Prompt sets: (length, seed) per row. Two rows of different lengths are left-padded by prefill.
PROMPTS = {
    "b1": [(36, 13)],
    "b2": [(30, 11), (24, 12)],
    "b2long": [(40, 14), (36, 15)],    # long enough for SnapKV's default window of 32
}
SMALL_WINDOW = {"window": 4}
D2O_LAST_ONLY = {"protected_layers": [0]}    # a 3-layer model: layers 1 and 2 are compressed


def case(policy: str, budget=None, prompts: str = "b2", layers: int = 3, uniform: bool = False, seed: int = 0,
         **options) -> dict:
    """One case, JSON-able. uniform: zero q_proj in every layer, so attention is uniform and scores tie."""
    name = "-".join([policy, str(budget), prompts, f"L{layers}"] + [f"{k}={v}" for k, v in options.items()]
                    + (["uniform"] if uniform else []) + ([f"seed{seed}"] if seed else []))
    return dict(name=name.replace(" ", ""), policy=policy, budget=budget, options=options, prompts=prompts,
                model=dict(seed=seed, layers=layers, uniform=uniform), steps=STEPS)


CASES = [
    # every registered policy with its default options (budgets chosen so that the defaults evict)
    case("full"), case("full", prompts="b1"),
    case("streaming", 0.3), case("h2o", 0.3), case("adakv-h2o", 0.3), case("corm"),
    case("snapkv", 34, "b2long"), case("pyramidkv", 34, "b2long"),
    case("adakv-snapkv", 34, "b2long"), case("adakv-pyramidkv", 34, "b2long"),
    case("d2o", 0.3, layers=4),                                       # default protected layers 0, 1, 3
    # budgets as a count, batch 1
    case("streaming", 12, "b1"), case("h2o", 12, "b1"), case("adakv-h2o", 12, "b1"),
    case("snapkv", 12, "b1", **SMALL_WINDOW, kernel=3), case("adakv-snapkv", 12, "b1", **SMALL_WINDOW),
    case("d2o", 12, "b1", **D2O_LAST_ONLY), case("d2o", 12, layers=4),
    # option variants
    case("streaming", 12, n_sink=2), case("streaming", 0.3, "b1", n_sink=2),
    case("h2o", 12, n_sink=2), case("h2o", 0.3, "b1", seed=1),
    # sinks tie (+inf) when the heavy share is smaller than n_sink: at prefill (budget 6), at the first decode
    # eviction (budget 30: row 0's prompt of 30 fits), and across heads in Ada-KV's allocation
    case("h2o", 6, n_sink=4), case("h2o", 30, n_sink=20), case("adakv-h2o", 30, n_sink=20),
    case("snapkv", 0.3, **SMALL_WINDOW), case("pyramidkv", 0.3, **SMALL_WINDOW),
    case("adakv-snapkv", 0.3, **SMALL_WINDOW, variant="exact"),
    case("adakv-pyramidkv", 0.3, **SMALL_WINDOW, variant="exact"),
    case("adakv-h2o", 12, "b1", variant="exact"), case("adakv-h2o", 12, variant="exact", n_sink=2),
    case("d2o", 0.3, **D2O_LAST_ONLY, merge_weights="paper", threshold_rule="paper"),
    case("d2o", 6, **D2O_LAST_ONLY),                                   # heavy share < 4 sinks: sink ties
    case("corm", prefill_mode="exact"), case("corm", w=4, r=4),
    case("corm", prompts="b1", w=4, r=4, prefill_mode="exact"), case("corm", w=4, r=4, prefill_mode="exact"),
    case("corm", w=4, r=6, threshold="cached", n_sink=2),
    # tied scores: uniform attention (zero q_proj) makes window scores and Ada-KV's cross-head scores tie exactly
    case("snapkv", 0.3, uniform=True, **SMALL_WINDOW), case("pyramidkv", 0.3, uniform=True, **SMALL_WINDOW),
    case("adakv-snapkv", 0.3, uniform=True, **SMALL_WINDOW),
    case("adakv-snapkv", 0.3, uniform=True, **SMALL_WINDOW, variant="exact"),
    case("adakv-pyramidkv", 0.3, uniform=True, **SMALL_WINDOW),
    case("h2o", 0.3, uniform=True), case("adakv-h2o", 0.3, uniform=True),
    case("adakv-h2o", 12, uniform=True, variant="exact"),
    case("d2o", 0.3, uniform=True, **D2O_LAST_ONLY), case("corm", uniform=True, w=4, r=4),
]
CASE_NAMES = [c["name"] for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES), "case names must be unique"


@lru_cache(maxsize=None)
def build_model(seed: int, layers: int, uniform: bool):
    """A tiny float64 Llama (tests/conftest.py); uniform: every q_proj zeroed, so every score is 0."""
    model = tiny_model(dtype=torch.float64, seed=seed, num_hidden_layers=layers)
    if uniform:
        with torch.no_grad():
            for block in model.layers:
                block.self_attn.q_proj.weight.zero_()
    return model


def prompt_tokens(prompts: str) -> list[list[int]]:
    """The token rows of a prompt set (ids 1..100 of the tiny vocabulary of 101)."""
    return [torch.randint(1, 101, (n,), generator=torch.Generator().manual_seed(s)).tolist()
            for n, s in PROMPTS[prompts]]


def live_positions(cache) -> list:
    """[layer][row][kv head] -> sorted live positions (whatever slots hold them)."""
    return [[[torch.sort(p[p >= 0]).values.tolist() for p in layer.pos[b]] for b in range(layer.pos.shape[0])]
            for layer in cache.layers]


def step_record(cache, logits: torch.Tensor) -> dict:
    """What one step leaves: live positions, greedy tokens, max logit and logsumexp per row. logits: (B, vocab)."""
    lg = logits.double()
    return {"pos": live_positions(cache), "token": lg.argmax(-1).tolist(), "max": lg.amax(-1).tolist(),
            "lse": torch.logsumexp(lg, -1).tolist()}


def nan_to_none(xs: list) -> list:
    return [None if isinstance(x, float) and math.isnan(x) else x for x in xs]


def run_case(c: dict) -> dict:
    """Prefill, then c["steps"] greedy decode steps, with the minikv on sys.path. {"steps": [...], "d2o": ...}."""
    from minikv.generate import decode_step, prefill
    from minikv.policies import get_policy
    model = build_model(**c["model"])
    policy = get_policy(c["policy"], budget=c["budget"], **c["options"])
    logits, cache = prefill(model, prompt_tokens(c["prompts"]), policy)
    steps = [step_record(cache, logits)]
    for _ in range(c["steps"]):
        logits = decode_step(model, cache, logits.argmax(-1), policy)
        steps.append(step_record(cache, logits))
    out = {"steps": steps}
    if c["policy"] == "d2o":
        out["d2o"] = [{k: nan_to_none(layer[k]) for k in ("tau", "merged", "dropped")}
                      for layer in policy.report(cache)["layers"]]
    return out


def minikv_source() -> dict:
    """Where the imported minikv lives, and its git commit (with '+dirty' when its files differ from it)."""
    import minikv
    folder = Path(minikv.__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "minikv")
    return {"minikv": str(folder), "commit": git("rev-parse", "HEAD") + ("+dirty" if dirty else "")}


def write(path: Path = GOLDEN) -> None:
    """Run every case and write the JSON: one line per case, so a diff names the case."""
    source = minikv_source()
    if not source["commit"].startswith(subprocess.run(["git", "rev-parse", SOURCE_COMMIT], capture_output=True,
                                                      text=True, cwd=path.parent.parent).stdout.strip() or "?"):
        print(f"warning: minikv from {source}, not commit {SOURCE_COMMIT}", file=sys.stderr)
    compact = lambda x: json.dumps(x, separators=(",", ":"), allow_nan=False)
    lines = [f"{compact(c['name'])}:{compact({'case': c, **run_case(c)})}" for c in CASES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"source":' + compact(source) + ',\n"cases":{\n' + ",\n".join(lines) + "\n}}\n")
    print(f"wrote {len(CASES)} cases to {path} ({path.stat().st_size / 1024:.0f} KiB) from {source}")


def load(path: Path = GOLDEN) -> dict:
    """The golden file as {"source": ..., "cases": {name: {"case", "steps", "d2o"?}}}."""
    return json.loads(path.read_text())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"run the cases and write {GOLDEN}")
    args = ap.parse_args()
    if args.write:
        write()
    else:
        print("\n".join(CASE_NAMES))
