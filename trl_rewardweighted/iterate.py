"""`trl-rw iterate`: offline training in rounds. Each round samples `--n` replies per prompt from the current policy,
scores them, builds the method's data, trains the policy on it with one of the offline trainers, and hands the trained
model to the next round.

```bash
trl-rw iterate --method var --rounds 3                       # SmolLM2-135M-Instruct, VADER reward, offline, CPU
trl-rw iterate --config quickstart/iterate_var --rounds 4 --output-dir runs/var
```

Round `k` (1-based) of `--rounds`:

1. Sample `--n` replies per prompt from the policy of round `k - 1` (round 1: the starting model) with seed
   `--seed + k - 1`, and score them with `--reward`. Saved as `round_<k>/samples` (a groups dataset).
2. Build the method's data from the groups: VAR every reply with its reward; VCB the groups; DPO and reward-augmented
   DPO the best against the worst reply (ties dropped; reward-augmented DPO maps `--reward-range` to its 1-10 goals);
   SFT the best reply. Saved as `round_<k>/train_data`.
3. Train the policy of round `k - 1` on it for `--steps` optimizer steps (or `--epochs` epochs) against the
   reference: the starting model in every round, or with `--update-reference` the policy the round starts from.
   The model and tokenizer are saved as `round_<k>/model`, then `round_<k>/metrics.json` (reward statistics of the
   samples, training metrics, timings) is written last: a round with both is finished.

VAR's weight is `softmax(r / beta + log pi_ref(y|x) - log pi_sample(y|x))` over a batch, the paper's target
`pi_ref exp(r / beta)` reached from replies drawn from the sampling policy `pi_sample`: when the reference is the
sampler (round 1, or every round with `--update-reference`) the correction is 0 and `ref_weighting=False` is used;
otherwise the train data holds `ref_logps = reference_logps - sampler_logps` (both saved) and `ref_weighting=True`.

Rerunning the same command resumes: finished rounds are skipped and the next round starts from the last finished
round's model; samples of an unfinished round are reused. Any changed option other than `--rounds` is refused
(naming it); `--overwrite` starts over. After the last round the final model is sampled once more with the next
round's seed (`final_samples`) so that `iterate.json` shows the mean reward of every policy, start to end.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import hashlib
import json
import math
import shutil
import statistics
import time
import typing
from dataclasses import asdict, fields
from pathlib import Path

from .data.utils import dumps_json, remove_path, write_json
from .methods import DEPRECATED_NAMES
from .scripts.iterate_config import METHODS, IterateConfig, make_parser

__all__ = ["METHODS", "IterateConfig", "add_arguments", "make_parser", "resolve_options", "run_iterate", "main"]

# Options that may differ between a run and its resumption.
_NOT_FINGERPRINTED = ("rounds", "output_dir", "overwrite", "no_progress", "accelerate_config", "num_processes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `trl-rw iterate` options on `parser` (the `trl-rw` subcommand). Each is taken as given (every
    default is `None` here) and handed to [`resolve_options`], which parses the recipe and the flags with
    [`make_parser`]: a flag given on the command line wins over the recipe, which wins over the default."""
    parser.add_argument(
        "--config",
        default=None,
        help="YAML recipe whose keys are these options' names (underscores): a file, or a packaged recipe's name "
        "(quickstart/iterate_var; see `trl-rw recipes list`)",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the options (and the recipe), print them and exit"
    )
    hints = typing.get_type_hints(IterateConfig)
    for f in fields(IterateConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if hints[f.name] is bool:
            parser.add_argument(flag, action="store_const", const="true", default=None, help=help)
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            parser.add_argument(flag, default=None, metavar=f.name.upper(), help=help + shown)


def resolve_options(opts) -> IterateConfig:
    """The effective options of the parsed command line `opts` (see [`add_arguments`]): the recipe `opts.config` and
    the flags given, parsed by [`make_parser`]. An [`IterateConfig`] is returned as it is."""
    if isinstance(opts, IterateConfig):
        return opts
    argv = []
    for f in fields(IterateConfig):
        value = getattr(opts, f.name, None)
        if value is not None:
            argv += [f"--{f.name}", str(value)]
    parser = make_parser()

    def error(message):
        raise ValueError(message)

    parser.error = error  # one `ValueError` line instead of argparse's usage and exit
    config = getattr(opts, "config", None)
    if config is not None:
        from .packaged import resolve_recipe

        config = resolve_recipe(config)[0]  # a file, or a packaged recipe's name (`quickstart/iterate_var`)
        unknown = [k for k in _recipe_keys(config) if k not in {f.name for f in fields(IterateConfig)}]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), [f.name for f in fields(IterateConfig)], n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ValueError(
                f"{config}: unknown key `{unknown[0]}`: not an option of `trl-rw iterate`.{hint} The keys are the "
                "options' names with underscores (see `trl-rw iterate --help`)."
            )
        argv = ["--config", str(config), *argv]
    (options,) = parser.parse_args_and_config(argv, fail_with_unknown_args=True)
    return options


