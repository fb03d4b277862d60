"""Scores: RULER string matching, LongBench metrics (qa-F1, ROUGE-L, classification, code edit similarity, count,
retrieval), written from their definitions with the standard library only.

LongBench (THUDM/LongBench `metrics.py`, `eval.py`) scores a prediction against every reference answer and keeps the
maximum; for trec, triviaqa, samsum and lsht only the first line of the prediction is scored. Known differences,
all documented where they occur: Chinese metrics split into characters (LongBench uses jieba), ROUGE-L is the
sentence-level LCS F1 over word tokens (LongBench calls the `rouge` package), and code similarity is the InDel ratio
(what `fuzz.ratio` computes with python-Levenshtein installed).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from minikv.errors import BadInput

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_ZH_PUNCT = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—"
                "‘’‛“”„‟…‧﹏.")


# ---- normalization ---------------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD / LongBench normalization: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_zh_answer(s: str) -> str:
    """LongBench's Chinese normalization: lowercase, drop ASCII and CJK punctuation, remove all whitespace."""
    return "".join(ch for ch in s.lower() if ch not in _PUNCT and ch not in _ZH_PUNCT and not ch.isspace())


# ---- token-overlap scores --------------------------------------------------------------------------------------
def f1_tokens(pred: list[str], ref: list[str]) -> float:
    """Bag-of-tokens F1: common = |pred ∩ ref| (multiset); P = common/|pred|, R = common/|ref|, F1 = 2PR/(P+R)."""
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def qa_f1(pred: str, ref: str, **_) -> float:
    """LongBench qa_f1_score: token F1 of the normalized answers."""
    return f1_tokens(normalize_answer(pred).split(), normalize_answer(ref).split())


def qa_f1_zh(pred: str, ref: str, **_) -> float:
    """Chinese qa-F1 over characters (LongBench segments words with jieba; characters need no extra package)."""
    return f1_tokens(list(normalize_zh_answer(pred)), list(normalize_zh_answer(ref)))


def exact_match(pred: str, ref: str, **_) -> float:
    """1.0 when the normalized prediction equals the normalized reference."""
    return float(normalize_answer(pred) == normalize_answer(ref))


# ---- longest common subsequence ---------------------------------------------------------------------------------
def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (O(|a|·|b|) time, O(|b|) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str, **_) -> float:
    """ROUGE-L F1: P = LCS/|pred|, R = LCS/|ref| over lowercase word tokens, F = 2PR/(P+R) (0 for empty input)."""
    p_tok, r_tok = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    if not p_tok or not r_tok:
        return 0.0
    lcs = lcs_length(p_tok, r_tok)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(p_tok), lcs / len(r_tok)
    return 2 * p * r / (p + r)


def rouge_l_zh(pred: str, ref: str, **_) -> float:
    """ROUGE-L over characters for Chinese (LongBench segments with jieba first)."""
    return rouge_l(" ".join(normalize_zh_answer(pred)), " ".join(normalize_zh_answer(ref)))


def indel_similarity(a: str, b: str) -> float:
    """Normalized InDel similarity 2·LCS(a, b) / (|a| + |b|) (1.0 for two empty strings); Levenshtein.ratio."""
    if not a and not b:
        return 1.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def edit_similarity(pred: str, ref: str, **_) -> float:
    """LongBench code_sim_score: the first prediction line without ` # or //, scored by fuzz.ratio / 100 against
    the reference (fuzz.ratio = round(100 · InDel similarity))."""
    line = ""
    for candidate in pred.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return round(100 * indel_similarity(line, ref)) / 100


# ---- classification, count, retrieval ---------------------------------------------------------------------------
def classification(pred: str, ref: str, all_classes=None, **_) -> float:
    """LongBench classification_score: classes named in the prediction, minus those that are strict substrings of
    the reference; 1/len(matches) when the reference is among them, else 0.

    (LongBench's own code removes items from the list it iterates and has an `if list != 0` branch that is always
    taken; this is the behaviour that code intends, which equals it whenever no two matched classes are adjacent
    substrings of the reference.)
    """
    if not all_classes:
        raise BadInput("classification needs all_classes (the record's list of class names)")
    matches = [c for c in all_classes if c in pred]
    matches = [c for c in matches if not (c in ref and c != ref)]
    return 1.0 / len(matches) if ref in matches else 0.0


def count_score(pred: str, ref: str, **_) -> float:
    """LongBench passage_count: fraction of the numbers in the prediction that equal the reference."""
    numbers = re.findall(r"\d+", pred)
    return sum(n == str(ref) for n in numbers) / len(numbers) if numbers else 0.0


def _retrieval(pred: str, ref: str, pattern: str) -> float:
    found = re.findall(pattern, ref)
    if not found:
        raise BadInput(f"retrieval reference {ref!r} names no paragraph (pattern {pattern!r})")
    numbers = re.findall(r"\d+", pred)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(pred: str, ref: str, **_) -> float:
    """LongBench passage_retrieval_en: fraction of the prediction's numbers equal to the reference paragraph id."""
    return _retrieval(pred, ref, r"Paragraph (\d+)")


def retrieval_zh_score(pred: str, ref: str, **_) -> float:
    """LongBench passage_retrieval_zh (references like 段落3)."""
    return _retrieval(pred, ref, r"段落(\d+)")


# ---- RULER / needle scores ---------------------------------------------------------------------------------------
def string_match_all(pred: str, refs: list[str]) -> float:
    """RULER string_match_all: fraction of the references found (case-insensitive) in the prediction."""
    if not refs:
        raise BadInput("string_match_all needs at least one reference")
    low = pred.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


# ---- LongBench dataset -> metric -----------------------------------------------------------------------------------
LONGBENCH_METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_l_zh",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "vcsum": "rouge_l_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l", "lsht": "classification",
    "passage_retrieval_en": "retrieval", "passage_count": "count", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "edit_similarity", "repobench-p": "edit_similarity",
}
METRICS = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "exact_match": exact_match, "rouge_l": rouge_l, "rouge_l_zh": rouge_l_zh,
    "classification": classification, "edit_similarity": edit_similarity, "count": count_score,
    "retrieval": retrieval_score, "retrieval_zh": retrieval_zh_score,
}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}


def longbench_dataset(name: str) -> str:
    """The LongBench dataset name without the LongBench-E suffix ("hotpotqa_e" -> "hotpotqa")."""
    return name[:-2] if name.endswith("_e") else name


def longbench_score(dataset: str, pred: str, answers: list[str], all_classes=None) -> float:
    """LongBench per-sample score in [0, 1]: the dataset's metric, maximized over the reference answers."""
    ds = longbench_dataset(dataset)
    metric = METRICS[LONGBENCH_METRIC.get(ds, "qa_f1")]
    if ds in FIRST_LINE_ONLY:
        pred = pred.lstrip("\n").split("\n")[0]
    return max((metric(pred, ref, all_classes=all_classes) for ref in answers), default=0.0)
