"""Tokenizers: byte-level BPE read from a Hugging Face `tokenizer.json`, SentencePiece from `tokenizer.model`.

Core dependencies only (stdlib + `sentencepiece`). The byte-level BPE reproduces the Hugging Face `tokenizers`
pipeline for GPT-2-style models (SmolLM2, the default model):
  1. added/special tokens are cut out of the text as whole tokens,
  2. `Digits(individual_digits=True)` isolates every numeric character (when the JSON asks for it),
  3. the GPT-2 regex splits each remaining piece into words,
  4. each word's UTF-8 bytes are mapped to the GPT-2 printable-unicode alphabet,
  5. BPE merges are applied by rank.
`tests/test_tokenizer.py` checks it id-for-id against the `tokenizers` library.

Unicode classes (`\\p{L}`, `\\p{N}`, `\\s`) come from Python's `unicodedata`, so characters assigned in a newer
Unicode version than the running Python knows can be classified differently from `tokenizers` (Oniguruma).
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from minikv.config import read_json_object
from minikv.errors import BadInput, MissingExtra, NotFound

SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"



class UnsupportedTokenizer(BadInput, NotImplementedError):
    """A tokenizer feature minikv does not implement: refused input for the CLI (BadInput), and still a
    NotImplementedError for callers that probe support (e.g. whether a chat format exists)."""


# --------------------------------------------------------------------------------------------------------------------
# GPT-2 pre-tokenizer, written with the stdlib `re`
# --------------------------------------------------------------------------------------------------------------------

# Unicode White_Space, which is what `\s` means in Oniguruma (the regex engine of `tokenizers`). Python's `\s` and
# str.isspace() differ: they also accept U+001C..U+001F, which are not White_Space.
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
                "\u2028\u2029\u202f\u205f\u3000")


def _char_classes() -> dict[str, str]:
    """Bodies of `[...]` character classes for \\p{L} and \\p{N}: runs of code points by major general category."""
    # One character per code point, the first letter of its category ("L", "N", ...), built at C speed; its runs
    # of "L" (or "N") are the ranges of the class.
    majors = "".join(map(itemgetter(0), map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))))
    classes = {}
    for major in "LN":
        classes[major] = "".join(f"{re.escape(chr(m.start()))}-{re.escape(chr(m.end() - 1))}"
                                 for m in re.finditer(f"{major}+", majors))
    return classes


@lru_cache(maxsize=None)
def _gpt2_patterns() -> tuple[re.Pattern, re.Pattern]:
    """(GPT-2 word regex, single-numeric-character regex), built once on first use (~0.3 s)."""
    classes = _char_classes()
    L = classes["L"]              # \p{L}: Lu Ll Lt Lm Lo
    N = classes["N"]              # \p{N}: Nd Nl No
    S = re.escape(_WHITE_SPACE)   # \s
    # The GPT-2 pattern, alternative for alternative:
    #   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    # Python's `re` backtracks and tries alternatives left to right like Oniguruma, so the matches are the same.
    word = re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
    )
    # Digits(individual_digits=True) isolates each char of Rust's char::is_numeric, i.e. categories Nd, Nl, No.
    numeric = re.compile(f"([{N}])")
    return word, numeric


@lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the rest to U+0100+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _split_on(pieces: list[tuple[str, bool]], pattern: re.Pattern | None) -> list[tuple[str, bool]]:
    """Cut the not-yet-special pieces wherever `pattern` matches; pieces are (text, is_added_token)."""
    if pattern is None:
        return pieces
    out = []
    for text, is_added in pieces:
        if is_added:
            out.append((text, True))
            continue
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], False))
            out.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], False))
    return out


def _added_token_pattern(contents: list[str]) -> re.Pattern | None:
    """Leftmost-longest match of any added token (what `tokenizers` does with Aho-Corasick)."""
    if not contents:
        return None
    # At one start position re tries alternatives in order, so longest-first gives the longest match.
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


# --------------------------------------------------------------------------------------------------------------------
# Byte-level BPE
# --------------------------------------------------------------------------------------------------------------------

class ByteLevelBPE:
    """GPT-2-style byte-level BPE from a Hugging Face `tokenizer.json` dict (model type BPE).

    Supported pre-tokenizers: `ByteLevel` alone, or `Sequence[Digits, ByteLevel]`; anything else raises
    UnsupportedTokenizer (a BadInput and a NotImplementedError) naming it. A malformed spec is a BadInput naming the
    key.
    """

    _CACHE_LIMIT = 200_000  # words; cleared when full so memory stays bounded on huge inputs

    def __init__(self, spec: dict, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool | None = None):
        model = _checked_spec(spec)
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
            if model.get(key):
                raise UnsupportedTokenizer(f"tokenizer.json: BPE option {key}={model[key]!r} is not supported")
        if model.get("byte_fallback"):
            raise UnsupportedTokenizer("tokenizer.json: BPE byte_fallback is not supported (not a byte-level BPE)")
        if spec.get("normalizer") is not None:
            raise UnsupportedTokenizer(
                f"tokenizer.json normalizer {spec['normalizer'].get('type')!r} is not supported (only null)")

        self.digits_individual, self.use_regex = _parse_pre_tokenizer(spec.get("pre_tokenizer"))

        # Vocabulary: the model's vocab plus added tokens (which may have ids outside it, as in Llama 3).
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.ignore_merges = bool(model.get("ignore_merges", False))
        self.unk_token = model.get("unk_token") or None
        if self.unk_token is not None and self.unk_token not in self.vocab:
            raise BadInput(f"tokenizer.json: unk_token {self.unk_token!r} is not in the vocab")
        self.unk_id = self.vocab.get(self.unk_token) if self.unk_token else None
        added = spec.get("added_tokens") or []
        for tok in added:
            for flag in ("lstrip", "rstrip", "single_word"):
                if tok.get(flag):
                    raise UnsupportedTokenizer(f"tokenizer.json: added token {tok['content']!r} uses {flag}=true")
            self.vocab.setdefault(tok["content"], tok["id"])
        self.id_to_str: dict[int, str] = {i: t for t, i in self.vocab.items()}
        for tok in added:  # an added token's own id wins over a vocab entry with the same text
            self.id_to_str[tok["id"]] = tok["content"]
        if not self.id_to_str:
            raise BadInput("tokenizer.json: the vocabulary is empty (model.vocab and added_tokens)")
        self.vocab_size = max(self.id_to_str) + 1  # ids are dense in practice; this is the embedding rows needed
        self.added_ids = {tok["content"]: tok["id"] for tok in added}
        self.special_tokens: dict[str, int] = {t["content"]: t["id"] for t in added if t.get("special")}
        self.special_ids = set(self.special_tokens.values())
        # `tokenizers` cuts out added tokens with normalized=false first, then those with normalized=true (matched
        # after the normalizer, which is null here); two passes resolve overlapping tokens the same way it does.
        self._added_raw = _added_token_pattern([t["content"] for t in added if not t.get("normalized", False)])
        self._added_norm = _added_token_pattern([t["content"] for t in added if t.get("normalized", False)])

        # Merge ranks: pair -> rank (lower merges first). Merges may be "a b" strings or [a, b] pairs.
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(model.get("merges") or []):
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2:
                raise BadInput(f"tokenizer.json: merge #{rank} {merge!r} is not a pair of tokens")
            if pair[0] + pair[1] not in self.vocab:
                raise BadInput(f"tokenizer.json: merge #{rank} {merge!r} makes a token missing from the vocab")
            self.ranks.setdefault(pair, rank)

        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[int]] = {}

        for name, token in (("bos", bos_token), ("eos", eos_token)):
            if token is not None and token not in self.vocab:
                raise BadInput(f"{name} token {token!r} is not in the tokenizer's vocabulary")
        self.bos_id = self.vocab.get(bos_token) if bos_token else None
        self.eos_id = self.vocab.get(eos_token) if eos_token else None
        # Hugging Face fast tokenizers add BOS through a TemplateProcessing post-processor (Llama 3); the
        # ByteLevel post-processor of SmolLM2 adds nothing.
        template_bos = _template_bos(spec.get("post_processor"))
        if self.bos_id is None and template_bos is not None:
            self.bos_id = self.vocab.get(template_bos)
        self.add_bos = (template_bos is not None) if add_bos is None else add_bos

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "ByteLevelBPE":
        """Read a `tokenizer.json`; a file that is not valid JSON is a ValueError naming it."""
        return cls(_read_json(Path(path)), **kwargs)

    # --- vocabulary ------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.id_to_str.get(token_id)

    # --- encoding --------------------------------------------------------------------------------------------------
    def pre_tokenize(self, text: str) -> list[tuple[str, bool]]:
        """Steps 1-3: split text into (piece, is_added_token); non-added pieces are GPT-2 words."""
        word_re, numeric_re = _gpt2_patterns()
        pieces = _split_on(_split_on([(text, False)], self._added_raw), self._added_norm)
        words = []
        for piece, is_added in pieces:
            if is_added:
                words.append((piece, True))
                continue
            # Digits runs before ByteLevel, so its cuts are hard boundaries for the regex (and its lookahead).
            parts = numeric_re.split(piece) if self.digits_individual else [piece]
            for part in parts:
                if not part:
                    continue
                if self.use_regex:
                    words.extend((w, False) for w in word_re.findall(part))
                else:
                    words.append((part, False))
        return words

    def encode(self, text: str, add_bos: bool | None = None, *, add_special_tokens: bool | None = None) -> list[int]:
        """Text -> ids. `add_bos` (Hugging Face spelling: `add_special_tokens`) defaults to what the tokenizer
        does itself: nothing for SmolLM2."""
        if add_special_tokens is not None:
            add_bos = add_special_tokens
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else []
        for word, is_added in self.pre_tokenize(text):
            if is_added:
                ids.append(self.added_ids[word])
            else:
                ids.extend(self._bpe(word))
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Steps 4-5 for one word: bytes -> GPT-2 alphabet -> merges by rank -> ids (cached per word)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
        joined = "".join(chars)
        if self.ignore_merges and joined in self.vocab:  # Llama 3 style: whole words in the vocab skip merging
            symbols = [joined]
        else:
            # A byte missing from the vocab (SmolLM2 lacks 21 of them, e.g. 0x04 and 0xF5-0xFF) becomes unk, or is
            # dropped when there is no unk token, *before* merging, as `tokenizers` does; its neighbours can merge.
            symbols = [c if c in self.vocab else self.unk_token for c in chars if c in self.vocab or self.unk_token]
        while len(symbols) > 1:
            # The lowest-ranked adjacent pair merges next; every occurrence of it merges, left to right.
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab[s] for s in symbols]
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    # --- decoding --------------------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text: join the tokens, map the GPT-2 alphabet back to bytes, decode UTF-8 (errors -> U+FFFD)."""
        out = bytearray()
        for i in ids:
            i = int(i)
            token = self.id_to_str.get(i)
            # Unknown ids are skipped like `tokenizers` does (models may pad the embedding past the vocab).
            if token is None or (skip_special_tokens and i in self.special_ids):
                continue
            try:
                out.extend(self.byte_decoder[c] for c in token)
            except KeyError:  # a token outside the byte alphabet (an added token like "<|im_end|>" is inside it)
                out.extend(token.encode("utf-8"))
        return out.decode("utf-8", errors="replace")


