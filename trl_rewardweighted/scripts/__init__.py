"""Thin `python -m` launch entry points for `accelerate launch`, one per method."""
