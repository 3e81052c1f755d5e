"""`trl_rewardweighted.methods`: the one table of methods and its builders. Every method builds its trainer on the tiny
model from the `cpu-demo` preset, with the caller's settings (accumulation, LoRA, a `ModelConfig`) reaching the
trainer; `trl-rw train` runs every launch method (online VAR included); the deprecated name `ra_dpo` warns and runs."""

import runpy
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from tests._helpers import cpu_args
from tests.distributed.zero3_trainers import PROMPTS, RA_DPO_ROWS, VAR_ROWS, VCB_ROWS
from trl_rewardweighted import methods
from trl_rewardweighted.cli import main as cli_main

ROOT = Path(__file__).parent.parent
CHAT_PROMPTS = [[{"role": "user", "content": p}] for p in PROMPTS]
DATA = {
    "rows": VAR_ROWS,
    "groups": VCB_ROWS,
    "scored_pairs": RA_DPO_ROWS,
    "pairs": {k: RA_DPO_ROWS[k] for k in ("prompt", "chosen", "rejected")},
    "completions": {"prompt": CHAT_PROMPTS, "completion": RA_DPO_ROWS["chosen"]},
    "prompts": {"prompt": CHAT_PROMPTS},
}
CPU_FLAGS = [f"--{k}={v}" for k, v in cpu_args().items() if k not in ("disable_tqdm", "dataloader_num_workers")]


def word_reward(prompts, completions):
    return [len(c.split()) / 10.0 for c in completions]


def test_the_table():
    assert methods.method_names() == ["var", "vcb", "reward_augmented_dpo", "online_var", "sft", "dpo", "grpo"]
    assert methods.method_names(baselines=False) == ["var", "vcb", "reward_augmented_dpo", "online_var"]
    assert {n: m.online for n, m in methods.METHODS.items() if m.online} == {"online_var": True, "grpo": True}
    assert {n: m.config_class().__name__ for n, m in methods.METHODS.items()} == {
        "var": "VARConfig",
        "vcb": "VCBConfig",
        "reward_augmented_dpo": "RewardAugmentedDPOConfig",
        "online_var": "OnlineVARConfig",
        "sft": "SFTConfig",
        "dpo": "DPOConfig",
        "grpo": "GRPOConfig",
    }
    # 8 sequences per step: a pair counts 2, a VCB group its size (4 here).
    rows = {n: m.rows_per_step(8, group_size=4) for n, m in methods.METHODS.items()}
    assert rows == {"var": 8, "vcb": 2, "reward_augmented_dpo": 4, "online_var": 8, "sft": 8, "dpo": 4, "grpo": 8}
    with pytest.raises(ValueError, match="vcb: a row is a group of replies; give its size"):
        methods.METHODS["vcb"].rows_per_step(8)


def test_cpu_demo_preset_and_user_settings():
    args = methods.build_training_args("var", "out", preset="cpu-demo", bf16=False, learning_rate=1e-4)
    assert (args.lr_scheduler_type, args.logging_steps, args.save_strategy, args.report_to) == (
        "constant",
        1,
        "no",
        [],
    )
    assert args.activation_checkpointing is False and args.bf16 is False and args.learning_rate == 1e-4
    # The user's setting wins under either name of activation checkpointing (transformers 5.25 renamed it).
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        assert methods.build_training_args("var", "out", preset="cpu-demo", **{name: True}).activation_checkpointing
    # The preset is one set of defaults, not a mode: without it the config's own defaults stay.
    assert methods.build_training_args("var", "out", use_cpu=True).activation_checkpointing is True
    with pytest.raises(ValueError, match=r"var: VARConfig has no field 'betta'"):
        methods.build_training_args("var", "out", betta=0.5)
    with pytest.raises(ValueError, match=r"Unknown preset 'gpu'; choose one of cpu-demo, gpu-bf16 \(or none\)"):
        methods.build_training_args("var", "out", preset="gpu")
    with pytest.raises(ValueError, match=r"Unknown method 'ppo'; choose one of var, vcb, reward_augmented_dpo"):
        methods.get_method("ppo")


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_builds_its_trainer_with_user_settings(name, tiny_model_path, tmp_path):
    spec = methods.METHODS[name]
    settings = dict(gradient_accumulation_steps=2, max_steps=1)
    if spec.online:
        settings.update(num_generations=2, per_device_train_batch_size=2, max_completion_length=4)
    args = methods.build_training_args(name, tmp_path, preset="cpu-demo", **settings)
    reward_funcs = ["tests.test_methods:word_reward"] if spec.online else None
    trainer = methods.build_trainer(
        name, tiny_model_path, args, Dataset.from_dict(DATA[spec.data]), reward_funcs=reward_funcs
    )
    assert type(trainer).__name__ == spec.trainer.rsplit(":", 1)[1]
    assert trainer.args.gradient_accumulation_steps == 2 and trainer.args.lr_scheduler_type == "constant"
    if spec.online:
        assert trainer.reward_func_names == ["word_reward"]


