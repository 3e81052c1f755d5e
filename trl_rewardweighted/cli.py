"""The `trl-rw` console script: sample completions, score them, convert between dataset shapes.

```bash
trl-rw generate --model M --prompts prompts.txt --n 4 --output groups.jsonl
trl-rw score    --input groups.jsonl --scorer trl_rewardweighted.rewards:vader_positivity --output scored.jsonl
trl-rw convert  --input scored.jsonl --to pairs --strategy best_worst --output pairs.jsonl
trl-rw sample   --model M --prompts prompts.txt --scorer SPEC --output-groups g.jsonl --output-pairs p.jsonl
accelerate launch --num_processes 8 -m trl_rewardweighted.cli sample ...   # chunks split over 8 processes
trl-rw train    var --config var/smollm2-135m/config_full --dataset_name rows.jsonl   # a packaged recipe, or a path
trl-rw train    var --config R.yaml --accelerate-config zero3 --num-processes 8      # under accelerate launch
trl-rw check-recipe var quickstart my.yaml   # every recipe parses strictly; no model or data is loaded
trl-rw check-recipe old.yaml --fix new.yaml  # migrate an alignment-handbook recipe
trl-rw recipes  list | copy NAME DIR | path NAME   # the packaged recipes and accelerate configs
trl-rw eval     --model var=out/var --goal-model ra=out/ra --reference M --prompts test.jsonl --reward SPEC \
                --output-dir eval/
trl-rw compare  --output-dir compare/   # SFT, DPO, VAR, VCB, reward-augmented DPO side by side (quickstart setup)
trl-rw iterate  --method var --rounds 3   # sample -> score -> train, in rounds (resumable)
```

This module parses and dispatches: the work of `generate`, `score`, `sample` and `convert` is done by
`trl_rewardweighted.pipeline` (callable from code), that of the other commands by their modules. Before dispatching, a
command refuses every option that has no effect in the mode chosen (`args.given` holds the options given on the
command line; tests/test_cli_flags.py walks the parser to keep it so) and checks the model paths with
`trl_rewardweighted.model_utils.check_model_source`.

Adding a subcommand: write `_<name>_arguments(parser)`, which adds its arguments, and `_cmd_<name>(args)`, which
runs it, and list them with the command's help in `_COMMANDS` (read by [`build_parser`]). A command returns nothing on
success; for bad input it raises `ValueError` (JSON errors included) / `OSError` (`FileNotFoundError`,
`FileExistsError`) / `ImportError` with a one-line message, which [`main`] prints as `trl-rw <command>: error: ...` and
exits with code 2 (set `TRL_RW_DEBUG=1` to get the traceback instead). Other exceptions are bugs and keep their
traceback. Outputs are checked before any work starts (an existing one needs `--overwrite`) and written atomically by
`trl_rewardweighted.data.convert.save_datasets`. Heavy libraries are imported inside the commands, so
`trl-rw --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

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
    _add_backend_arg(group, "default: auto (vLLM if usable)")
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


def _add_backend_arg(parser, help: str) -> None:
    parser.add_argument("--backend", choices=["auto", "transformers", "vllm"], default="auto", help=help)


def _add_pair_args(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """`--strategy` and `--ties`; without `defaults` they are None when not given (the command refuses them where they
    have no effect, and applies the defaults shown otherwise)."""
    group = parser.add_argument_group("pairs")
    group.add_argument(
        "--strategy",
        choices=["best_worst", "best_vs_rest", "all_pairs"],
        default="best_worst" if defaults else None,
        help="how pairs are drawn from each group (default: best_worst)",
    )
    group.add_argument(
        "--ties",
        choices=["drop", "keep"],
        default="drop" if defaults else None,
        help="pairs with equal rewards (default: drop)",
    )


def _add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (default: refuse). Outputs are written to a temporary and renamed into place "
        "only when complete",
    )


def _add_run_args(
    parser: argparse.ArgumentParser,
    vllm: bool = True,
    rows: str = "rows",
    chunk_size: int = 256,
    work_dir: str = "the first output + '.parts'",
) -> None:
    """Chunked, resumable, multi-process runs (`generate`, `score`, `sample`, `eval`; see trl_rewardweighted.shards),
    and the options every such run has: `--overwrite` and `--no-progress`."""
    group = parser.add_argument_group("chunks, resuming, several processes")
    group.add_argument(
        "--chunk-size",
        type=int,
        default=chunk_size,
        help=f"{rows} per chunk: the unit of work that is written to disk, split across processes and resumed "
        f"(default: {chunk_size}). The samples depend on it (not on the number of processes)",
    )
    group.add_argument(
        "--work-dir",
        default=None,
        help=f"folder for the finished chunks and the manifest (default: {work_dir}); must be "
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
    _add_overwrite_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


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
    parser.add_argument("--max-length", type=int, default=None, help="truncate reward-model inputs (default: none)")


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------------


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_generation_args(parser)
    parser.add_argument("--output", required=True, help="output: .jsonl, .json, .parquet, or a folder (save_to_disk)")
    _add_run_args(parser)


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="groups dataset (prompt, completions)")
    _add_scorer_args(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="completions per scorer call (default: 16)")
    parser.add_argument("--output", required=True, help="output: .jsonl, .json, .parquet, or a folder")
    _add_run_args(parser, vllm=False)


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--split", default=None, help="split read from --input with --adapter (default: train)")
    _add_pair_args(parser, defaults=False)
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="with --to pairs: breaks ties for the best / worst completion (default: 0)",
    )
    parser.add_argument("--output", required=True, help="output: .jsonl, .json, .parquet, or a folder")
    _add_overwrite_arg(parser)


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    _add_generation_args(parser)
    _add_scorer_args(parser)
    parser.add_argument("--score-batch-size", type=int, default=None, help="default: --batch-size")
    _add_pair_args(parser)
    parser.add_argument("--output-groups", default=None, help="write prompt, completions, rewards here")
    parser.add_argument("--output-rows", default=None, help="write prompt, completion, reward here")
    parser.add_argument("--output-pairs", default=None, help="write prompt, chosen, rejected, score_* here")
    _add_run_args(parser)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accelerate-config",
        default=None,
        metavar="NAME|PATH",
        help="launch under `accelerate launch` with this config: a path, or a name (this package's own first, e.g. "
        "multi_node_zero3, then TRL's: single_gpu, multi_gpu, zero1, zero2, zero3, fsdp1, fsdp2)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="launch N processes under `accelerate launch` (overrides the config's num_processes; without a config, N "
        "data-parallel processes: ACCELERATE_USE_CPU=1 on a machine without GPUs)",
    )
    from trl_rewardweighted.methods import DEPRECATED_NAMES
    from trl_rewardweighted.scripts.train import LAUNCH_METHODS

    # A deprecated name (`ra_dpo`) is accepted with a FutureWarning; the usage shows the public names only.
    parser.add_argument(
        "method",
        choices=[*LAUNCH_METHODS, *(old for old, new in DEPRECATED_NAMES.items() if new in LAUNCH_METHODS)],
        metavar="{" + ",".join(LAUNCH_METHODS) + "}",
    )
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="--config RECIPE and config overrides")


def _cmd_train(args) -> None:
    from trl_rewardweighted.launch import LaunchError, run_launched
    from trl_rewardweighted.scripts.train import launch_train_command, split_launch_options
    from trl_rewardweighted.scripts.train import main as train_main

    config, processes, script_args = split_launch_options(args.script_args, args.accelerate_config, args.num_processes)
    if config is None and processes is None:
        train_main(args.method, script_args)
        return
    try:
        run_launched(launch_train_command(args.method, script_args, config, processes))
    except LaunchError as err:  # the ranks have printed their errors above
        print(f"trl-rw train: error: {err}", file=sys.stderr)
        raise SystemExit(err.returncode) from None


def _check_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    from trl_rewardweighted.scripts.check_recipe import add_arguments

    add_arguments(parser)


def _cmd_check_recipe(args) -> None:
    from trl_rewardweighted.scripts.check_recipe import run

    if run(args.paths, args.method, args.fix, args.overwrite):
        raise SystemExit(1)


def _recipes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "copy", "path"])
    parser.add_argument("names", nargs="*", metavar="NAME", help="copy: NAME DIR; path: NAME")
    parser.add_argument(
        "--overwrite", action="store_true", help="copy: replace files that exist in DIR (default: refuse)"
    )


def _cmd_recipes(args) -> None:
    from trl_rewardweighted import launch, packaged

    expected = {"list": 0, "copy": 2, "path": 1}[args.action]
    if len(args.names) != expected:
        usage = {"list": "no NAME", "copy": "NAME DIR", "path": "one NAME"}[args.action]
        raise ValueError(f"recipes {args.action} takes {usage}, got {len(args.names)}: {' '.join(args.names)}")
    if args.action != "copy" and args.overwrite:
        raise ValueError(f"--overwrite has no effect with recipes {args.action}.")
    if args.action == "copy":
        name, dest = args.names
        for path in packaged.copy_recipe(name, dest, overwrite=args.overwrite):
            print(path)
    elif args.action == "path":
        (name,) = args.names
        configs = launch.accelerate_config_names()
        found = packaged.find_recipe(name)
        if name == launch.SLURM_SCRIPT:
            print(launch.slurm_script())
        elif Path(name).is_file() or found is not None:
            print(name if Path(name).is_file() else found)  # a file as it is: scripts pass a config path or name
        elif name in configs:
            print(configs[name])
        else:
            raise FileNotFoundError(
                f"recipes path {name}: no such file, and not a packaged recipe or folder (`trl-rw recipes list`), an "
                f"accelerate config ({', '.join(configs)}) or {launch.SLURM_SCRIPT}."
            )
    else:
        from trl_rewardweighted.scripts.check_recipe import method_from_path

        names = packaged.recipe_names()
        width = max(map(len, names)) + 2
        print("Recipes (trl-rw train METHOD --config NAME; trl-rw check-recipe NAME; trl-rw recipes copy NAME DIR):")
        for name in names:
            path = packaged.find_recipe(name)
            model = packaged.recipe_model(path) or "-"
            print(f"  {name:<{width}}{method_from_path(path):<22}{model}")
        print("Accelerate configs (trl-rw train ... --accelerate-config NAME, or a path):")
        for name, (package, _) in launch.accelerate_config_table().items():
            print(f"  {name:<{width}}{package}")
        print(f"SLURM script for several nodes: trl-rw recipes path {launch.SLURM_SCRIPT}")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", action="append", default=[], metavar="[NAME=]PATH", help="a model to evaluate (repeatable)"
    )
    parser.add_argument(
        "--goal-model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a reward-augmented DPO model: it answers goal-conditioned prompts, and the reference is also evaluated "
        "under the same goal prompt (repeatable)",
    )
    parser.add_argument("--reference", required=True, help="the reference model (usually the starting model)")
    parser.add_argument(
        "--prompts",
        required=True,
        help="prompt file (.txt, one per line) or dataset file / folder with a `prompt` column (strings or chat)",
    )
    parser.add_argument("--reward", required=True, help="reward model path / Hub id, or `module:function`")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--reference-column",
        default=None,
        help="a column of the prompt dataset with one reference response per prompt (e.g. `chosen`): adds a win rate "
        "against it",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N prompts only")
    parser.add_argument("--num-samples", type=int, default=4, help="sampled replies per prompt (default: 4)")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy replies")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default: 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="evaluate with sampling seeds --seed, --seed+1, ... (each in <output-dir>/seed_<s>) and pool the paired "
        "differences with a bootstrap over seeds and prompts into pooled.md / pooled.json (default: 1)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--goal-score", type=float, default=10.0, help="goal of --goal-model models (default: 10)")
    parser.add_argument("--goal-template", default=None, help="goal text template used at training")
    parser.add_argument("--tie-tolerance", type=float, default=0.0)
    _add_backend_arg(
        parser,
        "generation backend (default: auto: vLLM if installed and a GPU is visible); rewards and log-probs are "
        "computed with transformers",
    )
    _add_run_args(parser, rows="prompts", chunk_size=64, work_dir="<output-dir>/.parts")


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
    from dataclasses import replace

    from trl_rewardweighted.data.convert import read_prompts
    from trl_rewardweighted.data.utils import completion_text
    from trl_rewardweighted.evaluation import (
        EvalConfig,
        ModelSpec,
        evaluate_models,
        pool_results,
        summary_line,
        write_pooled_report,
        write_report,
    )
    from trl_rewardweighted.model_utils import check_model_source
    from trl_rewardweighted.pipeline import check_parent_folders, refuse_unused
    from trl_rewardweighted.sampling import resolve_backend
    from trl_rewardweighted.shards import remove_work_dir

    specs = [ModelSpec(n, p) for n, p in _named_models(args.model, "--model")]
    specs += [ModelSpec(n, p, goal_conditioned=True) for n, p in _named_models(args.goal_model, "--goal-model")]
    if not specs:
        raise ValueError("Give at least one --model or --goal-model to evaluate.")
    if not args.goal_model:
        refuse_unused(_given(args, "goal_score", "goal_template"), "without --goal-model")
    if resolve_backend(args.backend, args.reference) != "vllm":
        refuse_unused(_given(args, "tensor_parallel_size", "vllm_kwargs"), "with the transformers backend")
    out = Path(args.output_dir)
    check_parent_folders(out / "eval.json", "--output-dir")
    if args.work_dir:
        check_parent_folders(args.work_dir, "--work-dir")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}.")
    report = out / ("eval.json" if args.seeds == 1 else "pooled.json")
    if report.exists() and not args.overwrite:
        raise FileExistsError(f"{report} exists; pass --overwrite to replace it.")
    for spec in specs:
        check_model_source(spec.model, "--goal-model" if spec.goal_conditioned else "--model")
    check_model_source(args.reference, "--reference")
    check_model_source(args.reward, "--reward")
    ds = read_prompts(args.prompts)
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
    names = ("num_samples", "max_new_tokens", "temperature", "top_p", "seed", "batch_size", "goal_score")
    names += ("goal_template", "tie_tolerance", "chunk_size", "backend", "tensor_parallel_size")
    config = EvalConfig(
        **_values(args, *names),
        greedy=not args.no_greedy,
        progress=not args.no_progress,
        vllm_kwargs=_vllm_kwargs(args),
    )
    work_dir = Path(args.work_dir) if args.work_dir else out / ".parts"
    # --seeds N: one evaluation per sampling seed (`seed_<s>/`, each resumable by chunk in the work folder), pooled.
    seeds = [args.seed + k for k in range(args.seeds)]
    runs = []
    for seed in seeds:
        several = len(seeds) > 1
        results = evaluate_models(
            specs,
            args.reference,
            list(ds["prompt"]),
            args.reward,
            replace(config, seed=seed),
            reference_responses=references,
            work_dir=work_dir / f"seed_{seed}" if several else work_dir,
            restart=args.restart,
            log=lambda line: print(f"trl-rw eval: {line}", file=sys.stderr),
        )
        if results is None:  # not the main process
            continue
        paths = write_report(results, out / f"seed_{seed}" if several else out)
        runs.append(results)
        print(f"seed {seed}: {summary_line(results)}" if several else (out / "eval.md").read_text())
    if not runs:
        return
    if len(seeds) > 1:
        paths = write_pooled_report(pool_results(runs, seeds), out)
        print((out / "pooled.md").read_text())
    else:
        print(summary_line(runs[0]))
    remove_work_dir(work_dir)
    print("written: " + ", ".join(paths.values()))


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    from trl_rewardweighted.compare import add_arguments

    add_arguments(parser)


# The options of `compare` and `iterate` that only some methods use (every other option is used by every method).
_COMPARE_METHOD_OPTIONS = {
    "beta_var": ("var", "var_step", "online_var"),
    "beta_dpo": ("dpo", "reward_augmented_dpo", "reward_augmented_dpo_twins"),
    "gamma": ("vcb",),
    "reward_range": ("reward_augmented_dpo", "reward_augmented_dpo_twins"),
}
_ITERATE_METHOD_OPTIONS = {
    "beta": ("var",),
    "beta_dpo": ("dpo", "reward_augmented_dpo"),
    "gamma": ("vcb",),
    "reward_range": ("reward_augmented_dpo",),
    "goal_score": ("reward_augmented_dpo",),
    "max_length": ("var", "vcb", "dpo", "sft"),
    "update_reference": ("var", "vcb", "dpo", "reward_augmented_dpo"),
}


def _check_methods_and_models(args, methods: list[str], table: dict, option: str, model: str, reward: str) -> None:
    """The checks of `compare` and `iterate` before they start: refuse the options given that none of `methods` uses
    (`table`: option -> the methods that use it), then check the starting model and the reward model."""
    from trl_rewardweighted.model_utils import check_model_source
    from trl_rewardweighted.pipeline import refuse_unused
    from trl_rewardweighted.quickstart import BUILTIN_MODELS

    unused = [dest for dest, users in table.items() if not set(methods) & set(users)]
    refuse_unused(_given(args, *unused), f"with {option} {','.join(methods)}")
    check_model_source(model, "--model", builtin=BUILTIN_MODELS)
    check_model_source(reward, "--reward")


def _cmd_compare(args) -> None:
    from trl_rewardweighted.compare import run_compare
    from trl_rewardweighted.methods import DEPRECATED_NAMES

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [DEPRECATED_NAMES.get(m, m) for m in methods]
    _check_methods_and_models(args, methods, _COMPARE_METHOD_OPTIONS, "--methods", args.model, args.reward)
    run_compare(args)


def _iterate_arguments(parser: argparse.ArgumentParser) -> None:
    from trl_rewardweighted.iterate import add_arguments

    add_arguments(parser)


def _cmd_iterate(args) -> None:
    from trl_rewardweighted.iterate import resolve_options, run_iterate

    opts = resolve_options(args)  # the recipe and the flags: the method may come from the recipe
    _check_methods_and_models(args, [opts.method], _ITERATE_METHOD_OPTIONS, "--method", opts.model, opts.reward)
    run_iterate(args)


# ----------------------------------------------------------------------------------------------------------------------
# The sampling commands (the work is done by trl_rewardweighted.pipeline)
# ----------------------------------------------------------------------------------------------------------------------


def _vllm_kwargs(args) -> dict | None:
    import json

    if args.vllm_kwargs is None:
        return None
    try:
        value = json.loads(args.vllm_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--vllm-kwargs is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--vllm-kwargs must be a JSON object, got {args.vllm_kwargs!r}.")
    return value


def _generation(args):
    """The generation settings of `generate` / `sample`, with the model path and the backend's options checked."""
    from trl_rewardweighted.model_utils import check_model_source
    from trl_rewardweighted.pipeline import GenerationSettings, refuse_unused
    from trl_rewardweighted.sampling import resolve_backend

    check_model_source(args.model, "--model")
    if resolve_backend(args.backend, args.model) == "vllm":
        # `sample` scores with --batch-size unless --score-batch-size is given
        if args.command == "generate" or "score_batch_size" in args.given:
            refuse_unused(_given(args, "batch_size"), "with vLLM, which batches the prompts itself")
    else:
        refuse_unused(_given(args, "tensor_parallel_size", "vllm_kwargs"), "with the transformers backend")
    names = ("model", "n", "temperature", "top_p", "max_new_tokens", "seed", "batch_size", "backend")
    names += ("system_prompt", "goal_score", "goal_template", "tensor_parallel_size")
    return GenerationSettings(**_values(args, *names), vllm_kwargs=_vllm_kwargs(args))


