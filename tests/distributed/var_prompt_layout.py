"""VAR steps with the per-prompt normaliser (`z_scope="prompt"`) and with sample weights, for the layout tests.

Launched by tests/test_var_zscope.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... var_prompt_layout.py MODEL OUT BS GA`,
and imported by the in-process tests for the single-process layouts.

One launch runs two trainings, so that one pair of processes checks both normalisers:

- `prompt`: `z_scope="prompt"` on prompt groups of 3, 3 and 2 rows (one of them sharing its prompt text with another
  group but told apart by `group_column`), with sample weights (one of them 0); the slot of a group is 4 rows, so the
  2-row group is padded with repeats of its own rows. Two optimizer steps are recorded.
- `step`: `z_scope="step"` with the same sample weights.

Each process saves the gradient of every optimizer step (after DDP's all-reduce, before the update) of both.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args  # noqa: E402
from tests.distributed.var_uneven import make_step_grads_callback  # noqa: E402

torch.set_num_threads(1)

# Completions of equal token length, distinct rewards: the weights are not one-hot. Groups 0 and 2 share the prompt
# "The cat" but have different `group` values.
ROWS = {
    "prompt": ["The cat"] * 3 + ["A small dog"] * 3 + ["The cat"] * 2,
    "completion": [" likes the red ball.", " sees a good book.", " is blue and bright.", " writes a long letter.",
                   " likes the red ball.", " sees a good book.", " is blue and bright.", " writes a long letter."],
    "reward": [1.0, -1.0, 0.3, 2.0, 0.5, -0.2, 0.8, 0.1],
    "group": [0, 0, 0, 1, 1, 1, 2, 2],
    "sample_weight": [1.0, 2.0, 0.5, 1.0, 0.0, 3.0, 1.0, 0.25],
}  # fmt: skip


def hand_logps_and_grad_model(model_path, rows):
    """A fresh copy of the model and the summed completion log-probs of `rows` computed from its full logits (with a
    graph), one row at a time: the slow path the trainer's fused head must match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    logps = []
    for p, c in zip(rows["prompt"], rows["completion"]):
        n_prompt = len(tok(p)["input_ids"])
        ids = torch.tensor([tok(p + c + tok.eos_token)["input_ids"]])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        logps.append(lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][n_prompt - 1 :].sum())
    return model, torch.stack(logps)


def build_prompt_trainer(model_path, out_dir, bs, ga, z_scope="prompt", rows=None, max_steps=2, **overrides):
    """The trainer for `max_steps` steps, and a callback that collects the gradient of each step."""
    from trl_rewardweighted import VARConfig, VARTrainer

    settings = dict(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=max_steps,
        learning_rate=1e-2,
        optim="sgd",  # the second step's gradient then depends smoothly on the first step's
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        beta=0.7,
        z_scope=z_scope,
        group_column="group" if z_scope == "prompt" else None,
        ref_weighting=False,
    )
    settings.update(overrides)
    grads = make_step_grads_callback()
    trainer = VARTrainer(
        model=model_path,
        args=VARConfig(**cpu_args(**settings)),
        train_dataset=Dataset.from_dict(rows or ROWS),
        callbacks=[grads],
    )
    return trainer, grads


def run_prompt_layout(model_path, out_dir, bs, ga, z_scope="prompt", rows=None, max_steps=2, **overrides):
    """Train `max_steps` steps; returns the gradients of the steps and the trainer."""
    trainer, grads = build_prompt_trainer(model_path, out_dir, bs, ga, z_scope, rows, max_steps, **overrides)
    trainer.train()
    return grads.grads, trainer


if __name__ == "__main__":
    model_path, out, bs, ga = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompt_grads, trainer = run_prompt_layout(model_path, f"{out}/prompt", bs, ga)
    step_grads, _ = run_prompt_layout(model_path, f"{out}/step", bs, ga, z_scope="step", max_steps=1)
    rank = trainer.accelerator.process_index
    torch.save({"prompt": prompt_grads, "step": step_grads}, f"{out}/prompt_rank{rank}.pt")
