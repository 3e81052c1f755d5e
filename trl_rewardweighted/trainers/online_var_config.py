"""Configuration of the online VAR trainer (VAR's announced online version, on TRL's GRPO machinery)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trl import GRPOConfig

from .common import check_finite_positive

__all__ = ["OnlineVARConfig"]


def _grpo_default(name: str):
    """The default of an inherited [`~trl.GRPOConfig`] field, read from the dataclass (never copied here)."""
    for f in dataclasses.fields(GRPOConfig):
        if f.name == name:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    raise KeyError(name)


_NOT_GRPO_LOSS = "online VAR replaces GRPO's clipped policy-gradient loss by the weighted NLL -sum_i w_i log pi(y_i|x)"
# Inherited GRPO options that online VAR does not honour, with the reason. A value other than GRPOConfig's default is
# refused.
_UNSUPPORTED_GRPO_FIELDS = {
    "loss_type": _NOT_GRPO_LOSS + "; GRPO's loss variants are not used",
    "epsilon": _NOT_GRPO_LOSS + " (no ratio clipping)",
    "epsilon_high": _NOT_GRPO_LOSS + " (no ratio clipping)",
    "delta": _NOT_GRPO_LOSS + " (no ratio clipping)",
    "importance_sampling_level": _NOT_GRPO_LOSS + "; the importance weights are exact sequence-level weights from "
    "the sampling policy, fixed per generation batch",
    "sapo_temperature_neg": _NOT_GRPO_LOSS,
    "sapo_temperature_pos": _NOT_GRPO_LOSS,
    "vespo_k_pos": _NOT_GRPO_LOSS,
    "vespo_lambda_pos": _NOT_GRPO_LOSS,
    "vespo_k_neg": _NOT_GRPO_LOSS,
    "vespo_lambda_neg": _NOT_GRPO_LOSS,
    "top_entropy_quantile": _NOT_GRPO_LOSS + "; every completion token enters its sequence log-prob",
    "entropy_coef": _NOT_GRPO_LOSS + "; no entropy bonus is added (the KL to the reference is in the target)",
    "use_adaptive_entropy": _NOT_GRPO_LOSS + "; no entropy bonus is added",
    "off_policy_mask_threshold": _NOT_GRPO_LOSS + "; off-policy samples are reweighted exactly, not masked",
    "use_bias_correction_kl": "online VAR adds no KL penalty term to the loss (the target already carries the KL)",
    "multi_objective_aggregation": "the weights use the raw (weighted-sum) reward r, which sets the target "
    "pi_ref exp(r / beta); 'normalize_then_sum' would change the target with every batch",
    "temperature": "GRPO scores the policy and the reference at the sampling temperature too, so the target and "
    "the trained distribution would be the tempered ones, not the model's; sample at temperature 1",
}

# Sampling settings under which transformers' `generate` does not draw from the policy itself. The trainer computes
# log q(y|x) with the policy's plain softmax, so these are refused without vLLM (whose processed log-probs are used
# instead). Value: the setting's neutral values.
_SAMPLER_FIELDS = {"top_p": (1.0,), "top_k": (0, None), "min_p": (None, 0.0), "repetition_penalty": (1.0,)}


LOG_Q_SOURCES = ("auto", "generate", "policy")


@dataclass
class OnlineVARConfig(GRPOConfig):
    r"""
    Configuration for [`OnlineVARTrainer`]: every [`~trl.GRPOConfig`] field (generation, reward functions, vLLM,
    logging) plus the online VAR parameter `beta` below.

    For a prompt `x` with completions `y_1..y_G` (`num_generations`) drawn from the sampling policy `q` (the policy
    when the generation batch was sampled), online VAR minimises `-mean over prompts of sum_i w_i log pi(y_i|x)` with
    the weights `w_i = softmax_i(r_i / beta + log pi_ref(y_i|x) - log q(y_i|x))` over the prompt's own completions:
    self-normalised importance weights towards the RLHF optimum `pi_ref(y|x) exp(r(x, y) / beta) / Z(x)`. No ratio
    clipping, no critic and no KL penalty term (the target carries the KL). Sequence log-probs are summed over the
    completion tokens.

    Parameters:
        beta (`float`, *optional*, defaults to `1.0`):
            KL coefficient of the RLHF objective (VAR's λ): the temperature of the weights. It must match the scale of
            the rewards: rewards spanning tens of units with `beta=1` give one-hot weights. Unlike GRPO's `beta`, it
            is not a penalty term and must be `> 0` (the reference model is always used).
        log_q_from (`str`, *optional*, defaults to `"auto"`):
            Where `log q(y|x)` comes from with transformers' `generate`: `"generate"` records the log-prob of each
            sampled token while sampling (no extra pass; exactly the distribution drawn from, computed by the cached
            incremental forward); `"policy"` recomputes it with one no-grad forward of the policy right after sampling
            (the same computation as the reference's and the loss's log-probs, so at the start `log q = log pi_ref`
            exactly even in half precision, where the two paths differ by rounding); `"auto"` takes `"generate"` when
            the model runs in float32 (no `bf16` / `fp16`, float32 parameters: the two agree to rounding there) and
            `"policy"` otherwise. With vLLM, `log q` is vLLM's own sampling log-probability and this field must stay
            `"auto"`.

    Inherited GRPO fields keep their meaning, with these differences:

    - `num_iterations`: the weights of a generation batch are computed once, when it is sampled, and stay fixed for
      all `num_iterations` passes over it (`q` is the sampling policy, not the current one).
    - `temperature` must be 1, and without vLLM `top_p=1`, `top_k=0`, `min_p=None`, `repetition_penalty=1` and no
      sampling-changing `generation_kwargs`: `log q` must be the log-probability of the distribution actually sampled
      from. With vLLM, `log q` is vLLM's own (processed) sampling log-probability, so top-p / top-k / min-p /
      repetition penalty are allowed there.
    - `scale_rewards` and the `vllm_importance_sampling_*` options have no effect on the loss (the weights use the
      raw rewards and exact sequence-level importance ratios); GRPO's advantages are still logged.
    - `mask_truncated_completions=True` gives truncated completions weight 0 (counted in
      `online_var/skipped_completions`).
    - GRPO's loss options (`loss_type`, `epsilon*`, `delta`, `importance_sampling_level`, SAPO / VESPO parameters,
      entropy options, `off_policy_mask_threshold`, `use_bias_correction_kl`) and
      `multi_objective_aggregation="normalize_then_sum"` are refused when set to anything but their default.
    """

    beta: float = field(
        default=1.0,
        metadata={
            "help": "KL coefficient of the target pi_ref exp(r/beta): temperature of the weights. Match the reward "
            "scale. Must be > 0."
        },
    )

    log_q_from: str = field(
        default="auto",
        metadata={
            "help": "Source of log q with transformers' generate: 'generate' (recorded while sampling, no extra pass), "
            "'policy' (one no-grad forward after sampling) or 'auto' ('generate' in float32, else 'policy').",
            "choices": list(LOG_Q_SOURCES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.log_q_from not in LOG_Q_SOURCES:
            raise ValueError(
                f"OnlineVARConfig.log_q_from={self.log_q_from!r} is not one of {', '.join(map(repr, LOG_Q_SOURCES))}."
            )
        if self.log_q_from != "auto" and (self.use_vllm or self.use_transformers_continuous_batching):
            backend = "use_vllm" if self.use_vllm else "use_transformers_continuous_batching"
            source = "vLLM's own sampling log-probs" if self.use_vllm else "a forward of the policy after sampling"
            raise ValueError(
                f"OnlineVARConfig.log_q_from={self.log_q_from!r} applies to transformers' `generate` only: with "
                f"`{backend}=True`, log q is {source}. Leave `log_q_from` at 'auto'."
            )
        check_finite_positive(
            "OnlineVARConfig.beta",
            self.beta,
            "It is the KL coefficient of the target pi_ref exp(r / beta) (the temperature of the weights); set it to "
            "the scale of your rewards.",
        )
        for name, why in _UNSUPPORTED_GRPO_FIELDS.items():
            value, default = getattr(self, name), _grpo_default(name)
            if value != default:
                raise ValueError(
                    f"OnlineVARConfig.{name}={value!r} is not supported: {why}. Leave `{name}` at its default "
                    f"({default!r})."
                )
        if not self.use_vllm:
            for name, neutral in _SAMPLER_FIELDS.items():
                value = getattr(self, name)
                if value not in neutral:
                    raise ValueError(
                        f"OnlineVARConfig.{name}={value!r} is not supported without vLLM: the weights need log q(y|x) "
                        "of the distribution the completions were sampled from, and the trainer computes it as the "
                        f"policy's plain softmax. Leave `{name}` at {neutral[0]!r}, or generate with `use_vllm=True` "
                        "(its processed sampling log-probs are used as log q)."
                    )
            changed = sampler_changing_generation_kwargs(self.generation_kwargs)
            if changed:
                raise ValueError(
                    f"OnlineVARConfig.generation_kwargs={self.generation_kwargs!r} changes the sampling distribution "
                    f"({', '.join(changed)}): the weights need log q(y|x) of the distribution actually sampled from, "
                    "and the trainer computes it as the policy's plain softmax. Remove these keys."
                )


# Generation options that change the distribution `generate` samples from (or stop it from sampling), with their
# neutral values.
_NEUTRAL_GENERATION = {
    "temperature": (1.0, None),
    "top_p": (1.0, None),
    "top_k": (0, None),
    "min_p": (None, 0.0),
    "typical_p": (1.0, None),
    "epsilon_cutoff": (0.0, None),
    "eta_cutoff": (0.0, None),
    "repetition_penalty": (1.0, None),
    "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None),
    "encoder_no_repeat_ngram_size": (0, None),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "sequence_bias": (None, {}),
    "min_length": (0, None),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "num_beams": (1, None),
    "do_sample": (True,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
}


def sampler_changing_generation_kwargs(kwargs) -> list[str]:
    """The `key=value` items of a generation-kwargs mapping (or a `GenerationConfig`'s dict) that make `generate`
    draw from something other than the model's own softmax."""
    if not kwargs:
        return []
    return [
        f"{key}={kwargs[key]!r}"
        for key, neutral in _NEUTRAL_GENERATION.items()
        if key in kwargs and kwargs[key] not in neutral
    ]
