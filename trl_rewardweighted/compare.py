"""`trl-rw compare`: train SFT, DPO, VAR, VCB and reward-augmented DPO from the same starting model on the same
sampled-and-scored data, and online VAR and TRL's GRPO on completions they sample themselves, with matched budgets;
evaluate each on held-out prompts and write one comparison.

1. Sample `--candidates` replies per training prompt from the starting model and score them (the quickstart setup by
   default: SmolLM2-135M-Instruct, VADER positivity, the packaged prompts; fully offline), with the sampling pipeline
   of `trl-rw sample` ([`~trl_rewardweighted.pipeline.run_sample`]): chunks of `--chunk-size` prompts, resumable.
2. Build each method's data from the same groups: SFT on the best reply per prompt; DPO on best vs worst; VAR on every
   reply with its reward (`ref_weighting=False`: the replies were sampled from the reference), `var` with one
   normaliser per prompt (`z_scope="prompt"`: the softmax over each prompt's replies), `var_step` with the paper's
   normaliser over the optimizer step (`z_scope="step"`); VCB on the groups;
   reward-augmented DPO on best vs worst with the rewards mapped to the 1-10 goal scale (with and without
   `keep_twins_together` when `reward_augmented_dpo_twins` is selected).
3. Train each for the same number of optimizer steps, each step seeing the same number of sequences (a DPO pair
   counts 2, a VCB group `n`, split over `gradient_accumulation_steps` and the training processes); learning rate,
   seed and schedule are shared unless the training settings give a method its own. The online methods (`online_var`,
   `grpo`) sample `--candidates` replies per training prompt from the *current* policy at every step and score them
   with the same reward: with the defaults they generate as many replies in total as the offline methods' sampling
   phase (steps x sequences per step = training prompts x candidates).
4. Evaluate every model and the reference with [`~evaluation.evaluate_models`] (same prompts, same sampling seed:
   paired), and write `compare.md` (the table, the budgets, the pairwise paired differences), `compare.json`, and
   the plots of `trl-rw eval`.

The training settings are a recipe ([`~trl_rewardweighted.methods.TrainingBlock`]): `--config FILE` (top-level keys
shared by every method, `methods: {NAME: {...}}` per method, `preset:`), `--set KEY=VALUE` / `--set NAME.KEY=VALUE` over
it, parsed by `TrlParser` into each method's config and TRL's `ModelConfig` (bf16, `dtype`, LoRA / QLoRA, activation
checkpointing, `max_length`, accumulation, learning rate and schedule, `deepspeed`, `report_to`, ...); without them the
`cpu-demo` preset. Everything is checked before the first sample is drawn.

With `--accelerate-config NAME|PATH` and / or `--num-processes N`, each phase runs as its own `accelerate launch`
subprocess: sampling (`trl-rw sample`) and evaluation (`trl-rw eval`) split their chunks over the processes, each
method trains data-parallel ([`~trl_rewardweighted.scripts.train_phase`]). Each finished phase is recorded in
`--output-dir` (`run.json`, the sampled groups, `phases/train_<method>.result.json`, `eval/eval.json`): rerunning the
same command resumes after the last finished phase, and a changed setting is refused, naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from .data.utils import remove_path, write_json
from .evaluation import (
    REFERENCE,
    EvalConfig,
    ModelSpec,
    evaluate_models,
    markdown_table,
    pairwise_table,
    pool_results,
    pooled_markdown_table,
    write_pooled_report,
    write_report,
)
from .methods import (
    DEPRECATED_NAMES,
    check_batch_layout,
    check_block_keys,
    check_training_settings,
    launch_processes,
    method_recipe,
    parse_training_settings,
    read_training_block,
    resolve_method_name,
)
from .methods import METHODS as METHOD_TABLE

__all__ = [
    "METHODS",
    "run_seeds",
    "OWNED_SETTINGS",
    "add_arguments",
    "run_compare",
    "build_method_data",
    "plan_training",
]

# The methods of the table (`trl_rewardweighted.methods.METHODS`) plus one variant: reward-augmented DPO with
# `keep_twins_together=True`.
VARIANTS = {"reward_augmented_dpo_twins": "reward_augmented_dpo", "var_step": "var"}
METHODS = (
    "sft", "dpo", "var", "var_step", "vcb", "reward_augmented_dpo", "reward_augmented_dpo_twins", "online_var", "grpo"
)  # fmt: skip
DEFAULT_METHODS = "sft,dpo,var,var_step,vcb,reward_augmented_dpo,online_var,grpo"
GOAL_CONDITIONED = ("reward_augmented_dpo", "reward_augmented_dpo_twins")
DEFAULT_REWARD = "trl_rewardweighted.rewards:vader_positivity"

# Training settings that compare sets itself (the matched budgets, the data): refused in --config / --set, naming the
# option that sets them.
OWNED_SETTINGS = {
    "output_dir": "--output-dir",
    "max_steps": "--steps",
    "num_train_epochs": "--steps",
    "per_device_train_batch_size": "--sequences-per-step (split over gradient_accumulation_steps and the processes)",
    "model_name_or_path": "--model",
    "num_generations": "--candidates",
    "max_completion_length": "--max-new-tokens",
    "ref_weighting": "compare (its replies are sampled from the starting model: false)",
    "score_range": "--reward-range",
    "keep_twins_together": "the method name (reward_augmented_dpo_twins)",
}
# Options that may change between a run and its resumption (the training settings are compared method by method).
_NOT_FINGERPRINTED = ("output_dir", "overwrite", "no_progress", "methods", "config", "set", "accelerate_config")
_NOT_FINGERPRINTED += ("num_processes", "seeds")
# Files and folders of a comparison in --output-dir (removed by --overwrite).
_RUN_FILES = ("run.json", "compare.json", "compare.md", "prompts_train.jsonl", "prompts_eval.jsonl")
_RUN_FILES += ("train_groups.jsonl", "train_groups.jsonl.parts", "data", "phases", "models", "eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (default, offline), 'tiny', or a model path")
    p.add_argument("--reward", default=DEFAULT_REWARD, help="reward model path or `module:function` (default: VADER)")
    p.add_argument(
        "--reward-range",
        default="-1,1",
        help="the reward's range 'lo,hi', mapped to the 1-10 goal scale of reward-augmented DPO (default: -1,1, "
        "VADER); 'auto' uses the training data's min and max",
    )
    p.add_argument("--prompts", default=None, help="prompt file (default: the packaged quickstart prompts)")
    p.add_argument("--output-dir", default="compare_output")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--num-train-prompts", type=int, default=24)
    p.add_argument("--num-eval-prompts", type=int, default=16)
    p.add_argument("--candidates", type=int, default=4, help="sampled replies per training prompt (default: 4)")
    p.add_argument("--eval-samples", type=int, default=4, help="sampled replies per held-out prompt (default: 4)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument(
        "--backend",
        choices=["transformers", "vllm", "auto"],
        default="transformers",
        help="generation backend of the sampling and evaluation phases (default: transformers; 'auto': vLLM when "
        "usable)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=64,
        help="training prompts per chunk of the sampling phase: the unit split over processes and resumed (default: "
        "64). The samples depend on it, not on the number of processes",
    )
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per method (default: 12)")
    p.add_argument(
        "--sequences-per-step",
        type=int,
        default=8,
        help="completions seen per optimizer step by every method (a multiple of 4 and of --candidates; default 8)",
    )
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--beta-var", type=float, default=0.2, help="VAR temperature (VADER rewards lie in [-1, 1])")
    p.add_argument("--beta-dpo", type=float, default=0.1, help="DPO and reward-augmented DPO beta")
    p.add_argument("--gamma", type=float, default=0.05, help="VCB gamma")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat the whole comparison (sampling, training, evaluation) with seeds --seed, --seed+1, ... each in "
        "<output-dir>/seed_<s>, and pool the paired differences with a bootstrap over seeds and prompts (default: 1)",
    )
    group = p.add_argument_group("training settings (a recipe) and processes")
    group.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="training settings: keys of the methods' configs and of TRL's ModelConfig (bf16, use_peft, lora_r, "
        "activation_checkpointing, gradient_accumulation_steps, lr_scheduler_type, deepspeed, ...) shared by every "
        "method, `methods: {NAME: {...}}` per method, `preset: cpu-demo|gpu-bf16|none` (default: cpu-demo). The "
        "flags --learning-rate, --seed, --beta-var, --beta-dpo and --gamma, when given, win over it. See "
        "docs/compare.md",
    )
    group.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="[NAME.]KEY=VALUE",
        help="a training setting over --config, for every method or for the method NAME (repeatable)",
    )
    group.add_argument(
        "--accelerate-config",
        default=None,
        metavar="NAME|PATH",
        help="run each phase as an `accelerate launch` with this config: a path, or a name (this package's, then "
        "TRL's: multi_gpu, zero3, ...)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes of each launched phase (overrides the accelerate config's; without one, data-parallel)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing comparison in --output-dir")


def build_method_data(groups, reward_range: str = "-1,1") -> dict:
    """Each method's training dataset from one scored groups dataset (`prompt`, `completions`, `rewards`)."""
    from datasets import Dataset

    from .data.convert import groups_to_pairs, groups_to_rows

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    prompts, completions, rewards = groups["prompt"], groups["completions"], groups["rewards"]
    best = [max(range(len(r)), key=lambda j, r=r: r[j]) for r in rewards]
    sft = Dataset.from_dict(
        {"prompt": list(prompts), "completion": [assistant(c[b]) for c, b in zip(completions, best)]}
    )
    pairs = groups_to_pairs(groups, strategy="best_worst", ties="drop")
    dpo = pairs.select_columns(["prompt", "chosen", "rejected"])
    ra = pairs.select_columns(["prompt", "chosen", "rejected", "score_chosen", "score_rejected"])
    return {
        "sft": sft,
        "dpo": dpo,
        "var": groups_to_rows(groups),
        "var_step": groups_to_rows(groups),
        "vcb": groups.select_columns(["prompt", "completions", "rewards"]),
        "reward_augmented_dpo": ra,
        "reward_augmented_dpo_twins": ra,
        # The online methods sample their own replies: they get the training prompts only.
        "online_var": groups.select_columns(["prompt"]),
        "grpo": groups.select_columns(["prompt"]),
        "_reward_range": reward_range,
    }