def _scoring(args, batch_size: int):
    """The scoring settings of `score` / `sample`, with the judges' paths and the options that need them checked."""
    from trl_rewardweighted.model_utils import check_model_source
    from trl_rewardweighted.pipeline import ScoringSettings, checked_judges, refuse_unused

    scoring = ScoringSettings(
        scorers=args.scorer, combine=args.combine or "mean", batch_size=batch_size, max_length=args.max_length
    )
    judges = checked_judges(scoring)
    kinds = [check_model_source(spec, "--scorer") for _, spec in judges]
    if len(judges) == 1:
        refuse_unused(_given(args, "combine"), "with one --scorer")
    if all(kind == "function" for kind in kinds):
        refuse_unused(_given(args, "max_length"), "without a reward model among the --scorer judges")
    return scoring


def _run_options(args) -> dict:
    """The options of a chunked run (see `_add_run_args`), as the `trl_rewardweighted.pipeline` runs take them."""
    return dict(**_values(args, "chunk_size", "work_dir", "restart", "overwrite"), progress=not args.no_progress)


def _cmd_generate(args) -> None:
    from trl_rewardweighted.pipeline import run_generate

    result = run_generate(args.prompts, args.output, _generation(args), **_run_options(args))
    if result is not None:  # the main process
        groups, path = result
        print(f"generate: wrote {len(groups)} prompts x {args.n} completions to {path}")


