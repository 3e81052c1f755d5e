"""The quickstart's code path (sample -> score -> VAR -> re-sample) on the tiny model; the real run is `make demo`."""

import json

import pytest

from trl_rewardweighted import quickstart


def test_prompts_file_has_train_and_heldout_prompts():
    prompts = quickstart.read_prompts()
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)


def test_quickstart_runs_on_tiny_model(tmp_path, capsys):
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("matplotlib")
    out = tmp_path / "qs"
    summary = quickstart.main(
        ["--model", "tiny", "--output-dir", str(out), "--num-train-prompts", "4", "--num-eval-prompts", "2",
         "--candidates", "2", "--eval-samples", "2", "--max-new-tokens", "6", "--epochs", "1", "--batch-size", "4"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| before  |" in printed and "| after   |" in printed and "change in mean reward" in printed
    assert summary["train_rows"] == 8 and summary["train_steps"] == 2
    assert (out / "quickstart.png").stat().st_size > 10_000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["mean_reward_before"] == summary["mean_reward_before"]
    assert len(saved["examples"]) == 2
    assert (out / "train_rows.jsonl").exists()


@pytest.mark.slow
def test_quickstart_real_smollm2_improves_reward(tmp_path):
    """The real demo (several minutes on CPU): the held-out VADER reward must go up."""
    pytest.importorskip("vaderSentiment")
    summary = quickstart.main(["--output-dir", str(tmp_path / "qs")])
    assert summary["mean_reward_after"] > summary["mean_reward_before"]
