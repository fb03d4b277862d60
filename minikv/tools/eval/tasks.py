"""Evaluation prompts, generated deterministically from a seed (nothing is downloaded).

Every generator returns an `Example`: token ids split into `context` (what a policy compresses in question-agnostic
mode) and `question` (appended after compression in question-agnostic mode, inside the compressed prompt in
question-aware mode), the reference answers, the metric and the number of tokens to generate.
Lengths are counted in tokens of the tokenizer given: `len(context) + len(question)` equals the requested length
(cwe, whose list cannot be cut mid-item, lands within 2%).

Haystacks are assembled from separately encoded sentences that each start with a space, so that the concatenation is
what the tokenizer would produce for the joined text (a byte-level BPE never merges across a " word" boundary).

  passkey            5-digit key in repeated filler at a depth (Mohtashami & Jaggi 2023; LongLoRA's prompt)
  needle             "The special magic number for <city> is <n>." in license prose at a depth (needle in a haystack)
  ruler-lite/...     multikey (distractor needles), multivalue (all values of one key), vt (variable tracking),
                     cwe (common words extraction), after RULER (Hsieh et al. 2024)
  ppl                a window of real text (GPL-3 first) for teacher-forced perplexity
  longbench-local    LongBench-format JSONL rows, LongBench's prompt per dataset, middle truncation
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from minikv.io.tokenizer import apply_chat_template
from minikv.tools.eval.metrics import LONGBENCH_METRIC, longbench_dataset
from minikv.errors import BadInput, NotFound

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LICENSES = Path("/usr/share/common-licenses")
RULER_SUBTASKS = ("multikey", "multivalue", "vt", "cwe")
TASK_NAMES = ("passkey", "needle", "ruler-lite", "ppl", "longbench-local")
# Tasks whose needle sits at a requested depth; the others ignore --depths.
DEPTH_TASKS = {"passkey", "needle", "ruler-lite/multikey", "ruler-lite/multivalue"}
# Chat template by default? Measured on the default model (SmolLM2-135M-Instruct, full cache, 1.5-2k tokens): passkey
# is solved as a plain "The pass key is" completion and fails inside the chat template; needle is solved either way;
# multikey is worse inside the template (2/3 vs 3/3). So the generated tasks default to plain prompts (RESULTS.md).
CHAT_DEFAULT = {"passkey": False, "needle": False, "ruler-lite": False}
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Accra", "Kyoto", "Porto", "Tunis",
          "Riga", "Sofia", "Perth", "Bergen", "Cusco", "Malmo", "Turin", "Dakar", "Hobart")


@dataclass
class Example:
    """One prompt with its references."""
    task: str                      # "passkey", "needle", "ruler-lite/vt", "ppl", "longbench-local/hotpotqa", ...
    context: list[int]             # compressed part (question-agnostic mode)
    question: list[int]            # appended after the context; compressed too in question-aware mode
    answers: list[str]             # references
    metric: str                    # "contains" | "string_match_all" | "ppl" | a LongBench metric name
    max_new_tokens: int
    chat: bool                     # the prompt is wrapped in the model's chat template
    meta: dict = field(default_factory=dict)   # depth, needle offsets, key, haystack source, dataset, ...
    prefix: int = 0                # ppl: tokens prefilled (compressed) before teacher-forced scoring

    @property
    def ids(self) -> list[int]:
        """The whole prompt: context then question."""
        return self.context + self.question


# ---- randomness ------------------------------------------------------------------------------------------------
def rng_for(*parts) -> random.Random:
    """A Random seeded from a stable hash of the parts (Python's hash() of str changes between processes)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- text sources ------------------------------------------------------------------------------------------------
def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """n distinct pronounceable lowercase words (consonant-vowel syllables), the same on every machine."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def generated_prose(n_sentences: int = 3000, seed: int = 0) -> str:
    """Deterministic pseudo-prose (used when no license texts are installed)."""
    rng, words = random.Random(seed), pseudo_words(600, seed)
    sents = []
    for _ in range(n_sentences):
        ws = [rng.choice(words) for _ in range(rng.randint(6, 16))]
        sents.append(" ".join(ws).capitalize() + ".")
    return " ".join(sents)


def license_texts() -> list[tuple[str, str]]:
    """(name, text) of the license files under /usr/share/common-licenses, GPL-3 first, duplicates (symlinks) once."""
    if not LICENSES.is_dir():
        return []
    seen, out = set(), []
    files = sorted(p for p in LICENSES.iterdir() if p.is_file())
    files.sort(key=lambda p: p.name != "GPL-3")
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text not in seen:
            seen.add(text)
            out.append((p.name, text))
    return out


def prose_source() -> tuple[str, str]:
    """(source name, text): every license text joined (GPL-3 first), or generated prose when none is installed."""
    texts = license_texts()
    if texts:
        return "common-licenses:" + ",".join(n for n, _ in texts), "\n\n".join(t for _, t in texts)
    return "generated-prose", generated_prose()


def split_sentences(text: str, marks: str = ".!?;:") -> list[str]:
    """Whitespace collapsed, split after sentence (and clause) marks; each piece returned with a leading space."""
    flat = " ".join(text.split())
    return [" " + s for s in re.split(rf"(?<=[{re.escape(marks)}])\s+", flat) if s]


def encode_units(tok, sentences: list[str], max_tokens: int = 48) -> list[list[int]]:
    """Encode sentences; one longer than max_tokens is cut after its commas into runs of at most max_tokens (a
    needle can then sit close to any depth; license sentences reach 200+ tokens)."""
    units = []
    for s in sentences:
        ids = encode(tok, s)
        if len(ids) <= max_tokens or "," not in s:
            units.append(ids)
            continue
        run: list[int] = []
        for piece in re.split(r"(?<=,) ", s[1:]):
            p = encode(tok, " " + piece)
            if run and len(run) + len(p) > max_tokens:
                units.append(run)
                run = []
            run = run + p
        units.append(run)
    return units


# ---- encoding with a per-tokenizer cache ---------------------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(tok, key: str, build):
    try:
        per_tok = _CACHE.setdefault(tok, {})
    except TypeError:                                 # a tokenizer that cannot be weak-referenced: no cache
        return build()
    if key not in per_tok:
        per_tok[key] = build()
    return per_tok[key]


def encode(tok, text: str, first: bool = False) -> list[int]:
    """Ids of a piece of the prompt; only the first piece gets the tokenizer's default BOS."""
    return tok.encode(text) if first else tok.encode(text, add_bos=False)


def filler_units(tok) -> list[list[int]]:
    """The passkey filler's five sentences, encoded once per tokenizer."""
    return _cached(tok, "filler", lambda: [encode(tok, s) for s in split_sentences(FILLER, ".")])


def prose_units(tok) -> tuple[list[list[int]], str]:
    """The prose haystack's sentences, encoded once per tokenizer, and the source's name."""
    source, text = prose_source()
    units = _cached(tok, "prose:" + source, lambda: encode_units(tok, split_sentences(text)))
    return units, source


def document_ids(tok) -> tuple[list[int], str]:
    """The perplexity text as one canonical encoding: GPL-3 first, then the other license texts."""
    source, text = prose_source()
    return _cached(tok, "doc:" + source, lambda: encode(tok, text)), source


# ---- chat wrapping -------------------------------------------------------------------------------------------------
def has_chat_format(tok) -> bool:
    """Whether minikv knows a chat template for this tokenizer (ChatML or Llama-2)."""
    try:
        apply_chat_template(tok, [{"role": "user", "content": "x"}])
        return True
    except NotImplementedError:
        return False


def resolve_chat(tok, task: str, chat: bool | None) -> bool:
    """chat=None means the task's default, where the tokenizer has a chat format."""
    if chat is None:
        return CHAT_DEFAULT.get(task.split("/")[0], True) and has_chat_format(tok)
    if chat and not has_chat_format(tok):
        raise BadInput("chat=True but this tokenizer has no known chat format")
    return chat


def wrap(tok, chat: bool, instruction: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """(head text, tail text) around the haystack: the plain prompt, or the chat template with the answer prefix
    starting the assistant turn."""
    if not chat:
        return instruction, question + answer_prefix
    marker = "\x00MINIKV-HAYSTACK\x00"
    rendered = apply_chat_template(tok, [{"role": "user", "content": instruction + marker + question}])
    head, tail = rendered.split(marker)
    return head, tail + answer_prefix.lstrip()


# ---- haystack assembly ---------------------------------------------------------------------------------------------
def take_tokens(units: list[list[int]], start: int, n: int) -> list[list[int]]:
    """Sentences from `units` (cyclically, from index `start`) totalling exactly n tokens (the last one is cut)."""
    if n < 0:
        raise BadInput(f"cannot take {n} tokens")
    if not units or not any(units):
        raise BadInput("the haystack has no sentences")
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
    bounds = [0]
    for s in hay:
        bounds.append(bounds[-1] + len(s))
    total = bounds[-1]
    at: dict[int, list[int]] = {}
    for k, (_, depth) in enumerate(needles):
        if not 0 <= depth <= 1:
            raise BadInput(f"depth must be in [0, 1], got {depth}")
        target = depth * total
        b = min(range(len(bounds)), key=lambda i: (abs(bounds[i] - target), i))
        at.setdefault(b, []).append(k)
    ids, offsets = [], [0] * len(needles)
    for b in range(len(hay) + 1):
        for k in at.get(b, []):
            offsets[k] = len(ids)
            ids += needles[k][0]
        if b < len(hay):
            ids += hay[b]
    return ids, offsets


def haystack_prompt(tok, length: int, chat: bool, instruction: str, units: list[list[int]], start: int,
                    needles: list[tuple[str, float]], question: str, answer_prefix: str):
    """(context ids, question ids, needle (offset, length) spans in the full prompt) of exactly `length` tokens."""
    head_text, tail_text = wrap(tok, chat, instruction, question, answer_prefix)
    head = encode(tok, head_text, first=True)
    tail = encode(tok, tail_text)
    needle_ids = [(encode(tok, text), depth) for text, depth in needles]
    n_hay = length - len(head) - len(tail) - sum(len(ids) for ids, _ in needle_ids)
    if n_hay < 1:
        raise BadInput(f"length {length} is too short: instruction, needles and question alone take "
                       f"{length - n_hay} tokens; give a length of at least {length - n_hay + 1}")
    body, offsets = insert_at_depths(take_tokens(units, start, n_hay), needle_ids)
    return head + body, tail, [(len(head) + o, len(ids)) for o, (ids, _) in zip(offsets, needle_ids)]


# ---- the tasks -------------------------------------------------------------------------------------------------------
def _spans(spans: list[tuple[int, int]]) -> dict:
    return {"needle_offsets": [o for o, _ in spans], "needle_lengths": [n for _, n in spans]}


def passkey(tok, length: int, depth: float, rng: random.Random, chat: bool) -> Example:
    """A 5-digit pass key at `depth` in repeated filler; the prompt ends with "The pass key is"."""
    key = str(rng.randint(10000, 99999))
    instruction = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                   "I will quiz you about the important information there.")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    question = "\n\nWhat is the pass key?" if chat else " What is the pass key?"
    ctx, q, offs = haystack_prompt(tok, length, chat, instruction, filler_units(tok), 0, [(needle, depth)],
                                   question, " The pass key is")
    return Example("passkey", ctx, q, [key], "contains", 8, chat,
                   {"depth": depth, **_spans(offs), "key": key, "haystack": "filler"})


def _magic_needle(city: str, number: str) -> str:
    return f" The special magic number for {city} is {number}."


_NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                       "I will quiz you about the numbers afterwards.\n")


