"""Padding-free (`padding_free=True`) vs padded forwards for VARTrainer and VCBTrainer, on long-tailed lengths.

    python benchmarks/bench_padding_free.py                     # tiny Qwen2 widened to 4 layers x 256 (~4-5 min)
    python benchmarks/bench_padding_free.py --model smollm2     # SmolLM2-135M-Instruct (needs `make install-demo`)
    python benchmarks/bench_padding_free.py --length-scale 1 --max-length 2048   # UltraFeedback's own scale (GPU)

Length distribution (synthetic text, one token per word, so the counts are exact; UltraFeedback-like: responses mix
~50-token and ~1,000-2,000-token ones, prompts are short):

- completion tokens ~ LogNormal(median 300, sigma 1.0), clipped to [16, 2048] (5th percentile ~58, 95th ~1,550);
- prompt tokens ~ LogNormal(median 40, sigma 0.6), clipped to [8, 256];
- both multiplied by `--length-scale` (default 0.25, so that a CPU step takes about a second), then every row is
  pre-truncated so that prompt + completion + EOS fits in `--max-length` (default 512 = 2048 x 0.25).

Every trainer sees the same rows in the same order (same seed, one dataset of `batch_size x steps_per_round` rows, so
every round replays the same batches); the script checks that the trainers of each comparison forwarded the same real
tokens. Each comparison is timed in its own interleaved rounds within one process (the first step of each round is
dropped, the order alternates), so that the trainers it compares run close in time. Reported: the median step time
and its ratio, the median of the per-step ratios on the same batch in the same round ("matched", the least exposed to
the host's drift), and the throughput in real (non-padding) tokens per second over all kept steps and its ratio.
Three comparisons (`--parts` picks some of them), each side by side:

1. VAR padding-free vs TRL's `SFTTrainer` padding-free, step time (goal: <= 1.05x). SFT 1.16 refuses
   `padding_free=True` with `max_length` unless packing, so SFT gets `max_length=None` on the pre-truncated rows (the
   same tokens as VAR, which keeps `max_length`). VAR with a precomputed reference (`ref_weighting=True`, the
   reference pass runs once at init and is not timed) and with `ref_weighting=False`.
2. VAR padding-free vs VAR padded (precomputed reference): real tokens/s and the gain.
3. VCB padding-free vs VCB padded (`precompute_ref_log_probs=True`, so the step is the policy forward/backward),
   groups of `--n` completions with the same length distribution: real tokens/s and the gain.

The padding fraction printed is that of the padded batches (1 - real tokens / padded batch slots): it is the compute a
padded forward spends on nothing, and what padding-free can save. With `sdpa`/`eager` (CPU) the padding-free row's
attention is one `L x L` block-diagonal masked product (`L` = real tokens of the batch), so part of the saving in the
linear layers goes back into attention on long batches; varlen kernels (`flash_attention_2/3`) skip the off-diagonal
blocks.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import StepTimer, bench_args, device_name, interleaved_step_medians, write_json  # noqa: E402
from bench_vcb import model_path  # noqa: E402  (the tiny test tokenizer with a 4-layer x 256 Qwen2)
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

LABELS = {
    "sft_free": "SFTTrainer (TRL), padding-free",
    "var_free": "VAR padding-free, precomputed ref",
    "var_free_noref": "VAR padding-free, ref_weighting=False",
    "var_pad": "VAR padded, precomputed ref",
    "vcb_pad": "VCB padded, precomputed ref",
    "vcb_free": "VCB padding-free, precomputed ref",
}
COMPARISONS = {
    1: ("VAR padding-free vs SFT padding-free (goal: <= 1.05x)", ("sft_free", "var_free", "var_free_noref")),
    2: ("VAR padded vs padding-free, precomputed reference", ("var_pad", "var_free")),
    3: ("VCB padded vs padding-free, precomputed reference", ("vcb_pad", "vcb_free")),
}

# Token counts before `--length-scale`: (median, sigma, min, max) of the log-normal distributions.
COMPLETION_LENGTHS = (300, 1.0, 16, 2048)
PROMPT_LENGTHS = (40, 0.6, 8, 256)


class TokenStepTimer(StepTimer):
    """A [`StepTimer`] that also records the real and padded token counts of every step's batch.

    `all_tokens` holds the real tokens of every step (warm-up steps included, to check that two trainers saw the same
    batches); `kept` holds `(seconds, real tokens, batch slots)` of the steps that [`interleaved_step_medians`] keeps
    (all but the first of each round).
    """

    def __init__(self):
        super().__init__()
        self.pending = (0, 0)
        self.all_tokens: list[int] = []
        self.kept: list[tuple[float, int, int]] = []

    def reset(self):
        self.all_tokens.clear()
        self.kept.clear()

    def watch(self, trainer):
        """Wrap `trainer.training_step` to count the tokens of each batch (one micro-batch per step)."""
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            # SFT's padding-free collator returns one (1, L) row of real tokens and no attention mask.
            self.pending = (int(mask.sum()) if mask is not None else ids.numel(), ids.numel())
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        real, slots = self.pending
        self.all_tokens.append(real)
        if len(self.times) > 1:
            self.kept.append((self.times[-1], real, slots))


def one_token_words(tokenizer) -> list[str]:
    """Words (with their leading space) that the tokenizer encodes as exactly one token: text made of them has as many
    tokens as words (Qwen2/SmolLM2 pre-tokenizers split before every space-led word)."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if re.fullmatch(r" [a-z]{3,}", text) and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            words.append(text)
    return sorted(words)


