"""Start a command under `accelerate launch`, with an accelerate config named the way TRL's CLI names them.

`trl-rw train METHOD --accelerate-config zero3 --num-processes 8`, and the training, sampling and evaluation phases of
`trl-rw compare` / `trl-rw iterate`, run as their own `accelerate launch` subprocess built here. A config is a path to a
YAML file, or a name: first one of this package's own configs (`trl_rewardweighted/accelerate_configs/`, what TRL lacks,
e.g. `multi_node_zero3`), then one of TRL's (`trl/accelerate_configs/`: `single_gpu`, `multi_gpu`, `zero1`, `zero2`,
`zero3`, `fsdp1`, `fsdp2`), which are not copied here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = [
    "LaunchError",
    "PACKAGES_WITH_CONFIGS",
    "SLURM_SCRIPT",
    "accelerate_config_names",
    "accelerate_config_table",
    "launch_command",
    "resolve_accelerate_config",
    "run_launched",
    "slurm_script",
]

# Where named configs are looked up, in order: this package's own, then TRL's.
PACKAGES_WITH_CONFIGS = ("trl_rewardweighted.accelerate_configs", "trl.accelerate_configs")


def _config_folder(package: str):
    try:
        return resources.files(package)
    except (ModuleNotFoundError, TypeError):
        return None


def accelerate_config_table() -> dict[str, tuple[str, str]]:
    """The accelerate configs that can be given by name: `{name: (package, path)}`, this package's own first (a name
    in both resolves to this package's)."""
    table: dict[str, tuple[str, str]] = {}
    for package in PACKAGES_WITH_CONFIGS:
        folder = _config_folder(package)
        if folder is None:
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".yaml"):
                table.setdefault(entry.name.removesuffix(".yaml"), (package.split(".")[0], str(entry)))
    return table


def accelerate_config_names() -> dict[str, str]:
    """The accelerate configs that can be given by name: `{name: path}` (see [`accelerate_config_table`])."""
    return {name: path for name, (_, path) in accelerate_config_table().items()}


# This package's multi-node SLURM script, next to its own accelerate configs.
SLURM_SCRIPT = "launch.slurm"


def slurm_script() -> str:
    """The path of this package's SLURM script (`trl-rw recipes path launch.slurm`)."""
    return str(_config_folder(PACKAGES_WITH_CONFIGS[0]) / SLURM_SCRIPT)


def resolve_accelerate_config(value: str | os.PathLike, option: str = "--accelerate-config") -> str:
    """The path of the accelerate config `value`: an existing file, or the name of a packaged config (see
    [`accelerate_config_names`]).

    Args:
        value (`str` or `os.PathLike`):
            A path to an accelerate YAML config, or a config name such as `"zero3"`.
        option (`str`, *optional*, defaults to `"--accelerate-config"`):
            The flag or key the value came from, for the message.

    Returns:
        `str`: the path of the config file.

    Raises:
        `FileNotFoundError`: neither a file nor a known name; the message lists the names.
    """
    text = os.fspath(value)
    if Path(text).is_file():
        return text
    names = accelerate_config_names()
    if text in names:
        return names[text]
    raise FileNotFoundError(
        f"{option} {text}: no such file, and not the name of a packaged accelerate config ({', '.join(names)})."
    )


def launch_command(
    module_args: Sequence[str],
    accelerate_config: str | os.PathLike | None = None,
    num_processes: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The command line that runs `python -m <module_args>` under `accelerate launch`.

    Args:
        module_args (`Sequence[str]`):
            The module and its arguments, e.g. `["trl_rewardweighted.cli", "train", "var", "--config", "r.yaml"]`.
        accelerate_config (`str` or `os.PathLike`, *optional*):
            A path or config name (see [`resolve_accelerate_config`]); `None`: accelerate's own default config.
        num_processes (`int`, *optional*):
            Overrides the config's `num_processes`. Without a config, more than one process launches data-parallel
            (`--multi_gpu`, which on a machine without GPUs runs on the CPU when `ACCELERATE_USE_CPU=1`).
        python (`str`, *optional*):
            The interpreter (default: this one).

    Returns:
        `list[str]`: the argument vector for `subprocess`.
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}.")
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", resolve_accelerate_config(accelerate_config)]
    elif num_processes is not None and num_processes > 1:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + ["-m", *[str(a) for a in module_args]]


class LaunchError(RuntimeError):
    """A launched command failed; `returncode` is its exit status."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_launched(cmd: Sequence[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> None:
    """Run a launch command in the foreground, its output passed through; raise [`LaunchError`] (a `RuntimeError`)
    naming the command and its exit status when it fails (the launcher has already printed each rank's error)."""
    merged = dict(os.environ, **(env or {}))
    result = subprocess.run([str(a) for a in cmd], env=merged, cwd=cwd)
    if result.returncode != 0:
        command = " ".join(str(a) for a in cmd)
        raise LaunchError(f"`{command}` exited with code {result.returncode}.", result.returncode)
