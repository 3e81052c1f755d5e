"""Offline test bed: a tiny Qwen2 causal LM + ~1k-vocab byte-level BPE tokenizer, built in about a second.

Used by the test suite, the benchmarks and anyone who wants to try the trainers with no Hub access::

    from trl_rewardweighted.testing import build_tiny_model
    path = build_tiny_model("/tmp/tiny")  # a folder loadable with AutoModelForCausalLM / AutoTokenizer

The tokenizer is trained with Qwen2's own normaliser and pre-tokenizer, so `AutoTokenizer` (which reloads it as a
`Qwen2Tokenizer` because of `model_type=qwen2`) gives identical ids. Its ChatML template has `{% generation %}`
markers and renders a system role. The same corpus gives byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["build_tiny_model", "build_tiny_reward_model", "TINY_CHAT_TEMPLATE", "tiny_model_kwargs"]

CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"

# Qwen2's pre-tokenization regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_model_kwargs(vocab_size: int = 1024) -> dict:
    """The Qwen2Config of the tiny test model: 2 layers, hidden 64."""
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def _build_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | os.PathLike, vocab_size: int = 1024, seed: int = 0) -> str:
    """Write a tiny Qwen2ForCausalLM + tokenizer to `path` (created) and return `str(path)`.

    Deterministic for a given `seed`. Takes about a second on one CPU thread. Reuses `path` when it already holds
    a model built with the same arguments.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    stamp = path / ".tiny_model_stamp"
    key = f"v1 vocab={vocab_size} seed={seed}"
    if stamp.exists() and stamp.read_text() == key:
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size)
    config = Qwen2Config(
        **tiny_model_kwargs(len(tokenizer)),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(key)
    return str(path)


def build_tiny_reward_model(path: str | os.PathLike, seed: int = 1) -> str:
    """A tiny `Qwen2ForSequenceClassification` (1 label, random score head) + the tiny tokenizer at `path`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    path = Path(path)
    stamp = path / ".tiny_model_stamp"
    key = f"v1 reward seed={seed}"
    if stamp.exists() and stamp.read_text() == key:
        return str(path)
    lm_path = build_tiny_model(path / "_lm")
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    config = Qwen2Config(
        **tiny_model_kwargs(len(tokenizer)),
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(key)
    return str(path)
