"""The `trl-rw` console script: sample completions, score them, convert between dataset shapes.

```bash
trl-rw generate --model M --prompts prompts.txt --n 4 --output groups.jsonl
trl-rw score    --input groups.jsonl --scorer trl_rewardweighted.rewards:vader_positivity --output scored.jsonl
trl-rw convert  --input scored.jsonl --to pairs --strategy best_worst --output pairs.jsonl
trl-rw sample   --model M --prompts prompts.txt --scorer SPEC --output-groups g.jsonl --output-pairs p.jsonl
accelerate launch --num_processes 8 -m trl_rewardweighted.cli sample ...   # chunks split over 8 processes
trl-rw train    var --config recipes/var/smollm2-135m/config_full.yaml --dataset_name rows.jsonl
trl-rw check-recipe recipes/   # every recipe parses strictly; no model or data is loaded
trl-rw eval     --model var=out/var --goal-model ra=out/ra --reference M --prompts test.jsonl --reward SPEC \
                --output-dir eval/
trl-rw compare  --output-dir compare/   # SFT, DPO, VAR, VCB, reward-augmented DPO side by side (quickstart setup)
trl-rw iterate  --method var --rounds 3   # sample -> score -> train, in rounds (resumable)
```

Adding a subcommand: write `_add_<name>_parser(subparsers)` that registers it with `set_defaults(func=_cmd_<name>)`
and call it from [`build_parser`]. A command returns nothing on success; for bad input it raises
`ValueError` (JSON errors included) / `OSError` (`FileNotFoundError`, `FileExistsError`) / `ImportError` with a
one-line message, which [`main`] prints as `trl-rw <command>: error: ...` and exits with code 2 (set
`TRL_RW_DEBUG=1` to get the traceback instead). Other exceptions are bugs and keep their traceback. Outputs are
checked before any work starts (an existing one needs `--overwrite`) and written atomically by
`trl_rewardweighted.data.convert.save_datasets`. Heavy libraries are imported inside the commands, so
`trl-rw --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

_USER_ERRORS = (OSError, ValueError, ImportError)


# ----------------------------------------------------------------------------------------------------------------------
# Shared argument groups
# ----------------------------------------------------------------------------------------------------------------------


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--model", required=True, help="policy model: a local folder or Hub id")
    group.add_argument(
        "--prompts",
        required=True,
        help="prompt file: .txt (one prompt per line), .jsonl/.json/.parquet with a `prompt` column, "
        "or a save_to_disk folder",
    )
    group.add_argument("--n", type=int, default=4, help="completions per prompt (default: 4)")
    group.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default: 1.0)"
    )
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    group.add_argument("--seed", type=int, default=0, help="same seed, same completions (default: 0)")
    group.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: 16)")
    group.add_argument(
        "--backend", choices=["auto", "transformers", "vllm"], default="auto", help="default: auto (vLLM if usable)"
    )
    group.add_argument("--system-prompt", default=None, help="system message added for generation only")
    group.add_argument(
        "--goal-score",
        type=float,
        default=None,
        help="for reward-augmented DPO models: condition generation on this goal score (e.g. 10)",
    )
    group.add_argument(
        "--goal-template", default=None, help="goal text template used at training (default: the paper's wording)"
    )


def _add_pair_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pairs")
    group.add_argument(
        "--strategy",
        choices=["best_worst", "best_vs_rest", "all_pairs"],
        default="best_worst",
        help="how pairs are drawn from each group (default: best_worst)",
    )
    group.add_argument(
        "--ties", choices=["drop", "keep"], default="drop", help="pairs with equal rewards (default: drop)"
    )


def _add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (default: refuse). Outputs are written to a temporary and renamed into place "
        "only when complete",
    )


def _add_run_args(parser: argparse.ArgumentParser, vllm: bool = True) -> None:
    """Chunked, resumable, multi-process runs (`generate`, `score`, `sample`; see trl_rewardweighted.shards)."""
    group = parser.add_argument_group("chunks, resuming, several processes")
    group.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="rows per chunk: the unit of work that is written to disk, split across processes and resumed "
        "(default: 256). The samples depend on it (not on the number of processes)",
    )
    group.add_argument(
        "--work-dir",
        default=None,
        help="folder for the finished chunks and the manifest (default: the first output + '.parts'); must be "
        "shared by all nodes. Removed once the outputs are written",
    )
    group.add_argument(
        "--restart", action="store_true", help="discard an unfinished run in the work folder instead of resuming it"
    )
    if vllm:
        group.add_argument(
            "--tensor-parallel-size",
            type=int,
            default=1,
            help="vLLM: GPUs per engine. Under `accelerate launch` every this many consecutive processes share one "
            "engine (default: 1: one engine per process)",
        )
        group.add_argument(
            "--vllm-kwargs", default=None, help="extra vllm.LLM arguments as JSON, e.g. '{\"max_model_len\": 4096}'"
        )


def _add_scorer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="[NAME=]SPEC",
        help="reward model folder / Hub id, or 'module:function' (e.g. trl_rewardweighted.rewards:vader_positivity). "
        "Repeat for several judges: each gets a column rewards_NAME and `rewards` combines them (--combine)",
    )
    parser.add_argument(
        "--combine",
        default="mean",
        help="several judges: `rewards` is their mean (default) or the scores of the judge named here",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------------


def _add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample n completions per prompt",
        description="Sample n completions per prompt and write a groups dataset (prompt, completions).",
    )
    _add_generation_args(parser)
    parser.add_argument("--output", required=True, help="output: .jsonl, .json, .parquet, or a folder (save_to_disk)")
    _add_run_args(parser)
    _add_overwrite_arg(parser)
    _add_progress_arg(parser)
    parser.set_defaults(func=_cmd_generate)


def _add_score_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score the completions of a groups dataset",
        description="Add a `rewards` column (one float per completion) to a groups dataset.",
    )
    parser.add_argument("--input", required=True, help="groups dataset (prompt, completions)")
    _add_scorer_args(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="completions per scorer call (default: 16)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate reward-model inputs (default: none)")
    parser.add_argument("--output", required=True, help="output: .jsonl, .json, .parquet, or a folder")
    _add_run_args(parser, vllm=False)
    _add_overwrite_arg(parser)
    _add_progress_arg(parser)
    parser.set_defaults(func=_cmd_score)


def _add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert between groups, rows and pairs",
        description="Convert a groups or rows dataset into rows (VAR), groups (VCB) or pairs (DPO / RA-DPO), "
        "or re-save a dataset in another format (by the output suffix).",
    )
    parser.add_argument("--input", required=True, help="groups, rows or pairs dataset (with --adapter: the source)")
    parser.add_argument(
        "--to", default=None, choices=["rows", "groups", "pairs"], help="target shape (optional with --adapter)"
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="public-dataset adapter applied first (e.g. ultrafeedback_groups; see docs/datasets.md). --input may "
        "then be a Hub id",
    )
    parser.add_argument(
        "--adapter-kwargs", default=None, help='adapter options as a JSON object, e.g. \'{"score": "overall"}\''
    )
    parser.add_argument("--split", default="train", help="split read from --input with --adapter (default: train)")
    _add_pair_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="breaks ties for the best / worst completion")
    parser.add_argument("--output", required=True, help="output: .jsonl, .json, .parquet, or a folder")
    _add_overwrite_arg(parser)
    parser.set_defaults(func=_cmd_convert)


def _add_sample_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate + score + write groups / rows / pairs in one go",
        description="Sample n completions per prompt, score them, and write one or more dataset shapes.",
    )
    _add_generation_args(parser)
    _add_scorer_args(parser)
    parser.add_argument("--score-batch-size", type=int, default=None, help="default: --batch-size")
    parser.add_argument("--max-length", type=int, default=None, help="truncate reward-model inputs (default: none)")
    _add_pair_args(parser)
    parser.add_argument("--output-groups", default=None, help="write prompt, completions, rewards here")
    parser.add_argument("--output-rows", default=None, help="write prompt, completion, reward here")
    parser.add_argument("--output-pairs", default=None, help="write prompt, chosen, rejected, score_* here")
    _add_run_args(parser)
    _add_overwrite_arg(parser)
    _add_progress_arg(parser)
    parser.set_defaults(func=_cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    """The `trl-rw` parser with all subcommands (each sets `func` to the function that runs it)."""
    from trl_rewardweighted import __version__

    parser = argparse.ArgumentParser(
        prog="trl-rw",
        description="trl-rewardweighted: sample and score completions, build rows / groups / pairs datasets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate_parser(subparsers)
    _add_score_parser(subparsers)
    _add_convert_parser(subparsers)
    _add_sample_parser(subparsers)
    _add_train_parser(subparsers)
    _add_check_recipe_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_compare_parser(subparsers)
    _add_iterate_parser(subparsers)
    return parser


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train with a recipe (same as `python -m trl_rewardweighted.scripts.<method>`)",
        description="Train VAR, VCB, reward-augmented DPO or online VAR. Everything after the method is parsed by the "
        "method's launch script: `--config RECIPE.yaml` plus any config field as `--field value` (strict: unknown "
        "keys fail). For several processes use `accelerate launch -m trl_rewardweighted.scripts.<method> ...`.",
    )
    from trl_rewardweighted.methods import DEPRECATED_NAMES
    from trl_rewardweighted.scripts.train import LAUNCH_METHODS

    # A deprecated name (`ra_dpo`) is accepted with a FutureWarning; the usage shows the public names only.
    p.add_argument(
        "method",
        choices=[*LAUNCH_METHODS, *(old for old, new in DEPRECATED_NAMES.items() if new in LAUNCH_METHODS)],
        metavar="{" + ",".join(LAUNCH_METHODS) + "}",
    )
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="--config RECIPE.yaml and config overrides")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> None:
    from trl_rewardweighted.scripts.train import main as train_main

    train_main(args.method, args.script_args)


def _add_check_recipe_parser(subparsers) -> None:
    from trl_rewardweighted.scripts.check_recipe import add_arguments

    p = subparsers.add_parser(
        "check-recipe",
        help="validate recipes without loading a model or data",
        description="Parse each recipe strictly with its method's config, ModelConfig and script arguments (no model "
        "or data is loaded): renamed, misspelled and mistyped keys are reported, one message per problem. Exits 1 "
        "when any recipe has a problem.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_check_recipe)


def _cmd_check_recipe(args) -> None:
    from trl_rewardweighted.scripts.check_recipe import check_recipes

    if check_recipes(args.paths, args.method):
        raise SystemExit(1)


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate trained models against a reference: reward, win rate, KL, length, diversity",
        description="Generate (sampled and greedy) replies of each model and of the reference on a prompt set, score "
        "them, and report mean reward with 95 %% bootstrap intervals, the paired difference and win / tie / loss "
        "rate against the reference, KL to the reference on the model's own samples, reward per nat, length, "
        "distinct-1/2, self-BLEU and the misalignment rate. Writes eval.json, eval.md and PNG plots. "
        "See docs/evaluation.md.",
    )
    p.add_argument(
        "--model", action="append", default=[], metavar="[NAME=]PATH", help="a model to evaluate (repeatable)"
    )
    p.add_argument(
        "--goal-model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a reward-augmented DPO model: it answers goal-conditioned prompts, and the reference is also evaluated "
        "under the same goal prompt (repeatable)",
    )
    p.add_argument("--reference", required=True, help="the reference model (usually the starting model)")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file (.txt, one per line) or dataset file / folder with a `prompt` column (strings or chat)",
    )
    p.add_argument("--reward", required=True, help="reward model path / Hub id, or `module:function`")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--reference-column",
        default=None,
        help="a column of the prompt dataset with one reference response per prompt (e.g. `chosen`): adds a win rate "
        "against it",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N prompts only")
    p.add_argument("--num-samples", type=int, default=4, help="sampled replies per prompt (default: 4)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy replies")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    p.add_argument("--goal-score", type=float, default=10.0, help="goal of --goal-model models (default: 10)")
    p.add_argument("--goal-template", default=None, help="goal text template used at training")
    p.add_argument("--tie-tolerance", type=float, default=0.0)
    _add_progress_arg(p)
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_eval)


def _named_models(values: list[str], option: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name or value, value
        if not name or not path:
            raise ValueError(f"{option} {value!r}: give NAME=PATH or PATH.")
        out.append((name, path))
    return out


def _cmd_eval(args) -> None:
    from trl_rewardweighted.data.utils import completion_text
    from trl_rewardweighted.evaluation import EvalConfig, ModelSpec, evaluate_models, summary_line, write_report

    specs = [ModelSpec(n, p) for n, p in _named_models(args.model, "--model")]
    specs += [ModelSpec(n, p, goal_conditioned=True) for n, p in _named_models(args.goal_model, "--goal-model")]
    if not specs:
        raise ValueError("Give at least one --model or --goal-model to evaluate.")
    out = Path(args.output_dir)
    if (out / "eval.json").exists() and not args.overwrite:
        raise FileExistsError(f"{out / 'eval.json'} exists; pass --overwrite to replace it.")
    ds = _read_prompts(args.prompts)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    references = None
    if args.reference_column:
        if args.reference_column not in ds.column_names:
            raise ValueError(
                f"--reference-column {args.reference_column!r} is not a column of {args.prompts} "
                f"(columns: {ds.column_names})."
            )
        references = [completion_text(r) for r in ds[args.reference_column]]
    config = EvalConfig(
        num_samples=args.num_samples,
        greedy=not args.no_greedy,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        goal_score=args.goal_score,
        goal_template=args.goal_template,
        tie_tolerance=args.tie_tolerance,
        progress=not args.no_progress,
    )
    results = evaluate_models(
        specs, args.reference, list(ds["prompt"]), args.reward, config, reference_responses=references
    )
    paths = write_report(results, out)
    print((out / "eval.md").read_text())
    print(summary_line(results))
    print("written: " + ", ".join(paths.values()))


def _add_compare_parser(subparsers) -> None:
    from trl_rewardweighted.compare import add_arguments

    p = subparsers.add_parser(
        "compare",
        help="train SFT, DPO, VAR, VCB, reward-augmented DPO, online VAR and GRPO with matched budgets and compare them",
        description="Sample and score replies from a starting model, train every selected method on the same data "
        "(the online methods on replies they sample themselves) with matched budgets, evaluate each (trl-rw eval) on "
        "held-out prompts and write one table and plot. "
        "The default runs offline on CPU (SmolLM2-135M-Instruct, VADER reward). See docs/compare.md.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> None:
    from trl_rewardweighted.compare import run_compare

    run_compare(args)


def _add_iterate_parser(subparsers) -> None:
    from trl_rewardweighted.iterate import add_arguments

    p = subparsers.add_parser(
        "iterate",
        help="rounds of sample -> score -> train (VAR, VCB, reward-augmented DPO, DPO, SFT), resumable",
        description="R rounds: sample n replies per prompt from the current policy, score them, train one offline "
        "trainer on them, and start the next round from the trained model. The reference stays the starting model "
        "unless --update-reference. Rerunning resumes after the last finished round. Options can come from a YAML "
        "recipe (--config; flags override). See docs/iterate.md.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_iterate)


def _cmd_iterate(args) -> None:
    from trl_rewardweighted.iterate import run_iterate

    run_iterate(args)


# ----------------------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------------------


def _check_outputs(args, paths: dict[str, str | None]) -> None:
    """Before any work: every output is new (or `--overwrite` is given and it can be replaced), no path twice."""
    from trl_rewardweighted.data.convert import check_output_path

    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if not path:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {option} are the same path {path}; give each output its own path.")
        seen[key] = option
        check_output_path(path, args.overwrite, option="--overwrite")


def _read_prompts(path_str: str):
    """A Dataset with a `prompt` column from a .txt file (one prompt per line, blank lines skipped) or any
    dataset file / folder with a `prompt` column (other columns are kept). Errors name `file:line`."""
    from datasets import Dataset

    from trl_rewardweighted.data.convert import load_dataset_any, read_text_lines

    path = Path(path_str)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file not found: {path}")
        prompts = [line for _, line in read_text_lines(path) if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no rows")
        return Dataset.from_dict({"prompt": prompts})
    ds = load_dataset_any(path)
    if "prompt" not in ds.column_names:
        raise ValueError(f"{path} has no `prompt` column; columns found: {ds.column_names}.")
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    return ds


def _goal_prompts(ds, args, tokenizer):
    """Add `generation_prompt`: each prompt conditioned on `--goal-score` (reward-augmented DPO models)."""
    try:
        from trl_rewardweighted.data.relabel import build_goal_prompt
    except ImportError as err:
        raise ImportError(f"--goal-score needs trl_rewardweighted.data.relabel: {err}") from err
    goal = [
        build_goal_prompt(
            p, score=args.goal_score, tokenizer=tokenizer, system_role="auto", template=args.goal_template
        )
        for p in ds["prompt"]
    ]
    if "generation_prompt" in ds.column_names:
        ds = ds.remove_columns("generation_prompt")
    return ds.add_column("generation_prompt", goal)


def _prepare_prompts(args):
    """The prompts of `generate` / `sample`: `(dataset, tokenizer or None, column to generate from)`."""
    if args.goal_template is not None and args.goal_score is None:
        raise ValueError("--goal-template needs --goal-score.")
    ds = _read_prompts(args.prompts)
    tokenizer, prompt_column = None, "prompt"
    if args.goal_score is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ds = _goal_prompts(ds, args, tokenizer)
        prompt_column = "generation_prompt"
    return ds, tokenizer, prompt_column


def _generate(args):
    """Run generation for `generate` / `sample` in one call (one process, no chunks); returns the groups dataset."""
    from trl_rewardweighted.sampling import generate_completions

    ds, tokenizer, prompt_column = _prepare_prompts(args)
    return generate_completions(
        args.model,
        ds,
        n=args.n,
        tokenizer=tokenizer,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        backend=args.backend,
        system_prompt=args.system_prompt,
        progress=not args.no_progress,
        prompt_column=prompt_column,
    )


def _reward_summary(ds, column: str = "rewards") -> str:
    values = [r for group in ds[column] for r in group] if column == "rewards" else list(ds[column])
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    mean = f"{sum(finite) / len(finite):.4f}" if finite else "n/a"
    nan = len(values) - len(finite)
    return f"mean reward {mean} over {len(values)} completions" + (f" ({nan} NaN)" if nan else "")


# `generate`, `score` and `sample` run in chunks (trl_rewardweighted.shards): resumable, and split across the
# processes of `accelerate launch -m trl_rewardweighted.cli ...`; the main process merges and writes the outputs.


def _vllm_kwargs(args) -> dict:
    import json

    if not getattr(args, "vllm_kwargs", None):
        return {}
    try:
        value = json.loads(args.vllm_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--vllm-kwargs is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--vllm-kwargs must be a JSON object, got {args.vllm_kwargs!r}.")
    return value


def _work_dir(args, outputs: list[str | None]) -> Path:
    if args.work_dir:
        return Path(args.work_dir)
    first = Path(next(o for o in outputs if o))
    return first.with_name(first.name + ".parts")


def _use_device():
    """Make this process's accelerator device (its local rank's GPU) the default one for model loading."""
    import torch

    from trl_rewardweighted.shards import local_device

    device = local_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _generation_manifest(args, backend: str) -> tuple[dict, dict]:
    from trl_rewardweighted.shards import content_fingerprint, model_fingerprint

    settings = {
        "--model": args.model,
        "--n": args.n,
        "--temperature": args.temperature,
        "--top-p": args.top_p,
        "--max-new-tokens": args.max_new_tokens,
        "--seed": args.seed,
        "--batch-size": args.batch_size,
        "--backend": backend,
        "--system-prompt": args.system_prompt,
        "--goal-score": args.goal_score,
        "--goal-template": args.goal_template,
        "--vllm-kwargs": _vllm_kwargs(args),
        "--chunk-size": args.chunk_size,
    }
    inputs = {
        "--prompts": {"path": str(args.prompts), "fingerprint": content_fingerprint(args.prompts)},
        "--model": {"path": args.model, "fingerprint": model_fingerprint(args.model)},
    }
    return settings, inputs


def _generation_stage(args, ds, tokenizer, prompt_column: str, backend: str):
    """The `generate` stage: the policy (or one vLLM engine) is loaded once per process, then each chunk is sampled.

    transformers: chunk k is seeded with `chunk_seed(seed, k)`; vLLM: prompt i with `seed + i` (global index)."""
    from trl_rewardweighted.sampling import (
        _load_causal_lm,
        _load_tokenizer,
        free_model,
        generate_completions,
        make_vllm_engine,
    )
    from trl_rewardweighted.shards import Stage, chunk_seed, launched_processes

    common = dict(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt,
        prompt_column=prompt_column,
        progress=False,
    )
    several = launched_processes() > 1
    vllm_kwargs = _vllm_kwargs(args)

    def setup():
        _use_device()
        if backend == "vllm":
            engine = make_vllm_engine(
                args.model,
                seed=args.seed,
                tensor_parallel_size=args.tensor_parallel_size,
                external_launcher=several,
                vllm_kwargs=vllm_kwargs,
            )
            return {"engine": engine, "tokenizer": tokenizer or _load_tokenizer(args.model)}
        return {"model": _load_causal_lm(args.model, None), "tokenizer": tokenizer or _load_tokenizer(args.model)}

    def run(context, k, start, end):
        chunk = ds.select(range(start, end))
        if backend == "vllm":
            return generate_completions(
                args.model,
                chunk,
                tokenizer=context["tokenizer"],
                backend="vllm",
                seed=args.seed,
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
            seed=chunk_seed(args.seed, k),
            **common,
        )

    def teardown(context):
        free_model(context.pop("engine", None) or context.pop("model", None))

    vllm = backend == "vllm"
    return Stage("generate", setup, run, teardown, collective_setup=vllm and several, whole_group=vllm)


def _judges(args) -> list[tuple[str, str]]:
    from trl_rewardweighted.sampling import name_judges

    judges = name_judges(args.scorer)
    names = [name for name, _ in judges]
    if len(judges) > 1 and args.combine != "mean" and args.combine not in names:
        raise ValueError(f"--combine must be 'mean' or one of the judges {names}, got {args.combine!r}.")
    return judges


def _judge_column(judges, name: str) -> str:
    return "rewards" if len(judges) == 1 else f"rewards_{name}"


def _scoring_manifest(args, judges, batch_size: int) -> tuple[dict, dict]:
    from trl_rewardweighted.shards import model_fingerprint

    settings = {
        "--scorer": [f"{name}={spec}" for name, spec in judges],
        "--score-batch-size": batch_size,
        "--max-length": args.max_length,
        "--chunk-size": args.chunk_size,
    }
    inputs = {f"--scorer {name}": {"path": spec, "fingerprint": model_fingerprint(spec)} for name, spec in judges}
    return settings, inputs


def _scoring_stages(args, judges, source, batch_size: int) -> list:
    """One stage per judge (one model in memory at a time); `source(k, start, end)` gives the groups of a chunk."""
    from trl_rewardweighted.sampling import free_model, load_scorer, score_completions
    from trl_rewardweighted.shards import Stage

    def stage(name, spec):
        column = _judge_column(judges, name)

        def setup():
            _use_device()
            return {"scorer": load_scorer(spec, max_length=args.max_length)}

        def run(context, k, start, end):
            scored = score_completions(
                source(k, start, end), context["scorer"], batch_size=batch_size, progress=False, reward_column=column
            )
            return scored.select_columns([column])

        def teardown(context):
            free_model(context.pop("scorer"))

        return Stage(f"score-{name}", setup, run, teardown)

    return [stage(name, spec) for name, spec in judges]


def _add_judge_columns(ds, chunks: dict, judges, combine: str):
    """Merge the judges' reward columns (chunk order) into `ds`; several judges also get the combined `rewards`."""
    from datasets import concatenate_datasets

    from trl_rewardweighted.sampling import combine_rewards

    columns = {}
    for name, _ in judges:
        column = _judge_column(judges, name)
        columns[name] = concatenate_datasets(chunks[f"score-{name}"])[column]
        if column in ds.column_names:
            ds = ds.remove_columns(column)
        ds = ds.add_column(column, columns[name])
    if len(judges) > 1:
        if "rewards" in ds.column_names:
            ds = ds.remove_columns("rewards")
        ds = ds.add_column("rewards", combine_rewards(columns, combine))
    return ds


