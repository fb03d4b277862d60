"""Tokenizers of a Hugging Face folder: byte-level BPE from `tokenizer.json`, SentencePiece from `tokenizer.model`.

The byte-level BPE is the `tokenizers` pipeline of GPT-2-style models (SmolLM2), id-for-id (tests/test_tokenizer.py):
added tokens cut out whole, optional `Digits(individual_digits=True)`, the GPT-2 regex, bytes -> GPT-2 alphabet, BPE
merges by rank. Unicode classes come from Python's `unicodedata` (characters newer than it may be classed otherwise)."""
from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache
from operator import itemgetter
from pathlib import Path

import sentencepiece

from minikv.io.hf_config import read_json_object
from minikv.errors import BadInput, NotFound, is_int
from minikv.io import require

SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

class UnsupportedTokenizer(BadInput, NotImplementedError):
    """A tokenizer feature minikv does not implement: a BadInput, and a NotImplementedError for callers that probe."""

def _is_id(value) -> bool:
    """A token id: a non-negative integer (JSON true/false are not ids)."""
    return is_int(value) and value >= 0

# ---- the GPT-2 pre-tokenizer, written with the stdlib `re` -----------------------------------------------------------
# Unicode White_Space, which is what `\s` means in Oniguruma (the regex engine of `tokenizers`). Python's `\s` and
# str.isspace() differ: they also accept U+001C..U+001F, which are not White_Space.
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                "\u2028\u2029\u202f\u205f\u3000")

@lru_cache(maxsize=None)
def _gpt2_patterns() -> tuple[re.Pattern, re.Pattern]:
    """(GPT-2 word regex, single-numeric-character regex), built once on first use (~0.3 s)."""
    # One character per code point, the first letter of its general category, built at C speed: its runs of "L"
    # (of "N") are the ranges of the class \p{L} (\p{N}).
    majors = "".join(map(itemgetter(0), map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))))
    L, N = ("".join(f"{re.escape(chr(m.start()))}-{re.escape(chr(m.end() - 1))}"
                    for m in re.finditer(f"{major}+", majors)) for major in "LN")
    S = re.escape(_WHITE_SPACE)  # \s
    # The GPT-2 pattern, alternative for alternative:
    #   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    # Python's `re` backtracks and tries alternatives left to right like Oniguruma, so the matches are the same.
    word = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")
    # Digits(individual_digits=True) isolates each char of Rust's char::is_numeric, i.e. categories Nd, Nl, No.
    return word, re.compile(f"([{N}])")

@lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the rest to U+0100 on."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    others = iter(range(256, 512))
    return {b: chr(b if b in keep else next(others)) for b in range(256)}

def _added_token_pattern(contents: list[str]) -> re.Pattern | None:
    """Leftmost-longest match of any added token (what `tokenizers` does with Aho-Corasick), as one group."""
    # At one start position re tries alternatives in order, so longest-first gives the longest match.
    return re.compile(f"({'|'.join(map(re.escape, sorted(contents, key=len, reverse=True)))})") if contents else None

def _split_on(pieces: list[tuple[str, bool]], pattern: re.Pattern | None) -> list[tuple[str, bool]]:
    """Cut the not-yet-added pieces wherever `pattern` matches; pieces are (text, is_added_token)."""
    if pattern is None:
        return pieces
    out = []
    for text, is_added in pieces:
        # split with one group alternates text between matches (even k, kept when non-empty) and matches (odd k).
        out += [(text, True)] if is_added else [(p, k % 2 == 1) for k, p in enumerate(pattern.split(text)) if p or k % 2]
    return out

