"""One VAR run under DeepSpeed ZeRO-3 (or without it), printing its reference log-probs and losses as JSON.

torchrun --nproc_per_node 1 tests/distributed/var_zero3.py MODEL OUT zero3|plain [bf16]
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args  # noqa: E402
from tests.distributed.var_grad_layout import ROWS  # noqa: E402

torch.set_num_threads(1)

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
}


def main(model_path, out, mode, precision="fp32"):
    from trl_rewardweighted import VARConfig, VARTrainer

    args = VARConfig(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-3,
        beta=0.7,
        deepspeed=ZERO3 if mode == "zero3" else None,
        **cpu_args(bf16=precision == "bf16", use_cpu=mode == "plain"),
    )
    trainer = VARTrainer(model=model_path, args=args, train_dataset=Dataset.from_dict(ROWS))
    ref = list(trainer.train_dataset["ref_logps"])
    seen = {}
    original = trainer.compute_loss

    def spy(model, inputs, *a, **kw):
        seen.setdefault("dtypes", {k: str(inputs[k].dtype) for k in ("rewards", "ref_logps", "var_weights")})
        return original(model, inputs, *a, **kw)

    trainer.compute_loss = spy
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.accelerator.is_main_process:
        print("RESULT " + json.dumps({"ref_logps": ref, "losses": losses, **seen}))


if __name__ == "__main__":
    main(*sys.argv[1:])
