"""Pieces shared by the trainers: fused sequence log-probs, reference contexts, sharded precompute, column checks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import is_peft_model

from ..data.validation import check_float_column

__all__ = [
    "sequence_logps",
    "adapters_disabled",
    "compute_rowwise_distributed",
    "check_float_column",
]


def sequence_logps(model, input_ids, attention_mask, labels, length_normalize: bool = False):
    """Summed completion log-probs ``(B,)`` float32 and completion token counts ``(B,)`` via TRL's fused LM head.

    ``model`` must have been patched with ``trl.trainer.utils.add_fused_lm_head`` (on the PEFT *base* model under
    PEFT). ``labels`` are -100 on prompt and padding tokens. No ``(B, T, V)`` logits tensor is built.
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        fused_lm_head=True,
        use_cache=False,
    )
    log_probs = getattr(outputs, "log_probs", None)
    if log_probs is None:
        raise RuntimeError(
            "The model returned no `log_probs`: it was not patched with `add_fused_lm_head` (patch the PEFT base model)."
        )
    token_logps = log_probs.float()  # (B, T-1), zero where the label is -100
    num_tokens = (labels[:, 1:] != -100).sum(dim=-1)
    logps = token_logps.sum(dim=-1)
    if length_normalize:
        logps = logps / num_tokens.clamp(min=1).to(logps.dtype)
    return logps, num_tokens


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base (adapters off) when it is a PEFT model; a no-op otherwise."""
    unwrapped = model
    while hasattr(unwrapped, "module") and not is_peft_model(unwrapped):
        unwrapped = unwrapped.module
    if is_peft_model(unwrapped):
        with unwrapped.disable_adapter():
            yield
    else:
        yield


def compute_rowwise_distributed(
    accelerator,
    num_rows: int,
    batch_size: int,
    compute_fn: Callable[[Sequence[int]], torch.Tensor],
    desc: str | None = None,
) -> torch.Tensor:
    """Compute one value (or one fixed-shape tensor) per dataset row, sharded over processes, gathered on all.

    Every process takes the rows ``rank, rank + world, ...``, padded (by repeating its last row) so that all processes
    run the same number of ``compute_fn`` calls: collective forwards under DeepSpeed ZeRO-3 never hang. The result is
    a CPU float32 tensor of shape ``(num_rows, *value_shape)`` in row order, identical on every process, so an
    in-memory dataset can get the column on every rank (TRL's own precompute writes it on rank 0 only).

    ``compute_fn(indices)`` returns a tensor of shape ``(len(indices), *value_shape)``.
    """
    if num_rows == 0:
        raise ValueError("Cannot precompute reference log-probs for an empty dataset.")
    world = accelerator.num_processes
    rank = accelerator.process_index
    per_proc = math.ceil(num_rows / world)
    mine = list(range(rank, num_rows, world)) or [0]
    mine = mine + [mine[-1]] * (per_proc - len(mine))
    chunks = [mine[i : i + batch_size] for i in range(0, per_proc, batch_size)]
    iterator = chunks
    if desc and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        iterator = tqdm(chunks, desc=desc)
    outs = []
    for chunk in iterator:
        vals = compute_fn(chunk)
        if vals.shape[0] != len(chunk):
            raise RuntimeError(f"compute_fn returned {vals.shape[0]} values for {len(chunk)} rows.")
        outs.append(vals.detach().float().to(accelerator.device))
    local = torch.cat(outs, dim=0)  # (per_proc, *value_shape)
    gathered = accelerator.gather(local) if world > 1 else local  # (world * per_proc, *value_shape), rank-major
    value_shape = tuple(gathered.shape[1:])
    by_row = gathered.reshape(world, per_proc, *value_shape).transpose(0, 1).reshape(world * per_proc, *value_shape)
    return by_row[:num_rows].cpu()
