"""Run one optimizer step of a sample-weighted trainer and save the gradient seen by this process.

Launched by tests/test_weighted_trainers.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... weighted_grad_layout.py MODEL OUT LAYOUT...`
(each LAYOUT is `BSxGA`, per process; every kind of KINDS is run with it), and imported by the in-process tests.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args, make_grad_capture  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ["The cat", "A small dog", "The sky", "My friend"]
# Uneven weights, one of them 0: a per-micro-batch (or per-process) normaliser would give a different gradient.
WEIGHTS = [2.0, 0.5, 1.0, 0.0]
ROWS = {
    "sft": {
        "prompt": PROMPTS,
        "completion": [" likes the red ball.", " runs.", " is blue and bright today.", " sings."],
    },
    "dpo": {
        "prompt": PROMPTS,
        "chosen": [" likes the red ball.", " runs.", " is blue and bright today.", " sings."],
        "rejected": [" is.", " sleeps all day long.", " falls.", " waits for the bus."],
    },
    "vcb": {
        "prompt": PROMPTS,
        "completions": [
            [" likes the red ball.", " sees a good book.", " is blue."],
            [" runs.", " sleeps all day long."],
            [" is blue and bright.", " is grey.", " falls.", " is very far away."],
            [" writes a long letter.", " sings.", " waits."],
        ],
        "rewards": [[1.0, -1.0, 0.3], [0.5, -0.5], [2.0, 0.0, -1.0, 1.5], [0.7, 0.1, -0.2]],
    },
    # 2 scored pairs: 4 goal-conditioned rows after relabeling.
    "ra": {
        "prompt": PROMPTS[:2],
        "chosen": [" likes the red ball.", " runs."],
        "rejected": [" is.", " sleeps all day long."],
        "score_chosen": [9.0, 8.0],
        "score_rejected": [2.0, 3.0],
    },
}
KINDS = tuple(ROWS)


def trainer_classes(kind):
    """(trainer class, config class) of a kind; `"trl_sft"` / `"trl_dpo"` are TRL's own trainers."""
    import trl

    import trl_rewardweighted as rw

    return {
        "sft": (rw.WeightedSFTTrainer, rw.WeightedSFTConfig),
        "dpo": (rw.WeightedDPOTrainer, rw.WeightedDPOConfig),
        "vcb": (rw.VCBTrainer, rw.VCBConfig),
        "ra": (rw.RewardAugmentedDPOTrainer, rw.RewardAugmentedDPOConfig),
        "trl_sft": (trl.SFTTrainer, trl.SFTConfig),
        "trl_dpo": (trl.DPOTrainer, trl.DPOConfig),
    }[kind]


def rows_of(kind, weights=WEIGHTS):
    """The rows of a kind (TRL's kinds use their weighted twin's rows), with a `sample_weight` column unless
    `weights` is None (one weight per row; RA's per pair)."""
    rows = dict(ROWS[kind.removeprefix("trl_")])
    if weights is not None:
        rows["sample_weight"] = list(weights)[: len(rows["prompt"])]
    return rows


def run_layout(kind, model_path, out_dir, bs, ga, rows=None, **overrides):
    """One optimizer step with `bs` rows per micro-batch and `ga` accumulation steps; returns (grad, trainer)."""
    trainer_cls, config_cls = trainer_classes(kind)
    kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        **cpu_args(),
    )
    if kind == "vcb":
        kwargs["gamma"] = 0.5
    kwargs.update(overrides)
    capture = make_grad_capture()
    trainer = trainer_cls(
        model=model_path,
        args=config_cls(**kwargs),
        train_dataset=Dataset.from_dict(rows if rows is not None else rows_of(kind)),
        callbacks=[capture],
    )
    trainer.train()
    return capture.grad, trainer


def first_loss(trainer):
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


if __name__ == "__main__":
    model_path, out = sys.argv[1], sys.argv[2]
    for layout in sys.argv[3:]:
        bs, ga = (int(x) for x in layout.split("x"))
        for kind in KINDS:
            grad, trainer = run_layout(kind, model_path, os.path.join(out, kind, layout), bs, ga)
            rank = trainer.accelerator.process_index
            path = os.path.join(out, f"{kind}_{layout}_rank{rank}.pt")
            torch.save({"grad": grad, "loss": first_loss(trainer)}, path)
