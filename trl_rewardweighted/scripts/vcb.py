"""Launch entry point: `accelerate launch -m trl_rewardweighted.scripts.vcb --config RECIPE.yaml [--flag value ...]`."""

from trl_rewardweighted.scripts.train import run

if __name__ == "__main__":
    run("vcb")
