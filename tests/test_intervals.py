"""Uncertainty in `minikv eval` (minikv/tools/eval/records.py): the Wilson score interval against values computed
here from its defining quadratic and against published values, the percentile bootstrap (deterministic, the
percentile rule, contains the statistic, narrower with more samples, near-nominal coverage), and the tables' '*'
marker (an interval disjoint from the first row's in the same column) on synthetic records."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import example, given, strategies as st

from minikv.tools.eval import records as R
from minikv.tools.eval.records import bootstrap_interval, markdown_table, summary, wilson_interval

Z = 1.96


def wilson_by_quadratic(k: float, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson bounds as the two roots p of (k/n - p)^2 = z^2 p (1 - p) / n, i.e. of
    (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0 (written out separately from the implementation)."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 5), (5, 5), (3, 5), (50, 50), (25, 50), (1, 3), (7, 20)])
def test_wilson_matches_its_quadratic(k, n):
    lo, hi = wilson_interval(k, n)
    want = wilson_by_quadratic(k, n)
    assert lo == pytest.approx(max(0.0, want[0]), abs=1e-12) and hi == pytest.approx(min(1.0, want[1]), abs=1e-12)


@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 5, 0.0, 0.4345), (5, 5, 0.5655, 1.0), (3, 5, 0.2307, 0.8824), (50, 50, 0.9287, 1.0), (25, 50, 0.3664, 0.6336),
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval without continuity correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_wilson_edges_and_coverage():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0       # clamped, never outside [0, 1]
    assert wilson_interval(1.5, 3) == pytest.approx(wilson_by_quadratic(1.5, 3))    # fractional: mean score × n
    assert wilson_interval(3, 5, z=2.576)[0] < wilson_interval(3, 5)[0]             # 99% is wider than 95%
    # Exact coverage at p = 0.5, n = 50 (sum of binomial probabilities of the k whose interval holds p): near 95%.
    n, p = 50, 0.5
    cover = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)
                if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1])
    assert 0.93 < cover < 0.975, cover


@given(k=st.integers(0, 200), extra=st.integers(0, 200))
@example(k=128, extra=0)      # found by hypothesis: the upper bound rounded to 1 - 1e-16 < 128/128
def test_wilson_holds_the_proportion_and_narrows(k, extra):
    n = k + extra
    if n == 0:
        return
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo4, hi4 = wilson_interval(4 * k, 4 * n)                                        # same proportion, 4x the data
    assert hi4 - lo4 < hi - lo


def test_bootstrap_is_deterministic_and_uses_the_stated_percentiles():
    rng = random.Random(1)
    values = [rng.gauss(20, 2) for _ in range(30)]
    assert bootstrap_interval(values, R.mean, 500, seed=3) == bootstrap_interval(values, R.mean, 500, seed=3)
    assert bootstrap_interval(values, R.mean, 500, seed=3) != bootstrap_interval(values, R.mean, 500, seed=4)
    assert bootstrap_interval(values) == bootstrap_interval(values, R.mean, R.RESAMPLES, 0)
    calls = []
    counter = lambda xs: (calls.append(len(xs)), len(calls) - 1)[1]                 # the i-th resample's stat is i
    assert bootstrap_interval(values, counter, 2000, seed=0) == (50, 1949)           # k = floor(0.025 · 2000) = 50
    assert len(calls) == 2000 and set(calls) == {30}                                # resamples of the sample's size
    assert bootstrap_interval([7.0] * 5, R.mean, 100, 0) == (7.0, 7.0)


@given(values=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=25), seed=st.integers(0, 2**32))
def test_bootstrap_contains_the_sample_statistic(values, seed):
    lo, hi = bootstrap_interval(values, R.mean, 200, seed)
    m, tol = R.mean(values), 1e-9 * (1 + max(map(abs, values)))     # a mean of [a, a, a] may round past a
    assert lo <= hi and min(values) - tol <= lo and hi <= max(values) + tol
    assert lo - tol <= m <= hi + tol


@given(seed=st.integers(0, 2**32))
def test_bootstrap_narrower_with_more_texts_on_average(seed):
    rng = random.Random(seed)
    width = lambda n: sum(hi - lo for lo, hi in (bootstrap_interval([rng.expovariate(1) for _ in range(n)], R.mean,
                                                                    200, i) for i in range(8))) / 8
    assert width(40) < width(5)


def test_bootstrap_coverage_near_nominal():
    rng, hits = random.Random(0), 0
    for i in range(200):
        lo, hi = bootstrap_interval([rng.gauss(10, 3) for _ in range(30)], R.mean, 400, i)
        hits += lo <= 10 <= hi
    assert 0.86 <= hits / 200 <= 0.99, hits                      # percentile bootstrap: a little below 95% at n = 30


# ---- the tables ---------------------------------------------------------------------------------------------------
def _recs(task, policy, budget, scores, ratio):
    return [{"id": f"{policy}{budget}{i}", "task": task, "policy": policy, "budget": budget, "question": "aware" if
             task != "ppl" else "none", "metric": "ppl" if task == "ppl" else "contains", "score": s,
             "cache_ratio": ratio, "length": 100, "depth": 0.5, "sample": i, "seed": 0} for i, s in enumerate(scores)]


def _row(table: str, policy: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {policy} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table_marks_intervals_disjoint_from_the_reference():
    recs = (_recs("passkey", "full", None, [1.0] * 10, 1.0) + _recs("passkey", "h2o", "0.2", [0.0] * 10, 0.2)
            + _recs("passkey", "snapkv", "0.2", [1.0] * 9 + [0.0], 0.2)
            + _recs("passkey", "h2o", "0.5", [1.0] * 6 + [0.0] * 4, 0.5)
            + _recs("passkey", "snapkv", "0.5", [1.0] * 10, 0.5))
    table = markdown_table(recs, ["0.2", "0.5"], ["full", "h2o", "snapkv"])
    lo, hi = wilson_interval(0, 10)
    assert _row(table, "h2o")[0] == f"0.00*† [{lo:.2f}, {hi:.2f}] n=10 (0.20)"      # [0, .28] vs full's [.72, 1]
    assert _row(table, "snapkv")[0] == "0.90 [0.60, 0.98] n=10 (0.20)"      # overlaps full's; 1 of 10 differs: p = 1
    assert _row(table, "h2o")[1] == "0.60 [0.31, 0.83] n=10 (0.50)"         # overlaps [.72, 1]; 4 differ: p = 0.125
    assert _row(table, "full") == ["1.00 [0.72, 1.00] n=10 (1.00)"] * 2             # the reference: never marked
    assert "*: the interval does not overlap full's in the same column" in table and "Wilson score" in table
    # The reference is the first row: listed first, snapkv is the one h2o is compared with (and full is marked).
    other = markdown_table(recs, ["0.2"], ["snapkv", "full", "h2o"])
    assert _row(other, "h2o")[0].startswith("0.00*† [") and _row(other, "full")[0].startswith("1.00 [")
    assert "overlap snapkv's" in other


def test_table_perplexity_bootstrap_and_one_text():
    rng = random.Random(0)
    recs = (_recs("ppl", "full", None, [20 + rng.gauss(0, 0.2) for _ in range(8)], 1.0)
            + _recs("ppl", "h2o", "0.2", [25 + rng.gauss(0, 0.2) for _ in range(8)], 0.2)
            + _recs("ppl", "streaming", "0.2", [20.1 + rng.gauss(0, 0.2) for _ in range(8)], 0.2)
            + _recs("ppl", "d2o", "0.2", [30.0], 0.3))
    table = markdown_table(recs, ["0.2"], ["full", "h2o", "streaming", "d2o"])
    m, lo, hi, n = summary([r for r in recs if r["policy"] == "h2o"])
    assert (lo, hi) == bootstrap_interval([r["score"] for r in recs if r["policy"] == "h2o"], R.mean, R.RESAMPLES, 0)
    assert n == 8 and lo < m < hi and _row(table, "h2o")[0] == f"{m:.2f}*† [{lo:.2f}, {hi:.2f}] n=8 (0.20)"
    assert "*" not in _row(table, "streaming")[0]
    assert _row(table, "d2o")[0] == "30.00 n=1 (0.30)"                            # one text: no interval, no mark
    assert "percentile bootstrap over the texts (2000 resamples, seed 0" in table and "n=texts" in table


def test_sign_test_by_hand():
    # RESULTS.md's D2O vs H2O perplexity: 15 of 16 texts worse -> 2 (C(16,0) + C(16,1)) / 2^16 = 34 / 65536
    assert R.paired_sign_test(_recs("ppl", "d2o", "0.2", [2.0] * 15 + [0.0], 0.3),
                              _recs("ppl", "h2o", "0.2", [1.0] * 16, 0.3)) == pytest.approx(34 / 65536)
    same = _recs("ppl", "a", "0.2", [1.0, 2.0, 3.0], 1)
    assert R.paired_sign_test(same, same) == 1.0                                       # all ties: nothing to test
    assert R.paired_sign_test(_recs("ppl", "a", "0.2", [2.0] * 5, 1), _recs("ppl", "b", "0.2", [1.0] * 5, 1)) == 2 / 32


def test_sign_test_pairs_by_prompt_not_by_order():
    ref = _recs("ppl", "full", None, [10.0 * i for i in range(8)], 1.0)              # texts of very different ppl
    worse = _recs("ppl", "h2o", "0.2", [10.0 * i + 0.5 for i in range(8)], 0.2)     # each text +0.5
    assert R.paired_sign_test(worse[::-1], ref) == 2 / 256                            # order does not matter
    table = markdown_table(ref + worse, ["0.2"], ["full", "h2o"])
    assert _row(table, "h2o")[0].startswith("35.50† [")                 # intervals overlap (no *), pairs do not
    shuffled = [dict(r, sample=(r["sample"] + 1) % 8) for r in worse]   # paired with the wrong texts: no longer
    assert R.paired_sign_test(shuffled, ref) > 0.05
    assert R.paired_sign_test(worse[:3], ref) == 2 / 8                   # only the texts both ran are paired


def test_quality_plot_draws_intervals(tmp_path):
    pytest.importorskip("matplotlib")
    from minikv.tools.eval import plots
    recs = (_recs("passkey", "full", None, [1.0, 1.0, 0.0], 1.0) + _recs("passkey", "h2o", "0.2", [0.0, 1.0], 0.2)
            + _recs("ppl", "full", None, [20.0], 1.0) + _recs("ppl", "h2o", "0.2", [25.0, 26.0, 24.0], 0.2))
    seen = []
    import matplotlib.axes
    real = matplotlib.axes.Axes.errorbar
    matplotlib.axes.Axes.errorbar = lambda ax, x, y, yerr=None, **k: (seen.append((x, y, yerr, k["label"])),
                                                                      real(ax, x, y, yerr=yerr, **k))[1]
    try:
        assert plots.quality_vs_ratio(recs, tmp_path / "q.png").stat().st_size > 1000
    finally:
        matplotlib.axes.Axes.errorbar = real
    lo, hi = wilson_interval(2, 3)
    assert [label for *_, label in seen] == ["full", "h2o", "full", "h2o"]          # one panel per task
    bars = {round(y[0], 6): yerr for _, y, yerr, _ in seen}                           # one point per policy here
    assert len(seen) == 4 and bars[round(2 / 3, 6)] == [[pytest.approx(2 / 3 - lo)], [pytest.approx(hi - 2 / 3)]]
    assert bars[20.0] == [[0.0], [0.0]]                                                # one text: no bar
    ppl_lo, ppl_hi = bootstrap_interval([25.0, 26.0, 24.0])
    assert bars[25.0] == [[pytest.approx(25 - ppl_lo)], [pytest.approx(ppl_hi - 25)]] and ppl_lo < 25 < ppl_hi
