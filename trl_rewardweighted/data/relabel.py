"""Reward-augmented relabeling of preference pairs (Zhang et al., arXiv 2410.08067).

Each scored pair `(x, y_w, y_l, r_w, r_l)` becomes two goal-conditioned pairs:

- goal `g = r_w`: the prompt says "target score r_w"; `y_w` is chosen and `y_l` rejected (order kept);
- goal `g = r_l`: the prompt says "target score r_l"; `y_l` is chosen and `y_w` rejected (order swapped).

Under the paper's indicator reward `R(x, y, g) = 1{r(x, y) = g}` the orientation only depends on which response the
goal describes, never on which response was originally preferred. The result trains with any direct alignment loss
(`RewardAugmentedDPOTrainer` runs DPO on it).

Public functions:

- [`reward_augment_dataset`]: the dataset transform (RA, RA+, Half-RA, ties, rescaling, multi-attribute goals), with
  its options defined once in [`RewardAugmentFields`] (which `RewardAugmentedDPOConfig` inherits) and validated once
  in an [`AugmentOptions`];
- [`build_goal_prompt`]: the goal-conditioned prompt for one prompt, built by the same code as training (use it at
  inference with `score=10`);
- [`condition_dataset_on_goal`]: put one fixed goal (default 10) into every prompt of a dataset, without doubling or
  swapping (evaluation data conditioned on the top score);
- [`to_explicit_prompt`] and [`explicit_pairs`]: implicit-prompt preference data split into prompt / chosen /
  rejected with TRL's [`~trl.extract_prompt`] (plus checks that name the row);
- [`goal_text`] and [`format_score`]: the goal string and the number format.

See `docs/reward_augmented_dpo.md` for the user guide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .utils import check_float_column, check_prompt_and_completion, check_text_or_messages, is_messages

__all__ = [
    "AugmentOptions",
    "RewardAugmentFields",
    "OPTION_ALIASES",
    "reward_augment_dataset",
    "build_goal_prompt",
    "condition_dataset_on_goal",
    "to_explicit_prompt",
    "explicit_pairs",
    "goal_text",
    "format_score",
    "AUGMENT_MODES",
    "TIE_POLICIES",
    "SYSTEM_ROLES",
    "DEFAULT_GOAL_TEMPLATE",
    "GOAL_HEADER",
    "DEFAULT_ATTRIBUTE_NAME",
    "GOAL_SEPARATOR",
    "AUGMENTED_MARKER_COLUMN",
    "twin_units",
]

logger = logging.getLogger(__name__)

# The released code's wording (scripts/reward_augmentation.py, `system_prompt()`): plural "target scores" and a
# newline before the score line. The paper's appendix A.1 says "target score" (singular); the released models were
# trained with this string, so it is the default.
GOAL_HEADER = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the following "
    "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):"
)
# `{scores}` is replaced by one `"<name>: <value>."` line per attribute; `{score}` (usable in custom templates) by the
# formatted value of the first attribute.
DEFAULT_GOAL_TEMPLATE = GOAL_HEADER + "\n{scores}"
# With the default name, a single-score goal reads `"Overall score: 8."` exactly like the released code.
DEFAULT_ATTRIBUTE_NAME = "Overall score"
# Between the goal text and the user text (prefix placement) or the existing system text (merge).
GOAL_SEPARATOR = "\n\n"
# A dataset holding this column is taken as already goal-conditioned: the transforms return it unchanged.
AUGMENTED_MARKER_COLUMN = "goal_text"

AUGMENT_MODES = ("both", "chosen_only")
TIE_POLICIES = ("drop", "keep")
SYSTEM_ROLES = ("auto", "system", "prefix")
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
    """Format a goal value like the released code: integer-valued → `"8"`, otherwise the float (`"7.5"`).

    Round before formatting (`reward_augment_dataset` does, see `round_digits`); this function does not round.
    """
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"Goal scores must be finite numbers, got {value!r}.")
    if v == int(v):
        return str(int(v))
    return str(v)


def goal_text(scores: float | Sequence[float], names: Sequence[str] | None = None, template: str | None = None) -> str:
    """The goal (system) text for `scores` (one value, or one per attribute name).

    Args:
        scores (`float` or `Sequence[float]`):
            The goal value(s) on the 1-10 scale.
        names (`Sequence[str]`, *optional*):
            One attribute name per value (default: `["Overall score"]`).
        template (`str`, *optional*):
            A `str.format` string with `{scores}` (the attribute lines) and/or `{score}` (the formatted first value);
            `None` is the released code's wording.

    Default (`template=None`, one score), with a single line break before `Overall score`:

    ```text
    You are an assistant that generates responses for the instruction while implicitly achieving the following
    target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):
    Overall score: 8.
    ```

    With several attributes, one `"<name>: <value>."` line each.
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
    """`"system"` or `"prefix"` for this data and tokenizer (see `reward_augment_dataset`)."""
    if system_role not in SYSTEM_ROLES:
        raise ValueError(f"`system_role` must be one of {SYSTEM_ROLES}, got {system_role!r}.")
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
    """Return a new prompt carrying `goal`; never mutates `prompt` (the released nosys code aliased dicts).

    - string prompt: `goal + "\\n\\n" + prompt`;
    - `placement="system"`: merged into an existing leading system message (`goal + "\\n\\n" + existing`),
      otherwise a new system message is inserted first;
    - `placement="prefix"`: `goal + "\\n\\n"` before the content of the FIRST user message (an existing system
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
    """Goal values and attribute names for an inference goal (every attribute at `score` unless given)."""
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
    """The goal-conditioned prompt, exactly as [`reward_augment_dataset`] builds training prompts (same code).

    Args:
        prompt (`str` or `list[dict]`):
            A string, or a conversational prompt (list of `{"role", "content"}` messages, no assistant reply).
        score (`float`, *optional*, defaults to `10`):
            The goal value on the 1-10 scale; 10 (the top score) is the paper's inference goal. Used for every
            attribute, unless `attributes` maps names to numbers.
        tokenizer (*optional*):
            Decides the placement when `system_role="auto"` (see below).
        system_role (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (a system message when the tokenizer's chat template renders one, otherwise a prefix to the
            first user turn followed by a blank line; a system message when no tokenizer is given), `"system"` or
            `"prefix"`. String prompts always get the prefix.
        template (`str`, *optional*):
            The goal template used at training (`None` = the released code's wording).
        attributes (`dict` or `list`, *optional*):
            The multi-attribute goal used at training: the same dict as training's `attributes` (names -> column
            pairs; every attribute gets `score`), a list of names, or a dict of names -> goal values.

    Returns:
        A string for a string prompt, a new message list for a conversational prompt (the input is not modified).

    Example:

    ```python
    >>> build_goal_prompt([{"role": "user", "content": "Hi"}], score=10)
    [{'role': 'system', 'content': 'You are an assistant ... highest):\\nOverall score: 10.'},
     {'role': 'user', 'content': 'Hi'}]
    ```
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
# Options
# ---------------------------------------------------------------------------------------------------------------------

# Short keyword names that `reward_augment_dataset` and `AugmentOptions` accept for some `RewardAugmentFields` fields
# (the names of the first releases). Error messages name both, so they read right from either entry point.
OPTION_ALIASES = {
    "mode": "augment_mode",
    "fraction": "augment_fraction",
    "attributes": "attribute_columns",
    "score_columns": ("score_chosen_column", "score_rejected_column"),
}
_SHORT_NAMES = {field_name: short for short, field_name in OPTION_ALIASES.items() if isinstance(field_name, str)}


def _opt(field_name: str) -> str:
    short = _SHORT_NAMES.get(field_name)
    return f"`{short}` (config: `{field_name}`)" if short else f"`{field_name}`"


def _field_names(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with the short names (`OPTION_ALIASES`) replaced by the field names; a field given twice raises."""
    out = {}
    for name, value in options.items():
        if name != "score_columns":
            renamed = {OPTION_ALIASES.get(name, name): value}
        elif isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(
                "`score_columns` (config: `score_chosen_column / score_rejected_column`) must be a pair (chosen "
                f"column, rejected column), got {value!r}."
            )
        else:
            renamed = dict(zip(OPTION_ALIASES[name], value))
        for key in renamed:
            if key in out:
                raise TypeError(f"The relabeling option {key!r} is given twice (by its name and by {name!r}).")
        out.update(renamed)
    return out


def _is_none_string(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("", "none", "null")


def _normalise_range(spec: Any, name: str):
    """`None`, `"auto"` or a `(lo, hi)` float pair with finite `lo < hi`; `"lo,hi"` strings are parsed."""
    if spec is None or _is_none_string(spec):
        return None
    if isinstance(spec, str):
        if spec.strip().lower() == "auto":
            return "auto"
        parts = spec.strip().strip("()[]").split(",")
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 2:
            raise ValueError(f"`score_range` for {name!r} must be None, 'auto' or 'lo,hi', got {spec!r}.")
        spec = values
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) != 2:
        raise ValueError(f"`score_range` for {name!r} must be None, 'auto' or (lo, hi), got {spec!r}.")
    try:
        lo, hi = (float(v) for v in spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`score_range` for {name!r} must be two numbers (lo, hi), got {spec!r}.") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"`score_range` for {name!r} must be (lo, hi) with finite lo < hi, got {spec!r}.")
    return lo, hi


def _normalise_attributes(attributes: Any) -> dict[str, tuple[str, str]] | None:
    if attributes is None or _is_none_string(attributes):
        return None
    if isinstance(attributes, str):  # a JSON object on the command line
        try:
            attributes = json.loads(attributes)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{_opt('attributes')} given as a string must be a JSON object such as "
                f'\'{{"Helpfulness": ["helpfulness_chosen", "helpfulness_rejected"]}}\', got {attributes!r} ({exc}).'
            ) from exc
    if not isinstance(attributes, Mapping) or not attributes:
        raise ValueError(
            f"{_opt('attributes')} must be a non-empty dict {{name: (chosen score column, rejected score column)}}, "
            f"e.g. {{'Helpfulness': ('helpfulness_chosen', 'helpfulness_rejected')}}, got {attributes!r}."
        )
    out = {}
    for name, pair in attributes.items():
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"{_opt('attributes')}[{name!r}] must be (chosen column, rejected column), got {pair!r}.")
        out[str(name)] = (str(pair[0]), str(pair[1]))
    return out


def _choice_field(default: str, choices: Sequence[str], help: str) -> Any:
    """A relabeling field that takes one of `choices` (TRL's parser offers and enforces them)."""
    return field(default=default, metadata={"help": help, "choices": list(choices)})


@dataclass
class RewardAugmentFields:
    r"""
    The relabeling options of reward augmentation, defined once: [`RewardAugmentedDPOConfig`] inherits these fields
    (with their `--help` text and choices for [`~trl.TrlParser`]), and [`AugmentOptions`], what
    [`reward_augment_dataset`] takes, is a validated, immutable copy of them. The function and `AugmentOptions` also
    accept the short names `mode`, `fraction`, `attributes` and `score_columns` (a pair for the two score columns),
    see `OPTION_ALIASES`; error messages name both spellings.

    Parameters:
        augment_mode (`str`, *optional*, defaults to `"both"`):
            `"both"` (RA: one copy conditioned on each response's score, 2 rows per pair) or `"chosen_only"` (RA+:
            only the chosen response's goal; same size as the input).
        augment_fraction (`float`, *optional*, defaults to `1.0`):
            Half-RA: keep and augment only the FIRST `floor(fraction * N)` input pairs (input order, no sampling),
            so `0.5` with `augment_mode="both"` gives as many rows as the input (minus drops). The drops below apply
            within that share.
        ties (`str`, *optional*, defaults to `"drop"`):
            Pairs whose goals are equal after rescaling and rounding (on the full attribute vector) carry no
            preference under the paper's indicator reward: `"drop"` removes them, `"keep"` follows the released code
            (contradictory twin pairs).
        score_chosen_column (`str`, *optional*, defaults to `"score_chosen"`):
            Column with the chosen response's score. Ignored when `attribute_columns` is given.
        score_rejected_column (`str`, *optional*, defaults to `"score_rejected"`):
            Column with the rejected response's score. Ignored when `attribute_columns` is given.
        score_range (`str`, `tuple`, `dict` or `None`, *optional*, defaults to `None`):
            How scores become goals on the 1-10 scale. `None`: used as they are; they must lie in [1, 10], as
            UltraFeedback's (a clear error names the first row outside). `(lo, hi)` or `"lo,hi"`: linear map
            `s' = 1 + 9 (s - lo) / (hi - lo)`; scores outside [lo, hi] raise. `"auto"`: the same map with the min/max
            of the whole input (both columns, finite values; for reward-model scores). With `attribute_columns`, a
            dict `{attribute: spec}` sets it per attribute (unknown names raise).
        round_digits (`int` or `None`, *optional*, defaults to `2`):
            Goals are rounded to this many decimals (`numpy.round`, half to even) after rescaling; `None` = no
            rounding (the released code does not round its 0.5-step UltraFeedback scores). Numbers print like the
            released code: integer-valued `8.0` -> `"8"`, otherwise `"7.5"`.
        goal_template (`str` or `None`, *optional*, defaults to `None`):
            `None` = the released code's text (`DEFAULT_GOAL_TEMPLATE`: "You are an assistant that generates
            responses for the instruction while implicitly achieving the following target scores (on a scale of
            1-10, where 1 is lowest and 10 is highest):\nOverall score: {score}."), or a `str.format` template with
            `{scores}` (one `"<name>: <value>."` line per attribute) and/or `{score}`. Use the same one at inference.
        system_role (`str`, *optional*, defaults to `"auto"`):
            Where the goal goes in conversational prompts. `"system"`: a system message (merged into an existing
            leading system message as `goal + "\n\n" + existing`, never a second one). `"prefix"`: `goal + "\n\n"`
            before the first user turn. `"auto"`: `"system"` if the tokenizer's chat template renders a probe system
            message, `"prefix"` if it raises (Gemma: "System role not supported") or drops it; `"system"` when no
            tokenizer is given. String prompts always get the prefix.
        attribute_columns (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Multi-attribute goals, `{name: [chosen column, rejected column]}` in display order (a JSON string on the
            command line). Each attribute is rescaled on its own; the goal text has one `"<name>: <value>."` line
            each, replacing the single overall score.
    """

    augment_mode: str = _choice_field(
        "both",
        AUGMENT_MODES,
        help="'both' (RA: both goals, 2N rows) or 'chosen_only' (RA+: the chosen goal only, N rows).",
    )
    augment_fraction: float = field(
        default=1.0,
        metadata={"help": "Half-RA: augment only the first floor(fraction*N) training pairs (0.5 keeps the size)."},
    )
    ties: str = _choice_field(
        "drop",
        TIE_POLICIES,
        help="Pairs with equal goal scores: 'drop' (paper's indicator reward) or 'keep' (released code).",
    )
    score_chosen_column: str = field(default="score_chosen", metadata={"help": "Score column of the chosen response."})
    score_rejected_column: str = field(
        default="score_rejected", metadata={"help": "Score column of the rejected response."}
    )
    score_range: str | None = field(
        default=None,
        metadata={
            "help": "None (scores already on 1-10), 'lo,hi' (linear map to 1-10) or 'auto' (training-set min/max)."
        },
    )
    round_digits: int | None = field(
        default=2, metadata={"help": "Decimals the goal scores are rounded to after rescaling (None: no rounding)."}
    )
    goal_template: str | None = field(
        default=None,
        metadata={"help": "Goal text template with {scores} and/or {score}; None = the released code's wording."},
    )
    system_role: str = _choice_field(
        "auto", SYSTEM_ROLES, help="Goal placement for conversational prompts: 'auto', 'system' or 'prefix'."
    )
    attribute_columns: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": 'Multi-attribute goals as JSON: {"Helpfulness": ["help_chosen", "help_rejected"], ...}.'},
    )

    def normalise_augment_fields(self) -> None:
        """Check every relabeling field and store the normalised values in place (`score_range` as `None`, `"auto"`,
        a float pair or a dict of them; `attribute_columns` as a dict of column pairs)."""
        set_ = object.__setattr__  # also on the immutable `AugmentOptions`: normalised once, here
        if self.augment_mode not in AUGMENT_MODES:
            raise ValueError(
                f"{_opt('augment_mode')} must be one of {AUGMENT_MODES} ('both' = RA, 'chosen_only' = RA+), got "
                f"{self.augment_mode!r}."
            )
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"{_opt('ties')} must be one of {TIE_POLICIES}, got {self.ties!r}.")
        if self.system_role not in SYSTEM_ROLES:
            raise ValueError(f"{_opt('system_role')} must be one of {SYSTEM_ROLES}, got {self.system_role!r}.")
        fraction = self.augment_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(
                f"{_opt('augment_fraction')} must be a number in (0, 1] (0.5 = Half-RA), got {fraction!r}."
            )
        set_(self, "augment_fraction", float(fraction))
        digits = self.round_digits
        if digits is not None and (isinstance(digits, bool) or not isinstance(digits, int) or digits < 0):
            raise ValueError(
                f"{_opt('round_digits')} must be an int >= 0 or None, got {digits!r} (a negative value rounds the "
                "goals to tens: 7.5 -> 10, 2 -> 0)."
            )
        _check_template(self.goal_template)
        set_(self, "score_chosen_column", str(self.score_chosen_column))
        set_(self, "score_rejected_column", str(self.score_rejected_column))
        set_(self, "attribute_columns", _normalise_attributes(self.attribute_columns))
        names = self.attribute_names
        spec = self.score_range
        if isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in names]
            if unknown:
                raise ValueError(
                    f"{_opt('score_range')} names unknown attribute(s) {unknown}; the attributes are {names}."
                )
            set_(self, "score_range", {name: _normalise_range(spec.get(name), name) for name in names})
        else:
            set_(self, "score_range", _normalise_range(spec, "score"))

    @property
    def attribute_map(self) -> dict[str, tuple[str, str]]:
        """`{attribute name: (chosen column, rejected column)}` in display order (one `"Overall score"` entry for
        single-score goals)."""
        if self.attribute_columns is not None:
            return dict(self.attribute_columns)
        return {DEFAULT_ATTRIBUTE_NAME: (self.score_chosen_column, self.score_rejected_column)}

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attribute_map)

    @property
    def multi(self) -> bool:
        """Multi-attribute goals (`goal_scores` list column instead of `goal_score`)."""
        return self.attribute_columns is not None

    def range_for(self, name: str):
        """The normalised `score_range` of one attribute: `None`, `"auto"` or `(lo, hi)`."""
        if isinstance(self.score_range, Mapping):
            return self.score_range.get(name)
        return self.score_range

    def augment_options(self) -> AugmentOptions:
        """These fields as a validated [`AugmentOptions`] (what [`reward_augment_dataset`] takes)."""
        return AugmentOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RewardAugmentFields)})


