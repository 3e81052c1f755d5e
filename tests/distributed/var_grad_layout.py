"""Run one VAR optimizer step and save the gradient (and reference log-probs) seen by this process.

Launched by tests/test_var_distributed.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... var_grad_layout.py MODEL OUT BS GA SCOPE`,
and imported by the in-process tests for the single-process layouts.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args, make_grad_capture  # noqa: E402

torch.set_num_threads(1)

# Distinct rewards; completions of equal token length (5 tokens + EOS) so that the reference term does not make the
# weights one-hot: any per-micro-batch normaliser then gives a visibly different update.
ROWS = {
    "prompt": ["The cat", "A small dog", "The sky", "My friend"],
    "completion": [" likes the red ball.", " sees a good book.", " is blue and bright.", " writes a long letter."],
    "reward": [1.0, -1.0, 0.3, 2.0],
}


def run_layout(model_path, out_dir, bs, ga, z_scope="step", ref_weighting=True, rows=None):
    from trl_rewardweighted import VARConfig, VARTrainer

    args = VARConfig(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        beta=0.7,
        z_scope=z_scope,
        ref_weighting=ref_weighting,
        **cpu_args(),
    )
    capture = make_grad_capture()
    rows = rows or ROWS
    trainer = VARTrainer(model=model_path, args=args, train_dataset=Dataset.from_dict(rows), callbacks=[capture])
    ref = list(trainer.train_dataset["ref_logps"]) if ref_weighting else None
    trainer.train()
    return capture.grad, ref, trainer


if __name__ == "__main__":
    model_path, out, bs, ga, scope = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    grad, ref, trainer = run_layout(model_path, out, bs, ga, scope)
    rank = trainer.accelerator.process_index
    torch.save(
        {"grad": grad, "ref_logps": ref, "prompts": list(trainer.train_dataset["prompt"])}, f"{out}/rank{rank}.pt"
    )
