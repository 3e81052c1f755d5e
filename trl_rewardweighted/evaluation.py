"""Evaluate aligned models against their reference on a prompt set: reward, win rate, KL, length, diversity and
misalignment, with bootstrap intervals (`trl-rw eval`). Definitions in `docs/evaluation.md`.

For every model (and the reference itself) the same prompts are answered with `num_samples` sampled replies (the same
sampling seed for every model, so sample `j` of a prompt is paired across models) and one greedy reply; every reply is
scored by the same reward. Per model:

- mean reward of the samples (and of the greedy replies) with a 95 % bootstrap interval over prompts;
- the paired difference to the reference (per-prompt mean reward, paired bootstrap over prompts) and the win / tie /
  loss rate of each sample against the reference's sample with the same index (and against a reference response per
  prompt when the prompt set has one);
- KL to the reference on the model's own samples: per sequence `log pi(y|x) - log pi_ref(y|x)` (summed over the
  completion tokens, fused LM head, no logits), its mean over prompts with an interval; and the reward gain per nat;
- response length in tokens, distinct-1/2 and self-BLEU over all samples;
- the misalignment rate: pairs of samples of one prompt whose log-ratio order disagrees with their reward order.

Reward-augmented models answer goal-conditioned prompts (the top goal by default, built by `build_goal_prompt`, the
training code path). The reference is then also evaluated under the same goal prompt (`<reference> + goal`), and the
reward-augmented model is compared with, and its KL measured against, that entry: the goal text alone moves a model,
so the table separates what training did from what the prompt did.

The prompts are processed in chunks ([`~shards.run_chunks`]): resumable, and split over the processes of an
`accelerate launch`; chunk `k` is sampled with `chunk_seed(seed, k)` for every model, so the results do not depend on
the number of processes. The main process merges the chunks and computes the summaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.relabel import build_goal_prompt
from .data.utils import is_messages, write_json
from .metrics import (
    bootstrap_ci,
    distinct_n,
    kl_summary,
    misalignment_rate,
    paired_bootstrap_diff,
    pooled_paired_diff,
    response_length_summary,
    reward_per_nat,
    self_bleu,
    win_tie_loss,
)
from .model_utils import completion_logps_from_ids, tokenize_prompt_completions

__all__ = [
    "EvalConfig",
    "ModelSpec",
    "evaluate_models",
    "eval_manifest",
    "markdown_table",
    "pairwise_table",
    "pool_results",
    "pooled_markdown_table",
    "write_pooled_report",
    "write_report",
]

REFERENCE = "reference"
GOAL_SUFFIX = " + goal"


@dataclass
class EvalConfig:
    """Settings of [`evaluate_models`].

    Args:
        num_samples (`int`, *optional*, defaults to `4`):
            Sampled replies per prompt, `>= 1` (2 or more for the misalignment rate).
        greedy (`bool`, *optional*, defaults to `True`):
            Also score one greedy reply per prompt.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Sampling setting: new tokens per reply at most.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling setting: the temperature.
        top_p (`float`, *optional*, defaults to `1.0`):
            Sampling setting: nucleus sampling. No other filter is applied, so `log pi` of a sample is the
            probability it was drawn with when `temperature=1` and `top_p=1`.
        seed (`int`, *optional*, defaults to `0`):
            Sampling seed, the same for every model (paired samples).
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per generation call and sequences per log-prob forward, `>= 1`.
        score_batch_size (`int`, *optional*, defaults to `16`):
            Replies per reward call, `>= 1`.
        goal_score (`float`, *optional*, defaults to `10.0`):
            The goal of reward-augmented models (10 = the paper's inference goal).
        system_role (`str`, *optional*, defaults to `"auto"`):
            As at training (the goal prompt of reward-augmented models).
        goal_template (`str`, *optional*):
            As at training (the goal prompt of reward-augmented models).
        tie_tolerance (`float`, *optional*, defaults to `0.0`):
            Rewards within this distance are a tie.
        n_resamples (`int`, *optional*, defaults to `2000`):
            Bootstrap resamples.
        progress (`bool`, *optional*, defaults to `True`):
            Progress bars for generation and scoring.
        chunk_size (`int`, *optional*, defaults to `64`):
            Prompts per chunk, `>= 1`: the unit of work written to disk, split across processes and resumed. Chunk
            `k` is sampled with `chunk_seed(seed, k)` (transformers), so the samples depend on it, not on the number
            of processes; one chunk samples what one `generate_completions(..., seed=seed)` call samples.
        backend (`str`, *optional*, defaults to `"auto"`):
            Generation backend: `"auto"` (vLLM when it is installed, a GPU is visible and every model is a path),
            `"transformers"` or `"vllm"`. Rewards and log-probs are always computed with transformers.
        tensor_parallel_size (`int`, *optional*, defaults to `1`):
            vLLM: GPUs per engine; under `accelerate launch` every this many consecutive processes share one engine.
        vllm_kwargs (`dict`, *optional*):
            vLLM: extra `vllm.LLM` arguments.
    """

    num_samples: int = 4
    greedy: bool = True
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    score_batch_size: int = 16
    goal_score: float = 10.0
    system_role: str = "auto"
    goal_template: str | None = None
    tie_tolerance: float = 0.0
    n_resamples: int = 2000
    progress: bool = True
    chunk_size: int = 64
    backend: str = "auto"
    tensor_parallel_size: int = 1
    vllm_kwargs: dict | None = None

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        if self.batch_size < 1 or self.score_batch_size < 1:
            raise ValueError("batch_size and score_batch_size must be >= 1.")
        if self.chunk_size < 1 or self.tensor_parallel_size < 1:
            raise ValueError(
                f"chunk_size and tensor_parallel_size must be >= 1, got {self.chunk_size} and "
                f"{self.tensor_parallel_size}."
            )


@dataclass
class ModelSpec:
    """One model to evaluate: a display `name`, a path / Hub id or a loaded causal LM, and whether it was trained
    with reward augmentation (then it answers goal-conditioned prompts)."""

    name: str
    model: Any
    goal_conditioned: bool = False


def _load(model, dtype=None):
    from transformers import AutoModelForCausalLM

    from .sampling import default_device, default_dtype

    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype or default_dtype())
        model.to(default_device())
    model.eval()
    return model


def completion_logps(model, tokenizer, prompts: Sequence, groups: Sequence[Sequence[str]], batch_size: int = 8):
    """Summed log-probs `log pi(y|x)` of every completion *text* of every prompt under `model` (a list of lists),
    tokenised as DPO tokenises prompt/completion pairs (the context a trainer sees), through the fused LM head.

    For replies sampled from a model, score the sampled ids instead
    (`model_utils.completion_logps_from_ids`, as [`evaluate_models`] does): re-encoding a decoded text is not always
    the identity."""
    prompt_ids, completion_ids = [], []
    for row, (prompt, completions) in enumerate(zip(prompts, groups)):
        completions = [[{"role": "assistant", "content": c}] if is_messages(prompt) else c for c in completions]
        ids, group = tokenize_prompt_completions(tokenizer, prompt, completions, row=row)
        prompt_ids.append(ids)
        completion_ids.append(group)
    return completion_logps_from_ids(model, prompt_ids, completion_ids, batch_size, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _per_prompt_mean(values: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray([float(np.mean(v)) for v in values], dtype=np.float64)


def _interval(values, n_resamples, seed=0) -> dict:
    est, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": est, "low": low, "high": high}


@dataclass
class _Entry:
    """One row of the report: `name` answers `answered` with `model`; its KL is measured against the reference on
    `ref_prompts`; `baseline` is the row it is compared with; `uses_reference`: `model` is the reference itself."""

    name: str
    model: Any
    answered: list
    ref_prompts: list
    baseline: str | None
    uses_reference: bool = False


# The columns of an entry's chunks, in the order `eval.json` stores them.
RUN_COLUMNS = (
    "completions",
    "rewards",
    "prompt_ids",
    "completion_ids",
    "token_lengths",
    "greedy",
    "greedy_rewards",
    "logps",
    "ref_logps",
)
# One reward per prompt for the dataset's reference response (stored with the reference's chunks).
DATASET_REWARDS = "dataset_rewards"


class _Shared:
    """What every stage of one process uses: the reference model and the scorer, loaded on first use and kept until
    [`evaluate_models`] returns (one evaluated model in memory at a time besides them)."""

    def __init__(self, reference, scorer, scorer_tokenizer):
        self._specs = (reference, scorer, scorer_tokenizer)
        self._reference = self._scorer = None

    def reference(self):
        if self._reference is None:
            self._reference = _load(self._specs[0])
        return self._reference

    def scorer(self):
        from .sampling import load_scorer

        if self._scorer is None:
            self._scorer = load_scorer(self._specs[1], tokenizer=self._specs[2])
        return self._scorer

    def release(self) -> None:
        from .sampling import free_model

        self._reference = self._scorer = None
        free_model(None)


def _describe(spec) -> str:
    """How a model or scorer is named in the manifest: its path / Hub id / `module:function`, a function's qualified
    name, or the class of a loaded object (not fingerprinted)."""
    if isinstance(spec, (str, Path)):
        return str(spec)
    if callable(spec) and hasattr(spec, "__qualname__"):
        return f"{spec.__module__}:{spec.__qualname__}"
    return f"<loaded {type(spec).__name__}>"


def _fingerprint(value) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def eval_manifest(
    models: Sequence[ModelSpec],
    reference,
    prompts: Sequence,
    scorer,
    config: EvalConfig,
    backend: str,
    reference_responses: Sequence[str] | None = None,
) -> dict:
    """The manifest of a chunked evaluation (see [`~shards.run_chunks`]): the settings that decide the chunks, under
    the names of the `trl-rw eval` options (`score_batch_size` and `system_role`, which have none, under their
    field names), and fingerprints of the prompts and of the models. A resumed run must match it; the bootstrap
    settings (`n_resamples`, `tie_tolerance`) are applied to the merged samples and are not part of it.

    Args:
        models (`Sequence[ModelSpec]`):
            The models evaluated.
        reference:
            The reference (a path / Hub id or a loaded model).
        prompts (`Sequence`):
            The prompts.
        scorer:
            The reward (a path / Hub id / `module:function`, or a callable).
        config ([`EvalConfig`]):
            The settings.
        backend (`str`):
            The resolved generation backend.
        reference_responses (`Sequence[str]`, *optional*):
            The dataset's reference responses.

    Returns:
        `dict`: `{"command": "eval", "settings": {...}, "inputs": {...}}`. Local model folders are fingerprinted by
        their files' names, sizes and times, loaded models and callables only by their class or name.
    """
    from .shards import model_fingerprint

    settings = {
        "--model": [f"{m.name}={_describe(m.model)}" for m in models if not m.goal_conditioned],
        "--goal-model": [f"{m.name}={_describe(m.model)}" for m in models if m.goal_conditioned],
        "--reference": _describe(reference),
        "--reward": _describe(scorer),
        "--num-samples": config.num_samples,
        "--no-greedy": not config.greedy,
        "--max-new-tokens": config.max_new_tokens,
        "--temperature": config.temperature,
        "--top-p": config.top_p,
        "--seed": config.seed,
        "--batch-size": config.batch_size,
        "score_batch_size": config.score_batch_size,
        "--goal-score": config.goal_score,
        "--goal-template": config.goal_template,
        "system_role": config.system_role,
        "--backend": backend,
        "--tensor-parallel-size": config.tensor_parallel_size,
        "--vllm-kwargs": config.vllm_kwargs or {},
        "--chunk-size": config.chunk_size,
    }
    described = [("--reference", reference), ("--reward", scorer)]
    described += [(f"--{'goal-' if m.goal_conditioned else ''}model {m.name}", m.model) for m in models]
    inputs = {
        option: {"path": _describe(spec), "fingerprint": model_fingerprint(spec) if isinstance(spec, (str, Path))
                 else _describe(spec)}
        for option, spec in described
    }  # fmt: skip
    what = f"({len(prompts)} prompts{', with reference responses' if reference_responses is not None else ''})"
    inputs["prompts"] = {"path": what, "fingerprint": _fingerprint([list(prompts), reference_responses])}
    return {"command": "eval", "settings": settings, "inputs": inputs}


def _resolve_backend(config: EvalConfig, reference, models: Sequence[ModelSpec]) -> str:
    from .sampling import resolve_backend

    paths = all(isinstance(m, (str, Path)) for m in [reference, *(spec.model for spec in models)])
    backend = resolve_backend(config.backend, str(reference) if paths else None)
    if backend == "vllm" and not paths:
        raise ValueError("The vLLM backend needs every model and the reference as a path or Hub id: vLLM cannot use "
                         "a loaded model.")  # fmt: skip
    if backend != "vllm" and (config.tensor_parallel_size != 1 or config.vllm_kwargs):
        raise ValueError("tensor_parallel_size and vllm_kwargs are for the vLLM backend.")
    return backend


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"


def _sample_chunk(
    generator, entry: _Entry, k: int, start: int, end: int, tokenizer, config, backend, progress
) -> dict:
    """Sampled (and greedy) replies of rows `start..end - 1` with their token ids. transformers: chunk `k` is seeded
    with `chunk_seed(seed, k)`; vLLM: prompt `i` with `seed + i`. The same for every model: sample `j` of a prompt
    is paired across models."""
    from .sampling import generate_completions, reply_length
    from .shards import chunk_seed

    common = dict(
        tokenizer=tokenizer,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        progress=progress,
        return_token_ids=True,
    )
    if backend == "vllm":
        model = str(entry.model)
        common.update(backend="vllm", vllm_engine=generator, seed=config.seed, prompt_offset=start)
    else:
        model = generator
        common.update(backend="transformers", seed=chunk_seed(config.seed, k))
    chunk = entry.answered[start:end]
    samples = generate_completions(
        model, chunk, n=config.num_samples, temperature=config.temperature, top_p=config.top_p, **common
    )
    eos_ids = samples["eos_ids"][0]
    out = {
        "completions": list(samples["completions"]),
        # What was sampled: the context the model continued and the sampled ids (EOS included when it stopped).
        "prompt_ids": list(samples["prompt_ids"]),
        "completion_ids": list(samples["completion_ids"]),
    }
    out["token_lengths"] = [[reply_length(ids, eos_ids) for ids in group] for group in out["completion_ids"]]
    if config.greedy:
        greedy = generate_completions(model, chunk, n=1, temperature=0.0, **common)
        out["greedy"] = [g[0] for g in greedy["completions"]]
    return out


def _measure_chunk(context, entry: _Entry, start, end, sampled, tokenizer, config, references, progress) -> dict:
    """Rewards and log-probs of the replies of rows `start..end - 1`. Every reply is scored on its sampled ids, in
    the context it was sampled in (the rendered prompt); the reference sees the same ids after its own context (the
    same rendering of `ref_prompts`)."""
    from .sampling import render_prompt_ids, score_completions

    score = context["scorer"]
    chunk = entry.answered[start:end]

    def rewards(groups):
        return score_completions(
            {"prompt": chunk, "completions": groups}, score, batch_size=config.score_batch_size, progress=progress
        )["rewards"]

    out = {"rewards": list(rewards(sampled["completions"]))}
    if config.greedy:
        out["greedy_rewards"] = [r[0] for r in rewards([[g] for g in sampled["greedy"]])]
    pad = _pad_id(tokenizer)
    out["logps"] = completion_logps_from_ids(
        context["model"], sampled["prompt_ids"], sampled["completion_ids"], config.batch_size, pad
    )
    if entry.uses_reference and entry.ref_prompts is entry.answered:
        out["ref_logps"] = out["logps"]
    else:
        same = entry.ref_prompts is entry.answered
        ref_context = sampled["prompt_ids"] if same else render_prompt_ids(entry.ref_prompts[start:end], tokenizer)
        out["ref_logps"] = completion_logps_from_ids(
            context["reference"], ref_context, sampled["completion_ids"], config.batch_size, pad
        )
    if references is not None:
        out[DATASET_REWARDS] = [float(s) for s in score(chunk, list(references[start:end]))]
    return out


def _stages(entries, shared: _Shared, tokenizer, config, backend, references, work_dir, progress) -> list:
    """transformers: one stage per entry (generation, rewards and log-probs with the model loaded once). vLLM: one
    generation stage per entry (an engine per model, built and shut down in turn), then one measuring stage per
    entry (transformers models: the reference and the scorer stay loaded across them)."""
    from datasets import Dataset

    from .sampling import free_model, make_vllm_engine
    from .shards import Stage, chunk_path, launched_processes, read_chunk, use_local_device

    def measuring_setup(entry):
        def setup():
            use_local_device()
            reference = shared.reference()
            model = reference if entry.uses_reference else _load(entry.model)
            return {"model": model, "reference": reference, "scorer": shared.scorer()}

        return setup

    def measuring_teardown(context):
        free_model(context.pop("model"))
        context.clear()

    def measure(entry, i, k, start, end, context, sampled):
        refs = references if i == 0 else None  # the dataset's responses are scored once, with the reference
        return _measure_chunk(context, entry, start, end, sampled, tokenizer, config, refs, progress)

    several = launched_processes() > 1
    stages = []
    for i, entry in enumerate(entries):
        name = f"{i:02d}-{_slug(entry.name)}"
        if backend != "vllm":

            def run(context, k, start, end, entry=entry, i=i):
                sampled = _sample_chunk(context["model"], entry, k, start, end, tokenizer, config, backend, progress)
                return Dataset.from_dict({**sampled, **measure(entry, i, k, start, end, context, sampled)})

            stages.append(Stage(f"eval-{name}", measuring_setup(entry), run, measuring_teardown))
            continue

        def engine(entry=entry):
            use_local_device()
            return make_vllm_engine(
                str(entry.model),
                seed=config.seed,
                tensor_parallel_size=config.tensor_parallel_size,
                external_launcher=several,
                vllm_kwargs=config.vllm_kwargs,
            )

        def sample(context, k, start, end, entry=entry):
            return Dataset.from_dict(
                _sample_chunk(context, entry, k, start, end, tokenizer, config, backend, progress)
            )

        def measure_stored(context, k, start, end, entry=entry, i=i, name=name):
            sampled = read_chunk(chunk_path(work_dir, f"sample-{name}", k)).to_dict()
            return Dataset.from_dict(measure(entry, i, k, start, end, context, sampled))

        stages.insert(
            i, Stage(f"sample-{name}", engine, sample, free_model, collective_setup=several, whole_group=True)
        )
        stages.append(Stage(f"measure-{name}", measuring_setup(entry), measure_stored, measuring_teardown))
    return stages


def evaluate_models(
    models: Sequence[ModelSpec],
    reference,
    prompts: Sequence,
    scorer: Callable | str,
    config: EvalConfig | None = None,
    tokenizer=None,
    reference_responses: Sequence[str] | None = None,
    scorer_tokenizer=None,
    *,
    work_dir=None,
    restart: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict | None:
    """Generate, score and measure every model of `models` and the `reference` on `prompts`; see the module docstring.

    The prompts are processed in chunks of `config.chunk_size` with [`~shards.run_chunks`], split over the processes
    of an `accelerate launch` (every process calls this function; the main process merges the chunks in prompt order
    and computes the summaries on the merged samples). Chunk `k` is sampled with `chunk_seed(config.seed, k)` for every
    model, so the result does not depend on the number of processes.

    Args:
        models (`Sequence[ModelSpec]`):
            The models to evaluate (their names must be distinct).
        reference:
            Path / Hub id / loaded causal LM of the reference (usually the starting model).
        prompts (`Sequence`):
            Strings or conversational prompts (message lists).
        scorer (`Callable` or `str`):
            A reward model path, a `"module:function"` string or a callable `f(prompts, completions)`.
        config ([`EvalConfig`], *optional*):
            The settings (defaults: `EvalConfig()`).
        tokenizer (*optional*):
            The tokenizer shared by the models (loaded from the reference path when None).
        reference_responses (`Sequence[str]`, *optional*):
            One reference response per prompt (e.g. the dataset's); each model's samples also get a win rate against
            them.
        scorer_tokenizer (*optional*):
            The tokenizer of a loaded reward model.
        work_dir (`str` or `os.PathLike`, *optional*):
            The folder of finished chunks and their manifest (`trl-rw eval`: `<output-dir>/.parts`), visible to every
            process: a rerun resumes the finished chunks, a changed setting or input is refused naming it (see
            [`eval_manifest`]). It is kept: remove it with [`~shards.remove_work_dir`] once the report is written.
            `None`: a temporary folder, removed on return (one process only).
        restart (`bool`, *optional*, defaults to `False`):
            Discard an unfinished run in `work_dir` and start over.
        log (`Callable[[str], None]` or `None`, *optional*, defaults to `print`):
            Where the main process says it resumes a run; `None`: silent.

    Returns:
        `dict` or `None`: on the main process, `config` (with the resolved `backend`), `prompts`, and `models`:
        `{name: {"summary": {...}, "samples": {...}}}`, the reference first (and `<reference> + goal` when a model is
        goal-conditioned); `None` on the other processes.
    """
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from .shards import launched_processes, process_layout, run_chunks

    config = config or EvalConfig()
    names = [m.name for m in models]
    if len(set(names)) != len(names) or REFERENCE in names:
        raise ValueError(f"Model names must be distinct and not {REFERENCE!r}, got {names}.")
    if not prompts:
        raise ValueError("The prompt set is empty.")
    if reference_responses is not None and len(reference_responses) != len(prompts):
        raise ValueError(
            f"reference_responses has {len(reference_responses)} entries for {len(prompts)} prompts: give one per prompt."
        )
    backend = _resolve_backend(config, reference, models)
    several = launched_processes() > 1
    if work_dir is None and several:
        raise ValueError(f"{launched_processes()} processes need a work folder that all of them see: pass `work_dir`.")
    if tokenizer is None:
        if not isinstance(reference, (str, Path)):
            raise ValueError("The reference is a loaded model: pass its `tokenizer`.")
        tokenizer = AutoTokenizer.from_pretrained(str(reference))
    prompts = list(prompts)
    goal_prompts = None
    if any(m.goal_conditioned for m in models):
        goal_prompts = [
            build_goal_prompt(p, config.goal_score, tokenizer, config.system_role, config.goal_template)
            for p in prompts
        ]
    # The reference: KL 0 by construction. The reference under the goal prompt: compared with the plain reference
    # (its KL is the shift the goal text alone causes). A goal-conditioned model: compared with the reference under
    # the same goal prompt (what training did).
    entries = [_Entry(REFERENCE, reference, prompts, prompts, None, uses_reference=True)]
    if goal_prompts is not None:
        entries.append(_Entry(REFERENCE + GOAL_SUFFIX, reference, goal_prompts, prompts, REFERENCE, True))
    for spec in models:
        if spec.goal_conditioned:
            entries.append(_Entry(spec.name, spec.model, goal_prompts, goal_prompts, REFERENCE + GOAL_SUFFIX))
        else:
            entries.append(_Entry(spec.name, spec.model, prompts, prompts, REFERENCE))

    temporary = work_dir is None
    folder = Path(tempfile.mkdtemp(prefix="trl-rw-eval-")) if temporary else Path(work_dir)
    group_size = config.tensor_parallel_size if backend == "vllm" and several else 1
    progress = config.progress and process_layout(group_size).is_main
    shared = _Shared(reference, scorer, scorer_tokenizer)
    stages = _stages(entries, shared, tokenizer, config, backend, reference_responses, folder, progress)
    manifest = eval_manifest(models, reference, prompts, scorer, config, backend, reference_responses)
    try:
        chunks = run_chunks(
            folder,
            manifest,
            len(prompts),
            config.chunk_size,
            stages,
            restart=restart or temporary,
            group_size=group_size,
            progress=config.progress,
            log=log,
        )
    finally:
        shared.release()
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    if chunks is None:  # not the main process
        return None

    runs: dict[str, dict] = {}
    reference_scores = None
    for i, entry in enumerate(entries):
        columns: dict[str, list] = {}
        for stage in stages:
            if stage.name.split("-", 1)[1] == f"{i:02d}-{_slug(entry.name)}":
                for chunk in chunks[stage.name]:
                    for column, values in chunk.to_dict().items():
                        columns.setdefault(column, []).extend(values)
        run = {column: columns[column] for column in RUN_COLUMNS if column in columns}
        run["baseline"] = entry.baseline
        runs[entry.name] = run
        if DATASET_REWARDS in columns:
            reference_scores = columns[DATASET_REWARDS]

    results = {}
    for name, run in runs.items():
        results[name] = {"summary": _summarise(run, runs, config, reference_scores), "samples": _jsonable(run)}
    return {"config": {**asdict(config), "backend": backend}, "prompts": prompts, "models": results}


def _summarise(run: dict, runs: dict, config: EvalConfig, reference_scores) -> dict:
    n = config.n_resamples
    rewards = run["rewards"]
    per_prompt = _per_prompt_mean(rewards)
    summary: dict[str, Any] = {"num_prompts": len(rewards), "num_samples": config.num_samples}
    summary["reward"] = _interval(per_prompt, n)
    if config.greedy:
        summary["greedy_reward"] = _interval(np.asarray(run["greedy_rewards"], dtype=np.float64), n)
    logratios = [np.asarray(a) - np.asarray(b) for a, b in zip(run["logps"], run["ref_logps"])]
    kl = kl_summary(_per_prompt_mean(run["logps"]), _per_prompt_mean(run["ref_logps"]), n_resamples=n)
    summary["kl"] = {k: kl[k] for k in ("mean", "low", "high")}
    # Median, min and max over the replies; the interval of the mean over prompts, like every other interval.
    summary["length"] = response_length_summary([x for group in run["token_lengths"] for x in group], n)
    length_interval = _interval(_per_prompt_mean(run["token_lengths"]), n)
    summary["length"].update(low=length_interval["low"], high=length_interval["high"])
    flat = [c for group in run["completions"] for c in group]
    summary["distinct_1"] = distinct_n(flat, 1)
    summary["distinct_2"] = distinct_n(flat, 2)
    summary["self_bleu"] = self_bleu(flat) if len(flat) >= 2 else None
    if config.num_samples >= 2:
        mis = misalignment_rate(np.stack(logratios), np.asarray(rewards, dtype=np.float64))
        summary["misalignment"] = {"rate": mis.rate, "pairs": mis.num_pairs}
    baseline = run.get("baseline")
    if baseline is not None:
        base = runs[baseline]
        diff = paired_bootstrap_diff(per_prompt, _per_prompt_mean(base["rewards"]), n_resamples=n)
        summary["vs"] = baseline
        summary["reward_diff"] = {
            "mean": diff.diff,
            "low": diff.low,
            "high": diff.high,
            "frac_le_zero": diff.frac_le_zero,
        }
        flat_a = [x for group in rewards for x in group]
        flat_b = [x for group in base["rewards"] for x in group]
        summary["win_tie_loss"] = win_tie_loss(flat_a, flat_b, config.tie_tolerance)
        summary["reward_per_nat"] = _quiet_reward_per_nat(diff.diff, summary["kl"]["mean"])
    if reference_scores is not None:
        flat_a = [x for group in rewards for x in group]
        flat_b = [reference_scores[i] for i, group in enumerate(rewards) for _ in group]
        summary["win_tie_loss_vs_dataset"] = win_tie_loss(flat_a, flat_b, config.tie_tolerance)
    return summary


def _quiet_reward_per_nat(gain: float, kl: float) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reward_per_nat(gain, kl)


def _jsonable(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "baseline"}


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _fmt_interval(d: dict | None, digits: int = 3) -> str:
    if not d:
        return "–"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _fmt_number(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """The summary of [`evaluate_models`] (or of `compare`) as a Markdown table, one row per model.

    A difference to the baseline whose interval contains 0 is marked "≈" (not distinguishable from the baseline at
    95 %); "+" / "−" only when the whole interval is above / below 0. The reward gain per nat of KL is shown only when
    the KL interval lies above 0 (a ratio over a KL indistinguishable from 0 means nothing).
    """
    header = (
        "| model | reward (95 % CI) | vs | Δ reward (paired, 95 % CI) | verdict | win / tie / loss | KL (nats) | "
        "Δ reward per nat | greedy reward | length | distinct-1 / -2 | self-BLEU | misaligned pairs |"
    )
    lines = [header, "|" + "---|" * 13]
    for name, entry in results["models"].items():
        s = entry["summary"]
        diff = s.get("reward_diff")
        verdict = "–"
        if diff:
            verdict = "+" if diff["low"] > 0 else ("−" if diff["high"] < 0 else "≈")
        wtl = s.get("win_tie_loss")
        wtl_text = f"{wtl['win_rate']:.2f} / {wtl['tie_rate']:.2f} / {wtl['loss_rate']:.2f}" if wtl else "–"
        rpn = s.get("reward_per_nat")
        shown = rpn is not None and not math.isnan(rpn) and s["kl"]["low"] > 0
        rpn_text = f"{rpn:+.3f}" if shown else "–"
        mis = s.get("misalignment")
        mis_text = f"{mis['rate']:.2f} ({mis['pairs']})" if mis else "–"
        lines.append(
            f"| {name} | {_fmt_interval(s['reward'])} | {s.get('vs', '–')} | {_fmt_interval(diff)} | {verdict} | "
            f"{wtl_text} | {_fmt_interval(s['kl'], 2)} | {rpn_text} | {_fmt_interval(s.get('greedy_reward'))} | "
            f"{s['length']['mean']:.1f} | {s['distinct_1']:.2f} / {s['distinct_2']:.2f} | {_fmt_number(s['self_bleu'])} | "
            f"{mis_text} |"
        )
    return "\n".join(lines) + "\n"


def _pyplot():
    """`matplotlib.pyplot` with the file-only backend, or `None` without matplotlib (the plots are skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plots(results: dict, out: Path) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    names = list(results["models"])
    written = []
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    data = [[x for g in results["models"][n]["samples"]["rewards"] for x in g] for n in names]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    ax.set_ylabel("reward of sampled replies")
    ax.set_title("Reward distribution per model")
    fig.tight_layout()
    fig.savefig(out / "reward_distribution.png", dpi=120)
    plt.close(fig)
    written.append("reward_distribution.png")

    points = {n: (results["models"][n]["summary"]["kl"], results["models"][n]["summary"]["reward"]) for n in names}
    _reward_vs_kl(plt, points, "mean reward (95 % CI)", "Reward vs KL", out / "reward_vs_kl.png")
    written.append("reward_vs_kl.png")
    return written


def _reward_vs_kl(plt, points: dict, ylabel: str, title: str, path: Path) -> None:
    """Mean reward against KL with both intervals, one point per model (`points`: name -> (kl, reward) dicts with
    `mean`, `low`, `high`, and optionally `per_seed`: then one small dot per seed)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, (kl, r)) in enumerate(points.items()):
        color = f"C{i % 10}"
        if "per_seed" in kl:
            ax.scatter(kl["per_seed"], r["per_seed"], s=12, alpha=0.5, color=color)
        ax.errorbar(
            kl["mean"],
            r["mean"],
            xerr=[[kl["mean"] - kl["low"]], [kl["high"] - kl["mean"]]],
            yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]],
            fmt="o",
            capsize=3,
            color=color,
            label=name,
        )
    ax.set_xlabel("KL to the reference (nats per reply)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, output_dir: str | Path) -> dict[str, str]:
    """Write `eval.json` (summaries and every sample), `eval.md` (the table) and the PNG plots (when matplotlib is
    installed) to `output_dir`; returns the written paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "eval.json"), "markdown": str(out / "eval.md")}
    write_json(out / "eval.json", results)
    (out / "eval.md").write_text(markdown_table(results))
    for name in _plots(results, out):
        paths[name.removesuffix(".png")] = str(out / name)
    return paths


def summary_line(results: dict) -> str:
    """One line per model: mean reward and KL (for logs)."""
    lines = []
    for name, entry in results["models"].items():
        s = entry["summary"]
        lines.append(f"{name}: reward {s['reward']['mean']:+.3f}, KL {s['kl']['mean']:.2f}")
    return "; ".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Several seeds
# ----------------------------------------------------------------------------------------------------------------------


def _prompt_means(groups) -> np.ndarray:
    """Per-prompt means of groups read from `eval.json`, where an undefined value was written as null."""
    return np.asarray([float(np.mean([np.nan if x is None else x for x in g])) for g in groups], dtype=np.float64)


def _seed_columns(results_by_seed: Sequence[dict], name: str) -> tuple[list, list]:
    """Per seed, `name`'s per-prompt mean reward and per-prompt KL to the reference (nats per reply)."""
    rewards, kls = [], []
    for results in results_by_seed:
        samples = results["models"][name]["samples"]
        rewards.append(_prompt_means(samples["rewards"]))
        kls.append(_prompt_means(samples["logps"]) - _prompt_means(samples["ref_logps"]))
    return rewards, kls


def _pooled(a_by_seed, b_by_seed=None, n_resamples: int = 2000) -> dict:
    b_by_seed = b_by_seed or [np.zeros_like(a) for a in a_by_seed]
    d = pooled_paired_diff(a_by_seed, b_by_seed, n_resamples=n_resamples)
    return {"mean": d.diff, "low": d.low, "high": d.high, "frac_le_zero": d.frac_le_zero, "per_seed": list(d.per_seed)}


def pool_results(results_by_seed: Sequence[dict], seeds: Sequence[int], n_resamples: int = 2000) -> dict:
    """Pool the evaluations of several seeds (the same models or methods, the same prompts, repeated with another
    seed) with [`~metrics.pooled_paired_diff`]: a bootstrap over seeds and prompts.

    Args:
        results_by_seed (`Sequence[dict]`):
            One result of [`evaluate_models`] (or its `eval.json`) per seed, with the same model names and prompts.
        seeds (`Sequence[int]`):
            The seeds, in the same order (reported).
        n_resamples (`int`, *optional*, defaults to `2000`):
            Bootstrap resamples.

    Returns:
        `dict`: `seeds`, `num_prompts` and `models`: per model, `reward` and `kl` (pooled mean, interval, `per_seed`)
        and, against its baseline `vs`, `reward_diff` (pooled paired difference, interval, `frac_le_zero`,
        `per_seed`).

    Raises:
        `ValueError`: when the seeds' evaluations hold other models or other prompts.
    """
    if len(results_by_seed) != len(seeds) or not seeds:
        raise ValueError(f"Got {len(results_by_seed)} evaluations for {len(seeds)} seeds: give one per seed.")
    first = results_by_seed[0]
    names = list(first["models"])
    for seed, results in zip(seeds, results_by_seed):
        if list(results["models"]) != names or results["prompts"] != first["prompts"]:
            raise ValueError(
                f"Seed {seed} evaluated models {list(results['models'])} on {len(results['prompts'])} prompts, seed "
                f"{seeds[0]} {names} on {len(first['prompts'])}: seeds are pooled only over the same models and "
                "prompts."
            )
    models = {}
    for name in names:
        rewards, kls = _seed_columns(results_by_seed, name)
        entry = {"reward": _pooled(rewards, n_resamples=n_resamples), "kl": _pooled(kls, n_resamples=n_resamples)}
        vs = first["models"][name]["summary"].get("vs")
        if vs is not None:
            entry["vs"] = vs
            entry["reward_diff"] = _pooled(rewards, _seed_columns(results_by_seed, vs)[0], n_resamples)
        models[name] = entry
    return {"seeds": list(seeds), "num_prompts": len(first["prompts"]), "models": models}


def _per_seed(values: Sequence[float]) -> str:
    return " / ".join(f"{v:+.3f}" for v in values)


def _verdict(d: dict) -> str:
    return "+" if d["low"] > 0 else ("−" if d["high"] < 0 else "≈")


def pooled_markdown_table(pooled: dict) -> str:
    """The pooled summary of [`pool_results`] as a Markdown table: the pooled estimates with their 95 % intervals
    over seeds and prompts, and each seed's point estimate beside them. Verdict `+` / `−` only when the pooled
    interval of the difference to the baseline excludes 0."""
    lines = [
        "| model | reward (pooled, 95 % CI) | reward per seed | vs | Δ reward (pooled, 95 % CI) | verdict | "
        "Δ reward per seed | KL (nats, pooled, 95 % CI) | KL per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in pooled["models"].items():
        diff = e.get("reward_diff")
        lines.append(
            f"| {name} | {_fmt_interval(e['reward'])} | {_per_seed(e['reward']['per_seed'])} | {e.get('vs', '–')} | "
            f"{_fmt_interval(diff)} | {_verdict(diff) if diff else '–'} | "
            f"{_per_seed(diff['per_seed']) if diff else '–'} | {_fmt_interval(e['kl'], 2)} | "
            f"{_per_seed(e['kl']['per_seed'])} |"
        )
    return "\n".join(lines) + "\n"


def pairwise_table(results_by_seed: Sequence[dict], names: Sequence[str], n_resamples: int = 2000) -> str:
    """Paired differences of mean reward between every two models (row minus column), over the same prompts and
    sampling seeds, with 95 % intervals (one seed: the paired bootstrap over prompts; several: pooled over seeds and
    prompts, [`~metrics.pooled_paired_diff`]). "≈" when the interval contains 0: not distinguishable."""
    rewards = {n: _seed_columns(results_by_seed, n)[0] for n in names}
    lines = ["| row − column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append("–")
                continue
            d = _pooled(rewards[a], rewards[b], n_resamples)
            cells.append(f"{_fmt_interval(d)} {_verdict(d)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pooled_plot(pooled: dict, out: Path) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    points = {name: (e["kl"], e["reward"]) for name, e in pooled["models"].items()}
    title = f"Reward vs KL over {len(pooled['seeds'])} seeds"
    _reward_vs_kl(plt, points, "mean reward (pooled 95 % CI; dots: seeds)", title, out / "reward_vs_kl_pooled.png")
    return ["reward_vs_kl_pooled.png"]


def write_pooled_report(pooled: dict, output_dir: str | Path) -> dict[str, str]:
    """Write `pooled.json`, `pooled.md` (the table of [`pooled_markdown_table`]) and `reward_vs_kl_pooled.png` (when
    matplotlib is installed) to `output_dir`; returns the written paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pooled_json": str(out / "pooled.json"), "pooled_markdown": str(out / "pooled.md")}
    write_json(out / "pooled.json", pooled)
    seeds = ", ".join(str(s) for s in pooled["seeds"])
    (out / "pooled.md").write_text(
        f"Pooled over seeds {seeds} x {pooled['num_prompts']} prompts (two-level bootstrap).\n\n"
        + pooled_markdown_table(pooled)
    )
    for name in _pooled_plot(pooled, out):
        paths[name.removesuffix(".png")] = str(out / name)
    return paths
