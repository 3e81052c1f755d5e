"""Reward-augmented relabeling of preference pairs (Zhang et al., arXiv 2410.08067).

Each scored pair ``(x, y_w, y_l, r_w, r_l)`` becomes two goal-conditioned pairs:

- goal ``g = r_w``: the prompt says "target score r_w"; ``y_w`` is chosen and ``y_l`` rejected (order kept);
- goal ``g = r_l``: the prompt says "target score r_l"; ``y_l`` is chosen and ``y_w`` rejected (order swapped).

Under the paper's indicator reward ``R(x, y, g) = 1{r(x, y) = g}`` the orientation only depends on which response
the goal describes, never on which response was originally preferred. The result trains with any direct alignment
loss (``RewardAugmentedDPOTrainer`` runs DPO on it).

Public functions:

- :func:`reward_augment_dataset`: the dataset transform (RA, RA+, Half-RA, ties, rescaling, multi-attribute goals);
- :func:`build_goal_prompt`: the goal-conditioned prompt for one prompt, built by the same code as training
  (use it at inference with ``score=10``);
- :func:`condition_dataset_on_goal`: put one fixed goal (default 10) into every prompt of a dataset, without
  doubling or swapping (evaluation data conditioned on the top score);
- :func:`goal_text` and :func:`format_score`: the goal string and the number format.

See ``docs/reward_augmented_dpo.md`` for the user guide.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .utils import is_messages

__all__ = [
    "reward_augment_dataset",
    "build_goal_prompt",
    "condition_dataset_on_goal",
    "to_explicit_prompt",
    "goal_text",
    "format_score",
    "DEFAULT_GOAL_TEMPLATE",
    "GOAL_HEADER",
    "DEFAULT_ATTRIBUTE_NAME",
    "GOAL_SEPARATOR",
    "AUGMENTED_MARKER_COLUMN",
]

logger = logging.getLogger(__name__)

# The released code's wording (scripts/reward_augmentation.py, `system_prompt()`): plural "target scores" and a
# newline before the score line. The paper's appendix A.1 says "target score" (singular); the released models were
# trained with this string, so it is the default.
GOAL_HEADER = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the following "
    "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):"
)
#: ``{scores}`` is replaced by one ``"<name>: <value>."`` line per attribute; ``{score}`` (usable in custom templates)
#: by the formatted value of the first attribute.
DEFAULT_GOAL_TEMPLATE = GOAL_HEADER + "\n{scores}"
#: With the default name, a single-score goal reads ``"Overall score: 8."`` exactly like the released code.
DEFAULT_ATTRIBUTE_NAME = "Overall score"
#: Between the goal text and the user text (prefix placement) or the existing system text (merge).
GOAL_SEPARATOR = "\n\n"
#: A dataset holding this column is taken as already goal-conditioned: the transforms return it unchanged.
AUGMENTED_MARKER_COLUMN = "goal_text"

_MODES = ("both", "chosen_only")
_TIES = ("drop", "keep")
_SYSTEM_ROLES = ("auto", "system", "prefix")
_PROBE = "TRLRWGOALPROBE"
_MISMATCH_HINT = (
    "Each side must be the same conversation up to its final assistant reply(ies). Fix the data, or pass an explicit "
    "`prompt` column with `chosen`/`rejected` holding only the assistant reply (this mismatch is what the released "
    "code's `nosys` negative-goal relabeling produced, see docs/reward_augmented_dpo.md)."
)


# ---------------------------------------------------------------------------------------------------------------------
# Goal text
# ---------------------------------------------------------------------------------------------------------------------


def format_score(value: float) -> str:
    """Format a goal value like the released code: integer-valued → ``"8"``, otherwise the float (``"7.5"``).

    Round before formatting (``reward_augment_dataset`` does, see ``round_digits``); this function does not round.
    """
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"Goal scores must be finite numbers, got {value!r}.")
    if v == int(v):
        return str(int(v))
    return str(v)


def goal_text(scores: float | Sequence[float], names: Sequence[str] | None = None, template: str | None = None) -> str:
    """The goal (system) text for ``scores`` (one value, or one per attribute name).

    Default (``template=None``, one score)::

        You are an assistant that generates responses for the instruction while implicitly achieving the following
        target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):
        Overall score: 8.

    (a single line break before ``Overall score``). With several attributes, one ``"<name>: <value>."`` line each.
    A custom ``template`` is a ``str.format`` string with ``{scores}`` (the attribute lines) and/or ``{score}`` (the
    formatted first value).
    """
    if isinstance(scores, (int, float, np.integer, np.floating)):
        scores = [float(scores)]
    scores = list(scores)
    names = list(names) if names is not None else [DEFAULT_ATTRIBUTE_NAME]
    if len(names) != len(scores):
        raise ValueError(f"Got {len(scores)} goal values for {len(names)} attributes {names}.")
    formatted = [format_score(s) for s in scores]
    lines = "\n".join(f"{name}: {value}." for name, value in zip(names, formatted))
    template = DEFAULT_GOAL_TEMPLATE if template is None else template
    try:
        return template.format(scores=lines, score=formatted[0])
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"Invalid goal template {template!r}: it may only use the placeholders `{{scores}}` (one line per "
            f"attribute) and `{{score}}` (the first value); write literal braces as `{{{{` and `}}}}`. ({exc!r})"
        ) from exc


def _check_template(template: str | None) -> None:
    if template is None:
        return
    if not isinstance(template, str):
        raise TypeError(f"`goal_template` must be a string or None, got {type(template).__name__}.")
    if "{score}" not in template and "{scores}" not in template:
        raise ValueError(
            f"The goal template {template!r} has neither `{{score}}` nor `{{scores}}`: the goal value would never "
            "reach the prompt."
        )
    goal_text(5.0, template=template)  # raises on bad placeholders


# ---------------------------------------------------------------------------------------------------------------------
# Where the goal goes
# ---------------------------------------------------------------------------------------------------------------------


def _template_renders_system(tokenizer) -> bool | None:
    """True when the chat template renders a system message, False when it raises or drops it, None if no template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    probe = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "Hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # Gemma-style templates raise "System role not supported"
        return False
    if not isinstance(text, str):  # some processors return a list for batched input
        text = str(text)
    return _PROBE in text