# ---- reading tokenizer.json ------------------------------------------------------------------------------------------
def _checked_model(spec) -> dict:
    """The `model` object of a tokenizer.json dict, after checking the keys ByteLevelBPE reads (BadInput) and
    refusing the options and normalizers whose effect minikv does not reproduce (UnsupportedTokenizer)."""
    require(isinstance(spec, dict), f"tokenizer.json must hold a JSON object, got {type(spec).__name__}")
    model = spec.get("model")
    require(isinstance(model, dict), "tokenizer.json: 'model' is missing or not an object (expected "
                                      "{\"type\": \"BPE\", \"vocab\": {...}, \"merges\": [...]})")
    require(model.get("type", "BPE") == "BPE",
            f"tokenizer.json model type {model.get('type')!r} is not supported (only BPE)", UnsupportedTokenizer)
    vocab = model.get("vocab")
    require(isinstance(vocab, dict), "tokenizer.json: model.vocab is missing or not an object of token -> id")
    for token, i in ((t, i) for t, i in vocab.items() if not _is_id(i)):
        raise BadInput(f"tokenizer.json: model.vocab[{token!r}] must be a non-negative integer id, got {i!r}")
    require(isinstance(model.get("unk_token"), (str, type(None))),
            f"tokenizer.json: model.unk_token must be a token string or null, got {model.get('unk_token')!r}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "byte_fallback", "ignore_merges"):
        require(not model.get(key), f"tokenizer.json: BPE option {key}={model.get(key)!r} is not supported",
                UnsupportedTokenizer)
    for key, allowed in (("normalizer", ()), ("post_processor", ("ByteLevel",))):
        value = spec.get(key)
        kind = value.get("type") if isinstance(value, dict) else value
        require(value is None or kind in allowed, f"tokenizer.json {key} {kind!r} is not supported (supported: "
                f"{', '.join(allowed + ('null',))})", UnsupportedTokenizer)
    merges, added = model.get("merges") or [], spec.get("added_tokens") or []
    for name, value in (("model.merges", merges), ("added_tokens", added)):
        require(isinstance(value, list), f"tokenizer.json: {name} must be a list, got {type(value).__name__}")
    for k, tok in enumerate(added):
        require(isinstance(tok, dict) and isinstance(tok.get("content"), str) and _is_id(tok.get("id")),
                f"tokenizer.json: added_tokens[{k}] must be an object with a string 'content' and a "
                f"non-negative integer 'id', got {tok!r}")
        flag = next((f for f in ("lstrip", "rstrip", "single_word") if tok.get(f)), None)
        require(flag is None, f"tokenizer.json: added token {tok['content']!r} uses {flag}=true", UnsupportedTokenizer)
    return model

def _parse_pre_tokenizer(pre) -> tuple[bool, bool]:
    """(digits_individual, use_regex) for `ByteLevel` or `Sequence[Digits, ByteLevel]`; other kinds raise."""
    require(isinstance(pre, dict), f"tokenizer.json pre_tokenizer {'null' if pre is None else repr(pre)} is not "
            "supported (expected ByteLevel)", UnsupportedTokenizer)
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    require(isinstance(steps, list) and all(isinstance(step, dict) for step in steps),
            f"tokenizer.json: pre_tokenizer.pretokenizers must be a list of objects, got {steps!r}")
    kinds = [s.get("type") for s in steps]
    name = kinds[0] if len(kinds) == 1 else f"Sequence[{', '.join(map(str, kinds))}]"
    require(kinds in (["ByteLevel"], ["Digits", "ByteLevel"]), f"tokenizer.json pre_tokenizer {name} is not "
            "supported (supported: ByteLevel, Sequence[Digits, ByteLevel])", UnsupportedTokenizer)
    digits_individual = len(steps) == 2
    require(not digits_individual or steps[0].get("individual_digits", False),
            "tokenizer.json pre_tokenizer Digits(individual_digits=false) is not supported", UnsupportedTokenizer)
    require(not steps[-1].get("add_prefix_space", False),
            "tokenizer.json pre_tokenizer ByteLevel(add_prefix_space=true) is not supported", UnsupportedTokenizer)
    return digits_individual, bool(steps[-1].get("use_regex", True))

def _merge_ranks(merges: list, vocab: dict[str, int]) -> dict[tuple[str, str], int]:
    """Pair -> rank (lower merges first) from merges written as "a b" strings or [a, b] pairs."""
    ranks = {}
    for rank, merge in enumerate(merges):  # a plain loop: one message string per merge would cost 50k formats
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) if isinstance(merge, list) else ()
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair) or pair[0] + pair[1] not in vocab:
            raise BadInput(f"tokenizer.json: merge #{rank} {merge!r} must be \"a b\" or [\"a\", \"b\"], two tokens "
                           "whose concatenation is in the vocab")
        ranks.setdefault(pair, rank)
    return ranks