def _run_chunks(args, command: str, settings: dict, inputs: dict, num_rows: int, stages, outputs, group_size=1):
    from trl_rewardweighted.shards import run_chunks

    work_dir = _work_dir(args, outputs)
    manifest = {"command": command, "settings": settings, "inputs": inputs}
    log = lambda line: print(f"trl-rw {command}: {line}", file=sys.stderr)  # noqa: E731
    chunks = run_chunks(
        work_dir,
        manifest,
        num_rows,
        args.chunk_size,
        stages,
        restart=args.restart,
        group_size=group_size,
        progress=not args.no_progress,
        log=log,
    )
    return chunks, work_dir


def _generation_plan(args):
    """Everything `generate` and `sample` need before the chunks run."""
    from trl_rewardweighted.sampling import _resolve_backend
    from trl_rewardweighted.shards import launched_processes

    ds, tokenizer, prompt_column = _prepare_prompts(args)
    backend = _resolve_backend(args.backend, args.model)
    if backend != "vllm" and args.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size is for --backend vllm (transformers runs one model per process).")
    for option, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}.")
    # One process: the vLLM engine spreads over --tensor-parallel-size GPUs by itself. Several: every that many
    # processes share one engine (vLLM's external launcher).
    several = launched_processes() > 1
    group_size = args.tensor_parallel_size if backend == "vllm" and several else 1
    return ds, _generation_stage(args, ds, tokenizer, prompt_column, backend), backend, group_size


