"""One VAR epoch over 5 rows with 2 processes x batch 2 (or 1 process x batch 4): the last step is uneven.

Launched by tests/test_var_distributed.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no var_uneven.py MODEL OUT`, and imported by the test for the single-process run.

With 2 processes, accelerate's `even_batches` fills the last step (1 real row) with rows from the start of the epoch
so that every process gets a full batch. Each process saves, per micro-batch, the step, the rewards (distinct, so they
identify the rows) and the VAR weights, plus the gradient of every optimizer step.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args  # noqa: E402

torch.set_num_threads(1)

# Distinct rewards (they identify the rows); ref_weighting=False so the weights are softmax(r / beta) over the step.
ROWS = {
    "prompt": ["The cat", "A small dog", "The sky", "My friend", "The old man"],
    "completion": [" likes the red ball.", " sees a good book.", " is blue and bright.", " writes a long letter.",
                   " walks to the sea."],
    "reward": [1.0, -1.0, 0.3, 2.0, 0.5],
}  # fmt: skip


def make_step_grads_callback():
    from transformers import TrainerCallback

    class StepGrads(TrainerCallback):
        """The flattened gradient of every optimizer step (after DDP's all-reduce, before the update)."""

        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append(torch.cat([p.grad.detach().flatten().float().cpu().clone() for p in model.parameters()]))

    return StepGrads()


def run(model_path, out_dir, bs, packed=False):
    from trl_rewardweighted import VARConfig, VARTrainer

    args = VARConfig(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        num_train_epochs=1,
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        beta=1.0,
        ref_weighting=False,
        # Packed: rows of 8-13 tokens in packs of at most 13, so one row per pack (5 packs, the same layout as rows),
        # now through the pack path (the collator unpacks; repeats are found per pack; padding-free forwards).
        packing=packed,
        max_length=13 if packed else 1024,
        **cpu_args(),
    )
    grads = make_step_grads_callback()
    trainer = VARTrainer(model=model_path, args=args, train_dataset=Dataset.from_dict(ROWS), callbacks=[grads])
    records = []
    original = trainer.compute_loss

    def spy(model, inputs, *a, **kw):
        records.append(
            {
                "step": trainer.state.global_step,
                "rewards": inputs["rewards"].tolist(),
                "weights": inputs["var_weights"].tolist(),
            }
        )
        return original(model, inputs, *a, **kw)

    trainer.compute_loss = spy
    num_rows = len(trainer.train_dataset)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "num_rows": num_rows,
        "records": records,
        "grads": grads.grads,
        "losses": losses,
        "rank": trainer.accelerator.process_index,
    }


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2], bs=2, packed=sys.argv[3:] == ["packed"])
    torch.save(result, os.path.join(sys.argv[2], f"uneven_rank{result['rank']}.pt"))
