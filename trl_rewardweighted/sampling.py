"""Sample n completions per prompt from a policy and score them with a reward model or a reward function.

The result is the *groups* dataset shape that the rest of the package builds on:

```python
from trl_rewardweighted.sampling import generate_completions, score_completions

groups = generate_completions("path/to/model", ["Tell me about cats."], n=4, max_new_tokens=64)
groups = score_completions(groups, "trl_rewardweighted.rewards:vader_positivity")
# columns: prompt, completions (list[str], length n), rewards (list[float], aligned with completions)
```

`trl_rewardweighted.data.convert` turns groups into rows (VAR) or preference pairs (DPO / reward-augmented DPO);
`trl-rw sample` does all of it from the command line (see docs/sampling.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .data.utils import completion_text, to_float
from .data.utils import is_messages as is_conversational_prompt
from .model_utils import pad_ids

__all__ = [
    "generate_completions",
    "score_completions",
    "score_with_judges",
    "combine_rewards",
    "name_judges",
    "load_scorer",
    "default_device",
    "default_dtype",
    "generate_ids",
    "render_prompt_ids",
    "cut_at_eos",
    "reply_length",
    "reply_text",
    "make_vllm_engine",
    "free_model",
    "RewardModelScorer",
    "is_conversational_prompt",
]

BACKENDS = ("auto", "transformers", "vllm")
# "package.module:function" (a dotted import path, a colon, a dotted attribute path).
_CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


# ----------------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[Any], column: str = "prompt") -> bool:
    """Validate that all prompts are strings or all are message lists; return True for conversational prompts."""
    if len(prompts) == 0:
        raise ValueError(f"No prompts: the `{column}` column / list is empty.")
    conversational = is_conversational_prompt(prompts[0])
    for i, prompt in enumerate(prompts):
        if conversational:
            if not is_conversational_prompt(prompt):
                raise ValueError(
                    f"Prompt {i} in `{column}` is {type(prompt).__name__}, but prompt 0 is a message list: use one "
                    "shape for all prompts (all strings, or all lists of {'role', 'content'} messages)."
                )
            bad = [m for m in prompt if "role" not in m or "content" not in m]
            if bad:
                raise ValueError(f"Prompt {i} in `{column}` has a message without 'role'/'content': {bad[0]!r}.")
        elif not isinstance(prompt, str):
            raise ValueError(
                f"Prompt {i} in `{column}` is {type(prompt).__name__}, expected a string (or, for every prompt, a "
                "list of {'role', 'content'} messages)."
            )
    return conversational


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _add_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend a system message; when the conversation already starts with one, prepend the text to its content."""
    if system_prompt is None:
        return list(messages)
    messages = [dict(m) for m in messages]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = f"{system_prompt}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def _render_generation_prompt(prompt: str | list[dict], tokenizer, system_prompt: str | None) -> str:
    """The text the policy continues: the chat template with a generation prompt, or the raw string."""
    if _has_chat_template(tokenizer):
        messages = prompt if is_conversational_prompt(prompt) else [{"role": "user", "content": prompt}]
        messages = _add_system_prompt(messages, system_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if is_conversational_prompt(prompt):
        raise ValueError(
            "The prompts are conversational (message lists) but the tokenizer has no chat_template. Set "
            "`tokenizer.chat_template`, or pass plain string prompts."
        )
    return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"


def render_prompt_ids(prompts: Sequence[Any], tokenizer, system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt exactly as [`generate_completions`] feeds it to the model.

    With a chat template, the prompt is rendered with `add_generation_prompt=True` (a string prompt as one user
    message, `system_prompt` as a system message before it); without one, the string itself (with the tokenizer's
    special tokens, e.g. BOS). Chat-templated text already holds its special tokens, so none are added to it.

    Args:
        prompts (`Sequence[str | list[dict]]`):
            Strings or conversational prompts.
        tokenizer (`PreTrainedTokenizerBase`):
            The policy's tokenizer.
        system_prompt (`str`, *optional*):
            A system message for generation only.

    Returns:
        `list[list[int]]`: one id list per prompt (the context a sampled reply continues).
    """
    texts = [_render_generation_prompt(p, tokenizer, system_prompt) for p in prompts]
    add_special_tokens = not _has_chat_template(tokenizer)
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) == 0:
            raise ValueError(f"Prompt {i} is empty after tokenization; remove it or give it some text.")
    return [list(row) for row in ids]


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def default_device():
    """The device models are loaded on when no `device_map` is given.

    Returns:
        `torch.device`: CUDA when a GPU is visible, the CPU otherwise.
    """
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype():
    """The dtype causal LMs are loaded in by default.

    Returns:
        `torch.dtype`: bfloat16 on a GPU that supports it, float32 otherwise (CPU).
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: str, model_kwargs: dict | None):
    """Load a policy for generation.

    Args:
        path (`str`):
            A local folder or Hub id.
        model_kwargs (`dict` or `None`):
            Extra `from_pretrained` arguments; they override the default dtype ([`default_dtype`]). Without a
            `device_map` among them the model is moved to [`default_device`].

    Returns:
        `PreTrainedModel`: the causal LM, in eval mode.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": default_dtype()}
    kwargs.update(model_kwargs or {})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(default_device())
    return model.eval()


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS plus every EOS of the model's generation config."""
    ids = _as_id_list(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        ids += [i for i in _as_id_list(generation_config.eos_token_id) if i not in ids]
    if not ids:
        raise ValueError("Neither the tokenizer nor the model's generation_config defines an EOS token id.")
    return ids


def _generation_config_of(model_path: str):
    """An object with the `generation_config` of the model at `model_path` (None when it has none), for
    [`_eos_ids`] when the model itself is not loaded (vLLM)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_path))
    except OSError:
        return SimpleNamespace(generation_config=None)


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def resolve_backend(backend: str, model) -> str:
    """The generation backend to use.

    Args:
        backend (`str`):
            `"auto"`, `"transformers"` or `"vllm"`; `"auto"` picks vLLM when it is installed, a GPU is visible, and
            `model` is a path (vLLM cannot take an already-loaded model).
        model (`str` or `PreTrainedModel`):
            The policy: a path / Hub id or a loaded model.

    Returns:
        `str`: `"transformers"` or `"vllm"`.

    Raises:
        `ValueError`: `backend` is not one of `"auto"`, `"transformers"`, `"vllm"`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {BACKENDS}.")
    if backend != "auto":
        return backend
    import torch

    if isinstance(model, str) and importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        return "vllm"
    return "transformers"


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


def _generation_kwargs(temperature: float, top_p: float, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """Arguments for `model.generate`: sample with `temperature` and `top_p` only.

    Every other filter is switched off explicitly (top-k, which transformers would default to 50, repetition
    penalty, typical-p, n-gram blocking), whatever the model's `generation_config` says, so that the samples come
    from the model's own distribution, as with vLLM's `SamplingParams` defaults. `temperature == 0` is greedy.
    """
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        num_beams=1,
        num_return_sequences=1,
    )
    if temperature == 0:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0, typical_p=1.0)
    return kwargs


def cut_at_eos(token_ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The generated ids up to and including the first EOS.

    What follows an EOS in a batch is padding, not part of the sample.

    Args:
        token_ids (`Sequence[int]`):
            The generated ids of one sequence.
        eos_ids (`Sequence[int]`):
            The ids that end a reply.

    Returns:
        `list[int]`: the ids up to and including the first EOS; all of them when there is none (the reply was cut
        at `max_new_tokens`).
    """
    stop = {int(i) for i in eos_ids}
    token_ids = [int(t) for t in token_ids]
    for k, tok in enumerate(token_ids):
        if tok in stop:
            return token_ids[: k + 1]
    return token_ids


def reply_text(tokenizer, token_ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """The text of a sampled reply.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The policy's tokenizer.
        token_ids (`Sequence[int]`):
            The sampled ids.
        eos_ids (`Sequence[int]`):
            The ids that end a reply.

    Returns:
        `str`: the ids up to (not including) the first EOS, decoded without special tokens.
    """
    ids = cut_at_eos(token_ids, eos_ids)
    if ids and ids[-1] in {int(i) for i in eos_ids}:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def reply_length(token_ids: Sequence[int], eos_ids: Sequence[int]) -> int:
    """The length of a sampled reply in tokens.

    Args:
        token_ids (`Sequence[int]`):
            The sampled ids.
        eos_ids (`Sequence[int]`):
            The ids that end a reply.

    Returns:
        `int`: the number of ids up to (not including) the first EOS.
    """
    ids = cut_at_eos(token_ids, eos_ids)
    return len(ids) - (1 if ids and ids[-1] in {int(i) for i in eos_ids} else 0)


def generate_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int = 1,
    batch_size: int = 16,
    seed: int | None = None,
    progress: bool = False,
    **generate_kwargs,
) -> list[list[list[int]]]:
    """Continue already tokenised prompts with `model.generate`: the core of every transformers generation here.

    Args:
        model (`PreTrainedModel`):
            A causal LM (run in eval mode, under `torch.inference_mode`; its training mode is restored).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer (EOS and pad ids).
        prompt_ids (`Sequence[Sequence[int]]`):
            One id list per prompt, e.g. from [`render_prompt_ids`].
        n (`int`, *optional*, defaults to `1`):
            Continuations per prompt.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per `generate` call (`batch_size * n` sequences, left padded).
        seed (`int`, *optional*):
            Run under a forked RNG seeded with it (the global RNG state is left untouched); `None`: use the global RNG.
        progress (`bool`, *optional*, defaults to `False`):
            A tqdm bar over the calls.
        **generate_kwargs:
            Passed to `model.generate`. `eos_token_id` defaults to every EOS of the tokenizer and the model's
            generation config, `pad_token_id` to the tokenizer's pad (or the first EOS).

    Returns:
        `list[list[list[int]]]`: per prompt, `n` lists of the sampled ids, each cut after its first EOS (which is
        kept; see [`cut_at_eos`]). These ids are the sample: score and measure them, not a re-tokenised text.
    """
    import contextlib

    import torch
    from tqdm.auto import tqdm

    eos_ids = _as_id_list(generate_kwargs.get("eos_token_id")) or _eos_ids(model, tokenizer)
    generate_kwargs["eos_token_id"] = eos_ids
    generate_kwargs.setdefault("pad_token_id", _pad_id(tokenizer, eos_ids))
    pad_id = generate_kwargs["pad_token_id"]
    device = next(model.parameters()).device
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    rng = torch.random.fork_rng(devices=cuda_devices) if seed is not None else contextlib.nullcontext()
    results: list[list[list[int]]] = []
    was_training = model.training
    model.eval()
    try:
        with rng, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            starts = range(0, len(prompt_ids), batch_size)
            for start in tqdm(starts, desc="Generating", unit="batch", disable=not progress):
                batch = prompt_ids[start : start + batch_size]
                expanded = [ids for ids in batch for _ in range(n)]
                input_ids, attention_mask = pad_ids(expanded, pad_id, side="left")
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **generate_kwargs
                )
                new_tokens = [cut_at_eos(row, eos_ids) for row in output[:, input_ids.shape[1] :].tolist()]
                results.extend(new_tokens[i * n : (i + 1) * n] for i in range(len(batch)))
    finally:
        model.train(was_training)
    return results


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "backend='vllm' needs vLLM, which is not installed: `pip install vllm` (Linux with a CUDA GPU). "
            "Use backend='transformers' (or 'auto') to generate with transformers instead."
        ) from err
    return vllm


def make_vllm_engine(
    model_path: str,
    *,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    external_launcher: bool = False,
    vllm_kwargs: dict | None = None,
):
    """A `vllm.LLM` engine for [`generate_completions`] (`vllm_engine=`), built once and reused across calls.

    Args:
        model_path (`str`):
            A local folder or Hub id.
        seed (`int`, *optional*, defaults to `0`):
            The engine seed (each request also gets its own seed, see [`generate_completions`]).
        tensor_parallel_size (`int`, *optional*, defaults to `1`):
            GPUs per engine (tensor parallel inside the engine).
        external_launcher (`bool`, *optional*, defaults to `False`):
            The process is one of several started by `accelerate launch` / `torchrun`: vLLM then joins the existing
            process group (`distributed_executor_backend="external_launcher"`, as TRL's colocate mode does); every
            `tensor_parallel_size` consecutive ranks form one engine and must send it the same prompts in the same
            order; the world size must be a multiple of `tensor_parallel_size` (a `ValueError` otherwise).
        vllm_kwargs (`dict`, *optional*):
            Extra `vllm.LLM` arguments (e.g. `gpu_memory_utilization`, `max_model_len`).

    Returns:
        `vllm.LLM`: the engine.
    """
    import os

    vllm = _import_vllm()
    kwargs = {"model": model_path, "seed": seed}
    if tensor_parallel_size != 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if external_launcher:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes % tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size ({tensor_parallel_size}) must divide the number of processes "
                f"({state.num_processes})."
            )
        # vLLM's external launcher reads the torch.distributed rendezvous from the environment.
        os.environ.setdefault("RANK", str(state.process_index))
        os.environ.setdefault("LOCAL_RANK", str(state.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(state.num_processes))
        kwargs["distributed_executor_backend"] = "external_launcher"
    kwargs.update(vllm_kwargs or {})
    return vllm.LLM(**kwargs)


def _generate_vllm(
    model_path: str,
    prompt_ids: list[list[int]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    progress: bool,
    vllm_kwargs: dict | None,
    llm=None,
    first_index: int = 0,
) -> list[list[list[int]]]:
    """n completions per prompt with vLLM (their sampled token ids). The prompts go in as token ids (rendered and tokenized exactly as for the
    transformers backend, so no BOS is added twice). Prompt `i` is sampled with seed `seed + first_index + i`, so a
    prompt gets the same seed whichever call (chunk, process) it is part of. `llm`: an engine to reuse (built from
    `model_path`, `seed` and `vllm_kwargs` when None)."""
    vllm = _import_vllm()
    if llm is None:
        llm = vllm.LLM(model=model_path, seed=seed, **(vllm_kwargs or {}))
    # Greedy decoding gives one answer; some vLLM versions refuse n > 1 with temperature 0, so ask once and repeat.
    n_request = 1 if temperature == 0 else n
    params = [
        vllm.SamplingParams(
            n=n_request, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + first_index + i
        )
        for i in range(len(prompt_ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=progress)
    ids = [[list(completion.token_ids) for completion in request.outputs] for request in outputs]
    return [group * n if n_request == 1 and n > 1 else group for group in ids]


def free_model(obj) -> None:
    """Release a model or a vLLM engine (best effort) and return its GPU memory to the allocator's pool.

    vLLM keeps its engine (and, in V1, an engine-core process) alive until it is shut down; `free_model` shuts it
    down when the engine offers a way to, then (with a GPU) collects garbage and empties the CUDA cache. The caller
    must drop its own references too.

    Args:
        obj (`PreTrainedModel`, `vllm.LLM` or `None`):
            The model or engine to release; `None` only collects garbage and empties the CUDA cache (with a GPU).
    """
    import gc

    import torch

    engine = getattr(obj, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    for target in (core, engine):
        shutdown = getattr(target, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as err:  # noqa: BLE001 - best effort: a failed shutdown must not lose finished work
                warnings.warn(f"Could not shut the vLLM engine down cleanly: {err}")
            break
    del obj, engine, core
    if torch.cuda.is_available():  # a full collection costs ~0.5 s in a big process: only where memory is scarce
        gc.collect()
        torch.cuda.empty_cache()


def _prompts_dataset(prompts, prompt_column: str):
    """A Dataset with the prompts in `prompt_column`; stale `completions`/`rewards` columns are dropped."""
    from datasets import Dataset

    if isinstance(prompts, Dataset):
        if prompt_column not in prompts.column_names:
            raise ValueError(
                f"The prompts dataset has no `{prompt_column}` column; columns found: {prompts.column_names}."
            )
        stale = [c for c in ("completions", "rewards") if c in prompts.column_names]
        if stale:
            warnings.warn(f"The prompts dataset already has column(s) {stale}; they are dropped and regenerated.")
            prompts = prompts.remove_columns(stale)
        return prompts
    if isinstance(prompts, str) or is_conversational_prompt(prompts):
        raise ValueError("`prompts` must be a list of prompts (or a Dataset); wrap a single prompt in a list.")
    prompts = list(prompts)
    _check_prompts(prompts, prompt_column)  # before Arrow, which cannot store mixed shapes
    return Dataset.from_dict({prompt_column: prompts})


def generate_completions(
    model,
    prompts,
    n: int = 4,
    *,
    tokenizer=None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    backend: str = "auto",
    system_prompt: str | None = None,
    progress: bool = True,
    prompt_column: str = "prompt",
    model_kwargs: dict | None = None,
    vllm_kwargs: dict | None = None,
    vllm_engine=None,
    prompt_offset: int = 0,
    return_token_ids: bool = False,
):
    """Sample `n` completions for every prompt; return a `datasets.Dataset` with `prompt` and `completions`.

    For chat models (the tokenizer has a `chat_template`) the prompt is rendered with the chat template and
    `add_generation_prompt=True`; a string prompt is sent as one user message. Without a chat template the string
    is used as is.

    Args:
        model (`str`, `Path` or `PreTrainedModel`):
            A local folder / Hub id, or an already-loaded causal LM (then `tokenizer` is required).
        prompts (`list[str]`, `list[list[dict]]` or `datasets.Dataset`):
            A list of plain strings, or a list of conversational prompts (`[{"role": "user", "content": ...}]`), or
            a `Dataset` with a `prompt_column` column (its other columns are kept in the result).
        n (`int`, *optional*, defaults to `4`):
            Completions per prompt.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer; loaded from `model` when it is a path and this is `None`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` means greedy decoding (the n completions are then identical).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling. No other filter is applied (no top-k, no repetition penalty), whatever the model's
            generation_config says.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Generation stops at EOS or after this many new tokens.
        seed (`int`, *optional*, defaults to `0`):
            The same call with the same seed gives the same completions (the global RNG state is not changed).
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per `generate` call (each call runs `batch_size * n` sequences). Unused by vLLM.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (vLLM when `vllm` is importable, a CUDA GPU is visible and `model` is a path; transformers
            otherwise), `"transformers"` or `"vllm"`.
        system_prompt (`str`, *optional*):
            A system message put before each prompt for generation only (prepended to an existing system message;
            `text + "\\n\\n"` before a plain prompt when the tokenizer has no chat template). The stored `prompt`
            stays the user's prompt; the system prompt is stored in a `system_prompt` column.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar over batches.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            The column of a prompts `Dataset` to generate from.
        model_kwargs (`dict`, *optional*):
            Extra `from_pretrained` arguments when `model` is a path (default dtype: bfloat16 on a GPU that supports
            it, float32 on CPU).
        vllm_kwargs (`dict`, *optional*):
            Extra arguments for `vllm.LLM` (e.g. `gpu_memory_utilization`, `tensor_parallel_size`); unused with
            `vllm_engine`.
        vllm_engine (`vllm.LLM`, *optional*):
            An engine from [`make_vllm_engine`] to reuse across calls (vLLM backend; `model` must still be the path
            it was built from, for the tokenizer).
        prompt_offset (`int`, *optional*, defaults to `0`):
            The index of the first prompt in a larger prompt list, for calls on one chunk of it: with vLLM prompt
            `i` of this call is sampled with seed `seed + prompt_offset + i` (transformers is seeded once per call
            with `seed`; `prompt_offset` does not change it).
        return_token_ids (`bool`, *optional*, defaults to `False`):
            Also return what was sampled as token ids: `prompt_ids` (the rendered prompt the model continued, see
            [`render_prompt_ids`]), `completion_ids` (per completion, the sampled ids up to and including the first
            EOS) and `eos_ids` (the ids that end a reply). Log-probabilities and lengths of the samples must be
            computed on these ids: decoding and re-encoding the text is not always the identity.

    Returns:
        `datasets.Dataset`: the prompts as given (string prompts stay strings, message lists stay message lists) and
        `completions`: a list of `n` plain strings (the assistant text, special tokens and the EOS removed).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")

    if isinstance(model, Path):
        model = str(model)
    dataset = _prompts_dataset(prompts, prompt_column)
    prompt_list = list(dataset[prompt_column])
    _check_prompts(prompt_list, prompt_column)
    chosen_backend = resolve_backend(backend, model)
    model_is_path = isinstance(model, str)
    if not model_is_path and tokenizer is None:
        raise ValueError("`model` is an already-loaded model: pass its `tokenizer` as well.")
    if tokenizer is None:
        tokenizer = _load_tokenizer(model)
    prompt_ids = render_prompt_ids(prompt_list, tokenizer, system_prompt)
    sampling = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

    if chosen_backend == "vllm":
        if not model_is_path:
            raise ValueError("backend='vllm' needs `model` as a path or Hub id; vLLM cannot use a loaded model.")
        token_ids = _generate_vllm(
            model,
            prompt_ids,
            progress=progress,
            vllm_kwargs=vllm_kwargs,
            llm=vllm_engine,
            first_index=prompt_offset,
            **sampling,
        )
        eos_ids = _eos_ids(_generation_config_of(model), tokenizer)
    else:
        lm = load_causal_lm(model, model_kwargs) if model_is_path else model
        eos_ids = _eos_ids(lm, tokenizer)
        kwargs = _generation_kwargs(temperature, top_p, max_new_tokens, eos_ids, _pad_id(tokenizer, eos_ids))
        token_ids = generate_ids(
            lm, tokenizer, prompt_ids, n=n, batch_size=batch_size, seed=seed, progress=progress, **kwargs
        )
    token_ids = [[cut_at_eos(ids, eos_ids) for ids in group] for group in token_ids]
    completions = [[reply_text(tokenizer, ids, eos_ids) for ids in group] for group in token_ids]
    dataset = dataset.add_column("completions", completions)
    if return_token_ids:
        for column, values in (("prompt_ids", prompt_ids), ("completion_ids", token_ids), ("eos_ids", None)):
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, values if values is not None else [eos_ids] * len(dataset))
    if system_prompt is not None:
        if "system_prompt" in dataset.column_names:
            dataset = dataset.remove_columns("system_prompt")
        dataset = dataset.add_column("system_prompt", [system_prompt] * len(dataset))
    return dataset


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


# Attribute names of the scoring head of sequence classifiers (Llama / Qwen / Mistral / Gemma: `score`; BERT /
# DeBERTa / RoBERTa: `classifier`; TRL value-head models: `v_head`).
_HEAD_NAMES = ("score", "classifier", "v_head")


def _reward_model_dtype():
    """The checkpoint's own dtype on a GPU (`"auto"`), float32 on CPU."""
    import torch

    return "auto" if torch.cuda.is_available() else torch.float32


def _float32_head(model) -> str | None:
    """Run the scoring head of a half-precision reward model in float32: its weights are cast to float32 and its
    input (the pooled / last hidden state) is cast on the way in. Returns the head's attribute name (None: no known
    head, or the model is float32 already)."""
    import torch

    if getattr(model, "dtype", torch.float32) == torch.float32:
        return None
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module) and any(True for _ in head.parameters()):
            break
    else:
        return None
    head.float()

    def to_float32(module, args, kwargs):
        cast = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        return tuple(cast), kwargs

    head.register_forward_pre_hook(to_float32, with_kwargs=True)
    return name


class RewardModelScorer:
    """Score `(prompt, completion)` pairs with an `AutoModelForSequenceClassification` reward model (1 label).

    The text scored (see `render`) is the reward tokenizer's chat template applied to the conversation
    `prompt messages + [{"role": "assistant", "content": completion}]` when the tokenizer has a chat template (a
    string prompt becomes one user message); otherwise it is the plain concatenation `prompt + completion` (with
    the tokenizer's own special tokens, e.g. BOS). Batches are right padded; the score is `logits[:, 0]`.
    [`score_batched`] sorts the texts by token length first, so that a batch holds texts of similar length (little
    padding); [`score_completions`] uses it.

    Args:
        model (`PreTrainedModel`):
            The reward model, with one output (`num_labels=1`; anything else raises `ValueError`). When its config
            has no `pad_token_id`, it is set (with a warning) to the tokenizer's pad id, or its first EOS id.
        tokenizer (`PreTrainedTokenizerBase`):
            The reward model's tokenizer (its chat template decides the text scored).
        max_length (`int`, *optional*):
            Truncate the rendered texts to this many tokens (`None`: no truncation).
    """

    def __init__(self, model, tokenizer, max_length: int | None = None):
        num_labels = getattr(model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"The reward model must have one output (num_labels=1), this one has {num_labels}. Is it a reward "
                "model (AutoModelForSequenceClassification trained with one label), not a policy or a classifier?"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.templated = _has_chat_template(tokenizer)
        self.pad_id = self._ensure_pad_id()

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, model_kwargs: dict | None = None, **kwargs):
        """Load the reward model (and its tokenizer, unless given) from a folder or Hub id.

        The model keeps its own dtype (the checkpoint's `dtype` on a GPU; float32 on CPU; `model_kwargs={"dtype":
        ...}` overrides it); when that is half precision, the scoring head runs in float32 (its weights and its
        input are cast), so that close rewards are not rounded together.

        Args:
            path (`str`):
                A local folder or Hub id of an `AutoModelForSequenceClassification`.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                The tokenizer; loaded from `path` when `None`.
            model_kwargs (`dict`, *optional*):
                Extra `from_pretrained` arguments. Without a `device_map` among them the model is moved to
                [`default_device`].
            **kwargs:
                Passed to the constructor (`max_length`).

        Returns:
            [`RewardModelScorer`]: the scorer, its model in eval mode.
        """
        from transformers import AutoModelForSequenceClassification

        load_kwargs = {"dtype": _reward_model_dtype()}
        load_kwargs.update(model_kwargs or {})
        model = AutoModelForSequenceClassification.from_pretrained(path, **load_kwargs)
        if "device_map" not in load_kwargs:
            model.to(default_device())
        _float32_head(model)
        return cls(model.eval(), tokenizer if tokenizer is not None else _load_tokenizer(path), **kwargs)

    def _ensure_pad_id(self) -> int:
        """The id batches are padded with. It must equal the model's `pad_token_id`: sequence classifiers pool
        the rightmost token that is not `pad_token_id`. Sets the config's pad id when it has none."""
        config = self.model.config.get_text_config()
        if config.pad_token_id is not None:
            return int(config.pad_token_id)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = _as_id_list(self.tokenizer.eos_token_id)
            if not eos:
                raise ValueError("The reward model and its tokenizer define no pad or EOS token id; set one.")
            pad = eos[0]
        warnings.warn(f"The reward model config has no pad_token_id; using {pad} (from the tokenizer).")
        config.pad_token_id = int(pad)
        return int(pad)

    def render(self, prompt, completion) -> str:
        """The exact text the reward model scores for one `(prompt, completion)`.

        Args:
            prompt (`str` or `list[dict]`):
                A string or a message list.
            completion (`str` or `list[dict]`):
                A string or an assistant message list (its contents are concatenated).

        Returns:
            `str`: the chat-templated conversation, or `prompt + completion` without a chat template.

        Raises:
            `ValueError`: the prompt is neither a string nor a message list, or it is a message list and the
            tokenizer has no chat template.
        """
        completion = completion_text(completion)
        if not isinstance(prompt, str) and not is_conversational_prompt(prompt):
            raise ValueError(f"A prompt must be a string or a message list, got {type(prompt).__name__}: {prompt!r}.")
        if self.templated:
            messages = prompt if is_conversational_prompt(prompt) else [{"role": "user", "content": prompt}]
            messages = list(messages) + [{"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if is_conversational_prompt(prompt):
            raise ValueError(
                "The prompts are conversational but the reward model's tokenizer has no chat_template, so there is "
                "no defined text to score. Give the tokenizer a chat_template, or use string prompts."
            )
        return prompt + completion

    def encode(self, prompts: Sequence, completions: Sequence[str]) -> list[list[int]]:
        """Token ids of the rendered texts (see [`render`]; no special tokens added to chat-templated text).

        Args:
            prompts (`Sequence[str | list[dict]]`):
                The prompts.
            completions (`Sequence[str]`):
                One completion per prompt.

        Returns:
            `list[list[int]]`: one id list per pair, truncated to `max_length` tokens when it is set.
        """
        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        kwargs = {"add_special_tokens": not self.templated}
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return [list(ids) for ids in self.tokenizer(texts, **kwargs)["input_ids"]]

    def _forward(self, ids: list[list[int]]) -> list[float]:
        import torch

        input_ids, attention_mask = pad_ids(ids, self.pad_id, side="right")
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        return logits[:, 0].float().cpu().tolist()

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        """Scores of `(prompt, completion)` pairs in one forward; the arguments are those of [`encode`].

        Returns:
            `list[float]`: one score per pair, in their order.
        """
        if len(prompts) == 0:
            return []
        return self._forward(self.encode(prompts, completions))

    def score_batched(
        self, prompts: Sequence, completions: Sequence[str], batch_size: int = 16, progress: bool = False
    ) -> list[float]:
        """Scores of all `(prompt, completion)` pairs, computed in batches of texts of similar token length.

        Args:
            prompts (`Sequence[str | list[dict]]`):
                The prompts.
            completions (`Sequence[str]`):
                One completion per prompt.
            batch_size (`int`, *optional*, defaults to `16`):
                Texts per forward, longest first (so that running out of memory shows at once).
            progress (`bool`, *optional*, defaults to `False`):
                Show a tqdm progress bar over the batches.

        Returns:
            `list[float]`: one score per pair, in their order.
        """
        from tqdm.auto import tqdm

        if len(prompts) == 0:
            return []
        ids = self.encode(prompts, completions)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [math.nan] * len(ids)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="Scoring", unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            for i, value in zip(batch, self._forward([ids[i] for i in batch])):
                scores[i] = value
        return scores


def _import_callable(spec: str) -> Callable | None:
    """Import `"module:function"`; None when the module cannot be found (`spec` may then be a path)."""
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            return None
        raise
    obj = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"Scorer {spec!r}: module {module_name!r} has no attribute {attr_path!r}.")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"Scorer {spec!r} is not callable (it is a {type(obj).__name__}).")
    return obj


def load_scorer(spec, *, tokenizer=None, model_kwargs: dict | None = None, max_length: int | None = None) -> Callable:
    """Turn a scorer spec into a callable `f(prompts, completions) -> list[float]`.

    `prompts` are passed as stored in the dataset (strings, or message lists for conversational prompts);
    `completions` are always plain strings. The callable must return one real number per completion (see
    [`score_completions`]).

    Args:
        spec (`Callable`, `str`, `Path` or `torch.nn.Module`):
            One of:

            - a Python callable `f(prompts, completions)`, returned as is;
            - a string `"package.module:function"` naming such a callable (used when the module imports);
            - a reward model: a path / Hub id of an `AutoModelForSequenceClassification` with `num_labels=1` (any
              other string), or an already-loaded one (then `tokenizer` is required). It becomes a
              [`RewardModelScorer`].
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The reward model's tokenizer: required for a loaded reward model; for a path, loaded from it when `None`.
        model_kwargs (`dict`, *optional*):
            Extra `from_pretrained` arguments for a reward-model path.
        max_length (`int`, *optional*):
            Truncate reward-model inputs to this many tokens (`None`: no truncation).

    Returns:
        `Callable`: `f(prompts, completions) -> list[float]` (a [`RewardModelScorer`] for a reward model).

    Raises:
        `ValueError`: a `module:function` whose module cannot be imported, has no such attribute or names something
        that is not callable, or a loaded reward model without `tokenizer`.
        `TypeError`: `spec` is none of the above.
    """
    import torch

    if isinstance(spec, Path):
        spec = str(spec)
    if isinstance(spec, str):
        if _CALLABLE_SPEC.match(spec) and not Path(spec).exists():
            fn = _import_callable(spec)
            if fn is not None:
                return fn
            raise ValueError(
                f"Scorer {spec!r} looks like 'module:function' but module {spec.partition(':')[0]!r} cannot be "
                "imported (is it installed / on PYTHONPATH?). A reward model is given as a folder path or Hub id."
            )
        return RewardModelScorer.from_pretrained(
            spec, tokenizer=tokenizer, model_kwargs=model_kwargs, max_length=max_length
        )
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("The scorer is a loaded reward model: pass its `tokenizer` as well.")
        return RewardModelScorer(spec, tokenizer, max_length=max_length)
    if callable(spec):
        return spec
    raise TypeError(
        f"Cannot use a {type(spec).__name__} as a scorer: give a reward model (path or loaded), a callable "
        "f(prompts, completions) -> list[float], or a 'module:function' string."
    )


def _validate_scores(values, expected: int, first_index: int) -> list[float]:
    """Floats from a scorer's output: one real number per completion.

    Python ints and floats, numpy numbers and 0-d numpy arrays / torch tensors (or a whole array / tensor) are
    accepted; `None` and non-finite values become NaN (a missing score, counted by the caller). Anything else is
    refused with the flat index of the completion and the type: a string (`"0.5"` is a formatting error upstream), a
    boolean (`True` is not a score of 1.0), a list, a complex number.
    """
    if (
        getattr(values, "ndim", None) == 0
        or isinstance(values, (str, bytes, dict))
        or not isinstance(values, Iterable)
    ):
        raise ValueError(
            f"The scorer returned {type(values).__name__} ({values!r:.80}); it must return a list of floats, one per "
            "completion."
        )
    values = values.tolist() if hasattr(values, "tolist") else list(values)  # a torch / numpy vector, or any iterable
    if len(values) != expected:
        raise ValueError(
            f"The scorer returned {len(values)} scores for {expected} completions (flat completions "
            f"{first_index}..{first_index + expected - 1}); it must return one float per completion."
        )
    scores = []
    for k, value in enumerate(values):
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy scalar, 0-d array or tensor
            value = value.item()  # a Python bool / int / float / complex
        score = to_float(value, f"Scorer output for completion {first_index + k}", "score")
        scores.append(score if math.isfinite(score) else math.nan)
    return scores


def _as_dataset(dataset):
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, dict):
        return Dataset.from_dict(dataset)
    if isinstance(dataset, (list, tuple)):
        return Dataset.from_list(list(dataset))
    raise TypeError(
        f"Expected a datasets.Dataset (or a dict of columns / list of rows), got {type(dataset).__name__}."
    )


def group_completions(dataset) -> tuple[list, list[list]]:
    """The `prompt` and `completions` columns, validated."""
    missing = [c for c in ("prompt", "completions") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"score_completions needs the columns `prompt` and `completions` (a list of strings per prompt); "
            f"missing {missing}, columns found: {dataset.column_names}."
        )
    prompts = list(dataset["prompt"])
    groups = list(dataset["completions"])
    for i, group in enumerate(groups):
        if not isinstance(group, (list, tuple)):
            raise ValueError(
                f"Row {i}: `completions` must be a list of strings, got {type(group).__name__}. For one completion "
                "per row, rename the column to `completions` holding one-element lists."
            )
    return prompts, groups


def score_completions(
    dataset,
    scorer,
    *,
    batch_size: int = 16,
    tokenizer=None,
    progress: bool = True,
    reward_column: str = "rewards",
    model_kwargs: dict | None = None,
    max_length: int | None = None,
):
    """Score every completion of a groups dataset; return it with `reward_column` (list[float] per row).

    `rewards[i][j]` is the score of `completions[i][j]`. Each score must be a real number (an `int` / `float`, a numpy
    number or a 0-d tensor): a string or a boolean raises `ValueError` naming the completion's flat index and the
    type. Non-finite scores (NaN, inf) and None are stored as NaN with a warning giving their count; the trainers skip
    and count such rows.

    Args:
        dataset (`datasets.Dataset`):
            A Dataset with `prompt` and `completions` (list of strings) columns, e.g. from [`generate_completions`]
            (a dict of columns or a list of rows is converted).
        scorer (`str`, `Path`, `Callable` or `PreTrainedModel`):
            A reward model (path / Hub id / loaded), a callable `f(prompts, completions) -> list[float]`, or a
            `"module:function"` string (see [`load_scorer`]).
        batch_size (`int`, *optional*, defaults to `16`):
            Completions per scorer call (per reward-model forward). A reward model's batches group completions of
            similar token length (the rewards come back in the dataset's order).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The reward model's tokenizer (required for a loaded reward model).
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar.
        reward_column (`str`, *optional*, defaults to `"rewards"`):
            Name of the added column (replaced if it exists).
        model_kwargs (`dict`, *optional*):
            Extra `from_pretrained` arguments for a reward-model path.
        max_length (`int`, *optional*):
            Truncate reward-model inputs to this many tokens (`None`: no truncation).

    Returns:
        `datasets.Dataset`: the dataset with `reward_column` added, one `list[float]` per row aligned with
        `completions`.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    dataset = _as_dataset(dataset)
    prompts, groups = group_completions(dataset)
    fn = load_scorer(scorer, tokenizer=tokenizer, model_kwargs=model_kwargs, max_length=max_length)
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    flat_completions = [completion_text(c) for group in groups for c in group]

    scores: list[float] = []
    if isinstance(fn, RewardModelScorer):  # batched by token length
        values = fn.score_batched(flat_prompts, flat_completions, batch_size=batch_size, progress=progress)
        scores = _validate_scores(values, len(flat_completions), 0)
    else:  # a function: called on consecutive slices of `batch_size` completions
        starts = range(0, len(flat_completions), batch_size)
        for start in tqdm(starts, desc="Scoring", unit="batch", disable=not progress):
            chunk_prompts = flat_prompts[start : start + batch_size]
            chunk = fn(chunk_prompts, flat_completions[start : start + batch_size])
            scores.extend(_validate_scores(chunk, len(chunk_prompts), start))

    bad = sum(math.isnan(s) for s in scores)
    if bad:
        warnings.warn(
            f"{bad} of {len(scores)} rewards are not finite (NaN/inf/None); stored as NaN. The trainers skip and "
            "count them; the pair converter excludes them."
        )
    rewards, offset = [], 0
    for group in groups:
        rewards.append(scores[offset : offset + len(group)])
        offset += len(group)
    if reward_column in dataset.column_names:
        dataset = dataset.remove_columns(reward_column)
    return dataset.add_column(reward_column, rewards)


# ----------------------------------------------------------------------------------------------------------------------
# Several judges
# ----------------------------------------------------------------------------------------------------------------------

_JUDGE_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*$")


def _default_judge_name(spec, index: int) -> str:
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if _CALLABLE_SPEC.match(text) and not Path(text).exists():
            return text.rpartition(":")[2].rpartition(".")[2]  # the function's name
        return Path(text.rstrip("/")).name or text  # the reward model's folder / Hub repository name
    name = getattr(spec, "__name__", None)
    if name is None and getattr(spec, "config", None) is not None:
        name = Path(str(getattr(spec.config, "_name_or_path", "") or "").rstrip("/")).name or None
    return name if name and _JUDGE_NAME.match(name) and name != "<lambda>" else f"judge{index}"


def name_judges(judges) -> list[tuple[str, Any]]:
    """Name several scorers (judges).

    Without a name, a judge is named after its function (`module:function`, a callable) or the last part of its
    reward-model path / Hub id. Names become the columns `rewards_<name>`: letters, digits, `_`, `.`, `-`, unique, and
    not `mean`.

    Args:
        judges (`dict[str, Any]`, `list` or one spec):
            A dict `{name: spec}`, or a list whose items are specs (see [`load_scorer`]) or strings `"NAME=SPEC"`;
            a single spec (a string, a path or a callable) is one judge.

    Returns:
        `list[tuple[str, Any]]`: `[(name, spec), ...]` in the order given.

    Raises:
        `ValueError`: no judge is given, a name is not allowed, or two judges have the same name.
    """
    if isinstance(judges, dict):
        items = [(str(name), spec) for name, spec in judges.items()]
    else:
        if isinstance(judges, (str, Path)) or callable(judges):
            judges = [judges]
        items = []
        for i, spec in enumerate(judges):
            if isinstance(spec, str):
                name, sep, rest = spec.partition("=")
                if sep and rest and _JUDGE_NAME.match(name):
                    items.append((name, rest))
                    continue
            items.append((_default_judge_name(spec, i), spec))
    if not items:
        raise ValueError("No scorer given.")
    seen = set()
    for name, _ in items:
        if not _JUDGE_NAME.match(name) or name == "mean":
            raise ValueError(
                f"Judge name {name!r} cannot be used: a name holds letters, digits, '_', '.', '-' and is not 'mean'."
            )
        if name in seen:
            raise ValueError(
                f"Two scorers are named {name!r}; name them apart with NAME=SPEC (e.g. {name}_a=... {name}_b=...)."
            )
        seen.add(name)
    return items


def combine_rewards(columns: dict[str, Sequence[Sequence[float]]], combine: str = "mean") -> list[list[float]]:
    """The combined `rewards` of several judges' reward columns.

    The judges' scales are not normalised: use judges on comparable scales for the mean.

    Args:
        columns (`dict[str, Sequence[Sequence[float]]]`):
            `{name: rewards per row}`, rows aligned.
        combine (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: the mean of the judges' scores of each completion (NaN when any judge gave NaN); a judge's
            name: that judge's scores.

    Returns:
        `list[list[float]]`: the combined rewards, one list per row.
    """
    if combine != "mean" and combine not in columns:
        raise ValueError(f"combine must be 'mean' or one of the judges {sorted(columns)}, got {combine!r}.")
    if combine != "mean":
        return [list(row) for row in columns[combine]]
    tables = list(columns.values())
    combined = []
    for i, row in enumerate(tables[0]):
        out = []
        for j in range(len(row)):
            values = [float(table[i][j]) for table in tables]
            out.append(math.nan if any(math.isnan(v) for v in values) else math.fsum(values) / len(values))
        combined.append(out)
    return combined


def score_with_judges(
    dataset,
    judges,
    *,
    combine: str = "mean",
    batch_size: int = 16,
    progress: bool = True,
    model_kwargs: dict | None = None,
    max_length: int | None = None,
):
    """Score a groups dataset with several judges, one model in memory at a time.

    Args:
        dataset (`datasets.Dataset`):
            A groups Dataset (`prompt`, `completions`).
        judges (`dict[str, Any]`, `list` or one spec):
            See [`name_judges`] (a dict `{name: spec}` or a list of specs / `"NAME=SPEC"` strings). Each reward
            model is loaded with its own tokenizer (and so its own chat template), used, and released before the
            next one is loaded.
        combine (`str`, *optional*, defaults to `"mean"`):
            How the `rewards` column is made: `"mean"` or one judge's name (see [`combine_rewards`]).
        batch_size (`int`, *optional*, defaults to `16`):
            As for [`score_completions`].
        progress (`bool`, *optional*, defaults to `True`):
            As for [`score_completions`].
        model_kwargs (`dict`, *optional*):
            As for [`score_completions`].
        max_length (`int`, *optional*):
            As for [`score_completions`].

    Returns:
        `datasets.Dataset`: with one judge, the [`score_completions`] result (`rewards` only). With several, a
        `rewards_<name>` column per judge and the combined `rewards`.
    """
    items = name_judges(judges)
    kwargs = dict(batch_size=batch_size, progress=progress, model_kwargs=model_kwargs, max_length=max_length)
    if len(items) == 1:
        return score_completions(dataset, items[0][1], **kwargs)
    if combine != "mean" and combine not in dict(items):
        raise ValueError(f"combine must be 'mean' or one of the judges {[n for n, _ in items]}, got {combine!r}.")
    dataset = _as_dataset(dataset)
    for name, spec in items:
        dataset = score_completions(dataset, spec, reward_column=f"rewards_{name}", **kwargs)
        free_model(None)  # the scorer was local to score_completions: collect it before the next one loads
    combined = combine_rewards({name: dataset[f"rewards_{name}"] for name, _ in items}, combine)
    if "rewards" in dataset.column_names:
        dataset = dataset.remove_columns("rewards")
    return dataset.add_column("rewards", combined)


# ----------------------------------------------------------------------------------------------------------------------
# Goal-conditioned generation (reward-augmented DPO inference)
# ----------------------------------------------------------------------------------------------------------------------


def generate_with_goal(
    model,
    tokenizer,
    prompts,
    score: float = 10,
    system_role: str = "auto",
    template: str | None = None,
    attributes=None,
    **generate_kwargs,
) -> list[str]:
    """
    Generate completions for `prompts` conditioned on the goal `score` (10 = the paper's inference goal).

    The goal prompt comes from `build_goal_prompt` (the training code path) and is tokenised exactly as DPO training
    tokenises prompts (TRL's `_tokenize`: the chat template with `add_generation_prompt=True` for message lists, the
    tokenizer with its special tokens, e.g. BOS, for strings), then continued by [`generate_ids`].

    Args:
        model (`PreTrainedModel`):
            A causal LM (`generate` is called on it, in eval mode, without gradients).
        tokenizer (`PreTrainedTokenizerBase`):
            The training tokenizer (pad token, or EOS when it has none, for the left padding).
        prompts (`str`, `list[dict]` or a list of them):
            One prompt or a list (strings or message lists).
        score (`float`, *optional*, defaults to `10`):
            The goal value on the 1-10 scale.
        system_role (`str`, *optional*, defaults to `"auto"`):
            The training `system_role`.
        template (`str`, *optional*):
            The training `goal_template`.
        attributes (`dict` or `list`, *optional*):
            The training `attribute_columns` (see `build_goal_prompt`).
        **generate_kwargs:
            Passed to `model.generate` (default `max_new_tokens=64`).

    Returns:
        `list[str]`: the decoded new text of each prompt (special tokens skipped).
    """
    from .data.relabel import build_goal_prompt
    from .model_utils import dpo_prompt_ids

    single = isinstance(prompts, str) or is_conversational_prompt(prompts)
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise ValueError("generate_with_goal: `prompts` is empty.")
    prompt_ids = [
        dpo_prompt_ids(tokenizer, build_goal_prompt(prompt, score, tokenizer, system_role, template, attributes))
        for prompt in batch
    ]
    generate_kwargs.setdefault("max_new_tokens", 64)
    eos_ids = _eos_ids(model, tokenizer)
    token_ids = generate_ids(model, tokenizer, prompt_ids, n=1, batch_size=len(prompt_ids), **generate_kwargs)
    return [reply_text(tokenizer, group[0], eos_ids) for group in token_ids]
