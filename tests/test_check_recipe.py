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
    fields = {m: set(cr.recipe_fields(m)) for m in ("var", "vcb", "reward_augmented_dpo")}
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
    assert (
        f"{tmp_path / 'missing.yaml'}: error: no such file, and not the name of a packaged recipe"
        in capsys.readouterr().err
    )
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


# ----------------------------------------------------------------------------------------------------------------------
# check-recipe --fix: Alignment-Handbook-shaped recipes (written here from the keys those recipes use)
# ----------------------------------------------------------------------------------------------------------------------

ZEPHYR_DPO = """\
# Model arguments
model_name_or_path: alignment-handbook/zephyr-7b-sft-full
torch_dtype: bfloat16
use_flash_attention_2: true

# Data training arguments
dataset_mixer:
  HuggingFaceH4/ultrafeedback_binarized: 1.0
dataset_splits:
- train_prefs
- test_prefs
preprocessing_num_workers: 12

# Trainer arguments
bf16: true
beta: 0.01
evaluation_strategy: steps   # every eval_steps
eval_steps: 100
gradient_checkpointing: true
learning_rate: 5.0e-7
max_length: 1024
max_prompt_length: 512
output_dir: data/zephyr-7b-dpo-full
warmup_ratio: 0.1
overwrite_output_dir: true
"""

ZEPHYR_DPO_FIXED = """\
# Model arguments
model_name_or_path: alignment-handbook/zephyr-7b-sft-full
# check-recipe --fix: `torch_dtype` -> `dtype` (same values: auto, bfloat16, float16, float32)
dtype: bfloat16
# check-recipe --fix: `use_flash_attention_2: true` -> `attn_implementation` (transformers 5 selects the attention \
kernel by name)
attn_implementation: flash_attention_2

# Data training arguments
# check-recipe --fix: `dataset_mixer: {HuggingFaceH4/ultrafeedback_binarized: 1.0}` -> `dataset_name` (one dataset, \
all of its rows)
dataset_name: HuggingFaceH4/ultrafeedback_binarized
# check-recipe --fix: `dataset_splits: [train_prefs, test_prefs]` -> `dataset_train_split`, `dataset_test_split` (the \
split whose name holds train / test, as the handbook read them)
dataset_train_split: train_prefs
dataset_test_split: test_prefs
# check-recipe --fix: `preprocessing_num_workers` -> `dataset_num_proc` (same meaning)
dataset_num_proc: 12

# Trainer arguments
bf16: true
beta: 0.01
# check-recipe --fix: `evaluation_strategy` -> `eval_strategy` (same values: no, steps, epoch (quote "no"))
eval_strategy: steps   # every eval_steps
eval_steps: 100
# check-recipe --fix: `gradient_checkpointing` -> `activation_checkpointing` (deprecated name)
activation_checkpointing: true
learning_rate: 5.0e-7
max_length: 1024
# check-recipe --fix: removed `max_prompt_length`: TRL 1.x DPO truncates prompt and completion together to \
`max_length` (`truncation_mode: keep_start`) and has no separate prompt limit: remove the key (shorten overlong prompts \
in the data if needed)
# max_prompt_length: 512
output_dir: data/zephyr-7b-dpo-full
# check-recipe --fix: `warmup_ratio` -> `warmup_steps` (a float in [0, 1) is a ratio of the total steps: \
`warmup_steps: 0.1`)
warmup_steps: 0.1
# check-recipe --fix: removed `overwrite_output_dir`: removed in transformers 5 (the Trainer writes into `output_dir` \
either way)
# overwrite_output_dir: true
"""

# Zephyr SFT: an inline chat template, and a packing strategy TRL no longer has.
ZEPHYR_SFT = """\
model_name_or_path: mistralai/Mistral-7B-v0.1
torch_dtype: bfloat16
chat_template: "{% for message in messages %}\\n{{ message['content'] }}{% endfor %}"
dataset_mixer:
  HuggingFaceH4/ultrachat_200k: 1.0
dataset_splits: [train_sft, test_sft]
max_seq_length: 2048
packing: true
packing_strategy: ffd
warmup_ratio: 0.1
"""

