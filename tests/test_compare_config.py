"""`trl-rw compare` with training settings like a recipe (`--config`, `--set`): refusals before the first sample,
resuming after the last finished phase, and training phases launched on 2 CPU processes (gloo)."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from trl_rewardweighted import compare
from trl_rewardweighted.cli import main as cli_main
from trl_rewardweighted.scripts import train_phase

ROOT = Path(__file__).resolve().parents[1]
REWARD = "tests.test_evaluation:word_reward"


def compare_argv(model, out, *extra):
    argv = ["compare", "--model", model, "--reward", REWARD, "--num-train-prompts", "4", "--num-eval-prompts", "2"]
    argv += ["--steps", "1", "--eval-samples", "2", "--max-new-tokens", "8", "--output-dir", str(out), "--no-progress"]
    return argv + [str(a) for a in extra]


def run(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as err:
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------------------------------
# Refused before the first sample is drawn
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, extra, message",
    [
        ({"lora_rank": 4}, [], "--config {path}: unknown key `lora_rank`: not a field of the methods' configs or of "),
        ({"max_steps": 5}, [], "--config {path}: `max_steps` is set by --steps in this command; remove it."),
        (
            {"methods": {"dpo": {"beta": 0.5}}},
            [],
            "--config {path}: settings for dpo, which is not a method of this run (sft, var).",
        ),
        ({"methods": {"var": {"gamma": 0.5}}}, [], "--config {path}: methods.var: unknown key `gamma`: not a field"),
        ({"preset": "tpu"}, [], "--config {path}: unknown preset 'tpu'; choose one of cpu-demo, gpu-bf16 or none."),
        (
            {"lr_scheduler_type": "sometimes"},
            [],
            "sft: sometimes is not a valid SchedulerType",
        ),
        ({}, ["--set", "var.beta=hot"], "var: argument --beta: invalid float value: 'hot'"),
        ({}, ["--set", "bf16"], "--set 'bf16': give KEY=VALUE (every method) or METHOD.KEY=VALUE (one method)."),
        (
            {"gradient_accumulation_steps": 3},
            [],
            "sft: a step of 8 rows (--sequences-per-step 8) does not split into gradient_accumulation_steps 3 x 1 "
            "process(es)",
        ),
        (
            {"methods": {"var": {"z_scope": "micro_batch", "gradient_accumulation_steps": 8}}},
            [],
            "var: z_scope micro_batch with per_device_train_batch_size 1: each micro-batch's weights are normalised "
            "over one row, all 1 (plain SFT).",
        ),
        (
            {"use_peft": True, "load_in_4bit": True},
            [],
            "sft: load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes quantizes on the GPU) and none is visible",
        ),
    ],
)
def test_compare_refuses_bad_training_settings_before_sampling(tmp_path, capsys, monkeypatch, config, extra, message):
    import torch
    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(compare, "_sample_phase", lambda *a, **k: pytest.fail("sampling started"))
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = compare_argv("tiny", tmp_path / "out", "--methods", "sft,var", "--config", path, *extra)
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert message.format(path=path) in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_shared_keys_apply_where_the_config_has_them(capsys, tmp_path):
    """A shared key some methods lack (GRPO has no `max_length`) reaches the others and is reported."""
    from argparse import Namespace

    parser = __import__("argparse").ArgumentParser()
    compare.add_arguments(parser)
    opts: Namespace = parser.parse_args(["--config", str(tmp_path / "t.yaml"), "--set", "max_length=64"])
    (tmp_path / "t.yaml").write_text("bf16: false\n")
    plan = compare.plan_training(opts, ["var", "grpo"], tmp_path)
    assert (
        "training setting `max_length` does not apply to grpo (not a field of its config)" in capsys.readouterr().out
    )
    assert plan["var"]["recipe"]["argv"] == ["--max_length", "64"] and plan["grpo"]["recipe"]["argv"] == []
    # The flags given on the command line win over the file; their defaults do not.
    (tmp_path / "t.yaml").write_text("learning_rate: 1.0e-3\nmethods: {var: {beta: 0.5}}\n")
    opts = parser.parse_args(["--config", str(tmp_path / "t.yaml"), "--beta-var", "0.3"])
    opts.given = {"beta_var"}
    plan = compare.plan_training(opts, ["var"], tmp_path)
    values = plan["var"]["recipe"]["values"]
    assert values["learning_rate"] == 1.0e-3 and values["beta"] == 0.3 and plan["var"]["layout"] == "8 x 1 x 1"


# ----------------------------------------------------------------------------------------------------------------------
# Resuming after the last finished phase
# ----------------------------------------------------------------------------------------------------------------------


def test_compare_killed_during_training_resumes_without_retraining(tiny_model_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = compare_argv(tiny_model_path, out, "--methods", "sft,var")
    real, calls = train_phase.run_phase, []

    def killed_in_var(phase_file):
        name = json.loads(Path(phase_file).read_text())["name"]
        calls.append(name)
        if name == "var":
            raise KeyboardInterrupt  # the kill, during var's training
        return real(phase_file)

    monkeypatch.setattr(train_phase, "run_phase", killed_in_var)
    code, _, err = run(argv, capsys)
    assert code == 130 and err.strip().endswith("trl-rw compare: interrupted")
    assert calls == ["sft", "var"]
    assert (out / "models" / "sft" / "model.safetensors").exists() and not (out / "models" / "var").exists()
    sft_result = (out / "phases" / "train_sft.result.json").read_text()

    # A changed option or training setting is refused, naming it; nothing runs.
    code, _, err = run(argv[:-2] + ["--methods", "sft,var", "--steps", "2"], capsys)
    assert code == 2 and "--steps is 2 but the comparison in" in err and "used 1" in err
    code, _, err = run(argv + ["--set", "learning_rate=1e-3"], capsys)
    assert code == 2 and "sft: training setting `learning_rate` is '1e-3' but" in err
    assert "was trained with 2e-05" in err
    assert calls == ["sft", "var"]

    calls.clear()
    monkeypatch.setattr(
        train_phase, "run_phase", lambda f: calls.append(json.loads(Path(f).read_text())["name"]) or real(f)
    )
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert calls == ["var"]  # sft was not retrained
    assert "1/3 sampling: done in an earlier run" in printed and "sft: trained in an earlier run, skipped" in printed
    assert (out / "phases" / "train_sft.result.json").read_text() == sft_result
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["sft", "var"] and {"sft", "var"} <= set(summary["models"])


# ----------------------------------------------------------------------------------------------------------------------
# Training phases under accelerate launch, 2 CPU processes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_cpu_processes(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(ROOT)


def _relaunch(phase_file: Path, out: Path) -> Path:
    """A copy of a finished phase with its own output and result."""
    phase = json.loads(phase_file.read_text())
    phase["recipe"]["values"]["per_device_train_batch_size"] //= 2
    phase["output"], phase["result"] = str(out / "model"), str(out / "result.json")
    phase["recipe"]["values"]["output_dir"] = str(out / "trainer")
    return train_phase.write_phase(out / "phase.json", **phase)


def test_training_phase_on_two_processes_matches_one(tiny_model_path, tmp_path, capsys, two_cpu_processes):
    """VAR's phase of a one-process compare, launched on 2 processes with half the rows per device: the same first
    loss (the weights are normalised over the whole step, across processes)."""
    out = tmp_path / "out"
    assert run(compare_argv(tiny_model_path, out, "--methods", "var"), capsys)[0] == 0
    one = json.loads((out / "phases" / "train_var.result.json").read_text())
    phase = _relaunch(out / "phases" / "train_var.json", tmp_path / "two")
    two = train_phase.train(phase, num_processes=2)
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-5)
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_compare_on_two_processes_matches_one(tiny_model_path, tmp_path, capsys, two_cpu_processes):
    """Every method of a compare launched on 2 processes (sampling, each training phase, evaluation): the same sampled
    groups and the same per-method first losses as in one process for the offline methods (the online ones sample
    their replies on each process from its own random stream: a finite loss)."""
    methods = ",".join(compare.METHODS)
    extra = ["--methods", methods, "--reward-range", "0,2", "--chunk-size", "2"]
    assert run(compare_argv(tiny_model_path, tmp_path / "one", *extra), capsys)[0] == 0
    code, printed, err = run(compare_argv(tiny_model_path, tmp_path / "two", *extra, "--num-processes", "2"), capsys)
    assert code == 0, err
    one, two = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("one", "two"))
    assert (tmp_path / "one" / "train_groups.jsonl").read_text() == (
        tmp_path / "two" / "train_groups.jsonl"
    ).read_text()
    online = ("online_var", "grpo")
    for method in compare.METHODS:
        first, launched = one["budgets"][method]["first_loss"], two["budgets"][method]["first_loss"]
        if method in online:  # each process samples its share of the replies from its own random stream
            assert launched is not None and math.isfinite(launched), method
        else:
            assert launched == pytest.approx(first, rel=1e-5), method
        assert two["budgets"][method]["layout"].endswith(" x 2")
    assert set(two["models"]) == set(one["models"])
    shutil.rmtree(tmp_path / "one")


@pytest.mark.parametrize("name", ["cpu_lora", "gpu_lora_bf16"])
def test_shipped_compare_training_settings_plan_every_method(name, tmp_path):
    """The example training settings in recipes/compare/ parse for every method (the GPU one on this CPU with
    `--set use_cpu=true`, at the 8-process layout its comment gives)."""
    import argparse

    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    extra = ["--set", "use_cpu=true", "--num-processes", "8", "--sequences-per-step", "64"] if "gpu" in name else []
    opts = parser.parse_args(["--config", str(ROOT / "recipes" / "compare" / f"{name}.yaml"), *extra])
    plan = compare.plan_training(opts, list(compare.METHODS), tmp_path)
    assert set(plan) == set(compare.METHODS) and all(p["peft"] == "LoRA" for p in plan.values())
    if "gpu" in name:
        assert plan["dpo"]["layout"] == "2 x 2 x 8" and plan["vcb"]["layout"] == "1 x 2 x 8"
        assert all(p["precision"] == "bf16" and p["checkpointing"] for p in plan.values())
