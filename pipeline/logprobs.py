"""Completion log-probabilities: the one function the reference pass and training both call.

Using the same code for both sides is what makes the step-0 parity hold: with policy == reference, the DPO
log-ratio is 0 and the sigmoid loss is exactly ln 2, no matter how the two stages batch the data.

Two layouts of B pairs, the same log-probs (within float rounding; ``tests/test_logprobs.py``):

* :class:`PairBatch`, **padded**: 2B left-padded rows, prompt + chosen then prompt + rejected. Every
  completion ends at the last position, so the model is asked for the logits of the last ``K + 1`` positions
  only (``logits_to_keep``; K = longest completion).
* :class:`PackedPairBatch`, **padding-free** (``padding_free``): the B pairs as segments of one row, no padding,
  position ids restarting in each segment. With **prefix sharing** (``prefix_sharing``; Wang and Hegde 2024,
  "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv:2410.20305) a pair is one segment
  ``prompt | chosen | rejected``: the rejected tokens attend to the prompt and to themselves, not to chosen, and
  their position ids restart where the prompt ends, so each token sees exactly the context (and positions) it
  has in its own padded row, while the prompt runs once instead of twice. The block mask is built on the device
  for SDPA and eager attention; FlashAttention takes the packed position ids alone (its varlen path), which can
  express packing but not a shared prefix. The lm-head runs on the positions that predict completion tokens
  only (``logits_to_keep`` as an index tensor: the prompt's last position predicts both first tokens).

Memory: the naive recipe, ``log_softmax(logits.float())`` then ``gather``, materialises a float32
[batch, seq, vocab] tensor and keeps it for backward. :class:`_TokenLogProbs` computes
``logit[label] - logsumexp(logits)`` in float32 chunk by chunk, saving only the model-dtype logits and the
float32 logsumexp for backward; backward recomputes the softmax chunk by chunk. A chunk is sized in bytes
(:data:`CHUNK_BYTES`), not positions, so a 128k vocabulary or a long packed row cannot blow the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.layout import MASKED_ATTENTION, BatchLayout
from pipeline.losses import PairLogps
from pipeline.reference.cache import ReferenceLogps
from pipeline.throughput import batch_counts

log = logging.getLogger(__name__)

# Bytes of one float32 chunk of logits (rows x positions x vocab x 4): 128 MiB whatever the vocabulary.
CHUNK_BYTES = 128 * 2**20
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # PackedPairBatch.branch
FULL, SLIDING = "full_attention", "sliding_attention"  # the layer types whose masks packed rows can build


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

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(**{name: t.to(device) for name, t in vars(self).items()})

    def counts(self) -> Tensor:
        """:data:`pipeline.throughput.COUNTS` of this batch (on its device, no host sync)."""
        lengths = self.attention_mask.sum(-1, dtype=torch.float64)
        return batch_counts(
            tokens=lengths.sum(),
            positions=lengths.new_full((), float(self.attention_mask.numel())),
            squared_lengths=(lengths * lengths).sum(),
            logit_tokens=self.completion_lengths.sum(dtype=torch.float64),
        )

    def _forward(self, model) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(logits (2B, K, V), labels (2B, K), sequence of each label, offset of each label in its completion)."""
        width = int(self.completion_lengths.max())
        out = model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            logits_to_keep=width + 1,
            use_cache=False,
        )
        # The logit at position p predicts token p + 1: drop the last kept position, whose next token does not exist.
        logits, labels = out.logits[:, :-1], self.input_ids[:, -width:]
        # Index of each kept label within its own completion (negative inside the prompt or the padding).
        offset = torch.arange(width, device=labels.device)[None, :] - (width - self.completion_lengths[:, None])
        sequence = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        return logits, labels, sequence, offset