def _recipe_keys(path) -> list:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of `option: value`, got {type(data).__name__}.")
    return [k for k in data if k != "env"]


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def _round_dir(out: Path, k: int) -> Path:
    return out / f"round_{k}"


def _finished(out: Path, k: int) -> bool:
    d = _round_dir(out, k)
    return (d / "metrics.json").is_file() and (d / "model").is_dir()


def _fingerprint(opts: IterateConfig) -> dict:
    return {k: v for k, v in asdict(opts).items() if k not in _NOT_FINGERPRINTED}


def _load_prompts(opts, tokenizer) -> list:
    """The prompts, as message lists when the tokenizer has a chat template (so the trainers template them as the
    sampler did), else as strings."""
    from .data.convert import read_prompts
    from .data.utils import is_messages
    from .quickstart import PROMPTS_FILE

    path = Path(opts.prompts) if opts.prompts else PROMPTS_FILE
    prompts = list(read_prompts(path)["prompt"])
    limit = opts.num_prompts if opts.num_prompts is not None else (24 if not opts.prompts else None)
    prompts = prompts[:limit] if limit is not None else prompts
    if getattr(tokenizer, "chat_template", None):
        prompts = [p if is_messages(p) else [{"role": "user", "content": p}] for p in prompts]
    return prompts


def _prepare_output(out: Path, opts, prompts_hash: str) -> dict:
    """Create or resume `out`: returns the `iterate.json` state. A changed option is refused, naming it."""
    state_path = out / "iterate.json"
    rounds = sorted(out.glob("round_*")) if out.is_dir() else []
    if opts.overwrite:
        for path in [*rounds, out / "final_samples", out / "prompts.jsonl", state_path]:
            remove_path(path)
    elif state_path.exists():
        state = json.loads(state_path.read_text())
        before = dict(state.get("args", {}))
        if before.get("method") in DEPRECATED_NAMES:  # a run started under a deprecated method name
            before["method"] = DEPRECATED_NAMES[before["method"]]
        now = _fingerprint(opts)
        for name, value in now.items():
            if name == "training" and isinstance(value, dict) and isinstance(before.get(name), dict):
                for key in sorted(set(value) | set(before[name])):
                    if value.get(key) != before[name].get(key):
                        raise ValueError(
                            f"--training: `{key}` is {value.get(key)!r} but the run in {out} used "
                            f"{before[name].get(key)!r}: a resumed run must keep its options (only --rounds may "
                            "change). Pass --overwrite to start over, or use another --output-dir."
                        )
            if name in before and before[name] != value:
                raise ValueError(
                    f"--{name.replace('_', '-')} is {value!r} but the run in {out} used {before[name]!r}: a resumed run "
                    "must keep its options (only --rounds may change). Pass --overwrite to start over, or use "
                    "another --output-dir."
                )
        if state.get("prompts_sha256") not in (None, prompts_hash):
            raise ValueError(
                f"--prompts: the prompts differ from those of the run in {out} (same option, other content). Pass "
                "--overwrite to start over, or use another --output-dir."
            )
        return state
    elif rounds:
        raise FileExistsError(f"{out} holds {rounds[0].name} but no iterate.json; pass --overwrite to start over.")
    out.mkdir(parents=True, exist_ok=True)
    state = {"args": _fingerprint(opts), "prompts_sha256": prompts_hash, "rounds": []}
    write_json(state_path, state)
    return state