# ---- the tokenizers --------------------------------------------------------------------------------------------------
class _Tokenizer:
    """What both tokenizers share: `encode` puts BOS (`bos_id`, when `add_bos`) before the ids of `_encode`."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text -> ids; `add_bos` defaults to the tokenizer's own (SmolLM2 no, Llama-2 yes)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + self._encode(text)

class ByteLevelBPE(_Tokenizer):
    """GPT-2-style byte-level BPE from a `tokenizer.json` dict (pre-tokenizer `ByteLevel` or `Sequence[Digits,
    ByteLevel]`); anything else is an UnsupportedTokenizer naming it, a malformed spec a BadInput naming the key."""

    _CACHE_LIMIT = 200_000  # words; cleared when full so memory stays bounded on huge inputs

    def __init__(self, spec: dict, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool | None = None):
        model, added = _checked_model(spec), spec.get("added_tokens") or []
        self.digits_individual, self.use_regex = _parse_pre_tokenizer(spec.get("pre_tokenizer"))
        # The vocab plus the added tokens (which may have ids outside it).
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.unk_token = model.get("unk_token") or None
        require(self.unk_token is None or self.unk_token in self.vocab,
                f"tokenizer.json: unk_token {self.unk_token!r} is not in the vocab")
        for tok in added:
            self.vocab.setdefault(tok["content"], tok["id"])
        # An added token's own id wins over a vocab entry with the same text.
        self.id_to_str = {i: t for t, i in self.vocab.items()} | {t["id"]: t["content"] for t in added}
        require(bool(self.id_to_str), "tokenizer.json: the vocabulary is empty (model.vocab and added_tokens)")
        self.vocab_size = max(self.id_to_str) + 1  # ids are dense in practice; this is the embedding rows needed
        self.added_ids = {tok["content"]: tok["id"] for tok in added}
        self.special_tokens: dict[str, int] = {t["content"]: t["id"] for t in added if t.get("special")}
        self.special_ids = set(self.special_tokens.values())
        # `tokenizers` cuts out added tokens with normalized=false first, then those with normalized=true (matched
        # after the normalizer, which is null here); two passes resolve overlapping tokens the same way it does.
        self._added_raw = _added_token_pattern([t["content"] for t in added if not t.get("normalized", False)])
        self._added_norm = _added_token_pattern([t["content"] for t in added if t.get("normalized", False)])
        self.ranks = _merge_ranks(model.get("merges") or [], self.vocab)
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[int]] = {}
        for name, token in (("bos", bos_token), ("eos", eos_token)):
            require(token is None or token in self.vocab, f"{name} token {token!r} is not in the tokenizer's vocab")
        self.bos_id, self.eos_id = self.vocab.get(bos_token), self.vocab.get(eos_token)  # None when not given
        self.add_bos = bool(add_bos)  # the ByteLevel post-processor (the only one accepted) adds no BOS

    def token_to_id(self, token: str) -> int | None:
        """The id of a token (its text in the GPT-2 alphabet), None when it is not in the vocabulary."""
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token text of an id, None for an unknown id."""
        return self.id_to_str.get(token_id)

    def _encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS: added tokens are cut out (their id), the rest split into words for BPE."""
        word_re, numeric_re = _gpt2_patterns()
        ids = []
        for piece, is_added in _split_on(_split_on([(text, False)], self._added_raw), self._added_norm):
            if is_added:
                ids.append(self.added_ids[piece])
                continue
            # Digits runs before ByteLevel, so its cuts are hard boundaries for the regex (and its lookahead).
            for part in filter(None, numeric_re.split(piece) if self.digits_individual else [piece]):
                for word in word_re.findall(part) if self.use_regex else [part]:
                    ids += self._bpe(word)
        return ids

    def _bpe(self, word: str) -> list[int]:
        """One word: bytes -> GPT-2 alphabet -> merges by rank -> ids (cached per word)."""
        if word in self._cache:
            return self._cache[word]
        # A byte missing from the vocab (SmolLM2 lacks 21 of them, e.g. 0x04 and 0xF5-0xFF) becomes unk, or is
        # dropped when there is no unk token, *before* merging, as `tokenizers` does; its neighbours can merge.
        symbols = [c if c in self.vocab else self.unk_token for c in (self.byte_encoder[b] for b in word.encode())
                   if c in self.vocab or self.unk_token]
        while len(symbols) > 1:
            # The lowest-ranked adjacent pair merges next; every occurrence of it merges, left to right.
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                pair = i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best
                merged.append(symbols[i] + symbols[i + 1] if pair else symbols[i])
                i += 2 if pair else 1
            symbols = merged
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids = [self.vocab[s] for s in symbols]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text: join the tokens, map the GPT-2 alphabet back to bytes, decode UTF-8 (errors -> U+FFFD)."""
        out = bytearray()
        for i in map(int, ids):
            token = self.id_to_str.get(i)
            # Unknown ids are skipped like `tokenizers` does (models may pad the embedding past the vocab).
            if token is None or (skip_special_tokens and i in self.special_ids):
                continue
            try:
                out.extend(self.byte_decoder[c] for c in token)
            except KeyError:  # a token outside the byte alphabet (an added token like "<|im_end|>" is inside it)
                out.extend(token.encode("utf-8"))
        return out.decode("utf-8", errors="replace")

