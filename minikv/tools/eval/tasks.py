"""Evaluation prompts, generated deterministically from a seed (nothing is downloaded): passkey (Mohtashami & Jaggi
2023, LongLoRA's prompt), needle (in a haystack), ruler-lite (multikey, multivalue, vt, cwe: after RULER, Hsieh et
al. 2024) and ppl (a window of real text).

Every generator returns an `Example`: `context` (compressed first in question-agnostic mode) and `question` token
ids, the reference answers, the metric and the tokens to generate. `len(context) + len(question)` is the requested
length in tokens (cwe, whose list cannot be cut mid-item, lands within 2%). Haystacks are separately encoded
sentences that each start with a space, so that they join as the tokenizer would encode the joined text."""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from pathlib import Path

from minikv.errors import BadInput
from minikv.io import require
from minikv.io.tokenizer import apply_chat_template

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LICENSES = Path("/usr/share/common-licenses")
RULER_SUBTASKS, TASK_NAMES = ("multikey", "multivalue", "vt", "cwe"), ("passkey", "needle", "ruler-lite", "ppl")
DEPTH_TASKS = {"passkey", "needle", "ruler-lite/multikey", "ruler-lite/multivalue"}   # the others ignore --depths
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Accra", "Kyoto", "Porto", "Tunis",
          "Riga", "Sofia", "Perth", "Bergen", "Cusco", "Malmo", "Turin", "Dakar", "Hobart")

@dataclass
class Example:
    """One prompt with its references."""
    task: str                      # "passkey", "needle", "ruler-lite/vt", "ppl"
    context: list[int]             # compressed part (question-agnostic mode)
    question: list[int]            # appended after the context; compressed too in question-aware mode
    answers: list[str]             # references
    metric: str                    # "contains" | "string_match_all" | "ppl"
    max_new_tokens: int
    chat: bool                     # the prompt is wrapped in the model's chat template
    meta: dict = field(default_factory=dict)   # depth, needle offsets, key, haystack source, ...
    prefix: int = 0                # ppl: tokens prefilled (compressed) before teacher-forced scoring

    @property
    def ids(self) -> list[int]:
        """The whole prompt: context then question."""
        return self.context + self.question

    def score(self, text: str) -> float:
        """The metric on an answer: 1 if it "contains" a reference, else RULER's string_match_all (case-insensitive)."""
        return float(any(a in text for a in self.answers)) if self.metric == "contains" else \
            sum(a.lower() in text.lower() for a in self.answers) / len(self.answers)     # the fraction found

# ---- text sources ------------------------------------------------------------------------------------------------
def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """n distinct pronounceable lowercase words (consonant-vowel syllables), the same on every machine."""
    rng, out = random.Random(seed), {}
    while len(out) < n:
        out.setdefault("".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))))
    return list(out)

@lru_cache(maxsize=None)
def prose_source() -> tuple[str, str]:
    """(source name, text): the license texts (GPL-3 first, each once), else deterministic pseudo-prose."""
    texts: dict[str, str] = {}
    for p in sorted((p for p in LICENSES.glob("*") if p.is_file()), key=lambda p: (p.name != "GPL-3", p.name)):
        try:                                          # (glob of a missing folder: nothing)
            texts.setdefault(p.read_text(encoding="utf-8"), p.name)
        except (OSError, UnicodeDecodeError):
            continue
    if texts:
        return "common-licenses:" + ",".join(texts.values()), "\n\n".join(texts)
    rng, words = random.Random(0), pseudo_words(600, 0)
    return "generated-prose", " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 16))).capitalize()
                                       + "." for _ in range(3000))

def split_sentences(text: str, marks: str = ".!?;:") -> list[str]:
    """Whitespace collapsed, split after sentence (and clause) marks; each piece returned with a leading space."""
    return [" " + s for s in re.split(rf"(?<=[{re.escape(marks)}])\s+", " ".join(text.split())) if s]

def encode_units(tok, sentences: list[str], max_tokens: int = 48) -> list[list[int]]:
    """Encode sentences; one longer than max_tokens is cut after its commas into runs of at most max_tokens (a
    needle can then sit close to any depth; license sentences reach 200+ tokens)."""
    units = []
    for s in sentences:
        ids, run = encode(tok, s), []
        split = len(ids) > max_tokens and "," in s
        for p in [encode(tok, " " + x) for x in re.split(r"(?<=,) ", s[1:])] if split else [ids]:
            if run and len(run) + len(p) > max_tokens:
                units.append(run)
                run = []
            run = run + p
        units.append(run)
    return units

