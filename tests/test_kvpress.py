"""(slow) NVIDIA kvpress and minikv keep the same positions on the default model (issue "Comparable results";
train_free.md §9): kvpress `SnapKVPress` (average pooling) = minikv `snapkv pooling=avg`, and kvpress
`ObservedAttentionPress` = minikv `h2o score=mean heavy_share=1.0`, per layer and KV head, on a 3,000-token passkey
prompt from minikv's own generator (question inside the prompt), 20% of it kept.

kvpress and transformers are not minikv dependencies and do not go into minikv's environment (CI's has transformers
but no kvpress, so this module skips there). Set up once, in a virtual environment of its own (the commands used):

    python3 -m venv /tmp/kvenv
    /tmp/kvenv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # a CPU build
    /tmp/kvenv/bin/pip install transformers==5.2.0 kvpress==0.5.5 pytest hypothesis safetensors sentencepiece

(kvpress 0.5.5 requires transformers>=4.56.0,<5.3; 5.2.0 is the newest it allows. Where the CPU index cannot be
reached, a torch 2.13.0+cpu wheel on pip's find-links does; kvpress may be given as its wheel file.) Then, from the
repository root, with minikv taken from the working tree rather than installed into that environment:

    PYTHONPATH=$PWD /tmp/kvenv/bin/python -m pytest -q -p no:cacheprovider tests/test_kvpress.py -m slow -s

(-s prints the measured Jaccards and score differences.) Measured on a shared 2-core CPU: Jaccard 1.0 on every one
of the 30 x 3 (layer, KV head) pairs for both presses (599 of 3,000 positions kept each), 3 min 38 s in all. What
runs on each side, and how kept positions are read back from kvpress's pruned cache: tests/kvpress_peer.py, whose
command line makes kvpress one side of `minikv compare` (the last test runs it; its --plot needs matplotlib there)."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (it is not a minikv dependency): set up "
                              "the environment in this module's docstring to compare against it")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (kvpress runs on it)")

from kvpress.utils import compute_n_kept                                         # noqa: E402

from kvpress_peer import differences, kvpress_run, minikv_run                    # noqa: E402
from minikv.tools.compare import jaccard                                          # noqa: E402
from minikv.policies import get_policy                                           # noqa: E402
from minikv.tools.eval.tasks import make_example                                 # noqa: E402

COMPRESSION_RATIO = 0.8        # kvpress's parameter: the share evicted; 20% is kept
SCORE_RTOL = 1e-4              # measured: 5.7e-7 (SnapKV), 2.3e-6 (observed attention), relative to a head's largest


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer):
    ex = make_example(default_tokenizer, "passkey", 3000, depth=0.5)
    return ex.ids                                                                # context + question


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    return model.eval()


def test_transformers_and_minikv_agree_on_the_model(hf_model, default_model, prompt_ids):
    """The same weights give the same logits (float32): what follows compares the policies, not two models."""
    ids = torch.tensor([prompt_ids[:64]])
    with torch.no_grad():
        theirs = hf_model(ids).logits[0]
        ours = default_model(ids, default_model.new_cache(1))[0]
    assert (theirs - ours).abs().max().item() < 1e-3 * theirs.abs().max().item()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def check_same_kept(name: str, theirs, ours, s_theirs, s_ours, n_kept: int, prefix_only: bool) -> None:
    """kvpress (theirs) and minikv (ours) kept the same n_kept positions in every (layer, KV head), allowing only
    swaps between entries whose scores tie; and the two sides' scores of each ranked entry agree."""
    assert {len(h) for layer in theirs for h in layer} == {n_kept}, f"{name}: kvpress kept other counts"
    assert {len(h) for layer in ours for h in layer} == {n_kept}, f"{name}: minikv kept other counts"
    # The definitions are equal, so the scores are, up to float32 rounding of two implementations. Compared where
    # both rank: snapkv's window is -inf in minikv (never ranked, always kept), max + 1 in kvpress (always kept).
    gaps = []
    for layer, (a, b) in enumerate(zip(s_theirs, s_ours)):
        ranked = torch.isfinite(b) if prefix_only else torch.ones_like(b, dtype=torch.bool)
        gap = (a - b).abs().where(ranked, 0).amax(-1) / a.where(ranked, 0).abs().amax(-1)   # per KV head
        assert bool((gap <= SCORE_RTOL).all()), f"{name}: layer {layer} scores differ by {gap.tolist()} (relative)"
        gaps.append(gap.max().item())
    # Kept sets. torch.topk (kvpress) and minikv's select_topk (the older position) break exact ties differently,
    # so a swap is accepted only between entries tied on both sides: each position kept by one side alone scores
    # the same, on each side, as that side's lowest kept score, to within twice the two sides' score difference in
    # that head (a real difference of definition would show as a gap far above rounding).
    for d in differences(theirs, ours, s_theirs, s_ours):
        a, b = s_theirs[d["layer"]][d["head"]], s_ours[d["layer"]][d["head"]]
        tol = 2 * (a - b)[torch.isfinite(b)].abs().max().item()
        for side, boundary in (("a_scores", d["a_boundary"]), ("b_scores", d["b_boundary"])):
            for v in d[side]["only_a"] + d[side]["only_b"]:
                assert abs(v - boundary) <= tol, f"{name}: not a tie: {d}"
    J = [x for layer in jaccard(theirs, ours) for x in layer]
    print(f"\n{name}: {len(J)} (layer, KV head) pairs, {n_kept} of {len(s_theirs[0][0])} kept each; Jaccard min "
          f"{min(J):.4f} mean {sum(J) / len(J):.4f}; largest relative score difference {max(gaps):.2e}")