def _cmd_generate(args) -> None:
    from datasets import concatenate_datasets

    from trl_rewardweighted.data.convert import save_dataset
    from trl_rewardweighted.shards import remove_work_dir

    _check_outputs(args, {"--output": args.output})
    ds, stage, backend, group_size = _generation_plan(args)
    settings, inputs = _generation_manifest(args, backend)
    chunks, work_dir = _run_chunks(args, "generate", settings, inputs, len(ds), [stage], [args.output], group_size)
    if chunks is None:  # not the main process
        return
    groups = concatenate_datasets(chunks["generate"])
    path = save_dataset(groups, args.output, overwrite=args.overwrite)
    remove_work_dir(work_dir)
    print(f"generate: wrote {len(groups)} prompts x {args.n} completions to {path}")


def _cmd_score(args) -> None:
    from trl_rewardweighted.data.convert import load_dataset_any, save_dataset
    from trl_rewardweighted.sampling import _group_completions
    from trl_rewardweighted.shards import content_fingerprint, remove_work_dir

    _check_outputs(args, {"--output": args.output})
    judges = _judges(args)
    if args.batch_size < 1 or args.chunk_size < 1:
        raise ValueError(f"--batch-size and --chunk-size must be >= 1, got {args.batch_size} and {args.chunk_size}.")
    ds = load_dataset_any(args.input)
    _group_completions(ds)  # the columns are checked before any model loads
    settings, inputs = _scoring_manifest(args, judges, args.batch_size)
    inputs["--input"] = {"path": str(args.input), "fingerprint": content_fingerprint(args.input)}
    stages = _scoring_stages(args, judges, lambda k, start, end: ds.select(range(start, end)), args.batch_size)
    chunks, work_dir = _run_chunks(args, "score", settings, inputs, len(ds), stages, [args.output])
    if chunks is None:
        return
    ds = _add_judge_columns(ds, chunks, judges, args.combine)
    path = save_dataset(ds, args.output, overwrite=args.overwrite)
    remove_work_dir(work_dir)
    print(f"score: wrote {len(ds)} rows to {path}; {_reward_summary(ds)}")