# SmolLM2 DPO (the newer handbook): a dataset_mixture block, older length and warmup keys.
SMOLLM2_DPO = """\
model_name_or_path: HuggingFaceTB/SmolLM2-1.7B-Instruct
torch_dtype: bfloat16
attn_implementation: sdpa
dataset_mixture:
  datasets:
    - id: HuggingFaceH4/ultrafeedback_binarized
      split: train_prefs
      columns: [prompt, chosen, rejected, score_chosen, score_rejected]
      weight: 1.0
  seed: 0
  test_split_size: 0.01
beta: 0.05
max_length: 1536
max_prompt_length: 1024
max_completion_length: 512
warmup_ratio: 0.1
rpo_alpha: 0.5
logging_dir: runs/smollm2
"""

# SmolLM3 SFT: a dataset_mixture block, packing (the one strategy VAR takes: whole rows), max_seq_length.
SMOLLM3_SFT = """\
model_name_or_path: HuggingFaceTB/SmolLM3-3B-Base
torch_dtype: bfloat16
dataset_mixture:
  datasets:
    - id: HuggingFaceTB/smoltalk2
      config: SFT
      split: train
      weight: 0.5
  seed: 0
eos_token: <|im_end|>
packing: true
packing_strategy: bfd
max_seq_length: 8192
use_liger_kernel: true
"""

# Constitutional AI SFT: several datasets in the old mixer, an inline template, the system-message option.
CAI_SFT = """\
model_name_or_path: mistralai/Mistral-7B-v0.1
torch_dtype: bfloat16
chat_template: "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
dataset_mixer:
  HuggingFaceH4/cai-conversation-harmless: 1.0
  HuggingFaceH4/ultrachat_200k: 1.0
dataset_splits: [train_sft, test_sft]
auto_insert_empty_system_msg: true
evaluation_strategy: epoch
"""


def _handbook(tmp_path, kind: str, text: str) -> Path:
    path = tmp_path / "recipes" / kind / "handbook.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fix(argv, capsys) -> tuple[int, str, str]:
    from trl_rewardweighted.cli import main as cli_main

    capsys.readouterr()
    try:
        code = cli_main(["check-recipe", *map(str, argv)])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_fix_migrates_a_zephyr_dpo_recipe_in_its_own_text(tmp_path, capsys):
    path = _handbook(tmp_path, "reward_augmented_dpo", ZEPHYR_DPO)
    out = tmp_path / "fixed" / "zephyr.yaml"
    code, stdout, err = _fix([path, "--fix", out], capsys)
    assert (code, err) == (0, "")
    assert out.read_text() == ZEPHYR_DPO_FIXED
    assert f"check-recipe --fix: 10 key(s) migrated, written to {out}" in stdout
    assert f"{out}: ok (reward_augmented_dpo, alignment-handbook/zephyr-7b-sft-full, " in stdout
    report = cr.check_recipe(out, "reward_augmented_dpo")
    assert report.ok and not any("deprecated" in n for n in report.notes)


def test_fix_migrates_smollm2_and_smollm3_style_recipes(tmp_path, capsys):
    path = _handbook(tmp_path, "reward_augmented_dpo", SMOLLM2_DPO)
    code, _, err = _fix([path, "--fix", tmp_path / "smollm2.yaml"], capsys)
    assert (code, err) == (0, "")
    fixed = yaml.safe_load((tmp_path / "smollm2.yaml").read_text())
    assert fixed == {
        "model_name_or_path": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "dataset_mixture": yaml.safe_load(SMOLLM2_DPO)["dataset_mixture"],
        "beta": 0.05,
        "max_length": 1536,
        "warmup_steps": 0.1,
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 0.5],
        "env": {"TENSORBOARD_LOGGING_DIR": "runs/smollm2"},
    }
    assert cr.check_recipe(tmp_path / "smollm2.yaml", "reward_augmented_dpo").ok
    path = _handbook(tmp_path, "var", SMOLLM3_SFT)
    code, _, err = _fix([path, "--fix", tmp_path / "smollm3.yaml"], capsys)
    assert (code, err) == (0, "")
    fixed = yaml.safe_load((tmp_path / "smollm3.yaml").read_text())
    assert (fixed["dtype"], fixed["max_length"], fixed["packing_strategy"]) == ("bfloat16", 8192, "bfd")
    assert "torch_dtype" not in fixed and "max_seq_length" not in fixed


