"""Bad input to `minikv generate`, `minikv trace`, `minikv policies` and the Python API (generate, prefill,
get_policy): every one is a named error that says what was wrong, and nothing is silently ignored.

CLI cases run in-process through `minikv.cli.main` against the tiny model folder (loads in well under a second);
each must return 2 with exactly one stderr line `minikv: error: ...` naming the offending value and no traceback.
"""
from __future__ import annotations

import time

import pytest
import torch

from conftest import tiny_model
from minikv.budgets import parse_budget
from minikv.cli import main, parse_options
from minikv.generate import generate, prefill
from minikv.policies import get_policy


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) -> (return value, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def gen(model_dir, *extra) -> list[str]:
    return ["generate", "--model", model_dir, "--device", "cpu", "--max-new-tokens", "2", *extra]


def trace(model_dir, *extra) -> list[str]:
    return ["trace", "--model", model_dir, "--device", "cpu", "--max-new-tokens", "1", *extra]


# (command builder, extra argv, substring the one error line must contain: the offending value)
CLI_CASES = [
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
    # trace
    (trace, ["--prompt", "hello", "--layers", "99"], "layer 99 is out of range"),
    (trace, ["--prompt", "hello", "--layers", "3"], "0..2"),
    (trace, ["--prompt", "hello", "--layers", "-1"], "layer -1"),
    (trace, ["--prompt", "hello", "--layers", "first"], "'first'"),
    (trace, ["--prompt", "hello", "--policy", "full", "--budget", "1"], "budget '1'"),
    (trace, ["--prompt", ""], "the prompt is empty"),
]
if not torch.cuda.is_available():
    CLI_CASES.append((gen, ["--prompt", "hi", "--device", "cuda"], "'cuda'"))


@pytest.mark.parametrize("build,extra,expect", CLI_CASES, ids=[" ".join(c[1])[:60] for c in CLI_CASES])
def test_cli_bad_input_is_one_named_line(build, extra, expect, tiny_model_dir, capsys):
    rc, out, err = run_cli(build(tiny_model_dir, *extra), capsys)
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("minikv: error:"), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in out + err


# ---- the Python API ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model()


API_CASES = [
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
    (dict(prefill_rows=0), "prefill_rows .* got 0"),
    (dict(policy="h2o"), "policy must be a policy object .* 'h2o'"),
    (dict(question=[[1], [2]]), "question has 2 rows for 1 prompts"),
    (dict(on_tokens=5), "on_tokens .* 5"),
]


@pytest.mark.parametrize("kwargs,match", API_CASES, ids=[str(c[0])[:50] for c in API_CASES])
def test_generate_bad_arguments_are_named(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_prefill_refuses_bad_prompts(model):
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\] = 999"):
        prefill(model, [[999]])
    with pytest.raises(ValueError, match="prompts is an empty list"):
        prefill(model, [], get_policy("h2o", 8))
    with pytest.raises(ValueError, match="extra_capacity .* got -1"):
        prefill(model, [[1, 2]], extra_capacity=-1)


def test_model_forward_refuses_out_of_vocabulary_ids(model):
    with pytest.raises(ValueError, match="token id 101 is outside"):
        model(torch.tensor([[1, 101]]), model.new_cache(1))


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
    ("d2o", 0.2, {"when": "later"}, "when .* got 'later'"),
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


# ---- clear readings of legal but surprising input -----------------------------------------------------------------
@pytest.mark.parametrize("text,reading", [
    ("1", "budget 1 = 1 entry per (layer, KV head)"),
    ("512", "budget 512 = 512 entries per (layer, KV head)"),
    ("0.2", "budget 0.2 = 20% of each prompt's tokens per (layer, KV head)"),
    ("1.0", "budget 1.0 = 100% of each prompt's tokens per (layer, KV head)"),
])
def test_budget_readings(text, reading):
    assert parse_budget(text).describe() == reading


def test_cli_prints_how_the_budget_was_read(tiny_model_dir, capsys):
    rc, out, err = run_cli(gen(tiny_model_dir, "--prompt", "hi", "--policy", "h2o", "--budget", "1"), capsys)
    assert rc == 0 and "budget 1 = 1 entry per (layer, KV head)" in err
    rc, out, err = run_cli(trace(tiny_model_dir, "--prompt", "hello", "--policy", "h2o", "--budget", "0.2"), capsys)
    assert rc == 0 and "budget 0.2 = 20% of each prompt's tokens" in err
    rc, out, err = run_cli(gen(tiny_model_dir, "--prompt", "hi"), capsys)
    assert rc == 0 and "no budget: the full cache keeps every entry" in err


def test_policies_lists_distinct_descriptions_and_options(capsys):
    rc, out, err = run_cli(["policies"], capsys)
    assert rc == 0 and not err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 120
    from minikv.policies import REGISTRY
    heads = [l for l in lines if l.split(" ")[0] in REGISTRY]
    assert len(heads) == len(REGISTRY) and len({l.split(None, 1)[1] for l in heads}) == len(REGISTRY)
    for option in ("window=32", "kernel=7", "alpha=0.2", "variant=official", "w=256", "merge_weights=code"):
        assert option in out


# ---- max_new_tokens is capped at the context, and the cache grows only as tokens arrive ------------------------
def test_huge_max_new_tokens_stops_at_the_context(model):
    ctx = model.cfg.max_position_embeddings
    prompt = [1 + i % 100 for i in range(ctx - 12)]
    t = time.perf_counter()
    res = generate(model, [prompt], max_new_tokens=10 ** 9, stop_ids=[], keep_cache=True)
    assert time.perf_counter() - t < 20
    assert len(res.tokens[0]) == 12 and res.stopped_at_context
    assert res.cache.capacity <= ctx
    short = generate(model, [[1, 2, 3]], max_new_tokens=4, stop_ids=[])
    assert not short.stopped_at_context and len(short.tokens[0]) == 4


def test_prompt_that_fills_the_context_generates_nothing(model):
    ctx = model.cfg.max_position_embeddings
    res = generate(model, [[1] * ctx], max_new_tokens=5, stop_ids=[])
    assert res.tokens == [[]] and res.stopped_at_context


def test_huge_request_reserves_little_up_front(model):
    from minikv.generate import RESERVE_CHUNK
    _, cache = prefill(model, [[1, 2, 3]], extra_capacity=10 ** 9)
    assert cache.capacity <= model.cfg.max_position_embeddings           # capped at the context, not 10^9
    every_id = list(range(model.cfg.vocab_size))                         # stops at the first token: prefill only
    res = generate(model, [[1, 2, 3]], max_new_tokens=10 ** 9, stop_ids=every_id, keep_cache=True)
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
    with pytest.raises(ValueError, match="reserve: .* got -1"):
        store.reserve(-1)
