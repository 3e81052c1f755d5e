"""The dataset pipeline behind `trl-rw generate`, `score`, `sample` and `convert`, callable from code.

[`run_generate`], [`run_score`] and [`run_sample`] sample and score in chunks with [`~shards.run_chunks`] (their
keyword options are the fields of [`RunSettings`]): resumable (rerun the same call after a kill) and split across the
processes of an `accelerate launch`; the main process merges the chunks, writes the outputs atomically and gets the
datasets back (the other processes get `None`). The settings of a run are recorded in its work folder's manifest
under the names of the `trl-rw` options (`--model`, `--n`, ...), and errors name those options too.

```python
from trl_rewardweighted.pipeline import GenerationSettings, ScoringSettings, run_sample

generation = GenerationSettings(model="path/to/sft-model", n=4, max_new_tokens=64)
scoring = ScoringSettings(scorers=["trl_rewardweighted.rewards:vader_positivity"])
groups, written = run_sample("prompts.txt", {"groups": "g.jsonl", "pairs": "p.jsonl"}, generation, scoring)
```

[`convert_dataset`] turns a groups / rows dataset into another shape, checking what it re-saves as is.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GenerationSettings",
    "ScoringSettings",
    "RunSettings",
    "check_outputs",
    "check_parent_folders",
    "goal_prompts",
    "prepare_prompts",
    "generation_plan",
    "generation_manifest",
    "generation_stage",
    "checked_judges",
    "scoring_manifest",
    "scoring_stages",
    "add_judge_columns",
    "rows_with_judges",
    "reward_summary",
    "run_generate",
    "run_score",
    "run_sample",
    "sample_groups",
    "convert_dataset",
    "run_convert",
    "refuse_unused",
]


@dataclass
class GenerationSettings:
    """How completions are sampled (the `trl-rw generate` options).

    Args:
        model (`str`):
            The policy: a local folder or Hub id.
        n (`int`, *optional*, defaults to `4`):
            Completions per prompt.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` is greedy.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            The longest completion, in tokens.
        seed (`int`, *optional*, defaults to `0`):
            Same seed, same completions (transformers: chunk `k` is seeded with `chunk_seed(seed, k)`; vLLM: prompt
            `i` with `seed + i`).
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per generate call (transformers; vLLM batches by itself).
        backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (vLLM if usable), `"transformers"` or `"vllm"`.
        system_prompt (`str` or `None`, *optional*, defaults to `None`):
            A system message added for generation only.
        goal_score (`float` or `None`, *optional*, defaults to `None`):
            For reward-augmented DPO models: condition generation on this goal score.
        goal_template (`str` or `None`, *optional*, defaults to `None`):
            The goal text template used at training (needs `goal_score`; default: the paper's wording).
        tensor_parallel_size (`int`, *optional*, defaults to `1`):
            vLLM: GPUs per engine; under `accelerate launch` every this many consecutive processes share one engine.
        vllm_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Extra `vllm.LLM` arguments.
    """

    model: str
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 16
    backend: str = "auto"
    system_prompt: str | None = None
    goal_score: float | None = None
    goal_template: str | None = None
    tensor_parallel_size: int = 1
    vllm_kwargs: dict | None = None


@dataclass
class ScoringSettings:
    """How completions are scored (the `trl-rw score` options).

    Args:
        scorers (`list[str]`):
            The judges: a reward-model folder / Hub id or `module:function`, each optionally `NAME=SPEC`. Each judge
            gets a column `rewards_NAME` when there are several.
        combine (`str`, *optional*, defaults to `"mean"`):
            Several judges: `rewards` is their mean, or the scores of the judge named here.
        batch_size (`int`, *optional*, defaults to `16`):
            Completions per scorer call.
        max_length (`int` or `None`, *optional*, defaults to `None`):
            Truncate reward-model inputs to this many tokens.
    """

    scorers: list[str]
    combine: str = "mean"
    batch_size: int = 16
    max_length: int | None = None


@dataclass
class RunSettings:
    """How a run is split into chunks, resumed and written (the `trl-rw` options of every sampling command); the keyword
    options of [`run_generate`], [`run_score`] and [`run_sample`].

    Args:
        chunk_size (`int`, *optional*, defaults to `256`):
            Rows per chunk: the unit of work written to disk, split across processes and resumed. The samples depend
            on it (not on the number of processes).
        work_dir (`str` or `None`, *optional*, defaults to `None`):
            The folder of finished chunks and the manifest (default: the first output + `.parts`), visible to every
            process; removed once the outputs are written.
        restart (`bool`, *optional*, defaults to `False`):
            Discard an unfinished run in the work folder instead of resuming it.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace existing outputs.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar.
    """

    chunk_size: int = 256
    work_dir: str | None = None
    restart: bool = False
    overwrite: bool = False
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------------------------


def refuse_unused(options, why: str) -> None:
    """Refuse options that were given but have no effect in this mode (every option is used or refused, never
    silently ignored).

    Args:
        options (`Sequence[str]`):
            The options given that have no effect (e.g. `["--strategy", "--ties"]`); nothing happens when empty.
        why (`str`):
            When they have no effect, completing the sentence `"--ties has no effect <why>."`.

    Raises:
        `ValueError`: `"--strategy and --ties have no effect without --to pairs."`
    """
    options = list(options)
    if options:
        names = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " and " + options[-1]
        raise ValueError(f"{names} {'has' if len(options) == 1 else 'have'} no effect {why}.")


def check_parent_folders(path, option: str) -> None:
    """Refuse a path below a regular file (`notes.txt/out.jsonl`) before any work starts, naming `option` and the
    path as given (writing there would fail later, on a temporary or work-folder path the user never gave).

    Args:
        path (`str` or `os.PathLike`):
            An output file or folder.
        option (`str`):
            The option it was given with (e.g. `"--output"`).
    """
    for parent in Path(path).parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            raise NotADirectoryError(f"{option} {path}: {parent} is a file, not a folder; give another path.")


def check_outputs(paths: Mapping[str, str | None], overwrite: bool = False, work_dir=None) -> None:
    """Before any work: every output is new (or `overwrite` is set and it can be replaced), none lies below a file,
    and no path is given twice.

    Args:
        paths (`Mapping[str, str | None]`):
            `{option: path}`; `None` paths are skipped.
        overwrite (`bool`, *optional*, defaults to `False`):
            Existing outputs may be replaced (by one of their kind, see [`~data.convert.check_output_path`]).
        work_dir (`str` or `None`, *optional*, defaults to `None`):
            A work folder given with `--work-dir`: it must not lie below a file either.
    """
    from .data.convert import check_output_path

    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if not path:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {option} are the same path {path}; give each output its own path.")
        seen[key] = option
        check_parent_folders(path, option)
        check_output_path(path, overwrite, option="--overwrite")
    if work_dir:
        check_parent_folders(work_dir, "--work-dir")


# ----------------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------------


def goal_prompts(dataset, tokenizer, goal_score: float, goal_template: str | None = None):
    """Add `generation_prompt`: each `prompt` conditioned on `goal_score` (reward-augmented DPO models), built by
    [`~data.relabel.build_goal_prompt`] as at training.

    Args:
        dataset (`datasets.Dataset`):
            Prompts in a `prompt` column.
        tokenizer:
            The policy's tokenizer (decides whether the goal goes into a system message).
        goal_score (`float`):
            The goal on the 1-10 scale.
        goal_template (`str` or `None`, *optional*, defaults to `None`):
            The goal text template used at training (default: the paper's wording).

    Returns:
        `datasets.Dataset`: `dataset` with a `generation_prompt` column (replaced when present).
    """
    try:
        from .data.relabel import build_goal_prompt
    except ImportError as err:
        raise ImportError(f"--goal-score needs trl_rewardweighted.data.relabel: {err}") from err
    goal = [
        build_goal_prompt(p, score=goal_score, tokenizer=tokenizer, system_role="auto", template=goal_template)
        for p in dataset["prompt"]
    ]
    if "generation_prompt" in dataset.column_names:
        dataset = dataset.remove_columns("generation_prompt")
    return dataset.add_column("generation_prompt", goal)


def prepare_prompts(prompts, generation: GenerationSettings):
    """The prompts of a generation run and what to generate from.

    Args:
        prompts (`str` or `os.PathLike`):
            A prompt file, read by [`~data.convert.read_prompts`].
        generation ([`GenerationSettings`]):
            With `goal_score`, the prompts are conditioned on it.

    Returns:
        `tuple`: `(dataset, tokenizer or None, column to generate from)`; the tokenizer is loaded only for goal
        prompts.
    """
    from .data.convert import read_prompts

    if generation.goal_template is not None and generation.goal_score is None:
        raise ValueError("--goal-template needs --goal-score.")
    dataset = read_prompts(prompts)
    tokenizer, prompt_column = None, "prompt"
    if generation.goal_score is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(generation.model)
        dataset = goal_prompts(dataset, tokenizer, generation.goal_score, generation.goal_template)
        prompt_column = "generation_prompt"
    return dataset, tokenizer, prompt_column


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------


def _use_device():
    """Make this process's accelerator device (its local rank's GPU) the default one for model loading."""
    from .shards import use_local_device

    use_local_device()


def generation_manifest(prompts, generation: GenerationSettings, backend: str, chunk_size: int) -> tuple[dict, dict]:
    """The manifest entries of a generation run: `(settings, inputs)` keyed by option name (see
    [`~shards.run_chunks`]); a resumed run must match them.

    Args:
        prompts (`str` or `os.PathLike`):
            The prompt file (fingerprinted).
        generation ([`GenerationSettings`]):
            The sampling settings.
        backend (`str`):
            The resolved backend (`"transformers"` or `"vllm"`).
        chunk_size (`int`):
            Rows per chunk.
    """
    from .shards import content_fingerprint, model_fingerprint

    settings = {
        "--model": generation.model,
        "--n": generation.n,
        "--temperature": generation.temperature,
        "--top-p": generation.top_p,
        "--max-new-tokens": generation.max_new_tokens,
        "--seed": generation.seed,
        "--batch-size": generation.batch_size,
        "--backend": backend,
        "--system-prompt": generation.system_prompt,
        "--goal-score": generation.goal_score,
        "--goal-template": generation.goal_template,
        "--vllm-kwargs": generation.vllm_kwargs or {},
        "--chunk-size": chunk_size,
    }
    inputs = {
        "--prompts": {"path": str(prompts), "fingerprint": content_fingerprint(prompts)},
        "--model": {"path": generation.model, "fingerprint": model_fingerprint(generation.model)},
    }
    return settings, inputs


def generation_stage(dataset, tokenizer, prompt_column: str, generation: GenerationSettings, backend: str):
    """The `generate` stage: the policy (or one vLLM engine) is loaded once per process, then each chunk is sampled.

    Args:
        dataset (`datasets.Dataset`):
            The prompts.
        tokenizer:
            The policy's tokenizer, or `None` to load it in each process.
        prompt_column (`str`):
            The column to generate from.
        generation ([`GenerationSettings`]):
            The sampling settings. transformers: chunk `k` is seeded with `chunk_seed(seed, k)`; vLLM: prompt `i`
            with `seed + i` (global index).
        backend (`str`):
            The resolved backend.

    Returns:
        [`~shards.Stage`]
    """
    from transformers import AutoTokenizer

    from .sampling import free_model, generate_completions, load_causal_lm, make_vllm_engine
    from .shards import Stage, chunk_seed, launched_processes

    g = generation
    common = dict(
        n=g.n,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        batch_size=g.batch_size,
        system_prompt=g.system_prompt,
        prompt_column=prompt_column,
        progress=False,
    )
    several = launched_processes() > 1
    vllm_kwargs = g.vllm_kwargs or {}

    def setup():
        _use_device()
        if backend == "vllm":
            engine = make_vllm_engine(
                g.model,
                seed=g.seed,
                tensor_parallel_size=g.tensor_parallel_size,
                external_launcher=several,
                vllm_kwargs=vllm_kwargs,
            )
            return {"engine": engine, "tokenizer": tokenizer or AutoTokenizer.from_pretrained(g.model)}
        return {
            "model": load_causal_lm(g.model, None),
            "tokenizer": tokenizer or AutoTokenizer.from_pretrained(g.model),
        }

    def run(context, k, start, end):
        chunk = dataset.select(range(start, end))
        if backend == "vllm":
            return generate_completions(
                g.model,
                chunk,
                tokenizer=context["tokenizer"],
                backend="vllm",
                seed=g.seed,
                prompt_offset=start,
                vllm_engine=context["engine"],
                vllm_kwargs=vllm_kwargs,
                **common,
            )
        return generate_completions(
            context["model"],
            chunk,
            tokenizer=context["tokenizer"],
            backend="transformers",
            seed=chunk_seed(g.seed, k),
            **common,
        )

    def teardown(context):
        free_model(context.pop("engine", None) or context.pop("model", None))

    vllm = backend == "vllm"
    return Stage("generate", setup, run, teardown, collective_setup=vllm and several, whole_group=vllm)


def generation_plan(prompts, generation: GenerationSettings, chunk_size: int):
    """Everything a generation run needs before its chunks run; the values are checked here.

    Args:
        prompts (`str` or `os.PathLike`):
            The prompt file.
        generation ([`GenerationSettings`]):
            The sampling settings.
        chunk_size (`int`):
            Rows per chunk.

    Returns:
        `tuple`: `(prompts dataset, generation stage, resolved backend, processes per worker)`.
    """
    from .sampling import resolve_backend
    from .shards import launched_processes

    dataset, tokenizer, prompt_column = prepare_prompts(prompts, generation)
    backend = resolve_backend(generation.backend, generation.model)
    if backend != "vllm" and generation.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size is for --backend vllm (transformers runs one model per process).")
    for option, value in (
        ("--n", generation.n),
        ("--batch-size", generation.batch_size),
        ("--chunk-size", chunk_size),
    ):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}.")
    # One process: the vLLM engine spreads over --tensor-parallel-size GPUs by itself. Several: every that many
    # processes share one engine (vLLM's external launcher).
    several = launched_processes() > 1
    group_size = generation.tensor_parallel_size if backend == "vllm" and several else 1
    stage = generation_stage(dataset, tokenizer, prompt_column, generation, backend)
    return dataset, stage, backend, group_size


def checked_judges(scoring: ScoringSettings) -> list[tuple[str, str]]:
    """The named judges `[(name, spec), ...]` of `scoring` (see [`~sampling.name_judges`]), with `combine` checked.

    Args:
        scoring ([`ScoringSettings`]):
            The scoring settings.
    """
    from .sampling import name_judges

    judges = name_judges(scoring.scorers)
    names = [name for name, _ in judges]
    if len(judges) > 1 and scoring.combine != "mean" and scoring.combine not in names:
        raise ValueError(f"--combine must be 'mean' or one of the judges {names}, got {scoring.combine!r}.")
    return judges


def _judge_column(judges, name: str) -> str:
    return "rewards" if len(judges) == 1 else f"rewards_{name}"


def scoring_manifest(judges, scoring: ScoringSettings, chunk_size: int) -> tuple[dict, dict]:
    """The manifest entries of the scoring stages: `(settings, inputs)` keyed by option name.

    Args:
        judges (`list[tuple[str, str]]`):
            From [`checked_judges`].
        scoring ([`ScoringSettings`]):
            The scoring settings.
        chunk_size (`int`):
            Rows per chunk.
    """
    from .shards import model_fingerprint

    settings = {
        "--scorer": [f"{name}={spec}" for name, spec in judges],
        "--score-batch-size": scoring.batch_size,
        "--max-length": scoring.max_length,
        "--chunk-size": chunk_size,
    }
    inputs = {f"--scorer {name}": {"path": spec, "fingerprint": model_fingerprint(spec)} for name, spec in judges}
    return settings, inputs


def scoring_stages(judges, scoring: ScoringSettings, source: Callable) -> list:
    """One stage per judge, so that one model at a time is in memory.

    Args:
        judges, scoring:
            As in [`scoring_manifest`].
        source (`Callable`):
            `source(chunk_index, start, end)` gives the groups dataset of a chunk.

    Returns:
        `list[`[`~shards.Stage`]`]`: stage `score-<name>` writes the judge's reward column.
    """
    from .sampling import free_model, load_scorer, score_completions
    from .shards import Stage

    def stage(name, spec):
        column = _judge_column(judges, name)

        def setup():
            _use_device()
            return {"scorer": load_scorer(spec, max_length=scoring.max_length)}

        def run(context, k, start, end):
            scored = score_completions(
                source(k, start, end),
                context["scorer"],
                batch_size=scoring.batch_size,
                progress=False,
                reward_column=column,
            )
            return scored.select_columns([column])

        def teardown(context):
            free_model(context.pop("scorer"))

        return Stage(f"score-{name}", setup, run, teardown)

    return [stage(name, spec) for name, spec in judges]


def add_judge_columns(dataset, chunks: dict, judges, combine: str):
    """Merge the judges' reward columns (in chunk order) into `dataset`; several judges also get the combined
    `rewards` (see [`~sampling.combine_rewards`]).

    Args:
        dataset (`datasets.Dataset`):
            The groups.
        chunks (`dict`):
            The chunk datasets of every stage, as [`~shards.run_chunks`] returns them.
        judges (`list[tuple[str, str]]`):
            From [`checked_judges`].
        combine (`str`):
            `"mean"` or a judge's name.
    """
    from datasets import concatenate_datasets

    from .sampling import combine_rewards

    columns = {}
    for name, _ in judges:
        column = _judge_column(judges, name)
        columns[name] = concatenate_datasets(chunks[f"score-{name}"])[column]
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, columns[name])
    if len(judges) > 1:
        if "rewards" in dataset.column_names:
            dataset = dataset.remove_columns("rewards")
        dataset = dataset.add_column("rewards", combine_rewards(columns, combine))
    return dataset


def rows_with_judges(groups, judges):
    """Rows (one per completion) with the combined `reward`, plus `reward_<name>` per judge when there are several.

    Args:
        groups (`datasets.Dataset`):
            Scored groups from [`add_judge_columns`].
        judges (`list[tuple[str, str]]`):
            From [`checked_judges`].
    """
    from .data.convert import groups_to_rows

    columns = [f"rewards_{name}" for name, _ in judges] if len(judges) > 1 else []
    rows = groups_to_rows(groups.remove_columns(columns))
    for name, _ in judges if columns else []:
        rows = rows.add_column(f"reward_{name}", [r for group in groups[f"rewards_{name}"] for r in group])
    return rows


def reward_summary(dataset, column: str = "rewards") -> str:
    """A one-line summary of the rewards: `"mean reward 0.2031 over 400 completions (3 NaN)"`.

    Args:
        dataset (`datasets.Dataset`):
            Scored groups (`rewards`, a list per row) or rows (a float per row).
        column (`str`, *optional*, defaults to `"rewards"`):
            The reward column.
    """
    values = [r for group in dataset[column] for r in group] if column == "rewards" else list(dataset[column])
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    mean = f"{sum(finite) / len(finite):.4f}" if finite else "n/a"
    nan = len(values) - len(finite)
    return f"mean reward {mean} over {len(values)} completions" + (f" ({nan} NaN)" if nan else "")


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------


def _work_dir(work_dir, outputs) -> Path:
    if work_dir:
        return Path(work_dir)
    first = Path(next(o for o in outputs if o))
    return first.with_name(first.name + ".parts")


def _run_chunks(command, settings, inputs, num_rows, stages, work_dir, run: RunSettings, group_size=1):
    from .shards import run_chunks

    manifest = {"command": command, "settings": settings, "inputs": inputs}
    log = lambda line: print(f"trl-rw {command}: {line}", file=sys.stderr)  # noqa: E731
    return run_chunks(
        work_dir,
        manifest,
        num_rows,
        run.chunk_size,
        stages,
        restart=run.restart,
        group_size=group_size,
        progress=run.progress,
        log=log,
    )


def run_generate(prompts, output, generation: GenerationSettings, **options):
    """Sample `generation.n` completions per prompt in chunks and write a groups dataset (`prompt`, `completions`).

    Args:
        prompts (`str` or `os.PathLike`):
            A prompt file (see [`~data.convert.read_prompts`]).
        output (`str` or `os.PathLike`):
            `.jsonl`, `.json`, `.parquet`, or a folder (`save_to_disk`).
        generation ([`GenerationSettings`]):
            The sampling settings.
        **options:
            The [`RunSettings`] of the run: `chunk_size`, `work_dir`, `restart`, `overwrite`, `progress`.

    Returns:
        `tuple` or `None`: on the main process `(groups, path written)`; `None` on the others.
    """
    from datasets import concatenate_datasets

    from .data.convert import save_dataset
    from .shards import remove_work_dir

    run = RunSettings(**options)
    check_outputs({"--output": output}, run.overwrite, run.work_dir)
    dataset, stage, backend, group_size = generation_plan(prompts, generation, run.chunk_size)
    settings, inputs = generation_manifest(prompts, generation, backend, run.chunk_size)
    folder = _work_dir(run.work_dir, [output])
    chunks = _run_chunks("generate", settings, inputs, len(dataset), [stage], folder, run, group_size)
    if chunks is None:  # not the main process
        return None
    groups = concatenate_datasets(chunks["generate"])
    path = save_dataset(groups, output, overwrite=run.overwrite)
    remove_work_dir(folder)
    return groups, path


def run_score(input, output, scoring: ScoringSettings, **options):
    """Add a `rewards` column (one float per completion) to a groups dataset, in chunks, and write it.

    Args:
        input (`str` or `os.PathLike`):
            A groups dataset (`prompt`, `completions`) in any format [`~data.convert.load_dataset_any`] reads.
        output (`str` or `os.PathLike`):
            `.jsonl`, `.json`, `.parquet`, or a folder (`save_to_disk`).
        scoring ([`ScoringSettings`]):
            The judges and their settings.
        **options:
            The [`RunSettings`] of the run, as in [`run_generate`].

    Returns:
        `tuple` or `None`: on the main process `(scored groups, path written)`; `None` on the others.
    """
    from .data.convert import load_dataset_any, save_dataset
    from .sampling import group_completions
    from .shards import content_fingerprint, remove_work_dir

    run = RunSettings(**options)
    check_outputs({"--output": output}, run.overwrite, run.work_dir)
    judges = checked_judges(scoring)
    if scoring.batch_size < 1 or run.chunk_size < 1:
        raise ValueError(f"--batch-size and --chunk-size must be >= 1, got {scoring.batch_size} and {run.chunk_size}.")
    dataset = load_dataset_any(input)
    group_completions(dataset)  # the columns are checked before any model loads
    settings, inputs = scoring_manifest(judges, scoring, run.chunk_size)
    inputs["--input"] = {"path": str(input), "fingerprint": content_fingerprint(input)}
    stages = scoring_stages(judges, scoring, lambda k, start, end: dataset.select(range(start, end)))
    folder = _work_dir(run.work_dir, [output])
    chunks = _run_chunks("score", settings, inputs, len(dataset), stages, folder, run)
    if chunks is None:
        return None
    dataset = add_judge_columns(dataset, chunks, judges, scoring.combine)
    path = save_dataset(dataset, output, overwrite=run.overwrite)
    remove_work_dir(folder)
    return dataset, path


def run_sample(
    prompts,
    outputs: Mapping[str, str | None],
    generation: GenerationSettings,
    scoring: ScoringSettings,
    *,
    strategy: str = "best_worst",
    ties: str = "drop",
    **options,
):
    """Sample, score and write one or more dataset shapes in one run (generation, then one stage per judge).

    Args:
        prompts (`str` or `os.PathLike`):
            A prompt file (see [`~data.convert.read_prompts`]).
        outputs (`Mapping[str, str | None]`):
            `{"groups": path, "rows": path, "pairs": path}`; at least one path. They are written all or nothing.
        generation ([`GenerationSettings`]):
            The sampling settings (`seed` also breaks ties for the pairs).
        scoring ([`ScoringSettings`]):
            The judges and their settings.
        strategy (`str`, *optional*, defaults to `"best_worst"`):
            How pairs are drawn from each group (see [`~data.convert.groups_to_pairs`]).
        ties (`str`, *optional*, defaults to `"drop"`):
            Pairs with equal rewards: `"drop"` or `"keep"`.
        **options:
            The [`RunSettings`] of the run, as in [`run_generate`].

    Returns:
        `tuple` or `None`: on the main process `(scored groups, [(shape, dataset, path written), ...])`; `None` on
        the others.
    """
    from datasets import concatenate_datasets

    from .data.convert import groups_to_pairs, save_datasets
    from .shards import chunk_path, read_chunk, remove_work_dir

    run = RunSettings(**options)
    if not any(outputs.values()):
        raise ValueError("Give at least one of --output-groups, --output-rows, --output-pairs.")
    check_outputs({f"--output-{shape}": path for shape, path in outputs.items()}, run.overwrite, run.work_dir)
    judges = checked_judges(scoring)
    dataset, generation_stage_, backend, group_size = generation_plan(prompts, generation, run.chunk_size)
    settings, inputs = generation_manifest(prompts, generation, backend, run.chunk_size)
    score_settings, score_inputs = scoring_manifest(judges, scoring, run.chunk_size)
    settings.update(score_settings)
    inputs.update(score_inputs)
    folder = _work_dir(run.work_dir, list(outputs.values()))
    source = lambda k, start, end: read_chunk(chunk_path(folder, "generate", k))  # noqa: E731
    stages = [generation_stage_] + scoring_stages(judges, scoring, source)
    chunks = _run_chunks("sample", settings, inputs, len(dataset), stages, folder, run, group_size)
    if chunks is None:
        return None
    groups = add_judge_columns(concatenate_datasets(chunks["generate"]), chunks, judges, scoring.combine)
    judge_columns = [f"rewards_{name}" for name, _ in judges] if len(judges) > 1 else []
    builders = {
        "groups": lambda: groups,
        "rows": lambda: rows_with_judges(groups, judges),
        "pairs": lambda: groups_to_pairs(
            groups.remove_columns(judge_columns), strategy=strategy, ties=ties, seed=generation.seed
        ),
    }
    built = [(shape, builders[shape](), path) for shape, path in outputs.items() if path]
    paths = save_datasets([(ds, path) for _, ds, path in built], overwrite=run.overwrite)  # all or nothing
    remove_work_dir(folder)
    return groups, [(shape, ds, path) for (shape, ds, _), path in zip(built, paths)]


def sample_groups(
    prompts,
    output,
    generation: GenerationSettings,
    scoring: ScoringSettings,
    *,
    chunk_size: int,
    progress: bool = True,
    accelerate_config: str | None = None,
    num_processes: int | None = None,
):
    """Sample and score into one groups dataset, as a phase of `trl-rw compare` / `trl-rw iterate`: [`run_sample`]
    in this process, or with `accelerate_config` and / or `num_processes` as `accelerate launch` of `trl-rw sample`
    with the same settings (its chunks split over the processes; the samples depend on `chunk_size`, not on the number
    of processes).

    Args:
        prompts (`str` or `os.PathLike`):
            A prompt file.
        output (`str` or `os.PathLike`):
            The groups dataset to write (resumable in `<output>.parts`).
        generation ([`GenerationSettings`]):
            The sampling settings.
        scoring ([`ScoringSettings`]):
            The judges and their settings.
        chunk_size (`int`):
            Prompts per chunk.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars.
        accelerate_config (`str` or `None`, *optional*):
            An accelerate config (a name or a path, see [`~launch.launch_command`]).
        num_processes (`int` or `None`, *optional*):
            Processes of the launch.

    Returns:
        `Dataset`: the scored groups.
    """
    import json
    from dataclasses import fields

    from .data.convert import load_dataset_any

    if accelerate_config is None and num_processes is None:
        groups, _ = run_sample(
            prompts, {"groups": output}, generation, scoring, chunk_size=chunk_size, progress=progress
        )
        return groups
    from .launch import launch_command, run_launched
    from .sampling import resolve_backend

    argv = ["trl_rewardweighted.cli", "sample", "--prompts", prompts, "--output-groups", output]
    vllm = resolve_backend(generation.backend, generation.model) == "vllm"
    for f in fields(generation):
        value = getattr(generation, f.name)
        if value is None or (f.name in ("tensor_parallel_size", "vllm_kwargs") and value == f.default):
            continue
        if f.name == "batch_size" and vllm:  # vLLM batches the prompts itself
            continue
        argv += [f"--{f.name.replace('_', '-')}", json.dumps(value) if f.name == "vllm_kwargs" else value]
    for scorer in scoring.scorers:
        argv += ["--scorer", scorer]
    argv += ["--combine", scoring.combine] if len(scoring.scorers) > 1 else []
    argv += ["--score-batch-size", scoring.batch_size]
    argv += ["--max-length", scoring.max_length] if scoring.max_length is not None else []
    argv += ["--chunk-size", chunk_size] + ([] if progress else ["--no-progress"])
    run_launched(launch_command(argv, accelerate_config, num_processes), env={"TOKENIZERS_PARALLELISM": "false"})
    return load_dataset_any(output)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------------


def _check_rewards(dataset) -> None:
    """Every reward / score value is a number (or None / NaN): a string or a boolean is refused, naming the row."""
    from .data.utils import to_float

    for name in ("reward", "rewards", "score_chosen", "score_rejected"):
        if name not in dataset.column_names:
            continue
        for i, value in enumerate(dataset[name]):
            for j, v in enumerate(value if name == "rewards" and isinstance(value, (list, tuple)) else [value]):
                to_float(v, f"Row {i}", f"`{name}`[{j}]" if name == "rewards" else f"`{name}`")


def convert_dataset(dataset, to: str, strategy: str = "best_worst", ties: str = "drop", seed: int = 0):
    """Convert a groups or rows dataset into `to` (`"rows"`, `"groups"` or `"pairs"`); a dataset already of that
    shape comes back as is, with its rewards checked as the conversions would check them.

    Args:
        dataset (`datasets.Dataset`):
            A groups, rows or pairs dataset (see [`~data.convert.detect_shape`]).
        to (`str`):
            The target shape.
        strategy (`str`, *optional*, defaults to `"best_worst"`):
            For `to="pairs"`: how pairs are drawn from each group.
        ties (`str`, *optional*, defaults to `"drop"`):
            For `to="pairs"`: pairs with equal rewards.
        seed (`int`, *optional*, defaults to `0`):
            For `to="pairs"`: breaks ties for the best / worst completion.
    """
    from .data.convert import detect_shape, groups_to_pairs, groups_to_rows, rows_to_groups

    shape = detect_shape(dataset)
    if shape == to:
        _check_rewards(dataset)  # re-saved as is: check what the conversions would have checked
        return dataset
    if shape == "pairs":
        raise ValueError(f"Cannot convert pairs to {to}: a pair does not hold the other completions of its prompt.")
    if shape == "groups" and "rewards" not in dataset.column_names:
        raise ValueError(
            f"The groups dataset has no `rewards` column (columns found: {dataset.column_names}); score it first with "
            "`trl-rw score`."
        )
    groups = rows_to_groups(dataset) if shape == "rows" else dataset
    if to == "groups":
        return groups
    if to == "rows":
        return groups_to_rows(groups)
    return groups_to_pairs(groups, strategy=strategy, ties=ties, seed=seed)


def run_convert(
    input,
    output,
    *,
    to: str | None = None,
    adapter: str | None = None,
    adapter_kwargs=None,
    split: str | None = None,
    strategy: str | None = None,
    ties: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
):
    """Convert a dataset to another shape, apply a public-dataset adapter, or both (the adapter first), and write it.

    The options that only some modes use are `None` when not given; one given where it has no effect is refused
    (see [`refuse_unused`]), never ignored.

    Args:
        input (`str` or `os.PathLike`):
            A groups, rows or pairs dataset; with `adapter`, the adapter's source (a file, folder or Hub id).
        output (`str` or `os.PathLike`):
            `.jsonl`, `.json`, `.parquet`, or a folder (`save_to_disk`).
        to (`str` or `None`, *optional*, defaults to `None`):
            The target shape: `"rows"`, `"groups"` or `"pairs"` (see [`convert_dataset`]).
        adapter (`str` or `None`, *optional*, defaults to `None`):
            A public-dataset adapter (see [`~data.adapters.apply_adapter`]). `to` or `adapter` is required.
        adapter_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            The adapter's options (a dict or a JSON object); only with `adapter`.
        split (`str` or `None`, *optional*, defaults to `None`):
            The split read from `input` with `adapter` (`None`: `"train"`); only with `adapter`.
        strategy, ties, seed (*optional*, default to `None`):
            How pairs are drawn (`None`: `"best_worst"`, `"drop"`, `0`); only with `to="pairs"` from groups or rows.
            The adapter's own options go in `adapter_kwargs`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing output.

    Returns:
        `tuple`: `(dataset written, its shape, path written, number of input rows)`.
    """
    from .data.convert import detect_shape, load_dataset_any, save_dataset

    if to is None and adapter is None:
        raise ValueError("Give --to (a target shape), --adapter (a public-dataset adapter), or both.")
    pair_options = [o for o, v in (("--strategy", strategy), ("--ties", ties), ("--seed", seed)) if v is not None]
    if adapter is None:
        given = [o for o, v in (("--adapter-kwargs", adapter_kwargs), ("--split", split)) if v is not None]
        refuse_unused(given, "without --adapter")
    if to != "pairs":
        hint = ' (the adapter\'s own options go in --adapter-kwargs, e.g. \'{"ties": "drop"}\')' if adapter else ""
        refuse_unused(pair_options, f"without --to pairs{hint}")
    check_outputs({"--output": output}, overwrite)
    if adapter is not None:
        from .data.adapters import apply_adapter, load_source

        dataset = load_source(input, split or "train")
        source = apply_adapter(dataset, adapter, adapter_kwargs)
    else:
        dataset = source = load_dataset_any(input)
    out = source
    if to is not None:
        if detect_shape(source) == "pairs":
            refuse_unused(
                pair_options, f"on pairs: {'the adapter writes' if adapter else 'the input holds'} pairs already"
            )
        out = convert_dataset(source, to, strategy or "best_worst", ties or "drop", 0 if seed is None else seed)
    path = save_dataset(out, output, overwrite=overwrite)
    try:
        shape = detect_shape(out)
    except ValueError:  # an adapter's prompt-only output (hh_rlhf_prompts)
        shape = "prompts" if "prompt" in out.column_names else "records"
    return out, shape, path, len(dataset)
