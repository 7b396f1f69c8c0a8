"""The ``ds_config``: any standard DeepSpeed JSON, read and completed from the pipeline config.

:func:`resolve_ds_config` fills every ``"auto"`` value from our config (as the HF Trainer integration does); a
value set explicitly that disagrees with ours is an error. The size-dependent ZeRO buckets take the HF
Trainer's values from the model's hidden size, so the ZeRO-3 config of the transformers docs carries over
unchanged. No torch here: the driver checks a ds_config before any job starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.models import resolve_model_dir


def load_ds_config(path: str | Path | None) -> dict[str, Any]:
    """The user's ds_config (any standard DeepSpeed JSON), or ZeRO stage 0 when none is given."""
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed: ds_config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {exc}") from None


def _fill(ds: dict, dotted: str, value: Any, source: str, *, required: bool = True) -> None:
    """Set ``ds[dotted]`` to ``value`` when missing (if ``required``) or ``"auto"``; refuse a conflict."""
    *parents, leaf = dotted.split(".")
    node = ds
    for key in parents:
        if key not in node:
            if not required:
                return
            node[key] = {}
        node = node[key]
    current = node.get(leaf, "auto" if required else None)
    if current is None:
        return
    if current == "auto":
        node[leaf] = value
    elif current != value and not (isinstance(value, float) and abs(current - value) <= 1e-12 * abs(value)):
        raise ConfigError(f"deepspeed: ds_config sets {dotted}={current!r} but the config's {source} gives "
                          f"{value!r}; set it to \"auto\" or make them agree")


# zero_optimization keys the HF Trainer fills from the hidden size h when "auto".
BUCKET_SIZE_RULES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def resolve_ds_config(config, *, world: int, gpu: bool, inference: bool = False) -> dict[str, Any]:
    """Fill ``"auto"`` values from ``config`` and check the explicit ones agree with it.

    Training: micro batch, gradient accumulation, global batch, clipping, bf16, ZeRO bucket sizes, and the
    optimizer's lr/betas/eps/weight_decay when the ds_config names an optimizer (else the recipe passes torch
    AdamW).
    Inference (the reference pass): batch size = ``precompute_ref_batch_size`` and no optimizer."""
    ds = copy.deepcopy(load_ds_config(config.resolve_path(config.deepspeed)))
    if ds.get("fp16", {}).get("enabled") in (True, "auto") and not gpu:
        if ds["fp16"]["enabled"] is True:
            raise ConfigError("deepspeed: fp16 is not supported on CPU; use bf16 or fp32")
        ds["fp16"]["enabled"] = False
    _fill(ds, "bf16.enabled", bool(config.bf16), "bf16")
    _fill_bucket_sizes(ds, config)
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        # On GPUs the gradient reduce-scatter runs on its own stream beside the backward (5-10 % of a ZeRO-2/3
        # step on one node, more across nodes); on CPU there are no streams to overlap on.
        zero["overlap_comm"] = gpu
    if inference:
        micro = config.precompute_ref_batch_size or config.per_device_eval_batch_size
        # DeepSpeed requires a batch size even for inference; the training-only sections are dropped.
        for key in ("optimizer", "scheduler", "gradient_accumulation_steps", "train_batch_size"):
            ds.pop(key, None)
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["gradient_accumulation_steps"] = 1
        return ds
    micro, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", micro * accum * world,
          "per_device_train_batch_size x gradient_accumulation_steps x num_processes")
    _fill(ds, "gradient_clipping", config.max_grad_norm, "max_grad_norm")
    if "optimizer" in ds:
        _fill(ds, "optimizer.params.lr", config.learning_rate, "learning_rate")
        _fill(ds, "optimizer.params.betas", [config.adam_beta1, config.adam_beta2], "adam_beta1/adam_beta2")
        _fill(ds, "optimizer.params.eps", config.adam_epsilon, "adam_epsilon")
        _fill(ds, "optimizer.params.weight_decay", config.weight_decay, "weight_decay")
    if "scheduler" in ds:
        raise ConfigError("deepspeed: the ds_config 'scheduler' section is not used; set lr_scheduler_type, "
                          "warmup_ratio / warmup_steps in the pipeline config instead")
    # A client (torch) optimizer with ZeRO offload needs DeepSpeed's CPU-Adam check switched off.
    if "optimizer" not in ds and _offloads_optimizer(ds):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _fill_bucket_sizes(ds: dict, config) -> None:
    """``"auto"`` ZeRO bucket sizes from the model's hidden size h, by the HF Trainer's rule: reduce bucket h^2,
    ZeRO-3 prefetch bucket 0.9 h^2, ZeRO-3 persistence threshold 10 h (parameters smaller than that stay
    gathered: norm scales and biases, not matrices). Fixed sizes tuned for 7B models would make a small model's
    buckets a third of the model."""
    zero = ds.get("zero_optimization", {})
    autos = [key for key in BUCKET_SIZE_RULES if zero.get(key) == "auto"]
    if not autos:
        return
    from transformers import AutoConfig

    model_dir = resolve_model_dir(config)
    model_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    hidden = getattr(model_config, "hidden_size", None) or max(getattr(model_config, "hidden_sizes", None) or [0])
    if not hidden:
        raise ConfigError(f"deepspeed: {', '.join(autos)} are \"auto\" but {model_dir}/config.json has no "
                          f"hidden_size to derive them from; set them to numbers in the ds_config")
    for key in autos:
        zero[key] = BUCKET_SIZE_RULES[key](hidden)


def _offloads_optimizer(ds: dict) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
