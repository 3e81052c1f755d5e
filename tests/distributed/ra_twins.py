"""Reward-augmented DPO with `keep_twins_together=True`: record the rows of every micro-batch on every process.

Launched by tests/test_ra_twins.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... ra_twins.py MODEL OUT BS GA EPOCHS`, and
imported by the in-process tests (one process). Each rank writes `OUT/twins_rank{R}.json`: per micro-batch, the
epoch and each row's (chosen, rejected) completion token ids, which identify the pair and the twin (swapped).
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

# 7 pairs with distinct responses (14 rows): with 2 processes x batch 2 the last global batch is uneven.
PROMPTS = ["Name a colour.", "Say hello.", "Pick a fruit.", "Count to two.", "Name an animal.", "A day?", "A city?"]
CHOSEN = ["Blue.", "Hello there!", "An apple.", "One, two.", "A cat.", "Monday.", "Paris."]
REJECTED = ["A car.", "Go away.", "A chair.", "Five.", "A rock.", "Soup.", "Green."]


def rows(n=7):
    return Dataset.from_dict(
        {
            "prompt": PROMPTS[:n],
            "chosen": CHOSEN[:n],
            "rejected": REJECTED[:n],
            "score_chosen": [9.0, 8.0, 9.0, 7.0, 6.5, 8.5, 9.5][:n],
            "score_rejected": [2.0, 3.0, 4.0, 1.0, 2.5, 3.5, 1.5][:n],
        }
    )


def run(model_path, out_dir, bs, ga, epochs, n=7, keep=True):
    from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer

    args = RewardAugmentedDPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        num_train_epochs=epochs,
        learning_rate=1e-4,
        max_length=None,
        keep_twins_together=keep,
        **cpu_args(),
    )
    trainer = RewardAugmentedDPOTrainer(model=model_path, args=args, train_dataset=rows(n))
    records = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **kw):
        ids, mask = inputs["input_ids"].tolist(), inputs["completion_mask"].tolist()
        completions = [[t for t, m in zip(row, row_mask) if m] for row, row_mask in zip(ids, mask)]
        half = len(completions) // 2
        records.append(
            {"epoch": int(trainer.state.epoch or 0), "rows": list(zip(completions[:half], completions[half:]))}
        )
        return original(model, inputs, *a, **kw)

    trainer.compute_loss = spy
    trainer.train()
    return {"records": records, "rank": trainer.accelerator.process_index, "world": trainer.accelerator.num_processes}


if __name__ == "__main__":
    model_path, out = sys.argv[1], sys.argv[2]
    bs, ga, epochs = (int(x) for x in sys.argv[3:6])
    result = run(model_path, out, bs, ga, epochs)
    with open(os.path.join(out, f"twins_rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
