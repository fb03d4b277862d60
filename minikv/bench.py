"""Benchmarks: scripts that print tables and save JSON (speed targets are checked here, never in unit tests).

`minikv bench cpu`: minikv vs transformers on the default model, on this machine: prefill tokens/s at 512 and 2048
tokens, and decode tokens/s (greedy, full cache). minikv's prefill is timed on the SDPA path (what `generate` uses
when the policy needs no probabilities) and, for reference, on its reference attention path (the one that can
return probabilities to a policy).
`minikv bench gpu`: the perf.md protocol (see minikv/bench_gpu.py).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def cpu_benchmark(folder: Path, prefill_lengths=(512, 2048), decode_tokens: int = 64, repeats: int = 3) -> list[dict]:
    """Rows of {engine, measure, tokens, seconds, tokens_per_s} for minikv and transformers on the same weights."""
    from .checkpoint import load_model
    from .generate import generate
    import transformers

    ours = load_model(folder)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in prefill_lengths:
        ids = torch.randint(100, 40000, (1, n), generator=g)
        t_ours = _median_time(lambda: ours(ids, ours.new_cache(1), last_only=True, use_sdpa=True), repeats)
        t_ref = _median_time(lambda: ours(ids, ours.new_cache(1), last_only=True), repeats)
        t_hf = _median_time(lambda: hf(ids, logits_to_keep=1), repeats)
        rows += [{"engine": engine, "measure": "prefill", "tokens": n, "seconds": t, "tokens_per_s": n / t}
                 for engine, t in (("minikv", t_ours), ("minikv reference attention", t_ref), ("transformers", t_hf))]
    prompt = torch.randint(100, 40000, (1, 512), generator=g)
    t_ours = _median_time(lambda: generate(ours, [prompt[0].tolist()], max_new_tokens=decode_tokens, stop_ids=[]),
                          repeats)
    t_pre = _median_time(lambda: ours(prompt, ours.new_cache(1), last_only=True, use_sdpa=True), repeats)
    t_hf = _median_time(lambda: hf.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                            do_sample=False), repeats)
    t_hf_pre = _median_time(lambda: hf(prompt, logits_to_keep=1), repeats)
    for engine, total, pre in (("minikv", t_ours, t_pre), ("transformers", t_hf, t_hf_pre)):
        dec = max(total - pre, 1e-9)
        rows.append({"engine": engine, "measure": "decode (after 512-token prompt)", "tokens": decode_tokens,
                     "seconds": dec, "tokens_per_s": decode_tokens / dec})
    return rows


def format_table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["measure"], r["tokens"]), {})[r["engine"]] = r["tokens_per_s"]
    lines = ["| measure | tokens | minikv tok/s | minikv reference attention tok/s | transformers tok/s | "
             "minikv / transformers |", "|---|---|---|---|---|---|"]
    for (measure, n), v in by.items():
        ref = v.get("minikv reference attention")
        lines.append(f"| {measure} | {n} | {v['minikv']:.1f} | {'-' if ref is None else f'{ref:.1f}'} | "
                     f"{v['transformers']:.1f} | {v['minikv'] / v['transformers']:.2f} |")
    return "\n".join(lines)


def main(args) -> int:
    if args.which == "gpu":
        from .bench_gpu import main as gpu_main
        return gpu_main(args)
    from .convert import ensure_default_model
    folder = Path(args.model) if args.model else ensure_default_model()
    lengths, dec, rep = ((64, 128), 8, 1) if args.quick else ((512, 2048), 64, 3)
    rows = cpu_benchmark(folder, lengths, dec, rep)
    table = format_table(rows)
    info = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    print(f"CPU benchmark on {info['machine']}, {info['threads']} threads, torch {info['torch']} (float32)")
    print(table)
    out = Path(args.out or "results/bench_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(f"saved {out}")
    return 0
