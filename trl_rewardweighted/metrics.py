"""Evaluation metrics for comparing alignment methods, as pure functions (no model, no I/O).

Numbers in, numbers out: every function takes Python sequences, NumPy arrays or torch tensors (converted to float64
NumPy without importing torch) and returns Python floats, ints, named tuples or dicts. Everything random is drawn
from `numpy.random.default_rng(seed)`, so a call is reproducible given its seed.

- uncertainty: [`bootstrap_ci`], [`paired_bootstrap_diff`];
- head-to-head: [`win_tie_loss`];
- diversity: [`distinct_n`], [`self_bleu`] (with the BLEU helper [`sentence_bleu`]);
- calibration: [`misalignment_rate`] (VCB's pair-order check);
- cost in KL: [`kl_summary`], [`reward_per_nat`];
- length: [`response_length_summary`].

The definitions, and how to read them when comparing methods, are in `docs/evaluation.md`.
"""

from __future__ import annotations

import math
import warnings
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "BootstrapInterval",
    "Misalignment",
    "PairedDifference",
    "bootstrap_ci",
    "distinct_n",
    "kl_summary",
    "misalignment_rate",
    "paired_bootstrap_diff",
    "pooled_paired_diff",
    "response_length_summary",
    "reward_per_nat",
    "self_bleu",
    "sentence_bleu",
    "win_tie_loss",
]

BLEU_SMOOTHINGS = ("method1", "add1", "none")

# Resampling is done in chunks of at most this many drawn indices (about 32 MB of int64), whatever the sample size.
_MAX_CELLS = 1 << 22


class BootstrapInterval(NamedTuple):
    """A point estimate and its percentile bootstrap interval (unpacks as `estimate, low, high`)."""

    estimate: float
    low: float
    high: float


class PairedDifference(NamedTuple):
    """Mean paired difference `a - b`, its bootstrap interval and the fraction of resampled means `<= 0`."""

    diff: float
    low: float
    high: float
    frac_le_zero: float


class PooledDifference(NamedTuple):
    """Mean paired difference pooled over seeds, its two-level bootstrap interval, the fraction of resampled means
    `<= 0`, and the point estimate of each seed."""

    diff: float
    low: float
    high: float
    frac_le_zero: float
    per_seed: tuple[float, ...]


class Misalignment(NamedTuple):
    """Fraction of counted pairs whose log-ratio order disagrees with the reward order, and how many were counted."""

    rate: float
    num_pairs: int


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


def _to_float_array(name: str, values: Any) -> np.ndarray:
    """float64 NumPy copy of a sequence, an array or a torch tensor (any dtype, any device)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor, without importing torch
        values = values.detach().cpu().double().numpy()
    if isinstance(values, (str, bytes)):
        raise ValueError(f"`{name}` must be numbers, got a string ({values!r:.40}).")
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be numbers (a list, an array or a tensor): {error}") from None


def _check_finite(name: str, x: np.ndarray, where: np.ndarray | None = None) -> None:
    bad = ~np.isfinite(x)
    if where is not None:
        bad &= where
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        first = first[0] if len(first) == 1 else first
        raise ValueError(
            f"`{name}` contains {int(bad.sum())} non-finite value(s) (NaN or inf), the first at index {first}; "
            "drop or fix those rows before computing the metric."
        )


def _sample_1d(name: str, values: Any) -> np.ndarray:
    """A non-empty, finite, 1-D float64 sample."""
    x = _to_float_array(name, values)
    if x.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one value per sample), got shape {x.shape}.")
    if x.size == 0:
        raise ValueError(f"`{name}` is empty: the metric needs at least one value.")
    _check_finite(name, x)
    return x


def _number(name: str, value: Any) -> float:
    """`value` as a float; a bool, a string or a non-number is an error."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"`{name}` must be a number, got {type(value).__name__} ({value!r:.40}).")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {type(value).__name__} ({value!r:.40}).") from None


def _check_tolerance(name: str, value: Any) -> None:
    x = _number(name, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"`n_resamples` must be an integer >= 1, got {n_resamples!r}.")
    if not 0.0 < confidence < 1.0:  # also catches NaN
        raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {confidence!r}.")


_STATISTICS = {"mean": np.mean, "median": np.median}


