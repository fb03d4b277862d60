"""minikv.tools.eval: task generators (deterministic, exact lengths, needle at its depth), the metric against a
hand-computed case, the resumable grid runner on a tiny random model, teacher-forced perplexity, tables, plots, the CLI."""
from __future__ import annotations

import mmap
import math
import re
from collections import Counter

import pytest
import torch

from minikv.errors import BadInput
from minikv.tools.eval import records as R
from minikv.tools.eval import runner
from minikv.tools.eval.runner import EvalConfig, build_grid, parse_budgets, parse_policies, run_grid
from minikv.tools.eval.tasks import DEPTH_TASKS, Example, insert_at_depths, make_example, prose_ids, take_tokens
from tests.conftest import tiny_model


class CharTokenizer:
    """One token per printable ASCII character (ids 3..97) or newline (98), enough to drive the generators and a
    tiny model (vocabulary 101); anything else becomes a space."""
    eos_id = 2

    def encode(self, text, add_bos=None, **_):
        return [98 if c == "\n" else ord(c) - 29 if 32 <= ord(c) < 127 else 3 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i == 98 else chr(i + 29) if 3 <= i < 98 else "" for i in ids)

    def token_to_id(self, token):
        return None


@pytest.fixture
def char_tok():
    return CharTokenizer()


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


# ---- task generators ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["passkey", "needle", "ruler-lite/multikey", "ruler-lite/multivalue"])
def test_needle_at_depth_exact_length_deterministic(default_tokenizer, task):
    tok = default_tokenizer
    for length in (1000, 2500):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            ex = make_example(tok, task, length, depth, sample=0, seed=3)
            again = make_example(tok, task, length, depth, sample=0, seed=3)
            assert ex.ids == again.ids and ex.answers == again.answers            # deterministic per seed
            assert abs(len(ex.ids) - length) <= 0.02 * length                    # within 2% (exactly, in fact)
            assert len(ex.ids) == length
            # The key's digits really are in the prompt, at depth × length (instruction/question: < 5% slack).
            key = ex.answers[0]
            needle_text = (f" The pass key is {key}" if task == "passkey" else f" is {key}.")
            off = _find(ex.ids, tok.encode(needle_text, add_bos=False))
            assert off >= 0, (task, length, depth)
            assert abs(off - depth * length) <= 0.05 * length, (task, length, depth, off)
            assert tok.decode(ex.question).rstrip().endswith(("is", "are"))
    other = make_example(tok, task, 1000, 0.5, sample=0, seed=4)
    assert other.ids != make_example(tok, task, 1000, 0.5, sample=0, seed=3).ids
    assert make_example(tok, task, 1000, 0.5, sample=1, seed=3).ids != make_example(tok, task, 1000, 0.5, 0, 3).ids


def test_passkey_prompt_shape(default_tokenizer):
    ex = make_example(default_tokenizer, "passkey", 1500, 0.5, seed=0)
    text = default_tokenizer.decode(ex.ids)
    assert text.endswith("What is the pass key? The pass key is")
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in text
    assert len(ex.answers[0]) == 5 and ex.answers[0].isdigit() and ex.max_new_tokens == 8


@pytest.mark.parametrize("task", ["ruler-lite/vt", "ruler-lite/cwe", "ppl"])
def test_other_tasks_lengths_and_answers(default_tokenizer, task):
    tok = default_tokenizer
    for length in (1000, 2500):
        ex = make_example(tok, task, length, None, sample=0, seed=1)
        assert ex.ids == make_example(tok, task, length, None, sample=0, seed=1).ids
        assert abs(len(ex.ids) - length) <= 0.02 * length
        text = tok.decode(ex.ids)
        if task == "ruler-lite/vt":
            assert len(ex.answers) == 5 and all(f"VAR {name} =" in text for name in ex.answers)
            assert f"VAR {ex.answers[0]} = {ex.meta['value']}." in text
        elif task == "ruler-lite/cwe":
            listed = text.rsplit("Memorize the ones that appear most often.", 1)[1]   # after the solved example
            counts = Counter(re.findall(r"\d+\. (\w+)", listed.split("Question:")[0]))
            assert {w for w, _ in counts.most_common(10)} == set(ex.answers)      # the 10 common words are top
        else:
            assert ex.prefix == 512 and text.startswith("                    GNU GENERAL PUBLIC LICENSE")


