"""Completion log-probabilities: the one function the reference pass and training both call.

Using the same code for both sides is what makes the step-0 parity hold: with policy == reference, the DPO
log-ratio is 0 and the sigmoid loss is exactly ln 2, no matter how the two stages batch the data.

Memory: the naive recipe, ``log_softmax(logits.float())`` then ``gather``, materialises a float32
[batch, seq, vocab] tensor and keeps it for backward. Here:

* Sequences are **left**-padded, so every completion ends at the last position, and the model is asked for
  logits of only the last ``K + 1`` positions (``logits_to_keep``; K = longest completion in the batch).
  Prompt positions never reach the vocabulary projection.
* :class:`_TokenLogProbs` computes ``logit[label] - logsumexp(logits)`` in float32 chunk by chunk over the
  sequence, saving only the model-dtype logits and the [batch, K] logsumexp for backward; backward recomputes
  the softmax chunk by chunk. Peak extra memory is one float32 chunk, whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.losses import PairLogps
from pipeline.reference.cache import ReferenceLogps

# Positions per float32 chunk: 128 positions x 32k vocab x 4 bytes x batch 8 = 128 MiB at most.
CHUNK_POSITIONS = 128


@dataclass
class PairBatch:
    """2B left-padded sequences: the B chosen sequences, then the B rejected ones of the same pairs."""

    input_ids: Tensor  # (2B, T) int64, left-padded with pad_token_id
    attention_mask: Tensor  # (2B, T) int64, 0 on padding
    position_ids: Tensor  # (2B, T) int64, 0 at each sequence's first real token
    completion_lengths: Tensor  # (2B,) int64
    public_lengths: Tensor  # (2B,) int64: min(|y_w|, |y_l|) of the pair, repeated for both halves
    example_ids: Tensor  # (B,) int64

    @property
    def num_pairs(self) -> int:
        return self.example_ids.numel()

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.position_ids,
                    self.completion_lengths,
                    self.public_lengths,
                    self.example_ids,
                )
            )
        )


def reference_pair_logps(reference: ReferenceLogps, device: torch.device | str = "cpu") -> PairLogps:
    """Cached reference rows (:meth:`ReferenceLogps.take` of a batch's ids) as the loss's (B,) float32 tensors."""

    def tensor(values) -> Tensor:
        return torch.from_numpy(values.astype("float32")).to(device)

    return PairLogps(
        chosen=tensor(reference.chosen),
        rejected=tensor(reference.rejected),
        chosen_lengths=tensor(reference.chosen_lengths),
        rejected_lengths=tensor(reference.rejected_lengths),
        chosen_public=tensor(reference.chosen_public),
        rejected_public=tensor(reference.rejected_public),
    )


def collate_pairs(rows: Sequence[dict], pad_token_id: int) -> PairBatch:
    """Rows of the tokenized artifact (``example_id``, ``prompt_input_ids``, ``chosen_input_ids``,
    ``rejected_input_ids``) -> one left-padded :class:`PairBatch`."""
    sequences, completion_lengths = [], []
    for side in ("chosen_input_ids", "rejected_input_ids"):
        for row in rows:
            sequences.append(list(row["prompt_input_ids"]) + list(row[side]))
            completion_lengths.append(len(row[side]))
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = torch.tensor(completion_lengths, dtype=torch.long)
    half = len(rows)
    public = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
    example_ids = torch.tensor([int(row["example_id"]) for row in rows], dtype=torch.long)
    return PairBatch(input_ids, attention_mask, position_ids, lengths, public, example_ids)


class _TokenLogProbs(torch.autograd.Function):
    """log p(label) = logits[label] - logsumexp(logits), float32, chunked over positions.

    forward saves the (model-dtype) logits and the float32 logsumexp only; backward rebuilds the softmax one
    chunk at a time: d logp / d logits = onehot(label) - softmax(logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # logits (N, K, V), labels (N, K)
        token_logps = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(token_logps)
        for start in range(0, labels.shape[1], CHUNK_POSITIONS):
            chunk = logits[:, start : start + CHUNK_POSITIONS].float()
            lse[:, start : start + CHUNK_POSITIONS] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, labels[:, start : start + CHUNK_POSITIONS, None]).squeeze(-1)
            token_logps[:, start : start + CHUNK_POSITIONS] = picked - lse[:, start : start + CHUNK_POSITIONS]
        ctx.save_for_backward(logits, labels, lse)
        return token_logps

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, labels.shape[1], CHUNK_POSITIONS):
            window = slice(start, start + CHUNK_POSITIONS)
            grad = grad_output[:, window, None].float()
            softmax = torch.exp(logits[:, window].float() - lse[:, window, None])
            chunk_grad = -grad * softmax
            chunk_grad.scatter_add_(-1, labels[:, window, None], grad)
            grad_logits[:, window] = chunk_grad.to(logits.dtype)
        return grad_logits, None


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Float32 log-probabilities of ``labels`` (N, K) under ``logits`` (N, K, V), memory-light."""
    return _TokenLogProbs.apply(logits, labels)


@dataclass
class SequenceLogps:
    """Per-sequence sums over completion tokens, each (2B,) float32: chosen half first, then rejected."""

    logps: Tensor  # sum of completion-token log-probs
    lengths: Tensor  # number of completion tokens
    public_logps: Tensor  # sum over the first min(|y_w|, |y_l|) completion tokens (LD-DPO)
    wpo_log_weights: Tensor | None = None  # WPO eq. 2: mean of (log p(y_t) - logsumexp_v 2 log p(v)), no grad

    def halves(self, name: str) -> tuple[Tensor, Tensor]:
        value = getattr(self, name)
        half = value.shape[0] // 2
        return value[:half], value[half:]


def completion_logps(model, batch: PairBatch, *, with_wpo_weights: bool = False) -> SequenceLogps:
    """One forward over chosen and rejected together; log-probs of completion tokens only.

    ``model`` is a Hugging Face causal LM (or a DeepSpeed engine wrapping one) that accepts
    ``logits_to_keep``. Gradients flow to the model when called outside ``no_grad``."""
    completion_width = int(batch.completion_lengths.max())
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=completion_width + 1,
        use_cache=False,
    )
    # The logit at position p predicts token p + 1: drop the last kept position, whose next token does not exist.
    logits = out.logits[:, :-1]
    labels = batch.input_ids[:, -completion_width:]
    # Index of each kept label within its own completion (negative inside the prompt or the padding).
    offset = torch.arange(completion_width, device=labels.device)[None, :] - (
        completion_width - batch.completion_lengths[:, None]
    )
    in_completion = offset >= 0
    per_token = token_logprobs(logits, labels)
    # torch.where, not multiply: logits at padded positions may be non-finite and 0 * nan = nan.
    masked = torch.where(in_completion, per_token, 0.0)
    public = torch.where(in_completion & (offset < batch.public_lengths[:, None]), per_token, 0.0)
    wpo = None
    if with_wpo_weights:
        with torch.no_grad():
            # logsumexp_v(2 log p_v) = logsumexp_v(2 x_v) - 2 logsumexp_v(x_v), chunked like the forward.
            adjust = torch.cat(
                [
                    torch.logsumexp(2 * logits[:, s : s + CHUNK_POSITIONS].float(), dim=-1)
                    - 2 * torch.logsumexp(logits[:, s : s + CHUNK_POSITIONS].float(), dim=-1)
                    for s in range(0, completion_width, CHUNK_POSITIONS)
                ],
                dim=1,
            )
            adjusted = torch.where(in_completion, per_token.detach() - adjust, 0.0)
            wpo = adjusted.sum(-1) / batch.completion_lengths.clamp(min=1)
    return SequenceLogps(masked.sum(-1), batch.completion_lengths.to(torch.float32), public.sum(-1), wpo)
