"""Reward functions usable as scorers: `f(prompts, completions) -> list[float]`.

Give one to `trl_rewardweighted.sampling.score_completions` as a callable, or by name on the command line:

```bash
trl-rw score --input groups.jsonl --scorer trl_rewardweighted.rewards:vader_positivity --output scored.jsonl
```
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

__all__ = ["vader_positivity", "as_reward_func"]


@functools.lru_cache(maxsize=1)
def _vader_analyzer():
    """One VADER analyser per process (building it parses the lexicon, ~0.1 s)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ImportError(
            "vader_positivity needs the VADER sentiment lexicon: `pip install vaderSentiment==3.3.2` "
            "(or `pip install trl-rewardweighted[demo]`)."
        ) from err
    return SentimentIntensityAnalyzer()


def vader_positivity(prompts: Sequence, completions: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each completion, in [-1, 1] (positive text scores high; the prompt is ignored).

    Deterministic, handles negation ("not good" < 0), runs offline at ~27k texts/s. The demo reward of the project:
    "make the assistant's replies more positive". Spec string: `trl_rewardweighted.rewards:vader_positivity`.
    """
    analyzer = _vader_analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


def as_reward_func(scorer, name: str | None = None):
    """A scorer `f(prompts, completions) -> list[float]` as a reward function for TRL's online trainers
    ([`~trl.GRPOTrainer`], [`OnlineVARTrainer`]), which call `reward_func(prompts=..., completions=..., **columns)`
    with conversational completions as assistant message lists: the scorer receives their text.

    `name` (default: the scorer's `__name__`) is the name the trainer logs the reward under (`rewards/<name>/mean`).
    """
    from .data.utils import completion_text

    def reward(prompts, completions, **kwargs):
        return scorer(list(prompts), [completion_text(c) for c in completions])

    reward.__name__ = name or getattr(scorer, "__name__", None) or type(scorer).__name__
    return reward