def _check_rewards(ds) -> None:
    """Every reward / score value is a number (or None / NaN): a string or a boolean is refused, naming the row."""
    from trl_rewardweighted.data.utils import to_float

    for name in ("reward", "rewards", "score_chosen", "score_rejected"):
        if name not in ds.column_names:
            continue
        for i, value in enumerate(ds[name]):
            for j, v in enumerate(value if name == "rewards" and isinstance(value, (list, tuple)) else [value]):
                to_float(v, f"Row {i}", f"`{name}`[{j}]" if name == "rewards" else f"`{name}`")


def _convert(ds, to: str, strategy: str, ties: str, seed: int):
    from trl_rewardweighted.data.convert import detect_shape, groups_to_pairs, groups_to_rows, rows_to_groups

    shape = detect_shape(ds)
    if shape == to:
        _check_rewards(ds)  # re-saved as is: check what the conversions would have checked
        return ds
    if shape == "pairs":
        raise ValueError(f"Cannot convert pairs to {to}: a pair does not hold the other completions of its prompt.")
    if shape == "groups" and "rewards" not in ds.column_names:
        raise ValueError(
            f"The groups dataset has no `rewards` column (columns found: {ds.column_names}); score it first with "
            "`trl-rw score`."
        )
    groups = rows_to_groups(ds) if shape == "rows" else ds
    if to == "groups":
        return groups
    if to == "rows":
        return groups_to_rows(groups)
    return groups_to_pairs(groups, strategy=strategy, ties=ties, seed=seed)