def _magic_prompt(tok, length: int, chat: bool, rng: random.Random, city: str, needles: list, many: bool):
    """(context, question, needle spans, haystack source) of a magic-number prompt in real prose, asking for the
    number of `city` (or, `many`, all its numbers)."""
    units, source = prose_units(tok)
    what = "What are all the special magic numbers" if many else "What is the special magic number"
    answer = "numbers for {} mentioned in the provided text are" if many else "number for {} mentioned in the provided text is"
    ctx, q, offs = haystack_prompt(tok, length, chat, _NEEDLE_INSTRUCTION, units, rng.randrange(len(units)), needles,
                                   f"\n{what} for {city} mentioned in the provided text?",
                                   " The special magic " + answer.format(city))
    return ctx, q, offs, source


def needle(tok, length: int, depth: float, rng: random.Random, chat: bool) -> Example:
    """One sentence-fact in real prose at `depth`; the question at the end asks for its number."""
    city, number = rng.choice(CITIES), str(rng.randint(10000, 99999))
    ctx, q, offs, source = _magic_prompt(tok, length, chat, rng, city, [(_magic_needle(city, number), depth)], False)
    return Example("needle", ctx, q, [number], "contains", 12, chat,
                   {"depth": depth, **_spans(offs), "key": number, "city": city, "haystack": source})


