"""`trl-rw compare`: train SFT, DPO, VAR, VCB and reward-augmented DPO from the same starting model on the same
sampled-and-scored data, and online VAR and TRL's GRPO on completions they sample themselves, with matched budgets;
evaluate each on held-out prompts and write one comparison.

1. Sample `--candidates` replies per training prompt from the starting model and score them (the quickstart setup by
   default: SmolLM2-135M-Instruct, VADER positivity, the packaged prompts; fully offline).
2. Build each method's data from the same groups: SFT on the best reply per prompt; DPO on best vs worst; VAR on every
   reply with its reward (`ref_weighting=False`: the replies were sampled from the reference); VCB on the groups;
   reward-augmented DPO on best vs worst with the rewards mapped to the 1-10 goal scale (with and without
   `keep_twins_together` when `reward_augmented_dpo_twins` is selected).
3. Train each for the same number of optimizer steps, each step seeing the same number of sequences (a DPO pair
   counts 2, a VCB group `n`); learning rate, seed and schedule are shared. Each trainer is built by
   [`~trl_rewardweighted.methods.build_trainer`] from the `cpu-demo` preset of
   [`~trl_rewardweighted.methods.build_training_args`]. The online methods (`online_var`,
   `grpo`) sample `--candidates` replies per training prompt from the *current* policy at every step and score them
   with the same reward: with the defaults they generate as many replies in total as the offline methods' sampling
   phase (steps x sequences per step = training prompts x candidates).
4. Evaluate every model and the reference with [`~evaluation.evaluate_models`] (same prompts, same sampling seed:
   paired), and write `compare.md` (the table, the budgets, the pairwise paired differences), `compare.json`, and
   the plots of `trl-rw eval`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .data.utils import write_json
from .evaluation import REFERENCE, EvalConfig, ModelSpec, evaluate_models, markdown_table, write_report
from .methods import DEPRECATED_NAMES, build_trainer, build_training_args, resolve_method_name, run_training
from .methods import METHODS as METHOD_TABLE
from .metrics import paired_bootstrap_diff

__all__ = ["METHODS", "add_arguments", "run_compare", "build_method_data", "pairwise_table"]

# The methods of the table (`trl_rewardweighted.methods.METHODS`) plus one variant: reward-augmented DPO with
# `keep_twins_together=True`.
VARIANTS = {"reward_augmented_dpo_twins": "reward_augmented_dpo"}
METHODS = (
    "sft", "dpo", "var", "vcb", "reward_augmented_dpo", "reward_augmented_dpo_twins", "online_var", "grpo"
)  # fmt: skip
DEFAULT_METHODS = "sft,dpo,var,vcb,reward_augmented_dpo,online_var,grpo"
GOAL_CONDITIONED = ("reward_augmented_dpo", "reward_augmented_dpo_twins")
DEFAULT_REWARD = "trl_rewardweighted.rewards:vader_positivity"


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
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing comparison in --output-dir")


def _groups(model, tokenizer, prompts, opts, scorer):
    from .sampling import generate_completions, score_completions

    ds = generate_completions(
        model,
        prompts,
        n=opts.candidates,
        tokenizer=tokenizer,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed,
        batch_size=opts.gen_batch_size,
        progress=not opts.no_progress,
    )
    return score_completions(ds, scorer, progress=not opts.no_progress)


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


def _settings(method: str, opts, reward_range) -> dict:
    """The method's own settings in a comparison (on top of the shared ones and the `cpu-demo` preset)."""
    if method in ("online_var", "grpo"):
        online = dict(num_generations=opts.candidates, max_completion_length=opts.max_new_tokens)
        return {**online, "beta": opts.beta_var} if method == "online_var" else online
    return {
        "sft": dict(max_length=256),
        "dpo": dict(beta=opts.beta_dpo, max_length=256),
        "var": dict(beta=opts.beta_var, ref_weighting=False, max_length=256),
        "vcb": dict(gamma=opts.gamma, max_length=256, precompute_ref_log_probs=True),
        "reward_augmented_dpo": dict(beta=opts.beta_dpo, max_length=None, score_range=reward_range),
        "reward_augmented_dpo_twins": dict(
            beta=opts.beta_dpo, max_length=None, score_range=reward_range, keep_twins_together=True
        ),
    }[method]


def _train(method, model_path, tokenizer, data, batch_size, opts, out: Path, reward_range, scorer=None):
    from .rewards import as_reward_func

    base = VARIANTS.get(method, method)
    args = build_training_args(
        base,
        out / "checkpoints",
        preset="cpu-demo",
        learning_rate=opts.learning_rate,
        per_device_train_batch_size=batch_size,
        seed=opts.seed,
        gradient_accumulation_steps=1,
        max_steps=opts.steps,
        disable_tqdm=opts.no_progress,
        **_settings(method, opts, reward_range),
    )
    online = METHOD_TABLE[base].online
    reward_funcs = [as_reward_func(scorer, "reward")] if online else None
    trainer = build_trainer(base, model_path, args, data, processing_class=tokenizer, reward_funcs=reward_funcs)
    run = run_training(trainer)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    run.pop("train_metrics")
    return {**run, "batch_size": batch_size, "train_rows": len(data)}


