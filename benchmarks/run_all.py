"""Run every benchmark, time the phases of `trl-rw compare`, and rewrite `benchmarks/RESULTS.md` from the results.

    python benchmarks/run_all.py                  # what `make bench` runs: every benchmark + a reduced compare
    python benchmarks/run_all.py --quick          # smoke check: few rounds and steps, a tiny compare (minutes)
    python benchmarks/run_all.py --compare-json compare_output/compare.json   # phase times of an existing full run
    python benchmarks/run_all.py --skip-compare --only bench_var,bench_vcb

Each `benchmarks/bench_*.py` runs as its own subprocess (so its memory figures are its own), with `--json PATH`; the
JSON files follow the schema described in `_common.write_json` (`rows` of trainers with their ratios against TRL's
trainer); any other key, and the whole file of a benchmark that does not follow it, is shown as a key/value table. A
benchmark that fails or writes no JSON is reported as such, with the end of its output (one without a `--json` option
is not run). Then `trl-rw compare` runs
with `--compare-args` (default: a reduced comparison that takes a few minutes on 2 CPU cores) and its `timings` are
reported: sampling + scoring, each method's training, evaluation, total.

When `torch.cuda.is_available()`, the benchmarks first run on the CPU (`CUDA_VISIBLE_DEVICES=`, so that the CPU rows
stay comparable across machines), then a second time on the GPU in bf16 with `--gpu-model` (default `smollm2`; pass a
local folder of a ~0.5B model, e.g. Qwen2.5-0.5B-Instruct, for the 0.5B rows), which adds GPU rows (tokens/s, peak
`max_memory_allocated`).

The results of `make gpu-check` (`benchmarks/gpu_check.py`: bf16 benchmarks, ZeRO-3 launches and a LoRA compare on one
GPU) get a section of their own, read from `--gpu-check-json` (default: `benchmarks/gpu_check.json` when it exists);
`gpu_check.py --record` writes that section into the existing RESULTS.md (`--from-json PATH --record`: from a saved
run), leaving the rest of the file as it is.

The RESULTS.md writer is [`render_results`]: it only reads the collected dict, so it can be re-run on a saved one
(`--raw PATH` saves it, `--from-raw PATH` renders it again without running anything). `--quick` writes its file under
the temp dir, not over `benchmarks/RESULTS.md` (`--output` picks the file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from trl_rewardweighted.data.utils import write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"

# Known benchmarks, in report order: title, then the arguments of the default, --quick and GPU runs. Any other
# `bench_*.py` in this folder runs too, with no arguments (`--quick` when its source has that option).
BENCHMARKS = {
    "bench_var": {
        "title": "VAR vs SFTTrainer",
        "default": ["--rounds", "10"],
        "quick": ["--rounds", "2", "--steps-per-round", "3", "--memory-steps", "2", "--rows", "64"],
        "gpu": ["--bf16"],
    },
    "bench_vcb": {
        "title": "VCB vs DPOTrainer",
        "default": [],
        "quick": ["--rounds", "1", "--steps-per-round", "3", "--memory-steps", "1", "--prompts", "16"],
        "gpu": ["--bf16"],
    },
    "bench_ra_dpo": {
        "title": "Reward-augmented DPO vs DPOTrainer",
        "default": [],
        "quick": ["--pairs", "2000", "--repeats", "1", "--steps", "3", "--rounds", "2", "--memory-steps", "2"],
        "gpu": ["--bf16", "--skip-relabel"],
    },
    # Same prompts, generations (learning rate 0, one seed) and lengths; online VAR against GRPO with beta 0 and 0.04.
    "bench_online_var": {
        "title": "Online VAR vs GRPOTrainer",
        "default": [],
        "quick": ["--rounds", "1", "--steps-per-round", "3", "--memory-steps", "1"],
        "gpu": ["--bf16"],
    },
    "bench_padding_free": {
        "title": "Padding-free vs padded (VAR, VCB) and VAR vs SFTTrainer padding-free",
        "default": [],
        "quick": ["--rounds", "1", "--sft-rounds", "1", "--steps-per-round", "3", "--length-scale", "0.125"],
        "gpu": ["--bf16", "--length-scale", "1", "--max-length", "2048"],
    },
    # SmolLM2 by default: with the tiny model a generate call takes ~0.1 s and fixed per-call costs dominate the ratio.
    "bench_sampling": {
        "title": "Sampling",
        "default": ["--model", "smollm2", "--prompts", "16", "--rounds", "2"],
        "quick": ["--prompts", "8", "--rounds", "1"],
        "gpu": [],
    },
}
# `trl-rw compare` settings: reduced (a few minutes on 2 CPU cores) and tiny (--quick). The full default run (24
# prompts x 4 replies, 12 steps, 16 x 4 evaluation) takes ~26 minutes: docs/compare.md.
COMPARE_ARGS = (
    "--model smollm2 --num-train-prompts 8 --num-eval-prompts 4 --eval-samples 2 --max-new-tokens 16 --steps 2"
)
COMPARE_QUICK_ARGS = (
    "--model tiny --reward benchmarks.run_all:length_reward --reward-range auto --num-train-prompts 4 "
    "--num-eval-prompts 2 --eval-samples 2 --max-new-tokens 8 --steps 2 --methods sft,dpo,var,vcb,reward_augmented_dpo"
)
SCHEMA_KEYS = ("benchmark", "goal", "goals", "settings", "rows")
# Row fields of the schema: (key, column header, formatter name).
COLUMNS = (
    ("median_step_ms", "step (ms)", "ms"),
    ("time_ratio", "step-time ratio", "ratio"),
    ("matched_ratio", "matched ratio", "ratio"),
    ("tokens_per_s", "tokens/s", "int"),
    ("tokens_per_s_gain", "tokens/s gain", "ratio"),
    ("peak_mib", "peak MiB", "int"),
    ("mem_ratio", "peak-memory ratio", "ratio"),
    ("train_mib", "train() +MiB", "int"),
    ("train_mib_ratio", "train() +MiB ratio", "ratio"),
    ("padding", "padded", "percent"),
)


def length_reward(prompts, completions) -> list[float]:
    """The `--quick` compare's reward: characters / 100 (the tiny model's replies all score ~0 under VADER, and groups
    of tied rewards give DPO no pairs)."""
    return [len(c if isinstance(c, str) else str(c)) / 100 for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# Formatting


def fmt_ratio(x) -> str:
    return "–" if x is None else f"{x:.3f}×"


def fmt_duration(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = round(float(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_value(x) -> str:
    """A JSON value in a table cell."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, list):
        return ", ".join(fmt_value(v) for v in x) if len(x) <= 12 else f"{len(x)} values"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _fmt(kind: str, x) -> str:
    if x is None:
        return "–"
    if kind == "ratio":
        return fmt_ratio(x)
    if kind == "ms":
        return f"{x:.1f}"
    if kind == "int":
        return f"{x:,.0f}"
    if kind == "percent":
        return f"{100 * x:.1f} %"
    return fmt_value(x)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as `(dotted key, value)` pairs."""
    items = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def key_value_table(d: dict) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {fmt_value(v)} |" for k, v in flatten(d)]
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# RESULTS.md


def goal_verdict(row: dict, goal: dict | None) -> str:
    """`yes` / `no` per goal the row is measured against (`time ≤ 1.10×: yes`), or `–`."""
    if not goal or row.get("baseline") is None:
        return "–"
    parts = []
    for key, label in (("time_ratio", "time"), ("mem_ratio", "memory")):
        if key in goal and row.get(key) is not None:
            parts.append(f"{label} ≤ {goal[key]:.2f}×: {'yes' if row[key] <= goal[key] else 'no'}")
    return "; ".join(parts) or "–"


def render_rows(rows: list[dict], goals: dict) -> list[str]:
    """One table per `group` of rows, with the columns any of its rows has."""
    lines = []
    groups = list(dict.fromkeys(r.get("group") or "" for r in rows))
    for group in groups:
        members = [r for r in rows if (r.get("group") or "") == group]
        columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in members)]
        goal = goals.get(group)
        if len(groups) > 1 or group:
            lines += [f"**{group}**" + (f" (goal: {goal_text(goal)})" if goal else ""), ""]
        header = ["trainer", "vs", *(c[1] for c in columns)] + (["within goal"] if goal else [])
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in members:
            cells = [fmt_value(r.get("name")), fmt_value(r.get("baseline")) if r.get("baseline") else "baseline"]
            cells += [_fmt(kind, r.get(key)) for key, _, kind in columns]
            if goal:
                cells.append(goal_verdict(r, goal))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def goal_text(goal: dict) -> str:
    names = {"time_ratio": "step time", "mem_ratio": "peak memory"}
    return ", ".join(f"{names.get(k, k)} ≤ {v:.2f}×" for k, v in goal.items())


def render_benchmark(name: str, title: str, entry: dict | None, suffix: str = "") -> list[str]:
    lines = [f"## {title}{suffix} — `benchmarks/{name}.py`", ""]
    if entry is None:
        return lines + [f"Not run: `benchmarks/{name}.py` was not present (or not selected) in this run.", ""]
    if "returncode" not in entry:  # not started (no --json option)
        return lines + _failure(entry, "not run")
    facts = _run_facts(entry)
    lines += [f"Command: `{entry['command']}` (plus `--json PATH`)" + (f", {facts}." if facts else "."), ""]
    data = entry.get("json")
    if data is None:
        return lines + _failure(entry, "no JSON written")
    if not isinstance(data, dict):
        data = {"result": data}
    if data.get("goal"):
        lines += [f"Goal: {data['goal']}.", ""]
    if data.get("settings"):
        settings = ", ".join(f"{k}={fmt_value(v)}" for k, v in flatten(data["settings"]))
        lines += [f"Settings: {settings}.", ""]
    if data.get("rows"):
        lines += render_rows(data["rows"], data.get("goals") or {})
    extra = {k: v for k, v in data.items() if k not in SCHEMA_KEYS}
    if extra:
        lines += ["Other measured values:" if data.get("rows") else "Measured values:", ""]
        lines += key_value_table(extra) + [""]
    if entry.get("returncode"):
        lines += [f"(The script exited with code {entry['returncode']} after writing its JSON.)", ""]
    return lines


def _failure(entry: dict, what: str) -> list[str]:
    why = entry.get("error") or f"exit code {entry.get('returncode')}, {what}"
    if not entry.get("tail"):
        return [f"**Not measured**: {why}.", ""]
    return [f"**Not measured**: {why}. Last lines of its output:", "", "```", *entry["tail"], "```", ""]


def _run_facts(entry: dict) -> str:
    facts = [f"wall time {fmt_duration(entry['wall_s'])}"] if entry.get("wall_s") is not None else []
    if entry.get("load"):
        facts.append(f"host load during it {entry['load']['mean']:.1f} (mean), {entry['load']['max']:.1f} (max)")
    return ", ".join(facts)


def summary_rows(run: dict) -> list[str]:
    """One line per compared trainer (rows with a baseline) of every benchmark."""
    lines = [
        "| benchmark | trainer | vs | step-time ratio | peak-memory ratio | goal | within goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for pass_key, suffix in (("benchmarks", ""), ("gpu_benchmarks", " (GPU)")):
        for name, entry in (run.get(pass_key) or {}).items():
            data = (entry or {}).get("json")
            if not isinstance(data, dict) or not data.get("rows"):
                state = "not measured" if entry else "not run"
                lines.append(f"| `{name}`{suffix} | {state} | | | | | |")
                continue
            goals = data.get("goals") or {}
            for r in data["rows"]:
                if r.get("baseline") is None:
                    continue
                goal = goals.get(r.get("group"))
                lines.append(
                    f"| `{name}`{suffix} | {fmt_value(r.get('name'))} | {fmt_value(r['baseline'])} | "
                    f"{fmt_ratio(r.get('time_ratio'))} | {fmt_ratio(r.get('mem_ratio'))} | "
                    f"{goal_text(goal) if goal else '–'} | {goal_verdict(r, goal)} |"
                )
    return lines


def render_compare(compare: dict | None) -> list[str]:
    lines = ["## `trl-rw compare` phase times", ""]
    if not compare or compare.get("source") == "skipped":
        return lines + ["Skipped (`--skip-compare`).", ""]
    if compare.get("source") == "file":
        lines += [f"Read from an earlier run's `{compare['path']}` (`--compare-json`), not run here."]
        if compare.get("description"):
            lines += ["Its `compare.md` says:", ""] + [f"> {line}" if line else ">" for line in compare["description"]]
        lines.append("")
    else:
        lines += [f"Command: `{compare.get('command')}`, {_run_facts(compare)}.", ""]
    timings = compare.get("timings")
    if not timings:
        return lines + _failure(compare, "no compare.json")
    budgets = compare.get("budgets") or {}
    lines += ["| phase | seconds | steps | s / step | batch |", "|---|---|---|---|---|"]
    if "sample_and_score" in timings:
        lines.append(f"| sampling + scoring | {timings['sample_and_score']:.1f} | | | |")
    train_keys = [k for k in timings if k.startswith("train_")]
    train = {k[len("train_") :]: timings[k] for k in train_keys}
    for method, seconds in train.items():
        b = budgets.get(method, {})
        steps = b.get("steps")
        per_step = f"{seconds / steps:.1f}" if steps else "–"
        unit = {"dpo": "pairs", "vcb": "groups"}.get(method, "rows")
        batch = f"{b['batch_size']} {unit}" if "batch_size" in b else "–"
        lines.append(f"| training: {method} | {seconds:.1f} | {steps or '–'} | {per_step} | {batch} |")
    if train:
        lines.append(f"| training, all methods | {sum(train.values()):.1f} | | | |")
    if "evaluate" in timings:
        lines.append(f"| evaluation (every model and the reference) | {timings['evaluate']:.1f} | | | |")
    if "total" in timings:
        lines.append(f"| total (also model loading and saving) | {timings['total']:.1f} | | | |")
    other = {k: v for k, v in timings.items() if k not in ("sample_and_score", "evaluate", "total", *train_keys)}
    lines += [f"| {k} | {v} | | | |" for k, v in other.items()]
    lines += [
        "",
        "Training seconds are `trainer.train()` alone (model loading excluded); every method sees the same number of "
        "sequences per step (a DPO pair counts 2, a VCB group its replies). The full default comparison is timed end "
        "to end in [docs/compare.md](../docs/compare.md#time).",
        "",
    ]
    return lines


GPU_CHECK_TITLE = "## GPU check — `make gpu-check`"


def render_gpu_check(check: dict | None) -> list[str]:
    """The GPU-check section: the JSON of `benchmarks/gpu_check.py` (its benchmark rows per model, then every part's
    status), or how to get one."""
    lines = [GPU_CHECK_TITLE, ""]
    if not check:
        return lines + [
            "No GPU check recorded: `make gpu-check` on a machine with a GPU writes `benchmarks/gpu_check.json` and "
            "this section (README, section GPU).",
            "",
        ]
    versions = ", ".join(f"{k} {v}" for k, v in (check.get("versions") or {}).items())
    facts = f"{check.get('date', '–')}, commit {check.get('git', '–')}, command `{check.get('command', '–')}`"
    if check.get("dry_run"):
        lines += [f"A dry run (no GPU), {facts}: only the checks ran.", ""]
        lines += ["| check | passed | detail |", "|---|---|---|"]
        lines += [f"| {c['check']} | {fmt_value(c['ok'])} | {fmt_value(c['detail'])} |" for c in check["checks"]]
        return lines + [""]
    lines += [
        f"Run on {check.get('device')}, {facts}, wall time {fmt_duration(check.get('wall_s'))} (budget "
        f"{fmt_duration(check.get('budget_s'))}). Versions: {versions}.",
        "",
        "Step time, tokens/s and peak `torch.cuda.max_memory_allocated` of each trainer beside TRL's, in bf16 "
        "(`benchmarks/bench_*.py` with reduced rounds):",
        "",
    ]
    rows, goals = [], {}
    for part in check.get("parts") or []:
        model = {"smollm2": "SmolLM2-135M-Instruct"}.get(part.get("model"), Path(part.get("model") or "–").name)
        for group, goal in (part.get("goals") or {}).items():
            goals[f"{model}: {group}"] = goal
        rows += [dict(r, group=f"{model}: {r.get('group') or part['name']}") for r in part.get("rows") or []]
    lines += render_rows(rows, goals) if rows else ["No benchmark part finished.", ""]
    lines += ["| part | status | seconds (budget) | detail |", "|---|---|---|---|"]
    for part in check.get("parts") or []:
        seconds = "–" if part.get("seconds") is None else f"{part['seconds']:.0f} ({part['budget_s']:.0f})"
        lines.append(f"| {part['name']} | {part['status']} | {seconds} | {fmt_value(part.get('detail') or '')} |")
    counts = check.get("counts") or {}
    lines += ["", ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    return lines


def splice_gpu_check(text: str, check: dict) -> str:
    """`text` (a RESULTS.md) with its GPU-check section replaced by one rendered from `check` (inserted before the
    compare section, or at the end, when it has none)."""
    section = wrap_prose("\n".join(render_gpu_check(check)))
    lines = text.rstrip("\n").split("\n")
    if GPU_CHECK_TITLE in lines:
        start = lines.index(GPU_CHECK_TITLE)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    else:
        start = end = next((i for i, line in enumerate(lines) if line.startswith("## `trl-rw compare`")), len(lines))
    out = lines[:start] + section.rstrip("\n").split("\n") + [""] + lines[end:]
    return "\n".join(out).rstrip("\n") + "\n"


def record_gpu_check(check: dict, path: Path | None = None) -> None:
    """Write the GPU-check section of `path` (default: RESULTS.md) from `check`, leaving the rest of the file as it
    is."""
    path = Path(path or RESULTS)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    path.write_text(splice_gpu_check(text, check))


def render_results(run: dict) -> str:
    """RESULTS.md from a collected run (see `collect` in `main`): header, summary, one section per benchmark, the
    phase times of `trl-rw compare`."""
    m = run.get("machine", {})
    v = run.get("versions", {})
    gpu = m.get("gpu") or "none"
    load = m.get("load") or {}
    cores = m.get("cores")
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run_all.py`, which `make bench` runs (this file: "
        f"`{run.get('command', 'python benchmarks/run_all.py')}`); do not edit by hand, rerun it. Earlier "
        "hand-recorded runs (SmolLM2 figures, the history of each ratio, notes on noise): [HISTORY.md](HISTORY.md).",
        "",
        "Each benchmark runs our trainer and TRL's own trainer side by side in one process, on the same model, data "
        "and sequence lengths, in interleaved rounds (the first step of each round is dropped, medians are reported), "
        "each benchmark in a subprocess of its own. Only the ratios mean anything: absolute times on a shared 2-core "
        "host swing 3–4× from minute to minute, and the ratios themselves swing by **±10 %** between runs on a busy "
        "2-core host (more with the tiny model, whose steps take tens of milliseconds). A ratio over its goal by less "
        "than that is within the noise: rerun before reading anything into it.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        f"| date | {run.get('date', '–')} |",
        f"| CPU | {m.get('cpu', '–')}, {cores or '?'} cores ({m.get('usable_cores', '?')} usable), "
        f"{m.get('ram_gib', '?')} GiB RAM |",
        f"| GPU | {gpu} |",
        f"| OS | {m.get('os', '–')} |",
        f"| torch threads | OMP_NUM_THREADS={m.get('omp_num_threads', '–')} |",
        "| versions | " + ", ".join(f"{k} {val}" for k, val in v.items()) + " |",
        f"| git commit | {run.get('git', '–')} |",
        f"| command | `{run.get('command', '–')}` |",
        f"| wall time | {fmt_duration(run.get('wall_s'))} |",
    ]
    if load:
        lines.append(
            f"| host load | 1-min load average sampled every {load.get('interval_s', 5)} s during the run: mean "
            f"{load['mean']:.1f}, max {load['max']:.1f} on {cores or '?'} cores (the benchmarks themselves account "
            "for about 1) |"
        )
    lines.append("")
    if load and cores and load["mean"] > 1.5:
        lines += [
            f"**The host was busy**: other jobs loaded it during this run (mean load {load['mean']:.1f} on {cores} "
            "cores), so the ratios below are noisier than usual.",
            "",
        ]
    if run.get("note"):
        lines += [run["note"], ""]
    lines += ["## Summary", ""] + summary_rows(run) + [""]
    lines += [
        "Ratios are ours / TRL's on the same work: step time (median) and peak memory (CPU: peak RSS of a fresh "
        "process or during `train()`; CUDA: `max_memory_allocated`), each benchmark's section says which.",
        "",
    ]
    for pass_key, suffix in (("benchmarks", ""), ("gpu_benchmarks", "")):
        entries = run.get(pass_key)
        if entries is None:
            continue
        if pass_key == "gpu_benchmarks":
            lines += [f"# GPU rows: {gpu}, bf16, model `{run.get('gpu_model')}`", ""]
            suffix = " (GPU)"
        for name, entry in entries.items():
            title = BENCHMARKS.get(name, {}).get("title") or name
            lines += render_benchmark(name, title, entry, suffix)
    if run.get("gpu_benchmarks") is None:
        lines += ["No GPU was available for this run: no GPU rows.", ""]
    lines += render_gpu_check(run.get("gpu_check"))
    lines += render_compare(run.get("compare"))
    return wrap_prose("\n".join(lines).rstrip() + "\n")


def wrap_prose(text: str, width: int = 119) -> str:
    """Wrap the prose lines of a markdown text at `width` (tables, headings, quotes and code blocks as they are)."""
    import textwrap

    out, in_code = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or len(line) <= width or line.startswith(("|", "#", ">", "```")):
            out.append(line)
        else:
            out.extend(textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# Running


class LoadSampler:
    """Samples the 1-minute load average every `interval` seconds in a thread; `window()` summarises a stretch."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(os.getloadavg()[0])
            except OSError:
                return
            self._stop.wait(self.interval)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def window(self, start: int = 0) -> dict | None:
        s = self.samples[start:]
        if not s:
            return None
        return {"mean": round(sum(s) / len(s), 2), "max": round(max(s), 2), "interval_s": self.interval}