def _resolve_placement(conversational: bool, tokenizer, system_role: str) -> str:
    """``"system"`` or ``"prefix"`` for this data and tokenizer (see ``reward_augment_dataset``)."""
    if system_role not in _SYSTEM_ROLES:
        raise ValueError(f"`system_role` must be one of {_SYSTEM_ROLES}, got {system_role!r}.")
    if not conversational:
        return "prefix"  # a plain-string prompt has no roles
    if system_role != "auto":
        return system_role
    if tokenizer is None:
        return "system"
    renders = _template_renders_system(tokenizer)
    if renders is None:
        logger.warning(
            "system_role='auto': the tokenizer has no chat template, so the goal goes into a system message (the "
            "default without a tokenizer). Pass system_role='prefix' if the model has no system role."
        )
        return "system"
    return "system" if renders else "prefix"


def _prefix_content(content: Any, goal: str) -> Any:
    if isinstance(content, str):
        return goal + GOAL_SEPARATOR + content
    if isinstance(content, list):  # multimodal-style parts: prepend a text part
        return [{"type": "text", "text": goal + GOAL_SEPARATOR}] + list(content)
    raise TypeError(f"Message content must be a string or a list of parts, got {type(content).__name__}.")


def _insert_goal(prompt: Any, goal: str, placement: str, cache: dict | None = None) -> Any:
    """Return a new prompt carrying ``goal``; never mutates ``prompt`` (the released nosys code aliased dicts).

    - string prompt: ``goal + "\\n\\n" + prompt``;
    - ``placement="system"``: merged into an existing leading system message (``goal + "\\n\\n" + existing``),
      otherwise a new system message is inserted first;
    - ``placement="prefix"``: ``goal + "\\n\\n"`` before the content of the FIRST user message (an existing system
      message is left as it is).
    """
    if isinstance(prompt, str):
        return goal + GOAL_SEPARATOR + prompt
    messages = list(prompt)
    if placement == "system":
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0])
            first["content"] = _prefix_content(first["content"], goal)
            return [first] + messages[1:]
        keys = tuple(messages[0]) if messages else ()
        system = cache.get((goal, keys)) if cache is not None else None
        if system is None:
            system = {key: None for key in keys}  # same keys as the other messages (one Arrow struct type)
            system["role"] = "system"
            system["content"] = goal
            if cache is not None:  # shared between rows: never mutated, only written out
                cache[(goal, keys)] = system
        return [system] + messages
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            new = dict(message)
            new["content"] = _prefix_content(new["content"], goal)
            return messages[:i] + [new] + messages[i + 1 :]
    raise ValueError(f"The prompt has no user message to prefix the goal to: {prompt!r}.")


def _normalise_attribute_names(attributes) -> list[str] | None:
    if attributes is None:
        return None
    if isinstance(attributes, str):
        return [attributes]
    return list(attributes)  # dict → keys in order; list/tuple → names


def _goal_values(score: float, attributes) -> tuple[list[float], list[str] | None]:
    """Goal values and attribute names for an inference goal (every attribute at ``score`` unless given)."""
    names = _normalise_attribute_names(attributes)
    if isinstance(attributes, Mapping) and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in attributes.values()
    ):
        return [float(v) for v in attributes.values()], names
    return [float(score)] * (len(names) if names is not None else 1), names


def build_goal_prompt(
    prompt: str | list[dict],
    score: float = 10,
    tokenizer=None,
    system_role: str = "auto",
    template: str | None = None,
    attributes: Mapping[str, Any] | Sequence[str] | None = None,
) -> str | list[dict]:
    """The goal-conditioned prompt, exactly as :func:`reward_augment_dataset` builds training prompts (same code).

    Args:
        prompt: a string, or a conversational prompt (list of ``{"role", "content"}`` messages, no assistant reply).
        score: the goal value on the 1–10 scale; 10 (the top score) is the paper's inference goal. Used for every
            attribute, unless ``attributes`` maps names to numbers.
        tokenizer: decides the placement when ``system_role="auto"`` (see below).
        system_role: ``"auto"`` (a system message when the tokenizer's chat template renders one, otherwise a
            prefix to the first user turn followed by a blank line; a system message when no tokenizer is given),
            ``"system"`` or ``"prefix"``. String prompts always get the prefix.
        template: the goal template used at training (``None`` = the released code's wording).
        attributes: the multi-attribute goal used at training: the same dict as training's ``attributes`` (names →
            column pairs; every attribute gets ``score``), a list of names, or a dict of names → goal values.

    Returns:
        A string for a string prompt, a new message list for a conversational prompt (the input is not modified).

    Example::

        >>> build_goal_prompt([{"role": "user", "content": "Hi"}], score=10)
        [{'role': 'system', 'content': 'You are an assistant ... highest):\\nOverall score: 10.'},
         {'role': 'user', 'content': 'Hi'}]
    """
    _check_template(template)
    values, names = _goal_values(score, attributes)
    conversational = is_messages(prompt)
    if not conversational and not isinstance(prompt, str):
        raise TypeError(
            f"`prompt` must be a string or a list of messages with a `role`, got {type(prompt).__name__}: {prompt!r}."
        )
    placement = _resolve_placement(conversational, tokenizer, system_role)
    return _insert_goal(prompt, goal_text(values, names, template), placement)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt extraction (implicit-prompt data)
