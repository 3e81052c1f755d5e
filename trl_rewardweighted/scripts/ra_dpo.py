"""Deprecated launch entry point, kept for old commands: use `-m trl_rewardweighted.scripts.reward_augmented_dpo`
(this one warns with a `FutureWarning` and runs it)."""

from trl_rewardweighted.scripts.train import run

if __name__ == "__main__":
    run("ra_dpo")
