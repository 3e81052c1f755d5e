"""The three trainers under DeepSpeed ZeRO-3 with really partitioned parameters (or plain, one process, for reference).

2 CPU ranks (launched by tests/test_zero3.py):

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/zero3_trainers.py MODEL OUT CASE...

One plain process (no DeepSpeed), imported in-process by the tests: `run_case(CASE, MODEL, OUT, zero3=False)`.

CASE is `var` (reference pre-pass through a DeepSpeed inference engine), `vcb_live` (a live ZeRO-3 reference model),
`vcb_precompute` (reference log-probs precomputed, sharded over the ranks) or `ra_dpo` (reward-augmented DPO, live
reference). Each rank writes `OUT/CASE/rank{R}.pt` with the reference log-probs, the logged losses, the flattened
weights before and after the first step (gathered), the final weights and the partition status of every parameter.

Why the DeepSpeed settings below matter: DeepSpeed keeps every parameter smaller than
`stage3_param_persistence_threshold` (default 1e5 elements) whole on every rank. All the tiny model's tensors are
smaller than that, so with the default nothing is partitioned and no all-gather runs: the test would not exercise
ZeRO-3 at all. With the threshold at 0 every parameter is partitioned (`param.numel() == 0` outside a gather).

Multi-rank DeepSpeed on CPU: accelerate finds no GPU and would see a single process, so the script sets
`ACCELERATE_USE_DEEPSPEED=true`, creates `PartialState(backend="gloo")` first and passes
`accelerator_config={"use_configured_state": True}`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from tests._helpers import cpu_args  # noqa: E402

torch.set_num_threads(1)

# 7 rows: 2 ranks x batch 2 = 4 rows a step, so the second (last) step is uneven (3 rows, one repeated by accelerate).
PROMPTS = ["The cat", "A small dog", "The sky", "My friend", "The old man", "A bird", "Our house"]
COMPLETIONS = [
    " likes the red ball.",
    " sees a good book.",
    " is blue and bright.",
    " writes a long letter.",
    " walks to the sea.",
    " sings in the tree.",
    " is warm and quiet.",
]
VAR_ROWS = {"prompt": PROMPTS, "completion": COMPLETIONS, "reward": [1.0, -1.0, 0.3, 2.0, 0.5, -0.2, 1.2]}
VCB_ROWS = {
    "prompt": PROMPTS,
    "completions": [[c, " is here.", " runs away."] if i % 2 else [c, " falls."] for i, c in enumerate(COMPLETIONS)],
    "rewards": [[1.0, -0.5, 0.2] if i % 2 else [0.3, -1.0] for i in range(len(PROMPTS))],
}
RA_DPO_ROWS = {
    "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
    "chosen": [[{"role": "assistant", "content": c.strip()}] for c in COMPLETIONS],
    "rejected": [[{"role": "assistant", "content": "No."}] for _ in PROMPTS],
    "score_chosen": [9.0, 8.0, 9.0, 7.0, 8.5, 9.5, 6.0],
    "score_rejected": [2.0, 3.0, 4.0, 1.0, 2.5, 1.5, 3.0],
}

CASES = ("var", "vcb_live", "vcb_precompute", "ra_dpo")


def zero3_config(bf16=False):
    """The ZeRO-3 config of every DeepSpeed test: every parameter partitioned (persistence threshold 0)."""
    return {
        "zero_optimization": {
            "stage": 3,
            # 0: partition every parameter. The default (1e5 elements) keeps all of the tiny model's tensors whole on
            # every rank, so no all-gather would run and the test would not exercise ZeRO-3 at all.
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 1e6,
            "stage3_max_reuse_distance": 1e6,
            "stage3_prefetch_bucket_size": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,  # plain torch SGD (see `common_args`)
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto" if bf16 else False},
    }


def common_args(out_dir, zero3):
    """2 ranks x batch 2 under ZeRO-3, batch 4 in one plain process: the same 4 rows in the first step. Plain SGD
    without clipping, so the first weight update is exactly `-lr * gradient` and can be compared across runs."""
    overrides = dict(
        output_dir=out_dir,
        per_device_train_batch_size=2 if zero3 else 4,
        gradient_accumulation_steps=1,
        num_train_epochs=1,  # 2 optimizer steps over 7 rows
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    if zero3:
        overrides.update(deepspeed=zero3_config(), use_cpu=False, accelerator_config={"use_configured_state": True})
    return cpu_args(**overrides)


def _params(model):
    return [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]


def flat_weights(model):
    """All parameters, flattened in name order, as a float32 CPU vector (gathered first when ZeRO-3 partitions them)."""
    params = _params(model)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return torch.cat([p.detach().flatten().float().cpu().clone() for p in params])
    return torch.cat([p.detach().flatten().float().cpu().clone() for p in params])


def partition_status(model):
    """For every parameter: (name, full numel, numel visible outside a gather, local partition numel, status)."""
    out = []
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            out.append((name, int(p.ds_numel), int(p.numel()), int(p.ds_tensor.numel()), p.ds_status.name))
        else:
            out.append((name, int(p.numel()), int(p.numel()), int(p.numel()), "NOT_ZERO3"))
    return out


def make_snapshot_callback():
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        """Weights before training and after the first optimizer step (a collective under ZeRO-3: every rank runs it)."""

        def __init__(self):
            self.before = self.after_first = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = flat_weights(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                self.after_first = flat_weights(model)

    return Snapshots()


def build_trainer(case, model_path, out_dir, zero3, callbacks):
    args = common_args(out_dir, zero3)
    if case == "var":
        from trl_rewardweighted import VARConfig, VARTrainer

        config = VARConfig(beta=0.7, **args)
        return VARTrainer(
            model=model_path, args=config, train_dataset=Dataset.from_dict(VAR_ROWS), callbacks=callbacks
        )
    if case in ("vcb_live", "vcb_precompute"):
        from trl_rewardweighted import VCBConfig, VCBTrainer

        config = VCBConfig(gamma=0.5, lam=1.0, precompute_ref_log_probs=case == "vcb_precompute", **args)
        return VCBTrainer(
            model=model_path, args=config, train_dataset=Dataset.from_dict(VCB_ROWS), callbacks=callbacks
        )
    if case == "ra_dpo":
        from trl_rewardweighted import RewardAugmentedDPOConfig, RewardAugmentedDPOTrainer

        config = RewardAugmentedDPOConfig(augment_mode="chosen_only", beta=0.1, max_length=None, **args)
        return RewardAugmentedDPOTrainer(
            model=model_path, args=config, train_dataset=Dataset.from_dict(RA_DPO_ROWS), callbacks=callbacks
        )
    raise ValueError(f"Unknown case {case!r}; choose one of {CASES}.")


def run_case(case, model_path, out_dir, zero3):
    snapshots = make_snapshot_callback()
    trainer = build_trainer(case, model_path, out_dir, zero3, [snapshots])
    ref = trainer.train_dataset["ref_logps"] if "ref_logps" in trainer.train_dataset.column_names else None
    trainer.train()
    result = {
        "case": case,
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "ref_logps": list(ref) if ref is not None else None,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "global_step": trainer.state.global_step,
        "before": snapshots.before,
        "after_first": snapshots.after_first,
        "final": flat_weights(trainer.model),
        "partition": partition_status(trainer.model),
    }
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:
        result["ref_partition"] = partition_status(getattr(ref_model, "module", ref_model))
    return result


def main(model_path, out, cases):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    # Order matters: the gloo process group must exist before the Trainer builds its Accelerator.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    for case in cases:
        # Each trainer builds its own Accelerator (with its DeepSpeed plugin) on the shared process group.
        AcceleratorState._reset_state(reset_partial_state=False)
        result = run_case(case, model_path, os.path.join(out, case), zero3=True)
        os.makedirs(os.path.join(out, case), exist_ok=True)
        torch.save(result, os.path.join(out, case, f"rank{state.process_index}.pt"))
        state.wait_for_everyone()
        print(f"rank {state.process_index}: {case} done, losses {result['losses']}", flush=True)
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or list(CASES))
