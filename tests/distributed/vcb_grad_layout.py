"""Run one VCB optimizer step and save the gradient seen by this process (plus a 2-process reference precompute).

Launched by tests/test_vcb_distributed.py under
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... vcb_grad_layout.py MODEL OUT LAYOUT...`
(each LAYOUT is `BSxGA`, per process), and imported by the in-process tests for the single-process layouts.
`torchrun --nproc_per_node 1 vcb_grad_layout.py --deepspeed MODEL OUT` runs the DeepSpeed ZeRO-3 check instead.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args, make_grad_capture  # noqa: E402
from tests.distributed.zero3_trainers import partition_status, zero3_config  # noqa: E402

torch.set_num_threads(1)

NAN = float("nan")
# 4 prompt groups of sizes 3, 2, 4, 3 (one optimizer step covers them all in every layout used by the tests):
# - the 2-completion group has equal rewards (sigma = 0: only pulls its log-ratios together);
# - the last group has a single finite reward, so it is skipped: 3 valid groups in the step. Wherever it lands, a
#   per-micro-batch (or per-process) mean would weight the other groups unevenly and change the gradient.
ROWS = {
    "prompt": ["The cat", "A small dog", "The sky", "My friend"],
    "completions": [
        [" likes the red ball.", " sees a good book.", " is blue."],
        [" runs.", " sleeps all day long."],
        [" is blue and bright.", " is grey.", " falls.", " is very far away."],
        [" writes a long letter.", " sings.", " waits."],
    ],
    "rewards": [[1.0, -1.0, 0.3], [0.5, 0.5], [2.0, 0.0, -1.0, 1.5], [0.7, NAN, float("inf")]],
}


def make_args(out_dir, bs, ga, **overrides):
    from trl_rewardweighted import VCBConfig

    kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        gamma=0.5,
        lam=1.0,
        **cpu_args(),
    )
    kwargs.update(overrides)
    return VCBConfig(**kwargs)


def run_layout(model_path, out_dir, bs, ga, **overrides):
    """One optimizer step with `bs` prompts per micro-batch and `ga` accumulation steps; returns (grad, trainer)."""
    from trl_rewardweighted import VCBTrainer

    capture = make_grad_capture()
    trainer = VCBTrainer(
        model=model_path,
        args=make_args(out_dir, bs, ga, **overrides),
        train_dataset=Dataset.from_dict(ROWS),
        callbacks=[capture],
    )
    trainer.train()
    return capture.grad, trainer


def precompute_ref_logps(model_path, out_dir):
    """`precompute_ref_log_probs=True` on an in-memory dataset and a model object: the column, then one step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_rewardweighted import VCBTrainer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = VCBTrainer(
        model=model,
        args=make_args(out_dir, 1, 1, precompute_ref_log_probs=True, precompute_ref_batch_size=1),
        train_dataset=Dataset.from_dict(ROWS),
        eval_dataset=Dataset.from_dict(ROWS),
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )
    ref = [[None if v != v else v for v in row] for row in trainer.train_dataset["ref_logps"]]  # NaN -> None (JSON)
    assert trainer.eval_dataset["ref_logps"] == trainer.train_dataset["ref_logps"]
    trainer.train()
    return ref, trainer


def deepspeed_zero3_check(model_path, out_dir):
    """ZeRO-3 + bf16 (one process): every reference set-up trains, and rewards / reference log-probs reach the loss
    as float32 (DeepSpeed's `_prepare_input` casts float tensors to bf16; the trainer restores them)."""
    from trl_rewardweighted import VCBTrainer

    seen = []

    class Probe(VCBTrainer):
        def _compute_vcb_loss(self, model, inputs, num_items_in_batch):
            seen.append({k: str(inputs[k].dtype) for k in ("rewards", "ref_logps") if k in inputs})
            return super()._compute_vcb_loss(model, inputs, num_items_in_batch)

    ds_config = zero3_config(bf16=True)  # every parameter partitioned (persistence threshold 0)
    column = [[-310.123, -311.5, -312.25], [-5.0, -6.0], [-1.0, -2.0, -3.0, -4.0], [-7.0, -8.0, -9.0]]
    results = {}
    for name, extra, rows in (
        ("precompute", dict(precompute_ref_log_probs=True), ROWS),
        ("live", {}, ROWS),
        ("column", {}, {**ROWS, "ref_logps": column}),
    ):
        seen.clear()
        args = make_args(os.path.join(out_dir, name), 2, 2, deepspeed=ds_config, bf16=True, max_steps=2, **extra)
        trainer = Probe(model=model_path, args=args, train_dataset=Dataset.from_dict(rows))
        trainer.train()
        results[name] = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "dtypes": seen,
            "ref_logps": list(trainer.train_dataset["ref_logps"]) if args.precompute_ref_log_probs else None,
            "partition": partition_status(trainer.model),
        }
    return results


if __name__ == "__main__" and sys.argv[1] == "--deepspeed":
    with open(os.path.join(sys.argv[3], "deepspeed.json"), "w") as f:
        json.dump(deepspeed_zero3_check(sys.argv[2], sys.argv[3]), f)
elif __name__ == "__main__":
    model_path, out = sys.argv[1], sys.argv[2]
    rank = None
    for layout in sys.argv[3:]:
        bs, ga = (int(x) for x in layout.split("x"))
        grad, trainer = run_layout(model_path, os.path.join(out, layout), bs, ga)
        rank = trainer.accelerator.process_index
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        torch.save({"grad": grad, "loss": losses[0]}, os.path.join(out, f"grad_{layout}_rank{rank}.pt"))
    ref, trainer = precompute_ref_logps(model_path, os.path.join(out, "precompute"))
    rank = trainer.accelerator.process_index
    with open(os.path.join(out, f"ref_rank{rank}.json"), "w") as f:
        json.dump({"ref_logps": ref, "prompts": list(trainer.train_dataset["prompt"])}, f)