def _statistic(statistic: str) -> Callable[..., Any]:
    fn = _STATISTICS.get(statistic)
    if fn is None:
        raise ValueError(f"`statistic` must be one of {sorted(_STATISTICS)}, got {statistic!r}.")
    return fn


def _bootstrap_distribution(x: np.ndarray, n_resamples: int, seed: int, stat: Callable[..., Any]) -> np.ndarray:
    """The statistic on `n_resamples` resamples (with replacement, same size) of `x`."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    out = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, _MAX_CELLS // n)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = stat(x[idx], axis=1)
    return out


def _percentiles(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(dist, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------------------------------
# Uncertainty
# ----------------------------------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Any,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: str = "mean",
) -> BootstrapInterval:
    """Percentile bootstrap interval of the mean (or median) of a 1-D sample.

    Draws `n_resamples` resamples of the same size with replacement, computes the statistic on each, and returns the
    statistic on the sample with the `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of the resampled
    statistics. A sample of one value, or of identical values, has the zero-width interval `(v, v, v)`.

    Args:
        values (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            1-D sample, e.g. one reward per evaluation prompt. Must be non-empty and finite.
        n_resamples (`int`, *optional*, defaults to `2000`):
            Number of bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval, in `(0, 1)`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of `numpy.random.default_rng`; the same seed gives the same interval.
        statistic (`str`, *optional*, defaults to `"mean"`):
            `"mean"` or `"median"`.

    Returns:
        [`BootstrapInterval`]: `(estimate, low, high)` as floats.

    Raises:
        `ValueError`: on an empty, non-1-D or non-finite sample, or bad arguments.

    Example:

    ```python
    >>> bootstrap_ci([2.0, 2.0, 2.0])
    BootstrapInterval(estimate=2.0, low=2.0, high=2.0)
    >>> est, low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0)
    >>> est, low <= est <= high
    (2.5, True)
    ```
    """
    _check_bootstrap_args(n_resamples, confidence)
    stat = _statistic(statistic)
    x = _sample_1d("values", values)
    estimate = float(stat(x))
    if x.size == 1 or np.all(x == x[0]):
        return BootstrapInterval(estimate, estimate, estimate)
    low, high = _percentiles(_bootstrap_distribution(x, n_resamples, seed, stat), confidence)
    return BootstrapInterval(estimate, low, high)


def paired_bootstrap_diff(
    a: Any,
    b: Any,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of the mean difference `a - b` over the same prompts.

    `a[k]` and `b[k]` must be scores of two methods on the same prompt `k`; the prompts (not the two samples
    separately) are resampled, so prompt difficulty cancels out. `frac_le_zero` is the fraction of resampled mean
    differences that are `<= 0`: a one-sided, p-value-like measure of how often the resampled data do not show `a`
    above `b` (small means "A beats B" is consistent across resamples). Say that A beats B only when `low > 0`.

    Args:
        a (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            Scores of method A, 1-D, one per prompt.
        b (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            Scores of method B on the same prompts, in the same order (same length as `a`).
        n_resamples (`int`, *optional*, defaults to `2000`):
            Number of bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval, in `(0, 1)`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of `numpy.random.default_rng`.

    Returns:
        [`PairedDifference`]: `(diff, low, high, frac_le_zero)`. With one prompt, or identical differences, the
        interval is the point and `frac_le_zero` is `1.0` if `diff <= 0` else `0.0`.

    Raises:
        `ValueError`: on lengths that differ, empty or non-finite input.

    Example:

    ```python
    >>> paired_bootstrap_diff([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    PairedDifference(diff=1.0, low=1.0, high=1.0, frac_le_zero=0.0)
    ```
    """
    _check_bootstrap_args(n_resamples, confidence)
    x = _sample_1d("a", a)
    y = _sample_1d("b", b)
    if x.shape != y.shape:
        raise ValueError(
            f"`a` has {x.size} values but `b` has {y.size}: a paired comparison needs one score of each method per "
            "prompt, in the same prompt order."
        )
    d = x - y
    estimate = float(np.mean(d))
    if d.size == 1 or np.all(d == d[0]):
        return PairedDifference(estimate, estimate, estimate, 1.0 if estimate <= 0 else 0.0)
    dist = _bootstrap_distribution(d, n_resamples, seed, np.mean)
    low, high = _percentiles(dist, confidence)
    return PairedDifference(estimate, low, high, float(np.mean(dist <= 0)))


def pooled_paired_diff(
    a_by_seed: Sequence[Any],
    b_by_seed: Sequence[Any],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PooledDifference:
    """Paired difference `a - b` pooled over several seeds (independent repeats of a run), with a two-level bootstrap
    over seeds and prompts.

    `a_by_seed[s][k]` and `b_by_seed[s][k]` are the scores of two methods on prompt `k` in repeat `s`. The pooled
    estimate is the mean over seeds of each seed's mean difference. Each resample draws the seeds with replacement,
    then, for every drawn seed, its prompts with replacement, and takes the same mean: the interval holds the
    spread between seeds (a training run that went differently) as well as between prompts. With one seed it is the
    paired bootstrap over prompts ([`paired_bootstrap_diff`]); with few seeds it is wide, as it should be.

    Args:
        a_by_seed (`Sequence`):
            Per seed, a 1-D sequence of scores of method A, one per prompt.
        b_by_seed (`Sequence`):
            Per seed, the scores of method B on the same prompts in the same order (same lengths as `a_by_seed`).
        n_resamples, confidence, seed:
            As in [`paired_bootstrap_diff`].

    Returns:
        [`PooledDifference`]: `(diff, low, high, frac_le_zero, per_seed)`.

    Raises:
        `ValueError`: on no seeds, lengths that differ, empty or non-finite input.

    Example:

    ```python
    >>> pooled_paired_diff([[1.0, 2.0], [3.0, 3.0]], [[0.0, 1.0], [1.0, 1.0]]).per_seed
    (1.0, 2.0)
    ```
    """
    _check_bootstrap_args(n_resamples, confidence)
    if len(a_by_seed) != len(b_by_seed) or not len(a_by_seed):
        raise ValueError(
            f"`a_by_seed` has {len(a_by_seed)} seeds and `b_by_seed` {len(b_by_seed)}: give both methods' scores for "
            "the same seeds (at least one)."
        )
    diffs = []
    for s, (a, b) in enumerate(zip(a_by_seed, b_by_seed)):
        x, y = _sample_1d(f"a_by_seed[{s}]", a), _sample_1d(f"b_by_seed[{s}]", b)
        if x.shape != y.shape:
            raise ValueError(
                f"Seed {s}: `a` has {x.size} values but `b` has {y.size}: a paired comparison needs one score of each "
                "method per prompt, in the same prompt order."
            )
        diffs.append(x - y)
    per_seed = tuple(float(np.mean(d)) for d in diffs)
    if len(diffs) == 1:
        return PooledDifference(
            *paired_bootstrap_diff(diffs[0], np.zeros_like(diffs[0]), n_resamples, confidence, seed), per_seed
        )
    estimate = float(np.mean(per_seed))
    if all(d.size == 1 or np.all(d == d[0]) for d in diffs) and len(set(per_seed)) == 1:
        return PooledDifference(estimate, estimate, estimate, 1.0 if estimate <= 0 else 0.0, per_seed)
    rng = np.random.default_rng(seed)
    num_seeds = len(diffs)
    # means[s][i, j]: seed s's mean difference over its prompts resampled for resample i at seed position j.
    means = [
        np.stack(
            [_bootstrap_distribution(d, n_resamples, int(rng.integers(2**31)), np.mean) for _ in range(num_seeds)],
            axis=1,
        )
        for d in diffs
    ]
    drawn = rng.integers(0, num_seeds, size=(n_resamples, num_seeds))
    stacked = np.stack(means)  # (seeds, resamples, positions)
    rows = np.arange(n_resamples)[:, None]
    dist = stacked[drawn, rows, np.arange(num_seeds)[None, :]].mean(axis=1)
    low, high = _percentiles(dist, confidence)
    return PooledDifference(estimate, low, high, float(np.mean(dist <= 0)), per_seed)


# ----------------------------------------------------------------------------------------------------------------------
# Head-to-head
# ----------------------------------------------------------------------------------------------------------------------


def win_tie_loss(scores_a: Any, scores_b: Any, tie_tolerance: float = 0.0) -> dict[str, float | int]:
    """Win, tie and loss rates of A against B over the same prompts.

    For each prompt `k`, A wins when `a_k - b_k > tie_tolerance`, loses when `a_k - b_k < -tie_tolerance`, and ties
    when `|a_k - b_k| <= tie_tolerance`. `win_rate_with_ties = (wins + 0.5 * ties) / n` counts a tie as half a win,
    so two equal methods score 0.5.

    Args:
        scores_a (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            Scores of method A (e.g. rewards of its responses), 1-D, one per prompt.
        scores_b (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            Scores of method B on the same prompts, same order and length.
        tie_tolerance (`float`, *optional*, defaults to `0.0`):
            Largest absolute difference still counted as a tie (`>= 0`).

    Returns:
        `dict`: `win_rate`, `tie_rate`, `loss_rate` (fractions summing to 1 up to rounding), `win_rate_with_ties`,
        and the counts `wins`, `ties`, `losses`, `n`.

    Example:

    ```python
    >>> win_tie_loss([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 4.0])["win_rate_with_ties"]
    0.625
    ```
    """
    _check_tolerance("tie_tolerance", tie_tolerance)
    a = _sample_1d("scores_a", scores_a)
    b = _sample_1d("scores_b", scores_b)
    if a.shape != b.shape:
        raise ValueError(
            f"`scores_a` has {a.size} values but `scores_b` has {b.size}: win rates compare the two methods prompt by "
            "prompt, so both need one score per prompt, in the same order."
        )
    d = a - b
    n = int(d.size)
    wins = int(np.sum(d > tie_tolerance))
    losses = int(np.sum(d < -tie_tolerance))
    ties = n - wins - losses
    return {
        "win_rate": wins / n,
        "tie_rate": ties / n,
        "loss_rate": losses / n,
        "win_rate_with_ties": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Diversity: distinct-n and self-BLEU
# ----------------------------------------------------------------------------------------------------------------------


def _tokenized(texts: Any, tokenize: Callable[[str], Sequence[str]] | None, name: str = "texts") -> list[list[Any]]:
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"`{name}` must be a list of strings, got a single string ({texts!r:.40}).")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"`{name}` must be a list of strings, got {type(texts).__name__}.") from None
    tokenize = str.split if tokenize is None else tokenize
    out = []
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"`{name}[{k}]` is {type(text).__name__} ({text!r:.40}), not a string.")
        out.append(list(tokenize(text)))
    return out


def _ngrams(tokens: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _check_order(name: str, n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {n!r}.")


def distinct_n(texts: Sequence[str], n: int, tokenize: Callable[[str], Sequence[str]] | None = None) -> float:
    """Corpus-level distinct-n: distinct n-grams over total n-grams, pooled over all responses (Li et al., 2016).

    The n-grams of each response are taken inside that response (none spans two responses); the distinct count is
    over the union of all of them. 1.0 means no n-gram repeats anywhere in the set; lower means more repetition.
    When no response has `n` tokens there are no n-grams and the result is `0.0` (not NaN).

    Args:
        texts (`list[str]`):
            The responses (e.g. all responses of a method on the evaluation prompts). Must be non-empty.
        n (`int`):
            The n-gram order, `>= 1` (1 and 2 are the usual distinct-1 / distinct-2).
        tokenize (`Callable[[str], list[str]]` or `None`, *optional*):
            Splits a text into tokens; `None` splits on whitespace (`str.split`, case kept).

    Returns:
        `float`: In `[0, 1]`.

    Example:

    ```python
    >>> distinct_n(["a b a", "a c"], n=1)  # tokens a b a a c: 3 distinct of 5
    0.6
    ```
    """
    _check_order("n", n)
    tokens = _tokenized(texts, tokenize)
    if not tokens:
        raise ValueError("`texts` is empty: distinct-n needs at least one response.")
    total = 0
    seen: set[tuple[Any, ...]] = set()
    for toks in tokens:
        grams = _ngrams(toks, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def _check_smoothing(smoothing: str, epsilon: float) -> None:
    if smoothing not in BLEU_SMOOTHINGS:
        raise ValueError(f"`smoothing` must be one of {BLEU_SMOOTHINGS}, got {smoothing!r}.")
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon!r}.")


def _bleu_from_stats(
    matches: Sequence[int],
    totals: Sequence[int],
    hyp_len: int,
    ref_len: int,
    smoothing: str,
    epsilon: float,
) -> float:
    """BLEU from the clipped match counts and hypothesis n-gram counts of orders 1..max_n (uniform weights)."""
    if hyp_len == 0:
        return 0.0
    max_n = len(matches)
    log_p = 0.0
    for k in range(max_n):  # k = n - 1
        num, den = float(matches[k]), float(max(1, totals[k]))
        if smoothing == "add1" and k >= 1:
            num, den = num + 1.0, den + 1.0
        if num == 0.0:
            if smoothing != "method1":
                return 0.0
            num = epsilon
        log_p += math.log(num / den) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _closest_ref_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def sentence_bleu(
    hypothesis_tokens: Sequence[Any],
    references_tokens: Sequence[Sequence[Any]],
    max_n: int = 4,
    smoothing: str = "method1",
    epsilon: float = 0.1,
) -> float:
    """BLEU of one tokenised hypothesis against one or more tokenised references (Papineni et al., 2002).

    `BLEU = BP * exp(sum_n (1 / max_n) * log p_n)`, n = 1..max_n, with:

    - `p_n` the clipped n-gram precision: each hypothesis n-gram counts at most as often as it appears in the single
      reference where it appears most, divided by the number of hypothesis n-grams (floored at 1, so a hypothesis
      shorter than n has 0 matches out of 1);
    - `BP = 1` if `c > r`, else `exp(1 - r / c)`, with `c` the hypothesis length and `r` the reference length closest
      to `c` (the shorter one on a tie).

    Smoothing of the precisions (Chen & Cherry, 2014):

    - `"method1"` (default, the choice of NLTK and Texygen's Self-BLEU): a zero match count becomes `epsilon`, i.e.
      `p_n = epsilon / total_n`. Unlike NLTK, a hypothesis with no unigram match is not forced to 0: it gets its
      small smoothed value;
    - `"add1"`: `p_n = (matches + 1) / (total + 1)` for n >= 2 (Lin & Och, 2004), unigrams unsmoothed;
    - `"none"`: plain BLEU; any zero precision gives 0.

    An empty hypothesis scores `0.0` (its brevity penalty is 0).

    Args:
        hypothesis_tokens (`list`):
            Tokens of the hypothesis (any hashable items).
        references_tokens (`list[list]`):
            Tokens of each reference; at least one reference.
        max_n (`int`, *optional*, defaults to `4`):
            Highest n-gram order; weights are uniform, `1 / max_n`.
        smoothing (`str`, *optional*, defaults to `"method1"`):
            `"method1"`, `"add1"` or `"none"`.
        epsilon (`float`, *optional*, defaults to `0.1`):
            The count that replaces a zero match count under `"method1"`.

    Returns:
        `float`: In `[0, 1]`.

    Example:

    ```python
    >>> sentence_bleu("the cat sat".split(), ["the cat ran".split()], max_n=2)  # sqrt(2/3 * 1/2)
    0.5773502691896257
    ```
    """
    _check_order("max_n", max_n)
    _check_smoothing(smoothing, epsilon)
    if isinstance(hypothesis_tokens, str) or any(isinstance(r, str) for r in references_tokens):
        raise ValueError(
            "`sentence_bleu` takes token lists, not strings: split the texts first (e.g. `text.split()`)."
        )
    hyp = list(hypothesis_tokens)
    refs = [list(r) for r in references_tokens]
    if not refs:
        raise ValueError("`references_tokens` is empty: BLEU needs at least one reference.")
    matches, totals = [], []
    for n in range(1, max_n + 1):
        hyp_counts = Counter(_ngrams(hyp, n))
        max_ref: Counter = Counter()
        for ref in refs:
            for gram, count in Counter(_ngrams(ref, n)).items():
                if count > max_ref[gram]:
                    max_ref[gram] = count
        matches.append(sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items()))
        totals.append(sum(hyp_counts.values()))
    ref_len = _closest_ref_length(len(hyp), [len(r) for r in refs])
    return _bleu_from_stats(matches, totals, len(hyp), ref_len, smoothing, epsilon)


def _closest_other_length(length: int, distinct_lengths: list[int], counts: Counter) -> int:
    """The length closest to `length` (shorter on a tie) among all texts but one text of that length itself."""
    pos = bisect_left(distinct_lengths, length)
    candidates = [distinct_lengths[pos - 1]] if pos > 0 else []
    if pos < len(distinct_lengths) and distinct_lengths[pos] == length:
        if counts[length] >= 2:
            candidates.append(length)
        pos += 1
    if pos < len(distinct_lengths):
        candidates.append(distinct_lengths[pos])
    return _closest_ref_length(length, candidates)


def self_bleu(
    texts: Sequence[str],
    max_n: int = 4,
    smoothing: str = "method1",
    epsilon: float = 0.1,
    tokenize: Callable[[str], Sequence[str]] | None = None,
) -> float:
    """Self-BLEU: mean over the responses of the BLEU of each one against all the others (Zhu et al., 2018, Texygen).

    `self_bleu = (1 / N) * sum_i sentence_bleu(t_i, [t_j for j != i])`, with [`sentence_bleu`]'s definition
    (clipped precisions up to `max_n`, uniform weights, closest-reference brevity penalty, `smoothing`). Higher means
    the responses resemble each other more (less diverse); identical responses give 1.0. Cost is linear in the total
    number of n-grams (each n-gram's two largest counts over the set give the clip for every hypothesis), so it is
    usable on thousands of responses. Which set to pass is the caller's choice: the responses to one prompt (the
    diversity of samples for a prompt, averaged over prompts afterwards) or one response per prompt over a test set.

    Args:
        texts (`list[str]`):
            At least two responses.
        max_n (`int`, *optional*, defaults to `4`):
            Highest n-gram order.
        smoothing (`str`, *optional*, defaults to `"method1"`):
            See [`sentence_bleu`].
        epsilon (`float`, *optional*, defaults to `0.1`):
            See [`sentence_bleu`].
        tokenize (`Callable[[str], list[str]]` or `None`, *optional*):
            Splits a text into tokens; `None` splits on whitespace.

    Returns:
        `float`: In `[0, 1]`.

    Example:

    ```python
    >>> self_bleu(["the cat sat on the mat", "the cat sat on the mat"])
    1.0
    ```
    """
    _check_order("max_n", max_n)
    _check_smoothing(smoothing, epsilon)
    tokens = _tokenized(texts, tokenize)
    if len(tokens) < 2:
        raise ValueError(
            f"`texts` has {len(tokens)} response(s): self-BLEU scores each response against the others, so it needs "
            "at least 2."
        )
    per_text = [Counter(g for n in range(1, max_n + 1) for g in _ngrams(toks, n)) for toks in tokens]
    # For each n-gram: its largest count in any text (and which text), and the second largest (0 if only one text has
    # it). The clip for hypothesis i is the largest count among the other texts.
    best: dict[tuple[Any, ...], tuple[int, int]] = {}
    second: Counter = Counter()
    for i, counts in enumerate(per_text):
        for gram, count in counts.items():
            top = best.get(gram)
            if top is None:
                best[gram] = (count, i)
            elif count > top[0]:
                second[gram] = top[0]
                best[gram] = (count, i)
            elif count > second[gram]:
                second[gram] = count
    lengths = [len(t) for t in tokens]
    length_counts = Counter(lengths)
    distinct_lengths = sorted(length_counts)
    scores = []
    for i, counts in enumerate(per_text):
        matches, totals = [0] * max_n, [0] * max_n
        for gram, count in counts.items():
            top, owner = best[gram]
            clip = second[gram] if owner == i else top
            matches[len(gram) - 1] += min(count, clip)
            totals[len(gram) - 1] += count
        hyp_len = lengths[i]
        ref_len = _closest_other_length(hyp_len, distinct_lengths, length_counts)
        scores.append(_bleu_from_stats(matches, totals, hyp_len, ref_len, smoothing, epsilon))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------------------
# Calibration: VCB's misalignment rate
# ----------------------------------------------------------------------------------------------------------------------


def misalignment_rate(
    policy_logratios: Any,
    rewards: Any,
    mask: Any = None,
    tol: float = 0.0,
) -> Misalignment:
    """Fraction of same-prompt response pairs whose policy log-ratio order disagrees with their reward order.

    For each prompt g and each pair `i < j` of its valid responses with distinct rewards (`|r_gi - r_gj| > tol`), the
    pair is aligned when `lr_gi - lr_gj` has the same sign as `r_gi - r_gj`, with `lr = log pi(y|x) - log pi_ref(y|x)`.
    The rate is misaligned pairs / counted pairs, over all prompts together. Two conventions:

    - pairs with equal rewards (within `tol`) are left out: they have no order to agree with;
    - a pair with equal log-ratios but distinct rewards counts as misaligned (the policy does not separate what the
      reward separates), so a policy equal to its reference (all log-ratios 0) has rate 1.0.

    This is `1 - pair_agreement` of the VCB trainer's metrics (`trl_rewardweighted.losses.vcb_pair_stats`), on data
    the caller chooses (e.g. held-out prompts with n scored samples each).

    Args:
        policy_logratios (`numpy.ndarray`, `torch.Tensor` or nested lists):
            `log pi - log pi_ref` (summed over the completion tokens) of shape `(G, n)`: G prompts, n responses each.
            A 1-D `(n,)` input is one prompt.
        rewards (`numpy.ndarray`, `torch.Tensor` or nested lists):
            Rewards of the same shape.
        mask (`numpy.ndarray`, `torch.Tensor` or `None`, *optional*):
            Boolean, same shape; `False` marks padding of ragged groups (the values there are ignored and may be NaN).
        tol (`float`, *optional*, defaults to `0.0`):
            Two rewards within `tol` of each other count as equal.

    Returns:
        [`Misalignment`]: `(rate, num_pairs)`; `rate` is `float("nan")` when no pair has distinct rewards
        (`num_pairs == 0`).

    Raises:
        `ValueError`: on shapes that differ or a non-finite value at a position the mask keeps.

    Example:

    ```python
    >>> misalignment_rate([[0.1, 0.3, 0.2]], [[1.0, 2.0, 3.0]])  # pair (2nd, 3rd) is swapped
    Misalignment(rate=0.3333333333333333, num_pairs=3)
    ```
    """
    _check_tolerance("tol", tol)
    lr = _to_float_array("policy_logratios", policy_logratios)
    r = _to_float_array("rewards", rewards)
    if lr.ndim == 1 and r.ndim == 1:  # one prompt
        lr, r = lr[None, :], r[None, :]
    if lr.ndim != 2:
        raise ValueError(f"`policy_logratios` must be (G, n) or (n,), got shape {lr.shape}.")
    if r.shape != lr.shape:
        raise ValueError(f"`rewards` has shape {r.shape}, expected {lr.shape} like `policy_logratios`.")
    if mask is None:
        valid = np.ones(lr.shape, dtype=bool)
    else:
        if hasattr(mask, "detach") and hasattr(mask, "cpu"):
            mask = mask.detach().cpu().numpy()
        valid = np.asarray(mask)
        if valid.shape != lr.shape and valid.ndim == 1 and lr.shape[0] == 1:
            valid = valid[None, :]
        if valid.shape != lr.shape:
            raise ValueError(f"`mask` has shape {valid.shape}, expected {lr.shape} like `policy_logratios`.")
        if valid.dtype != bool:
            raise ValueError(f"`mask` must be boolean (True = a real response), got dtype {valid.dtype}.")
    _check_finite("policy_logratios", lr, valid)
    _check_finite("rewards", r, valid)
    lr = np.where(valid, lr, 0.0)
    r = np.where(valid, r, 0.0)
    d_lr = lr[:, :, None] - lr[:, None, :]
    d_r = r[:, :, None] - r[:, None, :]
    n = lr.shape[1]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    counted = valid[:, :, None] & valid[:, None, :] & upper & (np.abs(d_r) > tol)
    misaligned = counted & (np.sign(d_lr) != np.sign(d_r))
    num_pairs = int(counted.sum())
    rate = float(misaligned.sum()) / num_pairs if num_pairs else float("nan")
    return Misalignment(rate, num_pairs)


# ----------------------------------------------------------------------------------------------------------------------
# KL, reward per nat, length
# ----------------------------------------------------------------------------------------------------------------------


def kl_summary(
    policy_logps: Any,
    ref_logps: Any,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """Monte-Carlo estimate of `KL(pi || pi_ref)` from responses sampled from `pi`, with a bootstrap interval.

    Each response `y_k ~ pi(.|x_k)` gives the unbiased single-sample estimate `log pi(y_k|x_k) - log pi_ref(y_k|x_k)`
    (sequence log-probs, summed over the completion tokens); the KL estimate is their mean and the interval is
    [`bootstrap_ci`] of that mean. Single terms can be negative, and so can the mean of a small sample; the estimate
    is unbiased only when the responses were sampled from `pi` itself (at temperature 1, without top-k/top-p). A
    model against itself gives exactly 0 with a zero-width interval.

    Args:
        policy_logps (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            1-D sequence log-probs under the policy, one per sampled response.
        ref_logps (`list[float]`, `numpy.ndarray` or `torch.Tensor`):
            Sequence log-probs of the same responses under the reference model.
        n_resamples (`int`, *optional*, defaults to `2000`):
            Bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        seed (`int`, *optional*, defaults to `0`):
            Bootstrap seed.

    Returns:
        `dict`: `mean` (the KL estimate in nats), `low`, `high` and `n`.

    Example:

    ```python
    >>> kl_summary([-3.0, -5.0], [-3.0, -5.0])
    {'mean': 0.0, 'low': 0.0, 'high': 0.0, 'n': 2}
    ```
    """
    p = _sample_1d("policy_logps", policy_logps)
    q = _sample_1d("ref_logps", ref_logps)
    if p.shape != q.shape:
        raise ValueError(
            f"`policy_logps` has {p.size} values but `ref_logps` has {q.size}: both must score the same responses."
        )
    mean, low, high = bootstrap_ci(p - q, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {"mean": mean, "low": low, "high": high, "n": int(p.size)}


def response_length_summary(
    lengths: Any,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float | int]:
    """Mean and median response length, with a bootstrap interval of the mean.

    Args:
        lengths (`list[int]`, `numpy.ndarray` or `torch.Tensor`):
            1-D lengths (tokens or words, the caller's unit), `>= 0`.
        n_resamples (`int`, *optional*, defaults to `2000`):
            Bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval of the mean.
        seed (`int`, *optional*, defaults to `0`):
            Bootstrap seed.

    Returns:
        `dict`: `mean`, `median`, `low` and `high` (interval of the mean), `min`, `max` and `n`.

    Example:

    ```python
    >>> response_length_summary([10, 10, 10])
    {'mean': 10.0, 'median': 10.0, 'low': 10.0, 'high': 10.0, 'min': 10.0, 'max': 10.0, 'n': 3}
    ```
    """
    x = _sample_1d("lengths", lengths)
    if (x < 0).any():
        raise ValueError(f"`lengths` must be >= 0, got {float(x.min())} at index {int(np.argmin(x))}.")
    mean, low, high = bootstrap_ci(x, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "mean": mean,
        "median": float(np.median(x)),
        "low": low,
        "high": high,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def reward_per_nat(reward_gain: float, kl: float, eps: float = 1e-6) -> float:
    """Reward gained over the reference per nat of KL spent: `reward_gain / kl`.

    `reward_gain` is the mean reward of the policy minus that of the reference on the same prompts, and `kl` the KL
    estimate of the policy to the reference (e.g. `kl_summary(...)["mean"]`). When `kl <= eps` (a policy that has not
    moved, or a Monte-Carlo estimate that came out at or below zero) the ratio is meaningless: the function warns
    (`RuntimeWarning`) and returns `float("nan")`, never a division by zero or an infinity.

    Args:
        reward_gain (`float`):
            Mean reward of the policy minus mean reward of the reference.
        kl (`float`):
            KL of the policy to the reference, in nats.
        eps (`float`, *optional*, defaults to `1e-6`):
            Smallest KL for which the ratio is computed (`>= 0`).

    Returns:
        `float`: Reward per nat, or NaN when `kl <= eps`.

    Example:

    ```python
    >>> reward_per_nat(0.6, 2.0)
    0.3
    ```
    """
    gain, kl, eps = (_number(n, v) for n, v in (("reward_gain", reward_gain), ("kl", kl), ("eps", eps)))
    for name, value in (("reward_gain", gain), ("kl", kl), ("eps", eps)):
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if eps < 0:
        raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
    if kl <= eps:
        warnings.warn(
            f"reward_per_nat: KL = {kl!r} is <= eps = {eps!r}, so reward per nat is undefined; returning NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    return gain / kl
