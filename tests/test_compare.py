"""`minikv compare` (minikv/tools/compare.py) on tiny random models: the Jaccard overlap of kept positions and the
attention-output error checked by hand, the probe query checked against the model's own attention, the command line's
table, JSON and heatmap, and its refusals (one named line each). Last, `minikv bench cpu`, which now runs the plan of
`bench gpu` on a model folder (the bench.py trim that made room for compare)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import tiny_model
from minikv.errors import BadInput
from minikv.generate import generate, prefill
from minikv.tools import bench, common, compare
from test_bad_input import assert_refused, run_cli

IDS = list(range(5, 45))                             # a 40-token prompt
N = len(IDS)


@pytest.fixture(scope="module")
def tiny64():
    return tiny_model(torch.float64)                 # 3 layers, 4 query heads, 2 KV heads, head_dim 16


def test_jaccard_by_hand():
    a = [[[0, 1, 2], [3], []], [[5, 6]]]
    b = [[[1, 2, 3], [3], []], [[7]]]
    assert compare.jaccard(a, b) == [[2 / 4, 1.0, 1.0], [0.0]]        # {1,2} of {0,1,2,3}; equal; both empty; apart


def test_policy_spec_reads_name_budget_and_options():
    p = common.policy_spec("snapkv 0.2 window=8 kernel=3")
    assert (p.name, p.budget.value, p.window, p.kernel) == ("snapkv", 0.2, 8, 3)
    assert common.policy_spec(" full ").budget is None and common.policy_spec("h2o 12").budget.value == 12
    p = common.policy_spec("snapkv:0.2:window=8:kernel=3")                    # eval's colons work here too
    assert (p.name, p.budget.value, p.window, p.kernel) == ("snapkv", 0.2, 8, 3)
    with pytest.raises(BadInput, match="'0.2 0.5'"):                 # two budgets are refused, named
        common.policy_spec("h2o 0.2 0.5")
    with pytest.raises(BadInput, match="'nope'"):
        common.policy_spec("h2o 0.2 nope=1")


def test_a_policy_against_itself_overlaps_everywhere(tiny64):
    rep = compare.compare_policies(tiny64, IDS, "h2o 12", "h2o 12", max_new_tokens=3)
    assert [r["jaccard"] for r in rep["layers"]] == [[1.0, 1.0]] * 3
    assert rep["a"]["err"] == rep["b"]["err"] and all(e > 0 for e in rep["a"]["err"])
    assert rep["a"]["answer_ids"] == rep["b"]["answer_ids"] and len(rep["full"]["answer_ids"]) == 3
    assert all(len(head) == 12 for layer in rep["a"]["kept"] for head in layer)


def test_each_policy_prefills_once_and_answers_as_generate(tiny64):
    """One prefill per policy gives both its stores and its greedy answer, which is generate's."""
    tokens = []                                      # tokens of each pass through the model
    hook = tiny64.layers[0].register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
    try:
        rep = compare.compare_policies(tiny64, IDS, "h2o 12", "streaming 12", max_new_tokens=4)
    finally:
        hook.remove()
    assert tokens.count(N) == 3                      # prefills: the full cache's run, then one per policy
    for key, spec in (("a", "h2o 12"), ("b", "streaming 12")):
        res = generate(tiny64, [IDS], compare.policy_spec(spec), max_new_tokens=4)
        assert rep[key]["answer_ids"] == res.tokens[0] and rep[key]["cache_ratio"] == res.cache_ratio