# ----------------------------------------------------------------------------------------------------------------------
# One round
# ----------------------------------------------------------------------------------------------------------------------


def _reward_stats(groups) -> dict:
    values = [float(r) for group in groups["rewards"] for r in group if r is not None]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"reward_mean": None, "reward_std": None, "num_completions": len(values), "num_nan": len(values)}
    return {
        "reward_mean": statistics.fmean(finite),
        "reward_std": statistics.pstdev(finite),
        "reward_min": min(finite),
        "reward_max": max(finite),
        "num_completions": len(values),
        "num_nan": len(values) - len(finite),
    }


def _sample(policy: str, prompts_file: Path, opts, output: Path, seed: int, goal: bool):
    """Sample and score `--n` replies per prompt from `policy` (under the goal prompt when `goal`) with the sampling
    pipeline of `trl-rw sample`, into `output`; launched as `trl-rw sample` with `--accelerate-config` /
    `--num-processes`. Returns the scored groups."""

    from .pipeline import GenerationSettings, ScoringSettings, sample_groups

    generation = GenerationSettings(
        model=policy,
        n=opts.n,
        temperature=opts.temperature,
        top_p=opts.top_p,
        max_new_tokens=opts.max_new_tokens,
        seed=seed,
        batch_size=opts.gen_batch_size,
        backend=opts.backend,
        goal_score=opts.goal_score if goal else None,
    )
    scoring = ScoringSettings(scorers=[opts.reward], batch_size=16)
    return sample_groups(
        prompts_file,
        output,
        generation,
        scoring,
        chunk_size=opts.chunk_size,
        progress=not opts.no_progress,
        accelerate_config=opts.accelerate_config,
        num_processes=opts.num_processes,
    )


def _completion_logps(model_path: str, groups) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import completion_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    values = completion_logps(model, tokenizer, list(groups["prompt"]), list(groups["completions"]))
    del model
    return values


def build_train_data(method: str, groups, sampler: str, reference: str):
    """The method's training dataset from one round's scored groups (`prompt`, `completions`, `rewards`).

    VAR rows get `reference_logps` and `sampler_logps` (summed reply log-probs under the reference and the sampling
    policy) and `ref_logps`, their difference, when the two models differ; see the module docstring.
    """
    from datasets import Dataset

    from .data.convert import groups_to_pairs, groups_to_rows
    from .data.utils import is_messages

    groups = groups.select_columns(["prompt", "completions", "rewards"])
    if method == "vcb":
        return groups
    if method == "var":
        rows = groups_to_rows(groups)
        if reference != sampler:
            ref = [v for group in _completion_logps(reference, groups) for v in group]
            own = [v for group in _completion_logps(sampler, groups) for v in group]
            rows = rows.add_column("reference_logps", ref).add_column("sampler_logps", own)
            rows = rows.add_column("ref_logps", [a - b for a, b in zip(ref, own)])
        return rows
    if method == "sft":
        chat = is_messages(groups["prompt"][0])
        completions = []
        for replies, rewards in zip(groups["completions"], groups["rewards"]):
            best = max(range(len(rewards)), key=lambda j: rewards[j] if math.isfinite(rewards[j]) else -math.inf)
            completions.append([{"role": "assistant", "content": replies[best]}] if chat else replies[best])
        return Dataset.from_dict({"prompt": list(groups["prompt"]), "completion": completions})
    pairs = groups_to_pairs(groups, strategy="best_worst", ties="drop")
    if len(pairs) == 0:
        raise ValueError(
            "Every prompt's replies got equal rewards this round: no best-against-worst pair to train on. Raise --n "
            "or --temperature, or use a finer-grained reward."
        )
    scored = method == "reward_augmented_dpo"
    keep = ["prompt", "chosen", "rejected"] + (["score_chosen", "score_rejected"] if scored else [])
    return pairs.select_columns(keep)