# ---------------------------------------------------------------------------------------------------------------------


def _split_conversations(chosen: list, rejected: list, row: int) -> tuple[list, list, list]:
    """Shared prefix of two full conversations → ``(prompt, chosen_reply, rejected_reply)``, or a clear error."""
    n = min(len(chosen), len(rejected))
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    prompt, c, r = chosen[:k], chosen[k:], rejected[k:]
    problem = None
    if k == 0:
        problem = "they share no leading message"
    elif not c or not r:
        problem = "one side has no reply after the shared messages"
    elif c[0].get("role") != "assistant" or r[0].get("role") != "assistant":
        problem = (
            f"they differ at turn {k} before the final reply ({c[0].get('role')!r}: {str(c[0].get('content'))[:80]!r}"
            f" vs {r[0].get('role')!r}: {str(r[0].get('content'))[:80]!r})"
        )
    elif any(m.get("role") in ("user", "system") for m in c + r):
        problem = f"they differ at turn {k}, which is followed by another user/system turn"
    if problem is not None:
        raise ValueError(f"Row {row}: the prompts of `chosen` and `rejected` differ: {problem}. {_MISMATCH_HINT}")
    return prompt, c, r


def _split_strings(chosen: str, rejected: str, row: int) -> tuple[str, str, str]:
    """TRL's ``extract_prompt`` rule for strings: the common character prefix, minus a trailing space."""
    n = min(len(chosen), len(rejected))
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) and k == len(rejected):
        raise ValueError(f"Row {row}: `chosen` and `rejected` are identical; there is no preference to learn.")
    if k > 0 and chosen[k - 1] == " ":
        k -= 1
    if k == 0:
        raise ValueError(
            f"Row {row}: `chosen` and `rejected` share no prompt prefix. Add a `prompt` column (implicit-prompt string "
            "data must start with the same prompt text)."
        )
    return chosen[:k], chosen[k:], rejected[k:]


def _detect_layout(dataset, prompt_column: str = "prompt", chosen_column: str = "chosen") -> tuple[str, bool]:
    """``(layout, conversational)`` from the first row; layout is ``"explicit"``, ``"implicit_conversational"`` (full
    conversations in chosen/rejected, no prompt column or a string one as in ultrafeedback_binarized) or
    ``"implicit_string"``."""
    first = dataset[0]
    chosen_conv = is_messages(first[chosen_column])
    if prompt_column in dataset.column_names:
        prompt_value = first[prompt_column]
        if is_messages(prompt_value):
            return "explicit", chosen_conv
        if isinstance(prompt_value, str):
            # A string prompt with full conversations in chosen/rejected (HuggingFaceH4/ultrafeedback_binarized):
            # the conversations are the source of truth, the string is replaced by their shared leading messages.
            return ("implicit_conversational" if chosen_conv else "explicit"), chosen_conv
        raise ValueError(
            f"Column `{prompt_column}` must hold strings or message lists, row 0 has {type(prompt_value).__name__}."
        )
    return ("implicit_conversational" if chosen_conv else "implicit_string"), chosen_conv


def _split_row(layout: str, prompt, chosen, rejected, row: int):
    """``(prompt, chosen, rejected)`` of one row in the explicit format."""
    if layout == "explicit":
        return prompt, chosen, rejected
    if layout == "implicit_conversational":
        return _split_conversations(chosen, rejected, row)
    return _split_strings(chosen, rejected, row)


# ---------------------------------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------------------------------


def _column_array(dataset, column: str) -> np.ndarray:
    """Float64 values of a numeric column (nulls → NaN), honouring an indices mapping."""
    table = dataset.with_format("arrow", columns=[column])[:]
    return np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)


def _normalise_range(spec, name: str):
    if spec is None or spec == "auto":
        return spec
    if isinstance(spec, str):
        parts = [p for p in spec.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")]
        try:
            spec = tuple(float(p) for p in parts)
        except ValueError:
            spec = None
        if spec is None or len(spec) != 2:
            raise ValueError(f"`score_range` for {name!r} must be None, 'auto' or 'lo,hi', got {spec!r}.")
    lo, hi = (float(v) for v in spec)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"`score_range` for {name!r} must be (lo, hi) with finite lo < hi, got {spec!r}.")
    return lo, hi


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``s' = 1 + 9 (s - lo) / (hi - lo)``."""
    return 1.0 + 9.0 * (values - lo) / (hi - lo)


