"""One pair of modules per method, as in TRL: `<method>_config.py` (the config dataclass) and
`<method>_trainer.py` (the trainer)."""
