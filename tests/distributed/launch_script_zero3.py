"""The launch script (`trl_rewardweighted.scripts.<method>`) under DeepSpeed ZeRO-3 with CPU ranks: what
`trl-rw train METHOD --accelerate-config zero3 ...` (TRL's zero3 config) does on GPUs.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/launch_script_zero3.py \
        METHOD RESULT_DIR --config RECIPE.yaml [--flag value ...]

The set-up of docs/contributing.md ("DeepSpeed ZeRO-3 on CPU"): `ACCELERATE_USE_DEEPSPEED=true` and
`PartialState(backend="gloo")` before anything else, then the launch script's own entry point (`run(METHOD)`, the
`__main__` of `trl_rewardweighted.scripts.METHOD`, teardown included) with, ahead of the given arguments,
`--deepspeed` (the ZeRO-3 config of `zero3_config()`: every parameter partitioned, the 16-bit weights gathered on
save, no offload as in TRL's zero3 config) and `--accelerator_config '{"use_configured_state": true}'`.

Each rank writes `RESULT_DIR/rank{R}.json`: world size, distributed type, global step, logged losses, the `ref_logps`
column when the trainer precomputed it, and the ZeRO-3 partition status of every parameter after training (of the
reference model too when there is a live one).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tests.distributed.zero3_trainers import partition_status, zero3_config  # noqa: E402

torch.set_num_threads(1)


def deepspeed_config():
    """`zero3_config()` with TRL's zero3 config's settings where they apply on CPU: no parameter or
    optimizer offload, the 16-bit weights gathered on save (`zero3_save_16bit_model`). Its `zero3_init_flag` needs
    nothing here: transformers loads the model under `deepspeed.zero.Init` whenever the config is ZeRO-3. Its bf16 does
    not apply (float32 on CPU)."""
    config = zero3_config()
    config["zero_optimization"].update(offload_optimizer={"device": "none"}, offload_param={"device": "none"})
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    return config


def main(method, result_dir, argv):
    from accelerate import PartialState

    from trl_rewardweighted.scripts import train

    # Order matters: the gloo process group must exist before the Trainer builds its Accelerator.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    rank = state.process_index

    trainers = []
    launch_main = train.main

    def main_keeping_trainer(*args, **kwargs):
        trainers.append(launch_main(*args, **kwargs))
        return trainers[-1]

    train.main = main_keeping_trainer  # `run` calls the module's `main`: keep the trainer it returns
    sys.argv = [
        f"trl_rewardweighted.scripts.{method}",
        "--deepspeed", json.dumps(deepspeed_config()),
        "--accelerator_config", json.dumps({"use_configured_state": True}),
        *argv,
    ]  # fmt: skip
    train.run(method)  # ends with a barrier and the process group torn down

    (trainer,) = trainers
    dataset = trainer.train_dataset
    result = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_step": trainer.state.global_step,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "ref_logps": list(dataset["ref_logps"]) if "ref_logps" in dataset.column_names else None,
        "partition": partition_status(trainer.model),  # local attributes only: no collective after the teardown
    }
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:  # a live reference model (a DeepSpeed engine under ZeRO-3)
        result["ref_partition"] = partition_status(getattr(ref_model, "module", ref_model))
    os.makedirs(result_dir, exist_ok=True)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    print(f"rank {rank}: {method} done, losses {result['losses']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
