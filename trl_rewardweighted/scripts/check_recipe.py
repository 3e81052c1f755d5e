"""Validate recipes without loading a model or data: `trl-rw check-recipe PATH...`.

```bash
trl-rw check-recipe var/smollm2-135m/config_full vcb   # packaged recipes / folders by name (trl-rw recipes list)
trl-rw check-recipe my_run/ my_recipe.yaml              # files or folders (every *.yaml)
python -m trl_rewardweighted.scripts.check_recipe --method var my_recipe.yaml
```

Each recipe is parsed the way its command parses it (strict `TrlParser`: the launch script's
[`~trl_rewardweighted.scripts.train.make_parser`], or `trl-rw iterate`'s
[`~trl_rewardweighted.scripts.iterate_config.make_parser`]), and the dataclasses are built, so their `__post_init__` checks run; no
model, tokenizer or dataset is loaded and nothing is downloaded. Before that every key is checked on its own, so that
each problem gets its own message:

- a key renamed or removed between the alignment-handbook's recipes / older TRL and transformers releases and TRL 1.16
  / transformers 5 names its current field ([`RENAMED_KEYS`]): `torch_dtype` -> `dtype`, `warmup_ratio` ->
  `warmup_steps`, ...;
- a misspelled key suggests the closest field (`betta` -> "did you mean `beta`?");
- a key of another method's config says so (`packing` in a VCB recipe);
- a value is read by the parser's own argument (its type and choices: `learning_rate: abc` gets the parser's
  "invalid float value"); what YAML adds is checked too: a list given for a single value or the reverse, and a
  boolean where the field takes none (YAML reads an unquoted `no` as `false`).

The method comes from `--method` or from the path: `recipes/<var|vcb|reward_augmented_dpo|online_var>/...`; files named
`iterate.yaml` / `iterate_*.yaml` are `trl-rw iterate` recipes. Validation runs with `use_cpu: true` (and without
`tf32`), so a `bf16: true` recipe validates on a machine without a GPU and no GPU is touched; whether the launch machine
supports bf16 / tf32 is checked when the recipe is launched. The recipe's `env:` block is checked but not applied.

Exit code: 0 when every recipe passes, 1 when any has a problem, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from trl_rewardweighted.methods import DEPRECATED_NAMES, resolve_method_name
from trl_rewardweighted.scripts.train import LAUNCH_METHODS

__all__ = [
    "KINDS",
    "RENAMED_KEYS",
    "RecipeReport",
    "check_config",
    "check_recipe",
    "check_recipes",
    "load_recipe",
    "read_recipe",
    "main",
    "method_from_path",
    "recipe_fields",
    "recipe_kind",
    "run",
]

# What a recipe can be: a launch script's (a method, also its recipe folder) or `trl-rw iterate`'s.
KINDS = (*LAUNCH_METHODS, "iterate")


class Rename(NamedTuple):
    """One entry of [`RENAMED_KEYS`]: the field that replaces an old key (`None`: removed, nothing replaces it), how
    to write it now, and what to do when this method's parser has no `new` field either."""

    new: str | None
    how: str
    otherwise: str | None = None


_PROMPT_LIMIT = (
    "TRL 1.x DPO truncates prompt and completion together to `max_length` (`truncation_mode: keep_start`) and has no "
    "separate {part} limit: remove the key (shorten overlong {part}s in the data if needed)"
)
_REMOVED_TF5 = "removed in transformers 5"