def _check_in_range(values: np.ndarray, lo: float, hi: float, column: str, fix: str) -> None:
    finite = np.isfinite(values)
    bad = np.flatnonzero(finite & ((values < lo) | (values > hi)))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"Column `{column}` row {row} has {float(values[row])!r}, outside the score range [{lo:g}, {hi:g}] "
            f"({bad.size} row(s) out of range in this column). {fix}"
        )


def _augment_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    layout: str,
    prompt_column: str,
    chosen_column: str,
    rejected_column: str,
    score_pairs: list[tuple[str, str]],
    extra_columns: list[str],
    goals_chosen: np.ndarray,
    goals_rejected: np.ndarray,
    keep: np.ndarray,
    both: bool,
    names: list[str],
    template: str | None,
    placement: str,
    multi: bool,
) -> dict[str, list]:
    idx_array = np.asarray(indices, dtype=np.int64)
    keep_rows = keep[idx_array].tolist()
    goals_c = goals_chosen[idx_array].tolist()  # (B, A) as Python lists: no per-row numpy overhead
    goals_r = goals_rejected[idx_array].tolist()
    chosen_in = batch[chosen_column]
    rejected_in = batch[rejected_column]
    prompts_in = batch[prompt_column] if layout == "explicit" else None
    partner = {}
    for c_col, r_col in score_pairs:
        partner[c_col], partner[r_col] = r_col, c_col
    columns_in = {col: batch[col] for col in extra_columns}  # format each column once

    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for col in extra_columns:
        out[col] = []
    goal_key = "goal_scores" if multi else "goal_score"
    out_prompt, out_chosen, out_rejected = out["prompt"], out["chosen"], out["rejected"]
    out_text, out_value, out_side = [], [], []
    # (output column, input column when kept, input column when swapped)
    copy_plan = [(out[col], columns_in[col], columns_in[partner.get(col, col)]) for col in extra_columns]
    text_cache: dict[tuple, str] = {}
    message_cache: dict = {}

    for j, idx in enumerate(indices):
        if not keep_rows[j]:
            continue
        prompt, c, r = _split_row(
            layout, prompts_in[j] if prompts_in is not None else None, chosen_in[j], rejected_in[j], idx
        )
        copies = ((False, goals_c[j]), (True, goals_r[j])) if both else ((False, goals_c[j]),)
        for swapped, goal_row in copies:
            key = tuple(goal_row)
            text = text_cache.get(key)
            if text is None:
                text = text_cache[key] = goal_text(key, names, template)
            out_prompt.append(_insert_goal(prompt, text, placement, message_cache))
            out_chosen.append(r if swapped else c)
            out_rejected.append(c if swapped else r)
            for target, same, other in copy_plan:
                target.append(other[j] if swapped else same[j])
            out_text.append(text)
            out_value.append(list(key) if multi else key[0])
            out_side.append("rejected" if swapped else "chosen")
    out[AUGMENTED_MARKER_COLUMN] = out_text
    out[goal_key] = out_value
    out["goal_side"] = out_side
    return out


_RESERVED_COLUMNS = ("goal_score", "goal_scores", "goal_side")