# ---- encoding, cached per tokenizer; chat wrapping -----------------------------------------------------------------
def encode(tok, text: str, first: bool = False) -> list[int]:
    """Ids of a piece of the prompt; only the first piece gets the tokenizer's default BOS."""
    return tok.encode(text) if first else tok.encode(text, add_bos=False)

@lru_cache(maxsize=8)
def filler_units(tok) -> list[list[int]]:
    """The passkey filler's five sentences."""
    return [encode(tok, s) for s in split_sentences(FILLER, ".")]

@lru_cache(maxsize=8)
def prose_units(tok) -> tuple[list[list[int]], str]:
    """The prose haystack's sentences and the source's name."""
    source, text = prose_source()
    return encode_units(tok, split_sentences(text)), source

@lru_cache(maxsize=8)
def prose_ids(tok) -> list[int]:
    """The whole prose text, for perplexity."""
    return encode(tok, prose_source()[1])

def resolve_chat(tok, chat: bool | None) -> bool:
    """Plain prompts unless asked (on SmolLM2-135M-Instruct passkey fails inside the chat template, and multikey does
    worse in it); chat needs a format minikv knows (ChatML, Llama-2) for the tokenizer."""
    try:
        known = bool(chat) and apply_chat_template(tok, [{"role": "user", "content": "x"}]) is not None
    except NotImplementedError:
        known = False
    require(known or not chat, "--chat: this tokenizer has no chat format minikv knows (ChatML, Llama-2)")
    return bool(chat)

def wrap(tok, chat: bool, instruction: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """(head, tail) ids around the haystack: plain, or the chat template with the answer prefix opening the reply."""
    if chat:
        marker, answer_prefix = "\x00MINIKV-HAYSTACK\x00", answer_prefix.lstrip()
        text = apply_chat_template(tok, [{"role": "user", "content": instruction + marker + question}])
        instruction, question = text.split(marker)                # the text before and after the haystack
    return encode(tok, instruction, first=True), encode(tok, question + answer_prefix)

# ---- haystack assembly ---------------------------------------------------------------------------------------------
def take_tokens(units: list[list[int]], start: int, n: int) -> list[list[int]]:
    """Sentences from `units` (cyclically, from index `start`) totalling exactly n tokens (the last one is cut)."""
    out, total, i = [], 0, start % len(units)
    while total < n:
        s = units[i][: n - total]
        if s:
            out.append(s)
            total += len(s)
        i = (i + 1) % len(units)
    return out

def insert_at_depths(hay: list[list[int]], needles: list[tuple[list[int], float]]) -> tuple[list[int], list[int]]:
    """Put each needle at the sentence boundary nearest depth × haystack tokens. Returns (ids, needle offsets)."""
    bounds = [0, *accumulate(map(len, hay))]
    at: dict[int, list[int]] = {}
    for k, (_, depth) in enumerate(needles):
        require(0 <= depth <= 1, f"depth must be in [0, 1], got {depth}")
        b = min(range(len(bounds)), key=lambda i: (abs(bounds[i] - depth * bounds[-1]), i))
        at.setdefault(b, []).append(k)
    ids, offsets = [], [0] * len(needles)
    for b, s in enumerate(hay + [[]]):                 # boundary b comes before sentence b ([]: the end)
        for k in at.get(b, []):
            offsets[k] = len(ids)
            ids += needles[k][0]
        ids += s
    return ids, offsets

def haystack_prompt(tok, length: int, chat: bool, instruction: str, units: list[list[int]], start: int,
                    needles: list[tuple[str, float]], question: str, answer_prefix: str):
    """(context ids, question ids, needle spans as meta) of exactly `length` tokens."""
    head, tail = wrap(tok, chat, instruction, question, answer_prefix)
    needle_ids = [(encode(tok, text), depth) for text, depth in needles]
    n_hay = length - len(head) - len(tail) - sum(len(ids) for ids, _ in needle_ids)
    require(n_hay >= 1, f"length {length} is too short: instruction, needles and question alone take "
                        f"{length - n_hay} tokens; give a length of at least {length - n_hay + 1}")
    body, offsets = insert_at_depths(take_tokens(units, start, n_hay), needle_ids)
    return head + body, tail, {"needle_offsets": [len(head) + o for o in offsets],
                               "needle_lengths": [len(ids) for ids, _ in needle_ids]}

# ---- the tasks -------------------------------------------------------------------------------------------------------
def passkey(tok, length: int, depth: float, rng: random.Random, chat: bool) -> Example:
    """A 5-digit pass key at `depth` in repeated filler; the prompt ends with "The pass key is"."""
    key = str(rng.randint(10000, 99999))
    instruction = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                   "I will quiz you about the important information there.")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    question = "\n\nWhat is the pass key?" if chat else " What is the pass key?"
    ctx, q, spans = haystack_prompt(tok, length, chat, instruction, filler_units(tok), 0, [(needle, depth)],
                                    question, " The pass key is")
    return Example("passkey", ctx, q, [key], "contains", 8, chat,
                   {"depth": depth, **spans, "key": key, "haystack": "filler"})

_NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                       "I will quiz you about the numbers afterwards.\n")

def magic_numbers(tok, length: int, depth: float, rng: random.Random, chat: bool, sub: str | None) -> Example:
    """Needles "The special magic number for <city> is <n>." in real prose, the first at `depth`: needle (one), RULER
    multikey (3 distractor cities at random depths) or multivalue (4 numbers of one city, all to be recalled)."""
    cities = rng.sample(CITIES, 4) if sub == "multikey" else [rng.choice(CITIES)] * (1 if sub is None else 4)
    numbers = [str(rng.randint(10000, 99999)) for _ in cities]
    needles = [(f" The special magic number for {c} is {n}.", depth if i == 0 else rng.random())
               for i, (c, n) in enumerate(zip(cities, numbers))]
    many, city = sub == "multivalue", cities[0]
    what = "What are all the special magic numbers" if many else "What is the special magic number"
    answer = f"number{'s' if many else ''} for {city} mentioned in the provided text {'are' if many else 'is'}"
    units, source = prose_units(tok)
    ctx, q, spans = haystack_prompt(tok, length, chat, _NEEDLE_INSTRUCTION, units, rng.randrange(len(units)), needles,
                                    f"\n{what} for {city} mentioned in the provided text?",
                                    " The special magic " + answer)
    meta = {"depth": depth, **spans, "key": numbers[0], "city": city, "haystack": source}
    if sub is None:
        return Example("needle", ctx, q, numbers, "contains", 12, chat, meta)
    if sub == "multikey":
        meta["distractors"] = dict(zip(cities[1:], numbers[1:]))
        return Example("ruler-lite/multikey", ctx, q, numbers[:1], "string_match_all", 12, chat, meta)
    del meta["key"]
    return Example("ruler-lite/multivalue", ctx, q, numbers, "string_match_all", 8 * len(numbers) + 8, chat, meta)

_VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"

def _vt_chain(rng: random.Random, n_hops: int) -> tuple[list[str], str, list[str]]:
    """(variable names, value, assignment sentences) of one chain: VAR A = value, VAR B = VAR A, ..."""
    distinct: dict[str, None] = {}                   # insertion-ordered, as a list, without repeats
    while len(distinct) < n_hops + 1:
        distinct.setdefault("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names, value = list(distinct), str(rng.randint(10000, 99999))
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[j + 1]} = VAR {names[j]}." for j in range(n_hops)]
    return names, value, chain

def _vt_question(value: str, n: int) -> tuple[str, str]:
    return (f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
            f" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
            f"assigned the value {value}, they are:")

def ruler_vt(tok, length: int, rng: random.Random, chat: bool, n_hops: int = 4) -> Example:
    """RULER variable tracking: VAR A = 12345, VAR B = VAR A, ... in filler; name every variable holding the value.
    As in RULER, a short solved example (in-context learning) comes first."""
    names, value, chain = _vt_chain(rng, n_hops)
    ex_names, ex_value, ex_chain = _vt_chain(rng, n_hops)
    body = "".join(f + c for f, c in zip(split_sentences(FILLER, ".") * 2, ex_chain))
    q, a = _vt_question(ex_value, n_hops + 1)
    instruction = f"{_VT_INSTRUCTION}{body}{q}{a} {' '.join(ex_names)}\n\n{_VT_INSTRUCTION}"
    depths = sorted(rng.random() for _ in chain)          # sorted: the chain appears in order
    ctx, q_ids, spans = haystack_prompt(tok, length, chat, instruction, filler_units(tok), 0, list(zip(chain, depths)),
                                        *_vt_question(value, n_hops + 1))
    return Example("ruler-lite/vt", ctx, q_ids, names, "string_match_all", 30, chat,
                   {"depth": None, **spans, "value": value, "haystack": "filler", "icl": True})

_CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n")