# Keys that the alignment-handbook's recipes (recipes/*/{sft,dpo}/config_*.yaml and its ModelArguments /
# DataArguments / SFTConfig / DPOConfig / ScriptArguments), older TRL configs or transformers 4 `TrainingArguments`
# accept and that TRL 1.16 / transformers 5 do not. Each was checked absent from the installed dataclasses
# (`dataclasses.fields`) and each replacement present (tests/test_check_recipe.py checks both on every run).
RENAMED_KEYS: dict[str, Rename] = {
    # --- model (handbook ModelArguments -> trl.ModelConfig) ---
    # transformers 5 renamed from_pretrained's `torch_dtype` to `dtype`; trl.ModelConfig has `dtype` only.
    "torch_dtype": Rename("dtype", "same values: auto, bfloat16, float16, float32"),
    # Handbook ModelArguments flag; trl.ModelConfig selects the kernel by name.
    "use_flash_attention_2": Rename("attn_implementation", "write `attn_implementation: flash_attention_2`"),
    # Handbook ModelArguments: revision of a PEFT adapter's base model / of the model code; one revision now.
    "base_model_revision": Rename("model_revision", "the revision of `model_name_or_path`"),
    "model_code_revision": Rename("model_revision", "the revision of `model_name_or_path`"),
    # Handbook ModelArguments; the launch script loads the tokenizer from `model_name_or_path`.
    "tokenizer_name_or_path": Rename(
        None, "the tokenizer is loaded from `model_name_or_path`: save the tokenizer you want with the model"
    ),
    # --- data (handbook DataArguments -> trl.ScriptArguments / TRL configs) ---
    # Handbook DataArguments `{dataset id: fraction}`; the current handbook reads a `dataset_mixture:` block.
    "dataset_mixer": Rename(
        "dataset_mixture",
        "a block `dataset_mixture: {datasets: [{id, config, split, columns, weight}], seed, test_split_size}`",
        "this launch script reads one dataset: set `dataset_name` (a Hub id or a local path) and "
        "`dataset_config` / `dataset_train_split` / `dataset_test_split`, or build the mixture first",
    ),
    # Handbook DataArguments list of split names; trl.ScriptArguments has one key per split.
    "dataset_splits": Rename(
        "dataset_train_split",
        "one key per split: `dataset_train_split: train_prefs`, `dataset_test_split: test_prefs`",
    ),
    # Handbook DataArguments list of config names; trl.ScriptArguments reads one.
    "dataset_configs": Rename("dataset_config", "one dataset config name"),
    # Handbook DataArguments; TRL configs call it `dataset_num_proc`.
    "preprocessing_num_workers": Rename("dataset_num_proc", "same meaning"),
    # Handbook DataArguments / handbook SFTConfig & DPOConfig: an inline Jinja template. TRL 1.16's SFTConfig (VAR)
    # takes `chat_template_path`; DPOConfig takes none.
    "chat_template": Rename(
        "chat_template_path",
        "a path to a .jinja file or a tokenizer folder, not the inline template: save the template to a file",
        "DPO-based configs take no chat template: set `tokenizer.chat_template`, save the tokenizer with the model "
        "and point `model_name_or_path` at it",
    ),
    # Handbook DataArguments (continued pretraining); TRL SFTConfig's `dataset_text_field`.
    "text_column": Rename(
        "dataset_text_field", "same meaning", "DPO-based methods read `prompt` and their completion columns"
    ),
    # Handbook DataArguments (tokenizer side); TRL configs: `truncation_mode`.
    "truncation_side": Rename(
        "truncation_mode", "`right` is `keep_start`; `left` (`keep_end`) is deprecated in TRL 1.x"
    ),
    # Handbook DataArguments; TRL applies the tokenizer's chat template as it is.
    "auto_insert_empty_system_msg": Rename(
        None, "TRL applies the tokenizer's chat template as it is: add a system message to the data if you want one"
    ),
    # SFT-only in TRL 1.16 (SFTConfig / VARConfig); absent from DPOConfig.
    "dataset_text_field": Rename(None, "DPO-based methods read `prompt` and their completion columns"),
    # --- lengths ---
    # Handbook SFTConfig / TRL < 0.20 SFTConfig; TRL 1.16 SFTConfig and DPOConfig: `max_length`.
    "max_seq_length": Rename("max_length", "same meaning"),
    # Handbook DPOConfig / TRL 0.x DPOConfig; absent from TRL 1.16 DPOConfig.
    "max_prompt_length": Rename(None, _PROMPT_LIMIT.format(part="prompt")),
    "max_completion_length": Rename(None, _PROMPT_LIMIT.format(part="completion")),
    # --- TRL 0.x DPOConfig / SFTConfig options absent from TRL 1.16 ---
    "rpo_alpha": Rename(
        None, "RPO is a loss combination in TRL 1.x: `loss_type: [sigmoid, sft]` with `loss_weights: [1.0, ALPHA]`"
    ),
    "ref_model_init_kwargs": Rename(None, "the reference model is loaded with `model_init_kwargs`"),
    "ref_adapter_name": Rename(None, "with PEFT the reference is the policy with its adapters disabled"),
    "model_adapter_name": Rename(None, "with PEFT the reference is the policy with its adapters disabled"),
    "padding_value": Rename(None, "padding comes from the tokenizer's pad token"),
    "label_pad_token_id": Rename(None, "padding comes from the tokenizer's pad token"),
    "generate_during_eval": Rename(None, "removed from TRL 1.x DPOConfig"),
    "force_use_ref_model": Rename(None, "removed from TRL 1.x DPOConfig"),
    "is_encoder_decoder": Rename(None, "removed from TRL 1.x DPOConfig (read from the model config)"),
    "use_logits_to_keep": Rename(None, "removed from TRL 1.x DPOConfig"),
    "dataset_batch_size": Rename(None, "removed from TRL 1.x SFTConfig"),
    "num_of_sequences": Rename(None, "removed from TRL 1.x SFTConfig: packing is `packing` + `packing_strategy`"),
    "chars_per_token": Rename(None, "removed from TRL 1.x SFTConfig: packing is `packing` + `packing_strategy`"),
    # Handbook SFTConfig / DPOConfig (Hub branch to push to); transformers TrainingArguments: `hub_revision`.
    "hub_model_revision": Rename("hub_revision", "the Hub branch to push to"),
    # --- transformers 4 -> 5 TrainingArguments ---
    "evaluation_strategy": Rename("eval_strategy", 'same values: no, steps, epoch (quote "no")'),
    # transformers 5: `warmup_steps` is an int (steps) or a float in [0, 1) (a ratio of the total steps).
    "warmup_ratio": Rename("warmup_steps", "a float in [0, 1) is a ratio of the total steps: `warmup_steps: 0.1`"),
    "per_gpu_train_batch_size": Rename("per_device_train_batch_size", "same meaning"),
    "per_gpu_eval_batch_size": Rename("per_device_eval_batch_size", "same meaning"),
    "no_cuda": Rename("use_cpu", "same meaning"),
    "push_to_hub_token": Rename("hub_token", "same meaning"),
    "push_to_hub_model_id": Rename("hub_model_id", "same meaning"),
    "push_to_hub_organization": Rename("hub_model_id", "write `hub_model_id: ORG/NAME`"),
    "include_inputs_for_metrics": Rename("include_for_metrics", "write `include_for_metrics: [inputs]`"),
    "dispatch_batches": Rename("accelerator_config", "write `accelerator_config: {dispatch_batches: true}`"),
    "split_batches": Rename("accelerator_config", "write `accelerator_config: {split_batches: true}`"),
    "torchdynamo": Rename("torch_compile_backend", "same values"),
    "fsdp_min_num_params": Rename("fsdp_config", "write `fsdp_config: {min_num_params: N}`"),
    "fsdp_transformer_layer_cls_to_wrap": Rename(
        "fsdp_config", "write `fsdp_config: {transformer_layer_cls_to_wrap: [CLASS]}`"
    ),
    # Only example scripts ever read it; the Trainer writes into `output_dir` either way.
    "overwrite_output_dir": Rename(None, f"{_REMOVED_TF5} (the Trainer writes into `output_dir` either way)"),
    # transformers 5's TensorBoard callback reads the TENSORBOARD_LOGGING_DIR environment variable.
    "logging_dir": Rename(None, f"{_REMOVED_TF5}: set TENSORBOARD_LOGGING_DIR (a recipe can set it under `env:`)"),
    "use_mps_device": Rename(None, f"{_REMOVED_TF5}: MPS is used when available, `use_cpu: true` forces the CPU"),
    "save_safetensors": Rename(None, f"{_REMOVED_TF5}: checkpoints are always safetensors"),
    "fp16_backend": Rename(None, f"{_REMOVED_TF5}: mixed precision goes through accelerate (`bf16` / `fp16`)"),
    "half_precision_backend": Rename(
        None, f"{_REMOVED_TF5}: mixed precision goes through accelerate (`bf16` / `fp16`)"
    ),
    "fp16_opt_level": Rename(None, f"{_REMOVED_TF5} (apex)"),
    "include_tokens_per_second": Rename(None, f"{_REMOVED_TF5}: `include_num_input_tokens_seen` logs the token count"),
    "tpu_num_cores": Rename(None, _REMOVED_TF5),
    "use_ipex": Rename(None, _REMOVED_TF5),
    "jit_mode_eval": Rename(None, _REMOVED_TF5),
    "use_legacy_prediction_loop": Rename(None, _REMOVED_TF5),
    "past_index": Rename(None, _REMOVED_TF5),
    "ray_scope": Rename(None, _REMOVED_TF5),
    "mp_parameters": Rename(None, _REMOVED_TF5),
}