@dataclass
class PackedPairBatch:
    """B pairs as the segments of R rows, each row at most the layout's ``max_packed_tokens`` long (one row when
    it has none), the rows right-padded to the longest.

    With ``prefix_shared`` a segment is ``prompt | chosen | rejected`` (one per pair); without, ``prompt | chosen``
    and ``prompt | rejected`` are two segments. The lm-head runs on the columns ``keep`` of every row (the
    positions that predict a completion token in some row; a shared prompt's last position twice, as it predicts
    both first tokens), and each completion token is read from its (row, column) of that grid."""

    input_ids: Tensor  # (R, L) int64, right-padded with pad_token_id
    position_ids: Tensor  # (R, L) int64: from 0 in each segment; a shared prompt's rejected branch restarts at |x|
    segment_ids: Tensor  # (R, L) int64: attention stays inside a segment (the padding is one of its own)
    branch: Tensor  # (R, L) int64: 0 prompt, 1 chosen, 2 rejected (a rejected query never sees a chosen key)
    keep: Tensor  # (U,) int64: the columns whose logits are computed, in every row
    labels: Tensor  # (R, U) int64: the completion token each kept column predicts (0 where none)
    label_sequence: Tensor  # (R, U) int64: the sequence of each (0..B-1 chosen, B..2B-1 rejected)
    label_offset: Tensor  # (R, U) int64: index of each within its completion (-1 where none)
    completion_lengths: Tensor  # (2B,) int64
    public_lengths: Tensor  # (2B,) int64
    example_ids: Tensor  # (B,) int64
    real_tokens: Tensor  # () float64: the rows' non-padding positions
    squared_lengths: Tensor  # () float64: twice the (query, key) pairs attended (see pipeline.throughput)
    prefix_shared: bool

    @property
    def num_pairs(self) -> int:
        return self.example_ids.numel()

    def to(self, device: torch.device | str) -> PackedPairBatch:
        moved: dict[str, Any] = {n: t.to(device) for n, t in vars(self).items() if isinstance(t, Tensor)}
        return dataclasses.replace(self, **moved)

    def counts(self) -> Tensor:
        return batch_counts(
            tokens=self.real_tokens,
            positions=self.real_tokens.new_full((), float(self.input_ids.numel())),
            squared_lengths=self.squared_lengths,
            logit_tokens=self.completion_lengths.sum(dtype=torch.float64),
        )

    def attention_mask(self, attention: str, dtype: torch.dtype, model_config=None) -> Tensor | dict | None:
        """The (R, 1, L, L) mask for ``attention``: boolean for SDPA, additive for eager; None for the others,
        which read the packing from the position ids (FlashAttention's varlen path, which applies a sliding
        window itself). A model with sliding-window layers gets the window in position-id distance, as its padded
        rows would (a shared prompt's rejected branch is then as far from the prompt as in its own row): one mask
        when every layer slides (Mistral), one per layer type when they alternate (Gemma 2/3, Qwen2), the
        mapping transformers' models accept in place of the mask they would build."""
        if attention not in MASKED_ATTENTION:
            if self.prefix_shared:
                raise ValueError(f"prefix sharing needs {' or '.join(MASKED_ATTENTION)} attention, not {attention}")
            return None
        window = getattr(model_config, "sliding_window", None)
        layer_types = set(getattr(model_config, "layer_types", None) or ())
        if window is None or not layer_types:
            return self._block_mask(attention, dtype, window)
        return {kind: self._block_mask(attention, dtype, window if kind == SLIDING else None) for kind in layer_types}

    def _block_mask(self, attention: str, dtype: torch.dtype, window: int | None) -> Tensor:
        index = torch.arange(self.segment_ids.shape[1], device=self.segment_ids.device)
        segments, branch, positions = self.segment_ids, self.branch, self.position_ids
        allowed = (segments[:, :, None] == segments[:, None, :]) & (index[None, None, :] <= index[:, None])
        # A rejected query sees the prompt and the rejected tokens before it, never the chosen branch.
        allowed &= ~((branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN))
        if window is not None:
            allowed &= positions[:, :, None] - positions[:, None, :] < window
        if attention == "sdpa":
            return allowed[:, None]
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def _forward(self, model) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask(
                attention_implementation(model), model_dtype(model), model_config(model)
            ),
            position_ids=self.position_ids,
            logits_to_keep=self.keep,
            use_cache=False,
        ).logits
        return logits, self.labels, self.label_sequence, self.label_offset


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
    return PairBatch(input_ids, attention_mask, position_ids, lengths, _public(lengths), _example_ids(rows))