def _check_reserved_columns(columns) -> None:
    clash = [c for c in _RESERVED_COLUMNS if c in columns]
    if clash:
        raise ValueError(
            f"The dataset already has column(s) {clash}, which the goal conditioning writes (with `goal_text`). "
            "Rename or remove them first."
        )


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: building ~10^5 small dicts/lists per second triggers collections that
    scan the whole heap and cost half of the relabeling time. The relabeling creates no reference cycles (reference
    counting frees everything), and the previous state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _reward_augment(
    dataset,
    tokenizer=None,
    *,
    mode: str = "both",
    fraction: float = 1.0,
    ties: str = "drop",
    score_columns: tuple[str, str] = ("score_chosen", "score_rejected"),
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    score_range=None,
    round_digits: int | None = 2,
    goal_template: str | None = None,
    system_role: str = "auto",
    attributes: Mapping[str, tuple[str, str]] | None = None,
    shuffle: bool = False,
    seed: int = 42,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Implementation of :func:`reward_augment_dataset`; also returns a stats dict (used by the trainer's logs)."""
    from datasets import Dataset, DatasetDict, Features, IterableDataset, List, Value

    from .utils import check_float_column

    if isinstance(dataset, (DatasetDict, dict)):
        raise TypeError(
            "reward_augment_dataset takes one split (a `datasets.Dataset`), e.g. `dataset['train']`. Evaluation splits "
            "are usually left un-augmented (the paper and the released code evaluate on the original pairs)."
        )
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "reward_augment_dataset needs a map-style `datasets.Dataset`: score rescaling, `fraction` and the drop "
            "counts read the whole dataset. Load it without `streaming=True`, or augment it once and save it."
        )
    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a `datasets.Dataset`, got {type(dataset).__name__}.")

    columns = list(dataset.column_names)
    stats = {"pairs_in": len(dataset)}
    if AUGMENTED_MARKER_COLUMN in columns:
        logger.info(
            "The dataset already has a `%s` column: it is goal-conditioned already, returned unchanged (%d rows).",
            AUGMENTED_MARKER_COLUMN,
            len(dataset),
        )
        stats.update(already_augmented=True, rows_out=len(dataset))
        return dataset, stats

    _check_reserved_columns(columns)

    # ---- options -------------------------------------------------------------------------------------------------
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES} ('both' = RA, 'chosen_only' = RA+), got {mode!r}.")
    if ties not in _TIES:
        raise ValueError(f"`ties` must be one of {_TIES}, got {ties!r}.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be a number in (0, 1] (0.5 = Half-RA), got {fraction!r}.")
    if round_digits is not None and (isinstance(round_digits, bool) or not isinstance(round_digits, int)):
        raise ValueError(f"`round_digits` must be an int or None, got {round_digits!r}.")
    if system_role not in _SYSTEM_ROLES:
        raise ValueError(f"`system_role` must be one of {_SYSTEM_ROLES}, got {system_role!r}.")
    _check_template(goal_template)
    if attributes is None:
        if isinstance(score_columns, str) or len(score_columns) != 2:
            raise ValueError(
                f"`score_columns` must be a pair (chosen column, rejected column), got {score_columns!r}."
            )
        attr_map = {DEFAULT_ATTRIBUTE_NAME: tuple(score_columns)}
    else:
        if not isinstance(attributes, Mapping) or not attributes:
            raise ValueError(
                "`attributes` must be a non-empty dict {name: (chosen score column, rejected score column)}, e.g. "
                "{'Helpfulness': ('helpfulness_chosen', 'helpfulness_rejected')}."
            )
        attr_map = {}
        for name, pair in attributes.items():
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"`attributes[{name!r}]` must be (chosen column, rejected column), got {pair!r}.")
            attr_map[str(name)] = tuple(pair)
    names = list(attr_map)
    multi = attributes is not None
    if isinstance(score_range, Mapping):
        ranges = {name: _normalise_range(score_range.get(name), name) for name in names}
    else:
        ranges = {name: _normalise_range(score_range, name) for name in names}

    # ---- columns -------------------------------------------------------------------------------------------------
    for col, what in ((chosen_column, "chosen"), (rejected_column, "rejected")):
        if col not in columns:
            raise ValueError(
                f"The dataset has no `{col}` column (the {what} responses; columns: {columns}). Pass "
                f"`{what}_column=` with the right name."
            )
    score_pairs = list(attr_map.values())
    for c_col, r_col in score_pairs:
        for col in (c_col, r_col):
            check_float_column(
                dataset,
                col,
                "Reward augmentation needs a numeric score for each response: name the columns with "
                "`score_columns=(chosen, rejected)` (or `attributes=`), or relabel a dataset without scores with "
                "`trl_rewardweighted.ira.implicit_reward_relabel`.",
            )
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there are no pairs to augment.")

    # ---- layout --------------------------------------------------------------------------------------------------
    layout, conversational = _detect_layout(dataset, prompt_column, chosen_column)
    placement = _resolve_placement(conversational, tokenizer, system_role)

    # ---- Half-RA selection: the first floor(fraction * N) input rows ---------------------------------------------
    n_total = len(dataset)
    raw_c = np.stack([_column_array(dataset, c) for c, _ in score_pairs], axis=1)  # (N, A)
    raw_r = np.stack([_column_array(dataset, r) for _, r in score_pairs], axis=1)
    full_c, full_r = raw_c, raw_r  # 'auto' rescaling uses the whole input's min/max
    if fraction < 1.0:
        n_keep = math.floor(fraction * n_total + 1e-9)
        if n_keep == 0:
            raise ValueError(f"`fraction={fraction}` of {n_total} pairs keeps no pair.")
        dataset = dataset.select(range(n_keep))
        raw_c, raw_r = raw_c[:n_keep], raw_r[:n_keep]
    stats["pairs_selected"] = len(dataset)

    # ---- scores: drop non-finite, check ranges, rescale, round --------------------------------------------------
    finite = np.isfinite(raw_c).all(axis=1) & np.isfinite(raw_r).all(axis=1)
    goals_c = np.empty_like(raw_c)
    goals_r = np.empty_like(raw_r)
    for a, name in enumerate(names):
        c_col, r_col = score_pairs[a]
        spec = ranges[name]
        if spec == "auto":
            pool = np.concatenate([full_c[:, a], full_r[:, a]])
            pool = pool[np.isfinite(pool)]
            if pool.size == 0:
                raise ValueError(f"No finite scores in columns {score_pairs[a]}: nothing to rescale.")
            lo, hi = float(pool.min()), float(pool.max())
            if not lo < hi:
                raise ValueError(
                    f"score_range='auto': every score in columns {score_pairs[a]} equals {lo:g}, so min/max rescaling "
                    "is undefined (and every pair would be a tie). Pass `score_range=(lo, hi)` explicitly."
                )
            stats.setdefault("score_range", {})[name] = (lo, hi)
            goals_c[:, a] = _rescale(raw_c[:, a], lo, hi)
            goals_r[:, a] = _rescale(raw_r[:, a], lo, hi)
        elif spec is None:
            fix = (
                "Scores are used as goals on the 1-10 scale as they are (score_range=None). Pass "
                "`score_range=(lo, hi)` with the range your scores live on, or `score_range='auto'` to map the "
                "dataset min/max onto 1-10."
            )
            _check_in_range(raw_c[:, a], 1.0, 10.0, c_col, fix)
            _check_in_range(raw_r[:, a], 1.0, 10.0, r_col, fix)
            goals_c[:, a] = raw_c[:, a]
            goals_r[:, a] = raw_r[:, a]
        else:
            lo, hi = spec
            fix = "Widen `score_range` or use `score_range='auto'` (dataset min/max)."
            _check_in_range(raw_c[:, a], lo, hi, c_col, fix)
            _check_in_range(raw_r[:, a], lo, hi, r_col, fix)
            goals_c[:, a] = _rescale(raw_c[:, a], lo, hi)
            goals_r[:, a] = _rescale(raw_r[:, a], lo, hi)
    if round_digits is not None:
        with np.errstate(invalid="ignore"):
            goals_c = np.round(goals_c, round_digits)
            goals_r = np.round(goals_r, round_digits)
    goals_c[~finite] = 0.0  # never formatted: those rows are dropped
    goals_r[~finite] = 0.0
    tie = finite & (goals_c == goals_r).all(axis=1)
    keep = finite & ~tie if ties == "drop" else finite.copy()
    n_nonfinite = int((~finite).sum())
    stats.update(
        dropped_nonfinite=n_nonfinite,
        ties=int(tie.sum()),
        dropped_ties=int(tie.sum()) if ties == "drop" else 0,
    )
    if n_nonfinite:
        rows = np.flatnonzero(~finite)[:5].tolist()
        logger.warning(
            "Reward augmentation dropped %d pair(s) with a missing or non-finite score (rows %s%s).",
            n_nonfinite,
            rows,
            ", ..." if n_nonfinite > 5 else "",
        )
    if stats["dropped_ties"]:
        logger.warning(
            "Reward augmentation dropped %d tied pair(s) (equal goal scores after rescaling/rounding: both responses "
            "meet the goal, so the pair carries no preference). Pass ties='keep' to keep them like the released code.",
            stats["dropped_ties"],
        )
    n_pairs = int(keep.sum())
    if n_pairs == 0:
        raise ValueError(
            f"No pair is left after dropping {n_nonfinite} non-finite and {stats['dropped_ties']} tied pair(s) out of "
            f"{len(dataset)}."
        )

    # ---- output schema -------------------------------------------------------------------------------------------
    in_features = dataset.features
    std_cols = {prompt_column, chosen_column, rejected_column}
    extra_columns = [c for c in columns if c not in std_cols and c not in ("prompt", "chosen", "rejected")]
    dropped_cols = [c for c in columns if c in ("prompt", "chosen", "rejected") and c not in std_cols]
    if dropped_cols:
        raise ValueError(
            f"Columns {dropped_cols} would be overwritten by the output's standard `prompt`/`chosen`/`rejected` "
            "columns; rename them first."
        )
    if layout == "explicit":
        prompt_feature = in_features[prompt_column]
    elif layout == "implicit_conversational":
        prompt_feature = in_features[chosen_column]
    else:
        prompt_feature = Value("string")
    out_features = {"prompt": prompt_feature, "chosen": in_features[chosen_column]}
    out_features["rejected"] = in_features[rejected_column]
    for col in extra_columns:
        out_features[col] = in_features[col]
    for c_col, r_col in score_pairs:  # swapped columns must share one type
        if in_features[c_col] != in_features[r_col]:
            out_features[c_col] = out_features[r_col] = Value("float64")
    out_features[AUGMENTED_MARKER_COLUMN] = Value("string")
    if multi:
        out_features["goal_scores"] = List(Value("float64"))
    else:
        out_features["goal_score"] = Value("float64")
    out_features["goal_side"] = Value("string")

    map_kwargs = {}
    if num_proc is not None and num_proc > 1:
        map_kwargs["num_proc"] = num_proc
    with _gc_paused():
        augmented = dataset.map(
            _augment_batch,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            remove_columns=columns,
            features=Features(out_features),
            fn_kwargs=dict(
                layout=layout,
                prompt_column=prompt_column,
                chosen_column=chosen_column,
                rejected_column=rejected_column,
                score_pairs=score_pairs,
                extra_columns=extra_columns,
                goals_chosen=goals_c,
                goals_rejected=goals_r,
                keep=keep,
                both=mode == "both",
                names=names,
                template=goal_template,
                placement=placement,
                multi=multi,
            ),
            desc="Reward-augmenting pairs",
            **map_kwargs,
        )
    if shuffle:
        augmented = augmented.shuffle(seed=seed)
    stats.update(
        pairs_augmented=n_pairs,
        rows_out=len(augmented),
        placement=placement,
        layout=layout,
        already_augmented=False,
    )
    logger.info(
        "Reward augmentation (mode=%s, fraction=%s, ties=%s): %d input pairs, %d selected, %d dropped (non-finite), "
        "%d tied (%s), %d rows out; goal placement: %s.",
        mode,
        fraction,
        ties,
        stats["pairs_in"],
        stats["pairs_selected"],
        n_nonfinite,
        stats["ties"],
        "dropped" if ties == "drop" else "kept",
        len(augmented),
        placement,
    )
    return augmented, stats