@pytest.mark.parametrize(
    "kind, text, problems",
    [
        (
            "var",
            ZEPHYR_SFT,
            [
                "`chat_template` is an inline Jinja template, and TRL 1.16 takes a file: save it to a .jinja file and "
                "set `chat_template_path` to it",
                "`packing_strategy`: invalid choice: 'ffd' (choose from 'bfd', 'bfd_split', 'wrapped')",
            ],
        ),
        (
            "var",
            CAI_SFT,
            [
                "`chat_template` is an inline Jinja template, and TRL 1.16 takes a file: save it to a .jinja file and "
                "set `chat_template_path` to it",
                "`dataset_mixer` mixes several datasets, and the handbook took each one's test split whole, which the "
                "`dataset_mixture:` block (`datasets: [{id, config, split, columns, weight}], seed, test_split_size`) "
                "does not express: write that block, choosing the test set",
            ],
        ),
        (
            "var",
            SMOLLM3_SFT.replace("packing_strategy: bfd", "packing_strategy: wrapped"),
            [
                "invalid value: VARConfig.packing_strategy='wrapped' is not supported: VAR packs whole rows only "
                "('bfd'): 'bfd_split' and 'wrapped' cut rows into pieces across packs, and a piece of a completion has "
                "no reward or weight of its own. Leave `packing_strategy` at its default ('bfd')."
            ],
        ),
        (
            "reward_augmented_dpo",
            "model_name_or_path: m\nchat_template: '{{ x }}'\nwarmup_ratio: 0.1\nwarmup_steps: 10\nbetta: 1\n",
            [
                "`chat_template` is an inline Jinja template, and TRL 1.16 takes a file: this method's config takes "
                "no template: set it as the tokenizer's `chat_template`, save the tokenizer with the model and point "
                "`model_name_or_path` at that folder",
                "`warmup_ratio` becomes `warmup_steps`, which the recipe sets too: keep one of them",
                "unknown key `betta`: did you mean `beta`?",
            ],
        ),
    ],
)
def test_fix_refuses_to_guess_and_writes_nothing(tmp_path, capsys, kind, text, problems):
    path = _handbook(tmp_path, kind, text)
    out = tmp_path / "out.yaml"
    code, stdout, err = _fix([path, "--fix", out], capsys)
    assert (code, stdout) == (1, "")
    assert err.splitlines() == [
        *(f"{path}: cannot migrate: {p}" for p in problems),
        f"check-recipe --fix: {len(problems)} problem(s) need a decision; {out} was not written",
    ]
    assert not out.exists() and path.read_text() == text


def test_fix_options(tmp_path, capsys):
    path = _handbook(tmp_path, "reward_augmented_dpo", ZEPHYR_DPO)
    out = tmp_path / "out.yaml"
    out.write_text("mine\n")
    code, _, err = _fix([path, "--fix", out], capsys)
    assert (code, err.strip()) == (
        2,
        f"trl-rw check-recipe: error: --fix {out} exists; pass --overwrite to replace it.",
    )
    assert out.read_text() == "mine\n"
    assert _fix([path, "--fix", out, "--overwrite"], capsys)[0] == 0 and out.read_text() == ZEPHYR_DPO_FIXED
    code, _, err = _fix([path, path, "--fix", out], capsys)
    assert err.strip() == "trl-rw check-recipe: error: --fix writes one migrated recipe: give one RECIPE, got 2."
    code, _, err = _fix([path, "--overwrite"], capsys)
    assert err.strip() == "trl-rw check-recipe: error: --overwrite has no effect without --fix."
    # a packaged recipe by name, already current: written unchanged
    code, stdout, _ = _fix(["quickstart/var", "--fix", tmp_path / "qs.yaml"], capsys)
    assert code == 0 and "check-recipe --fix: 0 key(s) migrated" in stdout
    assert (tmp_path / "qs.yaml").read_text() == (RECIPES_ROOT / "quickstart/var.yaml").read_text()
    assert cr.main(["--method", "var", str(path), "--overwrite"]) == 2  # python -m ...check_recipe


def test_every_rename_is_migrated_or_refused_by_the_fix_table():
    from trl_rewardweighted.scripts.fix_recipe import FIXES

    assert set(FIXES) <= set(cr.RENAMED_KEYS)
    needs_a_decision = set(cr.RENAMED_KEYS) - set(FIXES)
    assert needs_a_decision == {
        "push_to_hub_organization",
        "dispatch_batches",
        "split_batches",
        "fsdp_min_num_params",
        "fsdp_transformer_layer_cls_to_wrap",
    }