def machine_info() -> dict:
    info = {
        "os": platform.platform(),
        "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cores"] = os.cpu_count()
    info["cpu"] = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def gpu_name() -> str | None:
    """The GPU torch sees (name and memory), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "deepspeed", "datasets", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h (%cs) %s"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        head = head if len(head) <= 100 else head[:99] + "…"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    n = len(dirty.splitlines())
    return head.replace("|", "\\|") + (f", plus uncommitted changes to {n} tracked files" if n else "")


def child_env(tmp: Path, cpu_only: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = str(tmp)  # the benchmarks' temporary folders go away with this run's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def stream(cmd: list[str], env: dict, label: str, tail_lines: int = 30) -> tuple[int, list[str]]:
    """Run `cmd`, echoing its output, and return its exit code and its last lines."""
    tail: deque[str] = deque(maxlen=tail_lines)
    print(f"[run_all] {label}: {shlex.join(cmd)}", flush=True)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip("\n").split("\r")[-1])  # the last state of a progress bar
    sys.stdout.flush()
    return p.returncode, list(tail)


def run_benchmark(name: str, args: list[str], tmp: Path, sampler: LoadSampler, cpu_only: bool, tag: str) -> dict:
    json_path = tmp / f"{name}{tag}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(json_path)]
    shown = ("CUDA_VISIBLE_DEVICES= " if cpu_only else "") + shlex.join(["python", f"benchmarks/{name}.py", *args])
    if '"--json"' not in (HERE / f"{name}.py").read_text():
        print(f"[run_all] {name}: no --json option, not run", flush=True)
        return {"command": shown, "json": None, "error": "not run: the script has no `--json PATH` option yet"}
    first, start = len(sampler.samples), time.time()
    returncode, tail = stream(cmd, child_env(tmp, cpu_only), name + tag)
    entry = {"command": shown, "returncode": returncode, "wall_s": round(time.time() - start, 1)}
    entry["load"] = sampler.window(first)
    try:
        entry["json"] = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        entry["json"] = None
        entry["error"] = f"exit code {returncode}, no readable JSON ({type(exc).__name__})"
        entry["tail"] = tail
    return entry


def compare_description(md: Path) -> list[str]:
    """The settings paragraphs of a `compare.md` (between its title and its budget table)."""
    try:
        text = md.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in text[1:]:
        if line.startswith("|"):
            break
        out.append(line)
    return [line for line in out if line.strip()]


def run_compare(opts, tmp: Path, sampler: LoadSampler) -> dict:
    if opts.skip_compare:
        return {"source": "skipped"}
    if opts.compare_json:
        path = Path(opts.compare_json)
        data = json.loads(path.read_text())
        return {
            "source": "file",
            "path": str(path),
            "description": compare_description(path.with_name("compare.md")),
            "timings": data.get("timings"),
            "budgets": data.get("budgets"),
        }
    args = shlex.split(opts.compare_args if opts.compare_args is not None else default_compare_args(opts))
    out = tmp / "compare_output"
    cmd = [sys.executable, "-m", "trl_rewardweighted.cli", "compare", *args, "--no-progress"]
    cmd += ["--output-dir", str(out), "--overwrite"]
    first, start = len(sampler.samples), time.time()
    returncode, tail = stream(cmd, child_env(tmp, cpu_only=False), "compare")
    entry = {
        "source": "run",
        "command": shlex.join(["trl-rw", "compare", *args, "--no-progress"]),
        "returncode": returncode,
        "wall_s": round(time.time() - start, 1),
        "load": sampler.window(first),
    }
    try:
        data = json.loads((out / "compare.json").read_text())
        entry.update(timings=data.get("timings"), budgets=data.get("budgets"))
    except (OSError, ValueError):
        entry.update(error=f"exit code {returncode}, no compare.json", tail=tail)
    return entry


def default_compare_args(opts) -> str:
    return COMPARE_QUICK_ARGS if opts.quick else COMPARE_ARGS


def benchmark_names(only: str | None) -> list[str]:
    """Known benchmarks in report order (present or not), then any other `bench_*.py` of this folder."""
    names = list(BENCHMARKS) + sorted(p.stem for p in HERE.glob("bench_*.py") if p.stem not in BENCHMARKS)
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"--only: unknown {unknown}; choose from {', '.join(names)}")
        names = [n for n in names if n in wanted]
    return names


def benchmark_args(name: str, opts, gpu: bool) -> list[str]:
    """The arguments of one run: `--args NAME=...` if given, else the table above (unknown scripts: none, `--quick`,
    `--model`, `--bf16` when their source has those options)."""
    for spec in opts.args or []:
        key, _, value = spec.partition("=")
        if key == name:
            return shlex.split(value)
    source = (HERE / f"{name}.py").read_text()
    known = BENCHMARKS.get(name, {})
    args = list(known.get("quick") if opts.quick and known.get("quick") is not None else known.get("default", []))
    if opts.quick and known.get("quick") is None and '"--quick"' in source:
        args.append("--quick")
    if gpu:
        args = [a for a in args if a != "--bf16"]
        if '"--model"' in source:
            args += ["--model", opts.gpu_model]
        gpu_args = known.get("gpu")
        args += gpu_args if gpu_args is not None else []
        if '"--bf16"' in source and "--bf16" not in args:
            args.append("--bf16")
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: few rounds and steps, a tiny compare")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: every bench_*.py)")
    parser.add_argument(
        "--args", action="append", metavar="NAME=ARGS", help="replace one benchmark's arguments (repeatable)"
    )
    parser.add_argument(
        "--compare-args",
        help=f"`trl-rw compare` arguments (default: '{COMPARE_ARGS}'; with --quick: '{COMPARE_QUICK_ARGS}')",
    )
    parser.add_argument("--compare-json", help="take the phase times from this compare.json instead of running one")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--gpu-model", default="smollm2", help="model of the GPU rows: 'smollm2' or a local folder")
    parser.add_argument("--no-gpu", action="store_true", help="no GPU rows even when a GPU is available")
    parser.add_argument(
        "--output", help="the file to write (default: benchmarks/RESULTS.md; with --quick a file under the temp dir)"
    )
    parser.add_argument("--note", help="a sentence to add under the header (e.g. what else loaded the host)")
    parser.add_argument(
        "--gpu-check-json",
        help="the `make gpu-check` results to show (default: benchmarks/gpu_check.json when it exists)",
    )
    parser.add_argument("--raw", help="also save the collected results (JSON) here")
    parser.add_argument("--from-raw", help="render RESULTS.md from a file saved with --raw, running nothing")
    opts = parser.parse_args(argv)

    if opts.quick and not opts.output:
        opts.output = os.path.join(tempfile.gettempdir(), "trl_rw_bench_quick", "RESULTS.md")
    output = Path(opts.output) if opts.output else RESULTS
    if opts.from_raw:
        run = json.loads(Path(opts.from_raw).read_text())
        if opts.note:  # a note added when re-rendering a saved run
            run["note"] = " ".join(filter(None, (run.get("note"), opts.note)))
        if opts.gpu_check_json:
            run["gpu_check"] = read_gpu_check(opts.gpu_check_json)
    else:
        run = collect(opts, argv if argv is not None else sys.argv[1:])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_results(run))
    if opts.raw:
        write_json(opts.raw, run)
    print(f"[run_all] wrote {output} ({fmt_duration(run.get('wall_s'))})")
    return 0


def read_gpu_check(path: str | None) -> dict | None:
    """The JSON of `benchmarks/gpu_check.py`: `path`, else `benchmarks/gpu_check.json` when it exists, else `None`."""
    if path:
        return json.loads(Path(path).read_text())
    default = HERE / "gpu_check.json"
    return json.loads(default.read_text()) if default.exists() else None


def collect(opts, argv: list[str]) -> dict:
    """Run everything; return the dict [`render_results`] reads."""
    t0 = time.time()
    names = benchmark_names(opts.only)
    gpu = None if opts.no_gpu else gpu_name()
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/run_all.py", *argv]),
        "machine": {**machine_info(), "gpu": gpu},
        "versions": versions(),
        "git": git_commit(),
        "note": opts.note,
        "gpu_check": read_gpu_check(opts.gpu_check_json),
    }
    sampler = LoadSampler().start()
    tmp = Path(tempfile.mkdtemp(prefix="trl_rw_bench_"))
    try:
        run["benchmarks"] = {}
        for name in names:
            present = (HERE / f"{name}.py").exists()
            run["benchmarks"][name] = (
                run_benchmark(name, benchmark_args(name, opts, False), tmp, sampler, gpu is not None, "")
                if present
                else None
            )
        if gpu:
            run["gpu_model"] = opts.gpu_model
            run["gpu_benchmarks"] = {
                name: run_benchmark(name, benchmark_args(name, opts, True), tmp, sampler, False, "_gpu")
                for name in names
                if (HERE / f"{name}.py").exists()
            }
        run["compare"] = run_compare(opts, tmp, sampler)
    finally:
        sampler.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    run["machine"]["load"] = sampler.window()
    run["wall_s"] = round(time.time() - t0, 1)
    return run


if __name__ == "__main__":
    sys.exit(main())