class AugmentOptions(RewardAugmentFields):
    r"""
    The relabeling options of [`reward_augment_dataset`]: the fields of [`RewardAugmentFields`] (documented there),
    validated and normalised on construction, then immutable (change one with `dataclasses.replace`).
    [`RewardAugmentedDPOConfig`] builds one with `augment_options()`. The short names of `OPTION_ALIASES` work as
    keywords and attributes: `mode`, `fraction`, `attributes` and `score_columns` (the pair of score columns).

    Example:

    ```python
    >>> AugmentOptions(mode="chosen_only", score_range="0,1").score_range
    (0.0, 1.0)
    ```
    """

    def __init__(self, **options):
        super().__init__(**_field_names(options))
        self.normalise_augment_fields()
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name, value):
        if getattr(self, "_sealed", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r}: AugmentOptions is validated once; use dataclasses.replace."
            )
        object.__setattr__(self, name, value)

    validate = RewardAugmentFields.normalise_augment_fields  # the name of the first releases

    mode = property(lambda self: self.augment_mode, doc="`augment_mode`.")
    fraction = property(lambda self: self.augment_fraction, doc="`augment_fraction`.")
    attributes = property(lambda self: self.attribute_columns, doc="`attribute_columns`.")
    score_columns = property(
        lambda self: (self.score_chosen_column, self.score_rejected_column),
        doc="`(score_chosen_column, score_rejected_column)`.",
    )