def pairwise_table(results: dict, names: list[str], n_resamples: int = 2000) -> str:
    """Paired differences of mean reward between every two models (row minus column), over the same prompts and
    sampling seed, with 95 % paired-bootstrap intervals. "≈" when the interval contains 0: not distinguishable."""
    import numpy as np

    per_prompt = {
        n: np.asarray([float(np.mean(g)) for g in results["models"][n]["samples"]["rewards"]]) for n in names
    }
    lines = ["| row − column | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append("–")
                continue
            d = paired_bootstrap_diff(per_prompt[a], per_prompt[b], n_resamples=n_resamples)
            mark = "+" if d.low > 0 else ("−" if d.high < 0 else "≈")
            cells.append(f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}] {mark}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_compare(opts) -> dict:
    """Run the comparison described in the module docstring with the parsed `opts`; returns the summary dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data.convert import read_prompts
    from .data.utils import is_messages
    from .quickstart import PROMPTS_FILE, resolve_model

    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m not in DEPRECATED_NAMES]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or methods}; choose from {', '.join(METHODS)}.")
    methods = [resolve_method_name(m, METHODS, what="--methods") for m in methods]
    sizes = _batch_sizes(opts.sequences_per_step, opts.candidates)
    out = Path(opts.output_dir)
    if (out / "compare.json").exists() and not opts.overwrite:
        raise FileExistsError(f"{out / 'compare.json'} exists; pass --overwrite to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()

    prompts = list(read_prompts(Path(opts.prompts) if opts.prompts else PROMPTS_FILE)["prompt"])
    need = opts.num_train_prompts + opts.num_eval_prompts
    if need > len(prompts):
        raise ValueError(f"Only {len(prompts)} prompts; --num-train-prompts + --num-eval-prompts = {need}.")
    chat = [p if is_messages(p) else [{"role": "user", "content": p}] for p in prompts[:need]]
    train_prompts, eval_prompts = chat[: opts.num_train_prompts], chat[opts.num_train_prompts :]

    model_path = resolve_model(opts.model, out)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    from .sampling import load_scorer

    scorer = load_scorer(opts.reward)
    print(f"[compare] 1/3 sampling {opts.candidates} replies for {len(train_prompts)} training prompts and scoring")
    start = time.time()
    groups = _groups(model, tokenizer, train_prompts, opts, scorer)
    timings["sample_and_score"] = round(time.time() - start, 1)
    groups.to_json(out / "train_groups.jsonl")
    del model
    data = build_method_data(groups, opts.reward_range)

    print(f"[compare] 2/3 training {', '.join(methods)}: {opts.steps} steps x {opts.sequences_per_step} sequences")
    trained, budgets = [], {}
    for method in methods:
        method_dir = out / "models" / method
        budgets[method] = _train(
            method, model_path, tokenizer, data[method], sizes[method], opts, method_dir, data["_reward_range"], scorer
        )
        timings[f"train_{method}"] = budgets[method]["seconds"]
        trained.append(ModelSpec(method, str(method_dir), goal_conditioned=method in GOAL_CONDITIONED))
        print(f"[compare]     {method}: {budgets[method]}")

    print(f"[compare] 3/3 evaluating on {len(eval_prompts)} held-out prompts x {opts.eval_samples} samples")
    start = time.time()
    config = EvalConfig(
        num_samples=opts.eval_samples,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed + 1000,
        batch_size=opts.gen_batch_size,
        progress=not opts.no_progress,
    )
    results = evaluate_models(trained, model_path, eval_prompts, scorer, config, tokenizer=tokenizer)
    timings["evaluate"] = round(time.time() - start, 1)
    timings["total"] = round(time.time() - t0, 1)
    paths = write_report(results, out / "eval")

    plain = [REFERENCE] + [m for m in methods if m not in GOAL_CONDITIONED]
    text = [
        "# Comparison\n",
        f"Starting model `{opts.model}`, reward `{opts.reward}`, {len(train_prompts)} training prompts x "
        f"{opts.candidates} sampled replies, {len(eval_prompts)} held-out prompts x {opts.eval_samples} samples "
        f"(seed {config.seed}, the same for every model) + 1 greedy reply.\n",
        "Budgets matched: every method ran the same number of optimizer steps, each seeing the same number of "
        f"sequences ({opts.sequences_per_step}: a DPO pair counts 2, a VCB group {opts.candidates}); learning rate "
        f"{opts.learning_rate}, constant schedule, seed {opts.seed}. The online methods (online VAR, GRPO) sample "
        f"{opts.candidates} replies per prompt from the current policy at every step "
        f"({opts.sequences_per_step // opts.candidates} prompts per step), "
        f"{opts.steps * opts.sequences_per_step} replies in all, against {len(train_prompts) * opts.candidates} "
        "sampled once from the starting model for the offline methods.\n",
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
        pairwise_table(results, plain),
    ]
    ra = [m for m in methods if m in GOAL_CONDITIONED]
    if ra:
        text += [
            "\nReward-augmented models under the goal prompt:\n",
            pairwise_table(results, [REFERENCE + " + goal", *ra]),
        ]
    text.append(f"\nTimings (s): {json.dumps(timings)}\n")
    (out / "compare.md").write_text("\n".join(text))
    summary = {"budgets": budgets, "timings": timings, "files": paths, "methods": methods}
    summary["models"] = {n: e["summary"] for n, e in results["models"].items()}
    write_json(out / "compare.json", summary)
    print((out / "compare.md").read_text())
    return summary