def pack_pairs(
    rows: Sequence[dict], *, prefix_sharing: bool, max_tokens: int | None = None, pad_token_id: int = 0
) -> PackedPairBatch:
    """The same rows as :func:`collate_pairs` -> one :class:`PackedPairBatch`: pairs first-fit, longest first,
    into rows of at most ``max_tokens`` (None: one row); the caller has checked that every pair fits.

    Built in Python lists and numpy, one tensor per field at the end: this runs once per micro-batch on the
    host, beside a forward it must not slow down."""
    layout = BatchLayout(padding_free=True, prefix_sharing=prefix_sharing, max_packed_tokens=max_tokens)
    pairs = [tuple(list(row[f"{k}_input_ids"]) for k in ("prompt", "chosen", "rejected")) for row in rows]
    sizes = [int(layout.pair_tokens(*map(len, pair))) for pair in pairs]
    packed: list[list[int]] = []  # the pairs of each row
    room: list[float] = []
    for i in sorted(range(len(pairs)), key=lambda i: -sizes[i]):
        row = next((r for r in range(len(packed)) if room[r] >= sizes[i]), None)
        if row is None:
            packed.append([])
            room.append(math.inf if max_tokens is None else max_tokens)
            row = len(packed) - 1
        packed[row].append(i)
        room[row] -= sizes[i]
    width = max(sum(sizes[i] for i in members) for members in packed)
    fields = {name: np.zeros((len(packed), width), dtype=np.int64) for name in ("ids", "positions", "branch")}
    fields["ids"][:] = pad_token_id
    segments = np.full((len(packed), width), -1, dtype=np.int64)  # the padding: a segment of its own
    # Per completion token, in sequence order (the B chosen, then the B rejected): the row, the position whose
    # logits predict it, and which of that position's kept columns it reads (1 for a shared prompt's second use).
    label_row: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * (2 * len(pairs))
    label_position: list[np.ndarray] = list(label_row)
    label_use: list[np.ndarray] = list(label_row)
    squared = 0
    for r, members in enumerate(packed):
        ids: list[int] = []
        positions: list[int] = []
        branch: list[int] = []
        segment_of: list[int] = []
        for i in members:
            prompt, chosen, rejected = pairs[i]
            p = len(prompt)
            for side, completion in enumerate((chosen, rejected)):
                segment = 2 * i + (0 if prefix_sharing else side)
                if side == 0 or not prefix_sharing:
                    prompt_end = len(ids) + p - 1  # its last position predicts the completion's first token
                    ids += prompt
                    positions += range(p)
                    branch += [PROMPT] * p
                    segment_of += [segment] * p
                first, n = len(ids), len(completion)
                ids += completion
                positions += range(p, p + n)
                branch += [REJECTED if side else CHOSEN] * n
                segment_of += [segment] * n
                sequence = side * len(pairs) + i
                label_row[sequence] = np.full(n, r, dtype=np.int64)
                label_position[sequence] = np.array([prompt_end, *range(first, first + n - 1)], dtype=np.int64)
                label_use[sequence] = np.zeros(n, dtype=np.int64)
                label_use[sequence][0] = 1 if prefix_sharing and side == 1 else 0
            squared += (p + len(chosen)) ** 2 + (p + len(rejected)) ** 2 - (p * p if prefix_sharing else 0)
        n = len(ids)
        fields["ids"][r, :n], fields["positions"][r, :n], fields["branch"][r, :n] = ids, positions, branch
        segments[r, :n] = segment_of
        fields["positions"][r, n:] = np.arange(width - n)  # the padding as a sequence of its own (varlen too)
    rows_, positions_, uses = (np.concatenate(x) for x in (label_row, label_position, label_use))
    # The kept columns: every position some row reads, twice where a shared prompt's last one is read twice.
    keep = np.sort(np.concatenate([np.unique(positions_), np.unique(positions_[uses == 1])]))
    columns = np.searchsorted(keep, positions_) + uses
    lengths = np.array([len(pair[1]) for pair in pairs] + [len(pair[2]) for pair in pairs], dtype=np.int64)
    grid = (len(packed), len(keep))
    labels, label_sequence = np.zeros(grid, dtype=np.int64), np.zeros(grid, dtype=np.int64)
    label_offset = np.full(grid, -1, dtype=np.int64)
    tokens = [token for pair in pairs for token in pair[1]] + [token for pair in pairs for token in pair[2]]
    labels[rows_, columns] = tokens
    label_sequence[rows_, columns] = np.repeat(np.arange(len(lengths)), lengths)
    label_offset[rows_, columns] = np.concatenate([np.arange(n) for n in lengths])
    lengths_tensor = torch.from_numpy(lengths)
    return PackedPairBatch(
        input_ids=torch.from_numpy(fields["ids"]),
        position_ids=torch.from_numpy(fields["positions"]),
        segment_ids=torch.from_numpy(segments),
        branch=torch.from_numpy(fields["branch"]),
        keep=torch.from_numpy(keep),
        labels=torch.from_numpy(labels),
        label_sequence=torch.from_numpy(label_sequence),
        label_offset=torch.from_numpy(label_offset),
        completion_lengths=lengths_tensor,
        public_lengths=_public(lengths_tensor),
        example_ids=_example_ids(rows),
        real_tokens=torch.tensor(float(sum(sizes)), dtype=torch.float64),
        squared_lengths=torch.tensor(float(squared), dtype=torch.float64),
        prefix_shared=prefix_sharing,
    )


