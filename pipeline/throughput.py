"""Throughput and model FLOP utilisation (MFU) of each training step, from counts the recipe already has.

What is measured, per optimizer step (:meth:`StepThroughput.metrics`):

* ``tokens_per_second``: real (non-padding) tokens run through forward on all ranks, per wall second of the step;
  ``tokens_per_second_per_device`` is that over ``world_size``. With a shared prompt (``prefix_sharing``) the
  prompt is run, and counted, once per pair: compare layouts in pairs per second, or in the two-sequence tokens
  the reference manifest and ``bench/bench_packing.py`` count.
* ``padding_fraction``: the share of the positions the hardware ran that were padding, 1 - tokens / positions.
* ``tflops_per_device``: model FLOPs per second per device, in 1e12 (reported even when the peak is unknown).
* ``mfu``: model FLOPs / (seconds x world size x per-device peak), when :func:`peak_flops` knows the peak.

Conventions (Kaplan et al. 2020 sec. 2.1; PaLM, Chowdhery et al. 2022, app. B; Megatron, Narayanan et al. 2021):

* **N** (:attr:`ModelFlops.non_embedding_params`) counts the weights of every matrix a token is multiplied by:
  each linear layer, the LoRA adapters, and the lm_head *also when it is tied* to the input embedding (the
  lookup costs no FLOPs, the output projection a full matmul). Embedding tables, norms and biases are left out
  (no matmul, O(d) per token). So 2N is exactly the matmul FLOPs of one token's forward.
* **A matmul** costs 2 FLOPs per weight per token forward; backward costs 2 for the input's gradient and 2 for
  the weight's, the latter only for trainable weights: 4N + 2N_trainable. Full fine-tuning is Kaplan's and
  PaLM's 6N; LoRA is 4N + 2N_lora (N including the adapters): frozen weights need no weight gradient.
* **Attention**: QK^T and AV cost 2 x 2 x A FLOPs per (query, key) pair and layer (A = query heads x head dim,
  GQA does not change it), over the whole sequence: no causal halving, PaLM's and Megatron's count and what
  ``torch.utils.flop_counter`` counts. Backward is twice forward (both operands are activations), so per
  token 4LAs forward and 12LAs forward + backward; full fine-tuning gives PaLM's 6N + 12LAs exactly.
* **seq_len** is the attention context of a real token: for sequences of l_i real tokens, the token-weighted
  mean length sum(l_i^2) / sum(l_i) makes tokens x 4LA x seq_len the exact forward attention FLOPs.
* **Real tokens only**: MFU counts useful FLOPs, those of the non-padding tokens. Padded positions are compute
  the hardware ran for nothing; ``padding_fraction`` shows how much (so a padded batch lowers MFU, as it should).
  DPO's prompt counts twice (the chosen and the rejected sequence each run it: two sequences, two forwards).
* **lm_head on the tokens whose logits are used** (``logit_tokens``; default every token, the LM convention).
  DPO needs only the completion tokens' logits, and the recipe computes few more (``logits_to_keep``), so its
  MFU counts the lm_head on those alone instead of over-crediting the prompt's positions.
* **No recompute**: gradient checkpointing's second forward is not counted. This is MFU, not hardware FLOP
  utilisation (HFU): the same work at the same speed gives the same MFU with and without it, so the flag is no
  input here, and a run with it on shows the recompute as lower MFU (a quarter for a full fine-tune, a third
  with LoRA, at the same hardware utilisation).

Peaks (:func:`peak_flops`): dense (no 2:4 sparsity) vendor datasheet figures for CUDA/ROCm devices, bf16 or
fp32 (TF32 where torch runs fp32 matmuls as TF32); on CPU a measured best-of-several large-matmul rate at
torch's thread count, so CPU MFU is relative to what torch's GEMM reaches, not to a theoretical peak.

Trade-offs: dense models only (an MoE model's N counts every expert, not the active ones, and sliding-window
attention is counted over the whole sequence). LoRA's 4N assumes every matmul's input gradient is computed,
while autograd skips those below the lowest trainable weight (for peft's Llama default, layer 0's q/k/v
projections: under 0.5 % of a 7B Llama's step, 6.5 % of the 2-layer test model's). The CPU peak is noisy on a
busy machine (the best repeat is taken). A tabled device is assumed to hold its boost clock, so its MFU is a
lower bound on the utilisation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["COUNTS", "ModelFlops", "StepThroughput", "batch_counts", "peak_flops", "table_peak"]


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's own shape: under ZeRO-3 its data is partitioned away (shape (0,), ``numel()`` 0) and
    ``ds_shape`` holds it; a bitsandbytes 4-bit weight packs two values per byte, its shape is in
    ``quant_state``."""
    shape = getattr(p, "ds_shape", None)
    if shape is None:
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return tuple(shape if shape is not None else p.shape)