def ruler_multikey(tok, length: int, depth: float, rng: random.Random, chat: bool, n_distractors: int = 3) -> Example:
    """RULER niah multikey: the asked key at `depth`, distractor keys (other cities) at random depths."""
    cities = rng.sample(CITIES, 1 + n_distractors)
    numbers = [str(rng.randint(10000, 99999)) for _ in cities]
    needles = [(_magic_needle(cities[0], numbers[0]), depth)]
    needles += [(_magic_needle(c, n), rng.random()) for c, n in zip(cities[1:], numbers[1:])]
    ctx, q, offs, source = _magic_prompt(tok, length, chat, rng, cities[0], needles, False)
    return Example("ruler-lite/multikey", ctx, q, [numbers[0]], "string_match_all", 12, chat,
                   {"depth": depth, **_spans(offs), "key": numbers[0], "city": cities[0],
                    "distractors": dict(zip(cities[1:], numbers[1:])), "haystack": source})


def ruler_multivalue(tok, length: int, depth: float, rng: random.Random, chat: bool, n_values: int = 4) -> Example:
    """RULER niah multivalue: one key with n_values numbers (the first at `depth`); all must be recalled."""
    city = rng.choice(CITIES)
    numbers = [str(rng.randint(10000, 99999)) for _ in range(n_values)]
    needles = [(_magic_needle(city, numbers[0]), depth)] + [(_magic_needle(city, n), rng.random()) for n in numbers[1:]]
    ctx, q, offs, source = _magic_prompt(tok, length, chat, rng, city, needles, True)
    return Example("ruler-lite/multivalue", ctx, q, numbers, "string_match_all", 8 * n_values + 8, chat,
                   {"depth": depth, **_spans(offs), "city": city, "haystack": source})


_VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"


def _vt_chain(rng: random.Random, n_hops: int) -> tuple[list[str], str, list[str]]:
    """(variable names, value, assignment sentences) of one chain: VAR A = value, VAR B = VAR A, ..."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[j + 1]} = VAR {names[j]}." for j in range(n_hops)]
    return names, value, chain


def _vt_question(value: str, n: int) -> tuple[str, str]:
    return (f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
            f" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
            f"assigned the value {value}, they are:")


def ruler_vt(tok, length: int, rng: random.Random, chat: bool, n_hops: int = 4, icl: bool = True) -> Example:
    """RULER variable tracking: VAR A = 12345, VAR B = VAR A, ... in filler; name every variable holding the value.
    As in RULER, a short solved example comes first (icl)."""
    names, value, chain = _vt_chain(rng, n_hops)
    instruction = _VT_INSTRUCTION
    if icl:
        ex_names, ex_value, ex_chain = _vt_chain(rng, n_hops)
        filler = split_sentences(FILLER, ".")
        body = "".join(f + c for f, c in zip(filler * 2, ex_chain))
        q, a = _vt_question(ex_value, n_hops + 1)
        instruction = f"{_VT_INSTRUCTION}{body}{q}{a} {' '.join(ex_names)}\n\n{_VT_INSTRUCTION}"
    depths = sorted(rng.random() for _ in chain)          # sorted: the chain appears in order
    question, answer_prefix = _vt_question(value, n_hops + 1)
    ctx, q_ids, offs = haystack_prompt(tok, length, chat, instruction, filler_units(tok), 0, list(zip(chain, depths)),
                                       question, answer_prefix)
    return Example("ruler-lite/vt", ctx, q_ids, names, "string_match_all", 30, chat,
                   {"depth": None, **_spans(offs), "value": value, "haystack": "filler", "icl": icl})


_CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n")


def _cwe_question(num_cw: int) -> tuple[str, str]:
    return (f"\nQuestion: What are the {num_cw} most common words in the above list?",
            f" Answer: The top {num_cw} words that appear most often in the list are:")


def _word_list(words: list[str], seed: float) -> str:
    words = list(words)
    random.Random(seed).shuffle(words)
    return "".join(f" {i + 1}. {w}" for i, w in enumerate(words))


def ruler_cwe(tok, length: int, rng: random.Random, chat: bool, num_cw: int = 10, freq_ucw: int = 3,
              icl: bool = True) -> Example:
    """RULER common words extraction: a numbered word list where num_cw words repeat often; name those words.
    As in RULER, a short solved example (common words 3 times, others once) comes first (icl)."""
    vocab = pseudo_words(4000, seed=1)
    words = rng.sample(vocab, len(vocab))
    common, uncommon = words[:num_cw], words[num_cw + 20:]
    instruction = _CWE_INSTRUCTION
    if icl:
        ex_common, ex_rare = words[num_cw:num_cw + 10], uncommon[-10:]
        uncommon = uncommon[:-10]
        q, a = _cwe_question(10)
        answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
        instruction = (f"{_CWE_INSTRUCTION}{_word_list(ex_common * 3 + ex_rare, rng.random())}{q}{a} {answer}\n\n"
                       f"{_CWE_INSTRUCTION}")
    head_text, tail_text = wrap(tok, chat, instruction, *_cwe_question(num_cw))
    head, tail = encode(tok, head_text, first=True), encode(tok, tail_text)
    avail = length - len(head) - len(tail)
    per_item = len(encode(tok, f" 100. {common[0]}"))
    n_items = max(1, avail // max(1, per_item))
    freq_cw = max(freq_ucw + 2, min(30, n_items // 20))     # RULER: 30 at 4k+; always clearly above freq_ucw
    seed = rng.random()

    def build(n_unc: int) -> list[int]:
        items = common * freq_cw + uncommon[:n_unc] * freq_ucw
        random.Random(seed).shuffle(items)
        return [t for i, w in enumerate(items) for t in encode(tok, f" {i + 1}. {w}")]

    lo, hi = 0, min(len(uncommon), max(0, n_items))          # largest n_unc whose list fits `avail`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= avail:
            lo = mid
        else:
            hi = mid - 1
    body = build(lo)
    if len(body) > avail:
        raise BadInput(f"length {length} is too short for common-words extraction ({len(body) + len(head) + len(tail)}"
                         f" tokens with no uncommon words)")
    return Example("ruler-lite/cwe", head + body, tail, common, "string_match_all", 120, chat,
                   {"depth": None, "freq_cw": freq_cw, "uncommon_words": lo, "haystack": "word-list", "icl": icl})


def ppl_text(tok, length: int, sample: int, prefix: int) -> Example:
    """A window of `length` tokens of real text (GPL-3 first); the first `prefix` are prefilled, the rest scored."""
    doc, source = document_ids(tok)
    if length < 2:
        raise BadInput(f"ppl needs a length of at least 2 tokens, got {length}")
    if length > len(doc):
        raise BadInput(f"ppl length {length} exceeds the text available ({len(doc)} tokens of {source})")
    if not 1 <= prefix < length:
        raise BadInput(f"ppl prefix must be in [1, length), got prefix={prefix}, length={length}")
    start = (sample * length) % max(1, len(doc) - length + 1)
    return Example("ppl", doc[start:start + length], [], [], "ppl", 0, False,
                   {"start": start, "haystack": source}, prefix=prefix)


# ---- LongBench-format JSONL ------------------------------------------------------------------------------------------
# LongBench's prompt per dataset (config/dataset2prompt.json) and answer length (dataset2maxlen.json).
LONGBENCH_PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
LONGBENCH_PROMPT["2wikimqa"] = LONGBENCH_PROMPT["musique"] = LONGBENCH_PROMPT["hotpotqa"]
LONGBENCH_GENERIC_PROMPT = "{context}\n\nAnswer the question based on the text above.\n\nQuestion: {input}\nAnswer:"
LONGBENCH_MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
                    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512,
                    "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
                    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64,
                    "repobench-p": 64}
LONGBENCH_NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}   # few-shot / completion prompts
LONGBENCH_FIELDS = ("context", "input", "answers")


def read_longbench(path: str | Path) -> list[dict]:
    """Rows of a LongBench-format JSONL file (fields context, input, answers, all_classes, length, dataset)."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"--data {path}: no such file (longbench-local reads a LongBench-format JSONL file "
                       f"you already have; minikv never downloads data)")
    if not path.is_file():
        raise BadInput(f"--data {path} is not a file; give a LongBench-format JSONL file (one JSON object a line)")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise BadInput(f"--data {path}: cannot read it ({e.strerror or e})") from None
    rows = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"--data {path}:{n}: not a line of JSON ({e}); longbench-local reads JSONL, one "
                           f"object a line") from None
        problem = longbench_row_problem(row)
        if problem:
            raise BadInput(f"--data {path}:{n}: {problem} (LongBench rows have context, input, answers, "
                           f"all_classes, length, dataset)")
        rows.append(row)
    if not rows:
        raise BadInput(f"--data {path}: no rows (the file has no line that is not blank)")
    return rows