def _settings(method: str, opts: IterateConfig, same: bool) -> dict:
    """The method's own settings in a round (on top of the shared ones and the `cpu-demo` preset)."""
    return {
        # One normaliser per prompt over its `--n` replies (z_scope="prompt"): the 3-seed comparison of
        # docs/compare.md found it at least as good as the paper's step normaliser on such groups.
        "var": dict(beta=opts.beta, ref_weighting=not same, max_length=opts.max_length, z_scope="prompt"),
        "vcb": dict(gamma=opts.gamma, max_length=opts.max_length, precompute_ref_log_probs=True),
        "reward_augmented_dpo": dict(beta=opts.beta_dpo, max_length=None, score_range=opts.reward_range),
        "dpo": dict(beta=opts.beta_dpo, max_length=opts.max_length),
        "sft": dict(max_length=opts.max_length),
    }[method]


def training_recipe(opts: IterateConfig, out: Path, seed: int, same: bool) -> tuple[dict, int]:
    """The method's training recipe in a round (see [`~trl_rewardweighted.methods.method_recipe`]): the `cpu-demo`
    preset (or the training settings' own), the round's settings, the training settings (`--training`), and the
    budget: `--steps` (or `--epochs`) of `--batch-size` completions per step, split over `gradient_accumulation_steps`
    and the training processes. Returns `(recipe, rows per step)`."""
    from .methods import METHODS as METHOD_TABLE
    from .methods import launch_processes, method_recipe, parse_training_settings, read_training_block

    method = opts.method
    block = read_training_block(opts.training, option="--training")
    rows = METHOD_TABLE[method].rows_per_step(opts.batch_size, opts.n)
    budget = {"max_steps": opts.steps} if opts.steps is not None else {"num_train_epochs": opts.epochs}
    defaults = dict(gradient_accumulation_steps=1, disable_tqdm=opts.no_progress)
    forced = dict(learning_rate=opts.learning_rate, seed=seed, **budget, **_settings(method, opts, same))
    trainer_dir = out / "trainer_output"
    recipe = method_recipe(block, method, method, trainer_dir, defaults, forced)
    accumulation = parse_training_settings(method, recipe, deepspeed=False)[0].gradient_accumulation_steps
    processes = launch_processes(opts.accelerate_config, opts.num_processes)
    per_device, rest = divmod(rows, accumulation * processes)
    if rest or per_device < 1:
        raise ValueError(
            f"{method}: a step of {rows} rows (--batch-size {opts.batch_size}) does not split into "
            f"gradient_accumulation_steps {accumulation} x {processes} process(es); make --batch-size a multiple of "
            "their product times the sequences of one row."
        )
    forced["per_device_train_batch_size"] = per_device
    return method_recipe(block, method, method, trainer_dir, defaults, forced), rows


def check_training(opts: IterateConfig) -> None:
    """Check the training settings of every round before anything runs: parsed with `TrlParser` into the method's
    config and `ModelConfig`, the budget's split, QLoRA without a GPU, VAR's normaliser."""
    from .methods import check_batch_layout, check_training_settings, launch_processes, parse_training_settings

    for same in {True, opts.update_reference}:  # round 1 trains against its sampler; later rounds may not
        recipe, _ = training_recipe(opts, Path(opts.output_dir), opts.seed, same)
        args, model_config = parse_training_settings(opts.method, recipe, deepspeed=False)
        check_training_settings(opts.method, args, model_config)
        processes = launch_processes(opts.accelerate_config, opts.num_processes)
        check_batch_layout(opts.method, args, processes, group_size=opts.n)