class SentencePieceTokenizer(_Tokenizer):
    """A `tokenizer.model` (SentencePiece), Llama-2 style: BOS by default, control tokens in the text as tokens."""

    def __init__(self, path: str | Path, add_bos: bool = True):
        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise BadInput(f"{self.path}: not a valid SentencePiece model ({e})") from e
        self.add_bos, self.vocab_size = add_bos, self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = (i if i >= 0 else None
                                                 for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()))
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.special_ids = set(self.special_tokens.values())
        self._control_re = _added_token_pattern(list(self.special_tokens))

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece, None when it is not in the model."""
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only the unk piece itself may map to it.
        return None if i == self.unk_id and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        """The piece of an id, None for an id outside the model."""
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def _encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS: control tokens written in the text by their id, the rest by SentencePiece."""
        return [i for piece, is_control in _split_on([(text, False)], self._control_re)
                for i in ([self.special_tokens[piece]] if is_control else self.sp.encode(piece, out_type=int))]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text; control tokens are written as their text unless skipped (SentencePiece alone drops them)."""
        out, run = [], []
        for i in map(int, ids):
            if i in self.special_ids:
                out += [self.sp.decode(run)] + ([] if skip_special_tokens else [self.sp.id_to_piece(i)])
                run = []
            elif 0 <= i < self.vocab_size:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

# ---- loading a folder ------------------------------------------------------------------------------------------------
def _token_text(value, source: str) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}; anything else is refused."""
    text = value.get("content") if isinstance(value, dict) else value
    require(text is None or isinstance(text, str), f"{source} must be a token string, {{\"content\": ...}} or null, "
                                                    f"got {value!r}")
    return text

def load_tokenizer(folder: str | Path):
    """The tokenizer of a folder: `tokenizer.model` (SentencePiece, Llama-2 family) when there is one, else the
    byte-level BPE of `tokenizer.json`. BOS/EOS: `tokenizer_config.json`'s tokens, else `config.json`'s ids. A
    malformed file is a BadInput naming it."""
    folder = Path(folder)
    require(not folder.exists() or folder.is_dir(),
            f"model folder {folder} is a file; give the folder that holds the tokenizer files")
    json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    tc_path = folder / "tokenizer_config.json"
    require(json_path.exists() or model_path.exists(),
            f"{folder}: no tokenizer found (expected tokenizer.json or tokenizer.model)", NotFound)
    tok_config = read_json_object(tc_path) if tc_path.exists() else {}
    add_bos = tok_config.get("add_bos_token")
    require(add_bos is None or isinstance(add_bos, bool),
            f"{tc_path}: add_bos_token must be true, false or null, got {add_bos!r}")
    if model_path.exists():
        return SentencePieceTokenizer(model_path, add_bos=True if add_bos is None else add_bos)
    bos, eos = (_token_text(tok_config.get(f"{k}_token"), f"{tc_path}: {k}_token") for k in ("bos", "eos"))
    spec = read_json_object(json_path)
    try:
        tok = ByteLevelBPE(spec, bos_token=bos, eos_token=eos, add_bos=add_bos)
    except BadInput as e:  # name the file; keep the class (UnsupportedTokenizer stays a NotImplementedError)
        raise type(e)(f"{json_path}: {str(e).removeprefix('tokenizer.json: ').removeprefix('tokenizer.json ')}") from None
    # Without tokenizer_config.json's token, config.json's id names it (the first of a list).
    model_config = read_json_object(folder / "config.json") if (folder / "config.json").exists() else {}
    for name, token in (("bos", bos), ("eos", eos)):
        i = model_config.get(f"{name}_token_id")
        i = (i or [None])[0] if isinstance(i, list) else i
        if token is None and _is_id(i) and tok.id_to_token(i) is not None:
            setattr(tok, f"{name}_id", i)
    return tok