def reward_augment_dataset(
    dataset,
    tokenizer=None,
    *,
    mode: str = "both",
    fraction: float = 1.0,
    ties: str = "drop",
    score_columns: tuple[str, str] = ("score_chosen", "score_rejected"),
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    score_range: str | tuple[float, float] | Mapping | None = None,
    round_digits: int | None = 2,
    goal_template: str | None = None,
    system_role: str = "auto",
    attributes: Mapping[str, tuple[str, str]] | None = None,
    shuffle: bool = False,
    seed: int = 42,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Relabel scored preference pairs with goal-conditioned prompts (reward augmentation, arXiv 2410.08067).

    For every pair, the copy conditioned on the chosen response's score keeps the order, and the copy conditioned on
    the rejected response's score swaps ``chosen`` and ``rejected`` (the paper's rule; the released code's ``nosys``
    variant forgot the swap, this one does not).

    Args:
        dataset (`datasets.Dataset`): one split of preference pairs with numeric score columns. Accepted formats:
            standard (``prompt``/``chosen``/``rejected`` strings), conversational (``prompt`` a message list,
            ``chosen``/``rejected`` lists with the assistant reply), and implicit-prompt data where ``chosen`` and
            ``rejected`` are full conversations (no ``prompt`` column, or a string ``prompt`` as in
            ``HuggingFaceH4/ultrafeedback_binarized``, which is then replaced by the shared leading messages). Two
            conversations whose prompts differ raise an error naming the row. Implicit-prompt string data uses
            TRL's common-prefix rule.
        tokenizer: used only when ``system_role="auto"``, to check whether its chat template renders a system role.
        mode: ``"both"`` (RA: both goals, 2 rows per pair) or ``"chosen_only"`` (RA+: the chosen goal only).
        fraction: Half-RA. Keep and augment only the FIRST ``floor(fraction * len(dataset))`` input rows (input
            order, no sampling), so ``fraction=0.5`` with ``mode="both"`` gives as many rows as the input (minus
            drops). The drops below apply within that share.
        ties: ``"drop"`` (default: equal goals after rescaling and rounding, on the full attribute vector, mean both
            responses meet the goal, so the pair has no preference) or ``"keep"`` (the released code: contradictory
            twin pairs).
        score_columns: (chosen score column, rejected score column). Ignored when ``attributes`` is given.
        prompt_column, chosen_column, rejected_column: input column names. The output always uses ``prompt``,
            ``chosen``, ``rejected`` (what ``DPOTrainer`` reads).
        score_range: how scores become goals on the 1-10 scale. ``None``: used as they are; they must lie in
            [1, 10] (a clear error names the first row outside). ``(lo, hi)``: linear map
            ``s' = 1 + 9 (s - lo) / (hi - lo)``; scores outside [lo, hi] raise. ``"auto"``: the same map with the
            min/max of the whole input (both columns, finite values). A dict ``{attribute: spec}`` sets it per
            attribute. The string ``"lo,hi"`` is accepted (command lines).
        round_digits: goals are rounded to this many decimals (``numpy.round``, half to even) after rescaling;
            default 2, ``None`` = no rounding (the released code does not round its 0.5-step UltraFeedback scores).
            Numbers print like the released code: integer-valued ``8.0`` → ``"8"``, otherwise ``"7.5"``.
        goal_template: ``None`` = the released code's text (see :data:`DEFAULT_GOAL_TEMPLATE`), or a ``str.format``
            template with ``{scores}`` (one ``"<name>: <value>."`` line per attribute) and/or ``{score}``.
        system_role: where the goal goes in conversational prompts. ``"system"``: a system message (merged into an
            existing leading system message as ``goal + "\\n\\n" + existing``, never a second one). ``"prefix"``:
            ``goal + "\\n\\n"`` before the first user turn. ``"auto"`` (default): ``"system"`` if the tokenizer's chat
            template renders a probe system message, ``"prefix"`` if it raises (Gemma: "System role not supported") or
            drops it; ``"system"`` when no tokenizer is given. String prompts always get the prefix.
        attributes: multi-attribute goals, ``{name: (chosen column, rejected column)}`` in display order, e.g.
            ``{"Helpfulness": ("helpfulness_chosen", "helpfulness_rejected"), "Honesty": (...)}``. Each attribute is
            rescaled on its own; the goal text has one ``"<name>: <value>."`` line per attribute.
        shuffle, seed: the output is interleaved (row ``2i`` = chosen-goal copy of the ``i``-th kept pair, row
            ``2i+1`` = its rejected-goal copy), so any batch mixes positive and negative copies even without
            shuffling; the trainer's sampler shuffles anyway. ``shuffle=True`` adds a seeded shuffle (an indices
            mapping).
        num_proc, batch_size: forwarded to ``Dataset.map`` (batched).

    Returns:
        A new ``Dataset`` with ``prompt`` (goal-conditioned), ``chosen``, ``rejected``, every other input column
        copied into both copies (the score columns named in ``score_columns``/``attributes`` are swapped with the
        responses, so ``score_chosen`` always describes ``chosen``), and ``goal_text`` (the goal string; its
        presence marks the dataset as augmented), ``goal_score`` (float; ``goal_scores``, a list in attribute order,
        for multi-attribute goals) and ``goal_side`` (``"chosen"`` or ``"rejected"``: whose score the goal is).

    Calling it again on its output returns the input unchanged (idempotent; logged at INFO). Pairs with a missing or
    non-finite score are dropped and counted with a warning; so are ties under ``ties="drop"``.
    """
    augmented, _ = _reward_augment(
        dataset,
        tokenizer,
        mode=mode,
        fraction=fraction,
        ties=ties,
        score_columns=score_columns,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        score_range=score_range,
        round_digits=round_digits,
        goal_template=goal_template,
        system_role=system_role,
        attributes=attributes,
        shuffle=shuffle,
        seed=seed,
        num_proc=num_proc,
        batch_size=batch_size,
    )
    return augmented


def _condition_batch(batch, indices, *, placement, text, layout, prompt_column, chosen_column, rejected_column):
    n = len(indices)
    out = {}
    if layout == "explicit":
        prompts = batch[prompt_column]
    else:  # implicit prompt: split the conversations (same checks as the relabeling)
        split = [
            _split_row(layout, None, c, r, i) for c, r, i in zip(batch[chosen_column], batch[rejected_column], indices)
        ]
        prompts = [p for p, _, _ in split]
        out["chosen"] = [c for _, c, _ in split]
        out["rejected"] = [r for _, _, r in split]
    out["prompt"] = [_insert_goal(p, text, placement) for p in prompts]
    out[AUGMENTED_MARKER_COLUMN] = [text] * n
    return out


def _explicit_batch(batch, indices, *, layout, chosen_column, rejected_column):
    split = [
        _split_row(layout, None, c, r, i) for c, r, i in zip(batch[chosen_column], batch[rejected_column], indices)
    ]
    return {
        "prompt": [p for p, _, _ in split],
        "chosen": [c for _, c, _ in split],
        "rejected": [r for _, _, r in split],
    }


def to_explicit_prompt(
    dataset,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    num_proc: int | None = None,
):
    """Split implicit-prompt preference data into ``prompt``/``chosen``/``rejected`` (no goal added).

    Returns ``dataset`` unchanged when it already has an explicit prompt. Needed for un-augmented evaluation data in
    the ``HuggingFaceH4/ultrafeedback_binarized`` layout (a string ``prompt`` next to full conversations): TRL 1.16's
    ``DPOTrainer`` extracts the prompt only when there is no ``prompt`` column and then fails on that layout
    (``TypeError``/``AttributeError`` depending on the hash seed). Prompts that differ between chosen and rejected
    raise the same error as :func:`reward_augment_dataset`.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return dataset
    columns = list(dataset.column_names)
    if chosen_column not in columns or rejected_column not in columns or "prompt_ids" in columns:
        return dataset
    layout, _ = _detect_layout(dataset, prompt_column, chosen_column)
    if layout == "explicit":
        return dataset
    remove = [c for c in (prompt_column, chosen_column, rejected_column) if c in columns]
    return dataset.map(
        _explicit_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"layout": layout, "chosen_column": chosen_column, "rejected_column": rejected_column},
        remove_columns=remove,
        num_proc=num_proc if (num_proc or 0) > 1 else None,
        desc="Extracting the prompt",
    )


