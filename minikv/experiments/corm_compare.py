"""CORM vs H2O on the default model (SmolLM2-135M-Instruct): decode-time perplexity on GPL-3, a ~3k-token passkey,
and CORM's measured cache ratio vs sequence length.

    python3 -m minikv.experiments.corm_compare                    # everything; writes results/corm.json (+ png), prints tables
    python3 -m minikv.experiments.corm_compare --quick            # a short smoke run (small sizes, nothing written)

Method (results/corm.md repeats it):
- Perplexity: the first 1024 GPL-3 tokens are the prompt (oneshot prefill), the next 1024 are scored by teacher forcing
  through single-token forward calls with the policy's after_step hook (eviction active while scoring).
- Passkey: filler sentences, "The pass key is NNNNN. Remember it. NNNNN is the pass key." at 5 depths (one prompt
  per depth), then "What is the pass key? The pass key is"; correct if the key is in the first 8 greedy tokens.
- H2O runs at CORM's measured ratio: budget (entries per layer and head) = round(CORM's final ratio x tokens seen).
- The prompt's forward pass does not depend on the policy (a layer is compressed after its own attention over the
  full prompt), so each prompt is run once with every statistic captured and each policy compresses a copy
  (`capture_prefill` / `cache_from_capture`); `check_capture` verifies this equals generate.prefill.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # also runnable as a file

from minikv.io.checkpoint import load_model                      # noqa: E402
from minikv.generate import prefill                           # noqa: E402
from minikv.policies import get_policy                        # noqa: E402
from minikv.policies.corm import corm_exact_prefill           # noqa: E402
from minikv.store import KVCache, LayerStore                  # noqa: E402
from minikv.io.tokenizer import load_tokenizer                   # noqa: E402

MODEL_DIR = REPO / "weights" / "smollm2-135m-instruct"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
SETTINGS = [(16, 16), (32, 64), (64, 128), (256, 256)]
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


# ---- one prefill, many policies -----------------------------------------------------------------------------------
@dataclass
class Capture:
    logits: torch.Tensor                  # (B, vocab) of the last prompt token
    stores: list[LayerStore]              # each layer's store right after its attention (nothing evicted)
    stats: list[dict]                     # each layer's attention statistics ("colsum", "last_rows")
    n: int                                # prompt length


def clone_store(s: LayerStore) -> LayerStore:
    return LayerStore(s.k.clone(), s.v.clone(), s.pos.clone(), s.length.clone(), s.seen.clone(),
                      {k: t.clone() for k, t in s.stats.items()})


@torch.no_grad()
def capture_prefill(model, ids: list[int], window: int) -> Capture:
    """Run the prompt once (full attention) and keep every layer's store and its colsum / last `window` rows."""
    stores, stats = [], []

    def hook(layer, store, st):
        stores.append(clone_store(store))
        stats.append(st)

    cache = model.new_cache(1, capacity=len(ids) + 1)
    logits = model(torch.tensor([ids]), cache, hook=hook, need=frozenset({"colsum", "last_rows"}), window=window,
                   last_only=True)[:, -1]
    return Capture(logits, stores, stats, len(ids))


def cache_from_capture(model, cap: Capture, policy, extra: int = 0) -> KVCache:
    """What generate.prefill would build with `policy`: start, after_prefill per layer on a copy, reserve."""
    policy.start(model.cfg, 1, [cap.n])
    layers = []
    for layer, (store, st) in enumerate(zip(cap.stores, cap.stats)):
        store = clone_store(store)
        st = dict(st)
        if policy.window:
            st["last_rows"] = st["last_rows"][:, :, :, -policy.window:]      # the last w rows of the captured ones
        policy.after_prefill(layer, store, st)
        layers.append(store)
    cache = KVCache(layers)
    if not policy.decode_evicts:
        cache.reserve(extra)
    return cache


@torch.no_grad()
def decode_step(model, cache: KVCache, policy, token: int) -> torch.Tensor:
    """One single-token forward call with the policy's after_step hook; returns logits (vocab,)."""
    return model(torch.tensor([[token]]), cache, hook=policy.after_step, need=policy.decode_needs,
                 window=policy.window)[0, -1]