def test_haystack_helpers():
    units = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert take_tokens(units, 1, 7) == [[4, 5], [6, 7, 8, 9], [1]]            # cyclic, the last sentence cut
    assert take_tokens(units, 0, 12) == [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3]]
    ids, offs = insert_at_depths([[1, 1], [2, 2], [3, 3]], [([9], 0.0), ([8], 0.5), ([7], 1.0)])
    assert ids == [9, 1, 1, 8, 2, 2, 3, 3, 7] and offs == [0, 3, 8]
    with pytest.raises(ValueError, match="depth"):
        insert_at_depths([[1]], [([9], 1.5)])


def test_task_errors(char_tok):
    with pytest.raises(ValueError, match="too short"):
        make_example(char_tok, "passkey", 50, 0.5)
    with pytest.raises(ValueError, match="unknown task"):
        make_example(char_tok, "nope", 500, 0.5)
    with pytest.raises(ValueError, match="unknown ruler-lite subtask"):
        make_example(char_tok, "ruler-lite/xyz", 500, 0.5)


# ---- metrics --------------------------------------------------------------------------------------------------------
def test_example_score_is_the_task_metric():
    ruler = Example("ruler-lite/multivalue", [], [], ["123", "456", "789"], "string_match_all", 8, False)
    assert ruler.score("Keys: 123 and 456") == pytest.approx(2 / 3)
    assert Example("t", [], [], ["Ab", "cd"], "string_match_all", 8, False).score("AB") == 0.5   # case-insensitive
    contains = Example("passkey", [], [], ["Ab", "7"], "contains", 8, False)
    assert contains.score("the key is 7") == 1.0 and contains.score("ab") == 0.0     # any reference, case-sensitive


# ---- runner -----------------------------------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(task="passkey", policies=parse_policies("full,streaming,h2o,snapkv:window=4", probe_budget="0.5"),
                budgets=parse_budgets("0.5,64"), lengths=[320], depths=[0.0, 1.0], samples=1, seed=0,
                model_name="tiny")
    base.update(kw)
    return EvalConfig(**base)


def test_grid_shape_and_ids():
    cells = build_grid(_cfg())
    # full once per (length, depth, sample), the three budgeted policies at two budgets: 2 × (1 + 3·2) = 14
    assert len(cells) == 14 and len({c.id for c in cells}) == 14
    assert sum(c.policy.name == "full" for c in cells) == 2
    assert build_grid(_cfg())[5].id == cells[5].id                             # ids are stable
    assert {c.id for c in build_grid(_cfg(seed=1))}.isdisjoint({c.id for c in cells})
    ruler = build_grid(_cfg(task="ruler-lite", policies=parse_policies("full")))
    assert sorted({c.task for c in ruler}) == ["ruler-lite/cwe", "ruler-lite/multikey", "ruler-lite/multivalue",
                                               "ruler-lite/vt"]
    assert len(ruler) == 2 + 2 + 1 + 1                                          # vt and cwe ignore depths


def test_policy_specs():
    specs = parse_policies("full,corm:w=8:r=16,snapkv:window=4")
    assert [s.takes_budget for s in specs] == [False, False, True]
    assert dict(specs[1].options) == {"w": 8, "r": 16}
    spaced = parse_policies("corm w=8 r=16")                                   # bench's and compare's spaces work too
    assert (spaced[0].name, dict(spaced[0].options)) == ("corm", {"w": 8, "r": 16})
    common = parse_policies("full,h2o,snapkv", {"window": 8})                 # --option: only where it applies
    assert [dict(s.options) for s in common] == [{}, {}, {"window": 8}]
    with pytest.raises(ValueError, match="none of the policies"):
        parse_policies("full,h2o", {"window": 8})
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        parse_policies("full,nope")
    with pytest.raises(ValueError, match="budget"):
        parse_budgets("0.2,-3")