def _cmd_score(args) -> None:
    from trl_rewardweighted.pipeline import reward_summary, run_score

    result = run_score(args.input, args.output, _scoring(args, args.batch_size), **_run_options(args))
    if result is not None:
        ds, path = result
        print(f"score: wrote {len(ds)} rows to {path}; {reward_summary(ds)}")


def _cmd_sample(args) -> None:
    from trl_rewardweighted.pipeline import refuse_unused, reward_summary, run_sample

    outputs = {"groups": args.output_groups, "rows": args.output_rows, "pairs": args.output_pairs}
    if any(outputs.values()) and not args.output_pairs:
        refuse_unused(_given(args, "strategy", "ties"), "without --output-pairs")
    generation = _generation(args)
    scoring = _scoring(args, args.score_batch_size or args.batch_size)
    result = run_sample(
        args.prompts, outputs, generation, scoring, strategy=args.strategy, ties=args.ties, **_run_options(args)
    )
    if result is not None:
        groups, written = result
        shapes = "; ".join(f"{shape}: {len(ds)} rows -> {path}" for shape, ds, path in written)
        print(f"sample: {len(groups)} prompts x {args.n} completions, {reward_summary(groups)}; {shapes}")


def _cmd_convert(args) -> None:
    from trl_rewardweighted.pipeline import run_convert

    options = ("to", "adapter", "adapter_kwargs", "split", "strategy", "ties", "seed", "overwrite")
    out, shape, path, num_input = run_convert(args.input, args.output, **_values(args, *options))
    via = f" ({args.adapter})" if args.adapter else ""
    print(f"convert: wrote {len(out)} {shape}{via} to {path} (from {num_input} rows)")


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


