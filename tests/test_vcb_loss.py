"""`vcb_loss` / `vcb_pair_stats` against values worked out by hand (arXiv 2402.16030, Eqs. 19-20 and App. A.4)."""

import math

import pytest
import torch

from trl_rewardweighted.losses import vcb_loss, vcb_pair_stats

E = math.e


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# Hand example A (one prompt, n = 4), used by several tests:
#   rewards r = [0, 0, 2, 2]: mean 1, population sigma = sqrt((1+1+1+1)/4) = 1, so r_n = (r - 1)/1 = [-1, -1, 1, 1]
#   policy  = [-1, -3, -1, 1], ref = [-3, -3, -3, -3]  ->  log-ratios lr = [2, 0, 2, 4]
#   gamma = 0.5: gamma*lr = [1, 0, 1, 2];  s = gamma*lr - r_n = [2, 1, 0, 1]
#   pair losses l_ij = (s_i - s_j)^2 for i < j:
#     (1,2): 1   (1,3): 4   (1,4): 1   (2,3): 1   (2,4): 0   (3,4): 1
#   Eq. 20 (j >= i, the 4 diagonal terms are l_ii = 0):
#     lam = 1: log(4*e^0 + e^1 + e^4 + e^1 + e^1 + e^0 + e^1) = log(5 + 4e + e^4)
#     lam = 2: 2*log(4 + e^0.5 + e^2 + e^0.5 + e^0.5 + e^0 + e^0.5) = 2*log(5 + 4e^0.5 + e^2)
A_POLICY = [-1.0, -3.0, -1.0, 1.0]
A_REF = [-3.0, -3.0, -3.0, -3.0]
A_REWARDS = [0.0, 0.0, 2.0, 2.0]
A_LOSS_LAM1 = math.log(5 + 4 * E + E**4)
A_LOSS_LAM2 = 2 * math.log(5 + 4 * math.exp(0.5) + E**2)

# Hand example B (n = 2), Eq. 20 reduces to lam * log(2 + e^(l12/lam)):
#   r = [0, 2]: mean 1, population sigma = 1, r_n = [-1, 1]; policy = ref -> lr = [0, 0]; s = [1, -1]; l12 = 4
#   lam = 1: log(2 + e^4)
B_POLICY = [-2.0, -5.0]
B_REF = [-2.0, -5.0]
B_REWARDS = [0.0, 2.0]
B_LOSS = math.log(2 + E**4)


def test_paper_mode_hand_example():
    loss = vcb_loss(t([A_POLICY]), t([A_REF]), t([A_REWARDS]), gamma=0.5, lam=1.0)
    assert loss.item() == pytest.approx(A_LOSS_LAM1, rel=1e-6)
    loss2 = vcb_loss(t([A_POLICY]), t([A_REF]), t([A_REWARDS]), gamma=0.5, lam=2.0)
    assert loss2.item() == pytest.approx(A_LOSS_LAM2, rel=1e-6)