def collate(rows: Sequence[dict], pad_token_id: int, layout: BatchLayout) -> PairBatch | PackedPairBatch:
    """Rows of the tokenized artifact in ``layout``: padded rows or one packed row."""
    if layout.padding_free:
        return pack_pairs(
            rows, prefix_sharing=layout.prefix_sharing, max_tokens=layout.max_packed_tokens, pad_token_id=pad_token_id
        )
    return collate_pairs(rows, pad_token_id)


def honoured_layout(model, config, pad_token_id: int, device: torch.device | str = "cpu") -> BatchLayout:
    """The layout the config asks for, if ``model`` honours it, else padded rows (one warning line naming why).

    A probe, not a list of architectures: two short synthetic pairs, scored padded and packed, must agree (per
    token, to float rounding). A model that ignores packed position ids or a custom 4D mask (remote code, an
    attention kernel that cannot take one) fails it, and the stage runs padded instead. Under ZeRO-3 every rank
    makes the same probe forwards. ``device``: where the model takes its inputs (a rank's GPU, even when ZeRO-3
    offloads the parameters to the CPU)."""
    attention = attention_implementation(model)
    layout = BatchLayout.of(config, attention)
    if not layout.padding_free:
        return layout
    if config.prefix_sharing is None and not layout.prefix_sharing:
        log.info(
            "%s attention: packed rows without a shared prompt (only %s take its block mask)",
            attention,
            " and ".join(MASKED_ATTENTION),
        )
    unknown = set(getattr(model_config(model), "layer_types", None) or ()) - {FULL, SLIDING}
    if unknown:  # chunked or linear attention layers: masks packed rows cannot describe
        log.warning("padding_free: %s layers cannot take packed rows; scoring padded rows", ", ".join(sorted(unknown)))
        return dataclasses.replace(layout, padding_free=False, prefix_sharing=False)
    vocab = int(model_config(model).vocab_size)
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(min(3, vocab - 1), vocab, (n,), generator=generator).tolist()

    rows = [
        dict(example_id=i, prompt_input_ids=tokens(6 + i), chosen_input_ids=tokens(4), rejected_input_ids=tokens(5 - i))
        for i in range(2)
    ]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()  # dropout off (LoRA's too): the two forwards must be comparable
    try:
        with torch.no_grad():
            padded = completion_logps(model, collate_pairs(rows, pad_token_id).to(device))
            packed = completion_logps(model, collate(rows, pad_token_id, layout).to(device))
    finally:
        for module, training in modes:  # each module as it was (an inference engine's model stays in eval)
            module.training = training
    per_token = (padded.logps - packed.logps).abs() / padded.lengths
    tolerance = 1e-3 if model_dtype(model) == torch.float32 else 5e-2
    if float(per_token.max()) <= tolerance:
        log.info("batch layout: %s (%s attention)", layout.describe(), attention)
        return layout
    log.warning(
        "padding_free: this %s model (%s attention) does not honour packed rows (log-probs off by %.3g per token); "
        "scoring padded rows instead",
        getattr(model_config(model), "model_type", "?"),
        attention,
        float(per_token.max()),
    )
    return dataclasses.replace(layout, padding_free=False, prefix_sharing=False)