def _options_from(options: AugmentOptions | None, option_kwargs: dict[str, Any]) -> AugmentOptions:
    known = {f.name for f in dataclasses.fields(RewardAugmentFields)} | set(OPTION_ALIASES)
    unknown = sorted(set(option_kwargs) - known)
    if unknown:
        raise TypeError(f"reward_augment_dataset got unknown option(s) {unknown}; the options are {sorted(known)}.")
    if options is None:
        return AugmentOptions(**option_kwargs)
    if not isinstance(options, AugmentOptions):
        raise TypeError(f"`options` must be an AugmentOptions, got {type(options).__name__}.")
    return dataclasses.replace(options, **_field_names(option_kwargs)) if option_kwargs else options


# ---------------------------------------------------------------------------------------------------------------------
# Prompt extraction (implicit-prompt data): TRL's `extract_prompt`, with checks that name the row
# ---------------------------------------------------------------------------------------------------------------------


def _conversation_problem(chosen: list, rejected: list) -> str | None:
    """Why two full conversations do not split into one prompt + one final reply each (None when they do)."""
    n = min(len(chosen), len(rejected))
    if chosen[0].get("role") == "assistant" and rejected[0].get("role") == "assistant":
        return (
            "both start with an assistant message, so they hold no prompt (with no `prompt` column, or a string one, "
            "message-list `chosen`/`rejected` are read as full conversations, prompt included); add a `prompt` "
            "column of message lists"
        )
    if chosen[0] != rejected[0]:
        return "they share no leading message"
    if chosen[:n] == rejected[:n]:  # identical, or one is a prefix of the other
        return "one side has no reply after the shared messages"
    k = next(i for i in range(n) if chosen[i] != rejected[i])
    c, r = chosen[k:], rejected[k:]
    if c[0].get("role") != "assistant" or r[0].get("role") != "assistant":
        return (
            f"they differ at turn {k} before the final reply ({c[0].get('role')!r}: {str(c[0].get('content'))[:80]!r}"
            f" vs {r[0].get('role')!r}: {str(r[0].get('content'))[:80]!r})"
        )
    if any(m.get("role") in ("user", "system") for m in c + r):
        return f"they differ at turn {k}, which is followed by another user/system turn"
    return None


