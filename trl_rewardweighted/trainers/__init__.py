"""One pair of modules per method, as in TRL: `<method>_config.py` (the config dataclass) and
`<method>_trainer.py` (the trainer).

The trainers and configs are also importable from here (lazily, so that importing one does not import the others):
`from trl_rewardweighted.trainers import WeightedSFTTrainer`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "VARConfig": ".var_config",
    "VARTrainer": ".var_trainer",
    "VCBConfig": ".vcb_config",
    "VCBTrainer": ".vcb_trainer",
    "OnlineVARConfig": ".online_var_config",
    "OnlineVARTrainer": ".online_var_trainer",
    "RewardAugmentedDPOConfig": ".ra_dpo_config",
    "RewardAugmentedDPOTrainer": ".ra_dpo_trainer",
    "WeightedSFTConfig": ".weighted_sft_config",
    "WeightedSFTTrainer": ".weighted_sft_trainer",
    "WeightedDPOConfig": ".weighted_dpo_config",
    "WeightedDPOTrainer": ".weighted_dpo_trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_rewardweighted.trainers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