def sample_lengths(rng, size: int, spec: tuple, scale: float) -> np.ndarray:
    median, sigma, low, high = spec
    lengths = np.clip(np.rint(rng.lognormal(math.log(median), sigma, size)), low, high)
    return np.maximum(np.rint(lengths * scale), 1).astype(int)


def make_rows(tokenizer, n_prompts: int, n: int, scale: float, max_length: int, seed: int) -> dict:
    """`n_prompts` prompts with `n` completions each (token lengths as in the module docstring)."""
    rng = np.random.default_rng(seed)
    words = one_token_words(tokenizer)
    prompt_lengths = sample_lengths(rng, n_prompts, PROMPT_LENGTHS, scale)
    prompt_lengths = np.minimum(prompt_lengths, max_length // 2)
    rows = {"prompt": [], "completions": [], "rewards": []}
    for p_len in prompt_lengths:
        # Pre-truncated: prompt + completion + EOS <= max_length, so no trainer truncates anything.
        c_lens = np.minimum(sample_lengths(rng, n, COMPLETION_LENGTHS, scale), max_length - p_len - 1)
        rows["prompt"].append("".join(rng.choice(words, p_len)))
        rows["completions"].append(["".join(rng.choice(words, c)) for c in c_lens])
        rows["rewards"].append([float(r) for r in rng.normal(size=n)])
    return rows


def flat_rows(groups: dict) -> Dataset:
    """One prompt-completion row per completion (for VAR / SFT)."""
    rows = {"prompt": [], "completion": [], "reward": []}
    for prompt, completions, rewards in zip(groups["prompt"], groups["completions"], groups["rewards"], strict=True):
        rows["prompt"].extend([prompt] * len(completions))
        rows["completion"].extend(completions)
        rows["reward"].extend(rewards)
    return Dataset.from_dict(rows)


def build_trainer(kind: str, path: str, opts, data: dict, timer: TokenStepTimer):
    from trl import SFTConfig, SFTTrainer

    from trl_rewardweighted import VARConfig, VARTrainer, VCBConfig, VCBTrainer

    common = bench_args(
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        max_steps=opts.steps_per_round,
        bf16=opts.bf16,
        padding_free="_free" in kind,
    )
    out = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    if kind == "sft_free":
        # SFT 1.16 refuses padding_free with max_length (without packing): the rows are pre-truncated instead.
        args = SFTConfig(output_dir=out, per_device_train_batch_size=opts.batch_size, max_length=None, **common)
        trainer = SFTTrainer(
            model=path, args=args, train_dataset=data["var"].remove_columns("reward"), callbacks=[timer]
        )
    elif kind.startswith("var"):
        args = VARConfig(
            output_dir=out,
            per_device_train_batch_size=opts.batch_size,
            max_length=opts.max_length,
            beta=0.5,
            ref_weighting=kind != "var_free_noref",
            **common,
        )
        trainer = VARTrainer(model=path, args=args, train_dataset=data["var"], callbacks=[timer])
    else:
        args = VCBConfig(
            output_dir=out,
            per_device_train_batch_size=opts.groups,
            max_length=opts.max_length,
            precompute_ref_log_probs=True,
            **common,
        )
        trainer = VCBTrainer(model=path, args=args, train_dataset=data["vcb"], callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # no per-run log dicts on stdout
    timer.watch(trainer)
    return trainer


def throughput(timer: TokenStepTimer) -> tuple[float, float]:
    """Real tokens per second over the kept steps, and the padding fraction of their batches."""
    seconds = sum(t for t, _, _ in timer.kept)
    real = sum(r for _, r, _ in timer.kept)
    slots = sum(s for _, _, s in timer.kept)
    return real / seconds, 1.0 - real / slots


def length_summary(tokenizer, texts: list[str]) -> str:
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    q = np.percentile(lengths, [5, 50, 95])
    return f"mean {np.mean(lengths):.0f}, p5/median/p95 {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}, max {max(lengths)}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a local model path")
    parser.add_argument("--batch-size", type=int, default=8, help="VAR / SFT rows per step")
    parser.add_argument("--groups", type=int, default=2, help="VCB prompts per step")
    parser.add_argument("--n", type=int, default=4, help="VCB completions per prompt")
    parser.add_argument("--length-scale", type=float, default=0.25, help="multiplies the sampled token lengths")
    parser.add_argument("--max-length", type=int, default=512, help="cap on prompt + completion + EOS tokens")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of comparisons 2 and 3 (~2x effects)")
    parser.add_argument("--sft-rounds", type=int, default=8, help="rounds of comparison 1 (a <= 1.05x goal)")
    parser.add_argument("--steps-per-round", type=int, default=5, help="steps per round (the first is a warm-up)")
    parser.add_argument("--parts", default="1,2,3", help="comparisons to run, e.g. '1' or '2,3' (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", help="also write the measured numbers here (read by benchmarks/run_all.py)")
    opts = parser.parse_args(argv)
    parts = sorted({int(p) for p in opts.parts.split(",")})
    if not set(parts) <= set(COMPARISONS):
        parser.error(f"--parts: choose among {sorted(COMPARISONS)}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hf_logging.disable_progress_bar()

    path = model_path(opts.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    steps = opts.steps_per_round
    # VAR / SFT: batch_size x steps rows (each round replays the same batches); VCB: groups x steps prompts of n.
    var_groups = make_rows(tokenizer, opts.batch_size * steps, 1, opts.length_scale, opts.max_length, opts.seed)
    data = {
        "var": flat_rows(var_groups),
        "vcb": Dataset.from_dict(
            make_rows(tokenizer, opts.groups * steps, opts.n, opts.length_scale, opts.max_length, opts.seed + 1)
        ),
    }
    device = device_name()
    data_lengths = {}
    print(
        f"model={opts.model} device={device} bf16={opts.bf16} rounds={opts.sft_rounds} (comparison 1) / "
        f"{opts.rounds} (2, 3) x {steps} steps (the first dropped)\n"
        f"lengths (tokens, before x{opts.length_scale:g} and the cap max_length={opts.max_length}): completion ~ "
        f"LogNormal(median {COMPLETION_LENGTHS[0]}, sigma {COMPLETION_LENGTHS[1]}) in [{COMPLETION_LENGTHS[2]}, "
        f"{COMPLETION_LENGTHS[3]}], prompt ~ LogNormal(median {PROMPT_LENGTHS[0]}, sigma {PROMPT_LENGTHS[1]}) in "
        f"[{PROMPT_LENGTHS[2]}, {PROMPT_LENGTHS[3]}]"
    )
    for name, key, per_step in (
        ("VAR/SFT", "var", f"{opts.batch_size} rows/step"),
        ("VCB", "vcb", f"{opts.groups} prompts x {opts.n} completions/step"),
    ):
        if key == "var" and parts == [3] or key == "vcb" and 3 not in parts:
            continue
        completions = list(data[key]["completion"]) if key == "var" else sum(data[key]["completions"], [])
        data_lengths[f"{name} data ({per_step})"] = (
            f"completion tokens {length_summary(tokenizer, completions)}; prompt tokens "
            f"{length_summary(tokenizer, list(data[key]['prompt']))}"
        )
        print(f"{name} data ({per_step}): {data_lengths[f'{name} data ({per_step})']}")

    header = f"{'trainer':<40}{'step (s)':>10}{'ratio':>9}{'matched':>9}{'tokens/s':>10}{'gain':>9}{'padded':>8}"
    trainers, timers, rows, goals = {}, {}, [], {}
    for part in parts:
        title, kinds = COMPARISONS[part]
        # Each comparison is its own set of interleaved rounds, so that the trainers it compares run close in time.
        for kind in kinds:
            if kind not in trainers:
                timers[kind] = TokenStepTimer()
                trainers[kind] = build_trainer(kind, path, opts, data, timers[kind])
            timers[kind].reset()
        rounds = opts.sft_rounds if part == 1 else opts.rounds
        medians = interleaved_step_medians({k: trainers[k] for k in kinds}, timers, rounds)
        base = kinds[0]
        same = all(timers[k].all_tokens == timers[base].all_tokens for k in kinds)
        print(f"\n{part}. {title} [{'same tokens' if same else 'DIFFERENT TOKENS: check the data'}]")
        group = f"{part}. {title.split(' (goal')[0]}" + ("" if same else " (DIFFERENT TOKENS: check the data)")
        if part == 1:
            goals[group] = {"time_ratio": 1.05}
        print(header)
        for kind in kinds:
            rate, padding = throughput(timers[kind])
            ratio = medians[kind] / medians[base]
            # The same batch in the same round, a few seconds apart: less exposed to the host's drift.
            matched = statistics.median(t / t0 for (t, _, _), (t0, _, _) in zip(timers[kind].kept, timers[base].kept))
            gain = rate / throughput(timers[base])[0]
            padded = "-" if kind == "sft_free" else f"{100 * padding:.1f}%"  # SFT's collator does not pad
            print(
                f"{LABELS[kind]:<40}{medians[kind]:>10.4f}{ratio:>8.3f}x{matched:>8.3f}x{rate:>10.0f}{gain:>8.3f}x"
                f"{padded:>8}"
            )
            rows.append(
                {
                    "name": LABELS[kind],
                    "group": group,
                    "baseline": None if kind == base else LABELS[base],
                    "median_step_ms": round(medians[kind] * 1e3, 2),
                    "time_ratio": round(ratio, 4),
                    "matched_ratio": round(matched, 4),
                    "tokens_per_s": round(rate),
                    "tokens_per_s_gain": round(gain, 4),
                    "padding": None if kind == "sft_free" else round(padding, 4),
                }
            )
        for kind in [k for k in trainers if all(k not in COMPARISONS[p][1] for p in parts if p > part)]:
            del trainers[kind]  # not needed by a later comparison: free its model and optimizer
        gc.collect()
    print(
        "step = median step time; ratio = step / the first row's; matched = median over kept steps of the step-time "
        "ratio to the first row on the same batch in the same round; tokens/s = real (non-padding) tokens per second "
        "over all kept steps; gain = tokens/s / the first row's; padded = padding fraction of the collated batches"
    )
    settings = {k: v for k, v in vars(opts).items() if k != "json"}
    settings.update(device=device, torch_threads=torch.get_num_threads())
    write_json(
        opts.json,
        {
            "benchmark": "bench_padding_free",
            "goal": "1: VAR padding-free <= 1.05x SFTTrainer padding-free's step time; 2, 3: the padding-free gain in "
            "real tokens/s (no goal; bounded by 1 / (1 - padding))",
            "goals": goals,
            "settings": settings,
            "data_lengths": data_lengths,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
