"""Model utilities shared by the trainers, the sampling code and implicit-reward relabeling.

One place for: the fused-LM-head check and patch, summed completion log-probs without logits, the adapters-disabled
context, a frozen reference copy, the sharded row-wise compute used by every reference pre-pass, DPO-style
prompt + completion tokenisation, and the trainer mixin that keeps reward-like inputs in float32.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import is_peft_model

from .data.utils import check_text_or_messages, is_messages, write_json

__all__ = [
    "CheckpointedCountersMixin",
    "KeepFloat32InputsMixin",
    "LocalAccelerator",
    "adapters_disabled",
    "check_model_source",
    "completion_logps_from_ids",
    "compute_rowwise_distributed",
    "default_or_checked_args",
    "dpo_prompt_ids",
    "ensure_fused_lm_head",
    "frozen_copy",
    "hidden_from_base_init",
    "is_fused",
    "pad_ids",
    "padding_free_inputs",
    "resolve_reference_model",
    "sequence_logps",
    "tokenize_prompt_completions",
    "warn_if_padding_free_attention_is_dense",
]

logger = logging.getLogger(__name__)


def is_fused(model) -> bool:
    """True when `model.forward` is TRL's fused-LM-head patch (`add_fused_lm_head`)."""
    func = getattr(model.forward, "__func__", model.forward)
    return getattr(getattr(func, "__code__", None), "co_name", "") == "_fused_forward"


def ensure_fused_lm_head(model, outputs=None):
    """Patch `model` (its PEFT *base* model) with TRL's fused LM head unless it already is; returns `model`."""
    from trl.trainer.utils import add_fused_lm_head

    target = model.get_base_model() if is_peft_model(model) else model
    if not is_fused(target):
        if outputs is None:
            add_fused_lm_head(target)
        else:
            add_fused_lm_head(target, outputs=outputs)
    return model


def frozen_copy(model):
    """A frozen deep copy of `model` to serve as a reference, without any fused-LM-head patch of the original.

    A model patched by an earlier trainer keeps a `forward` instance attribute whose non-fused path is bound to the
    original object; the copy drops it and uses its own class forward.
    """
    ref = copy.deepcopy(model)
    forward = ref.__dict__.get("forward")
    if forward is not None and is_fused(ref):
        del ref.__dict__["forward"]
    ref.requires_grad_(False)
    ref.eval()
    return ref