def _cwe_question(num_cw: int) -> tuple[str, str]:
    return (f"\nQuestion: What are the {num_cw} most common words in the above list?",
            f" Answer: The top {num_cw} words that appear most often in the list are:")

def ruler_cwe(tok, length: int, rng: random.Random, chat: bool, num_cw: int = 10, freq_ucw: int = 3) -> Example:
    """RULER common words extraction: a numbered word list where num_cw words repeat often; name those words.
    As in RULER, a short solved example (common words 3 times, others once) comes first."""
    words = rng.sample(pseudo_words(4000, seed=1), 4000)           # the vocabulary, shuffled
    common, uncommon = words[:num_cw], words[num_cw + 20:-10]
    example = words[num_cw:num_cw + 10] * 3 + words[-10:]
    random.Random(rng.random()).shuffle(example)
    q, a = _cwe_question(10)
    answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words[num_cw:num_cw + 10]))
    listed = "".join(f" {i + 1}. {w}" for i, w in enumerate(example))
    instruction = f"{_CWE_INSTRUCTION}{listed}{q}{a} {answer}\n\n{_CWE_INSTRUCTION}"
    head, tail = wrap(tok, chat, instruction, *_cwe_question(num_cw))
    avail = length - len(head) - len(tail)
    n_items = max(1, avail // max(1, len(encode(tok, f" 100. {common[0]}"))))
    freq_cw = max(freq_ucw + 2, min(30, n_items // 20))     # RULER: 30 at 4k+; always clearly above freq_ucw
    seed = rng.random()

    def build(n_unc: int) -> list[int]:
        items = common * freq_cw + uncommon[:n_unc] * freq_ucw
        random.Random(seed).shuffle(items)
        return [t for i, w in enumerate(items) for t in encode(tok, f" {i + 1}. {w}")]

    lo, hi = 0, min(len(uncommon), max(0, n_items))          # largest n_unc whose list fits `avail`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(build(mid)) <= avail else (lo, mid - 1)
    body = build(lo)
    if len(body) > avail:
        raise BadInput(f"length {length} is too short for common-words extraction ({len(body) + len(head) + len(tail)}"
                       f" tokens with no uncommon words)")
    return Example("ruler-lite/cwe", head + body, tail, common, "string_match_all", 120, chat,
                   {"depth": None, "freq_cw": freq_cw, "uncommon_words": lo, "haystack": "word-list", "icl": True})

def ppl_text(tok, length: int, sample: int, prefix: int) -> Example:
    """A window of `length` tokens of real text (GPL-3 first); the first `prefix` are prefilled, the rest scored."""
    doc, source = prose_ids(tok), prose_source()[0]
    require(length <= len(doc), f"ppl length {length} exceeds the text available ({len(doc)} tokens of {source})")
    if (sample + 1) * length > len(doc):    # windows never overlap: the bootstrap over texts treats them as independent
        raise BadInput(f"ppl sample {sample}: {source} ({len(doc)} tokens) holds {len(doc) // length} disjoint windows "
                       f"of {length} tokens; overlapping ones would make the interval too narrow (fewer samples)")
    start = sample * length
    return Example("ppl", doc[start:start + length], [], [], "ppl", 0, False,
                   {"start": start, "haystack": source}, prefix=prefix)

def make_example(tok, task: str, length: int, depth: float | None = None, sample: int = 0, seed: int = 0,
                 chat: bool | None = None, ppl_prefix: int = 512) -> Example:
    """The prompt of one grid cell ("passkey", "needle", "ruler-lite/<subtask>", "ppl"), the same every time."""
    base, _, sub = task.partition("/")
    if base not in TASK_NAMES:
        raise BadInput(f"unknown task {task!r}; tasks: passkey, needle, ruler-lite/<{'|'.join(RULER_SUBTASKS)}>, ppl")
    key = "|".join(map(str, (seed, task, length, depth, sample)))   # a stable seed: Python's str hash() is not
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    if base == "ppl":
        return ppl_text(tok, length, sample, ppl_prefix)
    chat = resolve_chat(tok, chat)
    if base == "passkey":
        return passkey(tok, length, depth, rng, chat)
    if base == "needle" or sub in ("multikey", "multivalue"):
        return magic_numbers(tok, length, depth, rng, chat, None if base == "needle" else sub)
    if sub in ("vt", "cwe"):
        return (ruler_vt if sub == "vt" else ruler_cwe)(tok, length, rng, chat)
    raise BadInput(f"unknown ruler-lite subtask {sub!r}; subtasks: {', '.join(RULER_SUBTASKS)}")