@torch.no_grad()
def check_capture(model, ids: list[int], steps: int = 6) -> None:
    """The capture path equals generate.prefill (+ decode steps) for corm and h2o: same kept positions, same logits."""
    for make in (lambda: get_policy("corm", w=16, r=16), lambda: get_policy("h2o", budget=len(ids) // 3)):
        cap = capture_prefill(model, ids, 256)
        pa, pb = make(), make()
        ca = cache_from_capture(model, cap, pa, extra=steps)
        la = cap.logits[0]
        lb, cb = prefill(model, [ids], pb, extra_capacity=steps)
        lb = lb[0]
        for j in range(steps):
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
            for x, y in zip(ca.layers, cb.layers):
                n = max(x.max_length(), y.max_length())
                assert torch.equal(x.pos[..., :n], y.pos[..., :n]), f"{pa}: kept positions differ at step {j}"
            tok = int(la.argmax())
            la, lb = decode_step(model, ca, pa, tok), decode_step(model, cb, pb, tok)


# ---- perplexity ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_ppl(model, cap: Capture | None, policy, cont: list[int], log_every: int = 0,
               prefilled: tuple[torch.Tensor, KVCache] | None = None) -> dict:
    """Teacher-forced perplexity of `cont` after the prompt (captured, or `prefilled` = (logits (1, vocab), cache)),
    evicting after every token (after_step)."""
    if prefilled is None:
        cache, logits = cache_from_capture(model, cap, policy, extra=len(cont)), cap.logits[0]
    else:
        logits, cache = prefilled[0][0], prefilled[1]
    nll, ratios, trajectory = 0.0, [], []
    t0 = time.perf_counter()
    for j, tok in enumerate(cont):
        nll -= float(torch.log_softmax(logits.double(), -1)[tok])
        ratios.append(cache.cache_ratio())
        if j % 32 == 0 or j == len(cont) - 1:
            trajectory.append((int(cache.seen[0]), ratios[-1]))
        if j + 1 < len(cont):
            logits = decode_step(model, cache, policy, tok)
        if log_every and (j + 1) % log_every == 0:
            print(f"    {policy!r}: {j + 1}/{len(cont)} tokens, ppl so far {math.exp(nll / (j + 1)):.3f}, "
                  f"ratio {ratios[-1]:.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
    return {"ppl": math.exp(nll / len(cont)), "final_ratio": cache.cache_ratio(), "final_seen": int(cache.seen[0]),
            "mean_ratio": sum(ratios) / len(ratios), "ratio_after_prefill": ratios[0],
            "kv_bytes_live": cache.nbytes_live(), "kv_bytes_allocated": cache.nbytes_allocated(),
            "trajectory": trajectory, "seconds": time.perf_counter() - t0}


# ---- passkey ------------------------------------------------------------------------------------------------------
def passkey_prompt(tok, depth: float, key: int, n_tokens: int) -> list[int]:
    """~n_tokens of filler with the needle after a `depth` fraction of the filler sentences, then the question."""
    per = len(tok.encode(" " + FILLER))
    fixed = len(tok.encode(" " + NEEDLE.format(key=key) + " " + QUESTION))
    reps = max(1, (n_tokens - fixed) // per)
    before = round(depth * reps)
    parts = [FILLER] * before + [NEEDLE.format(key=key)] + [FILLER] * (reps - before) + [QUESTION]
    return tok.encode(" ".join(parts))


@torch.no_grad()
def passkey_answer(model, tok, cap: Capture, policy, n_new: int = 8) -> tuple[str, float]:
    """Greedy answer (first n_new tokens) and the cache ratio right after prefill."""
    cache = cache_from_capture(model, cap, policy, extra=n_new)
    ratio = cache.cache_ratio()
    logits, out = cap.logits[0], []
    for j in range(n_new):
        out.append(int(logits.argmax()))
        if j + 1 < n_new:
            logits = decode_step(model, cache, policy, out[-1])
    return tok.decode(out), ratio


@torch.no_grad()
def needle_retention(model, tok, depth: float, key: int, w: int, r: int, n_tokens: int = 3000) -> dict:
    """Diagnostic: after a oneshot CORM prefill of the passkey prompt, the fraction of (layer, KV head) pairs that
    still hold each needle token, and the answer when decoding then runs with no further eviction."""
    pids = passkey_prompt(tok, depth, key, n_tokens)
    needle = tok.encode(" " + NEEDLE.format(key=key))
    start = next(i for i in range(len(pids)) if pids[i:i + len(needle)] == needle)
    cap = capture_prefill(model, pids, w)
    cache = cache_from_capture(model, cap, get_policy("corm", w=w, r=r), extra=8)
    pairs, ratio = len(cache.layers) * cache.layers[0].pos.shape[1], cache.cache_ratio()   # ratio after prefill
    kept = [sum(int((layer.pos[0] == start + j).any(-1).sum()) for layer in cache.layers) / pairs
            for j in range(len(needle))]
    logits, out = cap.logits[0], []
    for _ in range(8):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache)[0, -1]          # no hook: nothing evicted while answering
    return {"tokens": [tok.decode([t]) for t in needle], "kept_fraction": kept, "answer_no_decode_eviction":
            tok.decode(out), "ratio": ratio}


# ---- cache ratio vs length ----------------------------------------------------------------------------------------
def ratio_vs_length(model, ids: list[int], lengths: list[int], settings) -> list[dict]:
    """CORM's measured ratio right after a oneshot prefill of the first n tokens, for each length and (w, r)."""
    rows = []
    for n in lengths:
        cap = capture_prefill(model, ids[:n], max(w for w, _ in settings))
        for w, r in settings:
            cache = cache_from_capture(model, cap, get_policy("corm", w=w, r=r))
            rows.append({"n": n, "w": w, "r": r, "ratio": cache.cache_ratio()})
            print(f"  ratio vs length: n={n} (w, r)=({w}, {r}) ratio {rows[-1]['ratio']:.3f}", flush=True)
        del cap
    return rows


def plot_ratio(curve: list[dict], ppl_rows: list[dict], path: Path) -> bool:
    """Draw the ratio-vs-length curves (oneshot prefill points + decode-time trajectories) if matplotlib exists."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (w, r) in enumerate(sorted({(c["w"], c["r"]) for c in curve})):
        pts = sorted((c["n"], c["ratio"]) for c in curve if (c["w"], c["r"]) == (w, r))
        line, = ax.plot(*zip(*pts), "o-", label=f"w={w}, r={r}: oneshot prefill of n tokens")
        for row in ppl_rows:
            if row["policy"] == "corm" and (row["w"], row["r"]) == (w, r):
                ax.plot(*zip(*row["trajectory"]), "--", color=line.get_color(), alpha=0.8,
                        label=f"w={w}, r={r}: decoding (exact rule)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens of GPL-3)")
    ax.set_ylabel("measured cache ratio (live / full)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("CORM on SmolLM2-135M-Instruct: cache ratio vs length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ---- main ---------------------------------------------------------------------------------------------------------
def print_table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, nothing written (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ppl", "passkey", "curve"])
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--exact-prefill", type=int, nargs=2, metavar=("W", "R"), default=[32, 64],
                    help="also score CORM (W, R) after the token-by-token `exact` prefill (0 0 to skip)")
    ap.add_argument("--needle-diagnostic", type=int, nargs=2, metavar=("W", "R"),
                    help="only print which passkey needle tokens a oneshot CORM (W, R) prefill keeps, and exit")
    args = ap.parse_args(argv)
    if args.exact_prefill == [0, 0]:
        args.exact_prefill = None
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    q = args.quick
    n_prompt, n_score = (128, 64) if q else (1024, 1024)
    passkey_tokens = 400 if q else 3000
    lengths = [128, 256] if q else [256, 512, 1024, 2048, 4096]
    settings = SETTINGS[:2] if q else SETTINGS

    model, tok = load_model(MODEL_DIR), load_tokenizer(MODEL_DIR)
    if args.needle_diagnostic:
        w, r = args.needle_diagnostic
        rng = random.Random(0)                                            # the keys of the passkey run below
        key = [rng.randint(10000, 99999) for _ in DEPTHS][DEPTHS.index(0.5)]
        d = needle_retention(model, tok, 0.5, key, w, r, passkey_tokens)
        print(f"corm (w={w}, r={r}) oneshot prefill, passkey depth 0.5 (key {key}), ratio after prefill "
              f"{d['ratio']:.4f}")
        print("fraction of (layer, KV head) pairs keeping each needle token:")
        print("  " + " ".join(f"{t!r}:{f:.2f}" for t, f in zip(d["tokens"], d["kept_fraction"])))
        print(f"answer with no eviction after the prefill: {d['answer_no_decode_eviction']!r}")
        return d
    ids = tok.encode(GPL3.read_text())
    record = {"command": "python3 -m minikv.experiments.corm_compare " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "model": MODEL_DIR.name, "dtype": str(model.dtype).replace("torch.", ""), "threads": args.threads,
              "torch": torch.__version__, "machine": platform.machine(), "gpl3_tokens": len(ids),
              "settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_start = time.perf_counter()
    check_capture(model, ids[:200])
    print("capture path == generate.prefill: ok", flush=True)
    md = []

    ppl_rows: list[dict] = []
    if "ppl" not in args.skip:
        prompt, cont = ids[:n_prompt], ids[n_prompt:n_prompt + n_score]
        cap = capture_prefill(model, prompt, max(w for w, _ in settings))
        full = decode_ppl(model, cap, get_policy("full"), cont, log_every=0 if q else 256)
        ppl_rows.append({"policy": "full", **full})
        print(f"  full: ppl {full['ppl']:.4f}", flush=True)
        for w, r in settings:
            c = decode_ppl(model, cap, get_policy("corm", w=w, r=r), cont, log_every=0 if q else 256)
            ppl_rows.append({"policy": "corm", "w": w, "r": r, **c})
            budget = max(1, round(c["final_ratio"] * c["final_seen"]))
            h = decode_ppl(model, cap, get_policy("h2o", budget=budget), cont, log_every=0 if q else 256)
            ppl_rows.append({"policy": "h2o", "budget": budget, "matched_to": [w, r], **h})
            print(f"  corm ({w}, {r}): ppl {c['ppl']:.4f} final ratio {c['final_ratio']:.3f} | "
                  f"h2o budget {budget}: ppl {h['ppl']:.4f} final ratio {h['final_ratio']:.3f}", flush=True)
        del cap
        if args.exact_prefill:
            # The same (w, r) with the definition's token-by-token prefill, to measure what oneshot approximates.
            w, r = args.exact_prefill
            policy = get_policy("corm", w=w, r=r, prefill_mode="exact")
            t0 = time.perf_counter()
            pre = corm_exact_prefill(model, [prompt], policy)
            c = decode_ppl(model, None, policy, cont, log_every=0 if q else 256, prefilled=pre)
            c["prefill_seconds"] = time.perf_counter() - t0 - c["seconds"]
            ppl_rows.append({"policy": "corm-exact", "w": w, "r": r, **c})
            print(f"  corm exact prefill ({w}, {r}): ppl {c['ppl']:.4f}, final ratio {c['final_ratio']:.3f}",
                  flush=True)
        rows = []
        for row in ppl_rows:
            name = {"full": "full", "corm": f"corm w={row.get('w')} r={row.get('r')}",
                    "corm-exact": f"corm w={row.get('w')} r={row.get('r')}, exact prefill",
                    "h2o": f"h2o budget={row.get('budget')} (matched to corm {tuple(row.get('matched_to', ()))})"}
            rows.append([name[row["policy"]], f"{row['ppl']:.3f}", f"{row['ratio_after_prefill']:.3f}",
                         f"{row['mean_ratio']:.3f}", f"{row['final_ratio']:.3f}", f"{row['seconds']:.0f}"])
        md.append(print_table(f"GPL-3 decode-time perplexity ({n_prompt}-token prompt, {n_score} tokens scored)",
                              ["policy", "ppl", "ratio after prefill", "mean ratio while scoring", "final ratio",
                               "seconds"], rows))
    record["gpl3_ppl"] = {"n_prompt": n_prompt, "n_score": n_score, "rows": ppl_rows}

    pk_rows: list[dict] = []
    if "passkey" not in args.skip:
        rng = random.Random(0)
        for depth in DEPTHS:
            key = rng.randint(10000, 99999)
            pids = passkey_prompt(tok, depth, key, passkey_tokens)
            cap = capture_prefill(model, pids, max(w for w, _ in settings))
            text, ratio = passkey_answer(model, tok, cap, get_policy("full"))
            pk_rows.append({"depth": depth, "key": key, "n": len(pids), "policy": "full", "setting": None,
                            "ratio": ratio, "answer": text, "correct": str(key) in text})
            for w, r in settings:
                text, ratio = passkey_answer(model, tok, cap, get_policy("corm", w=w, r=r))
                pk_rows.append({"depth": depth, "key": key, "n": len(pids), "policy": "corm", "w": w, "r": r,
                                "setting": (w, r), "ratio": ratio, "answer": text, "correct": str(key) in text})
                htext, hratio = passkey_answer(model, tok, cap, get_policy("h2o", budget=float(ratio)))
                pk_rows.append({"depth": depth, "key": key, "n": len(pids), "policy": "h2o", "budget": float(ratio),
                                "setting": (w, r), "matched_to": [w, r], "ratio": hratio, "answer": htext,
                                "correct": str(key) in htext})
            print(f"  passkey depth {depth}: " + ", ".join(
                f"{p['policy']}{(p.get('w'), p.get('r')) if p['policy'] == 'corm' else ''}"
                f"={'ok' if p['correct'] else 'miss'}" for p in pk_rows if p["depth"] == depth), flush=True)
            del cap
        groups = [("full", None)] + [(p, s) for s in settings for p in ("corm", "h2o")]
        rows = []
        for pol, s in groups:
            sel = [p for p in pk_rows if p["policy"] == pol and p["setting"] == s]
            label = "full" if pol == "full" else (f"corm w={s[0]} r={s[1]}" if pol == "corm"
                                                  else f"h2o at corm ({s[0]}, {s[1]}) ratio")
            rows.append([label, f"{sum(p['correct'] for p in sel)}/{len(sel)}",
                         " ".join("x" if p["correct"] else "." for p in sel),
                         f"{sum(p['ratio'] for p in sel) / len(sel):.3f}"])
        md.append(print_table(f"Passkey (~{passkey_tokens} tokens, depths {DEPTHS}, key in the first 8 tokens)",
                              ["policy", "correct", "per depth", "mean ratio after prefill"], rows))
    record["passkey"] = pk_rows

    curve: list[dict] = []
    if "curve" not in args.skip:
        curve = ratio_vs_length(model, ids, lengths, settings)
        rows = [[n] + [f"{c['ratio']:.3f}" for s in settings for c in curve if c["n"] == n and (c["w"], c["r"]) == s]
                for n in lengths]
        md.append(print_table("CORM measured cache ratio vs prompt length (oneshot prefill of the first n GPL-3 "
                              "tokens)", ["n"] + [f"w={w} r={r}" for w, r in settings], rows))
    record["ratio_vs_length"] = curve
    record["seconds"] = time.perf_counter() - t_start
    record["tables_md"] = "\n\n".join(md)

    if q:
        return record
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corm.json").write_text(json.dumps(record, indent=1))
    drew = plot_ratio(curve, ppl_rows, out / "corm_ratio_vs_length.png") if curve else False
    print(f"wrote {out / 'corm.json'}" + (" and corm_ratio_vs_length.png" if drew else "") +
          "; results/corm.md quotes these tables (record['tables_md'])")
    return record


if __name__ == "__main__":
    main()