# List-typed fields whose config accepts a single value too (DPOConfig wraps a string `loss_type` in a list; peft's
# LoraConfig takes `target_modules` as a list or one string such as `all-linear`); other list fields given a single
# value are refused, since the launch parser passes the scalar through unchanged.
_SCALAR_OK_LIST_FIELDS = {"loss_type", "lora_target_modules", "report_to"}


class _ParseError(Exception):
    pass


def _raise_parse_error(message: str):
    raise _ParseError(message)


@dataclasses.dataclass
class RecipeReport:
    """The outcome of [`check_recipe`] for one file.

    Parameters:
        path (`str`): the recipe file.
        method (`str` or `None`): the recipe's kind ([`KINDS`]: a method such as `var`, or `iterate`), `None` when
            it could not be told.
        problems (`list[str]`): one message per problem; empty when the recipe passes.
        notes (`list[str]`): what the user should know but is no error (deprecations, the CPU-safe override).
        model (`str` or `None`), dataset (`str` or `None`): what the recipe trains and on which data.
    """

    path: str
    method: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    model: str | None = None
    dataset: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """`PATH: ok (method, model, dataset)`, or the problems, one per line, each prefixed with the path."""
        if self.problems:
            return "\n".join(f"{self.path}: error: {p}" for p in self.problems)
        model = self.model or "model not set: give --model_name_or_path at launch"
        dataset = self.dataset or "dataset not set: give --dataset_name at launch"
        lines = [f"{self.path}: ok ({self.method}, {model}, {dataset})"]
        lines += [f"{self.path}: note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Method and fields
# ----------------------------------------------------------------------------------------------------------------------


def recipe_kind(name: str) -> str | None:
    """The kind ([`KINDS`]) of a folder or `--method` name (a deprecated method name warns), `None` when it names
    none."""
    if name in KINDS:
        return name
    if DEPRECATED_NAMES.get(name) in KINDS:
        return resolve_method_name(name, KINDS)
    return None


def method_from_path(path: str | Path) -> str:
    """The kind of a recipe from its path ([`KINDS`]): `iterate` for a file named `iterate.yaml` / `iterate_*.yaml`,
    else the folder under `recipes/` (`var`, `vcb`, `reward_augmented_dpo`, `online_var`), else any folder or file
    stem of the path named after a method. Raises `ValueError` when no method or two different ones are named."""
    stem = Path(path).stem
    if stem == "iterate" or stem.startswith("iterate_"):
        return "iterate"
    resolved = Path(path).resolve().with_suffix("").parts
    if "recipes" in resolved:  # only what lies under the last `recipes/` folder
        parts = resolved[len(resolved) - resolved[::-1].index("recipes") :]
        if parts and recipe_kind(parts[0]):
            return recipe_kind(parts[0])
    else:
        parts = Path(path).with_suffix("").parts  # as given: a parent folder such as /var says nothing
    found = {recipe_kind(p) for p in parts} - {None, "iterate"}
    if len(found) == 1:
        return found.pop()
    named = f" (the path names {sorted(found)})" if found else ""
    methods = "|".join(LAUNCH_METHODS)
    raise ValueError(
        f"cannot tell the method of {path} from its path{named}: put it under recipes/<{methods}>/ or pass "
        f"--method {methods}"
    )


def _make_parser(kind: str):
    if kind == "iterate":
        from trl_rewardweighted.scripts.iterate_config import make_parser

        return make_parser()
    from trl_rewardweighted.scripts.train import make_parser

    return make_parser(kind)


def _fields(parser) -> dict[str, tuple[type, dataclasses.Field, Any]]:
    """Every init field of the parser's dataclasses: name -> (dataclass, field, resolved type)."""
    out = {}
    for cls in parser.dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                out.setdefault(f.name, (cls, f, hints.get(f.name, Any)))
    return out


_FIELD_CACHE: dict[str, dict] = {}


def recipe_fields(method: str) -> dict[str, tuple[type, dataclasses.Field, Any]]:
    """Every field a recipe of kind `method` ([`KINDS`]) takes: name -> (dataclass, field, resolved type)."""
    if method not in _FIELD_CACHE:
        _FIELD_CACHE[method] = _fields(_make_parser(method))
    return _FIELD_CACHE[method]


# ----------------------------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------------------------


def _members(tp) -> list:
    origin = typing.get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return f"a list {value!r}"
    if isinstance(value, dict):
        return f"a mapping {value!r}"
    return repr(value)


def _value_problem(parser, name: str, value, tp) -> str | None:
    """One message when the parser's own argument `--name` refuses `value` (its type, its choices), or when the YAML
    value's shape does not fit the field (a list for a single value, a single value for a list, a boolean where the
    field takes none); else `None`. Mappings and nulls are left to the dataclass."""
    members = _members(tp)
    is_list = any(m in (list, tuple, set) or typing.get_origin(m) in (list, tuple, set) for m in members)
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, list) and not is_list:
        return f"`{name}` expects a single value, got {_show(value)}"
    if is_list and not isinstance(value, list) and name not in _SCALAR_OK_LIST_FIELDS:
        return f"`{name}` expects a list, got {_show(value)}"
    yaml_bool = (
        ' (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value, e.g. "no")'
        if bool not in members
        else ""
    )
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (dict, list)):
            continue
        try:
            parser.parse_args([f"--{name}", _show(item) if isinstance(item, bool) else str(item)])
        except _ParseError as err:
            return f"`{name}`: {str(err).split(': ', 1)[-1]}" + (yaml_bool if isinstance(item, bool) else "")
        if isinstance(item, bool) and yaml_bool:  # the parser reads "false" as a string; the dataclass gets False
            return f"`{name}` expects a string, got {_show(item)}{yaml_bool}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------------------------


