"""Launch entry point: `accelerate launch -m trl_rewardweighted.scripts.ra_dpo --config RECIPE.yaml [--flag value ...]`."""

from trl_rewardweighted.scripts.train import run

if __name__ == "__main__":
    run("ra_dpo")
