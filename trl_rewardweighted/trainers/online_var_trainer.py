"""Online VAR: VAR's reward-weighted SFT on completions sampled from the current policy, with the normaliser Z(x)
estimated per prompt. Built on TRL's `GRPOTrainer` (generation, reward functions, vLLM, logging) with the loss
replaced. See `docs/online_var.md`."""

from __future__ import annotations

import contextlib
import functools

import torch
from accelerate.utils import is_peft_model
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from ..losses import online_var_weights, weighted_nll
from .common import TrainerInitMixin
from .online_var_config import OnlineVARConfig, sampler_changing_generation_kwargs
from .var_trainer import VARTrainer

__all__ = ["OnlineVARTrainer"]

# Keys of a generation batch that `_get_per_token_logps_and_entropies` takes as keyword arguments (multimodal inputs).
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class _SampledTokenLogps(LogitsProcessor):
    """Records log q of every token `generate` samples, without building more than one step's `(batch, vocab)` scores.

    `generate` calls its processors once per new token with the sequences so far; a processor passed by the caller
    runs after the model's own processors and before the sampling warpers (temperature, top-k, ...). The scores are
    kept as `log_softmax(scores / temperature)` (exactly the distribution `generate` draws from when the warpers are
    neutral, which the config and `_check_sampler` enforce), and the log-prob of the token drawn from them is read at
    the next call, or from the finished sequences for the last one (`finish`, which sets `result`)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.result = None
        self._last = None
        self._steps = []

    def __call__(self, input_ids, scores):
        self._read(input_ids[:, -1:])
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _read(self, tokens):
        if self._last is not None:
            self._steps.append(self._last.gather(1, tokens).squeeze(1))
            self._last = None

    def finish(self, sequences):
        """Set `result`: the `(batch, new tokens)` log-probs of the sampled tokens, given the sequences `generate`
        returned."""
        self._read(sequences[:, -1:])
        steps, self._steps = self._steps, []
        self.result = (
            torch.stack(steps, dim=1) if steps else sequences.new_zeros((sequences.size(0), 0), dtype=torch.float)
        )


@contextlib.contextmanager
def _recording_sampled_logps(model, recorder: _SampledTokenLogps):
    """Within the block, `model.generate` runs with `recorder` among its logits processors and hands it the returned
    sequences."""

    own = vars(model).get("generate")  # an instance attribute already there is called, and put back after
    original = own if own is not None else functools.partial(type(model).generate, model)

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(recorder)
        sequences = original(*args, logits_processor=processors, **kwargs)
        recorder.finish(sequences if torch.is_tensor(sequences) else sequences.sequences)
        return sequences

    model.generate = generate
    try:
        yield
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own


class OnlineVARTrainer(TrainerInitMixin, GRPOTrainer):
    """Trainer for online VAR: the VAR objective (arXiv 2502.11026) on completions sampled during training.

    For every prompt, `num_generations` completions are sampled from the current policy `q` and scored by
    `reward_funcs` (exactly as in [`~trl.GRPOTrainer`]); the weights
    `w_i = softmax_i(r_i / beta + log pi_ref(y_i|x) - log q(y_i|x))` are computed once per generation batch over each
    prompt's own completions (gathered across processes, so a group is never split), and the loss is
    `-mean over prompts of sum_i w_i log pi(y_i|x)` with summed completion log-probs. The optimum of the expected loss
    is the RLHF solution `pi_ref exp(r / beta) / Z(x)` itself.

    Takes what [`~trl.GRPOTrainer`] takes plus `ref_model` (a model object or id; default: a frozen copy of a policy
    object, the PEFT base model, or the policy reloaded from its path, like GRPO). The reference is always used
    (`beta > 0`).

    Logged metrics (besides GRPO's reward, completion-length and timing metrics): `online_var/ess` (effective sample
    size `1 / sum_i w_i^2` of each prompt's weights, mean over prompts, between 1 and `num_generations`),
    `online_var/max_weight`, `online_var/weighted_reward` (`sum_i w_i r_i`, mean over prompts), `online_var/kl` (mean
    of `log q - log pi_ref` over the sampled completions: an estimate of KL(q || pi_ref)), `online_var/skipped_groups`
    (prompts of the generation batch whose completions all had a non-finite reward or log-prob, or were masked; they
    get zero weight) and `online_var/skipped_completions`. The totals since the start are in `skipped_groups` and
    `skipped_completions`. With `log_completions=True`, the completions table has each completion's weight in a
    `var_weight` column (GRPO's `advantage` column is logged too, but the loss does not use it).

    Example:

    ```python
    from datasets import Dataset
    from trl_rewardweighted import OnlineVARConfig, OnlineVARTrainer

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c)) / 10 for c in completions]

    trainer = OnlineVARTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        reward_funcs=reward_len,
        args=OnlineVARConfig(output_dir="online-var", beta=0.5, num_generations=4, per_device_train_batch_size=8),
        train_dataset=Dataset.from_dict({"prompt": ["The sky is", "Cats are"] * 8}),
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "grpo", "var", "online-var", "reward-weighted", "trl-rewardweighted"]
    _name = "Online VAR"
    _paper = VARTrainer._paper  # the method is VAR's (arXiv 2502.11026), run online

    _config_class = OnlineVARConfig
    _default_output_suffix = "OnlineVAR"
    # GRPO needs no training dataset with an `environment_factory`, and says so itself.
    _requires_train_dataset = False

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs=None,
        args: OnlineVARConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        ref_model: str | PreTrainedModel | None = None,
        **kwargs,
    ):
        self._construct(locals())

    def _check_arguments(self, arguments):
        args, ref_model, peft_config = arguments["args"], arguments["ref_model"], arguments["peft_config"]
        if arguments["reward_funcs"] is None:
            raise ValueError(
                "OnlineVARTrainer needs `reward_funcs`: the weights are softmax(r / beta + log pi_ref - log q) of the "
                "rewards of the sampled completions. Pass a reward function, a reward model (id or object) or a list."
            )
        if (
            args.sync_ref_model
            and ref_model is not None
            and (peft_config is not None or is_peft_model(arguments["model"]))
        ):
            # GRPO refuses a PEFT policy with `sync_ref_model` when it keeps no reference model; with an explicit
            # `ref_model` the adapter-wrapped policy would be mixed into it parameter by parameter and fail at the
            # first synchronisation.
            raise NotImplementedError(
                "You passed `sync_ref_model=True` while using a PEFT model (and a `ref_model`): the reference is "
                "synchronised by mixing the policy's parameters into it, and an adapter-wrapped policy does not have "
                "the reference's parameters. Use `sync_ref_model=False`, or train the full model."
            )
        # `GRPOTrainer` takes no reference model: an explicit one is installed after its `__init__`.
        self._explicit_ref_model = self._resolved_ref_model(arguments)
        del arguments["ref_model"]
        self.skipped_groups = 0
        self.skipped_completions = 0
        self._online_var_rewards = None

    def _hidden_from_base_init(self, args):
        if self._explicit_ref_model is None:
            return {}
        # GRPO builds its own reference when `beta != 0`: keep it from loading one (ours is installed after).
        return {"beta": 0.0, "sync_ref_model": False}

    def _after_base_init(self, args):
        ref_model, self._explicit_ref_model = self._explicit_ref_model, None
        if ref_model is not None:
            # Installed the way GRPO installs its own (dropout off, fused LM head, prepared for the backend, synced if
            # asked).
            self.beta = args.beta
            self.ref_model = self._install_reference(ref_model, args)
        self._check_sampler()
        self.log_q_from_generate = self._resolve_log_q_source(args)

    def _resolve_log_q_source(self, args) -> bool:
        """Whether log q is recorded while `generate` samples (`OnlineVARConfig.log_q_from`)."""
        if self.use_vllm or self.use_transformers_continuous_batching or args.log_q_from == "policy":
            return False
        if args.log_q_from == "generate":
            return True
        # "auto": where the cached incremental forward and the full forward agree to float32 rounding.
        dtypes = {p.dtype for p in self.accelerator.unwrap_model(self.model).parameters()}
        return not (args.bf16 or args.fp16) and dtypes == {torch.float32}

    def _install_reference(self, ref_model, args):
        if args.sync_ref_model:
            self._check_sync_shapes(ref_model)
        if args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            ref_model = prepare_deepspeed(ref_model, self.accelerator)
        elif self.is_fsdp_enabled:
            ref_model = prepare_fsdp(ref_model, self.accelerator)
        else:
            ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        if args.sync_ref_model:
            self.add_callback(SyncRefModelCallback(ref_model=ref_model, accelerator=self.accelerator))
        return ref_model

    def _check_sync_shapes(self, ref_model):
        """`sync_ref_model` mixes the policy into the reference parameter by parameter: refuse a reference whose
        parameters do not match the policy's (at the constructor, not at the first synchronisation)."""

        def shapes(model):  # ZeRO-3 partitioned parameters keep their full shape in `ds_shape`
            return [tuple(getattr(p, "ds_shape", p.shape)) for p in model.parameters()]

        policy = self.accelerator.unwrap_model(self.model)
        if shapes(policy) != shapes(ref_model):
            raise ValueError(
                "`sync_ref_model=True` needs a `ref_model` with the policy's architecture: the reference is updated "
                "as `(1 - ref_model_mixup_alpha) * ref + ref_model_mixup_alpha * policy`, parameter by parameter, but "
                f"the given `ref_model` ({type(ref_model).__name__}, {sum(1 for _ in ref_model.parameters())} "
                f"parameter tensors) does not have the parameter shapes of the policy ({type(policy).__name__}). Use "
                "`sync_ref_model=False`, or a reference of the same architecture."
            )

    def _check_sampler(self):
        """Refuse a model `generation_config` that makes transformers' `generate` sample from something other than
        the policy's softmax (the settings GRPO passes itself are checked by the config)."""
        if self.use_vllm or self.rollout_func is not None:
            return
        model = self.accelerator.unwrap_model(self.model)
        own = getattr(model, "generation_config", None)
        if own is None:
            return
        overridden = set(self.generation_kwargs or {})
        left = {k: v for k, v in own.to_dict().items() if k not in overridden}
        changed = sampler_changing_generation_kwargs(left)
        if changed:
            raise ValueError(
                f"The model's generation_config sets {', '.join(changed)}, which changes the distribution `generate` "
                "samples from: online VAR's weights need log q(y|x) of the distribution actually sampled from, and "
                "compute it as the policy's plain softmax. Reset these fields on `model.generation_config`, or "
                "override them with neutral values in `OnlineVARConfig.generation_kwargs`."
            )

    # ------------------------------------------------------------------------------------------------------------------
    # Weights, computed once per generation batch where every completion of a prompt is visible
    # ------------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._online_var_rewards = rewards_per_func  # gathered over processes, in global order
        return rewards_per_func

    @staticmethod
    def _loss_mask(inputs):
        mask = inputs["completion_mask"]
        return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]

    def _sequence_logps(self, model, inputs, batch_size=None, compute_aux_loss=False):
        """Summed completion log-probs of `model` on a generation batch (fused LM head), and the MoE aux loss."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        per_token_logps, _, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            inputs["completion_ids"].size(1),
            batch_size=batch_size,
            compute_aux_loss=compute_aux_loss,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )
        return (per_token_logps * self._loss_mask(inputs)).sum(dim=1), aux_loss

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """GRPO's generation; with transformers' `generate` and `log_q_from` resolved to "generate", also the log-prob
        of every sampled token under the distribution it was drawn from (GRPO keeps none there), so log q needs no
        second pass of the policy."""
        if not self.log_q_from_generate:  # (never with vLLM or continuous batching)
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        recorder = _SampledTokenLogps(self.temperature)
        with _recording_sampled_logps(self.accelerator.unwrap_model(self.model_wrapped), recorder):
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        if logprobs is not None or recorder.result is None:
            return completion_ids, logprobs
        # GRPO keeps each completion up to its first EOS (the rest is padding `generate` appended).
        per_token = recorder.result.cpu()
        return completion_ids, [row[: len(ids)].tolist() for row, ids in zip(per_token, completion_ids, strict=True)]

    def _sampling_logps(self, output, mode):
        """Summed log q(y|x) of the local completions: the sampler's own log-probs (transformers' `generate`, vLLM,
        rollout functions), or else the policy's at generation time (one more forward pass)."""
        mask = self._loss_mask(output).float()
        if "sampling_per_token_logps" in output:
            per_token = output["sampling_per_token_logps"]
            # A token whose sampling log-prob is unknown (NaN) makes the row's log q unknown: the row is left out.
            return (torch.nan_to_num(per_token, nan=0.0) * mask).sum(1) + torch.where(
                (torch.isnan(per_token) & (mask > 0)).any(1), float("nan"), 0.0
            )
        if "old_per_token_logps" in output:
            return (output["old_per_token_logps"] * mask).sum(1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _ = self._sequence_logps(self.model, output, batch_size=batch_size)
        return logps

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        device = self.accelerator.device

        rewards_per_func = self._online_var_rewards
        self._online_var_rewards = None
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")

        mask = self._loss_mask(output)
        ref_logps = (output["ref_per_token_logps"] * mask).sum(dim=1)
        sampling_logps = self._sampling_logps(output, mode)
        local = torch.stack([ref_logps.float(), sampling_logps.float(), (mask.sum(1) > 0).float()], dim=1)
        ref_all, q_all, nonempty = self.accelerator.gather(local.to(device)).unbind(dim=1)

        shape = (-1, group_size)
        weights, valid = online_var_weights(
            rewards.view(shape), self.beta, ref_all.view(shape), q_all.view(shape), nonempty.view(shape) > 0
        )
        num_local = output["completion_ids"].size(0)
        start = self.accelerator.process_index * num_local
        output["var_weights"] = weights.reshape(-1)[start : start + num_local].to(device)

        # Statistics over the whole generation batch (identical on every process).
        kept = valid.any(dim=1)
        w = weights[kept].double()
        r = torch.nan_to_num(rewards.view(shape)[kept].double(), nan=0.0)
        n_skipped_groups = int((~kept).sum())
        n_skipped = int((~valid)[kept].sum())
        self.skipped_groups += n_skipped_groups
        self.skipped_completions += n_skipped
        metrics = self._metrics[mode]
        if w.numel():
            metrics["online_var/ess"].append((1.0 / (w**2).sum(dim=1)).mean().item())
            metrics["online_var/max_weight"].append(w.max(dim=1).values.mean().item())
            metrics["online_var/weighted_reward"].append((w * r).sum(dim=1).mean().item())
        log_ratio = (q_all - ref_all).view(shape)[valid]
        if log_ratio.numel():
            metrics["online_var/kl"].append(log_ratio.double().mean().item())
        metrics["online_var/skipped_groups"].append(float(n_skipped_groups))
        metrics["online_var/skipped_completions"].append(float(n_skipped))
        # `log_completions`: each completion's weight beside GRPO's advantage (which the loss does not use). The
        # weights are in the global order of GRPO's gathered prompts and completions.
        self._logs["extra"]["var_weight"].extend(weights.reshape(-1).tolist())
        return output

    # ------------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        policy_logps, aux_loss = self._sequence_logps(model, inputs, compute_aux_loss=self.aux_loss_enabled)
        weights = inputs["var_weights"]
        # -mean over the prompts of the optimizer step of sum_i w_i log pi(y_i|x): a row's share is
        # num_generations / (rows per step); the step's rows are spread over `gradient_accumulation_steps`
        # micro-batches of `per_device_train_batch_size` rows on every process, and DDP averages over processes.
        if mode == "train":
            group_size = self.num_generations
            rows = self.args.per_device_train_batch_size * self.current_gradient_accumulation_steps
        else:
            group_size, rows = self.num_generations_eval, weights.numel()
        loss = weighted_nll(policy_logps, weights) * (group_size / rows)
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
        nll = -(policy_logps.detach() / self._loss_mask(inputs).sum(1).clamp(min=1)).mean()
        self._metrics[mode]["nll"].append(self.accelerator.gather(nll.float()).mean().item())
        return loss
