"""generate -> score (tiny reward model) -> the three dataset shapes, written to disk by the CLI, read back and trained
by each trainer on the tiny model."""

import math

import pytest

from tests._helpers import cpu_args
from trl_rewardweighted.cli import main as cli_main
from trl_rewardweighted.data.convert import load_dataset_any


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model_path, tiny_reward_model_path):
    out = tmp_path_factory.mktemp("round-trip")
    prompts = out / "prompts.txt"
    prompts.write_text("The cat\nA small dog\nThe sky\nMy friend\n")
    argv = ["sample", "--model", tiny_model_path, "--prompts", str(prompts), "--n", "3", "--max-new-tokens", "6"]
    argv += ["--scorer", tiny_reward_model_path, "--no-progress"]
    argv += ["--output-groups", str(out / "groups.jsonl"), "--output-rows", str(out / "rows.parquet")]
    argv += ["--output-pairs", str(out / "pairs")]
    assert cli_main(argv) == 0
    return out


def test_groups_train_vcb(sampled, tiny_model_path, tmp_path):
    from trl_rewardweighted import VCBConfig, VCBTrainer

    groups = load_dataset_any(sampled / "groups.jsonl")
    assert len(groups) == 4 and all(
        len(c) == 3 and len(r) == 3 for c, r in zip(groups["completions"], groups["rewards"])
    )
    args = VCBConfig(**cpu_args(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gamma=1.0))
    trainer = VCBTrainer(model=tiny_model_path, args=args, train_dataset=groups)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_rows_train_var(sampled, tiny_model_path, tmp_path):
    from trl_rewardweighted import VARConfig, VARTrainer

    rows = load_dataset_any(sampled / "rows.parquet")
    assert len(rows) == 12 and {"prompt", "completion", "reward"} <= set(rows.column_names)
    args = VARConfig(**cpu_args(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, beta=0.1))
    trainer = VARTrainer(model=tiny_model_path, args=args, train_dataset=rows)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_pairs_train_reward_augmented_dpo(sampled, tiny_model_path, tmp_path):
    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer

    pairs = load_dataset_any(sampled / "pairs")
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(pairs.column_names)
    assert all(c > r for c, r in zip(pairs["score_chosen"], pairs["score_rejected"]))
    args = RewardAugmentedDPOConfig(
        **cpu_args(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, score_range="auto")
    )
    trainer = RewardAugmentedDPOTrainer(model=tiny_model_path, args=args, train_dataset=pairs)
    assert len(trainer.train_dataset) == 2 * len(pairs)  # both goals, no ties (distinct reward-model scores)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
