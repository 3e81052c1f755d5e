"""Migrate a recipe written for the alignment-handbook / older TRL and transformers to TRL 1.16 / transformers 5:
`trl-rw check-recipe RECIPE --fix OUT`.

Each key that [`~trl_rewardweighted.scripts.check_recipe.check_recipe`] reports as renamed or removed
([`~trl_rewardweighted.scripts.check_recipe.RENAMED_KEYS`]) is migrated where the meaning stays the same, in the recipe's
own text (comments, order and formatting are kept; each change gets a `# check-recipe --fix:` comment above it):

- renamed with the same values: `torch_dtype` -> `dtype`, `max_seq_length` -> `max_length`, `evaluation_strategy` ->
  `eval_strategy`, `preprocessing_num_workers` -> `dataset_num_proc`, ...;
- converted: `warmup_ratio: R` -> `warmup_steps: R` (transformers 5 reads a float in [0, 1) as a ratio),
  `use_flash_attention_2: true` -> `attn_implementation: flash_attention_2`, `dataset_mixer` with one dataset ->
  `dataset_name`, `dataset_splits` -> `dataset_train_split` / `dataset_test_split` (the handbook's rule: the split
  whose name holds `train` / `test`), `truncation_side: right` -> `truncation_mode: keep_start`, `rpo_alpha: A` ->
  `loss_type: [sigmoid, sft]` + `loss_weights: [1.0, A]`, `logging_dir` -> `env: {TENSORBOARD_LOGGING_DIR: ...}`, ...;
- removed with nothing to replace them (`overwrite_output_dir`, `max_prompt_length`, ...): commented out, with the
  reason.

Where the meaning would change, nothing is guessed: an inline `chat_template` (a Jinja string; TRL 1.16 takes a file),
a `dataset_mixer` of several datasets (the handbook's test splits have no equivalent), a value the current field does
not take (`packing_strategy: ffd`, removed from TRL), a key that is neither a field nor a known rename, or a target key
the recipe already sets. Then every such key is named, with what to do, and nothing is written. The migrated recipe is
checked like any other recipe before it is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from trl_rewardweighted.scripts.check_recipe import (
    RENAMED_KEYS,
    RecipeReport,
    check_config,
    read_recipe,
    recipe_fields,
)

__all__ = ["FIXES", "Migration", "migrate_recipe", "write_migration"]

MARK = "# check-recipe --fix:"


class Refuse(Exception):
    """A key whose migration would change the recipe's meaning; the message says what to do instead."""


@dataclasses.dataclass
class Migration:
    """The outcome of [`migrate_recipe`].

    Parameters:
        path (`str`): the recipe migrated.
        method (`str` or `None`): its kind (a method, or `iterate`).
        text (`str` or `None`): the migrated recipe; `None` when anything was refused.
        changes (`list[str]`): one line per key migrated.
        refused (`list[str]`): one message per key that cannot be migrated without a decision (nothing is written).
        report ([`RecipeReport`] or `None`): the check of the migrated recipe.
    """

    path: str
    method: str | None = None
    text: str | None = None
    changes: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    report: RecipeReport | None = None

    @property
    def ok(self) -> bool:
        return not self.refused


# ----------------------------------------------------------------------------------------------------------------------
# One fixer per old key: (value, recipe, fields, method) -> {new key: value} (empty: the key is dropped), or Refuse.
# ----------------------------------------------------------------------------------------------------------------------


def _rename(new: str):
    def fix(value, config, fields, method):
        return {new: value}

    return fix


def _drop(value, config, fields, method):
    return {}


def _drop_if(default_ok: Callable[[object], bool], refusal: str):
    def fix(value, config, fields, method):
        if default_ok(value):
            return {}
        raise Refuse(refusal.format(value=value))

    return fix


def _warmup_ratio(value, config, fields, method):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise Refuse(f"`warmup_ratio: {value}` is not a ratio in [0, 1): set `warmup_steps` yourself")
    return {"warmup_steps": float(value)}


def _flash_attention(value, config, fields, method):
    if value is True:
        return {"attn_implementation": "flash_attention_2"}
    if value in (False, None):
        return {}
    raise Refuse(f"`use_flash_attention_2: {value}` is not a boolean: set `attn_implementation` yourself")


def _truncation_side(value, config, fields, method):
    if value == "right":
        return {"truncation_mode": "keep_start"}
    raise Refuse(
        f"`truncation_side: {value}` would be `truncation_mode: keep_end`, which TRL 1.x deprecates: decide whether "
        "to keep the start (`truncation_mode: keep_start`) or shorten the data"
    )


