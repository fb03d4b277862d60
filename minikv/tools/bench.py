"""Benchmarks: scripts that print tables and save JSON (speed targets are checked here, never in unit tests).

`minikv bench cpu`: minikv vs transformers on the default model, on this machine: prefill tokens/s at 512 and 2048
tokens, and decode tokens/s (greedy, full cache). minikv's prefill is timed on the SDPA path (what `generate` uses
when the policy needs no probabilities) and, for reference, on its reference attention path (the one that can
return probabilities to a policy).
`minikv bench gpu`: random bf16 weights at Llama-2-7B / Llama-3-8B shapes, 4096-token prompts, 256 new tokens,
greedy; per policy the largest batch that fits, decode throughput, prefill time, time per decode step, peak memory
and live/allocated KV bytes; transformers' generate (full cache, SDPA) as the peer. One call runs the whole table
(the GPU is lent by the minute); the JSON is saved after every row (results in BENCHMARKS.md). The whole batch is
prefilled at once, so the max batch counts the uncompressed prompt. Both need `transformers` as the peer
(`pip install "minikv[bench]"`), checked with the output path and the device before anything runs."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from minikv.config import LlamaConfig
from minikv.errors import BadInput, MissingExtra, NoDevice, NotFound
from minikv.generate import generate
from minikv.io.checkpoint import load_model
from minikv.io.convert import ensure_default_model
from minikv.model import Llama
from minikv.policies import get_policy
from minikv.tools.common import add_model_args, format_rows, progress_bar

def require_transformers(command: str, skip_hint: str = "") -> None:
    """Fail up front, naming the extra to install, when the transformers peer is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MissingExtra(f"{command} compares against transformers, which is not installed: "
                           f'pip install "minikv[bench]"  (or: pip install transformers){skip_hint}') from None

