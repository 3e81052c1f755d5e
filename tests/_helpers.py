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