def _extract_prompt(chosen, rejected, row: int) -> tuple[Any, Any, Any]:
    """`(prompt, chosen, rejected)` of an implicit-prompt pair, split by TRL's `extract_prompt` (the function
    `DPOTrainer` applies to data without a `prompt` column), after checks that name the row."""
    from trl.data_utils import extract_prompt

    check_text_or_messages(chosen, f"Row {row}: `chosen`")
    check_text_or_messages(rejected, f"Row {row}: `rejected`")
    if is_messages(chosen) and is_messages(rejected):
        problem = _conversation_problem(list(chosen), list(rejected))
        if problem is not None:
            raise ValueError(f"Row {row}: the prompts of `chosen` and `rejected` differ: {problem}. {_MISMATCH_HINT}")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if chosen == rejected:
            raise ValueError(
                f"Row {row}: `chosen` and `rejected` are identical; there is no preference to learn. Drop the row."
            )
        if (
            not chosen
            or not rejected
            or chosen[0] != rejected[0]
            or (chosen[0] == " " and chosen[1:2] != rejected[1:2])
        ):
            raise ValueError(
                f"Row {row}: `chosen` and `rejected` share no prompt prefix. Add a `prompt` column (implicit-prompt "
                "string data must start with the same prompt text)."
            )
    else:
        raise ValueError(
            f"Row {row}: `chosen` and `rejected` must both be strings or both be message lists, got "
            f"{type(chosen).__name__} and {type(rejected).__name__}."
        )
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    return split["prompt"], split["chosen"], split["rejected"]


def _detect_layout(dataset, prompt_column: str = "prompt", chosen_column: str = "chosen") -> tuple[str, bool]:
    """`(layout, conversational)` from the first row; layout is `"explicit"`, `"implicit_conversational"` (full
    conversations in chosen/rejected, no prompt column or a string one as in ultrafeedback_binarized) or
    `"implicit_string"`."""
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
        check_text_or_messages(prompt_value, f"Row 0: `{prompt_column}`")
        raise ValueError(
            f"Column `{prompt_column}` must hold strings or message lists, row 0 has {type(prompt_value).__name__}."
        )
    return ("implicit_conversational" if chosen_conv else "implicit_string"), chosen_conv


