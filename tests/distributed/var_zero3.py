"""One VAR run under DeepSpeed ZeRO-3 (or without it), printing its reference log-probs, losses and the ZeRO-3
partition status of its parameters as JSON. The ZeRO-3 config partitions every parameter (persistence threshold 0).

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
from tests.distributed.zero3_trainers import partition_status, zero3_config  # noqa: E402

torch.set_num_threads(1)


def main(model_path, out, mode, precision="fp32"):
    from trl_rewardweighted import VARConfig, VARTrainer

    args = VARConfig(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-3,
        beta=0.7,
        deepspeed=zero3_config(bf16=precision == "bf16") if mode == "zero3" else None,
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
        partition = partition_status(trainer.model)  # ZeRO-3: numel() == 0 outside a gather (all partitioned)
        print("RESULT " + json.dumps({"ref_logps": ref, "losses": losses, "partition": partition, **seen}))


if __name__ == "__main__":
    main(*sys.argv[1:])
