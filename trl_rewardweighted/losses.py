"""The math of the three methods as pure tensor functions.

Tensors in, tensors out: no model, no Trainer, no I/O. Everything here runs in float32 (the VAR log-weights are centred
in float64 first) and in log space (`softmax` / `logsumexp`); `exp(r / beta)` is never formed. Rewards, reference log-probabilities and the
weights derived from them are constants (no gradient flows through them); only `policy_logps` carries a graph.

See `docs/algorithms.md` (sections 2, 3 and 5) for the derivations, the choices where the papers are silent and the defaults.
"""

from __future__ import annotations

import torch

__all__ = [
    "var_log_weights",
    "var_weights",
    "var_loss",
    "online_var_weights",
    "vcb_loss",
    "vcb_pair_stats",
    "sample_weight_factors",
    "VCB_PAIR_MODES",
]

VCB_PAIR_MODES = ("paper", "appendix")


# ----------------------------------------------------------------------------------------------------------------------
# VAR: variational alignment with re-weighting (reward-weighted SFT)
# ----------------------------------------------------------------------------------------------------------------------


def _check_1d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-D tensor (one value per row), got shape {tuple(t.shape)}.")


def var_log_weights(
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centred VAR log-weights `r_i / beta + log pi_ref(y_i|x_i) - c`, `-inf` on rows outside the normaliser.

    A row is invalid when its reward or reference log-prob is not finite, or when `mask` is `False` there (e.g. an
    empty completion, a padding row, or a row repeated by accelerate's `even_batches`). The constant `c` (the largest
    log-weight of a valid row, which therefore gets `0`) does not change the softmax. The arithmetic runs in float64,
    dividing `r - max(r)` rather than `r` by `beta`, so neither a large common reward offset nor an `r / beta` beyond
    the float32 range loses the differences that set the weights.

    Args:
        rewards (`torch.Tensor`):
            Rewards of shape `(B,)`, any float dtype (pass float64 to keep rewards with a large offset exact).
        beta (`float`):
            Temperature `> 0` of the weights.
        ref_logps (`torch.Tensor` or `None`, *optional*):
            Summed reference log-probs of shape `(B,)`; `None` leaves out the reference term.
        mask (`torch.Tensor` or `None`, *optional*):
            Boolean `(B,)`; `False` rows are left out.

    Returns:
        `torch.Tensor`: Float32 `(B,)`, detached; finite on every valid row (a log-weight below the float32 range is
        clamped to the float32 minimum, a weight of 0 after the softmax) and `-inf` exactly on invalid rows. The
        trainer feeds it to a single softmax over the normalisation batch.

    Example:

    ```python
    >>> var_log_weights(torch.tensor([1e4 + 1e-3, 1e4 - 1e-3], dtype=torch.float64), beta=1e-3)
    tensor([ 0., -2.])
    ```
    """
    if not beta > 0:  # also catches NaN
        raise ValueError(f"`beta` must be > 0, got {beta}. It is the KL coefficient (temperature) of the VAR weights.")
    _check_1d("rewards", rewards)
    r = rewards.detach().to(torch.float64)
    valid = torch.isfinite(r)
    ref = None
    if ref_logps is not None:
        _check_1d("ref_logps", ref_logps)
        if ref_logps.shape != rewards.shape:
            raise ValueError(
                f"`ref_logps` has shape {tuple(ref_logps.shape)} but `rewards` has shape {tuple(rewards.shape)}."
            )
        ref = ref_logps.detach().to(device=r.device, dtype=torch.float64)
        valid &= torch.isfinite(ref)
    if mask is not None:
        valid &= mask.to(device=r.device, dtype=torch.bool)
    log_e = torch.full_like(r, float("-inf"))
    if valid.any():
        zeros = torch.zeros_like(r)
        r = torch.where(valid, r, zeros)
        # Centre before dividing: r / beta may overflow even float64 for a tiny beta, r - max(r) never does.
        x = (r - r[valid].max()) / float(beta)
        if ref is not None:
            x = x + torch.where(valid, ref, zeros)
        x = x - x[valid].max()  # the best row gets exactly 0
        log_e = torch.where(valid, x.clamp(min=torch.finfo(torch.float32).min), log_e)
    return log_e.to(torch.float32)


def var_weights(
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR weights `w = softmax(rewards / beta + ref_logps)` over a 1-D batch (see `docs/var.md`).

    `ref_logps=None` gives `softmax(rewards / beta)` (reward-weighted regression, `ref_weighting=False`). Rows whose
    reward or reference log-prob is not finite, or where `mask` is `False`, get weight exactly 0 and the others still
    sum to 1. The log-weights are centred in float64 (see [`var_log_weights`]), so rewards with a large common offset
    or an `r / beta` beyond the float32 range keep their exact weights.

    Args:
        rewards (`torch.Tensor`):
            Rewards of shape `(B,)`.
        beta (`float`):
            Temperature `> 0`.
        ref_logps (`torch.Tensor` or `None`, *optional*):
            Summed reference log-probs of shape `(B,)`.
        mask (`torch.Tensor` or `None`, *optional*):
            Boolean `(B,)`; `False` rows get weight 0.

    Returns:
        `torch.Tensor`: Float32 weights of shape `(B,)`, no gradient.

    Raises:
        `ValueError`: if `beta <= 0` or if no row is valid.

    Example:

    ```python
    >>> var_weights(torch.tensor([1e4 + 1e-3, 1e4 - 1e-3], dtype=torch.float64), beta=1e-3)  # softmax([1, -1])
    tensor([0.8808, 0.1192])
    ```
    """
    log_e = var_log_weights(rewards, beta, ref_logps, mask)
    if not torch.isfinite(log_e).any():
        raise ValueError(
            f"No valid row in a VAR batch of {log_e.numel()}: every reward or reference log-prob is NaN/inf (or the "
            "completion is empty). Drop such rows from the dataset or fix the reward column."
        )
    return torch.softmax(log_e, dim=0)


def online_var_weights(
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online VAR weights: for each prompt, `softmax_i(r_i / beta + log pi_ref(y_i|x) - log q(y_i|x))` over its own
    completions (see `docs/online_var.md`).

    The completions `y_1..y_G` of a prompt were drawn from the sampling policy `q`; the weights are the
    self-normalised importance weights from `q` to the target `pi_ref(y|x) exp(r(x, y) / beta) / Z(x)`, with `Z(x)`
    estimated per prompt. A completion whose reward or log-probs are not finite, or where `mask` is `False`, gets
    weight exactly 0 and the others of its prompt still sum to 1; a prompt with no valid completion gets all-zero
    weights (`valid.any(dim=1)` is `False` for it). The arithmetic runs in float64, dividing `r - max(r)` (per
    prompt) rather than `r` by `beta`, so `exp(r / beta)` is never formed.

    Args:
        rewards (`torch.Tensor`):
            Rewards of shape `(P, G)`: `P` prompts, `G` completions each.
        beta (`float`):
            KL coefficient `> 0` of the target.
        ref_logps (`torch.Tensor`):
            Summed completion log-probs under the reference model, shape `(P, G)`.
        sampling_logps (`torch.Tensor`):
            Summed completion log-probs under the distribution they were sampled from, shape `(P, G)`.
        mask (`torch.Tensor` or `None`, *optional*):
            Boolean `(P, G)`; `False` completions are left out.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the float32 weights `(P, G)` (no gradient; the weights of a prompt with a
        valid completion sum to 1) and the boolean `(P, G)` mask of the valid completions.

    Example:

    ```python
    >>> w, valid = online_var_weights(
    ...     torch.tensor([[1.0, 0.0]]), beta=1.0, ref_logps=torch.zeros(1, 2), sampling_logps=torch.zeros(1, 2)
    ... )
    >>> w  # softmax([1, 0])
    tensor([[0.7311, 0.2689]])
    ```
    """
    if not beta > 0:  # also catches NaN
        raise ValueError(f"`beta` must be > 0, got {beta}. It is the KL coefficient of the online VAR target.")
    if rewards.dim() != 2:
        raise ValueError(f"`rewards` must be a (prompts, completions) tensor, got shape {tuple(rewards.shape)}.")
    for name, t in (("ref_logps", ref_logps), ("sampling_logps", sampling_logps), ("mask", mask)):
        if t is not None and t.shape != rewards.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(rewards.shape)} like `rewards`.")
    r = rewards.detach().to(torch.float64)
    ref = ref_logps.detach().to(device=r.device, dtype=torch.float64)
    q = sampling_logps.detach().to(device=r.device, dtype=torch.float64)
    valid = torch.isfinite(r) & torch.isfinite(ref) & torch.isfinite(q)
    if mask is not None:
        valid &= mask.to(device=r.device, dtype=torch.bool)
    kept = valid.any(dim=1)
    zeros = torch.zeros_like(r)
    r_max = torch.where(valid, r, torch.full_like(r, float("-inf"))).amax(dim=1, keepdim=True)
    r_max = torch.where(kept.unsqueeze(1), r_max, torch.zeros_like(r_max))
    x = (torch.where(valid, r, zeros) - r_max) / float(beta) + torch.where(valid, ref - q, zeros)
    x = torch.where(valid, x, torch.full_like(x, float("-inf")))
    log_z = torch.logsumexp(x, dim=1, keepdim=True)
    log_z = torch.where(kept.unsqueeze(1), log_z, torch.zeros_like(log_z))
    w = torch.where(valid, torch.exp(x - log_z), zeros)
    return w.to(torch.float32), valid


def var_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR loss `-(var_weights(rewards, beta, ref_logps, mask) * policy_logps).sum()` (Eq. 21 of arXiv 2502.11026).

    `policy_logps` are summed completion log-probs of shape `(B,)`; the gradient flows only through them. Rows with
    weight 0 contribute exactly 0 (even if their log-prob is not finite), so the loss is never NaN. The other
    arguments are those of [`var_weights`].
    """
    _check_1d("policy_logps", policy_logps)
    w = var_weights(rewards, beta, ref_logps, mask).to(policy_logps.device)
    return weighted_nll(policy_logps, w)


def weighted_nll(policy_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`-(weights * policy_logps).sum()` in float32, with exact zeros where the weight is 0 (so a non-finite
    log-prob of a zero-weight row never makes the loss NaN)."""
    logp = policy_logps.float()
    contrib = torch.where(weights > 0, weights.detach().float() * logp, torch.zeros_like(logp))
    return -contrib.sum()


# ----------------------------------------------------------------------------------------------------------------------
# VCB: value-based calibration
# ----------------------------------------------------------------------------------------------------------------------


def _vcb_prepare(policy_logps, ref_logps, rewards, mask):
    if policy_logps.dim() != 2:
        raise ValueError(
            f"VCB inputs must be (G, n) tensors (G prompts, n completions); got {tuple(policy_logps.shape)}."
        )
    for name, t in (("ref_logps", ref_logps), ("rewards", rewards)):
        if t.shape != policy_logps.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}, expected {tuple(policy_logps.shape)} like `policy_logps`."
            )
    device = policy_logps.device
    r = rewards.detach().float().to(device)
    ref = ref_logps.detach().float().to(device)
    valid = torch.isfinite(r) & torch.isfinite(ref) & torch.isfinite(policy_logps.detach().float())
    if mask is not None:
        if mask.shape != policy_logps.shape:
            raise ValueError(f"`mask` has shape {tuple(mask.shape)}, expected {tuple(policy_logps.shape)}.")
        valid &= mask.to(device=device, dtype=torch.bool)
    zeros = torch.zeros_like(r)
    r = torch.where(valid, r, zeros)
    ref = torch.where(valid, ref, zeros)
    logp = torch.where(valid, policy_logps.float(), torch.zeros_like(policy_logps, dtype=torch.float32))
    return logp, ref, r, valid


def _vcb_normalised_rewards(r, valid, unbiased, eps_abs, eps_rel):
    """Per-group `(r - mean) / sigma` (0 where sigma is ~0 or the row is invalid), and sigma itself."""
    k = valid.sum(dim=1, keepdim=True).float()
    denom_mean = k.clamp(min=1.0)
    mean = (r * valid).sum(dim=1, keepdim=True) / denom_mean
    sq = (((r - mean) * valid) ** 2).sum(dim=1, keepdim=True)
    dof = (k - 1.0) if unbiased else k
    sigma = torch.sqrt(sq / dof.clamp(min=1.0))
    scale = torch.where(valid, r.abs(), torch.zeros_like(r)).amax(dim=1, keepdim=True)
    degenerate = sigma <= (eps_abs + eps_rel * scale)
    safe_sigma = torch.where(degenerate, torch.ones_like(sigma), sigma)
    rn = torch.where(valid & ~degenerate, (r - mean) / safe_sigma, torch.zeros_like(r))
    return rn, sigma.squeeze(1)


def _vcb_pair_mask(valid: torch.Tensor, pair_mode: str) -> torch.Tensor:
    n = valid.shape[1]
    both = valid[:, :, None] & valid[:, None, :]
    if pair_mode == "paper":
        tri = torch.ones(n, n, dtype=torch.bool, device=valid.device).triu()  # j >= i, diagonal included
        return both & tri
    if pair_mode == "appendix":
        return both  # all ordered pairs (i, j), diagonal included
    raise ValueError(f"`pair_mode` must be one of {VCB_PAIR_MODES}, got {pair_mode!r}.")


def vcb_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    gamma: float = 0.05,
    lam: float = 1.0,
    mask: torch.Tensor | None = None,
    pair_mode: str = "paper",
    sigma_eps_abs: float = 1e-6,
    sigma_eps_rel: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """VCB loss (Eqs. 19-20 of arXiv 2402.16030; the user guide is `docs/vcb.md`).

    Inputs are `(G, n)`: G prompt groups of n completions (`mask` marks real completions when groups have different
    sizes; non-finite rewards or reference log-probs also make an entry invalid). Per group:

    - `sigma`: population std of the valid rewards (`pair_mode="appendix"`: unbiased std, as `torch.std`); when
      `sigma <= sigma_eps_abs + sigma_eps_rel * max|r|` the normalised reward gaps are 0 (no division by ~0);
    - `s_i = gamma * (logp_i - ref_i) - r_i / sigma`; `l_ij = (s_i - s_j) ** 2`;
    - `"paper"`: `lam * logsumexp_{j >= i}(l_ij / lam)` (Eq. 20, diagonal included);
      `"appendix"`: `lam * logsumexp_{all i, j}(l_ij / (2 lam))` (the Appendix A.4 code).

    Every pair term is `exp(l / lam) >= 1`, so the loss of a group with k valid completions is never below
    `lam * log(P)`, P the number of pairs: `k (k + 1) / 2` in `"paper"` mode, `k ** 2` in `"appendix"` mode. It
    equals that value exactly at calibration (all `s_i` equal); it is not 0 there.

    `reduction="mean"` averages over groups with at least 2 valid completions (0 with a graph if none); `"sum"` sums
    them; `"none"` returns the (G,) per-group losses with 0 for skipped groups.

    Example:

    ```python
    >>> import math, torch
    >>> from trl_rewardweighted.losses import vcb_loss
    >>> rewards = torch.tensor([[0.0, 1.0, 2.0]])  # population sigma = sqrt(2/3)
    >>> ref = torch.zeros(1, 3)
    >>> policy = (rewards - 1.0) / (2 / 3) ** 0.5 / 0.5  # gamma * log-ratio = normalised reward: calibrated
    >>> round(vcb_loss(policy, ref, rewards, gamma=0.5).item(), 5) == round(math.log(6), 5)  # 3 * 4 / 2 pairs
    True
    ```
    """
    if not gamma > 0:
        raise ValueError(f"`gamma` must be > 0, got {gamma}.")
    if not lam > 0:
        raise ValueError(f"`lam` must be > 0, got {lam}.")
    if pair_mode not in VCB_PAIR_MODES:
        raise ValueError(f"`pair_mode` must be one of {VCB_PAIR_MODES}, got {pair_mode!r}.")
    logp, ref, r, valid = _vcb_prepare(policy_logps, ref_logps, rewards, mask)
    rn, _ = _vcb_normalised_rewards(r, valid, pair_mode == "appendix", sigma_eps_abs, sigma_eps_rel)
    s = gamma * (logp - ref) - rn  # (G, n)
    pair_loss = (s[:, :, None] - s[:, None, :]) ** 2  # (G, n, n)
    if pair_mode == "appendix":
        pair_loss = pair_loss / 2.0
    pairs = _vcb_pair_mask(valid, pair_mode)
    scaled = (pair_loss / lam).masked_fill(~pairs, float("-inf")).flatten(1)
    group_ok = valid.sum(dim=1) >= 2
    # logsumexp of an all -inf row is -inf; such groups are replaced by 0 below (and their inputs are zeros).
    per_group = lam * torch.logsumexp(scaled.masked_fill(~group_ok[:, None], 0.0), dim=1)
    per_group = torch.where(group_ok, per_group, torch.zeros_like(per_group))
    if reduction == "none":
        return per_group
    if reduction == "sum":
        return per_group.sum()
    if reduction != "mean":
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}.")
    return per_group.sum() / group_ok.sum().clamp(min=1)


@torch.no_grad()
def vcb_pair_stats(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    gamma: float = 0.05,
    mask: torch.Tensor | None = None,
    pair_mode: str = "paper",
    sigma_eps_abs: float = 1e-6,
    sigma_eps_rel: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Diagnostics over the unordered pairs i < j of each group (no gradient).

    Returns sums and counts (so they can be gathered across processes and averaged exactly):

    - `calib_abs_sum`: sum over pairs of `|gamma * (dlogratio_ij) - (r_i - r_j) / sigma|` (0 at calibration);
    - `agree_sum` / `agree_count`: pairs with distinct rewards where the log-ratio gap has the same sign as the
      reward gap (pair-order agreement, the misalignment check of Appendix A.5);
    - `num_pairs`, `sigma_sum`, `num_groups` (groups with >= 2 valid completions).
    """
    logp, ref, r, valid = _vcb_prepare(policy_logps, ref_logps, rewards, mask)
    rn, sigma = _vcb_normalised_rewards(r, valid, pair_mode == "appendix", sigma_eps_abs, sigma_eps_rel)
    lr = logp - ref
    d_lr = lr[:, :, None] - lr[:, None, :]
    d_rn = rn[:, :, None] - rn[:, None, :]
    d_r = r[:, :, None] - r[:, None, :]
    n = valid.shape[1]
    upper = torch.ones(n, n, dtype=torch.bool, device=valid.device).triu(diagonal=1)
    pairs = valid[:, :, None] & valid[:, None, :] & upper
    distinct = pairs & (d_r != 0)
    agree = distinct & (torch.sign(d_lr) == torch.sign(d_r))
    group_ok = valid.sum(dim=1) >= 2
    return {
        "calib_abs_sum": ((gamma * d_lr - d_rn).abs() * pairs).sum(),
        "num_pairs": pairs.sum().float(),
        "agree_sum": agree.sum().float(),
        "agree_count": distinct.sum().float(),
        "sigma_sum": (sigma * group_ok).sum(),
        "num_groups": group_ok.sum().float(),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Sample weights: a mean turned into a weighted mean over the whole optimizer step
# ----------------------------------------------------------------------------------------------------------------------


def sample_weight_factors(weights: torch.Tensor, count, total) -> torch.Tensor:
    """Per-item loss multipliers `w_i * count / total` (all 0 when `total` is 0) that turn a plain mean into a weighted
    mean.

    A loss computed as `(1 / count) * sum_i l_i` becomes `sum_i w_i l_i / total` once every `l_i` is multiplied by its
    factor. `count` is what the plain mean divides by (items of a micro-batch, or tokens of an optimizer step) and
    `total` the sum of the weights over the set the weighted mean runs over (the whole optimizer step: every
    micro-batch on every process), so the result does not depend on how that set is split. With every weight 1 and
    `total == count`, every factor is exactly 1.

    Args:
        weights (`torch.Tensor`):
            Sample weights `>= 0`, any shape (no gradient flows through them).
        count (`float` or `torch.Tensor`):
            The divisor of the plain mean.
        total (`float` or `torch.Tensor`):
            Sum of the weights of the normalisation set, `>= 0`.

    Returns:
        `torch.Tensor`: float32 factors of the shape of `weights`.
    """
    weights = weights.detach().float()
    total = torch.as_tensor(total, dtype=torch.float64, device=weights.device)
    count = torch.as_tensor(count, dtype=torch.float64, device=weights.device)
    if total.item() <= 0:
        return torch.zeros_like(weights)
    return (weights.double() * (count / total)).float()