def _explicit_row(layout: str, prompt, chosen, rejected, row: int):
    """`(prompt, chosen, rejected)` of one row in the explicit format."""
    if layout == "explicit":
        check_prompt_and_completion(prompt, chosen, row, "prompt", "chosen")
        check_prompt_and_completion(prompt, rejected, row, "prompt", "rejected")
        if chosen == rejected:
            raise ValueError(
                f"Row {row}: `chosen` and `rejected` are identical; there is no preference to learn. Drop the row."
            )
        return prompt, chosen, rejected
    return _extract_prompt(chosen, rejected, row)


def explicit_pairs(
    dataset, *, prompt_column: str = "prompt", chosen_column: str = "chosen", rejected_column: str = "rejected"
) -> Iterator[tuple[Any, Any, Any]]:
    """Yield `(prompt, chosen, rejected)` for every row, in the explicit-prompt format.

    Implicit-prompt rows (no `prompt` column, or a string `prompt` next to full conversations as in
    `HuggingFaceH4/ultrafeedback_binarized`) are split with TRL's [`~trl.extract_prompt`]; chosen/rejected prompts
    that differ raise an error naming the row.

    Args:
        dataset (`datasets.Dataset`):
            Preference pairs.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            The prompt column (may be absent).
        chosen_column (`str`, *optional*, defaults to `"chosen"`):
            The chosen responses (or full conversations).
        rejected_column (`str`, *optional*, defaults to `"rejected"`):
            The rejected responses (or full conversations).
    """
    if len(dataset) == 0:
        return
    layout, _ = _detect_layout(dataset, prompt_column, chosen_column)
    columns = [c for c in (prompt_column, chosen_column, rejected_column) if c in dataset.column_names]
    for i, row in enumerate(dataset.select_columns(columns)):
        yield _explicit_row(layout, row.get(prompt_column), row[chosen_column], row[rejected_column], i)


# ---------------------------------------------------------------------------------------------------------------------
# The transform, step by step
# ---------------------------------------------------------------------------------------------------------------------

_RESERVED_COLUMNS = ("goal_score", "goal_scores", "goal_side")
_STANDARD_COLUMNS = ("prompt", "chosen", "rejected")


def _check_reserved_columns(columns) -> None:
    clash = [c for c in _RESERVED_COLUMNS if c in columns]
    if clash:
        raise ValueError(
            f"The dataset already has column(s) {clash}, which the goal conditioning writes (with `goal_text`). "
            "Rename or remove them first."
        )


def _check_dataset_type(dataset) -> None:
    from datasets import Dataset, DatasetDict, IterableDataset

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


def _check_input_columns(dataset, options: AugmentOptions, prompt_column, chosen_column, rejected_column) -> None:
    columns = list(dataset.column_names)
    _check_reserved_columns(columns)
    for col, what in ((chosen_column, "chosen"), (rejected_column, "rejected")):
        if col not in columns:
            raise ValueError(
                f"The dataset has no `{col}` column (the {what} responses; columns: {columns}). Pass "
                f"`{what}_column=` with the right name."
            )
    for pair in options.attribute_map.values():
        for col in pair:
            check_float_column(
                dataset,
                col,
                "Reward augmentation needs a numeric score for each response: name the columns with "
                "`score_columns=(chosen, rejected)` (or `attributes=`), or relabel a dataset without scores with "
                "`trl_rewardweighted.ira.implicit_reward_relabel`.",
            )
    inputs = {prompt_column, chosen_column, rejected_column}
    overwritten = [c for c in columns if c in _STANDARD_COLUMNS and c not in inputs]
    if overwritten:
        raise ValueError(
            f"Columns {overwritten} would be overwritten by the output's standard `prompt`/`chosen`/`rejected` "
            "columns; rename them first."
        )


def _column_array(dataset, column: str) -> np.ndarray:
    """Float64 values of a numeric column (nulls -> NaN), honouring an indices mapping."""
    table = dataset.with_format("arrow", columns=[column])[:]
    return np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)


def _score_matrices(dataset, options: AugmentOptions) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores `(N, A)` of the chosen and the rejected responses, one column per attribute."""
    pairs = list(options.attribute_map.values())
    raw_c = np.stack([_column_array(dataset, c) for c, _ in pairs], axis=1)
    raw_r = np.stack([_column_array(dataset, r) for _, r in pairs], axis=1)
    return raw_c, raw_r


def _first_rows(n_total: int, fraction: float) -> int:
    """Half-RA: how many leading rows `fraction` keeps (at least one, or a clear error)."""
    if fraction >= 1.0:
        return n_total
    n_keep = math.floor(fraction * n_total + 1e-9)
    if n_keep == 0:
        raise ValueError(f"`fraction={fraction}` of {n_total} pairs keeps no pair.")
    return n_keep


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`s' = 1 + 9 (s - lo) / (hi - lo)`."""
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


def _auto_range(pool: np.ndarray, columns: tuple[str, str]) -> tuple[float, float]:
    pool = pool[np.isfinite(pool)]
    if pool.size == 0:
        raise ValueError(f"No finite scores in columns {columns}: nothing to rescale.")
    lo, hi = float(pool.min()), float(pool.max())
    if not lo < hi:
        raise ValueError(
            f"score_range='auto': every score in columns {columns} equals {lo:g}, so min/max rescaling is undefined "
            "(and every pair would be a tie). Pass `score_range=(lo, hi)` explicitly."
        )
    return lo, hi


