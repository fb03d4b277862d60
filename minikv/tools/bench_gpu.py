"""The GPU benchmark protocol: random bf16 weights at Llama-2-7B / Llama-3-8B shapes, 4096-token prompts,
256 new tokens, greedy; per policy the largest batch that fits, decode throughput, prefill time, time per decode
step, peak memory and live/allocated KV bytes; transformers' generate (full cache, SDPA) as the peer.

    python -m minikv bench gpu [--quick] [--out results/bench_gpu.json]

One call runs the whole table (the GPU is lent by the minute). Results: JSON + a markdown table on stdout.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from minikv.config import LlamaConfig
from minikv.errors import BadInput, NoDevice
from minikv.model import Llama

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
}
POLICIES = ["full", "streaming", "h2o", "snapkv", "d2o", "corm", "adakv-snapkv"]
PREFILL_ROWS = 8     # prompts prefilled at a time: peak = compressed caches + one group's uncompressed prompt


def random_model(shape: str, dtype=torch.bfloat16, device="cuda") -> Llama:
    """A Llama at a real shape with random weights, built directly on the GPU (no CPU init)."""
    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.eval()


def policy_for(name: str, ratio: float):
    from minikv.policies import get_policy
    if name == "full":
        return get_policy("full")
    if name == "corm":
        return get_policy("corm")          # budget-free: its measured ratio is reported
    if name == "d2o":
        # Compress at the end of each row group's prefill (Sep 2024 timing), so the uncompressed prompt of the
        # whole batch never exists at once; the default first_decode timing would hold it until the first step.
        return get_policy("d2o", ratio, when="prefill")
    return get_policy(name, ratio)



def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_minikv(model: Llama, policy_name: str, ratio: float, batch: int, prompt_len: int, new_tokens: int,
               reserve: int | None = None) -> dict:
    """One generate() at this batch; returns timings, peak memory and KV bytes."""
    from minikv.generate import generate
    _free()
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    res = generate(model, prompts, policy_for(policy_name, ratio), max_new_tokens=new_tokens, stop_ids=[],
                   reserve_tokens=reserve, prefill_rows=PREFILL_ROWS)
    steps = max(1, len(res.tokens[0]) - 1)
    return {
        "engine": "minikv", "policy": policy_name, "batch": batch, "prefill_s": res.prefill_seconds,
        "decode_ms_per_step": 1000 * res.decode_seconds / steps,
        "decode_tok_per_s": batch * steps / res.decode_seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kv_live_gib": res.kv_bytes_live / 2**30, "kv_alloc_gib": res.kv_bytes_allocated / 2**30,
        "kv_full_gib": res.kv_bytes_full / 2**30, "cache_ratio": res.cache_ratio, "prefill_rows": PREFILL_ROWS,
    }


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def fits(fn, batch: int) -> dict | None:
    """fn(batch), or None when it runs out of memory (memory is freed after the exception's frames are gone)."""
    try:
        return fn(batch)
    except RuntimeError as e:
        if not _is_oom(e):
            raise
    _free()
    return None


def max_batch(fn, total_bytes: int, small: int = PREFILL_ROWS, large: int = 3 * PREFILL_ROWS) -> int:
    """Largest batch for which fn(batch) runs, from a linear memory model checked by real runs.

    Beyond one prefill row group, peak memory is affine in the batch (weights + one group's prefill + per-row
    cache); two probes at multiples of the group size give the line, the prediction is tried, and the batch backs
    off by 8% until it fits (each probe costs a prefill).
    """
    a, b = fits(fn, small), fits(fn, large)
    if a is None or b is None:
        return 0 if a is None else small
    per_row = max(1.0, (b["peak_gib"] - a["peak_gib"]) * 2**30 / (large - small))
    base = a["peak_gib"] * 2**30 - small * per_row
    batch = max(large, int((0.97 * total_bytes - base) / per_row))
    while batch > large and fits(fn, batch) is None:
        batch = int(batch * 0.92)
    return batch


def run_hf(shape: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """transformers' generate (default dynamic cache, SDPA), random bf16 weights, greedy."""
    import transformers
    _free()
    cfg = transformers.LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    hf = hf.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
        hf.model.rotary_emb.__init__(hf.config, device="cuda")
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        torch.cuda.synchronize(); t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize(); t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize(); t2 = time.perf_counter()
    prefill = t1 - t0
    decode = max(1e-9, (t2 - t1) - prefill)
    out = {"engine": "transformers", "policy": "full", "batch": batch, "prefill_s": prefill,
           "decode_ms_per_step": 1000 * decode / (new_tokens - 1),
           "decode_tok_per_s": batch * (new_tokens - 1) / decode, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del hf
    _free()
    return out


def format_table(rows: list[dict]) -> str:
    keys = ["shape", "engine", "policy", "batch", "prefill_s", "decode_ms_per_step", "decode_tok_per_s", "peak_gib",
            "kv_live_gib", "kv_alloc_gib", "kv_full_gib", "cache_ratio"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _check_inputs(args) -> tuple[list[str], list[str], Path]:
    """The device, the transformers peer, the shapes and the --out path, all checked before the first model is built."""
    from minikv.tools.bench import check_out_path, require_transformers
    if not torch.cuda.is_available():
        raise NoDevice("minikv bench gpu needs a CUDA GPU; none is visible to torch (torch.cuda.is_available() is "
                       f"False, torch {torch.__version__}); run minikv bench cpu on this machine instead")
    if os.environ.get("MINIKV_BENCH_HF", "1") == "1":
        require_transformers("minikv bench gpu", " -- or set MINIKV_BENCH_HF=0 to skip the transformers rows")
    shapes = os.environ.get("MINIKV_BENCH_SHAPES", "llama2-7b,llama3-8b").split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise BadInput(f"MINIKV_BENCH_SHAPES: unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    policies = os.environ.get("MINIKV_BENCH_POLICIES", ",".join(POLICIES)).split(",")
    out = check_out_path(Path(args.out or os.environ.get("OUT", "results") + "/bench_gpu.json"))
    return shapes, policies, out


def main(args) -> int:
    """Run the whole protocol table on the GPU, saving the JSON after every row (a cut-off run keeps what it measured)."""
    from minikv.tools.bench import write_json
    shapes, policies, out = _check_inputs(args)
    quick = getattr(args, "quick", False)
    prompt_len, new_tokens, ratio = (512, 16, 0.2) if quick else (4096, 256, 0.2)
    rows: list[dict] = []
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "ratio": ratio}

    def save():
        write_json(out, {"info": info, "rows": rows})

    deadline = time.perf_counter() + float(os.environ.get("MINIKV_BENCH_SECONDS", "1e9"))
    for shape in shapes:
        model = random_model(shape)
        for name in policies:
            if time.perf_counter() > deadline:
                print(f"time budget spent: skipping {shape} {name}", flush=True)
                continue
            probe = lambda b: run_minikv(model, name, ratio, b, prompt_len, 3, reserve=new_tokens)
            t0 = time.perf_counter()
            best = max_batch(probe, torch.cuda.get_device_properties(0).total_memory)
            search_s = time.perf_counter() - t0
            for batch in sorted({1, 16, best}) if name == "full" else [best]:
                if batch == 0:
                    continue
                r = fits(lambda b: run_minikv(model, name, ratio, b, prompt_len, new_tokens), batch)
                while r is None and batch > 1:                 # the 256-step run needs a little more: back off
                    batch = best = int(batch * 0.92)
                    r = fits(lambda b: run_minikv(model, name, ratio, b, prompt_len, new_tokens), batch)
                if r is None:
                    continue
                r.update(shape=shape, max_batch=batch == best, max_batch_search_s=search_s)
                rows.append(r)
                print(format_table([r]).splitlines()[-1], flush=True)
                save()
        del model
        _free()
        for batch in (1, 16) if os.environ.get("MINIKV_BENCH_HF", "1") == "1" else ():
            r = fits(lambda b: run_hf(shape, b, prompt_len, new_tokens), batch)
            if r is None:
                continue
            r.update(shape=shape)
            rows.append(r)
            print(format_table([r]).splitlines()[-1], flush=True)
            save()
    print(format_table(rows))
    save()
    print(f"saved {out}")
    return 0
