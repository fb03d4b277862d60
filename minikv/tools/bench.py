"""Benchmarks against `transformers` (speed targets are checked here, never in unit tests). `bench gpu`: random bf16
weights at the Llama-2-7B shape; minikv (every policy, MODES) and transformers (eager, static) at batch 1, 16 and max
(MAX_BATCH_RULE); profiles and a host-sync check on request; MINIKV_BENCH_* (bench_plan) split the table over calls,
`bench report FILES` merges them and checks the targets. `bench cpu`: the same on the default model, float32."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minikv.config import LlamaConfig
from minikv.errors import BadInput, MissingExtra, NoDevice, NotFound
from minikv.generate import decode_step, fixed_capacity_step, generate, prefill
from minikv.io.checkpoint import load_model
from minikv.io.convert import ensure_default_model
from minikv.model import Llama
from minikv.policies import REGISTRY
from minikv.tools.common import add_model_args, format_rows, policy_spec, spec_words

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

# ---- minikv bench gpu ------------------------------------------------------------------------------------------
SHAPES = {"llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=8192, vocab_size=32000, intermediate_size=11008, rope_theta=1e4)}
MODES = ("graph", "eager", "compiled")     # compiled: torch.compile'd decode step, captured as a CUDA graph
POLICIES = ["full", "streaming", "h2o", "snapkv", "adakv-snapkv", "adakv-h2o", "d2o", "corm"]
PROFILE_DEFAULT = "full:1:eager,full:1:graph,full:16:eager,full:16:graph,h2o:16:eager,h2o:16:graph,d2o:16:graph"
CPU_PLAN = {"MINIKV_BENCH_POLICIES": "full", "MINIKV_BENCH_BATCHES": "1", "MINIKV_BENCH_MODES": "eager",
            "MINIKV_BENCH_PROMPT": "512"}                  # bench cpu's defaults (the environment overrides them)
STEADY = "minikv: median gap of two steps' tokens from the 3rd step on; transformers: (all tokens - one) / steps, warm"
_clock = time.perf_counter                                # the steps' timestamps (a test swaps in a fake clock)
MAX_BATCH_RULE = ("the largest batch whose run (all prompts prefilled at once, then every new token) completes: a "
                  "line of peak memory vs batch through probes at 8 and 24 rows (prefill, a step, cache.fit to the "
                  "run's final capacity) predicts the batch that fills 90% of the GPU; the run starts there and backs "
                  "off by 8% on out-of-memory; the next mode starts from the batch that ran.")

def random_model(build, dtype=torch.bfloat16, device="cuda"):
    """build() (e.g. a Llama at one of SHAPES) on `device` in `dtype` with random weights (norms 1; no CPU init)."""
    with torch.device("meta"):
        model = build()
    model, gen = model.to_empty(device=device).to(dtype), torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=gen)
    return model.eval()

def policy_for(name: str, ratio: float):
    """The policy at `ratio` (none for a budget-free one: full, corm), options as policy_spec ("d2o:when=prefill")."""
    return policy_spec(f"{name} {ratio}" if getattr(REGISTRY.get(spec_words(name)[0]), "takes_budget", 1) else name)

def _free():
    gc.collect(), (torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()) if torch.cuda.is_available() else None

def _sync_peak() -> float:
    """Wait for the GPU; its peak memory in GiB since the last _free (0 without CUDA)."""
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0

def _prompts(model: Llama, batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()

def run_minikv(model: Llama, name: str, ratio: float, batch: int, prompt_len: int, new_tokens: int,
               mode: str = "eager") -> dict:
    """One generate() (mode "graph": cuda_graph=True; "compiled": compile=True too). ms/step: STEADY's median step (a run
    the context cut below 5 tokens: its mean step); tok/s from it; capture_s: the fit, capture and compilation."""
    _free()
    ts = []
    res = generate(model, _prompts(model, batch, prompt_len), policy_for(name, ratio), max_new_tokens=new_tokens,
                   stop_ids=[], cuda_graph=mode != "eager", compile=mode == "compiled",
                   on_tokens=lambda new: ts.append(_clock()))
    step = statistics.median([b - a for a, b in zip(ts[2:-2], ts[3:-1])] or [res.decode_seconds / max(1, len(ts))])
    return {"batch": batch, "prefill_s": res.prefill_seconds, "decode_s": res.decode_seconds, "capture_s":
            res.capture_seconds, "decode_ms_per_step": 1000 * step, "decode_tok_per_s": batch / step,
            "peak_gib": _sync_peak(), "kv_live_gib": res.kv_bytes_live / 2**30, "kv_alloc_gib":
            res.kv_bytes_allocated / 2**30, "kv_full_gib": res.kv_bytes_full / 2**30, "cache_ratio": res.cache_ratio}

def _fitted(model: Llama, policy, batch: int, prompt_len: int, extra: int):
    """Prefill (room for `extra`), a step, cache.fit(extra), as generate(cuda_graph=True) does: (cache, next tokens)."""
    logits, cache = prefill(model, _prompts(model, batch, prompt_len), policy, extra_capacity=extra)
    logits = decode_step(model, cache, logits.argmax(-1), policy, validate=False)
    cache.fit(extra)
    return cache, logits.argmax(-1)

def probe_minikv(model: Llama, name: str, ratio: float, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """A run's peak memory at one step's cost: after it the cache is fitted to the run's final capacity."""
    _free()
    _fitted(model, policy_for(name, ratio), batch, prompt_len, new_tokens - 1)
    return {"peak_gib": _sync_peak()}

