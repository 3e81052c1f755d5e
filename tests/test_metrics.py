"""Evaluation metrics (`trl_rewardweighted.metrics`) against values computed by hand in the comments."""

import ast
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_rewardweighted.losses import vcb_pair_stats
from trl_rewardweighted.metrics import (
    bootstrap_ci,
    distinct_n,
    kl_summary,
    misalignment_rate,
    paired_bootstrap_diff,
    response_length_summary,
    reward_per_nat,
    self_bleu,
    sentence_bleu,
    win_tie_loss,
)

METRICS = Path(__file__).resolve().parents[1] / "trl_rewardweighted" / "metrics.py"
THREE = ["the cat sat", "the cat ran", "a dog ran"]


# ----------------------------------------------------------------------------------------------------------------------
# bootstrap_ci
# ----------------------------------------------------------------------------------------------------------------------


def test_bootstrap_constant_sample_has_zero_width():
    est, low, high = bootstrap_ci([0.1] * 5)
    assert est == low == high == pytest.approx(0.1, abs=1e-15)
    assert bootstrap_ci([-3.5]) == (-3.5, -3.5, -3.5)  # one value: the interval is the point


def test_bootstrap_two_point_sample_by_hand():
    # Resampled means of [0, 1] take 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    # 95 %: the 2.5 % quantile is 0 and the 97.5 % quantile is 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)
    # 40 %: the 30 % and 70 % quantiles both fall on the middle atom 0.5 (P(mean = 0) = 1/4 < 0.3, P(<= 0.5) = 3/4).
    assert bootstrap_ci([0.0, 1.0], confidence=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_normal_sample_matches_normal_interval():
    x = np.random.default_rng(123).normal(1.0, 2.0, size=2000)
    est, low, high = bootstrap_ci(x, seed=7)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)  # 0.0877 here
    assert est == pytest.approx(x.mean(), abs=1e-12)
    # Monte-Carlo error of each endpoint with 2000 resamples is about 0.0014; the tolerance is ~7 of those.
    assert low == pytest.approx(est - half, abs=0.01)
    assert high == pytest.approx(est + half, abs=0.01)
    assert (high - low) == pytest.approx(2 * half, rel=0.1)


def test_bootstrap_is_reproducible_and_seeded():
    x = np.random.default_rng(0).exponential(size=50)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x.tolist(), seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    assert bootstrap_ci(torch.tensor(x), seed=3) == bootstrap_ci(x, seed=3)


def test_bootstrap_median():
    est, low, high = bootstrap_ci([1.0, 2.0, 3.0, 100.0], statistic="median")
    assert est == 2.5  # the mean would be 26.5
    assert 1.0 <= low <= est <= high <= 100.0


@pytest.mark.parametrize(
    "values, kwargs, message",
    [
        ([], {}, "`values` is empty"),
        ([1.0, 2.0, float("nan")], {}, "1 non-finite value(s) (NaN or inf), the first at index 2"),
        ([1.0, float("inf")], {}, "non-finite"),
        ([[1.0, 2.0]], {}, "must be 1-D"),
        ("1 2 3", {}, "got a string"),
        ([1.0, 2.0], {"confidence": 1.5}, "`confidence` must be in (0, 1)"),
        ([1.0, 2.0], {"n_resamples": 0}, "`n_resamples` must be an integer >= 1"),
        ([1.0, 2.0], {"statistic": "mode"}, "`statistic` must be one of"),
    ],
)
def test_bootstrap_bad_input(values, kwargs, message):
    with pytest.raises(ValueError) as info:
        bootstrap_ci(values, **kwargs)
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# paired_bootstrap_diff
# ----------------------------------------------------------------------------------------------------------------------


def test_paired_diff_sign():
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 10.0, size=200)  # prompt difficulty: large spread, cancels in the pairing
    a = base + 0.5 + rng.normal(0.0, 0.3, size=200)
    diff, low, high, frac = paired_bootstrap_diff(a, base)
    assert diff == pytest.approx(float(np.mean(a - base)), abs=1e-12)
    assert 0.0 < low < diff < high and frac == 0.0  # A beats B
    diff, low, high, frac = paired_bootstrap_diff(base, a)
    assert low < high < 0.0 and frac == 1.0  # B beats A