def _train(method: str, policy: str, reference: str, data, opts, seed: int, out: Path) -> dict:
    """Train `policy` on `data` against `reference` as a training phase (in this process, or launched): the model and
    tokenizer go to `out / "model"` (with PEFT: the adapter to `out / "adapter"` and the merged model to
    `out / "model"`, the next round's start)."""
    from .methods import parse_training_settings
    from .scripts.train_phase import train, write_phase

    same = reference == policy
    recipe, batch_size = training_recipe(opts, out, seed, same)
    peft = parse_training_settings(method, recipe, deepspeed=False)[1].use_peft
    columns = None
    if method == "var":  # VAR's reference enters through the `ref_logps` column (module docstring)
        columns = ["prompt", "completion", "reward"] + ([] if same else ["ref_logps"])
    phase = write_phase(
        out / "train_phase.json",
        method=method,
        name=method,
        model=policy,
        data=str(out / "train_data"),
        columns=columns,
        recipe=recipe,
        ref_model=reference if method in ("vcb", "reward_augmented_dpo", "dpo") else None,
        output=str(out / ("adapter" if peft else "model")),
        merged=str(out / "model") if peft else None,
        result=str(out / "train_result.json"),
    )
    metrics = train(phase, opts.accelerate_config, opts.num_processes)
    metrics = {**metrics, "batch_size": batch_size, "train_rows": len(data)}
    if method == "var":
        metrics["ref_weighting"] = not same
    gc.collect()
    return metrics


def _run_round(k: int, policy: str, initial: str, prompts: list, opts, out: Path) -> dict:
    """Round `k`: sample from `policy`, score, build the data, train; returns the round's metrics."""
    from .data.convert import load_dataset_any, save_dataset

    d = _round_dir(out, k)
    d.mkdir(parents=True, exist_ok=True)
    stale_files = ("model", "adapter", ".model.tmp", ".adapter.tmp", "trainer_output", "train_phase.json")
    for stale in ("train_data", "metrics.json", "train_result.json", *stale_files):
        remove_path(d / stale)
    t0, seed = time.time(), opts.seed + k - 1
    reference = policy if opts.update_reference else initial
    timings = {}
    if (d / "samples").is_dir():
        print(f"[iterate] round {k}: reusing the samples saved by an interrupted run ({d / 'samples'})")
        groups = load_dataset_any(d / "samples")
    else:
        goal = opts.method == "reward_augmented_dpo" and k > 1 and opts.goal_score is not None
        print(
            f"[iterate] round {k}: sampling {opts.n} replies x {len(prompts)} prompts from {policy} (seed {seed}"
            + (f", goal {opts.goal_score}" if goal else "")
            + ") and scoring"
        )
        groups = _sample(policy, out / "prompts.jsonl", opts, d / "samples", seed, goal)
    timings["sample_and_score"] = round(time.time() - t0, 1)
    stats = _reward_stats(groups)
    print(f"[iterate] round {k}: mean reward {_fmt(stats['reward_mean'])} (std {_fmt(stats['reward_std'])})")

    start = time.time()
    data = build_train_data(opts.method, groups, policy, reference)
    save_dataset(data, d / "train_data")
    timings["build_data"] = round(time.time() - start, 1)
    print(f"[iterate] round {k}: training {opts.method} on {len(data)} rows (reference: {reference})")
    train = _train(opts.method, policy, reference, data, opts, seed, d)
    timings["train"] = train["seconds"]
    timings["total"] = round(time.time() - t0, 1)
    metrics = {
        "round": k,
        "method": opts.method,
        "policy": policy,
        "reference": reference,
        "sample_seed": seed,
        **stats,
        "num_prompts": len(groups),
        "train": train,
        "seconds": timings,
    }
    if opts.method == "var" and "ref_logps" in data.column_names:
        ratios = [float(v) for v in data["ref_logps"]]
        metrics["var_log_ratio"] = {"mean": statistics.fmean(ratios), "max_abs": max(abs(v) for v in ratios)}
    write_json(d / "metrics.json", metrics)  # last: the round is finished
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _summary_row(metrics: dict) -> dict:
    train = metrics.get("train", {})
    return {
        "round": metrics["round"],
        "reward_mean": metrics.get("reward_mean"),
        "reward_std": metrics.get("reward_std"),
        "steps": train.get("steps"),
        "first_loss": train.get("first_loss"),
        "last_loss": train.get("last_loss"),
        "seconds": metrics.get("seconds", {}).get("total"),
    }


