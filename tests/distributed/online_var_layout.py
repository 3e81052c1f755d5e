"""Two online-VAR optimizer steps on deterministic "generations"; save the gradient of every step seen by this process.

Launched by tests/test_online_var.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... online_var_layout.py MODEL OUT BS GA`,
and imported by the in-process tests for the single-process layouts.

The completions are a fixed function of the prompt, of the completion's index in the *global* generation batch and of
the generation round, so that every layout (batch size x accumulation x processes) trains on the same completions and
the same rewards; the weights then depend on the layout only through the reference and sampling log-probs, which must
not depend on it either.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests._helpers import cpu_args  # noqa: E402

torch.set_num_threads(1)

PROMPTS = ["The cat", "A small dog", "The sky", "My friend"]
GROUP = 4  # num_generations
GLOBAL_BATCH = 8  # completions per optimizer step (2 prompts x 4)


def fixed_generations(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
    """Stand-in for `GRPOTrainer._generate_single_turn`: deterministic completions of 1-5 tokens, some ending with
    the EOS token."""
    calls = getattr(self, "_fixed_calls", 0)
    self._fixed_calls = calls + 1
    offset = self.accelerator.process_index * len(prompt_ids)
    eos = self.eos_token_ids[0]
    out = []
    for i, ids in enumerate(prompt_ids):
        g = offset + i
        length = 1 + (3 * g + calls) % 5
        tokens = [100 + (ids[-1] * 7 + 13 * g + 5 * k + 11 * calls) % 400 for k in range(length)]
        if (g + calls) % 2 == 0:
            tokens.append(eos)
        out.append(tokens)
    return out, None


def reward_fn(completion_ids, **kwargs):
    return [((sum(c) % 17) - 8) / 4 for c in completion_ids]


class GradsPerStep(TrainerCallback):
    def __init__(self):
        self.grads = []
        self.weights = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            torch.cat(
                [
                    p.grad.detach().flatten().float().cpu() if p.grad is not None else torch.zeros(p.numel())
                    for p in model.parameters()
                    if p.requires_grad
                ]
            )
        )


def run_online_layout(model_path, out_dir, bs, ga, steps=2, **overrides):
    from trl_rewardweighted import OnlineVARConfig, OnlineVARTrainer

    args = OnlineVARConfig(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        num_generations=GROUP,
        max_completion_length=8,
        max_steps=steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        beta=0.7,
        **cpu_args(**overrides),
    )
    capture = GradsPerStep()
    trainer = OnlineVARTrainer(
        model=model_path,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        callbacks=[capture],
    )
    trainer._generate_single_turn = fixed_generations.__get__(trainer)
    trainer.train()
    return capture.grads, trainer


if __name__ == "__main__":
    model_path, out, bs, ga = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    grads, trainer = run_online_layout(model_path, out, bs, ga)
    rank = trainer.accelerator.process_index
    torch.save({"grads": grads, "log": trainer.state.log_history}, f"{out}/rank{rank}.pt")