def test_run_resume_after_interruption(tmp_path, char_tok, monkeypatch, capsys):
    torch.manual_seed(0)
    model = tiny_model()
    cfg = _cfg()
    total = len(build_grid(cfg))
    calls = []
    real = runner.run_cell

    def interrupted(*a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(a[2].id)
        return real(*a, **k)

    monkeypatch.setattr(runner, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(model, char_tok, cfg, tmp_path, progress=False)
    assert len(R.read_records(tmp_path)) == 5
    calls.clear()
    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: (calls.append(a[2].id), real(*a, **k))[1])
    out = run_grid(model, char_tok, cfg, tmp_path, progress=False)
    assert out["ran"] == total - 5 and out["skipped"] == 5 and len(calls) == total - 5
    calls.clear()
    again = run_grid(model, char_tok, cfg, tmp_path, progress=False)              # nothing left to do
    assert again["ran"] == 0 and calls == [] and len(again["records"]) == total
    assert len(R.read_records(tmp_path)) == total

    recs = again["records"]
    fields = {"task", "policy", "options", "budget", "cache_ratio", "score", "prompt_tokens", "new_tokens", "wall_s",
              "peak_memory_bytes", "model", "minikv_version", "seed", "question", "chat", "id"}
    for r in recs:
        assert fields <= set(r) and not r.get("error"), r
        assert r["question"] == "aware" and r["prompt_tokens"] == 320 and 0 <= r["score"] <= 1
        assert r["peak_memory_bytes"] > 0
    full = [r for r in recs if r["policy"] == "full"]
    assert all(r["cache_ratio"] == 1.0 and r["budget"] is None for r in full)
    small = [r for r in recs if r["policy"] == "streaming" and r["budget"] == "64"]
    assert all(r["cache_ratio"] < 0.3 for r in small)
    table = R.markdown_table(recs, cfg.budgets, [s.label for s in cfg.policies])
    assert "| policy | budget 0.5 | budget 64 |" in table
    assert table.count("| full |") == 1 and "| snapkv:window=4 |" in table

    # A truncated last line (killed mid-write) is ignored, and the next record starts on a fresh line.
    with open(tmp_path / R.RECORDS, "a") as f:
        f.write('{"id": "half')
    assert len(R.read_records(tmp_path)) == total
    R.append_record(tmp_path, dict(recs[0], id="x"))
    assert len(R.read_records(tmp_path)) == total + 1
    capsys.readouterr()
    R.read_records(tmp_path, warn=True)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"minikv eval: warning: {tmp_path / R.RECORDS}:{total + 1}: not "
                                                   f"valid JSON, e.g. cut off")


def test_question_agnostic_and_errors_recorded(tmp_path, char_tok):
    model = tiny_model()
    cfg = _cfg(policies=parse_policies("full,snapkv:window=4"), budgets=["0.5", "2"], depths=[0.5],
               question="agnostic")
    out = run_grid(model, char_tok, cfg, tmp_path, progress=False)
    ok = [r for r in out["records"] if not r.get("error")]
    assert all(r["question"] == "agnostic" for r in out["records"])
    assert all(r["context_tokens"] + r["question_tokens"] == 320 and r["question_tokens"] > 0 for r in ok)
    # budget 2 < snapkv window 4: the cell fails with a clear error record instead of stopping the grid
    err = [r for r in out["records"] if r.get("error")]
    assert len(err) == 1 and "window" in err[0]["error"]


def test_ppl_teacher_forcing(char_tok):
    """full == one forward pass over the text; h2o with a budget >= the text never evicts and equals full;
    a small budget really evicts while decoding."""
    model = tiny_model(dtype=torch.float64)
    cfg = _cfg(task="ppl", policies=parse_policies("full,h2o,snapkv:window=4"), budgets=["400", "0.25"],
               lengths=[120], depths=[0.5], ppl_prefix=60)
    ex = make_example(char_tok, "ppl", 120, None, ppl_prefix=60)
    assert ex.prefix == 60 and len(ex.context) == 120
    ids = torch.tensor([ex.context])
    with torch.no_grad():
        logits = model(ids, model.new_cache(1))[0, :-1]                           # (119, vocab)
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[59:].sum()
    want = math.exp(float(nll) / 60)
    recs = {(c.policy.label, c.budget): runner.run_cell(model, char_tok, c, cfg) for c in build_grid(cfg)}
    assert recs[("full", None)]["score"] == pytest.approx(want, rel=1e-9)
    assert recs[("h2o", "400")]["score"] == pytest.approx(want, rel=1e-9)
    assert recs[("h2o", "400")]["cache_ratio"] == 1.0
    r = recs[("h2o", "0.25")]
    # 0.25 of the 120-token text = 30 entries; 119 tokens were fed (the last one is only a target)
    assert r["budget_entries"] == 30 and r["cache_ratio"] == pytest.approx(30 / 119) and r["policy_decodes"]
    assert r["score"] != pytest.approx(want)
    s = recs[("snapkv:window=4", "0.25")]                                         # prefix compressed to 15 of 60
    assert not s["policy_decodes"] and s["budget_entries"] == 15 and s["cache_ratio"] == pytest.approx(74 / 119)


