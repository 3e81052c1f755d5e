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
    "var_prompt_weights",
    "var_prompt_loss",
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


def _check_like_rewards(name: str, t: torch.Tensor, rewards: torch.Tensor) -> None:
    """Refuse a per-row tensor `name` that is not 1-D or not shaped like `rewards`."""
    _check_1d(name, t)
    if t.shape != rewards.shape:
        raise ValueError(f"`{name}` has shape {tuple(t.shape)} but `rewards` has shape {tuple(rewards.shape)}.")


def _check_sample_weights(sample_weights: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """`sample_weights` as float64, after checking that they are finite, `>= 0` and shaped like `rewards`."""
    _check_like_rewards("sample_weights", sample_weights, rewards)
    s = sample_weights.detach().to(torch.float64)
    bad = (~torch.isfinite(s) | (s < 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"`sample_weights` must be finite and >= 0; rows {bad[:10]} have {s[bad[:10]].tolist()}. A weight of 0 "
            "leaves a row out; negative or NaN weights have no meaning as prior weights."
        )
    return s


def var_log_weights(
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centred VAR log-weights `r_i / beta + log pi_ref(y_i|x_i) + log s_i - c`, `-inf` on rows outside the normaliser.

    A row is invalid when its reward or reference log-prob is not finite, or when `mask` is `False` there (e.g. an
    empty completion, a padding row, or a row repeated by accelerate's `even_batches`). A row whose sample weight
    `s_i` is 0 gets `-inf` too (weight 0). The constant `c` (the largest log-weight of a remaining row, which therefore
    gets `0`) does not change the softmax. The arithmetic runs in float64, dividing `r - max(r)` rather than `r` by
    `beta`, so neither a large common reward offset nor an `r / beta` beyond the float32 range loses the differences
    that set the weights. Sample weights of 1 add exactly 0: the result is then the one without them, bit for bit.

    Args:
        rewards (`torch.Tensor`):
            Rewards of shape `(B,)`, any float dtype (pass float64 to keep rewards with a large offset exact).
        beta (`float`):
            Temperature `> 0` of the weights.
        ref_logps (`torch.Tensor` or `None`, *optional*):
            Summed reference log-probs of shape `(B,)`; `None` leaves out the reference term.
        mask (`torch.Tensor` or `None`, *optional*):
            Boolean `(B,)`; `False` rows are left out.
        sample_weights (`torch.Tensor` or `None`, *optional*):
            Prior weights `s_i >= 0` of shape `(B,)` (e.g. importance weights of off-policy data); `log s_i` is added
            to the log-weight, and a row with `s_i = 0` is left out. `None` means all 1.

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
        _check_like_rewards("ref_logps", ref_logps, rewards)
        ref = ref_logps.detach().to(device=r.device, dtype=torch.float64)
        valid &= torch.isfinite(ref)
    if mask is not None:
        valid &= mask.to(device=r.device, dtype=torch.bool)
    log_s = None
    if sample_weights is not None:
        s = _check_sample_weights(sample_weights, rewards).to(device=r.device)
        valid &= s > 0
        log_s = torch.log(torch.where(valid, s, torch.ones_like(s)))  # exactly 0 where s == 1
    log_e = torch.full_like(r, float("-inf"))
    if valid.any():
        zeros = torch.zeros_like(r)
        r = torch.where(valid, r, zeros)
        # Centre before dividing: r / beta may overflow even float64 for a tiny beta, r - max(r) never does.
        x = (r - r[valid].max()) / float(beta)
        if ref is not None:
            x = x + torch.where(valid, ref, zeros)
        if log_s is not None:
            x = x + log_s
        x = x - x[valid].max()  # the best row gets exactly 0
        log_e = torch.where(valid, x.clamp(min=torch.finfo(torch.float32).min), log_e)
    return log_e.to(torch.float32)


def var_weights(
    rewards: torch.Tensor,
    beta: float,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR weights `w = softmax(rewards / beta + ref_logps [+ log sample_weights])` over a 1-D batch (see `docs/var.md`).

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
        sample_weights (`torch.Tensor` or `None`, *optional*):
            Prior weights `>= 0` of shape `(B,)`, see [`var_log_weights`]; rows with weight 0 get weight 0.

    Returns:
        `torch.Tensor`: Float32 weights of shape `(B,)`, no gradient.

    Raises:
        `ValueError`: if `beta <= 0`, if a sample weight is negative or not finite, or if no row is valid.

    Example:

    ```python
    >>> var_weights(torch.tensor([1e4 + 1e-3, 1e4 - 1e-3], dtype=torch.float64), beta=1e-3)  # softmax([1, -1])
    tensor([0.8808, 0.1192])
    ```
    """
    log_e = var_log_weights(rewards, beta, ref_logps, mask, sample_weights)
    if not torch.isfinite(log_e).any():
        raise ValueError(
            f"No valid row in a VAR batch of {log_e.numel()}: every reward or reference log-prob is NaN/inf (or the "
            "completion is empty, or every sample weight is 0). Drop such rows from the dataset or fix the reward "
            "column."
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
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """VAR loss `-(var_weights(rewards, beta, ref_logps, mask) * policy_logps).sum()` (Eq. 21 of arXiv 2502.11026).

    `policy_logps` are summed completion log-probs of shape `(B,)`; the gradient flows only through them. Rows with
    weight 0 contribute exactly 0 (even if their log-prob is not finite), so the loss is never NaN. The other
    arguments are those of [`var_weights`].
    """
    _check_1d("policy_logps", policy_logps)
    w = var_weights(rewards, beta, ref_logps, mask, sample_weights).to(policy_logps.device)
    return weighted_nll(policy_logps, w)


def weighted_nll(policy_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`-(weights * policy_logps).sum()` in float32, with exact zeros where the weight is 0 (so a non-finite
    log-prob of a zero-weight row never makes the loss NaN)."""
    logp = policy_logps.float()
    contrib = torch.where(weights > 0, weights.detach().float() * logp, torch.zeros_like(logp))
    return -contrib.sum()


def var_prompt_weights(
    rewards: torch.Tensor,
    beta: float,
    group_ids: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-prompt VAR weights: `softmax_i(r_i / beta [+ log pi_ref(y_i|x)] [+ log s_i])` over the rows of each group.

    Rows with the same `group_ids` value are replies to the same prompt `x`; each group gets its own normaliser
    `Z(x)`, estimated from its own replies (as online VAR does, see [`online_var_weights`]), so a prompt's weights do
    not depend on the other prompts' rewards. Each group's log-weights are those of [`var_log_weights`] on its rows
    (float64 centring per group, then a float32 softmax, i.e. `exp(l_i - logsumexp_g(l))`). Invalid rows (non-finite
    reward or reference log-prob, `mask` `False`, sample weight 0) get weight exactly 0; the other rows of a group sum
    to 1; a group without a remaining row gets all zeros. A group of one valid row gives it weight 1.

    The VAR loss of a batch of prompts is then the mean over the groups with a weight of `-sum_i w_i log pi(y_i|x)`
    ([`var_prompt_loss`]).

    Args:
        rewards (`torch.Tensor`):
            Rewards of shape `(B,)` (float64 keeps rewards with a large offset exact).
        beta (`float`):
            Temperature `> 0`.
        group_ids (`torch.Tensor`):
            Integer group (prompt) id of each row, shape `(B,)`; the rows of a group need not be contiguous.
        ref_logps (`torch.Tensor` or `None`, *optional*):
            Summed reference log-probs of shape `(B,)`; `None` leaves out the reference term.
        mask (`torch.Tensor` or `None`, *optional*):
            Boolean `(B,)`; `False` rows get weight 0.
        sample_weights (`torch.Tensor` or `None`, *optional*):
            Prior weights `>= 0` of shape `(B,)`; `log s_i` is added inside the softmax.

    Returns:
        `torch.Tensor`: Float32 weights of shape `(B,)`, no gradient.

    Example:

    ```python
    >>> var_prompt_weights(torch.tensor([0.0, 1.0, 5.0, 5.0]), 1.0, torch.tensor([0, 0, 1, 1]))
    tensor([0.2689, 0.7311, 0.5000, 0.5000])
    ```
    """
    _check_1d("rewards", rewards)
    _check_like_rewards("group_ids", group_ids, rewards)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"`group_ids` must be an integer tensor, got {group_ids.dtype}.")
    if sample_weights is not None:
        _check_sample_weights(sample_weights, rewards)  # row numbers of the whole batch in the message
    weights = torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device)
    ids = group_ids.to(rewards.device)
    extras = [None if t is None else t.to(rewards.device) for t in (ref_logps, mask, sample_weights)]
    for g in torch.unique(ids):
        rows = (ids == g).nonzero().flatten()
        ref, keep, prior = (None if t is None else t[rows] for t in extras)
        log_e = var_log_weights(rewards[rows], beta, ref, keep, prior)
        if torch.isfinite(log_e).any():
            weights[rows] = torch.exp(log_e - torch.logsumexp(log_e, dim=0))
    return weights


def var_prompt_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    group_ids: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-prompt VAR loss: the mean over prompts of `-sum_i w_i log pi(y_i|x)`, `w` from [`var_prompt_weights`].

    The mean is over the groups that keep a weight (at least one valid row with a sample weight `> 0`); the gradient
    flows only through `policy_logps` (summed completion log-probs, shape `(B,)`). The other arguments are those of
    [`var_prompt_weights`].

    Raises:
        `ValueError`: if no group keeps a weight.
    """
    _check_1d("policy_logps", policy_logps)
    w = var_prompt_weights(rewards, beta, group_ids, ref_logps, mask, sample_weights).to(policy_logps.device)
    num_groups = torch.unique(group_ids.to(w.device)[w > 0]).numel()
    if num_groups == 0:
        raise ValueError(
            f"No prompt group of a VAR batch of {w.numel()} rows keeps a weight: every reward or reference log-prob "
            "is NaN/inf, every completion is empty, or every sample weight is 0."
        )
    return weighted_nll(policy_logps, w) / num_groups


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