def test_full_against_streaming_by_hand(tiny64, monkeypatch):
    """full keeps the 40 positions, streaming 12 the 4 sinks and the last 8: Jaccard 12/40 in every layer and head;
    full's error is 0; streaming's is the error of a softmax over those 12 positions, computed here from the keys."""
    calls, real = [], compare.attend
    monkeypatch.setattr(compare, "attend", lambda q, qpos, store: calls.append((q, qpos)) or real(q, qpos, store))
    rep = compare.compare_policies(tiny64, IDS, "full", "streaming 12", max_new_tokens=2)
    assert [r["jaccard"] for r in rep["layers"]] == [[12 / 40, 12 / 40]] * 3
    kept = [0, 1, 2, 3] + list(range(32, 40))
    assert rep["a"]["kept"] == [[list(range(N))] * 2] * 3 and rep["b"]["kept"] == [[kept] * 2] * 3
    assert rep["a"]["err"] == [0.0, 0.0, 0.0]

    full = prefill(tiny64, [IDS])[1]
    outs, cfg = [], tiny64.cfg                       # the model's own attention output of the last prompt token
    hooks = [blk.self_attn.o_proj.register_forward_pre_hook(lambda m, args: outs.append(args[0][0, -1]))
             for blk in tiny64.layers]
    prefill(tiny64, [IDS])
    for h in hooks:
        h.remove()
    G, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    for layer in range(3):
        q, qpos = calls[2 * layer]                   # a's loop: attend over the full store, then over a's store
        assert qpos.tolist() == [[N - 1]]
        assert torch.allclose(real(q, qpos, full.layers[layer])[0].flatten(), outs[layer], atol=1e-12)
        K, V = full.layers[layer].k[0, :, :N], full.layers[layer].v[0, :, :N]    # (Hkv, 40, d), slots = positions
        scores = torch.stack([q[0, i, 0] @ K[i // G].T / math.sqrt(d) for i in range(cfg.num_attention_heads)])
        values = torch.stack([V[i // G] for i in range(cfg.num_attention_heads)])
        o_full = torch.einsum("hs,hsd->hd", scores.softmax(-1), values)
        o_kept = torch.einsum("hs,hsd->hd", scores[:, kept].softmax(-1), values[:, kept])
        assert rep["b"]["err"][layer] == pytest.approx(float((o_kept - o_full).norm() / o_full.norm()), rel=1e-9)


def test_cli_prints_the_table_and_saves_json_and_heatmap(tiny_model_dir, tmp_path, capsys):
    out, png = tmp_path / "r" / "c.json", tmp_path / "c.png"
    plot = ["--plot", png] if importlib.util.find_spec("matplotlib") else []
    code, stdout, _ = run_cli(["compare", "--model", tiny_model_dir, "--prompt", "abcdefghij" * 4, "--a", "full",
                               "--b", "streaming 10", "--max-new-tokens", 2, "--out", out, *plot], capsys)
    assert code == 0
    rep = json.loads(out.read_text())                # 40 byte tokens, 10 kept: Jaccard 0.25
    assert len(rep["prompt_ids"]) == 40 and [r["jaccard"] for r in rep["layers"]] == [[0.25, 0.25]] * 3
    assert (rep["a"]["spec"], rep["b"]["spec"], rep["full"]["spec"]) == ("full", "streaming 10", "full")
    assert rep["a"]["err"] == [0.0] * 3 and rep["full"]["cache_ratio"] == 1.0 and isinstance(rep["b"]["answer"], str)
    assert "| layer | jaccard mean | jaccard min | err A | err B |" in stdout
    assert "| 0 | 0.25 | 0.25 | 0 |" in stdout and "| mean | 0.25 | 0.25 | 0 |" in stdout
    assert "   b = streaming 10, cache ratio" in stdout and f"saved {out}" in stdout
    assert not plot or png.read_bytes().startswith(b"\x89PNG")


def test_cli_over_a_tasks_prompts_averages_them(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    code, stdout, _ = run_cli(["compare", "--model", tiny_model_dir, "--task", "passkey", "--length", 400,
                               "--samples", 3, "--a", "streaming 100", "--b", "h2o 100", "--out", out], capsys)
    assert code == 0
    rep = json.loads(out.read_text())
    prompts = rep["prompts"]
    assert len(prompts) == 3 and len({tuple(p["prompt_ids"]) for p in prompts}) == 3      # three different prompts
    for layer in range(3):                                        # the mean of the prompts' overlaps, head by head
        per_prompt = [p["layers"][layer]["jaccard"] for p in prompts]
        assert rep["layers"][layer]["jaccard"] == pytest.approx([sum(h) / 3 for h in zip(*per_prompt)])
        assert rep["layers"][layer]["err_a"] == pytest.approx(sum(p["layers"][layer]["err_a"] for p in prompts) / 3)
    for side in ("a", "b", "full"):                               # scores: the task's metric (passkey: contains)
        scores = [p[side]["score"] for p in prompts]
        assert set(scores) <= {0.0, 1.0} and rep[side]["score"] == pytest.approx(sum(scores) / 3)
    assert rep["a"]["spec"] == "streaming 100" and "mean over 3 prompts: score A" in stdout
    assert stdout.count("prompt ") >= 3 and "| mean |" in stdout


@pytest.mark.parametrize("args, named", [
    (["--task", "passkey", "--depth", "1.5"], ["--depths", "1.5"]),
    (["--task", "passkey", "--samples", "0"], ["--samples 0"]),
    (["--task", "passkey", "--length", "1"], ["--lengths 1"]),
    (["--task", "ppl"], ["--task", "'ppl'"]),
])
def test_cli_task_refusals(tiny_model_dir, tmp_path, capsys, args, named):
    argv = ["compare", "--model", tmp_path / "no-model", "--a", "h2o 4", "--b", "streaming 8", *args]
    assert_refused(run_cli(argv, capsys), *named)                 # before the (missing) model folder is read
    if args[1] != "ppl":                                          # a prompt or a task, not both
        assert_refused(run_cli([*argv, "--prompt", "hi"], capsys), "--prompt")


@pytest.mark.parametrize("args, named", [
    (["--a", "snapkvv 0.2"], ["'snapkvv'"]),
    (["--a", "h2o 0.2 0.5"], ["'0.2 0.5'"]),
    (["--a", "h2o 0.2 nope=1"], ["'nope'", "h2o"]),
    (["--a", "full 0.2"], ["full", "'0.2'"]),
    (["--b", "streaming"], ["streaming needs a budget"]),
    (["--prompt", ""], ["--prompt", "empty"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", "'-1'"]),
])
def test_cli_refuses_bad_input(tiny_model_dir, capsys, args, named):
    base = {"--prompt": "hello", "--a": "h2o 4", "--b": "streaming 8"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["compare", "--model", tiny_model_dir, *[x for kv in base.items() for x in kv]]
    assert_refused(run_cli(argv, capsys), *named)


def test_cli_refuses_before_the_model_loads(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-model"                  # a model folder that would be refused if it were read
    argv = ["compare", "--model", missing, "--prompt", "hi", "--a", "full", "--b", "h2o 4"]
    assert_refused(run_cli(argv[:7], capsys), "--b")                       # --b left out: argparse names it
    assert_refused(run_cli([*argv, "--out", tmp_path], capsys), tmp_path, "is a folder")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)    # `import matplotlib` raises ImportError
    assert_refused(run_cli([*argv, "--plot", tmp_path / "c.png"], capsys), "matplotlib", "minikv[plot]")
    assert_refused(run_cli(argv, capsys), missing)                         # and then the folder is read


def test_bench_cpu_runs_the_plan_on_a_model_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    hf = importlib.util.find_spec("transformers") is not None
    for name, value in (("MINIKV_BENCH_PROMPT", "48"), ("MINIKV_BENCH_NEW_TOKENS", "5"),
                        ("MINIKV_BENCH_HF", "1" if hf else "0")):
        monkeypatch.setenv(name, value)
    code, stdout, _ = run_cli(["bench", "cpu", "--model", tiny_model_dir, "--out", tmp_path / "b.json"], capsys)
    assert code == 0 and f"saved {tmp_path / 'b.json'}" in stdout
    res = json.loads((tmp_path / "b.json").read_text())
    rows = [(r["shape"], r["engine"], r["policy"], r["mode"], r["batch"]) for r in res["rows"]]
    assert rows == [(tiny_model_dir.name, "minikv", "full", "eager", 1)] + \
        [(tiny_model_dir.name, "transformers", "full", "eager", 1)] * hf          # CPU_PLAN's defaults
    assert all("error" not in r and r["decode_tok_per_s"] > 0 for r in res["rows"])
    assert res["info"]["prompt_len"] == 48 and res["info"]["gpu"].startswith("none")
    assert res["info"]["step_rule"] == bench.STEADY                                 # how ms/step was measured