def _batch_sizes(sequences: int, candidates: int) -> dict[str, int]:
    """Rows per optimizer step of each method for `sequences` sequences per step (a DPO pair counts 2, a VCB group
    `candidates`; the online methods' rows are completions, generated by the policy itself)."""
    if sequences % 4 or sequences % candidates:
        raise ValueError(
            f"--sequences-per-step {sequences} must be a multiple of 4 (a reward-augmented DPO step holds whole twin "
            f"pairs of 2 sequences each) and of --candidates {candidates} (a VCB group)."
        )
    return {m: METHOD_TABLE[VARIANTS.get(m, m)].rows_per_step(sequences, candidates) for m in METHODS}


def _settings(method: str, opts) -> dict:
    """The method's own settings in a comparison (over the preset, under the training settings)."""
    if method in ("online_var", "grpo"):
        online = dict(num_generations=opts.candidates, max_completion_length=opts.max_new_tokens)
        return {**online, "beta": opts.beta_var} if method == "online_var" else online
    return {
        "sft": dict(max_length=256),
        "dpo": dict(beta=opts.beta_dpo, max_length=256),
        # VAR with one normaliser per prompt (its `candidates` replies, kept in one step) and with the paper's
        # normaliser over the whole step.
        "var": dict(beta=opts.beta_var, ref_weighting=False, max_length=256, z_scope="prompt"),
        "var_step": dict(beta=opts.beta_var, ref_weighting=False, max_length=256, z_scope="step"),
        "vcb": dict(gamma=opts.gamma, max_length=256, precompute_ref_log_probs=True),
        "reward_augmented_dpo": dict(beta=opts.beta_dpo, max_length=None, score_range=opts.reward_range),
        "reward_augmented_dpo_twins": dict(
            beta=opts.beta_dpo, max_length=None, score_range=opts.reward_range, keep_twins_together=True
        ),
    }[method]