def _dataset_mixer(value, config, fields, method):
    if isinstance(value, dict) and len(value) == 1:
        ((dataset, fraction),) = value.items()
        if fraction in (1, 1.0):
            return {"dataset_name": dataset}
        raise Refuse(
            f"`dataset_mixer` keeps {fraction} of {dataset}: write a `dataset_mixture:` block with `weight: {fraction}`"
        )
    raise Refuse(
        "`dataset_mixer` mixes several datasets, and the handbook took each one's test split whole, which the "
        "`dataset_mixture:` block (`datasets: [{id, config, split, columns, weight}], seed, test_split_size`) does "
        "not express: write that block, choosing the test set"
    )


def _dataset_splits(value, config, fields, method):
    splits = [value] if isinstance(value, str) else value
    if not isinstance(splits, list):
        raise Refuse(f"`dataset_splits` is not a list of split names: {value!r}")
    train = [s for s in splits if "train" in str(s)]
    test = [s for s in splits if "test" in str(s)]
    if len(train) != 1 or len(test) > 1 or len(train) + len(test) != len(splits):
        raise Refuse(
            f"`dataset_splits: {splits}` does not name one train split and at most one test split: set "
            "`dataset_train_split` and `dataset_test_split`"
        )
    return {"dataset_train_split": train[0], **({"dataset_test_split": test[0]} if test else {})}


def _dataset_configs(value, config, fields, method):
    configs = [value] if isinstance(value, str) else value
    if isinstance(configs, list) and len(configs) == 1:
        return {"dataset_config": configs[0]}
    if configs in ([], None):
        return {}
    raise Refuse(f"`dataset_configs: {value}` names several configs; one dataset reads one: set `dataset_config`")


def _chat_template(value, config, fields, method):
    inline = isinstance(value, str) and ("{" in value or "\n" in value)
    if "chat_template_path" in fields and isinstance(value, str) and not inline:
        return {"chat_template_path": value}
    if inline:
        where = (
            "save it to a .jinja file and set `chat_template_path` to it"
            if "chat_template_path" in fields
            else "this method's config takes no template: set it as the tokenizer's `chat_template`, save the "
            "tokenizer with the model and point `model_name_or_path` at that folder"
        )
        raise Refuse(f"`chat_template` is an inline Jinja template, and TRL 1.16 takes a file: {where}")
    raise Refuse(f"`chat_template`: {RENAMED_KEYS['chat_template'].otherwise}")


def _text_column(value, config, fields, method):
    return {"dataset_text_field": value} if "dataset_text_field" in fields else {}


def _rpo_alpha(value, config, fields, method):
    if value is None:
        return {}
    loss = config.get("loss_type")
    if "loss_weights" not in fields or loss not in (None, "sigmoid", ["sigmoid"]) or "loss_weights" in config:
        raise Refuse(f"`rpo_alpha`: {RENAMED_KEYS['rpo_alpha'].how} (the recipe's own loss settings are in the way)")
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, value]}


def _tokenizer(value, config, fields, method):
    if value in (None, config.get("model_name_or_path")):
        return {}
    raise Refuse(
        f"`tokenizer_name_or_path: {value}` differs from the model: {RENAMED_KEYS['tokenizer_name_or_path'].how}"
    )


def _include_inputs(value, config, fields, method):
    return {"include_for_metrics": ["inputs"]} if value else {}


def _logging_dir(value, config, fields, method):
    if "env" in config:
        raise Refuse("`logging_dir`: add `TENSORBOARD_LOGGING_DIR: ...` to the recipe's `env:` block")
    return {"env": {"TENSORBOARD_LOGGING_DIR": value}}


_SAME = (
    "torch_dtype",
    "max_seq_length",
    "evaluation_strategy",
    "per_gpu_train_batch_size",
    "per_gpu_eval_batch_size",
    "no_cuda",
    "push_to_hub_token",
    "push_to_hub_model_id",
    "hub_model_revision",
    "preprocessing_num_workers",
    "torchdynamo",
)
_DROPPED = (
    "overwrite_output_dir",
    "auto_insert_empty_system_msg",
    "dataset_text_field",
    "max_prompt_length",
    "max_completion_length",
    "ref_model_init_kwargs",
    "ref_adapter_name",
    "model_adapter_name",
    "padding_value",
    "label_pad_token_id",
    "generate_during_eval",
    "force_use_ref_model",
    "is_encoder_decoder",
    "use_logits_to_keep",
    "dataset_batch_size",
    "num_of_sequences",
    "chars_per_token",
    "use_mps_device",
    "fp16_backend",
    "half_precision_backend",
    "fp16_opt_level",
    "include_tokens_per_second",
    "tpu_num_cores",
    "jit_mode_eval",
    "use_legacy_prediction_loop",
    "past_index",
    "ray_scope",
    "mp_parameters",
)
_REVISION = "`{value}` is not the default revision: give it as `model_revision` if it is the model's own"