def _unknown_key_message(key: str, method: str, fields: dict) -> str:
    label = method
    rename = RENAMED_KEYS.get(key)
    others = [m for m in sorted(LAUNCH_METHODS) if m != method and key in recipe_fields(m)]
    not_here = f"`{key}` is not an option of {label} recipes (it belongs to {' and '.join(others)})"
    if rename is not None:
        if rename.new is None:
            return f"{not_here}: {rename.how}" if others else f"`{key}` was removed: {rename.how}"
        if rename.new in fields:
            return f"`{key}` was renamed to `{rename.new}`: {rename.how}"
        instead = rename.otherwise or f"the {label} recipe has no `{rename.new}` either"
        return f"`{key}` was renamed to `{rename.new}`, which the {label} recipe does not take: {instead}"
    if others:
        return not_here
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f"unknown key `{key}`: did you mean `{close[0]}`?"
    classes = ", ".join(dict.fromkeys(cls.__name__ for cls, _, _ in fields.values()))
    return f"unknown key `{key}`: not a field of {classes}"


def _check_nested(key: str, value) -> list[str]:
    problems = []
    if key == "model_init_kwargs" and isinstance(value, dict) and "torch_dtype" in value:
        # The launch script passes `dtype` (from the recipe's `dtype`) next to these kwargs; transformers 5 then
        # ignores `torch_dtype`, so the old name would be silently dropped.
        problems.append(
            "`model_init_kwargs.torch_dtype` was renamed to `dtype` in transformers 5 and is ignored next to the "
            "launch script's `dtype`: set `dtype:` at the top level of the recipe"
        )
    if key == "env":
        if not isinstance(value, dict):
            problems.append(f"`env` expects a mapping of environment variables, got {_show(value)}")
        else:
            for name, v in value.items():
                if isinstance(v, (dict, list)):
                    problems.append(f"`env.{name}` expects a single value, got {_show(v)}")
    return problems