def check_out_path(out: Path) -> Path:
    """Refuse an --out that is a folder or lies under a file, and make its folder, before a long run starts."""
    if out.is_dir():
        raise BadInput(f"--out {out} is a folder; give a file path such as {out / 'bench.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, or not writable
        raise BadInput(f"--out {out}: cannot create its folder {out.parent} ({e.strerror or e}); "
                       "give a path in a writable folder") from None
    return out

def write_json(out: Path, data: dict) -> None:
    """Write the results, turning an I/O failure into a named error."""
    try:
        out.write_text(json.dumps(data, indent=2))
    except OSError as e:
        raise BadInput(f"--out {out}: could not write the results ({e.strerror or e})") from None

@torch.no_grad()
def cpu_benchmark(folder: Path, prefill_lengths=(512, 2048), decode_tokens: int = 64, repeats: int = 3) -> list[dict]:
    """Rows of {engine, measure, tokens, seconds, tokens_per_s} for minikv and transformers on the same weights."""
    import transformers
    progress = progress_bar(2 + 3 * len(prefill_lengths) + 4, 0, "bench cpu")

    def step(what: str) -> None:
        progress.set_postfix_str(what)
        progress.update(1)

    ours = load_model(folder)
    step("loaded minikv's model")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.config._attn_implementation = "sdpa"
    step("loaded transformers' model")

    def timed(label: str, fn) -> float:
        """The median time of fn over `repeats` runs, reported as one progress step."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        step(f"{label}: {t:.2f} s")
        return t

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in prefill_lengths:
        ids = torch.randint(100, 40000, (1, n), generator=g)
        t_ours = timed(f"minikv prefill {n}", lambda: ours(ids, ours.new_cache(1), last_only=True, use_sdpa=True))
        t_ref = timed(f"minikv reference attention prefill {n}", lambda: ours(ids, ours.new_cache(1), last_only=True))
        t_hf = timed(f"transformers prefill {n}", lambda: hf(ids, logits_to_keep=1))
        rows += [{"engine": engine, "measure": "prefill", "tokens": n, "seconds": t, "tokens_per_s": n / t}
                 for engine, t in (("minikv", t_ours), ("minikv reference attention", t_ref), ("transformers", t_hf))]
    prompt = torch.randint(100, 40000, (1, 512), generator=g)
    t_ours = timed(f"minikv generate {decode_tokens}",
                   lambda: generate(ours, [prompt[0].tolist()], max_new_tokens=decode_tokens, stop_ids=[]))
    t_pre = timed("minikv prefill 512 (subtracted from generate)", lambda: ours(prompt, ours.new_cache(1), last_only=True, use_sdpa=True))
    t_hf = timed(f"transformers generate {decode_tokens}",
                 lambda: hf.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                     do_sample=False))
    t_hf_pre = timed("transformers prefill 512 (subtracted from generate)", lambda: hf(prompt, logits_to_keep=1))
    progress.close()
    for engine, total, pre in (("minikv", t_ours, t_pre), ("transformers", t_hf, t_hf_pre)):
        dec = max(total - pre, 1e-9)
        rows.append({"engine": engine, "measure": "decode (after 512-token prompt)", "tokens": decode_tokens,
                     "seconds": dec, "tokens_per_s": decode_tokens / dec})
    return rows

def format_table(rows: list[dict]) -> str:
    """One line per (measure, tokens): tokens/s of each engine and minikv / transformers."""
    by = {}
    for r in rows:
        by.setdefault((r["measure"], r["tokens"]), {})[r["engine"]] = r["tokens_per_s"]
    return format_rows([{"measure": m, "tokens": n, "minikv tok/s": v["minikv"],
                         "minikv reference attention tok/s": v.get("minikv reference attention", "-"),
                         "transformers tok/s": v["transformers"], "minikv / transformers": v["minikv"] / v["transformers"]}
                        for (m, n), v in by.items()])

def main(args) -> int:
    """`minikv bench cpu|gpu`: check the inputs up front, run, print the table and save the JSON."""
    if args.which == "gpu":
        return gpu_main(args)
    require_transformers("minikv bench cpu")
    if args.model and not Path(args.model).is_dir():
        raise NotFound(f"--model {args.model}: no such folder; give a Hugging Face Llama folder, or leave --model "
                       "out for the default model")
    out = check_out_path(Path(args.out or "results/bench_cpu.json"))
    folder = Path(args.model) if args.model else ensure_default_model()
    lengths, dec, rep = ((64, 128), 8, 1) if args.quick else ((512, 2048), 64, 3)
    length = "a quick smoke run" if args.quick else "about 10 minutes on an idle 2-core CPU (--quick: a minute or two)"
    print(f"bench cpu: {length}, model {folder}", file=sys.stderr, flush=True)
    rows = cpu_benchmark(folder, lengths, dec, rep)
    table = format_table(rows)
    info = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    print(f"CPU benchmark on {info['machine']}, {info['threads']} threads, torch {info['torch']} (float32)")
    print(table)
    write_json(out, {"info": info, "rows": rows})
    print(f"saved {out}")
    return 0

# ---- minikv bench gpu ------------------------------------------------------------------------------------------
SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
}
POLICIES = ["full", "streaming", "h2o", "snapkv", "d2o", "corm", "adakv-snapkv"]
PROBE_BATCH = 8      # the smaller of the two max-batch probes (the larger is 3x)

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
    """The policy at `ratio`; full and corm take no budget (corm's measured ratio is reported)."""
    return get_policy(name, None if name in ("full", "corm") else ratio)

def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

def run_minikv(model: Llama, policy_name: str, ratio: float, batch: int, prompt_len: int, new_tokens: int,
               reserve: int | None = None) -> dict:
    """One generate() at this batch; returns timings, peak memory and KV bytes."""
    _free()
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    res = generate(model, prompts, policy_for(policy_name, ratio), max_new_tokens=new_tokens, stop_ids=[],
                   reserve_tokens=reserve)
    steps = max(1, len(res.tokens[0]) - 1)
    return {
        "engine": "minikv", "policy": policy_name, "batch": batch, "prefill_s": res.prefill_seconds,
        "decode_ms_per_step": 1000 * res.decode_seconds / steps,
        "decode_tok_per_s": batch * steps / res.decode_seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kv_live_gib": res.kv_bytes_live / 2**30, "kv_alloc_gib": res.kv_bytes_allocated / 2**30,
        "kv_full_gib": res.kv_bytes_full / 2**30, "cache_ratio": res.cache_ratio,
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

def max_batch(fn, total_bytes: int, small: int = PROBE_BATCH, large: int = 3 * PROBE_BATCH) -> int:
    """Largest batch for which fn(batch) runs, from a linear memory model checked by real runs.

    Peak memory is affine in the batch (weights + per-row prefill and cache, the whole batch prefilled at once);
    two probes give the line, the prediction is tried, and the batch backs off by 8% until it fits (each probe
    costs a prefill).
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

def run_hf(shape: str, batch: int, prompt_len: int, new_tokens: int, static: bool = False) -> dict:
    """transformers' generate (SDPA), random bf16 weights, greedy: the default dynamic cache (eager), or with
    static=True `cache_implementation="static"`, whose decode step generate compiles; one untimed warm-up run
    excludes the compilation."""
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
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static" if static else None)
    with torch.no_grad():
        if static:
            hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize(); t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize(); t2 = time.perf_counter()
    prefill = t1 - t0
    decode = max(1e-9, (t2 - t1) - prefill)
    out = {"engine": "transformers static" if static else "transformers", "policy": "full", "batch": batch, "prefill_s": prefill,
           "decode_ms_per_step": 1000 * decode / (new_tokens - 1),
           "decode_tok_per_s": batch * (new_tokens - 1) / decode, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del hf
    _free()
    return out

GPU_KEYS = ["shape", "engine", "policy", "batch", "prefill_s", "decode_ms_per_step", "decode_tok_per_s", "peak_gib",
            "kv_live_gib", "kv_alloc_gib", "kv_full_gib", "cache_ratio"]

def _check_inputs(args) -> tuple[list[str], list[str], Path]:
    """The device, the transformers peer, the shapes and the --out path, all checked before the first model is built."""
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

def policy_rows(model, shape: str, name: str, prompt_len: int, new_tokens: int, ratio: float) -> list[dict]:
    """One policy on one shape: its max batch (full: also batches 1 and 16), measured at 256 new tokens."""
    probe = lambda b: run_minikv(model, name, ratio, b, prompt_len, 3, reserve=new_tokens)
    t0 = time.perf_counter()
    best = max_batch(probe, torch.cuda.get_device_properties(0).total_memory)
    search_s, rows = time.perf_counter() - t0, []
    for batch in sorted({1, 16, best}) if name == "full" else [best]:
        r = fits(lambda b: run_minikv(model, name, ratio, b, prompt_len, new_tokens), batch) if batch else None
        while r is None and batch > 1:                     # the 256-step run needs a little more: back off
            batch = best = int(batch * 0.92)
            r = fits(lambda b: run_minikv(model, name, ratio, b, prompt_len, new_tokens), batch)
        if r is not None:
            rows.append(dict(r, shape=shape, max_batch=batch == best, max_batch_search_s=search_s))
    return rows

def gpu_main(args) -> int:
    """Run the whole protocol table on the GPU, saving the JSON after every row (a cut-off run keeps what it measured)."""
    shapes, policies, out = _check_inputs(args)
    prompt_len, new_tokens, ratio = (512, 16, 0.2) if getattr(args, "quick", False) else (4096, 256, 0.2)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "ratio": ratio}
    rows: list[dict] = []

    def add(new: list[dict]) -> None:
        for r in new:
            rows.append(r)
            print(format_rows([r], GPU_KEYS, 3).splitlines()[-1], flush=True)
            write_json(out, {"info": info, "rows": rows})

    deadline = time.perf_counter() + float(os.environ.get("MINIKV_BENCH_SECONDS", "1e9"))
    for shape in shapes:
        model = random_model(shape)
        for name in policies:
            if time.perf_counter() > deadline:
                print(f"time budget spent: skipping {shape} {name}", flush=True)
                continue
            add(policy_rows(model, shape, name, prompt_len, new_tokens, ratio))
        del model
        _free()
        for batch in (1, 16) if os.environ.get("MINIKV_BENCH_HF", "1") == "1" else ():
            for static in (False, True):
                r = fits(lambda b: run_hf(shape, b, prompt_len, new_tokens, static), batch)
                add([] if r is None else [dict(r, shape=shape)])
    print(format_rows(rows, GPU_KEYS, 3))
    write_json(out, {"info": info, "rows": rows})
    print(f"saved {out}")
    return 0

def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: `cpu` (minikv vs transformers) or `gpu` (minikv vs transformers "
                                     "at a 7B shape, see BENCHMARKS.md)")
    b.add_argument("which", choices=["cpu", "gpu"])
    b.add_argument("--out", default=None, help="JSON output path")
    b.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    add_model_args(b)
    b.set_defaults(func=main)
