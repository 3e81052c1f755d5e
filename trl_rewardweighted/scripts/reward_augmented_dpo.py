"""Launch entry point: `accelerate launch -m trl_rewardweighted.scripts.reward_augmented_dpo --config RECIPE.yaml
[--flag value ...]`."""

from trl_rewardweighted.scripts.train import run

if __name__ == "__main__":
    run("reward_augmented_dpo")
