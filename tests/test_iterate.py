"""`trl-rw iterate` on the tiny offline model: two rounds end to end for every method, the reference kept at the
starting model (or updated per round), resuming after a finished round, refused option changes, and recipes."""

import json
from pathlib import Path

import pytest

from trl_rewardweighted.cli import main as cli_main

ROOT = Path(__file__).parent.parent
PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "Tell me about cats."]


def word_reward(prompts, completions):
    return [len(c.split()) / 10.0 for c in completions]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _argv(method, model, prompts, out, *extra):
    argv = ["iterate", "--method", method, "--model", str(model), "--prompts", str(prompts)]
    argv += ["--reward", "tests.test_iterate:word_reward", "--n", "2"]
    argv += ["--reward-range", "0,2"] if method == "reward_augmented_dpo" else []  # refused by the other methods
    argv += ["--max-new-tokens", "8", "--steps", "1", "--learning-rate", "1e-3", "--batch-size", "4"]
    return argv + ["--output-dir", str(out), "--no-progress", *extra]


def _metrics(out, k):
    return json.loads((out / f"round_{k}" / "metrics.json").read_text())


def _first_log(metrics):
    return metrics["train"]["log_history"][0]


def _check_layout(out, rounds):
    summary = json.loads((out / "iterate.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))
    for k in range(1, rounds + 1):
        d = out / f"round_{k}"
        for name in ("samples", "train_data", "model/config.json", "model/tokenizer_config.json", "metrics.json"):
            assert (d / name).exists(), f"round_{k}/{name}"
        metrics = _metrics(out, k)
        assert metrics["train"]["steps"] == 1
        assert metrics["sample_seed"] == k - 1  # --seed 0: round k samples with seed k - 1
        assert summary["rounds"][k - 1]["reward_mean"] == pytest.approx(metrics["reward_mean"])
        assert summary["rounds"][k - 1]["model"] == str(d / "model")
        # Round k samples the policy of round k - 1 (round 1: the starting model).
        assert metrics["policy"] == (str(Path(summary["rounds"][k - 2]["model"])) if k > 1 else metrics["reference"])
    assert summary["final"]["model"] == str(out / f"round_{rounds}" / "model")
    assert (out / "final_samples").exists()
    return summary


def test_iterate_var_reference_stays_initial_and_resume(tiny_model_path, prompts_file, tmp_path, capsys):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_rewardweighted.evaluation import completion_logps

    out = tmp_path / "var"
    assert cli_main(_argv("var", tiny_model_path, prompts_file, out, "--rounds", "1")) == 0
    round_1 = out / "round_1"
    stamps = {p: p.stat().st_mtime_ns for p in (round_1 / "metrics.json", round_1 / "model" / "model.safetensors")}
    capsys.readouterr()

    # Same command with more rounds: round 1 is skipped (its files untouched), round 2 starts from its model.
    assert cli_main(_argv("var", tiny_model_path, prompts_file, out, "--rounds", "2")) == 0
    log = capsys.readouterr().out
    assert "round 1/2: finished in an earlier run, skipped" in log
    assert "round 2/2\n" in log
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    _check_layout(out, 2)

    m1, m2 = _metrics(out, 1), _metrics(out, 2)
    assert m1["reference"] == m2["reference"] == tiny_model_path
    assert m2["policy"] == str(round_1 / "model")
    # Round 1 samples the reference itself: no correction, ref_weighting off, no log-prob columns.
    assert m1["train"]["ref_weighting"] is False
    assert "ref_logps" not in load_from_disk(str(round_1 / "train_data")).column_names
    # Round 2: the reference log-probs are the starting model's, not the round-1 policy's, and the weights get
    # log pi_ref - log pi_sampler.
    assert m2["train"]["ref_weighting"] is True
    groups = load_from_disk(str(out / "round_2" / "samples"))
    rows = load_from_disk(str(out / "round_2" / "train_data"))

    def logps(path):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        values = completion_logps(model, AutoTokenizer.from_pretrained(path), groups["prompt"], groups["completions"])
        return [v for group in values for v in group]

    initial, sampler = logps(tiny_model_path), logps(str(round_1 / "model"))
    assert rows["reference_logps"] == pytest.approx(initial, abs=1e-4)
    assert rows["sampler_logps"] == pytest.approx(sampler, abs=1e-4)
    assert rows["ref_logps"] == pytest.approx([a - b for a, b in zip(initial, sampler)], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(initial, sampler)) > 1e-2  # round 1 did change the policy

    # A changed option is refused, naming it; nothing is run.
    with pytest.raises(SystemExit) as err:
        cli_main(_argv("var", tiny_model_path, prompts_file, out, "--rounds", "3", "--beta", "0.5"))
    assert err.value.code == 2
    assert "--beta is 0.5 but the run in" in capsys.readouterr().err
    assert not (out / "round_3").exists()
    # Other prompts under the same option are refused too.
    prompts_file.write_text("Something else.\n")
    with pytest.raises(SystemExit):
        cli_main(_argv("var", tiny_model_path, prompts_file, out, "--rounds", "3"))
    assert "--prompts: the prompts differ" in capsys.readouterr().err


def test_iterate_var_update_reference(tiny_model_path, prompts_file, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "var-update"
    assert cli_main(_argv("var", tiny_model_path, prompts_file, out, "--rounds", "2", "--update-reference")) == 0
    m2 = _metrics(out, 2)
    assert m2["reference"] == m2["policy"] == str(out / "round_1" / "model")
    assert m2["train"]["ref_weighting"] is False  # the reference is the sampler: softmax(r / beta)
    assert "ref_logps" not in load_from_disk(str(out / "round_2" / "train_data")).column_names


# The first logged step of each round reports the policy against the reference before any update: 0 in round 1
# (the policy is the reference), not 0 in round 2 when the reference stays the starting model.
_REFERENCE_GAP = {"vcb": "logratio", "dpo": "rewards/chosen", "reward_augmented_dpo": "rewards/chosen"}


@pytest.mark.parametrize(
    "method",
    # DPO and SFT (a few seconds each) run with -m slow, to spare the default suite's time budget.
    [
        "vcb",
        "reward_augmented_dpo",
        pytest.param("dpo", marks=pytest.mark.slow),
        pytest.param("sft", marks=pytest.mark.slow),
    ],
)
def test_iterate_two_rounds_each_method(method, tiny_model_path, prompts_file, tmp_path):
    out = tmp_path / method
    assert cli_main(_argv(method, tiny_model_path, prompts_file, out, "--rounds", "2")) == 0
    _check_layout(out, 2)
    m1, m2 = _metrics(out, 1), _metrics(out, 2)
    assert m1["reference"] == m2["reference"] == tiny_model_path
    key = _REFERENCE_GAP.get(method)
    if key:
        assert abs(_first_log(m1)[key]) < 1e-5
        assert abs(_first_log(m2)[key]) > 1e-4


def test_iterate_recipe_overrides_and_unknown_keys(tmp_path, capsys):
    recipe = tmp_path / "iterate.yaml"
    recipe.write_text("method: vcb\nrounds: 3\nlearning_rate: 1e-5\nupdate_reference: true\nsteps: 2\n")
    assert cli_main(["iterate", "--config", str(recipe), "--rounds", "5", "--check"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "vcb" and shown["rounds"] == 5 and shown["learning_rate"] == 1e-5
    assert shown["update_reference"] is True and shown["steps"] == 2 and shown["n"] == 4  # the default

    recipe.write_text("method: var\nroundz: 3\n")
    with pytest.raises(SystemExit) as err:
        cli_main(["iterate", "--config", str(recipe), "--check"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "unknown key `roundz`" in message and "Did you mean `rounds`?" in message


def test_shipped_iterate_recipe(capsys):
    from trl_rewardweighted.scripts.check_recipe import check_recipe

    recipe = ROOT / "trl_rewardweighted" / "recipes" / "quickstart" / "iterate_var.yaml"
    assert cli_main(["iterate", "--config", str(recipe), "--check"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "var" and shown["model"] == "smollm2" and shown["rounds"] == 2
    report = check_recipe(recipe)
    assert report.ok and report.method == "iterate"


# ----------------------------------------------------------------------------------------------------------------------
# Training settings like a recipe (`training`), launched training phases
# ----------------------------------------------------------------------------------------------------------------------

TRAINING = {
    "bf16": True,
    "use_peft": True,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
    "activation_checkpointing": True,
}


@pytest.mark.parametrize("method", ["var", "dpo"])
def test_iterate_training_block_reaches_the_trainers(
    method, tiny_model_path, prompts_file, tmp_path, monkeypatch, capsys
):
    """The `training` block of an iterate recipe: bf16 (CPU autocast here) and LoRA reach every round's trainer; each
    round saves its adapter and the merged model the next round starts from, the base model unchanged."""
    import hashlib

    import yaml

    from trl_rewardweighted import methods

    seen = []
    real = methods.build_trainer

    def spy(*args, **kwargs):
        trainer = real(*args, **kwargs)
        seen.append(trainer)
        return trainer

    monkeypatch.setattr(methods, "build_trainer", spy)
    recipe = tmp_path / "iterate.yaml"
    recipe.write_text(yaml.safe_dump({"rounds": 2, "training": TRAINING}))
    weights = Path(tiny_model_path) / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert cli_main(_argv(method, tiny_model_path, prompts_file, out, "--config", recipe)) == 0
    assert len(seen) == 2
    for trainer in seen:
        assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
        assert type(trainer.model).__name__.startswith("Peft") and trainer.model.is_gradient_checkpointing
    for k in (1, 2):
        d = out / f"round_{k}"
        assert (d / "adapter" / "adapter_config.json").exists() and (d / "model" / "model.safetensors").exists()
        train = _metrics(out, k)["train"]
        assert train["peft"] is True and train["mixed_precision"] == "bf16" and train["activation_checkpointing"]
    assert _metrics(out, 2)["policy"] == str(out / "round_1" / "model")  # the merged model of round 1
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    # A resumed run keeps its training settings: a changed key is refused, naming it.
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({"rounds": 3, "training": {**TRAINING, "lora_r": 8}}))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(_argv(method, tiny_model_path, prompts_file, out, "--config", changed))
    assert "error: --training: `lora_r` is 8 but the run in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "training, message",
    [
        (
            {"learning_rate": 1e-3},
            "--training {path}: `learning_rate` is set by --learning-rate in this command; remove it.",
        ),
        (
            {"lora_rnk": 4},
            "--training {path}: unknown key `lora_rnk`: not a field of the methods' configs or of ModelConfig.",
        ),
        (
            {"methods": {"dpo": {"beta": 0.1}}},
            "--training {path}: settings for dpo, which is not a method of this run (var).",
        ),
        ({"gradient_accumulation_steps": 3}, "var: a step of 4 rows (--batch-size 4) does not split into"),
        ({"use_peft": True, "load_in_4bit": True}, "var: load_in_4bit (QLoRA) needs a CUDA GPU"),
    ],
)
def test_iterate_refuses_bad_training_settings_before_sampling(
    tiny_model_path, prompts_file, tmp_path, capsys, monkeypatch, training, message
):
    import torch
    import yaml

    from trl_rewardweighted import iterate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(iterate, "_sample", lambda *a, **k: pytest.fail("sampling started"))
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump(training))
    with pytest.raises(SystemExit) as err:  # given on the command line as a file
        cli_main(_argv("var", tiny_model_path, prompts_file, tmp_path / "out", "--training", path))
    assert err.value.code == 2
    assert message.format(path=path) in capsys.readouterr().err
    assert not (tmp_path / "out" / "iterate.json").exists()


@pytest.mark.slow
def test_iterate_training_phase_on_two_processes(tiny_model_path, prompts_file, tmp_path, monkeypatch):
    """`--num-processes 2`: every round's sampling (`trl-rw sample`) and training run as 2-process launches on the CPU;
    the samples are those of one process, and the first loss of round 1 too."""
    import os

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(ROOT)
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(_argv("var", tiny_model_path, prompts_file, one, "--rounds", "1")) == 0
    argv = _argv("var", tiny_model_path, prompts_file, two, "--rounds", "1", "--num-processes", "2")
    assert cli_main(argv) == 0
    from datasets import load_from_disk

    samples = [load_from_disk(str(d / "round_1" / "samples")).to_dict() for d in (one, two)]
    assert samples[0]["completions"] == samples[1]["completions"]
    first = [_first_log(_metrics(d, 1))["loss"] for d in (one, two)]
    assert first[1] == pytest.approx(first[0], rel=1e-5)
    assert _metrics(two, 1)["train"]["num_processes"] == 2