def test_snapkv_avg_pooling_equals_kvpress_snapkv(hf_model, default_model, prompt_ids):
    """kvpress SnapKVPress on the sdpa model (it computes the window's attention itself,
    kvpress/presses/snapkv_press.py:42-69 in 0.5.5) vs minikv snapkv pooling=avg, window and kernel minikv's
    defaults (32, 7) on both sides. Budget: kvpress keeps n_kept = int(T * (1 - 0.8)) of the T keys of every head,
    window included (the window is padded with the largest score + 1, snapkv_press.py:103, so topk always takes
    it); minikv's budget counts the window too, and is given that count (a ratio 0.2 would round 3000 * 0.2 to
    600, kvpress's 1 - 0.8 = 0.19999999999999996 to 599)."""
    n_kept = compute_n_kept(len(prompt_ids), COMPRESSION_RATIO)
    policy = get_policy("snapkv", n_kept, pooling="avg")
    press = kvpress.SnapKVPress(compression_ratio=COMPRESSION_RATIO, window_size=policy.window,
                                kernel_size=policy.kernel)
    theirs, s_theirs = kvpress_run(hf_model, prompt_ids, press)
    ours, s_ours = minikv_run(default_model, prompt_ids, policy)
    check_same_kept("snapkv pooling=avg vs SnapKVPress", theirs, ours, s_theirs, s_ours, n_kept, prefix_only=True)


def test_h2o_mean_score_equals_kvpress_observed_attention(hf_model, default_model, prompt_ids):
    """kvpress ObservedAttentionPress (needs the eager attention's weights, observed_attention_press.py:43) vs minikv
    h2o score=mean heavy_share=1.0: all of the budget heavy (kvpress has no recent window), no sinks (the default).
    Budget: kvpress's n_kept of every head, given to minikv as a count. Prefill only: kvpress does not compress
    while decoding (kvpress/presses/base_press.py:144-146), minikv's h2o would."""
    n_kept = compute_n_kept(len(prompt_ids), COMPRESSION_RATIO)
    hf_model.set_attn_implementation("eager")
    try:
        theirs, s_theirs = kvpress_run(hf_model, prompt_ids, kvpress.ObservedAttentionPress(COMPRESSION_RATIO))
    finally:
        hf_model.set_attn_implementation("sdpa")
    policy = get_policy("h2o", n_kept, heavy_share=1.0, score="mean")
    ours, s_ours = minikv_run(default_model, prompt_ids, policy)
    check_same_kept("h2o score=mean heavy_share=1.0 vs ObservedAttentionPress", theirs, ours, s_theirs, s_ours,
                    n_kept, prefix_only=False)


def test_kvpress_as_a_side_of_minikv_compare(default_model_dir, prompt_ids, tmp_path, capsys):
    """The command-line path: `minikv compare --task passkey --samples 1 --out` writes its JSON (the same prompt as
    above), `tests/kvpress_peer.py` runs SnapKVPress on its prompt_ids and compares with its side A (snapkv
    pooling=avg at kvpress's count): Jaccard 1.0 in every (layer, KV head), printed and saved."""
    from kvpress_peer import main as peer
    from minikv.tools.cli import main as minikv
    n_kept, mk, kv = compute_n_kept(len(prompt_ids), COMPRESSION_RATIO), tmp_path / "mk.json", tmp_path / "kv.json"
    assert minikv(["compare", "--model", str(default_model_dir), "--task", "passkey", "--length", "3000", "--samples",
                   "1", "--a", f"snapkv {n_kept} pooling=avg", "--b", f"snapkv {n_kept}", "--out", str(mk)]) == 0
    ours = json.loads(mk.read_text())
    assert ours["prompt_ids"] == prompt_ids
    assert peer([str(mk), "--model", str(default_model_dir), "--ratio", "0.2", "--out", str(kv)]) == 0
    out, theirs = capsys.readouterr().out, json.loads(kv.read_text())
    assert theirs["prompt_ids"] == prompt_ids and theirs["spec"].startswith("kvpress 0.5.5 SnapKVPress")
    assert [x for layer in jaccard(theirs["kept"], ours["a"]["kept"]) for x in layer] == [1.0] * 90
    assert "| mean | 1 | 1 |" in out and f"{n_kept} of {len(prompt_ids)} positions" in out