# ---- plots and CLI -----------------------------------------------------------------------------------------------------
def test_plots(tmp_path, char_tok):
    pytest.importorskip("matplotlib")
    from minikv.tools.eval import plots
    model = tiny_model()
    cfg = _cfg(policies=parse_policies("full,h2o"), budgets=["0.5"], lengths=[300, 320], depths=[0.0, 1.0])
    recs = run_grid(model, char_tok, cfg, tmp_path, progress=False)["records"]
    for path in (plots.quality_vs_ratio(recs, tmp_path / "q.png"), plots.depth_heatmaps(recs, tmp_path / "h.png")):
        assert path.exists() and path.stat().st_size > 1000
    ex = make_example(char_tok, "passkey", 300, 0.5)
    from minikv.policies import get_policy
    kept = plots.surviving_positions(model, ex.ids, get_policy("h2o", 0.25), layer=1, head=0)
    assert len(kept) == 75 and kept == sorted(kept) and kept[-1] == 300      # + the first generated token
    p = plots.survival_strip([("h2o", kept), ("full", list(range(301)))], 301, tmp_path / "s.png", 1, 0,
                             [(ex.meta["needle_offsets"][0], ex.meta["needle_offsets"][0] + 10, "needle")])
    assert p.stat().st_size > 1000


def test_cli_eval(tmp_path, char_tok, monkeypatch, capsys):
    import minikv.tools.eval.cli as ecli
    from minikv.tools.cli import main
    model = tiny_model()
    monkeypatch.setattr(ecli, "load_model_and_tokenizer", lambda args: (model, char_tok))
    argv = ["eval", "--task", "passkey", "--policies", "full,streaming:n_sink=2", "--budgets", "0.3",
            "--lengths", "300", "--depths", "0.5", "--out", str(tmp_path), "--no-progress"]
    assert main(argv + (["--plot"] if _has_matplotlib() else [])) == 0
    out = capsys.readouterr()
    assert "| streaming:n_sink=2 |" in out.out and (tmp_path / "table.md").exists()
    assert len(R.read_records(tmp_path)) == 2
    if _has_matplotlib():
        assert (tmp_path / "quality_vs_ratio.png").stat().st_size > 0
        assert list(tmp_path.glob("survival_L*_H0.png"))
    assert main(argv) == 0 and "ran 0, skipped 2" in capsys.readouterr().err
    assert main(["eval", "--task", "passkey", "--policies", "nope", "--out", str(tmp_path)]) == 2
    assert main(argv[:-5] + ["--lengths", "20", "--out", str(tmp_path / "short")]) == 2      # prompt cannot fit
    assert "too short" in capsys.readouterr().err


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_depth_tasks_constant():
    assert DEPTH_TASKS == {"passkey", "needle", "ruler-lite/multikey", "ruler-lite/multivalue"}


def test_cpu_peak_memory_is_per_cell_on_linux():
    """On Linux a CPU cell's peak memory covers that cell only: a 256 MiB buffer touched after the reset shows up,
    and after a new reset (buffer freed) the peak is back below it."""
    R.reset_peak_memory("cpu")
    base, kind = R.peak_memory("cpu")
    if kind != "rss_peak_since_reset":
        pytest.skip(f"peak RSS cannot be reset here (kind {kind})")
    # A fresh anonymous mapping with every page written: new resident memory whatever the allocator already holds
    # (a bytearray may reuse heap pages that earlier tests left resident, and then RSS does not grow).
    big = mmap.mmap(-1, 256 * 2**20)
    for offset in range(0, len(big), mmap.PAGESIZE):
        big[offset] = 1
    after, _ = R.peak_memory("cpu")
    assert after - base >= 200 * 2**20, (base, after)
    big.close()
    R.reset_peak_memory("cpu")
    again, _ = R.peak_memory("cpu")
    assert again < after - 200 * 2**20, (after, again)


def test_ppl_windows_never_overlap(default_tokenizer):
    """Perplexity samples are disjoint windows of the text: the bootstrap interval treats them as independent, so a
    sample that would reuse text is refused, naming how many windows fit."""
    tok, length = default_tokenizer, 2000
    fit = len(prose_ids(tok)) // length
    windows = [make_example(tok, "ppl", length, None, sample=s) for s in range(fit)]
    starts = [w.meta["start"] for w in windows]
    assert starts == [s * length for s in range(fit)]                       # back to back, no overlap
    with pytest.raises(BadInput, match=f"holds {fit} disjoint windows of {length} tokens"):
        make_example(tok, "ppl", length, None, sample=fit)
