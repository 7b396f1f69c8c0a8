"""DeepSpeed process setup and ``ds_config`` handling, shared by the reference pass and training.

* :func:`init_distributed` makes one code path serve 1 process without a launcher, N processes under
  ``torchrun`` / the ``deepspeed`` launcher, CPU (gloo) and GPU (nccl). On CPU it disables DeepSpeed's
  shared-memory comm op: it JIT-compiles for ~40 s and its fp32 all-reduce segfaults on AVX2-only machines.
* :func:`resolve_ds_config` reads any standard ``ds_config.json`` and fills every ``"auto"`` value from our
  config (as the HF Trainer integration does); a value set explicitly that disagrees with ours is an error.
  The size-dependent ZeRO buckets take the HF Trainer's values from the model's hidden size, so the ZeRO-3
  config of the transformers docs carries over unchanged.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError

NO_LAUNCHER = "DPO_PIPELINE_NO_LAUNCHER"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def prepare_environment() -> None:
    """Environment every DeepSpeed process needs; safe to call more than once, before importing deepspeed."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Single process without a launcher: DeepSpeed would otherwise look for MPI to discover its rank. The
    # marker tells these made-up variables from a launcher's (see under_launcher).
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()), **{NO_LAUNCHER: "1"})


def under_launcher() -> bool:
    """True in a rank started by torchrun or the deepspeed launcher (not in a plain single process)."""
    return "LOCAL_RANK" in os.environ and NO_LAUNCHER not in os.environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Start (once) the process group: gloo on CPU, nccl on GPU, with the device set from LOCAL_RANK."""
    prepare_environment()
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    if on_gpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # importlib, not `import deepspeed.comm.torch as m`: that name resolves to the `torch` package.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu() else torch.device("cpu")


def barrier() -> None:
    import deepspeed

    if deepspeed.comm.is_initialized() and world_size() > 1:
        deepspeed.comm.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (gloo and nccl alike)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# ------------------------------------------------------------------------------------------------ ds_config
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


def resolve_ds_config(config, *, world: int, inference: bool = False) -> dict[str, Any]:
    """Fill ``"auto"`` values from ``config`` and check the explicit ones agree with it.

    Training: micro batch, gradient accumulation, global batch, clipping, bf16, ZeRO bucket sizes, and the
    optimizer's lr/betas/eps/weight_decay when the ds_config names an optimizer (else the recipe passes torch
    AdamW).
    Inference (the reference pass): batch size = ``precompute_ref_batch_size`` and no optimizer."""
    ds = copy.deepcopy(load_ds_config(config.resolve_path(config.deepspeed)))
    if ds.get("fp16", {}).get("enabled") in (True, "auto") and not on_gpu():
        if ds["fp16"]["enabled"] is True:
            raise ConfigError("deepspeed: fp16 is not supported on CPU; use bf16 or fp32")
        ds["fp16"]["enabled"] = False
    _fill(ds, "bf16.enabled", bool(config.bf16), "bf16")
    _fill_bucket_sizes(ds, config)
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

    model_dir = config.model_dir()
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
