"""What ships inside the package, by name (issue 17): `trl-rw recipes list / copy / path`, `--config NAME` for
`trl-rw train` and `trl-rw check-recipe`, `trl-rw train --accelerate-config / --num-processes` (the launch command
built, not run: the two-process run is tests/test_launch_scripts.py), and the SLURM script with stand-ins for SLURM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_rewardweighted import cli, launch, packaged
from trl_rewardweighted.scripts import train

ROOT = packaged.recipes_root()


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------------


def test_recipes_ship_inside_the_package_and_only_the_configs_trl_lacks():
    names = packaged.recipe_names()
    assert {"quickstart/var", "quickstart/iterate_var", "var/qwen2.5-1.5b/config_full"} <= set(names)
    assert ROOT == Path(packaged.__file__).parent / "recipes"
    table = launch.accelerate_config_table()
    assert table["multi_node_zero3"][0] == "trl_rewardweighted"
    assert {table[n][0] for n in ("single_gpu", "multi_gpu", "zero2", "zero3", "fsdp2")} == {"trl"}
    own = Path(launch.slurm_script()).parent
    assert sorted(p.name for p in own.iterdir() if p.suffix in (".yaml", ".slurm")) == [
        "launch.slurm",
        "multi_node_zero3.yaml",
    ]
    # No project config is a copy of one of TRL's.
    trl_texts = {Path(path).read_text() for package, path in table.values() if package == "trl"}
    assert (own / "multi_node_zero3.yaml").read_text() not in trl_texts
    # A recipe name never hides a config name (`recipes path NAME` looks recipes up first).
    assert not set(table) & {*names, *(n.split("/")[0] for n in names)}


def test_resolve_recipe_by_path_or_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert packaged.resolve_recipe("quickstart/var") == [ROOT / "quickstart/var.yaml"]
    assert packaged.resolve_recipe("quickstart/var.yaml") == [ROOT / "quickstart/var.yaml"]
    assert packaged.resolve_recipe("var/qwen2.5-1.5b", folders=True) == [
        ROOT / "var/qwen2.5-1.5b" / f"{n}.yaml" for n in ("config_full", "config_full_hh", "config_qlora")
    ]
    with pytest.raises(FileNotFoundError) as err:
        packaged.resolve_recipe("var/qwen2.5-1.5b")
    assert str(err.value) == (
        "--config var/qwen2.5-1.5b: a folder of packaged recipes; name one of them: var/qwen2.5-1.5b/config_full, "
        "var/qwen2.5-1.5b/config_full_hh, var/qwen2.5-1.5b/config_qlora."
    )
    with pytest.raises(FileNotFoundError) as err:
        packaged.resolve_recipe("quickstart/vra")
    assert str(err.value) == (
        "--config quickstart/vra: no such file, and not the name of a packaged recipe (`trl-rw recipes list` names "
        "them). Did you mean quickstart/var, quickstart/vcb, quickstart/online_var?"
    )
    for outside in ("../recipes/quickstart/var", "/quickstart/var", ""):
        assert packaged.find_recipe(outside) is None
    # A local file is used as it is; a name that a local NAME.yaml shadows is refused rather than guessed.
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart/var.yaml").write_text("beta: 1.0\n")
    assert packaged.resolve_recipe("quickstart/var.yaml") == [Path("quickstart/var.yaml")]
    with pytest.raises(
        FileNotFoundError, match=r"both the packaged recipe quickstart/var and the file quickstart/var"
    ):
        packaged.resolve_recipe("quickstart/var")


def test_config_argument_of_a_packaged_recipe_gives_its_data_as_absolute_paths(tmp_path):
    data = str(ROOT / "quickstart/data/rows.jsonl")
    resolved = train.resolve_config_argument(["--config", "quickstart/var", "--learning_rate", "1e-6"])
    assert resolved == [
        "--dataset_name",
        data,
        "--config",
        str(ROOT / "quickstart/var.yaml"),
        "--learning_rate",
        "1e-6",
    ]
    # the user's own --dataset_name comes later, so it wins; `--config=NAME` is read too
    assert train.resolve_config_argument(["--config=quickstart/var", "--dataset_name", "x.jsonl"])[-2:] == [
        "--dataset_name",
        "x.jsonl",
    ]
    own = tmp_path / "mine.yaml"
    own.write_text("dataset_name: quickstart/data/rows.jsonl\n")  # not packaged: its paths stay as written
    assert train.resolve_config_argument(["--config", str(own)]) == ["--config", str(own)]
    assert train.resolve_config_argument(["--beta", "1"]) == ["--beta", "1"]
    with pytest.raises(FileNotFoundError, match=r"^--config nope\.yaml: no such file"):
        train.resolve_config_argument(["--config", "nope.yaml"])


# ----------------------------------------------------------------------------------------------------------------------
# trl-rw recipes
# ----------------------------------------------------------------------------------------------------------------------


def test_recipes_list(capsys):
    code, out, err = _run(["recipes", "list"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("Recipes (trl-rw train METHOD --config NAME; ")
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert rows["quickstart/var"] == ["var", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert rows["quickstart/iterate_var"] == ["iterate", "smollm2"]
    assert rows["var/qwen2.5-1.5b/config_qlora"] == ["var", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert rows["multi_node_zero3"] == ["trl_rewardweighted"] and rows["zero3"] == ["trl"]
    assert len([r for r in rows.values() if len(r) == 2]) == len(packaged.recipe_names())
    assert lines[-1] == "SLURM script for several nodes: trl-rw recipes path launch.slurm"


def test_recipes_copy_runs_from_the_destination(tmp_path, capsys, monkeypatch):
    dest = tmp_path / "run"
    code, out, _ = _run(["recipes", "copy", "quickstart/var", dest], capsys)
    assert code == 0
    assert out.splitlines() == [str(dest / "quickstart/data/rows.jsonl"), str(dest / "quickstart/var.yaml")]
    assert (dest / "quickstart/var.yaml").read_text() == (ROOT / "quickstart/var.yaml").read_text()
    monkeypatch.chdir(dest)  # the copy's relative dataset path holds from there
    assert Path(yaml.safe_load(Path("quickstart/var.yaml").read_text())["dataset_name"]).is_file()
    code, out, _ = _run(["check-recipe", "quickstart/var.yaml"], capsys)
    assert code == 0 and out.startswith("quickstart/var.yaml: ok (var, ")
    # an existing file is not replaced without --overwrite, and nothing is written
    (dest / "quickstart/var.yaml").write_text("edited\n")
    code, _, err = _run(["recipes", "copy", "quickstart/var", dest], capsys)
    assert code == 2 and "already exist(s); pass --overwrite to replace." in err
    assert (dest / "quickstart/var.yaml").read_text() == "edited\n"
    assert _run(["recipes", "copy", "quickstart/var", dest, "--overwrite"], capsys)[0] == 0
    assert (dest / "quickstart/var.yaml").read_text() == (ROOT / "quickstart/var.yaml").read_text()
    # a folder: every file in it, at its path
    code, out, _ = _run(["recipes", "copy", "var/qwen2.5-1.5b", tmp_path / "f"], capsys)
    assert [Path(p).relative_to(tmp_path / "f").as_posix() for p in out.split()] == [
        f"var/qwen2.5-1.5b/{n}.yaml" for n in ("config_full", "config_full_hh", "config_qlora")
    ]
    code, _, err = _run(["recipes", "copy", "quickstart/vra", tmp_path / "g"], capsys)
    assert code == 2 and err.startswith("trl-rw recipes: error: recipes copy quickstart/vra: not the name of a pack")
    assert not (tmp_path / "g").exists()


def test_recipes_path_and_usage_errors(tmp_path, capsys):
    assert _run(["recipes", "path", "quickstart/var"], capsys)[1] == f"{ROOT / 'quickstart/var.yaml'}\n"
    assert _run(["recipes", "path", "var"], capsys)[1] == f"{ROOT / 'var'}\n"
    assert _run(["recipes", "path", "zero3"], capsys)[1] == f"{launch.resolve_accelerate_config('zero3')}\n"
    assert _run(["recipes", "path", "launch.slurm"], capsys)[1] == f"{launch.slurm_script()}\n"
    own = tmp_path / "mine.yaml"
    own.write_text("num_processes: 2\n")
    assert _run(["recipes", "path", own], capsys)[1] == f"{own}\n"
    code, _, err = _run(["recipes", "path", "zero4"], capsys)
    assert code == 2 and err.startswith(
        "trl-rw recipes: error: recipes path zero4: no such file, and not a packaged recipe or folder (`trl-rw "
        "recipes list`), an accelerate config (multi_node_zero3, "
    )
    for argv, message in [
        (["list", "x"], "recipes list takes no NAME, got 1: x"),
        (["copy", "quickstart/var"], "recipes copy takes NAME DIR, got 1: quickstart/var"),
        (["path"], "recipes path takes one NAME, got 0: "),
        (["path", "var", "--overwrite"], "--overwrite has no effect with recipes path."),
        (["list", "--overwrite"], "--overwrite has no effect with recipes list."),
    ]:
        code, _, err = _run(["recipes", *argv], capsys)
        assert (code, err.strip()) == (2, f"trl-rw recipes: error: {message}".strip())


def test_check_recipe_by_name(capsys):
    code, out, err = _run(["check-recipe", "quickstart", "vcb/smollm2-135m/config_full"], capsys)
    assert code == 0 and err == ""
    labels = [line.split(": ")[0] for line in out.splitlines() if ": ok (" in line]
    assert labels == [
        *(f"quickstart/{n}" for n in ("iterate_var", "online_var", "reward_augmented_dpo", "var", "vcb"))
    ] + ["vcb/smollm2-135m/config_full"]
    code, _, err = _run(["check-recipe", "quickstart/vra"], capsys)
    assert code == 1
    assert err.splitlines()[0] == (
        "quickstart/vra: error: no such file, and not the name of a packaged recipe (`trl-rw recipes list` names "
        "them). Did you mean quickstart/var, quickstart/vcb, quickstart/online_var?"
    )


# ----------------------------------------------------------------------------------------------------------------------
# trl-rw train: in-process, or accelerate launch
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def launched(monkeypatch):
    """Stub of `run_launched` recording the commands; `trl-rw train` must not train in-process when launching."""
    calls = []
    monkeypatch.setattr(launch, "run_launched", lambda cmd, *a, **k: calls.append([str(c) for c in cmd]))
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("trained in-process"))
    return calls


def test_train_launches_accelerate_when_asked(launched, capsys):
    recipe = str(ROOT / "quickstart/var.yaml")
    data = str(ROOT / "quickstart/data/rows.jsonl")
    zero3 = launch.resolve_accelerate_config("zero3")
    tail = ["-m", "trl_rewardweighted.scripts.var", "--dataset_name", data, "--config", recipe, "--beta", "1.0"]
    for argv in (
        ["train", "var", "--config", "quickstart/var", "--accelerate-config", "zero3", "--num-processes", "8", "--beta", "1.0"],
        ["train", "--accelerate-config", "zero3", "--num-processes", "8", "var", "--config", "quickstart/var", "--beta", "1.0"],
        ["train", "var", "--accelerate_config=zero3", "--num_processes", "8", "--config", "quickstart/var", "--beta", "1.0"],
    ):  # fmt: skip
        launched.clear()
        assert _run(argv, capsys)[0] == 0
        assert launched == [
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", zero3, "--num_processes", "8", *tail]
        ]
    # --num-processes alone: data-parallel on the machine's devices; a deprecated name launches the new module
    launched.clear()
    with pytest.warns(FutureWarning, match="'ra_dpo' is deprecated"):
        assert (
            _run(["train", "ra_dpo", "--config", "quickstart/reward_augmented_dpo", "--num-processes", "2"], capsys)[0]
            == 0
        )
    (cmd,) = launched
    assert cmd[3:11] == [
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
    ]
    assert cmd[12:14] == ["-m", "trl_rewardweighted.scripts.reward_augmented_dpo"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "quickstart/var", "--num-processes", "x"], "--num-processes expects an integer number of processes, got 'x'."),
        (["--config", "quickstart/var", "--num-processes", "0"], "--num-processes must be >= 1, got 0."),
        (["--config", "quickstart/var", "--num-processes"], "--num-processes needs a value."),
        (["--config", "quickstart/var", "--accelerate-config", "zero3", "--accelerate_config", "zero2"], "--accelerate-config is given twice."),
        (["--config", "quickstart/var", "--accelerate-config", "zero4"], "--accelerate-config zero4: no such file, and not the name of a packaged accelerate config"),
        (["--config", "nope", "--num-processes", "2"], "--config nope: no such file, and not the name of a packaged recipe"),
    ],
)  # fmt: skip
def test_train_launch_options_are_checked_before_launching(launched, capsys, argv, message):
    code, _, err = _run(["train", "var", *argv], capsys)
    assert code == 2 and err.startswith(f"trl-rw train: error: {message}"), err
    assert launched == []


def test_a_failed_launch_exits_with_its_code_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 3))
    code, _, err = _run(["train", "var", "--config", "quickstart/var", "--num-processes", "2"], capsys)
    assert code == 3
    assert err.startswith("trl-rw train: error: `") and err.strip().endswith("exited with code 3.")


# ----------------------------------------------------------------------------------------------------------------------
# The SLURM script, with stand-ins for srun / scontrol
# ----------------------------------------------------------------------------------------------------------------------


def test_slurm_script_builds_one_launch_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    # srun runs its command once per node, with that node's SLURM_NODEID; `accelerate` prints what it was given.
    (bin_dir / "srun").write_text('#!/bin/bash\nshift 2\nfor id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    (bin_dir / "accelerate").write_text('#!/bin/bash\necho "LAUNCH $*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_ID="7",
        HF_HUB_OFFLINE="1",
    )
    recipe = "reward_augmented_dpo/qwen2-7b-instruct/config_full"
    result = subprocess.run(
        ["bash", launch.slurm_script(), "reward_augmented_dpo", recipe, "--gradient_accumulation_steps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    launches = [line for line in result.stdout.splitlines() if line.startswith("LAUNCH ")]
    config = launch.resolve_accelerate_config("multi_node_zero3")
    for rank, line in enumerate(launches):
        assert line.split() == [
            "LAUNCH", "launch", "--config_file", config, "--num_machines", "2", "--machine_rank", str(rank),
            "--main_process_ip", "node-a", "--main_process_port", "29500", "--num_processes", "16", "--tee", "3",
            "-m", "trl_rewardweighted.scripts.reward_augmented_dpo", "--config", recipe,
            "--gradient_accumulation_steps", "2",
        ]  # fmt: skip
    assert len(launches) == 2
    assert f"{recipe}: ok (reward_augmented_dpo, Qwen/Qwen2-7B-Instruct" in result.stdout  # checked before launching
