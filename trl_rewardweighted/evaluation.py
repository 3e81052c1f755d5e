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
    response_length_summary,
    reward_per_nat,
    self_bleu,
    win_tie_loss,
)
from .model_utils import completion_logps_from_ids, tokenize_prompt_completions

__all__ = ["EvalConfig", "ModelSpec", "evaluate_models", "write_report", "markdown_table"]

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

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        if self.batch_size < 1 or self.score_batch_size < 1:
            raise ValueError("batch_size and score_batch_size must be >= 1.")


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return completion_logps_from_ids(model, prompt_ids, completion_ids, batch_size, pad)


def _per_prompt_mean(values: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray([float(np.mean(v)) for v in values], dtype=np.float64)


def _interval(values, n_resamples, seed=0) -> dict:
    est, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": est, "low": low, "high": high}


def evaluate_models(
    models: Sequence[ModelSpec],
    reference,
    prompts: Sequence,
    scorer: Callable | str,
    config: EvalConfig | None = None,
    tokenizer=None,
    reference_responses: Sequence[str] | None = None,
    scorer_tokenizer=None,
) -> dict:
    """Generate, score and measure every model of `models` and the `reference` on `prompts`; see the module docstring.

    Args:
        models (`Sequence[ModelSpec]`): the models to evaluate (their names must be distinct).
        reference: path / Hub id / loaded causal LM of the reference (usually the starting model).
        prompts (`Sequence`): strings or conversational prompts (message lists).
        scorer: a reward model path, a `"module:function"` string or a callable `f(prompts, completions)`.
        config ([`EvalConfig`], *optional*): the settings.
        tokenizer (*optional*): the tokenizer shared by the models (loaded from the reference path when None).
        reference_responses (`Sequence[str]`, *optional*): one reference response per prompt (e.g. the dataset's);
            each model's samples also get a win rate against them.
        scorer_tokenizer (*optional*): the tokenizer of a loaded reward model.

    Returns:
        `dict` with `config`, `prompts`, and `models`: `{name: {"summary": {...}, "samples": {...}}}`, the reference
        first (and `<reference> + goal` when a model is goal-conditioned).
    """
    from transformers import AutoTokenizer

    from .sampling import generate_completions, load_scorer, render_prompt_ids, reply_length, score_completions

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
    if tokenizer is None:
        if not isinstance(reference, (str, Path)):
            raise ValueError("The reference is a loaded model: pass its `tokenizer`.")
        tokenizer = AutoTokenizer.from_pretrained(str(reference))
    ref_model = _load(reference)
    score_fn = load_scorer(scorer, tokenizer=scorer_tokenizer)
    prompts = list(prompts)
    goal_prompts = None
    if any(m.goal_conditioned for m in models):
        goal_prompts = [
            build_goal_prompt(p, config.goal_score, tokenizer, config.system_role, config.goal_template)
            for p in prompts
        ]

    def sample(model, condition_prompts):
        common = dict(
            tokenizer=tokenizer,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            progress=config.progress,
        )
        samples = generate_completions(
            model,
            condition_prompts,
            n=config.num_samples,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed,
            return_token_ids=True,
            **common,
        )
        samples = score_completions(
            samples, score_fn, batch_size=config.score_batch_size, progress=config.progress, reward_column="rewards"
        )
        out = {
            "completions": list(samples["completions"]),
            "rewards": list(samples["rewards"]),
            # What was sampled: the context the model continued and the sampled ids (EOS included when it stopped).
            "prompt_ids": list(samples["prompt_ids"]),
            "completion_ids": list(samples["completion_ids"]),
        }
        eos_ids = samples["eos_ids"][0]
        out["token_lengths"] = [[reply_length(ids, eos_ids) for ids in group] for group in out["completion_ids"]]
        if config.greedy:
            greedy = generate_completions(model, condition_prompts, n=1, temperature=0.0, seed=config.seed, **common)
            greedy = score_completions(greedy, score_fn, batch_size=config.score_batch_size, progress=config.progress)
            out["greedy"] = [g[0] for g in greedy["completions"]]
            out["greedy_rewards"] = [r[0] for r in greedy["rewards"]]
        return out

    runs: dict[str, dict] = {}
    # (name, model, the prompts it answers, the prompts of the reference its KL is measured against, baseline)
    # The reference: KL 0 by construction. The reference under the goal prompt: compared with the plain reference
    # (its KL is the shift the goal text alone causes). A goal-conditioned model: compared with the reference under
    # the same goal prompt (what training did).
    entries = [(REFERENCE, ref_model, prompts, prompts, None)]
    if goal_prompts is not None:
        entries.append((REFERENCE + GOAL_SUFFIX, ref_model, goal_prompts, prompts, REFERENCE))
    for spec in models:
        if spec.goal_conditioned:
            entries.append((spec.name, spec.model, goal_prompts, goal_prompts, REFERENCE + GOAL_SUFFIX))
        else:
            entries.append((spec.name, spec.model, prompts, prompts, REFERENCE))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for name, model, answered, ref_prompts, baseline in entries:
        lm = ref_model if model is ref_model else _load(model)
        run = sample(lm, answered)
        # Every reply is scored on its sampled ids, in the context it was sampled in (the rendered prompt); the
        # reference sees the same ids after its own context (the same rendering of `ref_prompts`).
        run["logps"] = completion_logps_from_ids(lm, run["prompt_ids"], run["completion_ids"], config.batch_size, pad)
        if lm is ref_model and ref_prompts is answered:
            run["ref_logps"] = run["logps"]
        else:
            ref_context = run["prompt_ids"] if ref_prompts is answered else render_prompt_ids(ref_prompts, tokenizer)
            run["ref_logps"] = completion_logps_from_ids(
                ref_model, ref_context, run["completion_ids"], config.batch_size, pad
            )
        run["baseline"] = baseline
        runs[name] = run
        del lm  # one evaluated model in memory at a time (besides the reference)

    reference_scores = None
    if reference_responses is not None:
        reference_scores = [float(s) for s in score_fn(prompts, list(reference_responses))]

    results = {}
    for name, run in runs.items():
        results[name] = {"summary": _summarise(run, runs, config, reference_scores), "samples": _jsonable(run)}
    return {"config": asdict(config), "prompts": prompts, "models": results}


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


def _plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in names:
        s = results["models"][name]["summary"]
        kl, r = s["kl"], s["reward"]
        ax.errorbar(
            kl["mean"],
            r["mean"],
            xerr=[[kl["mean"] - kl["low"]], [kl["high"] - kl["mean"]]],
            yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]],
            fmt="o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel("KL to the reference (nats per reply)")
    ax.set_ylabel("mean reward (95 % CI)")
    ax.set_title("Reward vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=120)
    plt.close(fig)
    written.append("reward_vs_kl.png")
    return written


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