def _given_flags(method: str, opts) -> dict:
    """The settings of compare's own flags that were given on the command line: they win over --config."""
    given = getattr(opts, "given", set())
    flags = {"learning_rate": "learning_rate", "seed": "seed"}
    if method in ("var", "var_step", "online_var"):
        flags["beta"] = "beta_var"
    elif method in ("dpo", *GOAL_CONDITIONED):
        flags["beta"] = "beta_dpo"
    elif method == "vcb":
        flags["gamma"] = "gamma"
    return {key: getattr(opts, dest) for key, dest in flags.items() if dest in given}


def plan_training(opts, methods: list[str], out: Path) -> dict[str, dict]:
    """Each method's training recipe, checked before anything runs: the training settings (`opts.config`,
    `opts.set`) parsed with `TrlParser` into the method's config and `ModelConfig`, the matched budget split over
    `gradient_accumulation_steps` and the training processes, QLoRA without a GPU and VAR's normaliser refused.

    Returns:
        `dict`: per method, `method` (of the table), `recipe` ([`~methods.method_recipe`]) and the budget's layout.
    """
    block = read_training_block(opts.config, opts.set or ())
    names = {m: VARIANTS.get(m, m) for m in methods}
    for key, lacking in check_block_keys(block, names, OWNED_SETTINGS).items():
        print(f"[compare] training setting `{key}` does not apply to {', '.join(lacking)} (not a field of its config)")
    processes = launch_processes(opts.accelerate_config, opts.num_processes)
    rows = _batch_sizes(opts.sequences_per_step, opts.candidates)
    plan = {}
    for m in methods:
        base = names[m]
        defaults = dict(learning_rate=opts.learning_rate, seed=opts.seed, gradient_accumulation_steps=1)
        defaults.update(disable_tqdm=opts.no_progress, **_settings(m, opts))
        forced = {"max_steps": opts.steps, **_given_flags(m, opts)}
        trainer_dir = out / "phases" / f"train_{m}.trainer"
        recipe = method_recipe(block, m, base, trainer_dir, defaults, forced)
        args, _ = parse_training_settings(base, recipe, deepspeed=False, where=m)
        accumulation = args.gradient_accumulation_steps
        per_device, rest = divmod(rows[m], accumulation * processes)
        if rest or per_device < 1:
            raise ValueError(
                f"{m}: a step of {rows[m]} rows (--sequences-per-step {opts.sequences_per_step}) does not split into "
                f"gradient_accumulation_steps {accumulation} x {processes} process(es); make --sequences-per-step a "
                "multiple of their product times the sequences of one row."
            )
        forced["per_device_train_batch_size"] = per_device
        recipe = method_recipe(block, m, base, trainer_dir, defaults, forced)
        args, model_config = parse_training_settings(base, recipe, deepspeed=False, where=m)
        check_training_settings(base, args, model_config, where=m)
        check_batch_layout(base, args, processes, group_size=opts.candidates)
        plan[m] = {
            "method": base,
            "recipe": recipe,
            "rows": rows[m],
            "layout": f"{per_device} x {accumulation} x {processes}",
            "learning_rate": args.learning_rate,
            "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else str(model_config.dtype or "float32")),
            "peft": "LoRA" + (" 4-bit" if model_config.load_in_4bit else "") if model_config.use_peft else "–",
            "checkpointing": bool(args.gradient_checkpointing),
        }
    return plan


