"""`trl-rw check-recipe`: recipes validate strictly without loading a model or data; renamed, misspelled and mistyped
keys are refused with a message naming the current field / the closest field / the expected type."""

import os
from pathlib import Path

import pytest
import yaml

from trl_rewardweighted.packaged import recipes_root
from trl_rewardweighted.scripts import check_recipe as cr

RECIPES_ROOT = recipes_root()
SHIPPED = sorted(p for p in RECIPES_ROOT.rglob("*.y*ml"))
VAR_BASE = RECIPES_ROOT / "var/smollm2-135m/config_full.yaml"
VCB_BASE = RECIPES_ROOT / "vcb/smollm2-135m/config_full.yaml"
RA_BASE = RECIPES_ROOT / "reward_augmented_dpo/smollm2-135m/config_full.yaml"


@pytest.fixture(autouse=True)
def no_model_data_or_gpu(monkeypatch):
    """Loading a model, a tokenizer or a dataset, or selecting a GPU, fails the test."""
    import datasets
    import torch
    import transformers

    def refuse(what):
        def refused(*args, **kwargs):  # one function per patch: torch._dynamo refuses one object under two names
            raise AssertionError(f"check-recipe must not call {what}")

        return refused

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", refuse(f"{cls.__name__}.from_pretrained"))
    for name in ("load_dataset", "load_from_disk"):
        monkeypatch.setattr(datasets, name, refuse(f"datasets.{name}"))
    for name in ("set_device", "init"):
        monkeypatch.setattr(torch.cuda, name, refuse(f"torch.cuda.{name}"))


def _recipe(tmp_path, base: Path, extra: str = "", drop=(), folder: str | None = None) -> Path:
    """`base` without the keys in `drop`, plus the raw YAML `extra`, saved under tmp/recipes/<folder>/recipe.yaml."""
    folder = folder or base.relative_to(RECIPES_ROOT).parts[0]
    data = {k: v for k, v in yaml.safe_load(base.read_text()).items() if k not in drop}
    path = tmp_path / "recipes" / folder / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False) + extra)
    return path


def _problems(path, method=None) -> list[str]:
    return cr.check_recipe(path, method).problems


# ----------------------------------------------------------------------------------------------------------------------
# Shipped recipes
# ----------------------------------------------------------------------------------------------------------------------


