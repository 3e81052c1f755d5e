"""Every recipe parses strictly against its trainer's config (field-name drift fails here, not silently on a cluster),
and the launch script trains from a recipe end to end."""

import pytest

from tests._helpers import cpu_args
from trl_rewardweighted.packaged import recipes_root
from trl_rewardweighted.scripts.train import LAUNCH_METHODS, main, make_parser

RECIPES_ROOT = recipes_root()
# The recipe folders are named after the methods.
RECIPES = sorted(p for p in RECIPES_ROOT.rglob("*.yaml") if p.relative_to(RECIPES_ROOT).parts[0] in LAUNCH_METHODS)
CPU_FLAGS = [
    f"--{k}={v}" for k, v in cpu_args().items() if k not in ("disable_tqdm", "dataloader_num_workers", "logging_steps")
]


def test_recipes_exist_for_every_method():
    assert {p.relative_to(RECIPES_ROOT).parts[0] for p in RECIPES} == set(LAUNCH_METHODS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_ROOT)))
def test_recipe_parses_strictly(recipe):
    method = recipe.relative_to(RECIPES_ROOT).parts[0]
    script_args, config, model_args = make_parser(method).parse_args_and_config(
        args=["--config", str(recipe), *CPU_FLAGS], fail_with_unknown_args=True
    )[:3]
    assert model_args.model_name_or_path and script_args.dataset_name and config.output_dir


def test_misspelled_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES_ROOT / "var/smollm2-135m/config_full.yaml").read_text() + "\nbetta: 0.5\n")
    with pytest.raises(ValueError, match="betta"):
        make_parser("var").parse_args_and_config(args=["--config", str(bad), *CPU_FLAGS], fail_with_unknown_args=True)


def test_var_script_trains_from_recipe(tiny_model_path, tmp_path):
    from datasets import Dataset

    from tests.distributed.var_grad_layout import ROWS

    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    trainer = main(
        "var",
        [
            "--config", "var/smollm2-135m/config_full",
            "--model_name_or_path", tiny_model_path, "--dataset_name", str(data), "--dtype", "float32",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
            *CPU_FLAGS,
        ],
    )  # fmt: skip
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_cli_train_subcommand(tiny_model_path, tmp_path):
    from datasets import Dataset

    from tests.distributed.var_grad_layout import ROWS
    from trl_rewardweighted.cli import main as cli_main

    data = tmp_path / "rows.jsonl"
    Dataset.from_dict(ROWS).to_json(data)
    out = tmp_path / "cli-out"
    argv = ["train", "var", "--config", str(RECIPES_ROOT / "var/smollm2-135m/config_full.yaml")]
    argv += ["--model_name_or_path", tiny_model_path, "--dataset_name", str(data), "--dtype", "float32"]
    argv += ["--output_dir", str(out), "--max_steps", "1", *CPU_FLAGS]
    assert cli_main(argv) == 0
    assert (out / "model.safetensors").exists()


def test_online_var_script_trains_from_quickstart_recipe(tiny_model_path, tmp_path):
    """The online recipe's `reward_funcs` (a `module:function` scorer) reaches the trainer; the prompts of the rows
    file are sampled from, and the other columns are ignored."""
    trainer = main(
        "online_var",
        [
            "--config", "quickstart/online_var",  # by name: its dataset_name is read from the package
            "--model_name_or_path", tiny_model_path,
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_completion_length", "4",
            *CPU_FLAGS,
        ],
    )  # fmt: skip
    assert trainer.state.global_step == 1
    assert trainer.reward_func_names == ["vader_positivity"]
    assert "online_var/ess" in trainer.state.log_history[0]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_reward_funcs_belong_to_online_methods(tmp_path):
    text = (RECIPES_ROOT / "quickstart/online_var.yaml").read_text()
    recipe = tmp_path / "no_reward.yaml"
    recipe.write_text(text.replace("reward_funcs:\n  - trl_rewardweighted.rewards:vader_positivity\n", ""))
    with pytest.raises(ValueError, match=r"online_var samples completions during training and needs `reward_funcs`"):
        main("online_var", ["--config", str(recipe), "--output_dir", str(tmp_path), *CPU_FLAGS])
    var = str(RECIPES_ROOT / "quickstart/var.yaml")
    spec = "trl_rewardweighted.rewards:vader_positivity"
    with pytest.raises(ValueError, match=r"`reward_funcs` is used by the online methods \(online_var, grpo\) only"):
        main("var", ["--config", var, "--reward_funcs", spec, "--output_dir", str(tmp_path), *CPU_FLAGS])
