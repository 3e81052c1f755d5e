"""Shared fixtures: offline, one torch thread, the tiny Qwen2 model built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Every `Trainer.train()` starts with a full `gc.collect()` (accelerate's `free_memory`), which walks every live
    object: freezing what exists when a test module starts (torch, transformers, session fixtures) leaves it only the
    module's own objects to walk. Garbage created before the freeze is collected first; the heap is unfrozen after the
    module."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Folder with the tiny Qwen2ForCausalLM + ~1k-vocab ChatML tokenizer."""
    from trl_rewardweighted.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_reward_model_path(tmp_path_factory):
    """Folder with a tiny Qwen2ForSequenceClassification (random score head) + the same tokenizer."""
    from trl_rewardweighted.testing import build_tiny_reward_model

    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