def test_paired_diff_no_difference_by_hand():
    # Differences +1, -1, +1, -1. A resampled mean is <= 0 when at most 2 of the 4 draws are +1:
    # P = (1 + 4 + 6) / 16 = 11/16 = 0.6875 (binomial(4, 1/2)); the Monte-Carlo sd with 2000 resamples is 0.0104.
    diff, low, high, frac = paired_bootstrap_diff([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert diff == 0.0 and low < 0.0 < high
    assert frac == pytest.approx(11 / 16, abs=0.04)
    assert paired_bootstrap_diff([2.0], [3.0]) == (-1.0, -1.0, -1.0, 1.0)


def test_paired_diff_bad_input():
    with pytest.raises(ValueError, match="`a` has 3 values but `b` has 2"):
        paired_bootstrap_diff([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="`b` contains 1 non-finite"):
        paired_bootstrap_diff([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match="`a` is empty"):
        paired_bootstrap_diff([], [])


# ----------------------------------------------------------------------------------------------------------------------
# win_tie_loss
# ----------------------------------------------------------------------------------------------------------------------


def test_win_tie_loss_by_hand():
    a = [3.0, 1.0, 2.0, 5.0, 2.05]
    b = [1.0, 1.0, 4.0, 4.0, 2.0]
    # a - b = 2, 0, -2, 1, 0.05. With tolerance 0.1: wins {2, 1}, ties {0, 0.05}, losses {-2}.
    out = win_tie_loss(a, b, tie_tolerance=0.1)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (2, 2, 1, 5)
    assert (out["win_rate"], out["tie_rate"], out["loss_rate"]) == (0.4, 0.4, 0.2)
    assert out["win_rate_with_ties"] == pytest.approx((2 + 0.5 * 2) / 5)  # 0.6
    # Tolerance 0: 0.05 becomes a win; only the exact 0 ties. (3 + 0.5) / 5 = 0.7.
    out = win_tie_loss(a, b)
    assert (out["wins"], out["ties"], out["losses"]) == (3, 1, 1)
    assert out["win_rate_with_ties"] == pytest.approx(0.7)
    assert out["win_rate"] + out["tie_rate"] + out["loss_rate"] == pytest.approx(1.0)
    assert win_tie_loss(b, a)["loss_rate"] == 0.6  # swapping the methods swaps wins and losses
    assert win_tie_loss([1.0, 2.0], [1.0, 2.0])["win_rate_with_ties"] == 0.5


def test_win_tie_loss_bad_input():
    with pytest.raises(ValueError, match="`scores_a` has 2 values but `scores_b` has 1"):
        win_tie_loss([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="`scores_a` contains 1 non-finite"):
        win_tie_loss([float("nan")], [1.0])
    with pytest.raises(ValueError, match="`tie_tolerance` must be a finite number >= 0"):
        win_tie_loss([1.0], [1.0], tie_tolerance=-0.1)


# ----------------------------------------------------------------------------------------------------------------------
# distinct_n
# ----------------------------------------------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    # Unigrams: the cat sat | the cat ran | a dog ran -> 9 in all, distinct {the, cat, sat, ran, a, dog} = 6.
    assert distinct_n(THREE, 1) == pytest.approx(6 / 9)
    # Bigrams: (the cat) (cat sat) | (the cat) (cat ran) | (a dog) (dog ran) -> 6 in all, 5 distinct.
    assert distinct_n(THREE, 2) == pytest.approx(5 / 6)
    assert distinct_n(THREE, 3) == 1.0  # three trigrams, all different
    assert distinct_n(THREE, 4) == 0.0  # no 4-grams at all: 0.0 by convention


def test_distinct_n_does_not_span_responses_and_tokenize():
    assert distinct_n(["a", "a"], 2) == 0.0  # "a a" across the two responses is not a bigram
    assert distinct_n(["a b", "b a"], 1) == 0.5
    assert distinct_n(["aab"], 1, tokenize=list) == pytest.approx(2 / 3)


def test_distinct_n_bad_input():
    with pytest.raises(ValueError, match="`texts` is empty"):
        distinct_n([], 1)
    with pytest.raises(ValueError, match="got a single string"):
        distinct_n("a b c", 1)
    with pytest.raises(ValueError, match=r"`texts\[1\]` is int"):
        distinct_n(["a", 3], 1)
    with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
        distinct_n(["a"], 0)


# ----------------------------------------------------------------------------------------------------------------------
# sentence_bleu and self_bleu
# ----------------------------------------------------------------------------------------------------------------------


def test_sentence_bleu_clipping_and_brevity_by_hand():
    # Clipping: "the" appears 4 times in the hypothesis but at most once in a reference: p1 = 1/4; c = 4 > r = 2.
    assert sentence_bleu("the the the the".split(), ["the cat".split()], max_n=1) == pytest.approx(0.25)
    # Brevity: c = 2, reference lengths 4 and 3 -> closest r = 3; p1 = 1; BP = exp(1 - 3/2).
    bleu = sentence_bleu("the cat".split(), ["the cat sat on".split(), "the cat is".split()], max_n=1)
    assert bleu == pytest.approx(math.exp(-0.5))
    # Tie on the closest length (1 and 3 are both 1 away from c = 2): the shorter one, so c > r and BP = 1.
    assert sentence_bleu(["a", "b"], [["a"], ["a", "b", "c"]], max_n=1) == pytest.approx(1.0)
    # Hypothesis shorter than n: p2 = epsilon / 1 = 0.1 (method1), p1 = 1, BP = 1 -> sqrt(0.1).
    assert sentence_bleu(["a"], [["a"]], max_n=2) == pytest.approx(math.sqrt(0.1))
    assert sentence_bleu([], [["a"]]) == 0.0


def test_sentence_bleu_bad_input():
    with pytest.raises(ValueError, match="takes token lists, not strings"):
        sentence_bleu("the cat", [["the"]])
    with pytest.raises(ValueError, match="`references_tokens` is empty"):
        sentence_bleu(["a"], [])
    with pytest.raises(ValueError, match="`smoothing` must be one of"):
        sentence_bleu(["a"], [["a"]], smoothing="method7")


def test_self_bleu_identical_texts_is_one():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)


def test_self_bleu_disjoint_vocabularies_by_hand():
    # "a b c d" against "e f g h" (and back): no n-gram matches. method1 (epsilon 0.1):
    # p1 = 0.1/4, p2 = 0.1/3, p3 = 0.1/2, p4 = 0.1/1; equal lengths so BP = 1.
    # BLEU = (0.1^4 / (4 * 3 * 2 * 1))^(1/4) = 0.1 / 24^(1/4) = 0.045180...
    expected = 0.1 / 24**0.25
    assert self_bleu(["a b c d", "e f g h"]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.0451801, abs=1e-7)
    assert self_bleu(["a b c d", "e f g h"], smoothing="none") == 0.0


def test_self_bleu_partial_overlap_by_hand():
    # max_n = 2, all lengths 3 so BP = 1 everywhere.
    # "the cat sat" vs {"the cat ran", "a dog ran"}: p1 = 2/3 (the, cat), p2 = 1/2 (the cat) -> sqrt(1/3) = 0.57735
    # "the cat ran" vs {"the cat sat", "a dog ran"}: p1 = 3/3, p2 = 1/2 (the cat)         -> sqrt(1/2) = 0.70711
    # "a dog ran"   vs {"the cat sat", "the cat ran"}: p1 = 1/3 (ran), p2 = 0/2 -> 0.1/2   -> sqrt(1/60) = 0.12910
    # mean = (0.57735 + 0.70711 + 0.12910) / 3 = 0.47119
    expected = (math.sqrt(1 / 3) + math.sqrt(1 / 2) + math.sqrt(1 / 60)) / 3
    assert self_bleu(THREE, max_n=2) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.471185, abs=1e-6)
    # No smoothing: the third response scores 0 -> (0.57735 + 0.70711) / 3.
    assert self_bleu(THREE, max_n=2, smoothing="none") == pytest.approx((math.sqrt(1 / 3) + math.sqrt(1 / 2)) / 3)
    # add1 on n >= 2: p2 = (1+1)/(2+1), (1+1)/(2+1), (0+1)/(2+1) -> BLEUs 2/3, sqrt(2/3), 1/3.
    add1 = (2 / 3 + math.sqrt(2 / 3) + 1 / 3) / 3
    assert self_bleu(THREE, max_n=2, smoothing="add1") == pytest.approx(add1, rel=1e-12)


@pytest.mark.parametrize("smoothing", ["method1", "add1", "none"])
def test_self_bleu_equals_mean_sentence_bleu(smoothing):
    # The fast path (two largest counts per n-gram, closest other length by bisection) against the direct definition,
    # with repeated texts, an empty text, texts shorter than max_n and ties in length.
    rng = random.Random(0)
    texts = [" ".join(rng.choice("abcde") for _ in range(rng.randint(0, 9))) for _ in range(12)]
    texts += [texts[3], texts[3], "a b", "a"]
    tokens = [t.split() for t in texts]
    direct = np.mean(
        [
            sentence_bleu(tokens[i], [t for j, t in enumerate(tokens) if j != i], max_n=3, smoothing=smoothing)
            for i in range(len(tokens))
        ]
    )
    assert self_bleu(texts, max_n=3, smoothing=smoothing) == pytest.approx(direct, rel=1e-12, abs=1e-15)


def test_self_bleu_bad_input():
    with pytest.raises(ValueError, match="has 1 response"):
        self_bleu(["only one"])
    with pytest.raises(ValueError, match="got a single string"):
        self_bleu("two words")


# ----------------------------------------------------------------------------------------------------------------------
# misalignment_rate
# ----------------------------------------------------------------------------------------------------------------------


def test_misalignment_by_hand():
    rewards = [[1.0, 2.0, 3.0]]
    assert misalignment_rate([[0.0, 1.0, 2.0]], rewards) == (0.0, 3)  # same order everywhere
    assert misalignment_rate([[2.0, 1.0, 0.0]], rewards) == (1.0, 3)  # fully reversed
    # Pairs (1,2) and (1,3) agree; (2,3): reward +1 but log-ratio 0.2 - 0.3 < 0 -> 1 of 3.
    rate, pairs = misalignment_rate([0.1, 0.3, 0.2], [1.0, 2.0, 3.0])  # 1-D: one prompt
    assert (rate, pairs) == (pytest.approx(1 / 3), 3)
    # Equal log-ratios do not separate distinct rewards: misaligned (a policy equal to its reference scores 1).
    assert misalignment_rate([[0.0, 0.0, 0.0]], rewards) == (1.0, 3)


def test_misalignment_equal_rewards_are_left_out():
    # Pair (1,2) has equal rewards and is not counted; (1,3) agrees; (2,3) disagrees (1 - 5 < 0) -> 1/2 of 2 pairs.
    assert misalignment_rate([[0.0, 5.0, 1.0]], [[1.0, 1.0, 2.0]]) == (0.5, 2)
    # Rewards 1.05 apart from 1.0: pair (1,2) now counts and agrees (both go up) -> 1/3 of 3; with tol 0.1 it is out.
    assert misalignment_rate([[0.0, 5.0, 1.0]], [[1.0, 1.05, 2.0]]) == (1 / 3, 3)
    assert misalignment_rate([[0.0, 5.0, 1.0]], [[1.0, 1.05, 2.0]], tol=0.1) == (0.5, 2)
    rate, pairs = misalignment_rate([[0.0, 1.0]], [[2.0, 2.0]])
    assert math.isnan(rate) and pairs == 0


def test_misalignment_ragged_groups_with_mask():
    nan = float("nan")
    lr = [[0.1, 0.3, 0.2, nan], [1.0, 0.0, nan, nan]]
    rewards = [[1.0, 2.0, 3.0, nan], [1.0, 2.0, nan, nan]]
    mask = [[True, True, True, False], [True, True, False, False]]
    # Group 1: 3 pairs, 1 misaligned (above). Group 2: 1 pair, reward up and log-ratio down -> misaligned. 2 / 4.
    assert misalignment_rate(lr, rewards, mask=mask) == (0.5, 4)
    out = misalignment_rate(torch.tensor(lr, dtype=torch.bfloat16), torch.tensor(rewards), mask=torch.tensor(mask))
    assert out == (0.5, 4)
    with pytest.raises(ValueError, match=r"`policy_logratios` contains 3 non-finite value\(s\) .* index \(0, 3\)"):
        misalignment_rate(lr, rewards)


def test_misalignment_matches_vcb_pair_agreement():
    gen = torch.Generator().manual_seed(0)
    lr = torch.randn(6, 5, generator=gen)
    rewards = torch.randint(0, 3, (6, 5), generator=gen).float()  # repeated rewards on purpose
    mask = torch.rand(6, 5, generator=gen) > 0.2
    stats = vcb_pair_stats(lr, torch.zeros_like(lr), rewards, mask=mask)
    rate, pairs = misalignment_rate(lr, rewards, mask=mask)
    assert pairs == int(stats["agree_count"]) > 0
    assert rate == pytest.approx(1.0 - float(stats["agree_sum"] / stats["agree_count"]))


def test_misalignment_bad_input():
    with pytest.raises(ValueError, match=r"`rewards` has shape \(1, 2\), expected \(1, 3\)"):
        misalignment_rate([[0.0, 1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="`mask` must be boolean"):
        misalignment_rate([[0.0, 1.0]], [[1.0, 2.0]], mask=[[1, 1]])
    with pytest.raises(ValueError, match="`rewards` contains 1 non-finite"):
        misalignment_rate([[0.0, 1.0]], [[1.0, float("nan")]])


# ----------------------------------------------------------------------------------------------------------------------
# kl_summary, response_length_summary, reward_per_nat
# ----------------------------------------------------------------------------------------------------------------------


def test_kl_of_a_model_against_itself_is_zero():
    logps = torch.tensor([-12.25, -3.5, -40.125, -7.0])
    assert kl_summary(logps, logps.clone()) == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 4}


def test_kl_summary_values():
    # log-ratios 0.5, 1.5, 1.0 -> mean 1.0
    out = kl_summary([-1.0, -2.0, -3.0], [-1.5, -3.5, -4.0])
    assert out["mean"] == pytest.approx(1.0) and out["n"] == 3
    assert 0.5 <= out["low"] < 1.0 < out["high"] <= 1.5
    with pytest.raises(ValueError, match="`policy_logps` has 3 values but `ref_logps` has 2"):
        kl_summary([-1.0, -2.0, -3.0], [-1.0, -2.0])
    with pytest.raises(ValueError, match="`ref_logps` contains 1 non-finite"):
        kl_summary([-1.0], [float("-inf")])


def test_response_length_summary():
    out = response_length_summary([1, 2, 3, 10])
    assert (out["mean"], out["median"], out["min"], out["max"], out["n"]) == (4.0, 2.5, 1.0, 10.0, 4)
    assert 1.0 <= out["low"] < 4.0 < out["high"] <= 10.0
    with pytest.raises(ValueError, match="`lengths` must be >= 0, got -1.0 at index 1"):
        response_length_summary([3, -1])


def test_reward_per_nat():
    assert reward_per_nat(0.6, 2.0) == pytest.approx(0.3)
    assert reward_per_nat(-0.5, 0.25) == pytest.approx(-2.0)
    for kl in (0.0, -0.2, 1e-9):  # not moved, or a Monte-Carlo estimate at or below the guard
        with pytest.warns(RuntimeWarning, match="returning NaN"):
            assert math.isnan(reward_per_nat(1.0, kl))
    with pytest.raises(ValueError, match="`reward_gain` must be finite"):
        reward_per_nat(float("nan"), 1.0)
    with pytest.raises(ValueError, match="`kl` must be a number"):
        reward_per_nat(1.0, "1.0")


# ----------------------------------------------------------------------------------------------------------------------
# Layering
# ----------------------------------------------------------------------------------------------------------------------


def test_metrics_imports_only_numpy_torch_and_stdlib():
    tree = ast.parse(METRICS.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "metrics.py must not import from the package"
            imported.add(node.module.split(".")[0])
    assert imported - {"numpy", "torch"} <= set(sys.stdlib_module_names), imported


def test_importing_metrics_does_not_import_torch():
    code = "import sys, trl_rewardweighted.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
