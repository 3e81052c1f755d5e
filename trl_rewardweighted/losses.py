"""The math of the three methods as pure tensor functions.

Tensors in, tensors out: no model, no Trainer, no I/O. Everything here runs in float32 and in log space
(``softmax`` / ``logsumexp``); ``exp(r / beta)`` is never formed. Rewards, reference log-probabilities and the
weights derived from them are constants (no gradient flows through them); only ``policy_logps`` carries a graph.

See ``docs/ALGORITHMS.md`` (shared spec) sections 1, 2 and 6 for the derivations and the defaults.
"""

from __future__ import annotations

import torch

__all__ = [
    "var_log_weights",
    "var_weights",
    "var_loss",
    "vcb_loss",
    "vcb_pair_stats",
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
    """Unnormalised VAR log-weights ``r_i / beta + log pi_ref(y_i|x_i)``, ``-inf`` on invalid rows.

    A row is invalid when its reward or reference log-prob is not finite, or when ``mask`` is False there (e.g. an
    empty completion or a padding row). The result is float32 and detached. It is what the trainer gathers across
    micro-batches and processes before a single softmax (``z_scope="step"``).
    """
    if not beta > 0:  # also catches NaN
        raise ValueError(f"`beta` must be > 0, got {beta}. It is the KL coefficient (temperature) of the VAR weights.")
    _check_1d("rewards", rewards)
    log_e = rewards.detach().float() / float(beta)
    valid = torch.isfinite(log_e)
    if ref_logps is not None:
        _check_1d("ref_logps", ref_logps)
        if ref_logps.shape != rewards.shape:
            raise ValueError(
                f"`ref_logps` has shape {tuple(ref_logps.shape)} but `rewards` has shape {tuple(rewards.shape)}."
            )
        ref = ref_logps.detach().float().to(log_e.device)
        valid &= torch.isfinite(ref)
        log_e = log_e + torch.where(valid, ref, torch.zeros_like(ref))
    if mask is not None:
        valid &= mask.to(device=log_e.device, dtype=torch.bool)
    # Both terms finite does not guarantee a finite sum (r/beta can overflow to inf for tiny beta).
    valid &= torch.isfinite(log_e)
    return log_e.masked_fill(~valid, float("-inf"))


def var_weights(
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR weights ``w = softmax(rewards / beta + ref_logps)`` over a 1-D batch (ALGORITHMS.md 1.4).

    ``ref_logps=None`` gives ``softmax(rewards / beta)`` (reward-weighted regression, ``ref_weighting=False``).
    Rows whose reward or reference log-prob is not finite, or where ``mask`` is False, get weight exactly 0 and the
    others still sum to 1. Float32, no gradient.

    Raises:
        ValueError: if ``beta <= 0`` or if no row is valid.
    """
    log_e = var_log_weights(rewards, beta, ref_logps, mask)
    if not torch.isfinite(log_e).any():
        raise ValueError(
            f"No valid row in a VAR batch of {log_e.numel()}: every reward or reference log-prob is NaN/inf (or the "
            "completion is empty). Drop such rows from the dataset or fix the reward column."
        )
    return torch.softmax(log_e, dim=0)


def var_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR loss ``-(var_weights(rewards, beta, ref_logps) * policy_logps).sum()`` (ALGORITHMS.md 1.4, Eq. 21).

    ``policy_logps`` are summed completion log-probs of shape (B,); the gradient flows only through them. Rows with
    weight 0 contribute exactly 0 (even if their log-prob is not finite), so the loss is never NaN.
    """
    _check_1d("policy_logps", policy_logps)
    w = var_weights(rewards, beta, ref_logps, mask).to(policy_logps.device)
    return weighted_nll(policy_logps, w)


def weighted_nll(policy_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``-(weights * policy_logps).sum()`` in float32, with exact zeros where the weight is 0."""
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
    """Per-group ``(r - mean) / sigma`` (0 where sigma is ~0 or the row is invalid), and sigma itself."""
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
    """VCB loss (Eq. 19-20 of arXiv 2402.16030; ALGORITHMS.md section 2).

    Inputs are ``(G, n)``: G prompt groups of n completions (``mask`` marks real completions when groups have
    different sizes; non-finite rewards or reference log-probs also make an entry invalid). Per group:

    - ``sigma``: population std of the valid rewards (``pair_mode="appendix"``: unbiased std, as ``torch.std``);
      when ``sigma <= sigma_eps_abs + sigma_eps_rel * max|r|`` the normalised reward gaps are 0 (no division by ~0);
    - ``s_i = gamma * (logp_i - ref_i) - r_i / sigma``; ``l_ij = (s_i - s_j) ** 2``;
    - ``"paper"``: ``lam * logsumexp_{j >= i}(l_ij / lam)`` (Eq. 20, diagonal included);
      ``"appendix"``: ``lam * logsumexp_{all i, j}(l_ij / (2 lam))`` (the Appendix A.4 code).

    ``reduction="mean"`` averages over groups with at least 2 valid completions (0 with a graph if none);
    ``"sum"`` sums them; ``"none"`` returns the (G,) per-group losses with 0 for skipped groups.
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

    - ``calib_abs_sum``: sum over pairs of ``|gamma * (dlogratio_ij) - (r_i - r_j) / sigma|``;
    - ``agree_sum`` / ``agree_count``: pairs with distinct rewards where the log-ratio gap has the same sign as the
      reward gap (pair-order agreement, the misalignment check of Appendix A.5);
    - ``num_pairs``, ``sigma_sum``, ``num_groups`` (groups with >= 2 valid completions).
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
