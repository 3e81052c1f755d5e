"""Reward-augmented DPO with `precompute_ref_log_probs=True` on in-memory datasets and a model object.

Launched by tests/test_ra_dpo_trainer.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... ra_dpo_precompute.py MODEL OUT`: every rank
builds the trainer (TRL's own precompute fails on rank 1 here with a FileNotFoundError on rank 0's cache file), trains
one step and writes its reference columns to `OUT/ref_rank{rank}.json`. Imported by the in-process tests for the
single-process values.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ["Name a colour.", "Say hello.", "Pick a fruit.", "Count to two.", "Name an animal."]
CHOSEN = ["Blue.", "Hello there!", "An apple.", "One, two.", "A cat."]
REJECTED = ["A car.", "Go away.", "A chair.", "Five.", "A rock."]


def rows():
    """5 scored conversational pairs (10 augmented rows: an odd count per rank at batch size 3)."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
            "chosen": [[{"role": "assistant", "content": c}] for c in CHOSEN],
            "rejected": [[{"role": "assistant", "content": r}] for r in REJECTED],
            "score_chosen": [9.0, 8.0, 9.0, 7.0, 6.5],
            "score_rejected": [2.0, 3.0, 4.0, 1.0, 2.5],
        }
    )


def build_trainer(model_path, out_dir, processing_class=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer

    args = RewardAugmentedDPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        max_length=None,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=3,
        augment_eval=True,
        **cpu_args(),
    )
    return RewardAugmentedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
        args=args,
        train_dataset=rows(),
        eval_dataset=rows().select(range(3)),
        processing_class=processing_class or AutoTokenizer.from_pretrained(model_path),
    )


if __name__ == "__main__":
    model_path, out = sys.argv[1], sys.argv[2]
    trainer = build_trainer(model_path, os.path.join(out, "run"))
    trainer.train()
    result = {
        split: {
            "prompt": list(dataset["prompt"]),
            "ref_chosen_logps": list(dataset["ref_chosen_logps"]),
            "ref_rejected_logps": list(dataset["ref_rejected_logps"]),
        }
        for split, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset))
    }
    result["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result["num_processes"] = trainer.accelerator.num_processes
    with open(os.path.join(out, f"ref_rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