def fits(fn, batch: int) -> dict | None:
    """fn(batch), or None when it runs out of memory, also as the cause or context of another error (e.g. of a graph
    capture it broke); the memory is freed after the exception's frames are gone."""
    try:
        return fn(batch)
    except RuntimeError as e:
        while e is not None and not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)):
            e = e.__cause__ or e.__context__
        if e is None:                                # not out of memory: the error goes on
            raise
    _free()

def predict_batch(probe, total_bytes: int, small: int = 8, large: int = 24) -> int:
    """The batch whose peak memory is 90% of total_bytes on the line through probe(small) and probe(large) (peak
    memory is affine in the batch: weights + per-row prefill and cache); 0 if `small` fails, `small` if `large` does."""
    a, b = fits(probe, small), fits(probe, large)
    if a is None or b is None:
        return 0 if a is None else small
    per_row = max(1.0, (b["peak_gib"] - a["peak_gib"]) * 2**30 / (large - small))
    return max(large, int((0.9 * total_bytes - a["peak_gib"] * 2**30) / per_row) + small)

def _attempt(fn, *args) -> dict | None:
    """fn(*args), or {"error": ...} (a failed item must not end the run: the GPU is lent by the minute)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- recorded in the JSON, the traceback on stderr
        traceback.print_exc(file=sys.stderr), _free()
        return {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}

def bench_rows(base: dict, run, probe, batches: list, modes, total_bytes, emit, time_left) -> None:
    """Rows of one engine and policy: run(batch, mode) at each batch and mode. "max": predict_batch (probe) once, then
    each mode starts from the last batch that ran, backing off by 8% on out-of-memory. Failures become error rows."""
    best = {}                                                   # batch, search_s: once searched

    def one(batch, mode):
        if batch != "max":
            return fits(lambda b: run(b, mode), batch)
        if not best:
            t0 = time.perf_counter()
            best.update(batch=predict_batch(probe, total_bytes()), search_s=time.perf_counter() - t0)
        while best["batch"] >= 1 and (r := fits(lambda b: run(b, mode), best["batch"])) is None:
            best["batch"] = int(best["batch"] * 0.92)
        return dict(r, max_batch_search_s=best["search_s"]) if best["batch"] >= 1 else None

    for batch in batches:
        for mode in modes:
            if time_left(f"{base['engine']} {base['policy']} batch {batch} {mode}"):
                r = _attempt(one, batch, mode) or {"error": "out of memory"}
                emit("rows", {**base, "mode": mode, "batch": batch, **r, "max_batch": batch == "max"})

def summarize(events, steps: int) -> dict:
    """Per step, from profiler averages: host launch calls (a graph replay: one cudaGraphLaunch), GPU kernels (memcpy
    too), GPU-busy ms (their device_time_total, or cuda_time_total on an older torch), the top 8 kernels."""
    us = lambda e: e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    gpu = sorted((e for e in events if str(e.device_type).endswith("CUDA")), key=us, reverse=True)
    launch = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")))
    return {"launches_per_step": launch / steps, "kernels_per_step": sum(e.count for e in gpu) / steps,
            "gpu_busy_ms_per_step": sum(map(us, gpu)) / 1000 / steps, "top_kernels": [  # ms/step, calls/step, name
                [us(e) / 1000 / steps, e.count / steps, e.key[:120]] for e in gpu[:8]]}

@torch.no_grad()
def profile_decode(model: Llama, name: str, ratio: float, batch: int, prompt_len: int, mode: str, steps: int = 5):
    """Decode steps (validate=False) after prefill, a step and cache.fit. Mode "sync": 3 steps under set_sync_debug_mode
    ("error"): ok, or the first error ("checked": False without CUDA). Modes "eager", "graph" and "compiled" (MODES):
    wall ms/step over `steps` steps after a warm-up step, then torch.profiler over `steps` more. Mode "prefill": the
    same for one prefill of the batch (its "step"), after an untimed one."""
    _free()
    policy, on = policy_for(name, ratio), torch.cuda.is_available()
    if mode == "prefill":    # the "step" is a prefill of the batch; a first one untimed (lazy inits, library heuristics)
        step, steps = lambda: prefill(model, _prompts(model, batch, prompt_len), policy), 1
        step()
    else:
        cache, tok = _fitted(model, policy, batch, prompt_len, 2 * steps + 2)
        step = lambda: decode_step(model, cache, tok, policy, validate=False)
    if mode == "sync":
        old = torch.cuda.get_sync_debug_mode() if on else 0
        try:
            _sync_peak(), torch.cuda.set_sync_debug_mode("error") if on else None
            step(), step(), step()
            return {"ok": True, "checked": on}
        except RuntimeError as e:
            return {"ok": False, "checked": on, "error": str(e).splitlines()[0][:300]}
        finally:
            torch.cuda.set_sync_debug_mode(old) if on else None
    if mode != "prefill":
        step_fn, _, _ = fixed_capacity_step(model, cache, policy, None, 2 * steps + 2, tok, cache.seen.clone(),
                                            mode != "eager", 2 * steps + 2, mode == "compiled")
        step = lambda: step_fn(tok, cache.seen.clone())
    _sync_peak(); t0 = _clock()
    for _ in range(steps):
        step()
    _sync_peak(); wall = _clock() - t0
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on) as prof:
        for _ in range(steps):
            step()
        _sync_peak()
    return {"wall_ms_per_step": 1000 * wall / steps, **summarize(prof.key_averages(), steps)}

@torch.no_grad()
def run_hf(hf, batch: int, prompt_len: int, new_tokens: int, mode: str = "eager") -> dict:
    """transformers' generate, greedy, after an untimed warm-up: mode "eager" (dynamic cache), "static"
    (`cache_implementation="static"`, the decode compiled by generate during the warm-up) or "probe" (static, not
    compiled, 2 tokens: peak memory only)."""
    torch._dynamo.reset() if mode == "probe" else None    # before the max-batch probes: earlier compiled graphs go
    _free()
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt_len), device=hf.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=mode == "probe",
              cache_implementation=None if mode == "eager" else "static")
    gen = lambda n: (hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw), _sync_peak(), time.perf_counter())
    gen(new_tokens if mode == "static" else 2)               # untimed warm-up (static: the compilation)
    if mode == "probe":
        return {"peak_gib": _sync_peak()}
    t0, t1, t2 = time.perf_counter(), gen(1)[2], gen(new_tokens)[2]
    decode, steps = max(1e-9, (t2 - t1) - (t1 - t0)), new_tokens - 1       # the whole generate less its prefill
    return {"batch": batch, "prefill_s": t1 - t0, "decode_s": decode, "peak_gib": _sync_peak(),
            "decode_ms_per_step": 1000 * decode / steps, "decode_tok_per_s": batch * steps / decode}

GPU_KEYS = ["shape", "engine", "policy", "mode", "batch", "max_batch", "prefill_s", "capture_s", "decode_ms_per_step",
            "decode_tok_per_s", "peak_gib", "kv_live_gib", "kv_alloc_gib", "kv_full_gib", "cache_ratio", "error"]

def bench_plan(env, profile_flag: bool = False) -> dict:
    """The run from MINIKV_BENCH_*, checked up front: SHAPES, POLICIES, BATCHES ("1,16,max"), MODES ("graph,eager", in
    that order), HF ("1", "0", "only"), PROMPT, NEW_TOKENS, SECONDS (a budget checked before each item), PROFILE
    ("policy:batch:mode,...", mode also "prefill"; --profile: PROFILE_DEFAULT), SYNC ("1": check all POLICIES; default
    on if profiling)."""
    def get(name, default, ok, known):
        items = [x.strip() for x in env.get(name, default).split(",") if x.strip()]
        if [x for x in items if not ok(x)] or (default and not items):
            raise BadInput(f"{name}={env.get(name, default)!r}: give {known}")
        return items
    num = lambda x, lo=1: x.isdecimal() and int(x) >= lo
    known = lambda p: spec_words(p)[0] in REGISTRY and bool(policy_for(p, 0.2))     # "d2o:when=prefill": an option
    is_spec = lambda p, b="", m="", *more: known(p) and num(b) and m in (*MODES, "prefill") and not more
    spec = [x.rsplit(":", 2) for x in get("MINIKV_BENCH_PROFILE", PROFILE_DEFAULT if profile_flag else "",
                                          lambda x: is_spec(*x.rsplit(":", 2)), "policy:batch:mode,...")]
    one = lambda *a: get(*a)[0]
    return {"shapes": get("MINIKV_BENCH_SHAPES", "llama2-7b", SHAPES.__contains__, ", ".join(SHAPES)),
            "policies": get("MINIKV_BENCH_POLICIES", ",".join(POLICIES), known, ", ".join(REGISTRY)),
            "batches": [x if x == "max" else int(x) for x in get("MINIKV_BENCH_BATCHES", "1,16,max",
                                                                 lambda x: x == "max" or num(x), "e.g. 1,16,max")],
            "modes": get("MINIKV_BENCH_MODES", "graph,eager", MODES.__contains__, "of " + ", ".join(MODES)),
            "hf": one("MINIKV_BENCH_HF", "1", ("0", "1", "only").__contains__, "1, 0 or only"),
            "sync": one("MINIKV_BENCH_SYNC", "1" if spec else "0", ("0", "1").__contains__, "0 or 1") == "1",
            "prompt_len": int(one("MINIKV_BENCH_PROMPT", "4096", num, "an integer >= 1")),
            "new_tokens": int(one("MINIKV_BENCH_NEW_TOKENS", "64", lambda x: num(x, 5), "an integer >= 5")),
            "seconds": float(one("MINIKV_BENCH_SECONDS", "99999", lambda x: x.replace(".", "", 1).isdigit(),
                                 "a number of seconds")), "ratio": 0.2, "profile": [(p, int(b), m) for p, b, m in spec]}

def run_plan(plan: dict, out: Path, info: dict, device="cuda", dtype=torch.bfloat16, total_bytes=None,
             folder: Path | None = None) -> dict:
    """Per shape (random weights, or the model in `folder`): minikv's sync checks, profiles and rows, then transformers'
    rows; each item printed and saved in the JSON as it comes (a cut-off run keeps it), skipped past plan["seconds"]."""
    res, t_start, P, N, ratio = {"info": info, "rows": [], "profile": [], "sync": []}, time.perf_counter(), \
        plan["prompt_len"], plan["new_tokens"], plan["ratio"]
    total = total_bytes or (lambda: torch.cuda.get_device_properties(0).total_memory)
    torch._dynamo.config.recompile_limit = 64      # each compiled row is a new shape: never fall back to eager

    def emit(kind: str, item: dict) -> None:
        res[kind].append(item)
        print(format_rows([item], GPU_KEYS, 3).splitlines()[-1] if kind == "rows" else f"{kind}: {json.dumps(item)}",
              flush=True)
        write_json(out, res)

    def time_left(what: str) -> bool:
        t = time.perf_counter() - t_start
        print(f"[{t:5.0f} s] " + (what if t < plan["seconds"] else f"time budget spent: skipping {what}"), file=sys.stderr)
        return t < plan["seconds"]

    for shape in plan["shapes"]:
        if plan["hf"] != "only":
            model = load_model(folder, dtype, device) if folder else \
                random_model(lambda: Llama(LlamaConfig(**SHAPES[shape])), dtype, device)
            generate(model, _prompts(model, 2, 64), max_new_tokens=3, stop_ids=[])     # warm-up: lazy inits
            checks = [("sync", n, 2, min(P, 1024), "sync") for n in POLICIES if plan["sync"]]
            for kind, name, b, p, m in checks + [("profile", n, b, P, m) for n, b, m in plan["profile"]]:
                if time_left(f"{kind} {name} batch {b} {m}"):
                    emit(kind, {"shape": shape, "policy": name, "batch": b, "mode": m,
                                **_attempt(profile_decode, model, name, ratio, b, p, m)})
            for name in plan["policies"]:
                bench_rows({"shape": shape, "engine": "minikv", "policy": name},
                           lambda b, m: run_minikv(model, name, ratio, b, P, N, m),
                           lambda b: probe_minikv(model, name, ratio, b, P, N), plan["batches"], plan["modes"], total,
                           emit, time_left)
            del model; _free()
        if plan["hf"] != "0" and time_left(f"transformers {shape}"):
            import transformers
            if folder:
                hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
            else:
                cfg = transformers.LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
                hf = random_model(lambda: transformers.LlamaForCausalLM(cfg))
                with torch.device("cuda"):                         # its inv_freq buffer was left empty
                    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
            bench_rows({"shape": shape, "engine": "transformers", "policy": "full"}, lambda b, m: run_hf(hf, b, P, N,
                       m), lambda b: run_hf(hf, b, P, N, "probe"), plan["batches"], ("eager",) if folder else
                       ("eager", "static"), total, emit, time_left)
            del hf; _free()
    return res

def run_main(args) -> int:
    """`bench gpu|cpu`: the device, the model folder, the plan, the transformers peer and --out, all checked first.
    bench cpu runs the plan on the default model (or --model) in float32, by default (CPU_PLAN) full at batch 1."""
    gpu = args.which == "gpu"
    if gpu and not torch.cuda.is_available():
        raise NoDevice("minikv bench gpu needs a CUDA GPU; none is visible to torch (torch.cuda.is_available() is "
                       f"False, torch {torch.__version__}); run minikv bench cpu on this machine instead")
    if args.model and not Path(args.model).is_dir():
        raise NotFound(f"--model {args.model}: no such folder; give a Hugging Face Llama folder, or leave it out")
    plan = bench_plan({**({} if gpu else CPU_PLAN), **os.environ}, args.profile)
    try:
        import transformers  # noqa: F401  -- the peer, needed unless MINIKV_BENCH_HF=0
    except ImportError:
        if plan["hf"] != "0":
            raise MissingExtra(f"minikv bench {args.which} compares against transformers, which is not installed: pip "
                               'install "minikv[bench]" (or: pip install transformers) -- or set MINIKV_BENCH_HF=0 to '
                               "skip the transformers rows") from None
    out = check_out_path(Path(args.out or os.environ.get("OUT", "results") + f"/bench_{args.which}.json"))
    folder = None if gpu else Path(args.model) if args.model else ensure_default_model()
    info = {"gpu": torch.cuda.get_device_name() if gpu else f"none ({platform.machine()}, {torch.get_num_threads()} "
            "threads)", "torch": torch.__version__, "prompt_len": plan["prompt_len"], "ratio": plan["ratio"],
            "transformers": getattr(sys.modules.get("transformers"), "__version__", "-"), "max_batch_rule":
            MAX_BATCH_RULE, "step_rule": STEADY, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "new_tokens":
            plan["new_tokens"], "env": {k: v for k, v in os.environ.items() if "MINIKV_BENCH" in k}}
    res = run_plan(dict(plan, shapes=[folder.name]) if folder else plan, out, info,
                   *(() if gpu else ("cpu", torch.float32)), folder=folder)
    print(format_rows(res["rows"], GPU_KEYS, 3) + f"\nsaved {out}")
    return 0

# ---- minikv bench report ---------------------------------------------------------------------------------------
def targets(res: dict) -> list[dict]:
    """The issue's targets as measured ratios, each "pass", "miss", or "not measured" when a row is missing."""
    def v(key, policy, modes, batch, engine="minikv"):
        """The best `key` (least time or memory, most tok/s) over the rows of this configuration (any options)."""
        vals = [r[key] for r in res["rows"] if "error" not in r and (r["engine"], spec_words(r["policy"])[0]) ==
                (engine, policy) and r["mode"] in modes and (r["max_batch"] if batch == "max" else r["batch"] == batch)]
        return (max if key == "decode_tok_per_s" else min)(vals) if vals else None
    ms, tok, hf, both, captured = "decode_ms_per_step", "decode_tok_per_s", "transformers", MODES, ("graph", "compiled")
    vs_full = lambda key, modes, ps: [(p, v(key, p, modes, 16), v(key, "full", modes, 16)) for p in ps]
    vs_hf = lambda m, p: [(f"batch {b}", v(ms, "full", m, b), v(ms, "full", (p,), b, hf)) for b in (1, 16)]
    spec = [("(a) minikv full graph|compiled ms/step <= transformers static", 1.0, vs_hf(captured, "static")),
            ("(b) minikv full eager ms/step <= transformers eager", 1.0, vs_hf(("eager",), "eager")),
            ("(c) graph|compiled ms/step at batch 16 <= 0.7 x full's", 0.7,
             vs_full(ms, captured, ("streaming", "h2o", "d2o", "corm", "adakv-h2o"))),
            ("(d) max-batch tok/s >= 3 x transformers static max-batch tok/s", -3.0,
             [(p, v(tok, p, both, "max"), v(tok, "full", ("static",), "max", hf))
              for p in ("h2o", "d2o", "snapkv", "adakv-snapkv", "streaming")]),
            ("(e) prefill s at batch 16 <= 1.5 x full", 1.5,
             vs_full("prefill_s", both, ("h2o", "d2o", "snapkv", "adakv-snapkv", "adakv-h2o", "corm"))),
            ("(f) d2o peak GiB at batch 16 <= 0.5 x full", 0.5, vs_full("peak_gib", both, ("d2o",)))]
    out = []
    for name, limit, comps in spec:                          # a negative limit: at least -limit
        ratios = {label: a / b if a is not None and b else None for label, a, b in comps}
        miss = any(r is not None and (r < -limit if limit < 0 else r > limit) for r in ratios.values())
        out.append({"target": name, "verdict": "miss" if miss else "not measured" if None in ratios.values() else
                    "pass", "measured": ", ".join(f"{k} {'not measured' if r is None else f'{r:.3g}x'}"
                                                  for k, r in ratios.items())})
    sync = {s["policy"]: s for s in res["sync"]}              # a later check of a policy replaces an earlier one
    st = {p: s.get("error", "ok")[:80] if "error" in s or s.get("checked") else "not measured"
          for p, s in ((p, sync.get(p, {})) for p in POLICIES)}
    found, measured = set(st.values()), ", ".join(f"{p} {x}" for p, x in st.items())
    out.append({"target": "(g) no host sync in decode_step after cache.fit", "measured": measured, "verdict": "pass"
                if found == {"ok"} else "not measured" if found <= {"ok", "not measured"} else "miss"})
    return out