class _UniqueKeyLoader:
    """A yaml SafeLoader that refuses a key given twice in one mapping (plain `yaml.safe_load` keeps the last)."""

    @staticmethod
    def make():
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def construct_mapping(loader, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key `{key}` is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                    )
                seen[key] = key_node.start_mark.line + 1
            return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
        return Loader


def load_recipe(path: Path) -> tuple[dict | None, str | None]:
    """`(mapping, None)`, or `(None, problem)` when the file cannot be read, is not YAML, gives a key twice or is not a
    mapping."""
    import yaml

    try:
        text = path.read_text()
    except OSError as err:
        return None, f"cannot read the file: {err.strerror or err}"
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader.make())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        return None, "invalid YAML: " + " ".join(str(err).split())
    if not isinstance(data, dict):
        return None, f"a recipe is a YAML mapping of `field: value`, got {type(data).__name__}"
    return data, None


# ----------------------------------------------------------------------------------------------------------------------
# One recipe
# ----------------------------------------------------------------------------------------------------------------------


def _dataset_label(parsed) -> str | None:
    """`dataset_name` (with its adapter), or the ids of a mixture (`dataset_mixture:` block or TRL's `datasets:`)."""
    values = {}
    for obj in parsed:
        for name in ("dataset_name", "dataset_adapter", "dataset_mixture", "datasets"):
            if getattr(obj, name, None) and name not in values:
                values[name] = getattr(obj, name)
    adapter = f" via {values['dataset_adapter']}" if "dataset_adapter" in values else ""
    if "dataset_name" in values:
        return f"{values['dataset_name']}{adapter}"
    mixture = values.get("dataset_mixture") or values.get("datasets")
    if not mixture:
        return None
    entries = mixture.get("datasets", []) if isinstance(mixture, dict) else mixture
    ids = [
        (e.get("id") or e.get("path")) if isinstance(e, dict) else getattr(e, "path", None) or getattr(e, "id", "?")
        for e in (entries if isinstance(entries, list) else [])
    ]
    return f"mixture of {len(ids)}: {', '.join(map(str, ids))}{adapter}"