# ---- chat formats ----------------------------------------------------------------------------------------------------
def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A conversation as prompt text: ChatML (SmolLM2) with `<|im_start|>`, `[INST] ... [/INST]` with SentencePiece."""
    for m in messages:
        require(isinstance(m, dict) and "role" in m and "content" in m,
                f"chat message must be a dict with 'role' and 'content', got {m!r}")
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _llama2_chat(tokenizer, messages)
    require(tokenizer.token_to_id("<|im_start|>") is not None,
            "no chat format known for this tokenizer (expected <|im_start|> or SentencePiece)", UnsupportedTokenizer)
    # ChatML as SmolLM2-Instruct's own template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, the
    # default system message only before a first non-system message.
    first_is_system = messages and messages[0]["role"] == "system"
    system = [] if not messages or first_is_system else [{"role": "system", "content": SMOLLM_DEFAULT_SYSTEM}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in system + list(messages))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

def _llama2_chat(tokenizer: SentencePieceTokenizer, messages: list[dict]) -> str:
    """Llama-2-chat (Hugging Face): `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`."""
    bos, eos = tokenizer.sp.id_to_piece(tokenizer.bos_id), tokenizer.sp.id_to_piece(tokenizer.eos_id)
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = ""
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        require(m["role"] == expected, f"Llama-2 chat: message {k} has role {m['role']!r}, expected {expected!r} "
                                        "(roles must alternate user/assistant after an optional system message)")
        content = m["content"] if k > 0 or system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}"
        text += f"{bos}[INST] {content.strip()} [/INST]" if expected == "user" else f" {content.strip()} {eos}"
    return text

def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a conversation: the rendered template, encoded without an extra BOS (the template has it)."""
    return tokenizer.encode(apply_chat_template(tokenizer, messages, add_generation_prompt), add_bos=False)

def chat_stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: `<|im_end|>` for ChatML, EOS otherwise."""
    return list(dict.fromkeys(i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id) if i is not None))

# ---- writing a standard tokenizer.json from GGUF metadata (used by the converter) ------------------------------------
GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte

def build_bpe_tokenizer_json(tokens: list[str], merges: list[str], token_types: list[int], bos_id: int, eos_id: int,
                             unk_id: int | None, *, digits_individual: bool = True) -> dict:
    """A standard byte-level BPE `tokenizer.json` dict from GGUF metadata (`tokenizer.ggml.tokens`, `.merges`,
    `.token_type`); control tokens and BOS/EOS/UNK become special added tokens."""
    require(len(tokens) == len(token_types), f"{len(tokens)} tokens but {len(token_types)} token types")
    require(len(set(tokens)) == len(tokens), "token list has duplicates")
    for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
        require(i is None or 0 <= i < len(tokens), f"{name}={i} is outside the vocabulary of {len(tokens)} tokens")
    special = {i for i, t in enumerate(token_types) if t == GGUF_TOKEN_TYPE_CONTROL}
    special |= {i for i in (bos_id, eos_id, unk_id) if i is not None}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    steps = ([{"type": "Digits", "individual_digits": True}] if digits_individual else []) + [byte_level]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in sorted(special)],
        "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)}}

def build_tokenizer_config(tokens: list[str], bos_id: int, eos_id: int, unk_id: int | None,
                           chat_template: str | None = None, add_bos_token: bool = False,
                           model_max_length: int | None = None) -> dict:
    """A `tokenizer_config.json` dict naming the BOS/EOS/UNK tokens and the chat template (as Hugging Face does)."""
    config = {"add_bos_token": add_bos_token, "add_prefix_space": False, "bos_token": tokens[bos_id],
              "eos_token": tokens[eos_id], "unk_token": tokens[unk_id] if unk_id is not None else None,
              "pad_token": tokens[eos_id], "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer"}
    optional = {"chat_template": chat_template, "model_max_length": model_max_length}
    return config | {k: v for k, v in optional.items() if v is not None}