def _cmd_convert(args) -> None:
    from trl_rewardweighted.data.convert import load_dataset_any, save_dataset

    if args.to is None and args.adapter is None:
        raise ValueError("Give --to (a target shape), --adapter (a public-dataset adapter), or both.")
    _check_outputs(args, {"--output": args.output})
    if args.adapter is not None:
        from trl_rewardweighted.data.adapters import apply_adapter, load_source

        ds = load_source(args.input, args.split)
        out = apply_adapter(ds, args.adapter, args.adapter_kwargs)
        out = _convert(out, args.to, args.strategy, args.ties, args.seed) if args.to else out
    else:
        ds = load_dataset_any(args.input)
        out = _convert(ds, args.to, args.strategy, args.ties, args.seed)
    path = save_dataset(out, args.output, overwrite=args.overwrite)
    what = args.to if args.adapter is None else f"rows ({' + '.join(filter(None, [args.adapter, args.to]))})"
    print(f"convert: wrote {len(out)} {what} to {path} (from {len(ds)} rows)")


def _rows_with_judges(groups, judges):
    """Rows (one per completion) with the combined `reward`, plus `reward_<name>` per judge when there are several."""
    from trl_rewardweighted.data.convert import groups_to_rows

    columns = [f"rewards_{name}" for name, _ in judges] if len(judges) > 1 else []
    rows = groups_to_rows(groups.remove_columns(columns))
    for name, _ in judges if columns else []:
        rows = rows.add_column(f"reward_{name}", [r for group in groups[f"rewards_{name}"] for r in group])
    return rows