def _checked_spec(spec) -> dict:
    """The `model` object of a tokenizer.json dict, after checking the keys ByteLevelBPE reads have the right kinds."""
    if not isinstance(spec, dict):
        raise BadInput(f"tokenizer.json must hold a JSON object, got {type(spec).__name__}")
    for key in ("normalizer", "pre_tokenizer", "post_processor"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise BadInput(f"tokenizer.json: {key} must be an object or null, got {spec[key]!r}")
    model = spec.get("model")
    if not isinstance(model, dict):
        raise BadInput("tokenizer.json: 'model' is missing or not an object (expected {\"type\": \"BPE\", "
                       "\"vocab\": {...}, \"merges\": [...]})")
    if model.get("type", "BPE") != "BPE":
        raise UnsupportedTokenizer(f"tokenizer.json model type {model.get('type')!r} is not supported (only BPE)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise BadInput("tokenizer.json: model.vocab is missing or not an object of token -> id")
    for token, i in vocab.items():
        if not _is_id(i):
            raise BadInput(f"tokenizer.json: model.vocab[{token!r}] must be a non-negative integer id, got {i!r}")
    if model.get("unk_token") is not None and not isinstance(model["unk_token"], str):
        raise BadInput(f"tokenizer.json: model.unk_token must be a token string or null, got {model['unk_token']!r}")
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise BadInput(f"tokenizer.json: model.merges must be a list, got {type(merges).__name__}")
    for rank, merge in enumerate(merges):
        if not (isinstance(merge, str) or (isinstance(merge, list) and all(isinstance(m, str) for m in merge))):
            raise BadInput(f"tokenizer.json: merge #{rank} {merge!r} must be \"a b\" or [\"a\", \"b\"]")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list):
        raise BadInput(f"tokenizer.json: added_tokens must be a list, got {type(added).__name__}")
    for k, tok in enumerate(added):
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not _is_id(tok.get("id")):
            raise BadInput(f"tokenizer.json: added_tokens[{k}] must be an object with a string 'content' and a "
                           f"non-negative integer 'id', got {tok!r}")
    return model


def _is_id(value) -> bool:
    """A token id: a non-negative int (JSON true/false are not ids)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_pre_tokenizer(pre: dict | None) -> tuple[bool, bool]:
    """(digits_individual, use_regex) for `ByteLevel` or `Sequence[Digits, ByteLevel]`; other kinds raise."""
    if pre is None:
        raise UnsupportedTokenizer("tokenizer.json pre_tokenizer null is not supported (expected ByteLevel)")
    steps = _pre_tokenizer_steps(pre)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        digits_individual, byte_level = False, steps[0]
    elif kinds == ["Digits", "ByteLevel"]:
        if not steps[0].get("individual_digits", False):
            raise UnsupportedTokenizer("tokenizer.json pre_tokenizer Digits(individual_digits=false) is not supported")
        digits_individual, byte_level = True, steps[1]
    else:
        name = kinds[0] if len(kinds) == 1 else f"Sequence[{', '.join(map(str, kinds))}]"
        raise UnsupportedTokenizer(f"tokenizer.json pre_tokenizer {name} is not supported "
                                  "(supported: ByteLevel, Sequence[Digits, ByteLevel])")
    if byte_level.get("add_prefix_space", False):
        raise UnsupportedTokenizer("tokenizer.json pre_tokenizer ByteLevel(add_prefix_space=true) is not supported")
    return digits_individual, bool(byte_level.get("use_regex", True))


def _pre_tokenizer_steps(pre: dict) -> list[dict]:
    """The steps of a pre_tokenizer (a Sequence's list, or the one step), each checked to be an object."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise BadInput(f"tokenizer.json: pre_tokenizer.pretokenizers must be a list of objects, got {steps!r}")
    return steps


def _template_bos(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single sequence, if any."""
    if not isinstance(post, dict):
        return None
    if post.get("type") == "Sequence":
        for p in post.get("processors") or []:
            found = _template_bos(p)
            if found is not None:
                return found
        return None
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        first = single[0] if isinstance(single, list) and single and isinstance(single[0], dict) else {}
        special = first.get("SpecialToken")
        if isinstance(special, dict) and isinstance(special.get("id"), str):
            return special["id"]
    return None


# --------------------------------------------------------------------------------------------------------------------
# SentencePiece (Llama-2 family)
# --------------------------------------------------------------------------------------------------------------------

class SentencePieceTokenizer:
    """A `tokenizer.model` (SentencePiece) with the Llama-2 conventions: BOS added by default, control tokens
    written in the text (`<s>`, `</s>`) are encoded as those tokens, like the Hugging Face Llama tokenizer does."""

    def __init__(self, path: str | Path, add_bos: bool = True):
        try:
            import sentencepiece as spm
        except ImportError:
            raise MissingExtra(f"{path} is a SentencePiece model; pip install sentencepiece to read it") from None

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise BadInput(f"{self.path}: not a valid SentencePiece model ({e})") from e
        self.add_bos = add_bos
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.special_ids = set(self.special_tokens.values())
        self._control_re = _added_token_pattern(list(self.special_tokens))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only the unk piece itself may map to it.
        return None if i == self.unk_id and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def encode(self, text: str, add_bos: bool | None = None, *, add_special_tokens: bool | None = None) -> list[int]:
        """Text -> ids, with BOS first by default (Llama-2 convention)."""
        if add_special_tokens is not None:
            add_bos = add_special_tokens
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None else []
        for piece, is_control in _split_on([(text, False)], self._control_re):
            ids.extend([self.special_tokens[piece]] if is_control else self.sp.encode(piece, out_type=int))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text; control tokens are written as their text unless skipped (SentencePiece alone drops them)."""
        out, run = [], []
        for i in map(int, ids):
            if i in self.special_ids:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(i))
            elif 0 <= i < self.vocab_size:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


# --------------------------------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing, unreadable, non-UTF-8, invalid or non-object file is named."""
    return read_json_object(path)


def _token_text(value, source: str) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}; anything else is refused."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise BadInput(f"{source} must be a token string, {{\"content\": ...}} or null, got {value!r}")
    return text


def _config_token_id(value) -> int | None:
    """config.json's bos/eos id (the first of a list); the model config's own checks name wrong kinds."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if _is_id(value) else None


def load_tokenizer(folder: str | Path):
    """The tokenizer of a Hugging Face folder: `tokenizer.json` (byte-level BPE) or `tokenizer.model` (SentencePiece).

    BOS/EOS come from `tokenizer_config.json` (bos_token / eos_token), else from `config.json` (bos_token_id /
    eos_token_id). When both tokenizer files exist, `tokenizer.json` is used if it is byte-level (Llama-2 folders
    ship a non-byte-level one next to their `tokenizer.model`). A malformed file is a BadInput naming it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"model folder {folder} is a file; give the folder that holds the tokenizer files")
    json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if not json_path.exists() and not model_path.exists():
        raise NotFound(f"{folder}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    tc_path = folder / "tokenizer_config.json"
    tok_config = _read_json(tc_path) if tc_path.exists() else {}
    model_config = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    add_bos = tok_config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise BadInput(f"{tc_path}: add_bos_token must be true, false or null, got {add_bos!r}")

    spec = _read_json(json_path) if json_path.exists() else None
    if spec is not None and (not model_path.exists() or _is_byte_level(spec)):
        bos = _token_text(tok_config.get("bos_token"), f"{tc_path}: bos_token")
        eos = _token_text(tok_config.get("eos_token"), f"{tc_path}: eos_token")
        try:
            model = _checked_spec(spec)
            id_to_token = {i: t for t, i in model["vocab"].items()}
            id_to_token.update({t["id"]: t["content"] for t in spec.get("added_tokens") or []})
            if bos is None:
                bos = id_to_token.get(_config_token_id(model_config.get("bos_token_id")))
            if eos is None:
                eos = id_to_token.get(_config_token_id(model_config.get("eos_token_id")))
            return ByteLevelBPE(spec, bos_token=bos, eos_token=eos, add_bos=add_bos)
        except BadInput as e:  # name the file; keep the class (UnsupportedTokenizer stays a NotImplementedError)
            raise type(e)(f"{json_path}: {str(e).removeprefix('tokenizer.json: ').removeprefix('tokenizer.json ')}") \
                from None
    return SentencePieceTokenizer(model_path, add_bos=True if add_bos is None else add_bos)


def _is_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json's pre-tokenizer has a ByteLevel step (a malformed one is not)."""
    pre = spec.get("pre_tokenizer") if isinstance(spec, dict) else None
    if not isinstance(pre, dict):
        return False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    return isinstance(steps, list) and any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)


# --------------------------------------------------------------------------------------------------------------------
# Chat formats
# --------------------------------------------------------------------------------------------------------------------

def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render a conversation as the model's prompt text: ChatML (SmolLM2) for byte-level tokenizers that have
    `<|im_start|>`, `[INST] ... [/INST]` (Llama-2-chat) for SentencePiece tokenizers."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadInput(f"chat message must be a dict with 'role' and 'content', got {m!r}")
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _llama2_chat(tokenizer, messages)
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return _chatml(messages, add_generation_prompt)
    raise UnsupportedTokenizer("no chat format known for this tokenizer (expected <|im_start|> or SentencePiece)")


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    """SmolLM2-Instruct: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, default system message first."""
    text = ""
    if messages and messages[0]["role"] != "system":  # as the model's own template: only before a first message
        text += f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def _llama2_chat(tokenizer: SentencePieceTokenizer, messages: list[dict]) -> str:
    """Llama-2-chat: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>` per turn
    (the Hugging Face template; the prompt already ends where the answer starts)."""
    bos, eos = tokenizer.sp.id_to_piece(tokenizer.bos_id), tokenizer.sp.id_to_piece(tokenizer.eos_id)
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = ""
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadInput(f"Llama-2 chat: message {k} has role {m['role']!r}, expected {expected!r} "
                             "(roles must alternate user/assistant after an optional system message)")
        content = m["content"]
        if k == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if expected == "user":
            text += f"{bos}[INST] {content.strip()} [/INST]"
        else:
            text += f" {content.strip()} {eos}"
    return text


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a conversation: the rendered template, encoded without an extra BOS (the template has it)."""
    return tokenizer.encode(apply_chat_template(tokenizer, messages, add_generation_prompt), add_bos=False)


def chat_stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: `<|im_end|>` for ChatML, EOS otherwise."""
    stops = []
    im_end = tokenizer.token_to_id("<|im_end|>")
    for i in (im_end, tokenizer.eos_id):
        if i is not None and i not in stops:
            stops.append(i)
    return stops


# --------------------------------------------------------------------------------------------------------------------
# Writing a standard tokenizer.json (used by the GGUF converter)
# --------------------------------------------------------------------------------------------------------------------

GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def build_bpe_tokenizer_json(tokens: list[str], merges: list[str], token_types: list[int], bos_id: int, eos_id: int,
                             unk_id: int | None, chat_template: str | None = None,
                             digits_individual: bool = True) -> dict:
    """A standard Hugging Face `tokenizer.json` dict for a GPT-2-style byte-level BPE from GGUF tokenizer metadata.

    Control tokens (GGUF type 3; ids 0-16 for SmolLM2) and the BOS/EOS/UNK tokens become special added tokens.
    `chat_template` has no place in tokenizer.json; it goes to `build_tokenizer_config`.
    """
    if not (len(tokens) == len(token_types)):
        raise BadInput(f"{len(tokens)} tokens but {len(token_types)} token types")
    if len(set(tokens)) != len(tokens):
        raise BadInput("token list has duplicates")
    for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
        if i is not None and not 0 <= i < len(tokens):
            raise BadInput(f"{name}={i} is outside the vocabulary of {len(tokens)} tokens")
    special = {i for i, t in enumerate(token_types) if t == GGUF_TOKEN_TYPE_CONTROL}
    special |= {i for i in (bos_id, eos_id, unk_id) if i is not None}
    added_tokens = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True} for i in sorted(special)]
    steps = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]
    if digits_individual:
        steps.insert(0, {"type": "Digits", "individual_digits": True})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }


def build_tokenizer_config(tokens: list[str], bos_id: int, eos_id: int, unk_id: int | None,
                           chat_template: str | None = None, add_bos_token: bool = False,
                           model_max_length: int | None = None) -> dict:
    """A `tokenizer_config.json` dict naming the BOS/EOS/UNK tokens and the chat template (as Hugging Face does)."""
    config = {
        "add_bos_token": add_bos_token,
        "add_prefix_space": False,
        "bos_token": tokens[bos_id],
        "eos_token": tokens[eos_id],
        "unk_token": tokens[unk_id] if unk_id is not None else None,
        "pad_token": tokens[eos_id],
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "GPT2Tokenizer",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config
