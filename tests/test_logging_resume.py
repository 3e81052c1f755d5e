"""Launch at scale: each trainer's own metrics reach TensorBoard (`report_to="tensorboard"`, as in TRL), and a recipe
with `resume_from_checkpoint: true` resumes from the last checkpoint in `output_dir`."""

from pathlib import Path

import pytest
from datasets import Dataset

from tests._helpers import cpu_args
from tests.distributed.var_grad_layout import ROWS
from trl_rewardweighted.scripts.train import main, resolve_resume_checkpoint

pytest.importorskip("tensorboard", reason="tensorboard is in the `dev` extra")

ROOT = Path(__file__).parent.parent
VAR_RECIPE = str(ROOT / "trl_rewardweighted/recipes/var/smollm2-135m/config_full.yaml")
CPU_FLAGS = [
    f"--{k}={v}" for k, v in cpu_args().items() if k not in ("disable_tqdm", "dataloader_num_workers", "logging_steps")
]


def read_scalars(log_dir):
    """{tag: [(step, value), ...]} from every TensorBoard event file under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    scalars = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def assert_logged(trainer, scalars, keys):
    """Each key of the trainer's log history is in TensorBoard as `train/<key>`, same steps, same values."""
    for key in keys:
        expected = [(e["step"], e[key]) for e in trainer.state.log_history if key in e]
        assert expected, f"{key} is not in the log history: {trainer.state.log_history}"
        got = scalars.get(f"train/{key}")
        assert got is not None, f"train/{key} not in TensorBoard tags {sorted(scalars)}"
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# report_to="tensorboard"
# ------------------------------------------------------------------------------------------------------------------


def test_var_metrics_reach_tensorboard(tiny_model_path, tmp_path, monkeypatch):
    from trl_rewardweighted import VARConfig, VARTrainer

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    rows = {k: list(v) for k, v in ROWS.items()}
    rows["reward"] = [1.0, float("nan"), 0.3, 2.0]  # one row skipped per epoch, counted
    args = VARConfig(
        **cpu_args(
            output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="tensorboard"
        )
    )
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    scalars = read_scalars(tmp_path / "tb")
    assert_logged(trainer, scalars, ["loss", "var/ess", "var/max_weight", "var/weighted_reward", "var/rows_skipped"])
    assert [v for _, v in scalars["train/var/rows_skipped"]] == [1.0, 2.0]  # cumulative


def test_vcb_metrics_reach_tensorboard(tiny_model_path, tmp_path, monkeypatch):
    from tests.test_vcb_trainer import strings
    from trl_rewardweighted import VCBConfig, VCBTrainer

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = VCBConfig(
        **cpu_args(
            output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to="tensorboard"
        )
    )
    trainer = VCBTrainer(model=tiny_model_path, args=args, train_dataset=strings())
    trainer.train()
    scalars = read_scalars(tmp_path / "tb")
    assert_logged(
        trainer, scalars, ["loss", "calibration_error", "pair_agreement", "sigma", "groups_skipped", "logratio"]
    )


def test_ra_dpo_augment_counts_reach_tensorboard(tiny_model_path, tmp_path, monkeypatch):
    from tests.test_ra_dpo_trainer import pairs
    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = RewardAugmentedDPOConfig(
        **cpu_args(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=4,
            max_length=None,
            report_to="tensorboard",
        )
    )
    trainer = RewardAugmentedDPOTrainer(tiny_model_path, args=args, train_dataset=pairs())
    trainer.train()
    scalars = read_scalars(tmp_path / "tb")
    augment = [f"augment/{k}" for k in ("pairs_in", "pairs_selected", "dropped_nonfinite", "dropped_ties", "rows_out")]
    assert_logged(trainer, scalars, ["loss", "rewards/accuracies", *augment])
    # Once, in the first training log entry: 4 pairs in, all selected, 2 rows out per pair.
    assert {k: scalars[f"train/{k}"] for k in augment} == {
        "augment/pairs_in": [(1, 4.0)],
        "augment/pairs_selected": [(1, 4.0)],
        "augment/dropped_nonfinite": [(1, 0.0)],
        "augment/dropped_ties": [(1, 0.0)],
        "augment/rows_out": [(1, 8.0)],
    }


# ------------------------------------------------------------------------------------------------------------------
# resume_from_checkpoint from a recipe / the command line
# ------------------------------------------------------------------------------------------------------------------


def _var_argv(tiny_model_path, data, out, *extra):
    return [
        "--config", VAR_RECIPE, "--model_name_or_path", tiny_model_path, "--dataset_name", str(data),
        "--dtype", "float32", "--output_dir", str(out), "--per_device_train_batch_size", "2", *CPU_FLAGS,
        "--logging_steps", "1", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["command_line", "recipe"])
def test_resume_from_checkpoint_true_resumes_from_last_checkpoint(tiny_model_path, tmp_path, where):
    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    out = tmp_path / "out"
    first = main("var", _var_argv(tiny_model_path, data, out, "--max_steps", "2", "--save_strategy", "steps",
                                  "--save_steps", "1"))  # fmt: skip
    assert first.state.global_step == 2
    assert (out / "checkpoint-2").is_dir()

    if where == "recipe":
        recipe = tmp_path / "resume.yaml"
        recipe.write_text(Path(VAR_RECIPE).read_text() + "\nresume_from_checkpoint: true\n")
        argv = _var_argv(tiny_model_path, data, out, "--max_steps", "3")
        argv[argv.index(VAR_RECIPE)] = str(recipe)
    else:
        argv = _var_argv(tiny_model_path, data, out, "--max_steps", "3", "--resume_from_checkpoint", "true")
    second = main("var", argv)
    assert second.state.global_step == 3
    # Started from checkpoint-2: the history restored from it holds steps 1-2, and only step 3 was trained here.
    steps = [e["step"] for e in second.state.log_history if "loss" in e]
    assert steps == [1, 2, 3]
    assert [e["loss"] for e in second.state.log_history if "loss" in e][:2] == [
        e["loss"] for e in first.state.log_history if "loss" in e
    ]


def test_resume_from_checkpoint_false_trains_from_scratch(tiny_model_path, tmp_path):
    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)  # would break a resume: not a valid checkpoint
    trainer = main(
        "var", _var_argv(tiny_model_path, data, out, "--max_steps", "1", "--resume_from_checkpoint", "false")
    )
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1]


def test_resume_from_checkpoint_true_without_checkpoint_is_an_error(tiny_model_path, tmp_path):
    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    out = tmp_path / "empty-out"
    with pytest.raises(ValueError, match=r"resume_from_checkpoint is true, but there is no checkpoint in output_dir"):
        main("var", _var_argv(tiny_model_path, data, out, "--max_steps", "1", "--resume_from_checkpoint", "true"))


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), (False, None), ("false", None), ("False", None), ("no", None), ("", None),
     (True, "checkpoint-7"), ("true", "checkpoint-7"), ("TRUE", "checkpoint-7"), ("yes", "checkpoint-7")],
)  # fmt: skip
def test_resolve_resume_checkpoint(tmp_path, value, expected):
    for step in (3, 7):
        (tmp_path / f"checkpoint-{step}").mkdir()
    result = resolve_resume_checkpoint(value, str(tmp_path))
    assert result == (None if expected is None else str(tmp_path / expected))


def test_resolve_resume_checkpoint_path(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "elsewhere") == str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match=r"resume_from_checkpoint: .*nope.* is not a folder"):
        resolve_resume_checkpoint(str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(ValueError, match=r"there is no checkpoint in output_dir .*missing"):
        resolve_resume_checkpoint("true", str(tmp_path / "missing"))