def padding_free_inputs(input_ids, attention_mask, labels) -> dict:
    """Concatenate the real tokens of a padded `(B, T)` batch into one `(1, L)` row, `L` the number of real tokens.

    The sequences are kept apart by `position_ids` that restart at 0 on each of them (transformers then builds a
    block-diagonal causal mask, or the varlen kernels use `cu_seq_lens_q/k`), and the first token of each sequence gets
    the label -100, so that no sequence is predicted from the end of the previous one: the summed log-prob of each
    segment equals that of the padded row. Padding may be on either side; rows may be empty.

    Returns:
        `dict`: the model inputs (`input_ids`, `labels`, `position_ids`, `cu_seq_lens_q`, `cu_seq_lens_k`,
        `max_length_q`, `max_length_k`, all `(1, L)` or 1-D) plus `segment_ids` `(L,)` (the row of each token) and
        `num_rows`, which [`sequence_logps`] uses to sum per row.
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = mask.sum(dim=1)
    flat_ids = input_ids[mask]
    flat_labels = labels[mask].clone()
    ends = lengths.cumsum(0)
    starts = ends - lengths
    flat_labels[starts[lengths > 0]] = -100
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)
    position_ids = torch.arange(flat_ids.shape[0], device=input_ids.device) - starts[segment_ids]
    cu_seq_lens = torch.cat([starts.new_zeros(1), ends[lengths > 0]]).to(torch.int32)
    max_length = int(lengths.max()) if lengths.numel() else 0
    return {
        "input_ids": flat_ids[None],
        "labels": flat_labels[None],
        "position_ids": position_ids[None],
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
        "segment_ids": segment_ids,
        "num_rows": len(lengths),
    }


def sequence_logps(
    model,
    input_ids,
    attention_mask,
    labels,
    length_normalize: bool = False,
    return_outputs: bool = False,
    padding_free: bool = False,
):
    """Summed completion log-probs `(B,)` float32 and completion token counts `(B,)` via TRL's fused LM head.

    `model` must have been patched with `trl.trainer.utils.add_fused_lm_head` (on the PEFT *base* model under
    PEFT). `labels` are -100 on prompt and padding tokens. No `(B, T, V)` logits tensor is built. With
    `return_outputs=True` the model's output (per-token `log_probs`, `entropy`, `is_top1`, `label_mask`) comes third.

    With `padding_free=True` the padded batch runs as one row of its real tokens (see [`padding_free_inputs`]): no
    compute is spent on padding, and the per-row results are those of the padded forward (to float rounding). The
    per-token outputs then have shape `(1, L - 1)`. `use_cache=False` is always passed: with a cache, transformers
    does not build the block-diagonal mask from `position_ids` and every sequence would attend to the previous ones.
    """
    if padding_free:
        inputs = padding_free_inputs(input_ids, attention_mask, labels)
        segment_ids, num_rows = inputs.pop("segment_ids"), inputs.pop("num_rows")
    else:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    outputs = model(**inputs, fused_lm_head=True, use_cache=False)
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is None:
        raise RuntimeError(
            "The model returned no `log_probs`: it was not patched with `add_fused_lm_head` (patch the PEFT base model)."
        )
    token_logps = log_probs.float()  # (B, T-1), zero where the label is -100
    if padding_free:
        # Token k of the row is predicted at position k - 1; the first token of every segment has label -100.
        per_token = torch.cat([token_logps.new_zeros(1), token_logps[0]])
        counted = (inputs["labels"][0] != -100).to(torch.long)
        counted[0] = 0
        segment_ids = segment_ids.to(per_token.device)
        logps = per_token.new_zeros(num_rows).index_add(0, segment_ids, per_token)
        num_tokens = torch.zeros(num_rows, dtype=torch.long, device=per_token.device)
        num_tokens = num_tokens.index_add(0, segment_ids, counted.to(per_token.device))
    else:
        num_tokens = (labels[:, 1:] != -100).sum(dim=-1)
        logps = token_logps.sum(dim=-1)
    if length_normalize:
        logps = logps / num_tokens.clamp(min=1).to(logps.dtype)
    return (logps, num_tokens, outputs) if return_outputs else (logps, num_tokens)


def warn_if_padding_free_attention_is_dense(model) -> None:
    """Warn when padding-free forwards will run with a dense attention kernel (from a trainer's `_after_base_init`).

    Results are exact with any implementation that honours packed `position_ids`, but only the varlen kernels
    (`flash_attention_2/3`, hub flash kernels) attend within each sequence alone. With `sdpa` / `eager`, transformers
    builds an `(L, L)` block-diagonal mask over the whole concatenated row, so attention costs grow with the square of
    the micro-batch's total tokens: the MLP and LM-head saving can then be eaten by attention on long rows.
    """
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "")
    if "flash" not in impl:
        warnings.warn(
            f"padding_free=True with attn_implementation={impl or None!r}: results are exact, but this kernel attends "
            "over the whole concatenated micro-batch with an (L, L) block-diagonal mask, so attention costs grow with "
            "the square of its total tokens. The speed-up is largest with a varlen kernel: load the model with "
            "`attn_implementation='flash_attention_2'` (`model_init_kwargs`, or `attn_implementation` in a recipe).",
            UserWarning,
            stacklevel=5,  # the caller of the trainer's `__init__` (through `_construct` and `_after_base_init`)
        )


@contextlib.contextmanager
def hidden_from_base_init(args, **values):
    """Set config fields to `values` for the duration of the base trainer's `__init__` (restored on exit).

    Our trainers keep padded, one-row-per-sequence collators and run padding-free forwards themselves (see
    [`sequence_logps`]), and VAR packs rows itself (keeping each row's reward). The bases would otherwise act on
    these flags: `SFTTrainer` builds a collator that concatenates the rows (losing the row each token belongs to),
    refuses `max_length` with `padding_free`, and packs without the reward column; `DPOTrainer` 1.16 warns that it
    ignores `padding_free`.
    """
    saved = {name: getattr(args, name) for name in values}
    for name, value in values.items():
        setattr(args, name, value)
    try:
        yield saved
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run `model` as its base (adapters off) when it is a PEFT model; a no-op otherwise."""
    unwrapped = model
    while hasattr(unwrapped, "module") and not is_peft_model(unwrapped):
        unwrapped = unwrapped.module
    if is_peft_model(unwrapped):
        with unwrapped.disable_adapter():
            yield
    else:
        yield


def compute_rowwise_distributed(
    accelerator,
    num_rows: int,
    batch_size: int,
    compute_fn: Callable[[Sequence[int]], torch.Tensor],
    desc: str | None = None,
) -> torch.Tensor:
    """Compute one value (or one fixed-shape tensor) per dataset row, sharded over processes, gathered on all.

    Every process takes the rows `rank, rank + world, ...`, padded (by repeating its last row) so that all processes
    run the same number of `compute_fn` calls: collective forwards under DeepSpeed ZeRO-3 never hang. The result is
    a CPU float32 tensor of shape `(num_rows, *value_shape)` in row order, identical on every process, so an
    in-memory dataset can get the column on every rank (TRL's own precompute writes it on rank 0 only).

    `compute_fn(indices)` returns a tensor of shape `(len(indices), *value_shape)`.
    """
    if num_rows == 0:
        raise ValueError("Cannot precompute reference log-probs for an empty dataset.")
    world = accelerator.num_processes
    rank = accelerator.process_index
    per_proc = math.ceil(num_rows / world)
    mine = list(range(rank, num_rows, world)) or [0]
    mine = mine + [mine[-1]] * (per_proc - len(mine))
    chunks = [mine[i : i + batch_size] for i in range(0, per_proc, batch_size)]
    iterator = chunks
    if desc and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        iterator = tqdm(chunks, desc=desc)
    outs = []
    for chunk in iterator:
        vals = compute_fn(chunk)
        if vals.shape[0] != len(chunk):
            raise RuntimeError(f"compute_fn returned {vals.shape[0]} values for {len(chunk)} rows.")
        outs.append(vals.detach().float().to(accelerator.device))
    local = torch.cat(outs, dim=0)  # (per_proc, *value_shape)
    gathered = accelerator.gather(local) if world > 1 else local  # (world * per_proc, *value_shape), rank-major
    value_shape = tuple(gathered.shape[1:])
    by_row = gathered.reshape(world, per_proc, *value_shape).transpose(0, 1).reshape(world * per_proc, *value_shape)
    return by_row[:num_rows].cpu()


def resolve_reference_model(model, ref_model, args, peft_config=None, quantization_config=None):
    """The reference-model rule of the DPO-based trainers (VCB and reward-augmented DPO), applied before
    `DPOTrainer.__init__`.

    - `ref_model` given as a model id or path: loaded like DPO loads its own reference (`model_init_kwargs`,
      `quantization_config`, `device_map=None` when distributed, `trust_remote_code`). `DPOTrainer` itself
      only takes a model object there.
    - no `ref_model`, and the policy is a model *object* that is not PEFT, with no `peft_config`, no
      `precompute_ref_log_probs` and no ZeRO-3: a frozen copy of the object, taken now (before the fused LM head is
      patched onto the policy). `DPOTrainer` would reload `config._name_or_path` instead, which fails for a model
      built in memory and silently differs from a policy modified after loading. (Under ZeRO-3 partitioned
      parameters cannot be deep-copied, so DPO's reload from the path is kept.)
    - otherwise `ref_model` is returned as given (`None`: DPO uses the PEFT base / "ref" adapter, the precomputed
      log-probs, or reloads the policy's path).
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if isinstance(ref_model, str):
        from trl.trainer.utils import create_model_from_path

        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        try:
            return create_model_from_path(ref_model, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"`ref_model={ref_model!r}` could not be loaded as a model: {err} Give a folder with a saved model, a "
                "Hub model id, or a model object (or leave `ref_model` unset to use a copy of the starting policy)."
            ) from err
    if (
        ref_model is None
        and not isinstance(model, str)
        and peft_config is None
        and not is_peft_model(model)
        and not getattr(args, "precompute_ref_log_probs", False)
        and not is_deepspeed_zero3_enabled()
    ):
        return frozen_copy(model)
    return ref_model


class LocalAccelerator:
    """The parts of `accelerate.Accelerator` that `compute_rowwise_distributed` uses, for one process."""

    num_processes = 1
    process_index = 0
    is_local_main_process = True

    def __init__(self, device):
        self.device = device

    def gather(self, tensor):  # pragma: no cover - never called with one process
        return tensor


def _as_assistant_messages(completion, row) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        return [completion]
    if is_messages(completion):
        return list(completion)
    raise ValueError(
        f"Row {row}: a completion of a conversational prompt must be an assistant text or a list of messages "
        f"(e.g. [{{'role': 'assistant', 'content': ...}}]), got {type(completion).__name__}."
    )


def default_or_checked_args(args, model, config_class: type, suffix: str, fix: str | None = None):
    """A trainer's `args`: when None, a `config_class` named `<model name>-<suffix>` (as TRL's trainers name their
    default output folder); otherwise `args` itself, refused with a `TypeError` unless it is a `config_class`.

    Args:
        args (`TrainingArguments` or `None`):
            What the user passed.
        model (`str` or `PreTrainedModel`):
            The model id / path or object (its `config._name_or_path` names the default output folder).
        config_class (`type`):
            The trainer's config class.
        suffix (`str`):
            The default output folder's suffix, e.g. `"VAR"`.
        fix (`str`, *optional*):
            How to build the right config (default: `"Build one with <Config>(**your_args.to_dict())."`).

    Returns:
        An instance of `config_class`.
    """
    name = config_class.__name__
    if args is None:
        model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        return config_class(f"{str(model_name).rstrip('/').split('/')[-1] or 'model'}-{suffix}")
    if not isinstance(args, config_class):
        raise TypeError(
            f"`args` must be {'an' if name[0] in 'AEIOU' else 'a'} {name}, got {type(args).__name__}. "
            + (fix or f"Build one with {name}(**your_args.to_dict()).")
        )
    return args


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """Pad token-id lists into `(input_ids, attention_mask)` long tensors on the `side` given (`"left"` or
    `"right"`), with TRL's `pad`."""
    from trl.trainer.utils import pad

    ids = [torch.tensor(list(seq), dtype=torch.long) for seq in seqs]
    masks = [torch.ones(len(seq), dtype=torch.long) for seq in seqs]
    return pad(ids, padding_value=pad_id, padding_side=side), pad(masks, padding_value=0, padding_side=side)


def completion_logps_from_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[list[float]]:
    """Summed log-probs `log pi(y|x)` of given token ids, through the fused LM head (no logits), without gradients.

    Args:
        model:
            A causal LM (patched with the fused LM head here if it is not yet).
        prompt_ids (`Sequence[Sequence[int]]`):
            One context per prompt: the exact ids the completions continue (e.g. the rendered prompt a sample was
            drawn from).
        completion_ids (`Sequence[Sequence[Sequence[int]]]`):
            Per prompt, a list of completions as token ids; each log-prob is the sum over its ids.
        batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward.
        pad_id (`int`, *optional*, defaults to `0`):
            The padding id (masked out: any id gives the same values).

    Returns:
        `list[list[float]]`: aligned with `completion_ids`.
    """
    ensure_fused_lm_head(model)
    sequences = [
        (list(context) + list(ids), len(context))
        for context, group in zip(prompt_ids, completion_ids, strict=True)
        for ids in group
    ]
    device = next(model.parameters()).device
    values: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            input_ids, attention_mask = pad_ids([ids for ids, _ in chunk], pad_id, side="right")
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            for i, (_, n_prompt) in enumerate(chunk):
                labels[i, :n_prompt] = -100
            logps, _ = sequence_logps(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
            values.extend(logps.float().cpu().tolist())
    out, offset = [], 0
    for group in completion_ids:
        out.append(values[offset : offset + len(group)])
        offset += len(group)
    return out


def dpo_prompt_ids(processing_class, prompt, **template_kwargs) -> list[int]:
    """The token ids of a prompt as TRL's `DPOTrainer` tokenises it: a message list through the chat template with
    `add_generation_prompt=True`, a string with the tokenizer's own special tokens (e.g. BOS)."""
    from trl.data_utils import _tokenize

    if isinstance(prompt, str):
        return list(_tokenize(processing_class, prompt)["input_ids"])
    return list(_tokenize(processing_class, list(prompt), add_generation_prompt=True, **template_kwargs)["input_ids"])


def tokenize_prompt_completions(processing_class, prompt, completions, row=None, **template_kwargs):
    """Tokenise one prompt and its completions the way TRL's `DPOTrainer` does (trl 1.16 `_prepare_dataset`).

    Conversational prompts (message lists) go through the chat template (the prompt with
    `add_generation_prompt=True`); string prompts are concatenated with each completion, and EOS is appended to a
    string completion that lacks it. The completion starts where the tokenised prompt and every tokenised
    prompt + completion agree. Returns `(prompt_ids, [completion_ids, ...])`.
    """
    from trl.data_utils import _tokenize, common_prefix_length

    if check_text_or_messages(prompt, f"Row {row}: `prompt`"):
        for k, completion in enumerate(completions):
            if isinstance(completion, (list, tuple)):
                check_text_or_messages(completion, f"Row {row}: completion {k}")
        prompt = list(prompt)
        prompt_ids = dpo_prompt_ids(processing_class, prompt, **template_kwargs)
        full_ids = [
            _tokenize(processing_class, prompt + _as_assistant_messages(c, row), **template_kwargs)["input_ids"]
            for c in completions
        ]
    elif isinstance(prompt, str):
        eos = getattr(processing_class, "eos_token", None) or ""
        prompt_ids = dpo_prompt_ids(processing_class, prompt)
        full_ids = []
        for completion in completions:
            if not isinstance(completion, str):
                raise ValueError(
                    f"Row {row}: the prompt is a string, so each completion must be a string too, got "
                    f"{type(completion).__name__}. For chat data, make the prompt a list of messages."
                )
            if not completion.endswith(eos):
                completion = completion + eos
            full_ids.append(_tokenize(processing_class, prompt + completion)["input_ids"])
    else:
        raise ValueError(f"Row {row}: `prompt` must be a string or a list of messages, got {type(prompt).__name__}.")

    prompt_len = min([len(prompt_ids)] + [common_prefix_length(prompt_ids, ids) for ids in full_ids])
    if prompt_len < len(prompt_ids):
        logger.warning(
            "The tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template renders the "
            "prompt alone differently, or tokens merge across the boundary). The completions start where they "
            "diverge; this end of the prompt is left out of the training sequence: %r.",
            processing_class.decode(prompt_ids[prompt_len:]),
        )
    return prompt_ids[:prompt_len], [ids[prompt_len:] for ids in full_ids]


class KeepFloat32InputsMixin:
    """Trainer mixin: keep the listed batch tensors in float32 through `_prepare_inputs`.

    Under DeepSpeed, `Trainer._prepare_input` casts every float tensor of the batch to the engine dtype (bf16): a
    summed log-prob of -300 then has a resolution of 2, and rewards lose their small differences. The keys in
    `_float32_input_keys` are set aside, the rest is prepared as usual, and they come back as float32 on the device.
    """

    _float32_input_keys: tuple[str, ...] = ()

    def _prepare_inputs(self, inputs):
        kept = {k: inputs.pop(k) for k in self._float32_input_keys if torch.is_tensor(inputs.get(k))}
        inputs = super()._prepare_inputs(inputs)
        for key, value in kept.items():
            inputs[key] = value.to(device=self.args.device, dtype=torch.float32)
        return inputs


class CheckpointedCountersMixin:
    """Trainer mixin: save the trainer's cumulative counters with each checkpoint and restore them on resume.

    Running totals that a trainer logs (tokens seen, rows or groups skipped, ...) live on the trainer object, which
    `resume_from_checkpoint` does not restore: without this they restart from 0. A trainer returns its totals from
    `_cumulative_counters()` and takes them back in `_restore_cumulative_counters(counters)` (an empty dict when the
    checkpoint has no counters file, e.g. one written by an older version). The file is `COUNTERS_FILE` in the
    checkpoint folder.
    """

    COUNTERS_FILE = "trl_rewardweighted_counters.json"

    def _cumulative_counters(self) -> dict[str, float]:
        raise NotImplementedError

    def _restore_cumulative_counters(self, counters: dict[str, float]) -> None:
        raise NotImplementedError

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            write_json(os.path.join(folder, self.COUNTERS_FILE), self._cumulative_counters(), indent=2)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: `Trainer.train` raises its own error
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, self.COUNTERS_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    self._restore_cumulative_counters(json.load(f))
            else:
                warnings.warn(
                    f"The checkpoint {checkpoint} has no `{self.COUNTERS_FILE}` (written by another version?): the "
                    f"cumulative metrics ({', '.join(self._cumulative_counters())}) restart from 0.",
                    UserWarning,
                    stacklevel=2,
                )
                self._restore_cumulative_counters({})
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )


def check_model_source(spec, option: str, builtin: Sequence[str] = ()) -> str:
    """Check a model named on the command line before anything is loaded: a local path that does not exist is refused,
    naming `option` and the path, instead of the Hub error that `from_pretrained` would give for it.

    A Hub id cannot be checked offline: a value that is a valid Hub repo id (`name` or `org/name`) and not a local
    path is left to `transformers`. A value that cannot be a Hub id (an absolute path, `./`, `../` or `~` at the
    start, more than one `/`, characters a Hub id does not allow) must exist.

    Args:
        spec (`str` or `os.PathLike`):
            A local folder, a Hub repo id, or a reward function `module:function` (passed through: it is imported
            where it is used).
        option (`str`):
            The flag or key the value came from (e.g. `"--model"`), for the message.
        builtin (`Sequence[str]`, *optional*, defaults to `()`):
            Names the command resolves itself (e.g. the quickstart's `"smollm2"`): they pass as `"builtin"`.

    Returns:
        `str`: `"local"` (an existing path), `"function"` (a `module:function` spec), `"builtin"` or `"hub"` (a Hub id
        left to transformers).

    Raises:
        `FileNotFoundError`: `"--model ./out/var: the local path does not exist (a Hub model id is 'name' or
        'org/name')."`; with `HF_HUB_OFFLINE=1`, also for a Hub-like id (`out/var`) that is neither a local folder nor
        in the Hub cache.
    """
    import re
    from pathlib import Path

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = os.fspath(spec)
    if Path(text).exists():
        return "local"
    if text in builtin:
        return "builtin"
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text):
        return "function"
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(
            f"{option} {text}: the local path does not exist (a Hub model id is 'name' or 'org/name')."
        ) from None
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(text, "config.json"), str):
        raise FileNotFoundError(
            f"{option} {text}: no such local folder, and the Hub is offline (HF_HUB_OFFLINE=1) with no cached copy "
            "of that model id. Give the path of a local model folder."
        )
    return "hub"