def _public(lengths: Tensor) -> Tensor:
    """min(|y_w|, |y_l|) of each pair, repeated for both halves (LD-DPO's public length)."""
    half = lengths.numel() // 2
    return torch.minimum(lengths[:half], lengths[half:]).repeat(2)


def _example_ids(rows: Sequence[dict]) -> Tensor:
    return torch.tensor([int(row["example_id"]) for row in rows], dtype=torch.long)


def _hf_model(model):
    """The (peft-wrapped) Hugging Face model inside a DeepSpeed engine, or the model itself."""
    return getattr(model, "module", model)


def model_config(model):
    """The text model's config of a (DeepSpeed-wrapped, peft-wrapped) Hugging Face model."""
    return _hf_model(model).config.get_text_config()


def attention_implementation(model) -> str:
    """The attention a (DeepSpeed-wrapped, peft-wrapped) Hugging Face model runs: ``sdpa``, ``eager``, ..."""
    return str(_hf_model(model).config._attn_implementation)


def model_dtype(model) -> torch.dtype:
    """The dtype the model computes in: its input embeddings' (a quantised base's first weights may be uint8)."""
    return _hf_model(model).get_input_embeddings().weight.dtype


def _chunk(rows: int, vocab: int) -> int:
    """Positions per float32 chunk of ``rows`` x positions x ``vocab`` logits within :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * rows * vocab))


class _TokenLogProbs(torch.autograd.Function):
    """log p(label) = logits[label] - logsumexp(logits), float32, chunked over positions.

    forward saves the (model-dtype) logits and the float32 logsumexp only; backward rebuilds the softmax one
    chunk at a time: d logp / d logits = onehot(label) - softmax(logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # logits (N, K, V), labels (N, K)
        token_logps = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(token_logps)
        step = _chunk(logits.shape[0], logits.shape[-1])
        for start in range(0, labels.shape[1], step):
            window = slice(start, start + step)
            chunk = logits[:, window].float()
            lse[:, window] = torch.logsumexp(chunk, dim=-1)
            token_logps[:, window] = chunk.gather(-1, labels[:, window, None]).squeeze(-1) - lse[:, window]
        ctx.save_for_backward(logits, labels, lse)
        return token_logps

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        step = _chunk(logits.shape[0], logits.shape[-1])
        for start in range(0, labels.shape[1], step):
            window = slice(start, start + step)
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


def completion_logps(model, batch: PairBatch | PackedPairBatch, *, with_wpo_weights: bool = False) -> SequenceLogps:
    """One forward over chosen and rejected together; log-probs of completion tokens only, summed per sequence.

    ``model`` is a Hugging Face causal LM (or a DeepSpeed engine wrapping one) that accepts ``logits_to_keep``
    and ``position_ids``. Gradients flow to the model when called outside ``no_grad``."""
    logits, labels, sequence, offset = batch._forward(model)
    sequences = batch.completion_lengths.numel()

    def per_sequence(values: Tensor) -> Tensor:
        return values.new_zeros(sequences).index_add_(0, sequence.reshape(-1), values.reshape(-1))

    in_completion = offset >= 0
    per_token = token_logprobs(logits, labels)
    # torch.where, not multiply: logits at padded positions may be non-finite and 0 * nan = nan.
    masked = torch.where(in_completion, per_token, 0.0)
    public = torch.where(in_completion & (offset < batch.public_lengths[sequence]), per_token, 0.0)
    wpo = None
    if with_wpo_weights:
        with torch.no_grad():
            # logsumexp_v(2 log p_v) = logsumexp_v(2 x_v) - 2 logsumexp_v(x_v), chunked like the forward.
            step = _chunk(logits.shape[0], logits.shape[-1])
            adjust = torch.cat(
                [
                    torch.logsumexp(2 * logits[:, s : s + step].float(), dim=-1)
                    - 2 * torch.logsumexp(logits[:, s : s + step].float(), dim=-1)
                    for s in range(0, labels.shape[1], step)
                ],
                dim=1,
            )
            adjusted = torch.where(in_completion, per_token.detach() - adjust, 0.0)
            wpo = per_sequence(adjusted) / batch.completion_lengths.clamp(min=1)
    lengths = batch.completion_lengths.to(torch.float32)
    return SequenceLogps(per_sequence(masked), lengths, per_sequence(public), wpo)