def _goal_matrices(raw_c, raw_r, full_c, full_r, options: AugmentOptions, stats: dict):
    """Goals on the 1-10 scale (rescaled, range-checked, rounded). `full_*` are the scores of the whole input
    (before Half-RA selection), which `"auto"` takes its min/max from."""
    goals_c = np.empty_like(raw_c)
    goals_r = np.empty_like(raw_r)
    for a, (name, (c_col, r_col)) in enumerate(options.attribute_map.items()):
        spec = options.range_for(name)
        if spec == "auto":
            lo, hi = _auto_range(np.concatenate([full_c[:, a], full_r[:, a]]), (c_col, r_col))
            stats.setdefault("score_range", {})[name] = (lo, hi)
        elif spec is None:
            lo, hi = 1.0, 10.0
            fix = (
                "Scores are used as goals on the 1-10 scale as they are (score_range=None). Pass "
                "`score_range=(lo, hi)` with the range your scores live on, or `score_range='auto'` to map the "
                "dataset min/max onto 1-10."
            )
            _check_in_range(raw_c[:, a], lo, hi, c_col, fix)
            _check_in_range(raw_r[:, a], lo, hi, r_col, fix)
        else:
            lo, hi = spec
            fix = "Widen `score_range` or use `score_range='auto'` (dataset min/max)."
            _check_in_range(raw_c[:, a], lo, hi, c_col, fix)
            _check_in_range(raw_r[:, a], lo, hi, r_col, fix)
        goals_c[:, a] = raw_c[:, a] if spec is None else _rescale(raw_c[:, a], lo, hi)
        goals_r[:, a] = raw_r[:, a] if spec is None else _rescale(raw_r[:, a], lo, hi)
    if options.round_digits is not None:
        with np.errstate(invalid="ignore"):
            goals_c = np.round(goals_c, options.round_digits)
            goals_r = np.round(goals_r, options.round_digits)
    return goals_c, goals_r