def test_appendix_mode_hand_example():
    # Appendix A.4: unbiased std, all ordered pairs (i, j) incl. the diagonal, l_ij / 2.
    #   r = [0, 1, 2]: mean 1, unbiased sigma = sqrt((1 + 0 + 1)/(3 - 1)) = 1, r_n = [-1, 0, 1]
    #   policy = [-1, 1, 5], ref = [-1, -1, -1] -> lr = [0, 2, 6]; gamma = 0.5 -> gamma*lr = [0, 1, 3]
    #   s = [0+1, 1-0, 3-1] = [1, 1, 2]; (s_i - s_j)^2 / 2: (1,2) 0, (1,3) 1/2, (2,3) 1/2, each twice, + 3 zeros
    #   lam = 1: log(3*e^0 + 2*e^0 + 4*e^0.5) = log(5 + 4 e^0.5)
    policy, ref, rewards = t([[-1.0, 1.0, 5.0]]), t([[-1.0, -1.0, -1.0]]), t([[0.0, 1.0, 2.0]])
    loss = vcb_loss(policy, ref, rewards, gamma=0.5, lam=1.0, pair_mode="appendix")
    assert loss.item() == pytest.approx(math.log(5 + 4 * math.exp(0.5)), rel=1e-6)
    # The same inputs under Eq. 20 (population sigma = sqrt(2/3), r_n = [-1, 0, 1] * sqrt(3/2)):
    #   s = [sqrt(1.5), 1, 3 - sqrt(1.5)]; pairs j > i: (s1-s2)^2, (s1-s3)^2, (s2-s3)^2, plus 3 diagonal zeros
    k = math.sqrt(1.5)
    s = [k, 1.0, 3.0 - k]
    expected = math.log(3 + math.exp((s[0] - s[1]) ** 2) + math.exp((s[0] - s[2]) ** 2) + math.exp((s[1] - s[2]) ** 2))
    assert vcb_loss(policy, ref, rewards, gamma=0.5, lam=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_n_equals_2_closed_form():
    loss = vcb_loss(t([B_POLICY]), t([B_REF]), t([B_REWARDS]), gamma=0.5, lam=1.0)
    assert loss.item() == pytest.approx(B_LOSS, rel=1e-6)
    # n = 2: population sigma = |r1 - r2|/2, so the reward gap is always +-2 whatever the reward scale:
    # lr = [1, 0], gamma = 1, r = [10, 110] -> s1 - s2 = 1 - (-1 - 1) = 3 -> l12 = 9 -> lam=3: 3*log(2 + e^3)
    loss = vcb_loss(t([[1.0, 0.0]]), t([[0.0, 0.0]]), t([[10.0, 110.0]]), gamma=1.0, lam=3.0)
    assert loss.item() == pytest.approx(3 * math.log(2 + E**3), rel=1e-6)


def test_variable_group_sizes_with_mask_and_reductions():
    # Group A (n=4) and group B (n=2) padded to n_max = 4; padding values are garbage and must be ignored.
    policy = t([A_POLICY, B_POLICY + [123.0, -77.0]])
    ref = t([A_REF, B_REF + [5.0, 9.0]])
    rewards = t([A_REWARDS, B_REWARDS + [1e6, -3.0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    kw = dict(gamma=0.5, lam=1.0, mask=mask)
    per_group = vcb_loss(policy, ref, rewards, reduction="none", **kw)
    assert per_group.tolist() == pytest.approx([A_LOSS_LAM1, B_LOSS], rel=1e-6)
    assert vcb_loss(policy, ref, rewards, reduction="sum", **kw).item() == pytest.approx(
        A_LOSS_LAM1 + B_LOSS, rel=1e-6
    )
    assert vcb_loss(policy, ref, rewards, **kw).item() == pytest.approx((A_LOSS_LAM1 + B_LOSS) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"`reduction` must be 'mean', 'sum' or 'none', got 'avg'"):
        vcb_loss(policy, ref, rewards, reduction="avg", **kw)


def test_sigma_zero_only_pulls_logratios_together():
    # All rewards equal: sigma = 0 -> r_n = 0 (no division). gamma = 1, lr = [1, 0, -1] -> s = [1, 0, -1]
    #   pairs: (1,2) 1, (1,3) 4, (2,3) 1 -> log(3 + 2e + e^4)
    policy = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    ref, rewards = t([[0.0, 0.0, 0.0]]), t([[0.7, 0.7, 0.7]])
    loss = vcb_loss(policy, ref, rewards, gamma=1.0, lam=1.0)
    assert loss.item() == pytest.approx(math.log(3 + 2 * E + E**4), rel=1e-6)
    loss.backward()
    grad = policy.grad[0]
    assert torch.isfinite(grad).all()
    # Gradient descent lowers the largest log-ratio and raises the smallest: they are pulled together.
    assert grad[0] > 0 and grad[2] < 0 and grad[1].abs() < 1e-6
    # Rewards equal up to float noise (sigma ~ 1e-9 <= eps) give the same result, not a 1e9-scaled gap.
    noisy = t([[0.7, 0.7 + 1e-9, 0.7]])
    assert vcb_loss(policy.detach(), ref, noisy, gamma=1.0, lam=1.0).item() == pytest.approx(loss.item(), rel=1e-6)


def test_non_finite_reward_is_masked():
    # [0, nan, 2] behaves exactly like [0, 2] (example B) once the NaN entry is dropped; same for inf / a NaN ref.
    policy, ref = t([[B_POLICY[0], 0.0, B_POLICY[1]]]), t([[B_REF[0], 0.0, B_REF[1]]])
    for bad in (float("nan"), float("inf"), -float("inf")):
        loss = vcb_loss(policy, ref, t([[0.0, bad, 2.0]]), gamma=0.5, lam=1.0)
        assert loss.item() == pytest.approx(B_LOSS, rel=1e-6)
    ref_bad = t([[B_REF[0], float("nan"), B_REF[1]]])
    assert vcb_loss(policy, ref_bad, t([[0.0, 5.0, 2.0]]), gamma=0.5, lam=1.0).item() == pytest.approx(
        B_LOSS, rel=1e-6
    )


def test_group_with_fewer_than_two_valid_is_skipped_with_a_graph():
    policy = torch.tensor([[0.3, -0.2], [1.0, 2.0]], requires_grad=True)
    ref, rewards = t([[0.0, 0.0], [0.0, 0.0]]), t([[1.0, float("nan")], [float("nan"), float("nan")]])
    per_group = vcb_loss(policy, ref, rewards, reduction="none")
    assert per_group.tolist() == [0.0, 0.0]
    loss = vcb_loss(policy, ref, rewards)  # mean over 0 valid groups: 0, never NaN
    assert loss.item() == 0.0
    loss.backward()  # still differentiable (DDP needs every rank to run backward)
    assert policy.grad is not None and torch.equal(policy.grad, torch.zeros_like(policy))


def _direct_eq20(policy, ref, rewards, gamma, lam):
    """Eq. 19-20 written term by term for one group, in float64 (population sigma, pairs j >= i)."""
    n = len(rewards)
    mean = sum(rewards) / n
    sigma = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    terms = []
    for i in range(n):
        for j in range(i, n):
            gap = gamma * (policy[i] - ref[i]) - gamma * (policy[j] - ref[j]) - (rewards[i] - rewards[j]) / sigma
            terms.append(gap**2 / lam)
    return lam * torch.logsumexp(torch.stack(terms), dim=0)


def test_gradient_matches_direct_formula():
    torch.manual_seed(0)
    rewards = [0.3, -1.2, 2.5, 0.9, 0.0]
    ref = torch.randn(5, dtype=torch.float64) * 3 - 20
    for gamma, lam in ((0.05, 1.0), (0.5, 0.3), (1.0, 5.0)):
        base = ref + torch.randn(5, dtype=torch.float64) * 4
        p64 = base.clone().requires_grad_(True)
        direct = _direct_eq20(p64, ref, rewards, gamma, lam)
        direct.backward()
        p32 = base.float().clone().requires_grad_(True)
        loss = vcb_loss(p32[None], ref.float()[None], torch.tensor([rewards]), gamma=gamma, lam=lam)
        loss.backward()
        assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)


def test_no_gradient_through_rewards_or_ref():
    policy = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    ref = torch.tensor([[0.5, 0.1, 0.3]], requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True)
    vcb_loss(policy, ref, rewards).backward()
    assert policy.grad is not None and ref.grad is None and rewards.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=0.0), r"`gamma` must be > 0, got 0.0"),
        (dict(gamma=-1.0), r"`gamma` must be > 0, got -1.0"),
        (dict(gamma=float("nan")), r"`gamma` must be > 0, got nan"),
        (dict(lam=0.0), r"`lam` must be > 0, got 0.0"),
        (dict(pair_mode="upper"), r"`pair_mode` must be one of \('paper', 'appendix'\), got 'upper'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vcb_loss(t([A_POLICY]), t([A_REF]), t([A_REWARDS]), **kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"VCB inputs must be \(G, n\) tensors"):
        vcb_loss(t(A_POLICY), t(A_REF), t(A_REWARDS))
    with pytest.raises(ValueError, match=r"`rewards` has shape \(4, 1\), expected \(1, 4\)"):
        vcb_loss(t([A_POLICY]), t([A_REF]), t([A_REWARDS]).T)


def test_pair_stats_hand_example():
    # Example A: lr = [2, 0, 2, 4], r = [0, 0, 2, 2], s = [2, 1, 0, 1] (gamma = 0.5, sigma = 1).
    #   calibration |gamma*(lr_i - lr_j) - (r_n,i - r_n,j)| = |s_i - s_j| over the 6 pairs i < j:
    #     |2-1| + |2-0| + |2-1| + |1-0| + |1-1| + |0-1| = 1 + 2 + 1 + 1 + 0 + 1 = 6
    #   distinct-reward pairs: (1,3), (1,4), (2,3), (2,4); sign(lr_i - lr_j) vs sign(r_i - r_j):
    #     (1,3): 0 vs -  (disagree)   (1,4): - vs - (agree)   (2,3): - vs - (agree)   (2,4): - vs - (agree)
    stats = vcb_pair_stats(t([A_POLICY]), t([A_REF]), t([A_REWARDS]), gamma=0.5)
    assert stats["calib_abs_sum"].item() == pytest.approx(6.0)
    assert stats["num_pairs"].item() == 6
    assert stats["agree_sum"].item() == 3 and stats["agree_count"].item() == 4
    assert stats["sigma_sum"].item() == pytest.approx(1.0) and stats["num_groups"].item() == 1
    # Sums add over groups: example B (s = [1, -1], one distinct pair with lr gap 0 -> disagree, sigma 1).
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    stats2 = vcb_pair_stats(
        t([A_POLICY, B_POLICY + [0.0, 0.0]]),
        t([A_REF, B_REF + [0.0, 0.0]]),
        t([A_REWARDS, B_REWARDS + [0.0, 0.0]]),
        gamma=0.5,
        mask=mask,
    )
    assert stats2["calib_abs_sum"].item() == pytest.approx(6.0 + 2.0)
    assert stats2["num_pairs"].item() == 7 and stats2["agree_count"].item() == 5 and stats2["agree_sum"].item() == 3
    assert stats2["sigma_sum"].item() == pytest.approx(2.0) and stats2["num_groups"].item() == 2


def _calibrated(rewards, gamma, unbiased):
    """Policy log-probs with gamma * (policy - ref) = (r - mean) / sigma exactly (ref = -5): every s_i is 0."""
    r = torch.tensor(rewards, dtype=torch.float64)
    sigma = r.std(unbiased=unbiased)
    return (-5.0 + (r - r.mean()) / sigma / gamma).float(), torch.full_like(r, -5.0).float()


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_minimum_at_calibration(n, lam):
    # At calibration every l_ij is 0, so each pair contributes exp(0) = 1 inside the logsumexp:
    #   paper (pairs j >= i, the n diagonal ones included): lam * log(n (n + 1) / 2);  appendix (n^2 ordered): lam * log(n^2)
    rewards = [float(k * k) - 0.3 * k for k in range(n)]  # distinct, not evenly spaced
    gamma = 0.25
    for mode, pairs in (("paper", n * (n + 1) / 2), ("appendix", n * n)):
        policy, ref = _calibrated(rewards, gamma, unbiased=mode == "appendix")
        loss = vcb_loss(policy[None], ref[None], t([rewards]), gamma=gamma, lam=lam, pair_mode=mode)
        assert loss.item() == pytest.approx(lam * math.log(pairs), rel=1e-5, abs=1e-6), mode
        stats = vcb_pair_stats(policy[None], ref[None], t([rewards]), gamma=gamma, pair_mode=mode)
        assert stats["calib_abs_sum"].item() == pytest.approx(0.0, abs=1e-4)
        # ... and it is the minimum: any move away from calibration raises the loss.
        moved = policy.clone()
        moved[0] += 0.1
        assert vcb_loss(moved[None], ref[None], t([rewards]), gamma=gamma, lam=lam, pair_mode=mode) > loss
    # A group with masked padding counts only its k valid completions: k = 3 of n_max = 5 -> lam * log(6) (paper).
    policy, ref = _calibrated([0.0, 1.0, 3.0], gamma, unbiased=False)
    padded = torch.cat([policy, torch.tensor([7.0, -9.0])])[None]
    mask = torch.tensor([[True, True, True, False, False]])
    loss = vcb_loss(
        padded, torch.cat([ref, torch.zeros(2)])[None], t([[0.0, 1.0, 3.0, 4.0, 5.0]]), gamma=gamma, lam=lam, mask=mask
    )
    assert loss.item() == pytest.approx(lam * math.log(6), rel=1e-5)
