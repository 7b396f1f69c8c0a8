"""The random-init Llamas every benchmark measures: one builder, so that their shapes differ only where the
benchmark says so (transformers' LlamaForCausalLM, seeded, untied embeddings, fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def random_llama(
    *, seed: int = 0, max_position_embeddings: int = 1024, tie_word_embeddings: bool = False, **shape: Any
):
    """A seeded random Llama of ``shape`` (LlamaConfig fields: vocab_size, hidden_size, layers, heads, tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings, **shape
    )
    return LlamaForCausalLM(config)


def save_random_llama(model_dir: Path, *, tokenizer=None, **shape: Any) -> int:
    """:func:`random_llama` saved with ``save_pretrained`` (and ``tokenizer``'s files); returns its parameters."""
    model = random_llama(**shape)
    model.save_pretrained(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())
