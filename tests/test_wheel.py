"""The README's first lines work from a wheel installed in a fresh virtualenv outside the repository (issue 17): build
the wheel, install it (and nothing else from the repository) into a new venv, then, from a folder outside the
repository, `trl-rw recipes list`, copy a quickstart recipe, `check-recipe` it and train it for 2 steps on the tiny model.

The venv sees the already installed torch / TRL (`--system-site-packages`, so nothing is downloaded); the project
itself must come from the wheel: `trl_rewardweighted.__file__` is checked to lie in the venv. About 40 s on 2 cores
(wheel build, venv, and three `trl-rw` processes that import TRL).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env, timeout=300) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_in_a_fresh_venv_runs_the_readme_quickstart(tmp_path, tiny_model_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # Build from a copy of the sources, so that the build leaves nothing in the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "trl_rewardweighted", src / "trl_rewardweighted", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", dist], tmp_path, env)
    (wheel,) = dist.glob("trl_rewardweighted-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, env)
    python, trl_rw = venv / "bin" / "python", venv / "bin" / "trl-rw"
    # --ignore-installed: the repository's own (editable) install is outside the venv and must not stand in for it.
    _run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
        tmp_path,
        env,
    )
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"

    work = tmp_path / "work"  # outside the repository
    work.mkdir()
    where = _run([python, "-c", "import trl_rewardweighted; print(trl_rewardweighted.__file__)"], work, env)
    assert Path(where.strip()).is_relative_to(venv), where

    listing = _run([trl_rw, "recipes", "list"], work, env)
    assert "  quickstart/var " in listing and "  zero3 " in listing and "  multi_node_zero3 " in listing
    copied = _run([trl_rw, "recipes", "copy", "quickstart/var", "."], work, env).split()
    assert copied == ["quickstart/data/rows.jsonl", "quickstart/var.yaml"]
    checked = _run([trl_rw, "check-recipe", "quickstart/var.yaml"], work, env)
    assert checked.startswith(
        "quickstart/var.yaml: ok (var, HuggingFaceTB/SmolLM2-135M-Instruct, quickstart/data/rows"
    )
    trained = _run(
        [trl_rw, "train", "var", "--config", "quickstart/var.yaml", "--model_name_or_path", tiny_model_path,
         "--max_steps", "2", "--output_dir", "out", "--use_cpu", "true", "--disable_tqdm", "true"],
        work, env,
    )  # fmt: skip
    assert "Model saved to out." in trained
    assert (work / "out" / "model.safetensors").is_file()
