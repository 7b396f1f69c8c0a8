"""How the pairs of a batch are laid out for the forward (torch-free: the config checks it in any process).

``padding_free`` (TRL's name) packs a micro-batch's pairs into one row without padding; ``prefix_sharing`` also
computes each pair's prompt once, chosen and rejected branching off it under a block mask
(:mod:`pipeline.logprobs` builds both layouts and says why they give the padded log-probs). The block mask is a
4D mask, which SDPA and eager attention take and FlashAttention does not: FlashAttention packs by position ids
alone (its varlen path), so there the prompt is not shared.
"""

from __future__ import annotations

from dataclasses import dataclass

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that honour a custom 4D mask


@dataclass(frozen=True)
class BatchLayout:
    padding_free: bool  # one packed row per forward (else left-padded rows)
    prefix_sharing: bool  # one segment per pair, the prompt computed once (needs padding_free)

    @classmethod
    def of(cls, config, attention: str | None = None) -> BatchLayout:
        """The layout ``config`` asks for, on a model whose attention is ``attention`` (None: the config's
        ``attn_implementation``; transformers' default, SDPA, when that is null too)."""
        attention = attention or config.attn_implementation or "sdpa"
        sharing = config.prefix_sharing
        if sharing is None:
            sharing = config.padding_free and attention in MASKED_ATTENTION
        return cls(config.padding_free, sharing)

    def describe(self) -> str:
        if not self.padding_free:
            return "padded rows"
        return "packed rows, prompt shared" if self.prefix_sharing else "packed rows"


def layout_error(config) -> str | None:
    """Why ``config``'s layout fields cannot hold together (None: they can)."""
    if config.prefix_sharing and not config.padding_free:
        return (
            "prefix_sharing: a shared prompt is a segment of a packed row, so it needs padding_free: true; "
            "set padding_free: true, or prefix_sharing: null"
        )
    attention = config.attn_implementation
    if config.prefix_sharing and attention is not None and attention not in MASKED_ATTENTION:
        return (
            f"prefix_sharing: attn_implementation {attention} cannot take the block mask of a shared prompt "
            f"(only {' and '.join(MASKED_ATTENTION)} can); set prefix_sharing: null (packed rows without sharing) "
            f"or attn_implementation: sdpa"
        )
    return None
