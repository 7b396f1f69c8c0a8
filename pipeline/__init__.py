"""Offline DPO pipeline: tokenize -> reference log-probs -> DeepSpeed training (with TR-DPO resync)."""

__version__ = "0.1.0"