def _count(p: torch.Tensor) -> int:
    return math.prod(_shape(p))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a DeepSpeed engine or DDP (``.module``) and under peft (``get_base_model``:
    the base with its LoRA layers injected, which owns ``config`` and ``get_output_embeddings``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module  # type: ignore[assignment]
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per token of the model's training step, from its config and parameter counts (conventions: module
    docstring)."""

    total_params: int  # every parameter once (tied ones once), embeddings included; ds_numel under ZeRO-3
    trainable_params: int
    non_embedding_params: int  # N: weights of every matmul per token, lm_head included even when tied
    trainable_non_embedding_params: int  # N_trainable: those of N that get a weight gradient
    lm_head_params: int  # the output projection's share of N (0 if the model has none)
    lm_head_trainable: bool
    num_layers: int
    hidden_size: int
    attention_width: int  # query heads x head dim (= hidden_size for most models; not for e.g. Gemma, Qwen3)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFlops:
        """From a Hugging Face causal LM, a peft ``PeftModel``, a ZeRO-3 partitioned module, or an engine
        wrapping one. Parameters are counted once (``parameters()`` yields a tied weight once)."""
        base = _unwrap(model)
        params = list(base.parameters())
        # Embedding tables are lookups: no FLOPs, whatever their size (token, position, type embeddings).
        lookups = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}
        get_head: Any = getattr(base, "get_output_embeddings", None)
        head_weight = getattr(get_head() if callable(get_head) else None, "weight", None)
        head = head_weight if isinstance(head_weight, torch.Tensor) else None
        head_count = _count(head) if head is not None else 0
        head_trainable = head is not None and head.requires_grad
        # A tied lm_head is the input table's weight, left out above; its matmul is still a full d x V one.
        tied = head_count if id(head) in lookups else 0
        # peft's modules_to_save keeps the original module beside the trained copy and runs only the copy.
        originals = [getattr(m, "original_module", None) for m in base.modules() if hasattr(m, "modules_to_save")]
        idle = {id(p) for m in originals if isinstance(m, torch.nn.Module) for p in m.parameters()}
        matrices = [p for p in params if id(p) not in lookups | idle and len(_shape(p)) >= 2]
        config: Any = base.config  # a transformers PretrainedConfig
        text = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: decoder
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            total_params=sum(_count(p) for p in params),
            trainable_params=sum(_count(p) for p in params if p.requires_grad),
            non_embedding_params=sum(_count(p) for p in matrices) + tied,
            trainable_non_embedding_params=sum(_count(p) for p in matrices if p.requires_grad)
            + (tied if head_trainable else 0),
            lm_head_params=head_count,
            lm_head_trainable=head_trainable,
            num_layers=int(text.num_hidden_layers),
            hidden_size=int(text.hidden_size),
            attention_width=heads * int(head_dim),
        )

    def _dense(self, logit_fraction: float) -> tuple[float, float]:
        """(N, N_trainable) with the lm_head counted on ``logit_fraction`` of the tokens only."""
        if not 0.0 <= logit_fraction <= 1.0:
            raise ValueError(f"logit_fraction must be in [0, 1], got {logit_fraction}")
        skipped = (1.0 - logit_fraction) * self.lm_head_params
        return (
            self.non_embedding_params - skipped,
            self.trainable_non_embedding_params - (skipped if self.lm_head_trainable else 0.0),
        )

    def _attention(self, seq_len: float) -> float:
        """Forward attention FLOPs per token: QK^T and AV, 2 x A each per key, over the full context."""
        return 4.0 * self.num_layers * self.attention_width * seq_len

    def forward_flops_per_token(self, seq_len: float, logit_fraction: float = 1.0) -> float:
        """2N + 4LAs: one forward (the reference pass)."""
        dense, _ = self._dense(logit_fraction)
        return 2.0 * dense + self._attention(seq_len)

    def train_flops_per_token(self, seq_len: float, logit_fraction: float = 1.0) -> float:
        """Forward 2N + 4LAs, input gradients 2N + 8LAs, weight gradients 2N_trainable: 6N + 12LAs for a full
        fine-tune, 4N + 2N_lora + 12LAs with LoRA. No gradient-checkpointing recompute (MFU, not HFU)."""
        dense, trainable = self._dense(logit_fraction)
        return 4.0 * dense + 2.0 * trainable + 3.0 * self._attention(seq_len)


# --------------------------------------------------------------------------------------------------- peaks
# Dense per-device peak FLOP/s: (name substring, bf16, tf32, fp32). The longest substring of the device name
# wins ("A100" over "A10", "L40S" over "L40", "GB200" over "B200", "H100 NVL" over "H100"), case-insensitive.
# Datasheets print tensor-core figures with 2:4 sparsity: these are half of those. fp16 reads the bf16 column
# (the same rate from Ampere on; the recipe refuses fp16 anyway). tf32 None: fp32 matmuls run at the fp32 rate.
_T = 1e12
_PEAKS: tuple[tuple[str, float | None, float | None, float], ...] = (
    ("H100", 989.5 * _T, 494.5 * _T, 67 * _T),  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM
    ("H100 PCIe", 756.5 * _T, 378 * _T, 51 * _T),  # NVIDIA H100 datasheet, H100 PCIe
    ("H100 NVL", 835.5 * _T, 417.5 * _T, 60 * _T),  # NVIDIA H100 datasheet, H100 NVL (per GPU)
    ("GH200", 989.5 * _T, 494.5 * _T, 67 * _T),  # NVIDIA GH200 Grace Hopper Superchip datasheet
    ("H200", 989.5 * _T, 494.5 * _T, 67 * _T),  # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM
    ("H200 NVL", 835.5 * _T, 417.5 * _T, 60 * _T),  # NVIDIA H200 datasheet, H200 NVL
    ("A100", 312 * _T, 156 * _T, 19.5 * _T),  # NVIDIA A100 datasheet: 40 GB and 80 GB, SXM and PCIe alike
    ("H800", 989.5 * _T, 494.5 * _T, 67 * _T),  # the export H100 SXM: its compute, less NVLink bandwidth
    ("A800", 312 * _T, 156 * _T, 19.5 * _T),  # the export A100: its compute, less NVLink bandwidth
    ("A10G", 70 * _T, 35 * _T, 35 * _T),  # AWS G5's A10G, no public datasheet: Baseten's "NVIDIA A10 vs A10G"
    ("A10", 125 * _T, 62.5 * _T, 31.2 * _T),  # NVIDIA A10 Tensor Core GPU datasheet
    ("A40", 149.7 * _T, 74.8 * _T, 37.4 * _T),  # NVIDIA A40 datasheet
    ("L4", 121 * _T, 60 * _T, 30.3 * _T),  # NVIDIA L4 Tensor Core GPU datasheet
    ("L40", 181.05 * _T, 90.5 * _T, 90.5 * _T),  # NVIDIA L40 datasheet
    ("L40S", 362.05 * _T, 183 * _T, 91.6 * _T),  # NVIDIA L40S datasheet
    ("RTX A6000", 154.8 * _T, 77.4 * _T, 38.7 * _T),  # NVIDIA RTX A6000 datasheet / Ampere GA102 whitepaper
    ("RTX 4090", 165.2 * _T, 82.6 * _T, 82.6 * _T),  # NVIDIA Ada Lovelace whitepaper (FP32 accumulate)
    ("RTX 3090", 71 * _T, 35.6 * _T, 35.6 * _T),  # NVIDIA Ampere GA102 whitepaper (FP32 accumulate)
    ("V100-SXM2", None, None, 15.7 * _T),  # NVIDIA V100 datasheet: no bf16 or tf32 tensor cores
    ("V100-PCIE", None, None, 14 * _T),  # NVIDIA V100 datasheet, PCIe
    ("V100S-PCIE", None, None, 16.4 * _T),  # NVIDIA V100S datasheet
    ("Tesla T4", None, None, 8.1 * _T),  # NVIDIA T4 datasheet: no bf16 tensor cores
    ("B200", 2250 * _T, 1125 * _T, 75 * _T),  # NVIDIA HGX B200 datasheet, per GPU (of 8)
    ("GB200", 2500 * _T, 1250 * _T, 80 * _T),  # NVIDIA GB200 NVL72 datasheet, per GPU (of 72)
    # ROCm: fp32 matmuls at the FP32-matrix rate (torch's TF32 switch is a CUDA one).
    ("MI300X", 1307.4 * _T, None, 163.4 * _T),  # AMD Instinct MI300X data sheet
    ("MI325X", 1307.4 * _T, None, 163.4 * _T),  # AMD Instinct MI325X data sheet
    ("MI250X", 191.5 * _T, None, 47.85 * _T),  # AMD Instinct MI250X data sheet, per GCD (torch sees each GCD)
)


def _dtype_label(dtype: torch.dtype, tf32: bool) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    raise ValueError(f"no peak for dtype {dtype}: bfloat16, float16 or float32")


def table_peak(name: str, dtype: torch.dtype, tf32: bool = True) -> tuple[float | None, str]:
    """Dense peak FLOP/s of the device called ``name`` (``torch.cuda.get_device_name``) for matmuls in ``dtype``
    (``tf32``: fp32 matmuls run as TF32), and where it came from. A pure function of its arguments."""
    label = _dtype_label(dtype, tf32)
    if "MIG" in name.upper():  # a MIG slice has a fraction of the SMs: the full chip's peak would be wrong
        return None, f"unknown device {name} (a MIG slice)"
    rows = [row for row in _PEAKS if row[0].lower() in name.lower()]
    if not rows:
        return None, f"unknown device {name}"
    key, bf16, tf32_peak, fp32 = max(rows, key=lambda row: len(row[0]))
    if label == "tf32" and tf32_peak is None:
        label = "fp32"
    peak = {"bf16": bf16, "tf32": tf32_peak, "fp32": fp32}[label]
    if peak is None:
        return None, f"no {label} peak for {name} (table row {key})"
    return peak, f"table: {name} {label}"


_CPU_LABELS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# (dtype, threads) -> FLOP/s: measured once per process; the threads decide the rate.
_CPU_PEAKS: dict[tuple[torch.dtype, int], float] = {}


def _measure_cpu(dtype: torch.dtype) -> float:
    """Best rate of square matmuls, sized so one takes >= 20 ms (a rate near the GEMM's plateau) and the whole
    measurement well under a second on any CPU: the size doubles from 256 until then (each try 8x the last)."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, b, out=out)  # also the warm-up of this size: its time is not a sample
        if time.perf_counter() - start >= 0.02 or n >= 4096:
            break
        n *= 2
    best, spent = math.inf, 0.0
    for repeat in range(6):  # the best, not the mean: other processes only ever slow a repeat down
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if repeat >= 1 and spent > 0.25:
            break
    return 2.0 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Per-device dense peak FLOP/s for matmuls in ``dtype`` on ``device``, and its source: ``"table: <name>
    <dtype>"`` (CUDA/ROCm), ``"measured: CPU <dtype> matmul, <n> threads"``, or None with ``"unknown device
    <name>"``. On CPU the first call per (dtype, thread count) measures (< 1 s); later calls are free. Ranks
    sharing a CPU should call it together (after a barrier), so each measures its share of the cores."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return table_peak(name, dtype, tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    if device.type == "cpu":
        _dtype_label(dtype, tf32=False)  # refuses a dtype with no peak
        key = (dtype, torch.get_num_threads())
        if key not in _CPU_PEAKS:
            _CPU_PEAKS[key] = _measure_cpu(dtype)
        return _CPU_PEAKS[key], f"measured: CPU {_CPU_LABELS[dtype]} matmul, {key[1]} threads"
    return None, f"unknown device {device}"


# --------------------------------------------------------------------------------------------------- steps
COUNTS = ("tokens", "padded_positions", "squared_lengths", "logit_tokens")


def batch_counts(
    *, tokens: torch.Tensor, positions: torch.Tensor, squared_lengths: torch.Tensor, logit_tokens: torch.Tensor
) -> torch.Tensor:
    """One batch's ``COUNTS`` as a float64 (4,) tensor on the batch's device (no host sync): real tokens run,
    positions run (padding included), sum of squared real lengths (for ``seq_len`` = squared_lengths / tokens;
    with a shared prompt, (|x|+|y_w|)^2 + (|x|+|y_l|)^2 - |x|^2, the attended pairs), and the tokens whose
    logits are used. Sums over micro-batches and ranks stay exact: add them, all-reduce them with the step's
    other sums. The batch types compute them (:meth:`pipeline.logprobs.PairBatch.counts`)."""
    return torch.stack([t.to(torch.float64) for t in (tokens, positions, squared_lengths, logit_tokens)])


class StepThroughput:
    """tokens/s and MFU of one step, from counts the recipe already has. ``peak``: one device's FLOP/s (from
    :func:`peak_flops`; None: no ``mfu``); ``forward_only``: the step is a forward (the reference pass)."""

    def __init__(self, flops: ModelFlops, peak: float | None, world_size: int, *, forward_only: bool = False):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.flops, self.peak, self.world_size, self.forward_only = flops, peak, world_size, forward_only

    def metrics(
        self,
        *,
        tokens: float,
        padded_positions: float,
        seconds: float,
        seq_len: float,
        logit_tokens: float | None = None,
    ) -> dict[str, float]:
        """``tokens``: real tokens in forward, summed over ranks; ``padded_positions``: batch x padded length,
        summed over ranks; ``seconds``: the step's wall time; ``seq_len``: sum(l^2) / sum(l) over its sequences;
        ``logit_tokens``: tokens whose logits are used (default: all). FLOPs are counted on real tokens."""
        if seconds <= 0 or tokens <= 0 or padded_positions < tokens:
            raise ValueError(
                f"need seconds > 0 < tokens <= padded_positions, got {seconds}, {tokens}, {padded_positions}"
            )
        fraction = 1.0 if logit_tokens is None else logit_tokens / tokens
        per_token = (self.flops.forward_flops_per_token if self.forward_only else self.flops.train_flops_per_token)(
            seq_len, fraction
        )
        per_device = tokens * per_token / seconds / self.world_size
        record = {
            "tokens_per_second": tokens / seconds,
            "tokens_per_second_per_device": tokens / seconds / self.world_size,
            "padding_fraction": 1.0 - tokens / padded_positions,
            "tflops_per_device": per_device / 1e12,
        }
        if self.peak:
            record["mfu"] = per_device / self.peak
        return record
