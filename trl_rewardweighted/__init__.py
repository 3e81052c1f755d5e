"""trl-rewardweighted: alignment trainers for TRL that use reward *values*, not only preference order.

- `VARTrainer` / `VARConfig`: reward-weighted SFT from the variational view of RLHF (arXiv 2502.11026).
- `VCBTrainer` / `VCBConfig`: value-based calibration over n scored responses per prompt (arXiv 2402.16030).
- `OnlineVARTrainer` / `OnlineVARConfig`: VAR on completions sampled from the current policy during training, with
  the normaliser estimated per prompt (built on TRL's `GRPOTrainer`).
- `RewardAugmentedDPOTrainer` / `RewardAugmentedDPOConfig` and `reward_augment_dataset`: reward-conditioned
  relabeling of preference pairs, then DPO (arXiv 2410.08067).
- `WeightedSFTTrainer` / `WeightedSFTConfig` and `WeightedDPOTrainer` / `WeightedDPOConfig`: TRL's SFT and DPO with a
  `sample_weight` per row, normalised over the whole optimizer step (see `docs/weights.md`).

Names are imported lazily so that `import trl_rewardweighted` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:  # the version is kept once, in pyproject.toml, and read from the installed package's metadata
    __version__ = version("trl-rewardweighted")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "VARConfig": "trl_rewardweighted.trainers.var_config",
    "VARTrainer": "trl_rewardweighted.trainers.var_trainer",
    "VCBConfig": "trl_rewardweighted.trainers.vcb_config",
    "VCBTrainer": "trl_rewardweighted.trainers.vcb_trainer",
    "OnlineVARConfig": "trl_rewardweighted.trainers.online_var_config",
    "OnlineVARTrainer": "trl_rewardweighted.trainers.online_var_trainer",
    "RewardAugmentedDPOConfig": "trl_rewardweighted.trainers.ra_dpo_config",
    "RewardAugmentedDPOTrainer": "trl_rewardweighted.trainers.ra_dpo_trainer",
    "WeightedSFTConfig": "trl_rewardweighted.trainers.weighted_sft_config",
    "WeightedSFTTrainer": "trl_rewardweighted.trainers.weighted_sft_trainer",
    "WeightedDPOConfig": "trl_rewardweighted.trainers.weighted_dpo_config",
    "WeightedDPOTrainer": "trl_rewardweighted.trainers.weighted_dpo_trainer",
    "reward_augment_dataset": "trl_rewardweighted.data.relabel",
    "AugmentOptions": "trl_rewardweighted.data.relabel",
    "build_goal_prompt": "trl_rewardweighted.data.relabel",
    "generate_with_goal": "trl_rewardweighted.sampling",
    "implicit_reward_relabel": "trl_rewardweighted.ira",
    "generate_completions": "trl_rewardweighted.sampling",
    "score_completions": "trl_rewardweighted.sampling",
    "groups_to_rows": "trl_rewardweighted.data.convert",
    "groups_to_pairs": "trl_rewardweighted.data.convert",
    "var_weights": "trl_rewardweighted.losses",
    "var_loss": "trl_rewardweighted.losses",
    "var_prompt_loss": "trl_rewardweighted.losses",
    "var_prompt_weights": "trl_rewardweighted.losses",
    "online_var_weights": "trl_rewardweighted.losses",
    "vcb_loss": "trl_rewardweighted.losses",
}

__all__ = [
    "AugmentOptions",
    "OnlineVARConfig",
    "OnlineVARTrainer",
    "RewardAugmentedDPOConfig",
    "RewardAugmentedDPOTrainer",
    "VARConfig",
    "VARTrainer",
    "VCBConfig",
    "VCBTrainer",
    "WeightedDPOConfig",
    "WeightedDPOTrainer",
    "WeightedSFTConfig",
    "WeightedSFTTrainer",
    "__version__",
    "build_goal_prompt",
    "generate_completions",
    "generate_with_goal",
    "groups_to_pairs",
    "groups_to_rows",
    "implicit_reward_relabel",
    "online_var_weights",
    "reward_augment_dataset",
    "score_completions",
    "var_loss",
    "var_prompt_loss",
    "var_prompt_weights",
    "var_weights",
    "vcb_loss",
]
assert set(__all__) == set(_LAZY) | {"__version__"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_rewardweighted' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .data.convert import groups_to_pairs, groups_to_rows
    from .data.relabel import AugmentOptions, build_goal_prompt, reward_augment_dataset
    from .ira import implicit_reward_relabel
    from .losses import online_var_weights, var_loss, var_prompt_loss, var_prompt_weights, var_weights, vcb_loss
    from .sampling import generate_completions, generate_with_goal, score_completions
    from .trainers.online_var_config import OnlineVARConfig
    from .trainers.online_var_trainer import OnlineVARTrainer
    from .trainers.ra_dpo_config import RewardAugmentedDPOConfig
    from .trainers.ra_dpo_trainer import RewardAugmentedDPOTrainer
    from .trainers.var_config import VARConfig
    from .trainers.var_trainer import VARTrainer
    from .trainers.vcb_config import VCBConfig
    from .trainers.vcb_trainer import VCBTrainer
    from .trainers.weighted_dpo_config import WeightedDPOConfig
    from .trainers.weighted_dpo_trainer import WeightedDPOTrainer
    from .trainers.weighted_sft_config import WeightedSFTConfig
    from .trainers.weighted_sft_trainer import WeightedSFTTrainer