def test_peft_and_model_config_reach_the_trainer(tiny_model_path, tmp_path):
    from peft import LoraConfig, PeftModel
    from trl import ModelConfig

    rows = Dataset.from_dict(VAR_ROWS)
    args = methods.build_training_args("var", tmp_path, preset="cpu-demo", max_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = methods.build_trainer("var", tiny_model_path, args, rows, peft_config=lora)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].r == 4

    model_config = ModelConfig(use_peft=True, lora_r=2, lora_target_modules=["q_proj", "v_proj"], dtype="float32")
    args = methods.build_training_args("vcb", tmp_path, preset="cpu-demo", max_steps=1)
    trainer = methods.build_trainer(
        "vcb", tiny_model_path, args, Dataset.from_dict(VCB_ROWS), model_config=model_config
    )
    assert trainer.model.peft_config["default"].r == 2
    assert trainer.args.model_init_kwargs["dtype"] == "float32"


def test_reward_funcs_and_references_are_checked(tiny_model_path, tmp_path):
    args = methods.build_training_args("var", tmp_path, preset="cpu-demo")
    rows = Dataset.from_dict(VAR_ROWS)
    with pytest.raises(ValueError, match=r"`reward_funcs` is used by the online methods \(online_var, grpo\) only"):
        methods.build_trainer("var", tiny_model_path, args, rows, reward_funcs=["tests.test_methods:word_reward"])
    with pytest.raises(ValueError, match=r"grpo samples completions during training and needs `reward_funcs`"):
        methods.build_trainer("grpo", tiny_model_path, args, rows)
    sft_args = methods.build_training_args("sft", tmp_path, preset="cpu-demo")
    with pytest.raises(ValueError, match=r"sft: SFTTrainer takes no 'ref_model'"):
        methods.build_trainer("sft", tiny_model_path, sft_args, rows, ref_model=tiny_model_path)


def test_cli_train_online_var(tiny_model_path, tmp_path):
    out = tmp_path / "online"
    argv = ["train", "online_var", "--config", "quickstart/online_var"]  # a packaged recipe by name
    argv += [
        "--model_name_or_path",
        tiny_model_path,
        "--dataset_name",
        str(ROOT / "trl_rewardweighted/recipes/quickstart/data/rows.jsonl"),
    ]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--max_completion_length", "4", *CPU_FLAGS]
    assert cli_main(argv) == 0
    assert (out / "model.safetensors").exists()


def test_deprecated_ra_dpo_name_warns_and_runs(tiny_model_path, tmp_path, monkeypatch):
    """`trl-rw train ra_dpo` and `python -m trl_rewardweighted.scripts.ra_dpo` train reward-augmented DPO with a
    FutureWarning naming the new name; so do compare's and iterate's old names."""
    recipe = "quickstart/reward_augmented_dpo"  # a packaged recipe by name: its data is read from the package
    flags = ["--model_name_or_path", tiny_model_path, "--max_steps", "1", *CPU_FLAGS]
    message = "'ra_dpo' is deprecated and will be removed; it is now called 'reward_augmented_dpo'"
    with pytest.warns(FutureWarning, match=message):
        assert cli_main(["train", "ra_dpo", "--config", recipe, "--output_dir", str(tmp_path / "cli"), *flags]) == 0
    assert (tmp_path / "cli" / "model.safetensors").exists()

    monkeypatch.chdir(tmp_path)  # by name, the recipe runs from any folder
    monkeypatch.setattr(sys, "argv", ["ra_dpo", "--config", recipe, "--output_dir", str(tmp_path / "module"), *flags])
    with pytest.warns(FutureWarning, match=message):
        runpy.run_module("trl_rewardweighted.scripts.ra_dpo", run_name="__main__")
    assert (tmp_path / "module" / "model.safetensors").exists()

    with pytest.warns(FutureWarning, match="--method 'ra_dpo' is deprecated"):
        with pytest.raises(SystemExit):  # iterate: the old name resolves, then --n 1 is refused
            cli_main(["iterate", "--method", "ra_dpo", "--n", "1", "--check"])
    with pytest.warns(FutureWarning, match="--methods 'ra_dpo_twins' is deprecated"):
        with pytest.raises(SystemExit):  # compare: the old name resolves, then the budget is refused
            cli_main(
                ["compare", "--methods", "ra_dpo_twins", "--sequences-per-step", "6", "--output-dir", str(tmp_path)]
            )


def test_no_other_alias_table():
    """The old names live in `methods.DEPRECATED_NAMES` only."""
    package = ROOT / "trl_rewardweighted"
    offenders = [
        str(p.relative_to(ROOT))
        for p in package.rglob("*.py")
        if p.name not in ("methods.py", "ra_dpo.py") and '"ra_dpo' in p.read_text()
    ]
    assert offenders == []