def run_iterate(opts) -> dict:
    """Run the rounds described in the module docstring with `opts`: an [`IterateConfig`], or the parsed command line
    (see [`add_arguments`]; `opts.check` only validates and prints the options). Returns the `iterate.json` summary."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from .data.convert import save_dataset
    from .quickstart import resolve_model

    check = bool(getattr(opts, "check", False))
    opts = resolve_options(opts)
    check_training(opts)  # every training setting, before anything runs
    if check:
        print(dumps_json(asdict(opts)))
        return {"args": _fingerprint(opts)}
    out = Path(opts.output_dir)
    initial = resolve_model(opts.model, out)
    prompts = _load_prompts(opts, AutoTokenizer.from_pretrained(initial))
    prompts_hash = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    state = _prepare_output(out, opts, prompts_hash)
    save_dataset(Dataset.from_dict({"prompt": prompts}), out / "prompts.jsonl")  # what the sampling phases read
    t0 = time.time()
    policy, rows = initial, []
    for k in range(1, opts.rounds + 1):
        d = _round_dir(out, k)
        if _finished(out, k):
            metrics = json.loads((d / "metrics.json").read_text())
            print(f"[iterate] round {k}/{opts.rounds}: finished in an earlier run, skipped ({d / 'model'})")
        else:
            print(f"[iterate] round {k}/{opts.rounds}")
            metrics = _run_round(k, policy, initial, prompts, opts, out)
        policy = str(d / "model")
        rows.append({**_summary_row(metrics), "model": policy})
        state["rounds"] = rows
        write_json(out / "iterate.json", state)

    seed = opts.seed + opts.rounds
    done = state.get("final", {})
    if done.get("model") == policy and (out / "final_samples").is_dir():
        print(f"[iterate] final samples of {policy}: done in an earlier run, skipped")
    else:
        goal = opts.method == "reward_augmented_dpo" and opts.goal_score is not None
        print(
            f"[iterate] sampling the final model {policy} (seed {seed}"
            + (f", goal {opts.goal_score})" if goal else ")")
        )
        start = time.time()
        shutil.rmtree(out / "final_samples", ignore_errors=True)  # of an earlier final model
        final = _sample(policy, out / "prompts.jsonl", opts, out / "final_samples", seed, goal)
        state["final"] = {
            "after_round": opts.rounds,
            "model": policy,
            "sample_seed": seed,
            **_reward_stats(final),
            "seconds": round(time.time() - start, 1),
        }
    state["seconds_this_run"] = round(time.time() - t0, 1)
    write_json(out / "iterate.json", state)

    print("\n| policy | sampled in | mean reward | std | train steps | last loss | seconds |")
    print("|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        source = "start" if i == 0 else f"after round {i}"
        loss = "–" if row["last_loss"] is None else f"{row['last_loss']:.4f}"
        print(
            f"| {source} | round {row['round']} | {_fmt(row['reward_mean'])} | {_fmt(row['reward_std'])} | "
            f"{row['steps']} | {loss} | {row['seconds']} |"
        )
    f = state["final"]
    print(
        f"| after round {opts.rounds} | final_samples | {_fmt(f['reward_mean'])} | {_fmt(f['reward_std'])} | – | – "
        f"| {f['seconds']} |"
    )
    print(f"\n[iterate] {out / 'iterate.json'} ({state['seconds_this_run']} s this run)")
    return state


def main(argv: list[str] | None = None) -> dict:
    """`python -m trl_rewardweighted.iterate ...` (the same options as `trl-rw iterate`)."""
    parser = argparse.ArgumentParser(prog="trl-rw iterate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_iterate(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main()