def check_recipe(path: str | Path, method: str | None = None) -> RecipeReport:
    """Validate one recipe without loading a model or data.

    Args:
        path (`str` or `Path`): the recipe YAML.
        method (`str`, *optional*): the recipe's kind, one of [`KINDS`] (a method such as `var`, or `iterate`); by
            default read from the path (see [`method_from_path`]).

    Returns:
        [`RecipeReport`]: `report.ok` is `True` when the recipe parses strictly and its configs validate;
        `report.problems` holds one message per problem otherwise.

    Example:

    ```python
    >>> from trl_rewardweighted.scripts.check_recipe import check_recipe
    >>> from trl_rewardweighted.packaged import find_recipe
    >>> check_recipe(find_recipe("var/smollm2-135m/config_full")).summary()
    '.../recipes/var/smollm2-135m/config_full.yaml: ok (var, HuggingFaceTB/SmolLM2-135M-Instruct, quickstart_output/train_rows.jsonl)\n...'
    ```
    """
    report = RecipeReport(str(path))
    report.method, config, error = read_recipe(path, method)
    if error:
        report.problems.append(error)
        return report
    return check_config(report, config)


def read_recipe(path: str | Path, method: str | None = None) -> tuple[str | None, dict | None, str | None]:
    """`(kind, mapping, None)` for the recipe at `path` (its kind from `method` or the path, see [`method_from_path`]),
    or `(kind or None, None, problem)` when the kind cannot be told or the file not read as a recipe."""
    path = Path(path)
    try:
        kind = method_from_path(path) if method is None else recipe_kind(method)
    except ValueError as err:
        return None, None, str(err)
    if kind is None:
        return None, None, f"unknown method {method!r}; choose one of {', '.join(KINDS)}"
    config, error = load_recipe(path)
    return kind, config, error


