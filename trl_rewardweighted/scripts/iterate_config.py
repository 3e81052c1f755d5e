"""The options of `trl-rw iterate` as a dataclass, parsed by TRL's `TrlParser` like every recipe: `trl-rw iterate`
([`~trl_rewardweighted.iterate`]) runs them, `trl-rw check-recipe` validates `iterate*.yaml` recipes with the same
parser. (Kept here, beside the launch scripts' parser, so that `check-recipe` reaches it without importing the
`iterate` command.)"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields

__all__ = ["BACKENDS", "METHODS", "OWNED_SETTINGS", "IterateConfig", "make_parser"]

METHODS = ("var", "vcb", "reward_augmented_dpo", "dpo", "sft")
DEFAULT_REWARD = "trl_rewardweighted.rewards:vader_positivity"
BACKENDS = ("transformers", "vllm", "auto")


def _option(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class IterateConfig:
    """The options of `trl-rw iterate`: `--name-with-dashes` (or `--name_with_underscores`) on the command line,
    `name_with_underscores` in a recipe (`--config`), parsed by [`make_parser`] (TRL's `TrlParser`), as the trainers'
    recipes are. `__post_init__` checks the values."""

    method: str | None = _option(None, f"the offline trainer run in every round (required): {', '.join(METHODS)}")
    model: str = _option("smollm2", "starting model: 'smollm2' (offline SmolLM2-135M-Instruct), 'tiny', or a path")
    reward: str = _option(DEFAULT_REWARD, "reward model path or `module:function` (default: VADER positivity)")
    prompts: str | None = _option(
        None,
        "prompt file (.txt one per line, '#' lines skipped) or dataset file / folder with a `prompt` column "
        "(default: the packaged quickstart prompts)",
    )
    num_prompts: int | None = _option(
        None, "use the first N prompts (default: all; with the packaged prompts, their 24 training prompts)"
    )
    rounds: int = _option(2, "number of rounds (may be raised when resuming)")
    n: int = _option(4, "sampled replies per prompt in each round")
    max_new_tokens: int = _option(40, "longest sampled reply, in tokens")
    temperature: float = _option(1.0, "sampling temperature")
    top_p: float = _option(1.0, "nucleus sampling")
    gen_batch_size: int = _option(8, "prompts per generate call")
    backend: str = _option(
        "transformers",
        "generation backend: transformers, vllm or auto; 'vllm' (or 'auto') runs vLLM in the training process, which "
        "must leave room for it",
    )
    # `float | str`: the command line's `--goal-score none` arrives as a string; __post_init__ makes it a float or None.
    goal_score: float | str | None = _option(
        10.0,
        "reward_augmented_dpo only: from round 2 on, sample the trained (goal-conditioned) policy under this goal on "
        "the 1-10 scale, as at inference; 'none' samples without a goal",
    )
    steps: int | None = _option(None, "optimizer steps per round (default: --epochs epochs of the round's data)")
    epochs: float = _option(1.0, "epochs per round over the round's data, when --steps is not given")
    batch_size: int = _option(
        8, "completions per optimizer step: VAR and SFT rows, DPO / reward-augmented DPO pairs count 2, VCB groups --n"
    )
    learning_rate: float = _option(2e-5, "learning rate (constant schedule)")
    max_length: int = _option(256, "longest training sequence (prompt + reply) for VAR, VCB, DPO and SFT")
    beta: float = _option(0.2, "VAR temperature of the weights (VADER rewards lie in [-1, 1])")
    beta_dpo: float = _option(0.1, "DPO and reward-augmented DPO beta")
    gamma: float = _option(0.05, "VCB gamma")
    reward_range: str = _option(
        "-1,1",
        "reward-augmented DPO: the reward's range 'lo,hi' mapped to the 1-10 goal scale, or 'auto' (each round's "
        "min and max)",
    )
    update_reference: bool = _option(
        False, "use the policy each round starts from as its reference (default: the starting model in every round)"
    )
    seed: int = _option(0, "round k samples with seed + k - 1 and trains with the same seed")
    training: dict | str | None = _option(
        None,
        "training settings like a recipe (as `trl-rw compare --config`): a YAML file, or in a recipe the mapping itself; "
        "keys of the method's config and of TRL's ModelConfig (bf16, use_peft, lora_r, activation_checkpointing, "
        "gradient_accumulation_steps, lr_scheduler_type, deepspeed, ...), `methods: {METHOD: {...}}`, `preset: "
        "cpu-demo|gpu-bf16|none` (default: cpu-demo). The options above that are training settings (learning_rate, "
        "max_length, beta, beta_dpo, gamma, seed, batch_size, steps, epochs) stay options",
    )
    accelerate_config: str | None = _option(
        None,
        "run each round's sampling (trl-rw sample) and training as an `accelerate launch` with this config: a path or "
        "a name (this package's, then TRL's: multi_gpu, zero3, ...)",
    )
    num_processes: int | None = _option(
        None, "processes of each launched phase (overrides the accelerate config's; without one, data-parallel)"
    )
    chunk_size: int = _option(
        256,
        "prompts per chunk of the sampling phases: the unit split over processes and resumed; the samples depend on "
        "it, not on the number of processes",
    )
    output_dir: str = _option("iterate_output", "where the rounds, iterate.json and the final samples go")
    overwrite: bool = _option(False, "delete the rounds already in --output-dir and start over")
    no_progress: bool = _option(False, "hide progress bars")

    def __post_init__(self):
        from trl_rewardweighted.methods import resolve_method_name

        for f in fields(self):  # a recipe's values reach here unconverted unless they are strings
            value, kind = getattr(self, f.name), _KINDS.get(f.name)
            if kind is not None and value is not None and not _is_kind(value, kind):
                raise ValueError(f"--{_dash(f.name)} must be {_KIND_NAMES[kind]}, got {value!r}.")
        if isinstance(self.goal_score, str):
            text = self.goal_score.strip().lower()
            self.goal_score = None if text in ("none", "null", "") else _to_float(self.goal_score, "goal_score")
        if self.method is None:
            raise ValueError(f"Give --method (or `method:` in the recipe): one of {', '.join(METHODS)}.")
        self.method = resolve_method_name(self.method, METHODS, what="--method")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        for name in ("rounds", "n", "max_new_tokens", "gen_batch_size", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_dash(name)} must be >= 1, got {getattr(self, name)}.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}.")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}.")
        for name in ("learning_rate", "beta", "beta_dpo", "gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{_dash(name)} must be a finite number > 0, got {value}.")
        if self.method == "vcb" and self.n < 2:
            raise ValueError("--method vcb needs --n >= 2: VCB calibrates the replies of a prompt against each other.")
        if self.method in ("dpo", "reward_augmented_dpo") and self.n < 2:
            raise ValueError(f"--method {self.method} needs --n >= 2 to build best-against-worst pairs.")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}.")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}.")
        if self.training is not None:
            self.training = _training_block(self.training, self.method)


# The training settings that `trl-rw iterate` sets itself: its own options, or what each round decides.
OWNED_SETTINGS = {
    "output_dir": "--output-dir",
    "max_steps": "--steps",
    "num_train_epochs": "--epochs",
    "per_device_train_batch_size": "--batch-size (split over gradient_accumulation_steps and the processes)",
    "model_name_or_path": "--model",
    "learning_rate": "--learning-rate",
    "max_length": "--max-length",
    "beta": "--beta / --beta-dpo",
    "gamma": "--gamma",
    "seed": "--seed",
    "ref_weighting": "each round (from its sampler and reference)",
    "score_range": "--reward-range",
}


def _training_block(value, method: str) -> dict:
    """The training settings as a mapping (a YAML file is read), checked against `method`'s config and
    `ModelConfig`: unknown keys and the keys iterate sets itself are refused, naming them."""
    from trl_rewardweighted.methods import check_block_keys, read_training_block

    block = read_training_block(value, option="--training")
    check_block_keys(block, {method: method}, OWNED_SETTINGS)
    return block.as_mapping()


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _to_float(value, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--{_dash(name)} must be a number or 'none', got {value!r}.") from None


def _is_kind(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
# The scalar type of each option (`goal_score` is checked by its own rule).
_KINDS = {
    name: next((k for k in (bool, int, float, str) if k in typing.get_args(tp) or tp is k), None)
    for name, tp in typing.get_type_hints(IterateConfig).items()
    if name not in ("goal_score", "training")
}


def make_parser():
    """`TrlParser((IterateConfig,))`: the parser of `trl-rw iterate`'s options and recipes."""
    from trl import TrlParser

    return TrlParser((IterateConfig,), prog="trl-rw iterate")