class _Command(NamedTuple):
    """A subcommand: its line in `trl-rw --help`, its description in `trl-rw <command> --help`, the function that adds
    its arguments to its parser and the one that runs it."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


_COMMANDS = {
    "generate": _Command(
        "sample n completions per prompt",
        "Sample n completions per prompt and write a groups dataset (prompt, completions).",
        _generate_arguments,
        _cmd_generate,
    ),
    "score": _Command(
        "score the completions of a groups dataset",
        "Add a `rewards` column (one float per completion) to a groups dataset.",
        _score_arguments,
        _cmd_score,
    ),
    "convert": _Command(
        "convert between groups, rows and pairs",
        "Convert a groups or rows dataset into rows (VAR), groups (VCB) or pairs (DPO / RA-DPO), or re-save a dataset "
        "in another format (by the output suffix).",
        _convert_arguments,
        _cmd_convert,
    ),
    "sample": _Command(
        "generate + score + write groups / rows / pairs in one go",
        "Sample n completions per prompt, score them, and write one or more dataset shapes.",
        _sample_arguments,
        _cmd_sample,
    ),
    "train": _Command(
        "train with a recipe (same as `python -m trl_rewardweighted.scripts.<method>`)",
        "Train VAR, VCB, reward-augmented DPO or online VAR. Everything after the method is parsed by the method's "
        "launch script: `--config RECIPE` (a YAML file, or a packaged recipe by name: `trl-rw recipes list`) plus any "
        "config field as `--field value` (strict: unknown keys fail). With --accelerate-config and/or --num-processes "
        "(before or after the method) it starts `accelerate launch` itself, as `trl sft --accelerate_config` does; "
        "without them it trains in this process.",
        _train_arguments,
        _cmd_train,
    ),
    "check-recipe": _Command(
        "validate recipes without loading a model or data",
        "Parse each recipe strictly with its method's config, ModelConfig and script arguments (no model or data is "
        "loaded): renamed, misspelled and mistyped keys are reported, one message per problem. Exits 1 when any "
        "recipe has a problem. With --fix OUT, the recipe's renamed and removed keys are migrated and OUT written (or "
        "each key that needs a decision named, and nothing written).",
        _check_recipe_arguments,
        _cmd_check_recipe,
    ),
    "recipes": _Command(
        "list, copy or locate the packaged recipes and accelerate configs",
        "`list`: the packaged recipes by name (method, model) and the accelerate configs by name (this package's and "
        "TRL's). `copy NAME DIR`: copy a packaged recipe or folder, with the files it reads, under DIR at its path in "
        "the recipes folder (so that the copy runs from DIR). `path NAME`: print the file of a packaged recipe or "
        "folder, an accelerate config name, or launch.slurm.",
        _recipes_arguments,
        _cmd_recipes,
    ),
    "eval": _Command(
        "evaluate trained models against a reference: reward, win rate, KL, length, diversity",
        "Generate (sampled and greedy) replies of each model and of the reference on a prompt set, score them, and "
        "report mean reward with 95 %% bootstrap intervals, the paired difference and win / tie / loss rate against "
        "the reference, KL to the reference on the model's own samples, reward per nat, length, distinct-1/2, "
        "self-BLEU and the misalignment rate. Writes eval.json, eval.md and PNG plots. See docs/evaluation.md.",
        _eval_arguments,
        _cmd_eval,
    ),
    "compare": _Command(
        "train SFT, DPO, VAR, VCB, reward-augmented DPO, online VAR and GRPO with matched budgets and compare them",
        "Sample and score replies from a starting model, train every selected method on the same data (the online "
        "methods on replies they sample themselves) with matched budgets, evaluate each (trl-rw eval) on held-out "
        "prompts and write one table and plot. The default runs offline on CPU (SmolLM2-135M-Instruct, VADER reward). "
        "See docs/compare.md.",
        _compare_arguments,
        _cmd_compare,
    ),
    "iterate": _Command(
        "rounds of sample -> score -> train (VAR, VCB, reward-augmented DPO, DPO, SFT), resumable",
        "R rounds: sample n replies per prompt from the current policy, score them, train one offline trainer on them, "
        "and start the next round from the trained model. The reference stays the starting model unless "
        "--update-reference. Rerunning resumes after the last finished round. Options can come from a YAML recipe "
        "(--config; flags override). See docs/iterate.md.",
        _iterate_arguments,
        _cmd_iterate,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The `trl-rw` parser with all subcommands (each sets `func` to the function that runs it)."""
    from trl_rewardweighted import __version__

    parser = argparse.ArgumentParser(
        prog="trl-rw",
        description="trl-rewardweighted: sample and score completions, build rows / groups / pairs datasets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in _COMMANDS.items():
        subparser = subparsers.add_parser(name, help=command.help, description=command.description)
        command.add_arguments(subparser)
        subparser.set_defaults(func=command.run)
    return parser


def _given_options(parser: argparse.ArgumentParser, args, argv: list[str]) -> set[str]:
    """The options (their `dest`) given on the command line of `args.command`, whatever their values: the
    subcommand's arguments are parsed again with every default suppressed, so that an option given with its default
    value counts as given."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    actions = [a for a in sub._actions if a.dest != "help"]
    defaults = [a.default for a in actions]
    try:
        for action in actions:
            action.default = argparse.SUPPRESS
        given, _ = sub.parse_known_args(argv[argv.index(args.command) + 1 :])
    finally:
        for action, default in zip(actions, defaults):
            action.default = default
    return {a.dest for a in actions if hasattr(given, a.dest)}


def _given(args, *dests: str) -> list[str]:
    """The options among `dests` that the user gave, as flags (`"--batch-size"`)."""
    return ["--" + dest.replace("_", "-") for dest in dests if dest in args.given]


def _values(args, *dests: str) -> dict:
    """`{dest: value}` of the options among `dests`, handed on as they are."""
    return {dest: getattr(args, dest) for dest in dests}


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
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    args.given = _given_options(parser, args, argv)
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
