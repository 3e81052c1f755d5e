"""VARTrainer vs TRL's SFTTrainer, side by side: step-time and peak-memory ratios.

    python benchmarks/bench_var.py                      # tiny offline model (seconds)
    python benchmarks/bench_var.py --model smollm2      # real SmolLM2-135M-Instruct (needs `make install-demo`)

Three trainers on the same model and data: SFT, VAR with a precomputed reference (`ref_weighting=True`, the reference
pass runs once at init and is not timed), and VAR with `ref_weighting=False`. Step times are measured in interleaved
rounds within one process (each round runs a few steps of every trainer, the first step of each round is discarded), so
machine noise hits all three alike; the median is reported. Peak memory: on CUDA, `max_memory_allocated` per trainer;
on CPU, the peak RSS sampled during `train()` in a fresh subprocess per trainer (model + optimizer + activations). Goal: VAR ≤ 1.10×
SFT's step time and ≤ 1.05× its peak memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import (  # noqa: E402
    StepTimer,
    bench_args,
    device_name,
    interleaved_step_medians,
    memory_in_children,
    train_peak_memory,
    write_json,
)
from datasets import Dataset  # noqa: E402

from trl_rewardweighted.data.utils import dumps_json  # noqa: E402

KINDS = ("sft", "var_ref", "var_noref")
LABELS = {
    "sft": "SFTTrainer (TRL)",
    "var_ref": "VAR, precomputed reference",
    "var_noref": "VAR, ref_weighting=False",
}
GOAL = "VAR <= 1.10x SFTTrainer's step time and <= 1.05x its peak memory"


def model_path(name: str) -> str:
    if name == "smollm2":
        from trl_rewardweighted.offline import smollm2_path

        return smollm2_path()
    if name == "tiny":
        from trl_rewardweighted.testing import build_tiny_model

        return build_tiny_model(os.path.join(tempfile.gettempdir(), "trl_rw_bench_tiny"))
    return name


def make_dataset(n_rows: int, words: int) -> Dataset:
    vocab = "the a good bad happy sad day night river star light dark we you they run see make find love hate".split()
    rows = {"prompt": [], "completion": [], "reward": []}
    for i in range(n_rows):
        p = " ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(words // 2))
        c = " ".join(vocab[(i * 3 + j * 5) % len(vocab)] for j in range(words))
        rows["prompt"].append(f"Write about {p}:")
        rows["completion"].append(" " + c + ".")
        rows["reward"].append(((i * 37) % 11) / 10.0 - 0.5)
    return Dataset.from_dict(rows)


def build_trainer(kind: str, path: str, dataset: Dataset, args_kw: dict, timer: StepTimer):
    from trl import SFTConfig, SFTTrainer

    from trl_rewardweighted import VARConfig, VARTrainer

    common = bench_args(
        per_device_train_batch_size=args_kw["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        max_steps=args_kw["steps"],
        max_length=args_kw["max_length"],
        bf16=args_kw["bf16"],
    )
    out = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    if kind == "sft":
        return SFTTrainer(
            model=path,
            args=SFTConfig(output_dir=out, **common),
            train_dataset=dataset.remove_columns("reward"),
            callbacks=[timer],
        )
    cfg = VARConfig(output_dir=out, beta=0.5, ref_weighting=(kind == "var_ref"), **common)
    return VARTrainer(model=path, args=cfg, train_dataset=dataset, callbacks=[timer])


def run_timing(opts) -> tuple[dict, dict]:
    """Median step time (s) and real tokens per second of every trainer."""
    path = model_path(opts.model)
    dataset = make_dataset(opts.rows, opts.words)
    kw = dict(batch_size=opts.batch_size, steps=opts.steps_per_round, max_length=opts.max_length, bf16=opts.bf16)
    timers = {k: StepTimer() for k in KINDS}
    trainers = {k: timers[k].count_tokens(build_trainer(k, path, dataset, kw, timers[k])) for k in KINDS}
    medians = interleaved_step_medians(trainers, timers, opts.rounds)
    return medians, {k: timers[k].tokens_per_second(medians[k]) for k in KINDS}


def run_memory_child(opts, kind: str) -> float:
    """Peak memory (MiB) while one trainer trains: CUDA max allocated, or on CPU the peak RSS sampled every 2 ms
    during `train()` (the process peak `ru_maxrss` is reached while loading the model, the same for every trainer)."""
    path = model_path(opts.model)
    dataset = make_dataset(opts.rows, opts.words)
    kw = dict(batch_size=opts.batch_size, steps=opts.memory_steps, max_length=opts.max_length, bf16=opts.bf16)
    trainer = build_trainer(kind, path, dataset, kw, StepTimer())
    return train_peak_memory(trainer)["peak_mib"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a local model path")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--words", type=int, default=40, help="words per completion (prompt: half)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=6)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the measured numbers here (read by benchmarks/run_all.py)")
    parser.add_argument("--_memory_child", choices=KINDS, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    if opts._memory_child:
        print(dumps_json({"peak_mib": run_memory_child(opts, opts._memory_child)}))
        return

    device = device_name()
    print(f"model={opts.model} device={device} batch={opts.batch_size} max_length={opts.max_length} bf16={opts.bf16}")
    times, tokens_per_s = run_timing(opts)
    memory = {}
    if not opts.no_memory:
        memory = {k: v["peak_mib"] for k, v in memory_in_children(__file__, argv, KINDS).items()}
    print(f"{'trainer':<28}{'median step (s)':>16}{'time ratio':>12}{'peak MiB':>12}{'mem ratio':>11}")
    for kind in KINDS:
        t_ratio = times[kind] / times["sft"]
        mem = memory.get(kind)
        m_ratio = f"{mem / memory['sft']:.3f}x" if mem else "-"
        mem_s = f"{mem:.0f}" if mem else "-"
        print(f"{LABELS[kind]:<28}{times[kind]:>16.4f}{t_ratio:>11.3f}x{mem_s:>12}{m_ratio:>11}")
    memory_kind = "CUDA max_memory_allocated" if torch.cuda.is_available() else "peak RSS during train()"
    print("memory: " + memory_kind)
    rows = []
    for kind in KINDS:
        mem = memory.get(kind)
        rows.append(
            {
                "name": LABELS[kind],
                "group": "VAR vs SFTTrainer",
                "baseline": None if kind == "sft" else LABELS["sft"],
                "median_step_ms": round(times[kind] * 1e3, 2),
                "time_ratio": round(times[kind] / times["sft"], 4),
                "tokens_per_s": round(tokens_per_s[kind]) if tokens_per_s[kind] else None,
                "peak_mib": round(mem, 1) if mem else None,
                "mem_ratio": round(mem / memory["sft"], 4) if mem else None,
            }
        )
    settings = {k: v for k, v in vars(opts).items() if not k.startswith("_") and k != "json"}
    settings.update(
        device=device, torch_threads=torch.get_num_threads(), memory=None if opts.no_memory else memory_kind
    )
    write_json(
        opts.json,
        {
            "benchmark": "bench_var",
            "goal": GOAL,
            "goals": {"VAR vs SFTTrainer": {"time_ratio": 1.10, "mem_ratio": 1.05}},
            "settings": settings,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