def _budget_lines(plan: dict, opts) -> list[str]:
    lines = [
        "| method | steps | rows / step | per device x accumulation x processes | sequences / step | learning rate | "
        "precision | PEFT | activation checkpointing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, p in plan.items():
        per_row = METHOD_TABLE[p["method"]].sequences_per_row or opts.candidates
        lines.append(
            f"| {m} | {opts.steps} | {p['rows']} | {p['layout']} | {p['rows'] * per_row} | {p['learning_rate']:g} | "
            f"{p['precision']} | {p['peft']} | {'yes' if p['checkpointing'] else 'no'} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# The run folder: what is finished, what changed
# ----------------------------------------------------------------------------------------------------------------------


def _option_names() -> list[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return [a.dest for a in parser._actions]


def _fingerprint(opts, prompts_hash: str) -> dict:
    settings = {d: getattr(opts, d, None) for d in _option_names() if d not in _NOT_FINGERPRINTED}
    return {**settings, "prompts_sha256": prompts_hash}


def _prepare_output(out: Path, opts, fingerprint: dict) -> dict:
    """Create, replace (`--overwrite`) or resume the comparison in `out`; returns its `run.json` state. A changed
    option is refused, naming it."""
    state_path = out / "run.json"
    if opts.overwrite:
        for name in _RUN_FILES:
            remove_path(out / name)
    elif state_path.exists():
        state = json.loads(state_path.read_text())
        for name, before in state["settings"].items():
            now = fingerprint.get(name)
            if now != before:
                option = "--prompts (their content)" if name == "prompts_sha256" else "--" + name.replace("_", "-")
                raise ValueError(
                    f"{option} is {now!r} but the comparison in {out} used {before!r}: a resumed comparison keeps its "
                    "options (only --methods, the processes and --no-progress may change). Pass --overwrite to start "
                    "over, or use another --output-dir."
                )
        return state
    elif (out / "models").exists() or (out / "train_groups.jsonl").exists():
        raise FileExistsError(f"{out} holds a comparison without run.json; pass --overwrite to start over.")
    out.mkdir(parents=True, exist_ok=True)
    state = {"settings": fingerprint, "timings": {}}
    write_json(state_path, state)
    return state


def _check_trained(name: str, recipe: dict, phase_file: Path, out: Path) -> bool:
    """Whether `name` was trained by an earlier run with the same settings (the budget's split over processes may
    differ); a changed setting is refused, naming it."""
    from .scripts.train_phase import phase_finished

    if not phase_file.is_file():
        return False
    phase = json.loads(phase_file.read_text())
    if not phase_finished(phase):
        return False

    def settings(recipe):  # the file's values and the command line's `--set`, by key
        argv = recipe.get("argv", [])
        values = {**recipe["values"], **dict(zip((k[2:] for k in argv[::2]), argv[1::2]))}
        for key in ("per_device_train_batch_size", "disable_tqdm"):  # the split over processes, --no-progress
            values.pop(key, None)
        return values

    before, now = settings(phase["recipe"]), settings(recipe)
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            raise ValueError(
                f"{name}: training setting `{key}` is {now.get(key)!r} but {out / 'models' / name} was trained with "
                f"{before.get(key)!r}: a resumed comparison keeps every method's settings. Pass --overwrite to start "
                "over, or use another --output-dir."
            )
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------------------------


def _launched(opts) -> bool:
    return opts.accelerate_config is not None or opts.num_processes is not None


def _launch(opts, module_args: list) -> None:
    from .launch import launch_command, run_launched

    cmd = launch_command(module_args, opts.accelerate_config, opts.num_processes)
    run_launched(cmd, env={"TOKENIZERS_PARALLELISM": "false"})


def _sample_phase(opts, model_path: str, prompts: Path, output: Path) -> None:
    """Sample `--candidates` replies per training prompt and score them into `output` (a groups dataset)."""
    from .pipeline import GenerationSettings, ScoringSettings, sample_groups

    generation = GenerationSettings(
        model=model_path,
        n=opts.candidates,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed,
        batch_size=opts.gen_batch_size,
        backend=opts.backend,
    )
    scoring = ScoringSettings(scorers=[opts.reward], batch_size=opts.gen_batch_size)
    sample_groups(
        prompts,
        output,
        generation,
        scoring,
        chunk_size=opts.chunk_size,
        progress=not opts.no_progress,
        accelerate_config=opts.accelerate_config,
        num_processes=opts.num_processes,
    )


def _eval_phase(opts, specs: list[ModelSpec], model_path: str, prompts: Path, out: Path) -> None:
    """Evaluate `specs` and the reference on the held-out prompts into `out` (`eval.json`, `eval.md`, plots)."""
    if _launched(opts):
        argv = ["trl_rewardweighted.cli", "eval", "--reference", model_path, "--prompts", prompts]
        for spec in specs:
            argv += ["--goal-model" if spec.goal_conditioned else "--model", f"{spec.name}={spec.model}"]
        argv += ["--reward", opts.reward, "--output-dir", out, "--num-samples", opts.eval_samples]
        argv += ["--max-new-tokens", opts.max_new_tokens, "--seed", opts.seed + 1000, "--batch-size"]
        argv += [opts.gen_batch_size, "--backend", opts.backend, "--overwrite"]
        argv += ["--no-progress"] if opts.no_progress else []
        _launch(opts, argv)
        return
    from .data.convert import read_prompts

    config = EvalConfig(
        num_samples=opts.eval_samples,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed + 1000,
        batch_size=opts.gen_batch_size,
        backend=opts.backend,
        progress=not opts.no_progress,
    )
    results = evaluate_models(specs, model_path, list(read_prompts(prompts)["prompt"]), opts.reward, config)
    write_report(results, out)


def _train_phase(opts, name: str, plan: dict, model_path: str, data, out: Path) -> dict:
    """Train `name` (its data saved first) as a phase of its own: in this process, or launched."""
    from .data.convert import save_dataset
    from .scripts.train_phase import train, write_phase

    data_path = save_dataset(data, out / "data" / name)
    phases = out / "phases"
    phase_file = write_phase(
        phases / f"train_{name}.json",
        method=plan["method"],
        name=name,
        model=model_path,
        data=data_path,
        recipe=plan["recipe"],
        reward=opts.reward if METHOD_TABLE[plan["method"]].online else None,
        output=str(out / "models" / name),
        result=str(phases / f"train_{name}.result.json"),
    )
    return train(phase_file, opts.accelerate_config, opts.num_processes)


def run_compare(opts) -> dict:
    """Run the comparison described in the module docstring with the parsed `opts`; returns the summary dict.

    With `opts.seeds` > 1, one whole comparison per seed in `<output-dir>/seed_<s>` (each resumable as above, and
    each the same as `--seed s --seeds 1 --output-dir <output-dir>/seed_<s>`: seeds can run apart and be pooled
    after), then the pooled report in `<output-dir>` (see [`run_seeds`])."""
    if getattr(opts, "seeds", 1) != 1:
        return run_seeds(opts)
    from datasets import Dataset

    from .data.convert import load_dataset_any, read_prompts, save_dataset
    from .data.utils import is_messages
    from .quickstart import PROMPTS_FILE, resolve_model

    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m not in DEPRECATED_NAMES]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or methods}; choose from {', '.join(METHODS)}.")
    methods = [resolve_method_name(m, METHODS, what="--methods") for m in methods]
    if opts.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {opts.chunk_size}.")
    out = Path(opts.output_dir)
    plan = plan_training(opts, methods, out)  # every setting checked before anything runs

    prompts = list(read_prompts(Path(opts.prompts) if opts.prompts else PROMPTS_FILE)["prompt"])
    need = opts.num_train_prompts + opts.num_eval_prompts
    if need > len(prompts):
        raise ValueError(f"Only {len(prompts)} prompts; --num-train-prompts + --num-eval-prompts = {need}.")
    chat = [p if is_messages(p) else [{"role": "user", "content": p}] for p in prompts[:need]]
    train_prompts, eval_prompts = chat[: opts.num_train_prompts], chat[opts.num_train_prompts :]
    prompts_hash = hashlib.sha256(json.dumps(chat, sort_keys=True).encode()).hexdigest()
    state = _prepare_output(out, opts, _fingerprint(opts, prompts_hash))
    timings = state["timings"]
    t0 = time.time()
    before = dict(timings)
    print("[compare] budgets (matched: the same steps and sequences per step for every method):")
    print("\n".join(_budget_lines(plan, opts)))

    model_path = resolve_model(opts.model, out)
    train_file, eval_file = out / "prompts_train.jsonl", out / "prompts_eval.jsonl"
    save_dataset(Dataset.from_dict({"prompt": train_prompts}), train_file)
    save_dataset(Dataset.from_dict({"prompt": eval_prompts}), eval_file)
    groups_file = out / "train_groups.jsonl"
    if groups_file.exists():
        print(f"[compare] 1/3 sampling: done in an earlier run ({groups_file})")
    else:
        print(
            f"[compare] 1/3 sampling {opts.candidates} replies for {len(train_prompts)} training prompts and scoring"
        )
        start = time.time()
        _sample_phase(opts, model_path, train_file, groups_file)
        timings["sample_and_score"] = round(time.time() - start, 1)
        write_json(out / "run.json", state)
    data = build_method_data(load_dataset_any(groups_file), opts.reward_range)

    print(f"[compare] 2/3 training {', '.join(methods)}: {opts.steps} steps x {opts.sequences_per_step} sequences")
    trained, budgets = [], {}
    for method in methods:
        phase_file = out / "phases" / f"train_{method}.json"
        if _check_trained(method, plan[method]["recipe"], phase_file, out):
            result = json.loads((out / "phases" / f"train_{method}.result.json").read_text())
            print(f"[compare]     {method}: trained in an earlier run, skipped")
        else:
            shutil.rmtree(out / "models" / method, ignore_errors=True)  # an unfinished one
            result = _train_phase(opts, method, plan[method], model_path, data[method], out)
            timings[f"train_{method}"] = result["seconds"]
            write_json(out / "run.json", state)
        budgets[method] = {
            **{k: result[k] for k in ("steps", "seconds", "first_loss", "last_loss")},
            "batch_size": plan[method]["rows"],
            "train_rows": len(data[method]),
            "layout": plan[method]["layout"],
            "learning_rate": plan[method]["learning_rate"],
        }
        spec = ModelSpec(method, str(out / "models" / method), goal_conditioned=method in GOAL_CONDITIONED)
        trained.append(spec)
        print(f"[compare]     {method}: {budgets[method]}")

    evaluated = [[s.name, s.model, s.goal_conditioned] for s in trained]
    if state.get("evaluated") == evaluated and (out / "eval" / "eval.json").is_file():
        print("[compare] 3/3 evaluation: done in an earlier run")
    else:
        print(f"[compare] 3/3 evaluating on {len(eval_prompts)} held-out prompts x {opts.eval_samples} samples")
        start = time.time()
        _eval_phase(opts, trained, model_path, eval_file, out / "eval")
        timings["evaluate"] = round(time.time() - start, 1)
        state["evaluated"] = evaluated
        write_json(out / "run.json", state)
    results = json.loads((out / "eval" / "eval.json").read_text())
    paths = {"json": str(out / "eval" / "eval.json"), "markdown": str(out / "eval" / "eval.md")}
    paths.update({p.stem: str(p) for p in sorted((out / "eval").glob("*.png"))})
    if timings != before:  # a phase ran: this run's time (a rerun of a finished comparison keeps the last)
        timings["total_this_run"] = round(time.time() - t0, 1)
        write_json(out / "run.json", state)
    _write_report(out, opts, methods, plan, budgets, results, len(train_prompts), len(eval_prompts), timings)
    summary = {"budgets": budgets, "timings": timings, "files": paths, "methods": methods}
    summary["models"] = {n: e["summary"] for n, e in results["models"].items()}
    write_json(out / "compare.json", summary)
    print((out / "compare.md").read_text())
    return summary


def run_seeds(opts) -> dict:
    """`--seeds N`: the comparison with seeds `--seed` ... `--seed + N - 1`, each a whole run in
    `<output-dir>/seed_<s>` (sampled data, training seed and evaluation sampling seed all change with it; the held-out
    prompts stay the same), pooled with [`~evaluation.pool_results`]: `compare.md` (the pooled table with every seed's
    point estimate, the pooled pairwise differences), `compare.json`, `pooled.json` and `reward_vs_kl_pooled.png`.
    A method is called better only when the pooled interval (over seeds and prompts) excludes 0."""
    if opts.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {opts.seeds}.")
    out = Path(opts.output_dir)
    seeds = [opts.seed + k for k in range(opts.seeds)]
    summaries, results = {}, []
    for k, seed in enumerate(seeds):
        folder = out / f"seed_{seed}"
        print(f"[compare] seed {seed} ({k + 1}/{len(seeds)}): {folder}")
        summaries[seed] = run_compare(
            argparse.Namespace(**{**vars(opts), "seed": seed, "seeds": 1, "output_dir": str(folder)})
        )
        results.append(json.loads((folder / "eval" / "eval.json").read_text()))
    pooled = pool_results(results, seeds)
    paths = write_pooled_report(pooled, out)
    methods = summaries[seeds[0]]["methods"]
    plain = [REFERENCE] + [m for m in methods if m not in GOAL_CONDITIONED]
    text = [
        f"# Comparison over {len(seeds)} seeds\n",
        f"Seeds {', '.join(map(str, seeds))}: each a whole comparison in `seed_<s>/` (its own sampled training data, "
        f"training seed and evaluation sampling seed; the same {pooled['num_prompts']} held-out prompts), with the "
        "settings of `seed_<s>/compare.md`. Intervals: 95 %, two-level bootstrap over seeds, then prompts within each "
        "seed. Verdict `+`/`−` only when the pooled interval excludes 0.\n",
        pooled_markdown_table(pooled),
        "\n## Pairwise (row − column), mean reward, pooled over seeds and prompts\n",
        pairwise_table(results, plain),
    ]
    ra = [m for m in methods if m in GOAL_CONDITIONED]
    if ra:
        text += [
            "\nReward-augmented models under the goal prompt:\n",
            pairwise_table(results, [REFERENCE + " + goal", *ra]),
        ]
    (out / "compare.md").write_text("\n".join(text))
    summary = {"seeds": seeds, "methods": methods, "pooled": pooled["models"], "files": paths}
    summary["per_seed"] = {str(s): summaries[s] for s in seeds}
    write_json(out / "compare.json", summary)
    print((out / "compare.md").read_text())
    return summary


def _write_report(out, opts, methods, plan, budgets, results, num_train, num_eval, timings) -> None:
    plain = [REFERENCE] + [m for m in methods if m not in GOAL_CONDITIONED]
    text = [
        "# Comparison\n",
        f"Starting model `{opts.model}`, reward `{opts.reward}`, {num_train} training prompts x "
        f"{opts.candidates} sampled replies, {num_eval} held-out prompts x {opts.eval_samples} samples "
        f"(seed {opts.seed + 1000}, the same for every model) + 1 greedy reply.\n",
        "Budgets matched: every method ran the same number of optimizer steps, each seeing the same number of "
        f"sequences ({opts.sequences_per_step}: a DPO pair counts 2, a VCB group {opts.candidates}); seed {opts.seed}. "
        f"The online methods (online VAR, GRPO) sample {opts.candidates} replies per prompt from the current policy at "
        f"every step ({opts.sequences_per_step // opts.candidates} prompts per step), "
        f"{opts.steps * opts.sequences_per_step} replies in all, against {num_train * opts.candidates} "
        "sampled once from the starting model for the offline methods.\n",
        "\n".join(_budget_lines({m: plan[m] for m in methods}, opts)) + "\n",
        "| method | steps | batch (rows) | sequences / step | training examples | seconds | first → last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, b in budgets.items():
        per_row = METHOD_TABLE[VARIANTS.get(method, method)].sequences_per_row or opts.candidates
        loss = f"{b['first_loss']:.3f} → {b['last_loss']:.3f}" if b["first_loss"] is not None else "–"
        text.append(
            f"| {method} | {b['steps']} | {b['batch_size']} | {b['batch_size'] * per_row} | {b['train_rows']} | "
            f"{b['seconds']} | {loss} |"
        )
    text += [
        "\n## Held-out evaluation\n",
        "Each row against its baseline (`vs`): the reference, or for reward-augmented models the reference under the "
        "same goal prompt. Verdict `+`/`−` only when the whole 95 % paired interval is above/below 0; `≈` otherwise "
        "(not distinguishable at this size).\n",
        markdown_table(results),
        "\n## Pairwise (row − column), mean reward, paired over prompts\n",
        pairwise_table([results], plain),
    ]
    ra = [m for m in methods if m in GOAL_CONDITIONED]
    if ra:
        text += [
            "\nReward-augmented models under the goal prompt:\n",
            pairwise_table([results], [REFERENCE + " + goal", *ra]),
        ]
    text.append(f"\nTimings (s): {json.dumps(timings)}\n")
    (out / "compare.md").write_text("\n".join(text))
