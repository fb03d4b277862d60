"""Benchmarks: scripts that print tables and save JSON (speed targets are checked here, never in unit tests).

`minikv bench cpu`: minikv vs transformers on the default model, on this machine: prefill tokens/s at 512 and 2048
tokens, and decode tokens/s (greedy, full cache). minikv's prefill is timed on the SDPA path (what `generate` uses
when the policy needs no probabilities) and, for reference, on its reference attention path (the one that can
return probabilities to a policy).
`minikv bench gpu`: the GPU protocol described in minikv/tools/bench_gpu.py (results in BENCHMARKS.md).

Both need `transformers` as the peer (`pip install "minikv[bench]"`); that, the output path and the device are
checked before anything runs, and every measurement prints a progress line (a tqdm bar when tqdm is installed).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from minikv.errors import BadInput, MissingExtra, NotFound


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
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"--out {out}: {ancestor} is a file, so no folder can be made there; give another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, or not writable
        raise BadInput(f"--out {out}: cannot create its folder {out.parent} ({e.strerror or e}); "
                       "give a path in a writable folder") from None
    if not os.access(out.parent, os.W_OK):
        raise BadInput(f"--out {out}: its folder {out.parent} is not writable; give a path in a writable folder")
    return out


def write_json(out: Path, data: dict) -> None:
    """Write the results, turning an I/O failure into a named error."""
    try:
        out.write_text(json.dumps(data, indent=2))
    except OSError as e:
        raise BadInput(f"--out {out}: could not write the results ({e.strerror or e})") from None


class Progress:
    """One step per measurement: a tqdm bar when tqdm is installed, else one stderr line per step."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self.desc, self.t0 = total, 0, desc, time.perf_counter()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="measure", file=sys.stderr)
        except ImportError:
            self.bar = None

    def step(self, what: str) -> None:
        """Record one finished measurement."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        else:
            print(f"{self.desc} [{self.done}/{self.total}, {time.perf_counter() - self.t0:.0f} s] {what}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    from minikv.io.checkpoint import load_model
    from minikv.generate import generate
    import transformers

    progress = Progress(2 + 3 * len(prefill_lengths) + 4, "bench cpu")
    ours = load_model(folder)
    progress.step("loaded minikv's model")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.config._attn_implementation = "sdpa"
    progress.step("loaded transformers' model")

    def timed(label: str, fn) -> float:
        """The median time of fn over `repeats` runs, reported as one progress step."""
        t = _median_time(fn, repeats)
        progress.step(f"{label}: {t:.2f} s")
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
    """`minikv bench cpu|gpu`: check the inputs up front, run, print the table and save the JSON."""
    if args.which == "gpu":
        from minikv.tools.bench_gpu import main as gpu_main
        return gpu_main(args)
    require_transformers("minikv bench cpu")
    if args.model and not Path(args.model).is_dir():
        raise NotFound(f"--model {args.model}: no such folder; give a Hugging Face Llama folder, or leave --model "
                       "out for the default model")
    out = check_out_path(Path(args.out or "results/bench_cpu.json"))
    from minikv.io.convert import ensure_default_model
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
