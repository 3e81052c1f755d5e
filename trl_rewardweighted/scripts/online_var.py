"""Launch entry point: `accelerate launch -m trl_rewardweighted.scripts.online_var --config RECIPE.yaml [--flag ...]`."""

from trl_rewardweighted.scripts.train import run

if __name__ == "__main__":
    run("online_var")