def longbench_row_problem(row) -> str | None:
    """Why a parsed JSON line is not a usable LongBench row (None when it is)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    missing = [k for k in LONGBENCH_FIELDS if k not in row]
    if missing:
        return f"missing field(s) {missing}"
    for key in ("context", "input"):
        if not isinstance(row[key], str):
            return f"{key} is {json.dumps(row[key])[:40]}, expected a string"
    answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
    if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
        return f"answers is {json.dumps(row['answers'])[:40]}, expected a string or a list of strings"
    classes = row.get("all_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return f"all_classes is {json.dumps(classes)[:40]}, expected a list of strings or null"
    return None


def longbench_example(tok, row: dict, max_length: int | None, chat: bool | None, model_ctx: int = 8192) -> Example:
    """LongBench's prompt for the row's dataset, middle-truncated (pred.py: keep the first and last halves) so that
    with the chat template (unless the dataset is few-shot / completion) it holds at most `max_length` tokens
    (default: the model's context minus the answer length). The question part is the prompt after the context."""
    ds = longbench_dataset(str(row.get("dataset", "")))
    template = LONGBENCH_PROMPT.get(ds, LONGBENCH_GENERIC_PROMPT)
    head_text, tail_tmpl = template.split("{context}")
    tail_text = tail_tmpl.format(input=row["input"])
    use_chat = (has_chat_format(tok) and ds not in LONGBENCH_NO_CHAT) if chat is None else chat
    max_new = LONGBENCH_MAXLEN.get(ds, 64)
    c_head, c_tail = [], []
    if use_chat:
        head_str, tail_str = wrap(tok, True, "", "", "")
        c_head, c_tail = encode(tok, head_str, first=True), encode(tok, tail_str)
    limit = (model_ctx - max_new if max_length is None else max_length) - len(c_head) - len(c_tail)
    if limit < 2:
        raise BadInput(f"longbench-local: length {max_length} leaves no room for the prompt")
    head = encode(tok, head_text, first=not use_chat)
    body = encode(tok, row["context"])
    tail = encode(tok, tail_text)
    ids = head + body + tail
    truncated = len(ids) > limit
    if truncated:                                        # keep the first and last limit/2 tokens
        half = limit // 2
        ids = ids[:half] + ids[len(ids) - (limit - half):]
    n_tail = min(len(tail), limit - limit // 2)
    ctx, q = c_head + ids[: len(ids) - n_tail], ids[len(ids) - n_tail:] + c_tail
    answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
    return Example(f"longbench-local/{ds or 'unknown'}", ctx, q, [str(a) for a in answers],
                   LONGBENCH_METRIC.get(ds, "qa_f1"), max_new, use_chat,
                   {"dataset": ds, "all_classes": row.get("all_classes"), "length": row.get("length"),
                    "truncated": truncated, "_id": row.get("_id")})


# ---- one entry point -------------------------------------------------------------------------------------------------
def make_example(tok, task: str, length: int, depth: float | None = None, sample: int = 0, seed: int = 0,
                 chat: bool | None = None, ppl_prefix: int = 512) -> Example:
    """The prompt of one grid cell; the same (task, length, depth, sample, seed) gives the same ids every time.

    task: "passkey", "needle", "ruler-lite/<multikey|multivalue|vt|cwe>" or "ppl" (longbench-local rows come
    from `longbench_example`).
    """
    base, _, sub = task.partition("/")
    if base not in TASK_NAMES or base == "longbench-local":
        raise BadInput(f"unknown task {task!r}; tasks: passkey, needle, ruler-lite/<{'|'.join(RULER_SUBTASKS)}>, ppl")
    if not isinstance(length, int) or length < 1:
        raise BadInput(f"length must be a positive number of tokens, got {length!r}")
    if task in DEPTH_TASKS and depth is None:
        raise BadInput(f"task {task} needs a depth in [0, 1]")
    rng = rng_for(seed, task, length, depth, sample)
    if base == "ppl":
        return ppl_text(tok, length, sample, ppl_prefix)         # a prefix >= length is refused, never cut
    use_chat = resolve_chat(tok, task, chat)
    if base == "passkey":
        return passkey(tok, length, depth, rng, use_chat)
    if base == "needle":
        return needle(tok, length, depth, rng, use_chat)
    if sub == "multikey":
        return ruler_multikey(tok, length, depth, rng, use_chat)
    if sub == "multivalue":
        return ruler_multivalue(tok, length, depth, rng, use_chat)
    if sub == "vt":
        return ruler_vt(tok, length, rng, use_chat)
    if sub == "cwe":
        return ruler_cwe(tok, length, rng, use_chat)
    raise BadInput(f"unknown ruler-lite subtask {sub!r}; subtasks: {', '.join(RULER_SUBTASKS)}")