def check_config(report: RecipeReport, config: dict) -> RecipeReport:
    """Check a recipe's loaded mapping for `report.method` (one message per problem, then the configs are built),
    filling `report`; see [`check_recipe`]."""
    fields = recipe_fields(report.method)
    parser = _make_parser(report.method)
    parser.error = _raise_parse_error  # argparse would print usage and exit
    for key, value in config.items():
        if key == "env":
            report.problems += _check_nested(key, value)
        elif not isinstance(key, str):
            report.problems.append(f"key {key!r} is not a field name (keys are strings)")
        elif key in fields:
            message = _value_problem(parser, key, value, fields[key][2])
            if message:
                report.problems.append(message)
            report.problems += _check_nested(key, value)
        else:
            report.problems.append(_unknown_key_message(key, report.method, fields))
    if report.problems:
        return report  # the dataclasses would fail on the first of these; report them all instead
    _build_configs(report, config)
    return report


def _build_configs(report: RecipeReport, config: dict) -> None:
    """Parse like the recipe's command (strict, config values as defaults) and build the dataclasses, CPU-safe."""
    values = {k: v for k, v in config.items() if k != "env"}  # `env:` is checked, not applied to this process
    iterate = report.method == "iterate"
    # Build with use_cpu (TrainingArguments refuses bf16 without a bf16 GPU and sets up a device in __post_init__)
    # and without tf32 (which needs an Ampere GPU): the recipe's hardware settings are checked at launch.
    if values.get("tf32") is not None:
        report.notes.append(f"tf32: {_show(values['tf32'])} is not checked here (it needs a GPU); it is at launch")
    if not iterate:
        values.update(use_cpu=True, tf32=None)
    parser = _make_parser(report.method)
    parser.error = _raise_parse_error  # argparse would print usage and exit
    remaining = parser.set_defaults_with_config(**values)
    if remaining:  # the key checks above make this unreachable; kept so that nothing is dropped silently
        report.problems.append(f"keys the parser does not take: {remaining[::2]}")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parsed = parser.parse_args_into_dataclasses(args=[], look_for_args_file=False)
        except _ParseError as err:
            report.problems.append(f"invalid value: {err}")
            return
        except (ValueError, TypeError) as err:
            report.problems.append("invalid value: " + " ".join(str(err).split()))
            return
    for w in caught:
        note = " ".join(str(w.message).split())
        if note not in report.notes:
            report.notes.append(note)
    if iterate:
        (options,) = parsed
        report.model = options.model
        report.dataset = options.prompts or "the packaged quickstart prompts"
        return
    _, training_args, model_args = parsed[:3]
    if (training_args.bf16 or training_args.bf16_full_eval) and config.get("use_cpu") is not True:
        report.notes.append(
            "bf16 validated with use_cpu: true (no GPU is needed or touched here; the launch machine's bf16 "
            "support is checked at launch)"
        )
    report.model = model_args.model_name_or_path
    report.dataset = _dataset_label(parsed)
    from trl_rewardweighted.methods import check_reward_funcs

    try:
        check_reward_funcs(report.method, parsed[0].reward_funcs)
    except ValueError as err:
        report.problems.append(" ".join(str(err).split()))


# ----------------------------------------------------------------------------------------------------------------------
# Several recipes, command line
# ----------------------------------------------------------------------------------------------------------------------