def condition_dataset_on_goal(
    dataset,
    score: float = 10,
    tokenizer=None,
    *,
    system_role: str = "auto",
    goal_template: str | None = None,
    attributes: Mapping[str, Any] | Sequence[str] | None = None,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    num_proc: int | None = None,
):
    """Put one fixed goal (default: the top score 10) into every prompt, without doubling or swapping pairs.

    For evaluation data conditioned like inference (``RewardAugmentedDPOConfig.eval_goal_score``). Accepts an
    explicit ``prompt`` column (string or messages), or implicit-prompt preference data (the prompt is split off
    ``chosen``/``rejected`` as in :func:`reward_augment_dataset`). Adds ``goal_text`` (so the transforms treat the
    result as goal-conditioned and leave it alone) and ``goal_score`` (``goal_scores`` for several attributes). The
    prompts are built by :func:`build_goal_prompt`'s code.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a `datasets.Dataset`, got {type(dataset).__name__}.")
    columns = list(dataset.column_names)
    if AUGMENTED_MARKER_COLUMN in columns:
        logger.info("The dataset already has a `%s` column: returned unchanged.", AUGMENTED_MARKER_COLUMN)
        return dataset
    _check_reserved_columns(columns)
    _check_template(goal_template)
    if chosen_column in columns and rejected_column in columns:
        layout, _ = _detect_layout(dataset, prompt_column, chosen_column)
    elif prompt_column in columns:
        layout = "explicit"
    else:
        raise ValueError(
            f"condition_dataset_on_goal needs a `{prompt_column}` column or `{chosen_column}`/`{rejected_column}` "
            f"conversations to take the prompt from (columns: {columns})."
        )
    values, names = _goal_values(score, attributes)
    text = goal_text(values, names, goal_template)
    if layout == "explicit":
        conversational = is_messages(dataset[0][prompt_column])
    else:
        conversational = layout == "implicit_conversational"
    placement = _resolve_placement(conversational, tokenizer, system_role)
    remove = [c for c in (prompt_column,) if c in columns and (c != "prompt" or layout != "explicit")]
    if layout != "explicit":
        remove += [chosen_column, rejected_column]
    out = dataset.map(
        _condition_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={
            "placement": placement,
            "text": text,
            "layout": layout,
            "prompt_column": prompt_column,
            "chosen_column": chosen_column,
            "rejected_column": rejected_column,
        },
        remove_columns=remove,
        num_proc=num_proc if (num_proc or 0) > 1 else None,
        desc="Conditioning prompts on the goal",
    )
    if names is not None and len(names) > 1:
        return out.add_column("goal_scores", [values] * len(out))
    return out.add_column("goal_score", [values[0]] * len(out))