def report_main(args) -> int:
    """`minikv bench report FILES [--out MD]`: the JSON of `bench gpu` calls merged (the first one's info); print (and
    save) a header (GPU, versions, date), the rows, the targets and the decode profiles."""
    missing = [f for f in args.files if not Path(f).is_file()] if args.files else ["(none given)"]
    if missing:
        raise NotFound(f"minikv bench report: no JSON file {missing[0]}; give the --out files of `minikv bench gpu`")
    parts = [json.loads(Path(f).read_text()) for f in args.files]    # targets take the best row of a configuration
    res = {k: [r for p in parts for r in p.get(k, [])] for k in ("rows", "profile", "sync")}
    i = res["info"] = {"step_rule": "(decode_s - capture_s) / steps (files before STEADY)", **parts[0]["info"]}
    text = "\n\n".join([
        f"# minikv bench gpu: {i.get('gpu')}, torch {i.get('torch')}, transformers {i.get('transformers')}, "
        f"{i.get('date')}", f"Prompt {i.get('prompt_len')} tokens, {i.get('new_tokens')} new, ratio "
        f"{i.get('ratio')}; max batch = {i.get('max_batch_rule')} ms/step = {i['step_rule']}",
        format_rows(res["rows"], GPU_KEYS, 3),
        "## Targets", format_rows(targets(res), ["target", "measured", "verdict"]), "## Decode profiles (per step)",
        format_rows(res["profile"], ["shape", "policy", "batch", "mode", "launches_per_step", "kernels_per_step",
                                     "gpu_busy_ms_per_step", "wall_ms_per_step", "error"], 3)]) + "\n"
    print(text)
    check_out_path(Path(args.out)).write_text(text) if args.out else None
    return 0

def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: `cpu` (minikv vs transformers), `gpu` (minikv vs transformers "
                                     "at a 7B shape, see BENCHMARKS.md), `report FILES` (merge gpu JSON files)")
    b.add_argument("which", choices=["cpu", "gpu", "report"])
    b.add_argument("files", nargs="*", help="report: the JSON files of `bench gpu` calls")
    b.add_argument("--out", default=None, help="JSON output path (report: the markdown file)")
    b.add_argument("--profile", action="store_true", help="gpu: profile decode steps (MINIKV_BENCH_PROFILE picks)")
    add_model_args(b)
    b.set_defaults(func=lambda args: (report_main if args.which == "report" else run_main)(args))