def test_every_shipped_recipe_passes(capsys):
    assert len(SHIPPED) >= 7
    assert cr.check_recipes([str(RECIPES_ROOT)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    ok_lines = [line for line in out.splitlines() if ": ok (" in line]
    assert len(ok_lines) == len(SHIPPED)
    assert f"{VAR_BASE}: ok (var, HuggingFaceTB/SmolLM2-135M-Instruct, quickstart_output/train_rows.jsonl)" in ok_lines
    assert f"{RA_BASE}: ok (reward_augmented_dpo, HuggingFaceTB/SmolLM2-135M-Instruct, " in out


@pytest.mark.parametrize(
    "path, method",
    [
        ("recipes/var/smollm2-135m/config_full.yaml", "var"),
        ("recipes/vcb/smollm2-135m/config_full.yaml", "vcb"),
        ("recipes/reward_augmented_dpo/smollm2-135m/config_full.yaml", "reward_augmented_dpo"),
        ("recipes/quickstart/iterate_var.yaml", "iterate"),
        ("somewhere/recipes/quickstart/vcb.yaml", "vcb"),
        ("my/var/run.yaml", "var"),
    ],
)
def test_method_from_path(path, method):
    assert cr.method_from_path(path) == method


def test_method_unknown_from_path_is_refused_and_method_option_overrides(tmp_path):
    path = tmp_path / "elsewhere" / "recipe.yaml"
    path.parent.mkdir()
    path.write_text(VAR_BASE.read_text())
    assert _problems(path) == [
        f"cannot tell the method of {path} from its path: put it under "
        "recipes/<var|vcb|reward_augmented_dpo|online_var>/ or pass --method var|vcb|reward_augmented_dpo|online_var"
    ]
    assert cr.check_recipe(path, "var").ok
    # the wrong method for the file: VAR's keys are not VCB's
    assert "`z_scope` is not an option of vcb recipes (it belongs to var)" in _problems(path, "vcb")


# ----------------------------------------------------------------------------------------------------------------------
# Renamed keys
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, extra, drop, message",
    [
        (VAR_BASE, "torch_dtype: bfloat16\n", ["dtype"], "`torch_dtype` was renamed to `dtype`: same values"),
        (VAR_BASE, "max_seq_length: 2048\n", ["max_length"], "`max_seq_length` was renamed to `max_length`"),
        (
            RA_BASE,
            "warmup_ratio: 0.1\n",
            ["warmup_steps"],
            "`warmup_ratio` was renamed to `warmup_steps`: a float in [0, 1) is a ratio of the total steps",
        ),
        (
            VCB_BASE,
            "dataset_mixer: {HuggingFaceH4/ultrafeedback_binarized: 1.0}\n",
            [],
            "`dataset_mixer` was renamed to `dataset_mixture`",
        ),
        (
            RA_BASE,
            "max_prompt_length: 512\n",
            [],
            "`max_prompt_length` was removed: TRL 1.x DPO truncates prompt and completion together to `max_length`",
        ),
        (
            RA_BASE,
            "evaluation_strategy: steps\n",
            ["eval_strategy"],
            "`evaluation_strategy` was renamed to `eval_strategy`",
        ),
        (
            VAR_BASE,
            "per_gpu_train_batch_size: 8\n",
            ["per_device_train_batch_size"],
            "`per_gpu_train_batch_size` was renamed to `per_device_train_batch_size`",
        ),
        (VAR_BASE, "push_to_hub_token: hf_x\n", [], "`push_to_hub_token` was renamed to `hub_token`"),
        (
            VAR_BASE,
            "overwrite_output_dir: true\n",
            [],
            "`overwrite_output_dir` was removed: removed in transformers 5",
        ),
        (RA_BASE, "hub_model_revision: v1\n", [], "`hub_model_revision` was renamed to `hub_revision`"),
        (VAR_BASE, "use_mps_device: false\n", [], "`use_mps_device` was removed: removed in transformers 5"),
        (
            VCB_BASE,
            "dataset_text_field: text\n",
            [],
            "`dataset_text_field` is not an option of vcb recipes (it "
            "belongs to var): DPO-based methods read `prompt`",
        ),
        (
            VAR_BASE,
            "model_init_kwargs: {torch_dtype: bfloat16}\n",
            [],
            "`model_init_kwargs.torch_dtype` was renamed to `dtype` in transformers 5",
        ),
    ],
)
def test_renamed_key_names_the_current_field(tmp_path, base, extra, drop, message):
    problems = _problems(_recipe(tmp_path, base, extra, drop))
    assert len(problems) == 1
    assert problems[0].startswith(message), problems


def test_rename_table_against_installed_dataclasses():
    """Every old key is absent from the parsers (`dataset_text_field` only from the DPO-based ones) and every current
    field exists in at least one method's parser."""
    fields = {m: set(cr._method_fields(m)) for m in ("var", "vcb", "reward_augmented_dpo")}
    everywhere = set.union(*fields.values())
    for old, rename in cr.RENAMED_KEYS.items():
        if old == "dataset_text_field":
            assert old in fields["var"] and old not in fields["vcb"] | fields["reward_augmented_dpo"]
        else:
            assert old not in everywhere, old
        if rename.new is not None:
            assert rename.new in everywhere, (old, rename.new)


# ----------------------------------------------------------------------------------------------------------------------
# Misspelled and mistyped keys
# ----------------------------------------------------------------------------------------------------------------------


def test_misspelled_key_suggests_the_closest_field(tmp_path):
    assert _problems(_recipe(tmp_path, VAR_BASE, "betta: 0.5\n")) == ["unknown key `betta`: did you mean `beta`?"]
    assert _problems(_recipe(tmp_path, VCB_BASE, "gama: 0.05\n")) == ["unknown key `gama`: did you mean `gamma`?"]


def test_key_of_another_method_says_so(tmp_path):
    assert _problems(_recipe(tmp_path, VCB_BASE, "packing: true\n")) == [
        "`packing` is not an option of vcb recipes (it belongs to var)"
    ]


@pytest.mark.parametrize(
    "base, extra, drop, message",
    [
        (VAR_BASE, "learning_rate: abc\n", ["learning_rate"], "`learning_rate`: invalid float value: 'abc'"),
        (
            VAR_BASE,
            "use_peft: maybe\n",
            [],
            "`use_peft`: Truthy value expected: got maybe but expected one of yes/no, true/false, t/f, y/n, 1/0 (case "
            "insensitive).",
        ),
        (
            VAR_BASE,
            "eval_strategy: no\n",
            ["eval_strategy"],
            "`eval_strategy`: invalid choice: 'false' (choose from 'no', 'steps', "
            "'epoch') (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value, e.g. "
            '"no")',
        ),
        (
            VAR_BASE,
            "num_train_epochs: [1, 2]\n",
            ["num_train_epochs"],
            "`num_train_epochs` expects a single value, got a list [1, 2]",
        ),
        (
            VAR_BASE,
            "per_device_train_batch_size: 8.5\n",
            ["per_device_train_batch_size"],
            "`per_device_train_batch_size`: invalid int value: '8.5'",
        ),
        (
            VAR_BASE,
            "lora_modules_to_save: lm_head\n",
            [],
            "`lora_modules_to_save` expects a list, got 'lm_head'",
        ),
        (
            VAR_BASE,
            "dtype: bf16\n",
            ["dtype"],
            "`dtype`: invalid choice: 'bf16' (choose from 'auto', 'bfloat16', 'float16', 'float32')",
        ),
        (VCB_BASE, "gamma: [0.05]\n", ["gamma"], "`gamma` expects a single value, got a list [0.05]"),
    ],
)
def test_wrong_type_names_field_and_expected_type(tmp_path, base, extra, drop, message):
    assert _problems(_recipe(tmp_path, base, extra, drop)) == [message]


@pytest.mark.parametrize(
    "extra, drop",
    [
        ('bf16: "true"\n', ["bf16"]),  # a boolean as a string the launch parser reads
        ("learning_rate: 5e-7\n", ["learning_rate"]),  # YAML 1.1 reads 5e-7 as a string; the parser as a float
        ("per_device_train_batch_size: '4'\n", ["per_device_train_batch_size"]),
        ("lora_target_modules: all-linear\n", []),  # peft takes one string
        ("report_to: [tensorboard]\n", ["report_to"]),
    ],
)
def test_values_the_launch_parser_reads_are_accepted(tmp_path, extra, drop):
    assert _problems(_recipe(tmp_path, VAR_BASE, extra, drop)) == []


def test_every_problem_is_reported_at_once(tmp_path):
    extra = "torch_dtype: bfloat16\nbetta: 0.5\nlearning_rate: abc\n"
    problems = _problems(_recipe(tmp_path, VAR_BASE, extra, ["dtype", "learning_rate"]))
    assert [p.split(":")[0] for p in problems] == [
        "`torch_dtype` was renamed to `dtype`",
        "unknown key `betta`",
        "`learning_rate`",
    ]
    assert problems[2] == "`learning_rate`: invalid float value: 'abc'"


# ----------------------------------------------------------------------------------------------------------------------
# Config validation, YAML, env, bf16 without a GPU
# ----------------------------------------------------------------------------------------------------------------------


def test_post_init_error_is_reported_with_the_file_name(tmp_path, capsys):
    path = _recipe(tmp_path, VCB_BASE, "gamma: -1.0\n", ["gamma"])
    assert cr.check_recipes([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: error: invalid value: `gamma` must be a finite number > 0, got -1.0 (paper default: 0.05)." in err
    assert "check-recipe: 1 of 1 recipe(s) have problems" in err


def test_duplicate_key_and_non_mapping_are_refused(tmp_path):
    path = tmp_path / "recipes" / "var" / "dup.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("beta: 1.0\nbeta: 2.0\n")
    assert _problems(path) == ["invalid YAML: key `beta` is given twice (lines 1 and 2)"]
    path.write_text("- beta\n")
    assert _problems(path) == ["a recipe is a YAML mapping of `field: value`, got list"]


def test_env_block_is_checked_not_applied(tmp_path):
    name = "TRL_RW_CHECK_RECIPE_TEST_VAR"
    assert cr.check_recipe(_recipe(tmp_path, VAR_BASE, f"env:\n  {name}: '1'\n")).ok
    assert name not in os.environ
    assert _problems(_recipe(tmp_path, VAR_BASE, "env: [A]\n")) == [
        "`env` expects a mapping of environment variables, got a list ['A']"
    ]


def test_bf16_recipe_validates_without_gpu_and_says_so(tmp_path):
    report = cr.check_recipe(VAR_BASE)
    assert report.ok and yaml.safe_load(VAR_BASE.read_text())["bf16"] is True
    assert "bf16 validated with use_cpu: true" in report.summary()
    explicit_cpu = cr.check_recipe(_recipe(tmp_path, VAR_BASE, "use_cpu: true\n"))
    assert explicit_cpu.ok and "bf16 validated" not in explicit_cpu.summary()


def test_missing_file_and_exit_codes(tmp_path, capsys):
    from trl_rewardweighted.cli import main as cli_main

    bad = _recipe(tmp_path, VAR_BASE, "betta: 0.5\n")
    assert cr.check_recipes([str(VAR_BASE)]) == 0
    assert cr.check_recipes([str(VAR_BASE), str(tmp_path / "missing.yaml")]) == 1
    assert f"{tmp_path / 'missing.yaml'}: error: no such file, and not the name of a packaged recipe" in capsys.readouterr().err
    assert cli_main(["check-recipe", str(VAR_BASE)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["check-recipe", str(VAR_BASE), str(bad)])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert f"{VAR_BASE}: ok (var, " in out
    assert f"{bad}: error: unknown key `betta`: did you mean `beta`?" in err
    assert cr.main(["--method", "var", str(bad)]) == 1  # python -m trl_rewardweighted.scripts.check_recipe
    with pytest.raises(SystemExit) as exit_info:
        cr.main(["--method", "sft", str(bad)])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------------------------------------------------
# trl-rw iterate recipes, method names
# ----------------------------------------------------------------------------------------------------------------------


def test_iterate_recipe_is_parsed_by_its_parser(tmp_path):
    """An `iterate*.yaml` recipe goes through `trl-rw iterate`'s own parser: every key and value is checked, one
    message per problem, then `IterateConfig.__post_init__`."""
    path = tmp_path / "iterate_var.yaml"
    path.write_text("method: var\nroundz: 3\nlearning_rate: abc\nn: [2]\nupdate_reference: maybe\n")
    assert _problems(path) == [
        "unknown key `roundz`: did you mean `rounds`?",
        "`learning_rate`: invalid float value: 'abc'",
        "`n` expects a single value, got a list [2]",
        "`update_reference`: Truthy value expected: got maybe but expected one of yes/no, true/false, t/f, y/n, 1/0 "
        "(case insensitive).",
    ]
    path.write_text("method: vcb\nn: 1\n")
    assert _problems(path) == [
        "invalid value: --method vcb needs --n >= 2: VCB calibrates the replies of a prompt against each other."
    ]
    path.write_text("method: var\nprompts: my_prompts.txt\n")
    assert cr.check_recipe(path).summary() == f"{path}: ok (iterate, smollm2, my_prompts.txt)"


def test_deprecated_method_name_warns_and_checks(recwarn):
    assert cr.check_recipe(RA_BASE, "ra_dpo").method == "reward_augmented_dpo"
    assert any(
        issubclass(w.category, FutureWarning) and "it is now called 'reward_augmented_dpo'" in str(w.message)
        for w in recwarn
    )
    assert cr.check_recipe(RA_BASE, "sft").problems == [
        "unknown method 'sft'; choose one of var, vcb, reward_augmented_dpo, online_var, iterate"
    ]