# Why a converted key reads as it does now (default: its RENAMED_KEYS advice).
_REASONS = {
    "dataset_mixer": "one dataset, all of its rows",
    "dataset_splits": "the split whose name holds train / test, as the handbook read them",
    "dataset_configs": "one config",
    "truncation_side": "`right` keeps the start",
    "use_flash_attention_2": "transformers 5 selects the attention kernel by name",
    "text_column": "same meaning",
    "logging_dir": "transformers 5's TensorBoard callback reads the environment variable",
}

# Fields that are still accepted but deprecated, with the field that replaces them (same values).
DEPRECATED_FIELDS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

# How each key of RENAMED_KEYS is migrated; a key not here (push_to_hub_organization, the fsdp_* and
# dispatch/split_batches options) needs a decision, and its RENAMED_KEYS advice is given.
FIXES: dict[str, Callable] = {
    **{key: _rename(RENAMED_KEYS[key].new) for key in _SAME},
    **dict.fromkeys(_DROPPED, _drop),
    "warmup_ratio": _warmup_ratio,
    "use_flash_attention_2": _flash_attention,
    "truncation_side": _truncation_side,
    "dataset_mixer": _dataset_mixer,
    "dataset_splits": _dataset_splits,
    "dataset_configs": _dataset_configs,
    "chat_template": _chat_template,
    "text_column": _text_column,
    "rpo_alpha": _rpo_alpha,
    "tokenizer_name_or_path": _tokenizer,
    "include_inputs_for_metrics": _include_inputs,
    "logging_dir": _logging_dir,
    "base_model_revision": _drop_if(lambda v: v in (None, "main"), _REVISION),
    "model_code_revision": _drop_if(lambda v: v in (None, "main"), _REVISION),
    "save_safetensors": _drop_if(
        lambda v: v in (None, True),
        "`save_safetensors: {value}`: checkpoints are always safetensors in transformers 5",
    ),  # fmt: skip
    "use_ipex": _drop_if(lambda v: not v, "`use_ipex: {value}`: IPEX support was removed in transformers 5"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------------


def _dump(mapping: dict) -> list[str]:
    import yaml

    return yaml.safe_dump(mapping, default_flow_style=False, sort_keys=False, width=1000).splitlines()


def _spans(text: str) -> dict[str, tuple[int, int]]:
    """`{key: (first line, end line)}` of each top-level entry of a block mapping (0-based, end excluded)."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None or not isinstance(node, yaml.MappingNode) or node.flow_style:
        raise Refuse("the recipe is not a block mapping (`key: value` lines): migrate it by hand")
    spans = {}
    for key_node, value_node in node.value:
        end = value_node.end_mark.line + (1 if value_node.end_mark.column > 0 else 0)
        spans[key_node.value] = (key_node.start_mark.line, max(end, key_node.start_mark.line + 1))
    return spans


def migrate_recipe(path: str | Path, method: str | None = None) -> Migration:
    """Migrate one recipe's renamed and removed keys (see the module docstring); nothing is written.

    Args:
        path (`str` or `Path`): the recipe YAML.
        method (`str`, *optional*): its kind ([`~trl_rewardweighted.scripts.check_recipe.KINDS`]); by default read
            from the path.

    Returns:
        [`Migration`]: `text` is the migrated recipe when `ok`; otherwise `refused` names each key that needs a
        decision (and any other problem of the migrated recipe).
    """
    path = Path(path)
    result = Migration(str(path))
    result.method, config, error = read_recipe(path, method)
    if error:
        result.refused.append(error)
        return result
    fields = recipe_fields(result.method)
    text = path.read_text()
    try:
        spans = _spans(text)
    except Refuse as err:
        result.refused.append(str(err))
        return result

    edits: dict[str, list[str]] = {}  # key -> the lines replacing its entry
    migrated = {k: v for k, v in config.items()}
    refused_keys = set()
    lines = text.splitlines()
    for key, value in config.items():
        deprecated = DEPRECATED_FIELDS.get(key)
        if deprecated in fields and deprecated not in config:
            edits[key] = _renamed(
                lines, spans[key], key, deprecated, f"{MARK} `{key}` -> `{deprecated}` (deprecated name)"
            )
            migrated[deprecated] = migrated.pop(key)
            result.changes.append(f"`{key}` -> `{deprecated}` (deprecated name)")
            continue
        if key == "env" or key in fields or key not in RENAMED_KEYS:
            continue  # fields stay; an unknown key is reported by the check below
        fix = FIXES.get(key)
        try:
            if fix is None:
                raise Refuse(f"`{key}`: {RENAMED_KEYS[key].how}")
            new = fix(value, config, fields, result.method)
            taken = [k for k in new if k in config and k not in RENAMED_KEYS]
            if taken:
                raise Refuse(f"`{key}` becomes `{taken[0]}`, which the recipe sets too: keep one of them")
            unknown = [k for k in new if k not in fields and k != "env"]
            if unknown:
                raise Refuse(f"`{key}` becomes `{unknown[0]}`, which {result.method} recipes do not take")
        except Refuse as err:
            result.refused.append(str(err))
            refused_keys.add(key)
            migrated.pop(key)
            continue
        del migrated[key]
        migrated.update(new)
        start, end = spans[key]
        if list(new.values()) == [value] and list(new) != ["env"]:  # the same value under its new name
            reason = f"`{key}` -> `{next(iter(new))}` ({_REASONS.get(key, RENAMED_KEYS[key].how)})"
            edits[key] = _renamed(lines, spans[key], key, next(iter(new)), f"{MARK} {reason}")
        elif new:
            shown = ", ".join(f"`{k}`" for k in new)
            reason = f"`{key}: {_inline(value)}` -> {shown} ({_REASONS.get(key, RENAMED_KEYS[key].how)})"
            edits[key] = [f"{MARK} {reason}", *_dump(new)]
        else:
            reason = f"removed `{key}`: {RENAMED_KEYS[key].how}"
            edits[key] = [f"{MARK} {reason}", *(f"# {line}" if line.strip() else "#" for line in lines[start:end])]
        result.changes.append(reason)
    # The migrated recipe is checked like any other (the refused keys left out, named above).
    report = RecipeReport(str(path), method=result.method)
    check_config(report, migrated)
    result.report = report
    result.refused += report.problems
    if result.refused:
        return result
    for key, replacement in sorted(edits.items(), key=lambda kv: spans[kv[0]][0], reverse=True):  # bottom-up
        start, end = spans[key]
        lines[start:end] = replacement
    result.text = "\n".join(lines) + "\n"
    return result


def _renamed(lines: list[str], span: tuple[int, int], old: str, new: str, comment: str) -> list[str]:
    """The lines of the entry at `span` with its key `old` renamed `new` (value, inline comment and the lines below
    kept as written), under `comment`."""
    start, end = span
    first = lines[start]
    column = first.index(old)
    return [comment, first[:column] + new + first[column + len(old) :], *lines[start + 1 : end]]


def _inline(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def write_migration(
    path: str, out: str, method: str | None = None, overwrite: bool = False, stdout=None, stderr=None
) -> int:
    """`trl-rw check-recipe PATH --fix OUT`: migrate `path` and write `out` (atomically), or print each key that needs a
    decision and write nothing. Returns the exit code: 0 when written, 1 when refused.

    Raises:
        `FileExistsError`: `out` exists and `overwrite` is off (the input itself included).
    """
    import sys

    from trl_rewardweighted.data.utils import replace_atomically

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"--fix {out} exists; pass --overwrite to replace it.")
    result = migrate_recipe(path, method)
    if not result.ok:
        for problem in result.refused:
            print(f"{path}: cannot migrate: {problem}", file=stderr)
        print(
            f"check-recipe --fix: {len(result.refused)} problem(s) need a decision; {out} was not written", file=stderr
        )
        return 1
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(out) as tmp:
        tmp.write_text(result.text)
    for change in result.changes:
        print(f"{path}: {change}", file=stdout)
    print(f"check-recipe --fix: {len(result.changes)} key(s) migrated, written to {out}", file=stdout)
    result.report.path = str(out)
    print(result.report.summary(), file=stdout)
    return 0