def _cmd_sample(args) -> None:
    from datasets import concatenate_datasets

    from trl_rewardweighted.data.convert import groups_to_pairs, save_datasets
    from trl_rewardweighted.shards import chunk_path, read_chunk, remove_work_dir

    outputs = {"groups": args.output_groups, "rows": args.output_rows, "pairs": args.output_pairs}
    if not any(outputs.values()):
        raise ValueError("Give at least one of --output-groups, --output-rows, --output-pairs.")
    _check_outputs(args, {f"--output-{shape}": path for shape, path in outputs.items()})
    judges = _judges(args)
    ds, generation, backend, group_size = _generation_plan(args)
    batch_size = args.score_batch_size or args.batch_size
    settings, inputs = _generation_manifest(args, backend)
    score_settings, score_inputs = _scoring_manifest(args, judges, batch_size)
    settings.update(score_settings)
    inputs.update(score_inputs)
    work_dir = _work_dir(args, list(outputs.values()))
    source = lambda k, start, end: read_chunk(chunk_path(work_dir, "generate", k))  # noqa: E731
    stages = [generation] + _scoring_stages(args, judges, source, batch_size)
    chunks, work_dir = _run_chunks(
        args, "sample", settings, inputs, len(ds), stages, list(outputs.values()), group_size
    )
    if chunks is None:
        return
    groups = _add_judge_columns(concatenate_datasets(chunks["generate"]), chunks, judges, args.combine)
    judge_columns = [f"rewards_{name}" for name, _ in judges] if len(judges) > 1 else []
    builders = {
        "groups": lambda: groups,
        "rows": lambda: _rows_with_judges(groups, judges),
        "pairs": lambda: groups_to_pairs(
            groups.remove_columns(judge_columns), strategy=args.strategy, ties=args.ties, seed=args.seed
        ),
    }
    built = [(shape, builders[shape](), path) for shape, path in outputs.items() if path]
    paths = save_datasets([(ds, path) for _, ds, path in built], overwrite=args.overwrite)  # all or nothing
    remove_work_dir(work_dir)
    written = [f"{shape}: {len(ds)} rows -> {path}" for (shape, ds, _), path in zip(built, paths)]
    print(f"sample: {len(groups)} prompts x {args.n} completions, {_reward_summary(groups)}; " + "; ".join(written))


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The error message on one line (some library messages span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run `trl-rw` with `argv` (default: `sys.argv[1:]`). Returns 0.

    Bad input (`ValueError`, `OSError`, `ImportError`: a missing or malformed file, an existing output, a
    scorer that returns strings) prints one line `trl-rw <command>: error: <message>` on stderr and exits with
    code 2; Ctrl-C prints `trl-rw <command>: interrupted` and exits with 130 (outputs are left as they were). Any
    other exception is a bug and keeps its traceback. `TRL_RW_DEBUG=1` shows the traceback of every error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _USER_ERRORS as err:
        if os.environ.get("TRL_RW_DEBUG"):
            raise
        print(f"trl-rw {args.command}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("TRL_RW_DEBUG"):
            raise
        print(f"trl-rw {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
