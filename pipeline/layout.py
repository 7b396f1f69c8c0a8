"""How the pairs of a batch are laid out for the forward (torch-free: the config checks it in any process).

``padding_free`` (TRL's name) packs a micro-batch's pairs into rows of at most ``max_packed_tokens`` without
padding inside them; ``prefix_sharing`` also computes each pair's prompt once, chosen and rejected branching off
it under a block mask (:mod:`pipeline.logprobs` builds both layouts and says why they give the padded log-probs).
The block mask is a 4D mask, which SDPA and eager attention take and FlashAttention does not: FlashAttention
packs by position ids alone (its varlen path), so there the prompt is not shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError

MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that honour a custom 4D mask


@dataclass(frozen=True)
class BatchLayout:
    padding_free: bool  # packed rows (else left-padded rows, one per sequence)
    prefix_sharing: bool  # one segment per pair, the prompt computed once (needs padding_free)
    max_packed_tokens: int | None = None  # the longest packed row (None: a micro-batch is one row)

    def pair_tokens(self, prompt, chosen, rejected):
        """A pair's positions (ints or numpy arrays of lengths): in a packed row, the prompt once with prefix
        sharing, else twice; in padded rows, the longer of its two rows."""
        if not self.padding_free:
            return prompt + np.maximum(chosen, rejected)
        return prompt * (1 if self.prefix_sharing else 2) + chosen + rejected

    def check_fits(self, prompt, chosen, rejected, example_ids, where: str) -> None:
        """Refuse a pair longer than ``max_packed_tokens`` (naming it, its length and the fix)."""
        if not self.padding_free or self.max_packed_tokens is None:
            return
        tokens = self.pair_tokens(prompt, chosen, rejected)
        longest = int(np.argmax(tokens)) if len(tokens) else 0
        if len(tokens) and tokens[longest] > self.max_packed_tokens:
            raise ConfigError(
                f"max_packed_tokens: {where}: example_id {int(example_ids[longest])} takes {int(tokens[longest])} "
                f"tokens in a packed row, more than max_packed_tokens ({self.max_packed_tokens}); raise "
                f"max_packed_tokens to at least {int(tokens.max())}, or lower max_length"
            )

    @classmethod
    def of(cls, config, attention: str | None = None) -> BatchLayout:
        """The layout ``config`` asks for, on a model whose attention is ``attention`` (None: the config's
        ``attn_implementation``; transformers' default, SDPA, when that is null too)."""
        attention = attention or config.attn_implementation or "sdpa"
        sharing = config.prefix_sharing
        if sharing is None:
            sharing = config.padding_free and attention in MASKED_ATTENTION
        budget = config.max_packed_tokens
        if budget is None and config.max_length is not None:
            budget = 2 * config.max_length  # a pair's two sequences, as padded rows would hold them
        return cls(config.padding_free, sharing, budget)

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
