"""Helpers shared by the tests (import as `from tests._helpers import ...`)."""


def cpu_args(**overrides):
    """Training-argument overrides every CPU test needs (TRL's base config defaults to bf16 + checkpointing)."""
    base = dict(
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(overrides)
    return base


def make_grad_capture():
    """A TrainerCallback that keeps the flattened gradient of the first optimizer step (after DDP's all-reduce, before
    the update); parameters without a gradient contribute zeros so vectors from different runs line up."""
    import torch
    from transformers import TrainerCallback

    class GradCapture(TrainerCallback):
        def __init__(self):
            self.grad = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grad is None:
                self.grad = torch.cat(
                    [
                        p.grad.detach().flatten().float().cpu() if p.grad is not None else torch.zeros(p.numel())
                        for p in model.parameters()
                        if p.requires_grad
                    ]
                )

    return GradCapture()