def _keep_mask(goals_c, goals_r, options: AugmentOptions, stats: dict) -> np.ndarray:
    """Rows to augment: finite scores, and no tie under `ties="drop"`. Counts go to `stats`, drops are warned."""
    finite = np.isfinite(goals_c).all(axis=1) & np.isfinite(goals_r).all(axis=1)
    goals_c[~finite] = 0.0  # never formatted: those rows are dropped
    goals_r[~finite] = 0.0
    tie = finite & (goals_c == goals_r).all(axis=1)
    keep = finite & ~tie if options.ties == "drop" else finite.copy()
    n_nonfinite = int((~finite).sum())
    stats.update(
        dropped_nonfinite=n_nonfinite,
        ties=int(tie.sum()),
        dropped_ties=int(tie.sum()) if options.ties == "drop" else 0,
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
    if not keep.any():
        raise ValueError(
            f"No pair is left after dropping {n_nonfinite} non-finite and {stats['dropped_ties']} tied pair(s) out of "
            f"{len(keep)}."
            + (" Pass ties='keep' to keep tied pairs (as the released code does)." if stats["dropped_ties"] else "")
            + (" Fill in the missing/NaN scores." if n_nonfinite else "")
        )
    return keep


@dataclass
class _Plan:
    """Everything one `Dataset.map` batch needs to write its goal-conditioned rows."""

    layout: str
    prompt_column: str
    chosen_column: str
    rejected_column: str
    extra_columns: list[str]
    partner: dict[str, str]  # score column -> the column it swaps with
    goals_chosen: np.ndarray
    goals_rejected: np.ndarray
    keep: np.ndarray
    both: bool
    names: list[str]
    template: str | None
    placement: str
    multi: bool


def _output_features(dataset, plan: _Plan):
    from datasets import Features, List, Value

    in_features = dataset.features
    if plan.layout == "explicit":
        prompt_feature = in_features[plan.prompt_column]
    elif plan.layout == "implicit_conversational":
        prompt_feature = in_features[plan.chosen_column]
    else:
        prompt_feature = Value("string")
    out = {"prompt": prompt_feature, "chosen": in_features[plan.chosen_column]}
    out["rejected"] = in_features[plan.rejected_column]
    for col in plan.extra_columns:
        out[col] = in_features[col]
    for col, other in plan.partner.items():  # swapped columns must share one type
        if in_features[col] != in_features[other]:
            out[col] = out[other] = Value("float64")
    out[AUGMENTED_MARKER_COLUMN] = Value("string")
    if plan.multi:
        out["goal_scores"] = List(Value("float64"))
    else:
        out["goal_score"] = Value("float64")
    out["goal_side"] = Value("string")
    return Features(out)


def _augment_batch(batch: dict[str, list], indices: list[int], *, plan: _Plan) -> dict[str, list]:
    idx_array = np.asarray(indices, dtype=np.int64)
    keep_rows = plan.keep[idx_array].tolist()
    goals_c = plan.goals_chosen[idx_array].tolist()  # (B, A) as Python lists: no per-row numpy overhead
    goals_r = plan.goals_rejected[idx_array].tolist()
    chosen_in = batch[plan.chosen_column]
    rejected_in = batch[plan.rejected_column]
    prompts_in = batch[plan.prompt_column] if plan.layout == "explicit" else None
    columns_in = {col: batch[col] for col in plan.extra_columns}  # format each column once

    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for col in plan.extra_columns:
        out[col] = []
    out_prompt, out_chosen, out_rejected = out["prompt"], out["chosen"], out["rejected"]
    out_text, out_value, out_side = [], [], []
    # (output column, input column when kept, input column when swapped)
    copy_plan = [(out[col], columns_in[col], columns_in[plan.partner.get(col, col)]) for col in plan.extra_columns]
    text_cache: dict[tuple, str] = {}
    message_cache: dict = {}

    for j, idx in enumerate(indices):
        if not keep_rows[j]:
            continue
        prompt, c, r = _explicit_row(
            plan.layout, prompts_in[j] if prompts_in is not None else None, chosen_in[j], rejected_in[j], idx
        )
        copies = ((False, goals_c[j]), (True, goals_r[j])) if plan.both else ((False, goals_c[j]),)
        for swapped, goal_row in copies:
            key = tuple(goal_row)
            text = text_cache.get(key)
            if text is None:
                text = text_cache[key] = goal_text(key, plan.names, plan.template)
            out_prompt.append(_insert_goal(prompt, text, plan.placement, message_cache))
            out_chosen.append(r if swapped else c)
            out_rejected.append(c if swapped else r)
            for target, same, other in copy_plan:
                target.append(other[j] if swapped else same[j])
            out_text.append(text)
            out_value.append(list(key) if plan.multi else key[0])
            out_side.append("rejected" if swapped else "chosen")
    out[AUGMENTED_MARKER_COLUMN] = out_text
    out["goal_scores" if plan.multi else "goal_score"] = out_value
    out["goal_side"] = out_side
    return out


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


def reward_augment_dataset(
    dataset,
    tokenizer=None,
    options: AugmentOptions | None = None,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    shuffle: bool = False,
    seed: int = 42,
    num_proc: int | None = None,
    batch_size: int = 1000,
    return_stats: bool = False,
    **option_kwargs,
):
    r"""
    Relabel scored preference pairs with goal-conditioned prompts (reward augmentation, arXiv 2410.08067).

    For every pair, the copy conditioned on the chosen response's score keeps the order, and the copy conditioned on
    the rejected response's score swaps `chosen` and `rejected` (the paper's rule; the released code's `nosys` variant
    forgot the swap, this one does not).

    Args:
        dataset (`datasets.Dataset`):
            One split of preference pairs with numeric score columns. Accepted formats: standard
            (`prompt`/`chosen`/`rejected` strings), conversational (`prompt` a message list, `chosen`/`rejected` lists
            with the assistant reply), and implicit-prompt data where `chosen` and `rejected` are full conversations
            (no `prompt` column, or a string `prompt` as in `HuggingFaceH4/ultrafeedback_binarized`, which is then
            replaced by the shared leading messages). Implicit prompts are split with TRL's [`~trl.extract_prompt`];
            two conversations whose prompts differ raise an error naming the row.
        tokenizer (*optional*):
            Used only when `system_role="auto"`, to check whether its chat template renders a system role.
        options ([`AugmentOptions`], *optional*):
            The relabeling options (mode, fraction, ties, score columns and range, rounding, goal template, system
            role, attributes); `RewardAugmentedDPOConfig.augment_options()` builds one. Keyword options (below)
            override it.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Input prompt column. The output always uses `prompt`, `chosen`, `rejected` (what `DPOTrainer` reads).
        chosen_column (`str`, *optional*, defaults to `"chosen"`):
            Input chosen column.
        rejected_column (`str`, *optional*, defaults to `"rejected"`):
            Input rejected column.
        shuffle (`bool`, *optional*, defaults to `False`):
            The output is interleaved (row `2i` = chosen-goal copy of the `i`-th kept pair, row `2i+1` = its
            rejected-goal copy), so any batch mixes positive and negative copies even without shuffling; the
            trainer's sampler shuffles anyway. `True` adds a seeded shuffle (an indices mapping).
        seed (`int`, *optional*, defaults to `42`):
            Seed of that shuffle.
        num_proc (`int`, *optional*):
            Forwarded to `Dataset.map`.
        batch_size (`int`, *optional*, defaults to `1000`):
            Forwarded to `Dataset.map` (batched).
        return_stats (`bool`, *optional*, defaults to `False`):
            Also return the counts (`pairs_in`, `pairs_selected`, `dropped_nonfinite`, `ties`, `dropped_ties`,
            `rows_out`, ...), as `(dataset, stats)`.
        **option_kwargs:
            The fields of [`RewardAugmentFields`] (see there), by their names or the short ones: `mode`, `fraction`,
            `ties`, `score_columns`, `score_range`, `round_digits`, `goal_template`, `system_role`, `attributes`.

    Returns:
        A new `Dataset` with `prompt` (goal-conditioned), `chosen`, `rejected`, every other input column copied into
        both copies (the score columns of `score_columns`/`attributes` are swapped with the responses, so
        `score_chosen` always describes `chosen`), and `goal_text` (the goal string; its presence marks the dataset as
        augmented), `goal_score` (float; `goal_scores`, a list in attribute order, for multi-attribute goals) and
        `goal_side` (`"chosen"` or `"rejected"`: whose score the goal is). With `return_stats=True`, `(dataset,
        stats)`.

    Calling it again on its output returns the input unchanged (idempotent; logged at INFO). Pairs with a missing or
    non-finite score are dropped and counted with a warning; so are ties under `ties="drop"`.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> pairs = Dataset.from_dict(
    ...     {"prompt": ["Q"], "chosen": ["good"], "rejected": ["bad"], "score_chosen": [9.0], "score_rejected": [2.0]}
    ... )
    >>> reward_augment_dataset(pairs)["chosen"]
    ['good', 'bad']
    >>> len(reward_augment_dataset(pairs, mode="chosen_only"))
    1
    ```
    """
    options = _options_from(options, option_kwargs)
    _check_dataset_type(dataset)
    stats: dict[str, Any] = {"pairs_in": len(dataset)}
    if AUGMENTED_MARKER_COLUMN in dataset.column_names:
        logger.info(
            "The dataset already has a `%s` column: it is goal-conditioned already, returned unchanged (%d rows).",
            AUGMENTED_MARKER_COLUMN,
            len(dataset),
        )
        stats.update(already_augmented=True, rows_out=len(dataset))
        return (dataset, stats) if return_stats else dataset
    if len(dataset) == 0:
        raise ValueError("reward_augment_dataset: the dataset is empty (0 rows): there are no pairs to augment.")
    _check_input_columns(dataset, options, prompt_column, chosen_column, rejected_column)
    layout, conversational = _detect_layout(dataset, prompt_column, chosen_column)
    placement = _resolve_placement(conversational, tokenizer, options.system_role)

    # Half-RA keeps the first rows; "auto" rescaling still uses the whole input's min/max.
    full_c, full_r = _score_matrices(dataset, options)
    n_keep = _first_rows(len(dataset), options.augment_fraction)
    if n_keep < len(dataset):
        dataset = dataset.select(range(n_keep))
    stats["pairs_selected"] = len(dataset)
    goals_c, goals_r = _goal_matrices(full_c[:n_keep], full_r[:n_keep], full_c, full_r, options, stats)
    keep = _keep_mask(goals_c, goals_r, options, stats)

    partner = {}
    for c_col, r_col in options.attribute_map.values():
        partner[c_col], partner[r_col] = r_col, c_col
    inputs = {prompt_column, chosen_column, rejected_column}
    columns = list(dataset.column_names)
    plan = _Plan(
        layout=layout,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        extra_columns=[c for c in columns if c not in inputs and c not in _STANDARD_COLUMNS],
        partner=partner,
        goals_chosen=goals_c,
        goals_rejected=goals_r,
        keep=keep,
        both=options.augment_mode == "both",
        names=options.attribute_names,
        template=options.goal_template,
        placement=placement,
        multi=options.multi,
    )
    with _gc_paused():
        augmented = dataset.map(
            _augment_batch,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            remove_columns=columns,
            features=_output_features(dataset, plan),
            fn_kwargs={"plan": plan},
            desc="Reward-augmenting pairs",
            num_proc=num_proc if (num_proc or 0) > 1 else None,
        )
    if shuffle:
        augmented = augmented.shuffle(seed=seed)
    stats.update(
        pairs_augmented=int(keep.sum()),
        rows_out=len(augmented),
        placement=placement,
        layout=layout,
        already_augmented=False,
    )
    logger.info(
        "Reward augmentation (mode=%s, fraction=%s, ties=%s): %d input pairs, %d selected, %d dropped (non-finite), "
        "%d tied (%s), %d rows out; goal placement: %s.",
        options.augment_mode,
        options.augment_fraction,
        options.ties,
        stats["pairs_in"],
        stats["pairs_selected"],
        stats["dropped_nonfinite"],
        stats["ties"],
        "dropped" if options.ties == "drop" else "kept",
        len(augmented),
        placement,
    )
    return (augmented, stats) if return_stats else augmented


# ---------------------------------------------------------------------------------------------------------------------
# Explicit prompts and fixed goals (evaluation data)
# ---------------------------------------------------------------------------------------------------------------------


def _explicit_batch(batch, indices, *, layout, chosen_column, rejected_column):
    split = [
        _explicit_row(layout, None, c, r, i) for c, r, i in zip(batch[chosen_column], batch[rejected_column], indices)
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
    """Split implicit-prompt preference data into `prompt`/`chosen`/`rejected` (no goal added).

    Returns `dataset` unchanged when it already has an explicit prompt (or is empty, or not a map-style dataset).
    Needed for un-augmented evaluation data in the `HuggingFaceH4/ultrafeedback_binarized` layout (a string `prompt`
    next to full conversations): TRL 1.16's `DPOTrainer` extracts the prompt only when there is no `prompt` column and
    then fails on that layout (`TypeError`/`AttributeError` depending on the hash seed). The split is TRL's
    [`~trl.extract_prompt`]; prompts that differ between chosen and rejected raise the same error as
    [`reward_augment_dataset`].
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


def _condition_batch(batch, indices, *, placement, text, layout, prompt_column, chosen_column, rejected_column):
    n = len(indices)
    out = {}
    if layout == "explicit":
        prompts = batch[prompt_column]
    else:  # implicit prompt: split the conversations (same checks as the relabeling)
        split = [
            _explicit_row(layout, None, c, r, i)
            for c, r, i in zip(batch[chosen_column], batch[rejected_column], indices)
        ]
        prompts = [p for p, _, _ in split]
        out["chosen"] = [c for _, c, _ in split]
        out["rejected"] = [r for _, _, r in split]
    out["prompt"] = [_insert_goal(p, text, placement) for p in prompts]
    out[AUGMENTED_MARKER_COLUMN] = [text] * n
    return out


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

    For evaluation data conditioned like inference (`RewardAugmentedDPOConfig.eval_goal_score`). Accepts an explicit
    `prompt` column (string or messages), or implicit-prompt preference data (the prompt is split off
    `chosen`/`rejected` as in [`reward_augment_dataset`]). Adds `goal_text` (so the transforms treat the result as
    goal-conditioned and leave it alone) and `goal_score` (`goal_scores` for several attributes). The prompts are
    built by [`build_goal_prompt`]'s code.

    Args:
        dataset (`datasets.Dataset`):
            The rows to condition.
        score (`float`, *optional*, defaults to `10`):
            The goal value (every attribute, unless `attributes` maps names to values).
        tokenizer (*optional*):
            Decides the placement when `system_role="auto"`.
        system_role (`str`, *optional*, defaults to `"auto"`):
            `"auto"`, `"system"` or `"prefix"` (as in [`AugmentOptions`]).
        goal_template (`str`, *optional*):
            The training goal template (`None` = the released code's wording).
        attributes (`dict` or `list`, *optional*):
            The training attributes (see [`build_goal_prompt`]).
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Input prompt column.
        chosen_column (`str`, *optional*, defaults to `"chosen"`):
            Input chosen column.
        rejected_column (`str`, *optional*, defaults to `"rejected"`):
            Input rejected column.
        num_proc (`int`, *optional*):
            Forwarded to `Dataset.map`.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a `datasets.Dataset`, got {type(dataset).__name__}.")
    columns = list(dataset.column_names)
    if AUGMENTED_MARKER_COLUMN in columns:
        logger.info("The dataset already has a `%s` column: returned unchanged.", AUGMENTED_MARKER_COLUMN)
        return dataset
    if len(dataset) == 0:
        raise ValueError("condition_dataset_on_goal: the dataset is empty (0 rows): there is no prompt to condition.")
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


def twin_units(chosen: Sequence, rejected: Sequence, goal_sides: Sequence[str] | None = None) -> list[tuple[int, ...]]:
    """Group the rows of a reward-augmented dataset into twin pairs: `(i, i + 1)` when rows `i` and `i + 1` hold the
    same two responses swapped (and, when `goal_sides` is given, row `i` is the chosen-goal copy and row `i + 1` the
    rejected-goal one), `(i,)` for a row left alone (its twin was dropped, e.g. by truncation).

    [`reward_augment_dataset`] writes the twins of a pair next to each other, and tokenisation and filtering keep
    the order, so adjacency plus the swapped responses identifies them (DPO's tokenised datasets keep only
    `prompt_ids`, `chosen_ids` and `rejected_ids`).

    Args:
        chosen (`Sequence`), rejected (`Sequence`):
            The chosen and rejected responses of each row (texts, messages or token ids: compared for equality).
        goal_sides (`Sequence[str]`, *optional*):
            The `goal_side` column, when still available.

    Returns:
        `list[tuple[int, ...]]`: every row index exactly once, in dataset order.

    Example:

    ```python
    >>> twin_units(["a", "b", "c"], ["b", "a", "d"])
    [(0, 1), (2,)]
    ```
    """
    units: list[tuple[int, ...]] = []
    i, n = 0, len(chosen)
    while i < n:
        if (
            i + 1 < n
            and chosen[i] == rejected[i + 1]
            and rejected[i] == chosen[i + 1]
            and (goal_sides is None or (goal_sides[i], goal_sides[i + 1]) == ("chosen", "rejected"))
        ):
            units.append((i, i + 1))
            i += 2
        else:
            units.append((i,))
            i += 1
    return units
