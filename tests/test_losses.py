"""VAR math against values computed by hand from w = softmax(r / beta + log pi_ref), loss = -sum w * logp."""

import math

import pytest
import torch

from trl_rewardweighted.losses import var_log_weights, var_loss, var_weights


def softmax_by_hand(xs):
    m = max(x for x in xs if x != -math.inf)
    es = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    z = sum(es)
    return [e / z for e in es]


def test_var_weights_rewards_only_by_hand():
    # r / beta = [0.5, 1.0, 1.5]; exp = [1.6487212707, 2.7182818285, 4.4816890703]; Z = 8.8486921695
    w = var_weights(torch.tensor([1.0, 2.0, 3.0]), beta=2.0)
    expected = [1.6487212707 / 8.8486921695, 2.7182818285 / 8.8486921695, 4.4816890703 / 8.8486921695]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert w.dtype == torch.float32
    assert abs(float(w.sum()) - 1.0) < 1e-6


def test_var_weights_with_ref_logps_by_hand():
    rewards = torch.tensor([1.0, 0.0, -1.0])
    ref = torch.tensor([-10.0, -9.0, -12.0])
    # r / 0.5 + ref = [-8, -9, -14]
    expected = softmax_by_hand([-8.0, -9.0, -14.0])
    torch.testing.assert_close(var_weights(rewards, 0.5, ref), torch.tensor(expected), rtol=1e-6, atol=1e-8)


def test_non_finite_rows_get_zero_weight_and_rest_sums_to_one():
    rewards = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.0])
    ref = torch.tensor([-1.0, -1.0, float("-inf"), -1.0, -2.0])
    w = var_weights(rewards, 1.0, ref)
    # valid: rows 0 (0.0) and 4 (-2.0)
    expected = softmax_by_hand([0.0, -math.inf, -math.inf, -math.inf, -2.0])
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-8)
    assert w[1] == 0 and w[2] == 0 and w[3] == 0


def test_mask_excludes_rows():
    w = var_weights(torch.tensor([5.0, 1.0, 1.0]), 1.0, mask=torch.tensor([False, True, True]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 0.5]))


def test_extreme_rewards_do_not_overflow():
    # r / beta = [65536, 65535, -65536] (exact in float32): exp(65536) overflows any float; log-space softmax does not.
    w = var_weights(torch.tensor([4096.0, 4096.0 - 0.0625, -4096.0]), beta=0.0625)
    expected = softmax_by_hand([65536.0, 65535.0, -65536.0])  # = [e / (1 + e), 1 / (1 + e), 0]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(w).all()


def test_large_reward_offset_keeps_its_precision():
    """r = 1e4 +- 1e-3, beta = 1e-3: (r_i - r_j) / beta = [0, -2] (to 4e-10), so w = softmax([1, -1]) =
    [1 / (1 + e^-2), e^-2 / (1 + e^-2)] = [0.8807970779778823, 0.11920292202211755]. Rounding the rewards to float32
    first (spacing 9.8e-4 at 1e4) would give [0.5, 0.5]."""
    rewards = torch.tensor([1e4 + 1e-3, 1e4 - 1e-3], dtype=torch.float64)
    e = math.exp(-2.0)
    expected = torch.tensor([1.0 / (1.0 + e), e / (1.0 + e)])
    w = var_weights(rewards, beta=1e-3)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w, torch.tensor([0.8807970779778823, 0.11920292202211755]), rtol=1e-6, atol=1e-7)
    # The same with a reference term: softmax([0 - 1, -2 + 0]) = [1 / (1 + e^-1), e^-1 / (1 + e^-1)].
    w = var_weights(rewards, beta=1e-3, ref_logps=torch.tensor([-1.0, 0.0], dtype=torch.float64))
    e1 = math.exp(-1.0)
    torch.testing.assert_close(w, torch.tensor([1.0 / (1.0 + e1), e1 / (1.0 + e1)]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var_log_weights(rewards, 1e-3), torch.tensor([0.0, -2.0]), rtol=0, atol=1e-6)


def test_r_over_beta_beyond_float32_keeps_the_best_row():
    """r / beta = 3e41 overflows float32: the best row must keep its weight (it used to become invalid, weight 0)."""
    w = var_weights(torch.tensor([3e38, 1.0]), beta=1e-3)
    assert w.tolist() == [1.0, 0.0]
    # Two equal best rows share the weight; a row (1e36 - 5e35) / 1e-3 = 5e38 below them gets exactly 0.
    w = var_weights(torch.tensor([1e36, 1e36, 5e35, float("nan")], dtype=torch.float64), beta=1e-3)
    assert w.tolist() == [0.5, 0.5, 0.0, 0.0]
    # A finite log-weight below the float32 range stays finite (valid row, weight 0), never -inf (= invalid row).
    lw = var_log_weights(torch.tensor([1e36, -1e36], dtype=torch.float64), beta=1e-3)
    assert lw[0] == 0.0 and lw[1] == torch.finfo(torch.float32).min
    # The same with a reference term: r / beta + ref with r / beta ~ 1e41.
    w = var_weights(
        torch.tensor([1e38, 1e38], dtype=torch.float64), 1e-3, torch.tensor([-3.0, -1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(w, torch.tensor(softmax_by_hand([-3.0, -1.0])), rtol=1e-6, atol=1e-8)


def test_bad_beta_and_no_valid_row():
    with pytest.raises(ValueError, match=r"`beta` must be > 0, got 0"):
        var_weights(torch.tensor([1.0]), 0.0)
    with pytest.raises(ValueError, match=r"`beta` must be > 0, got -1"):
        var_weights(torch.tensor([1.0]), -1.0)
    with pytest.raises(ValueError, match=r"No valid row in a VAR batch of 2"):
        var_weights(torch.tensor([float("nan"), float("inf")]), 1.0)
    with pytest.raises(ValueError, match=r"must be a 1-D tensor"):
        var_weights(torch.ones(2, 2), 1.0)


def test_var_loss_value_and_gradient_by_hand():
    logp = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    rewards = torch.tensor([0.0, 1.0, float("nan")])
    ref = torch.tensor([-1.0, -2.0, -1.0])
    # weights over rows 0, 1: softmax([0 - 1, 1 - 2]) = [0.5, 0.5]; row 2 invalid
    loss = var_loss(logp, rewards, 1.0, ref)
    assert loss.item() == pytest.approx(-(0.5 * -3.0 + 0.5 * -5.0))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, -0.5, 0.0]))


def test_var_loss_ignores_non_finite_logp_on_zero_weight_rows():
    logp = torch.tensor([-1.0, float("-inf")], requires_grad=True)
    loss = var_loss(logp, torch.tensor([1.0, float("nan")]), 1.0)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_weights_are_constants():
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0], requires_grad=True)
    assert not var_weights(rewards, 1.0, ref).requires_grad
    assert not var_log_weights(rewards, 1.0, ref).requires_grad


def test_float32_from_bfloat16_inputs():
    w = var_weights(
        torch.tensor([1.0, 2.0], dtype=torch.bfloat16), 1.0, torch.tensor([-300.0, -301.0], dtype=torch.float64)
    )
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor(softmax_by_hand([1.0 - 300.0, 2.0 - 301.0])))
