"""`trl_rewardweighted.launch`: accelerate configs by name or path, and the launch command line."""

import sys

import pytest

from trl_rewardweighted.launch import accelerate_config_names, launch_command, resolve_accelerate_config


def test_configs_resolve_by_name_from_trl_and_by_path(tmp_path):
    import trl

    names = accelerate_config_names()
    assert {"zero3", "multi_gpu", "fsdp2"} <= set(names)
    assert resolve_accelerate_config("zero3").startswith(str(__import__("pathlib").Path(trl.__file__).parent))
    own = tmp_path / "mine.yaml"
    own.write_text("num_processes: 2\n")
    assert resolve_accelerate_config(own) == str(own)
    with pytest.raises(FileNotFoundError) as err:
        resolve_accelerate_config("zero4")
    assert str(err.value).startswith("--accelerate-config zero4: no such file, and not the name of a packaged")
    assert "zero3" in str(err.value)


def test_launch_command_line():
    cmd = launch_command(["trl_rewardweighted.cli", "train", "var"], "zero3", num_processes=8)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[3] == "--config_file" and cmd[4] == resolve_accelerate_config("zero3")
    assert cmd[5:] == ["--num_processes", "8", "-m", "trl_rewardweighted.cli", "train", "var"]
    plain = launch_command(["m"], num_processes=2)
    assert "--multi_gpu" in plain and plain[-2:] == ["-m", "m"]
    assert launch_command(["m"]) == [sys.executable, "-m", "accelerate.commands.launch", "-m", "m"]
    with pytest.raises(ValueError, match="--num-processes must be >= 1"):
        launch_command(["m"], num_processes=0)