def _expand(paths: list[str]) -> list[tuple[str, Path, str | None]]:
    """`(label, path, problem)` for every recipe the arguments name: a file; a folder's `*.yaml` / `*.yml`; a packaged
    recipe or folder by name (labelled by its name). A value that is none of these (or an ambiguous name) gets the
    problem to report."""
    from trl_rewardweighted.packaged import recipes_root, resolve_recipe

    out = []
    for text in map(str, paths):
        p = Path(text)
        if p.is_dir():
            found = sorted([*p.rglob("*.yaml"), *p.rglob("*.yml")])
            out += [(str(f), f, None) for f in found] or [(text, p, "no *.yaml recipe in this folder")]
        elif p.exists():
            out.append((text, p, None))
        else:
            try:
                files = resolve_recipe(text, option="", folders=True)
            except FileNotFoundError as err:
                out.append((text, p, str(err).removeprefix(f" {text}: ")))
                continue
            out += [(f.relative_to(recipes_root()).with_suffix("").as_posix(), f, None) for f in files]
    return out


def check_recipes(paths: list[str], method: str | None = None, out=None, err=None) -> int:
    """Check every recipe in `paths` (files, folders searched for `*.yaml`, or packaged recipes and folders by name,
    see [`trl_rewardweighted.packaged`]), print one summary per file (`ok` lines and notes on `out`, problems on
    `err`) and return the exit code: 0 when all pass, 1 otherwise."""
    out = out or sys.stdout
    err = err or sys.stderr
    failed = 0
    files = _expand(paths)
    for label, path, problem in files:
        if problem is not None:
            report = RecipeReport(label, problems=[problem])
        else:
            report = check_recipe(path, method)
            report.path = label
        print(report.summary(), file=out if report.ok else err)
        failed += not report.ok
    if failed:
        print(f"check-recipe: {failed} of {len(files)} recipe(s) have problems", file=err)
    return 1 if failed else 0


def run(paths: list[str], method: str | None = None, fix: str | None = None, overwrite: bool = False) -> int:
    """`trl-rw check-recipe`: check `paths` ([`check_recipes`]), or with `fix` migrate the one recipe given and write
    it to `fix` ([`~trl_rewardweighted.scripts.fix_recipe.write_migration`]). Returns the exit code (0 / 1).

    Raises:
        `ValueError`: `--overwrite` without `--fix`, or `--fix` with several recipes. `FileNotFoundError`: the recipe
        to migrate is neither a file nor a packaged name. `FileExistsError`: `fix` exists without `overwrite`.
    """
    if fix is None:
        if overwrite:
            raise ValueError("--overwrite has no effect without --fix.")
        return check_recipes(paths, method)
    if len(paths) != 1:
        raise ValueError(f"--fix writes one migrated recipe: give one RECIPE, got {len(paths)}.")
    from trl_rewardweighted.packaged import resolve_recipe
    from trl_rewardweighted.scripts.fix_recipe import write_migration

    (path,) = resolve_recipe(paths[0], option="check-recipe")
    return write_migration(str(path), fix, method, overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `check-recipe` arguments (shared by `trl-rw check-recipe` and `python -m ...check_recipe`)."""
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RECIPE",
        help="recipe YAML files, folders (every *.yaml), or packaged recipes / folders by name (`trl-rw recipes list`)",
    )
    parser.add_argument(
        "--method",
        choices=[*KINDS, *(old for old, new in DEPRECATED_NAMES.items() if new in KINDS)],
        metavar="{" + ",".join(KINDS) + "}",
        default=None,
        help="the method of every PATH, or `iterate` (default: read from recipes/<method>/..., iterate for "
        "iterate.yaml / iterate_*.yaml)",
    )
    parser.add_argument(
        "--fix",
        default=None,
        metavar="OUT",
        help="migrate the one RECIPE to TRL 1.16 / transformers 5 and write it to OUT: renamed keys renamed, removed "
        "ones commented out with the reason, values converted where the meaning is the same; where it is not (an "
        "inline chat template, a value the current field does not take) each key is named and nothing is written",
    )
    parser.add_argument("--overwrite", action="store_true", help="with --fix: replace OUT if it exists")


def main(argv: list[str] | None = None) -> int:
    """`python -m trl_rewardweighted.scripts.check_recipe PATH... [--method M]`: returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m trl_rewardweighted.scripts.check_recipe",
        description="Validate recipes strictly against the method's config, ModelConfig and ScriptArguments "
        "without loading a model or data.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args.paths, args.method, args.fix, args.overwrite)
    except (ValueError, OSError) as err:
        print(f"check-recipe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
