"""The ``ds_config`` and the optimizer and LR schedule around it, as a TRL / HF Trainer user writes them. No torch.

* **Where it comes from** (:func:`user_ds_config`): ``deepspeed`` (any standard DeepSpeed JSON), or
  ``accelerate_config`` (an ``accelerate launch --config_file`` YAML, or TRL's shipped names ``zero1``/``zero2``/
  ``zero3``), whose DeepSpeed settings become a ds_config as accelerate builds one: its ``deepspeed_config_file``,
  or one synthesised from ``zero_stage``, ``offload_*_device``, ``gradient_accumulation_steps``,
  ``gradient_clipping`` and ``zero3_save_16bit_model``. The plan hashes this dict, however it was given.
* **Checked when the config is loaded** (:func:`check_config`, from the config's validator, in every process, before
  any stage runs): files, JSON/YAML, optimizer and scheduler types and parameters, ``"auto"`` where the HF Trainer
  never fills it, fp16 without CUDA, values that disagree with the config; the ``optim``, ``lr_scheduler_type`` /
  ``lr_scheduler_kwargs`` and warmup fields. Each refusal is one line naming the file, the key and the fix.
* **Completed at stage time** (:func:`resolve_ds_config`): every ``"auto"`` value from the config, as the HF Trainer
  integration does; the few that need the model (ZeRO bucket sizes from its hidden size) or the run's number of
  optimizer steps (a ``scheduler`` section's) take them from the caller. A value set explicitly that disagrees
  with ours is an error, as it is in the HF Trainer.

Ownership of the optimizer and schedule is the HF Trainer's: a ds_config ``optimizer`` section wins over ``optim``,
a ``scheduler`` section over ``lr_scheduler_type`` (DeepSpeed then steps its own scheduler).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

# TRL's `accelerate_config: zero3` names a YAML shipped in trl/accelerate_configs; ours are the same settings.
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def load_ds_config(path: str | Path | None) -> dict[str, Any]:
    """The user's ds_config (any standard DeepSpeed JSON), or ZeRO stage 0 when none is given."""
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed: ds_config file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object (a DeepSpeed config), got {type(ds).__name__}")
    return ds


def user_ds_config(config) -> dict[str, Any]:
    """The ds_config as the user gave it, before any ``"auto"`` is filled: ``deepspeed``'s JSON, the one an
    ``accelerate_config`` gives, or ZeRO stage 0 (plain data parallel) when neither is set."""
    if config.deepspeed and config.accelerate_config:
        raise ConfigError(
            f"deepspeed ({config.deepspeed}) and accelerate_config ({config.accelerate_config}) are both "
            f"set; keep one (an accelerate config names its JSON with deepspeed_config_file)"
        )
    if config.accelerate_config:
        return _from_accelerate(config)
    return load_ds_config(config.resolve_path(config.deepspeed))


def _where(config) -> str:
    """The file a ds_config refusal names."""
    if config.accelerate_config:
        return f"accelerate_config: {_accelerate_path(config)}"
    return f"deepspeed: {config.resolve_path(config.deepspeed)}"


# ---------------------------------------------------------------------------------------------- accelerate
# accelerate's ClusterConfig fields (1.15): any other top-level key makes `accelerate launch` refuse the file.
ACCELERATE_KEYS = frozenset(
    {
        "command_file",
        "commands",
        "compute_environment",
        "debug",
        "deepspeed_config",
        "distributed_type",
        "downcast_bf16",
        "dynamo_config",
        "enable_cpu_affinity",
        "fp8_config",
        "fsdp_config",
        "gpu_ids",
        "machine_rank",
        "main_process_ip",
        "main_process_port",
        "main_training_function",
        "megatron_lm_config",
        "mixed_precision",
        "mpirun_config",
        "num_machines",
        "num_processes",
        "parallelism_config",
        "rdzv_backend",
        "same_network",
        "tpu_env",
        "tpu_name",
        "tpu_use_cluster",
        "tpu_use_sudo",
        "tpu_vm",
        "tpu_zone",
        "use_cpu",
    }
)
# deepspeed_config keys that become the ds_config; the launch ones (hostfile, multinode launcher, filters) and
# zero3_init_flag (a ZeRO-3 model is always loaded partitioned here) have nothing to set in it.
_ACCELERATE_DS_SETTINGS = (
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_optimizer_nvme_path",
    "offload_param_nvme_path",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero3_save_16bit_model",
)
_ACCELERATE_DS_KEYS = frozenset(
    {
        *_ACCELERATE_DS_SETTINGS,
        "deepspeed_config_file",
        "zero3_init_flag",
        "deepspeed_hostfile",
        "deepspeed_multinode_launcher",
        "deepspeed_inclusion_filter",
        "deepspeed_exclusion_filter",
    }
)
_TRL_NOT_DEEPSPEED = {"fsdp1": "FSDP", "fsdp2": "FSDP", "multi_gpu": "MULTI_GPU"}


def _accelerate_path(config) -> Path:
    """``accelerate_config`` as a file: a path when one exists there (TRL's rule), else TRL's shipped name."""
    value = config.accelerate_config
    path = config.resolve_path(value)
    if path.is_file():
        return path
    shipped = ACCELERATE_CONFIGS / f"{value}.yaml"
    if shipped.is_file():
        return shipped
    if value in _TRL_NOT_DEEPSPEED:
        raise ConfigError(
            f"accelerate_config: TRL's '{value}' is a {_TRL_NOT_DEEPSPEED[value]} config; this "
            f"pipeline runs DeepSpeed: use zero1 / zero2 / zero3, or a ds_config (deepspeed: "
            f"configs/ds_zero3.json)"
        )
    names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"accelerate_config: {path} not found, and '{value}' is not one of TRL's shipped names ({names})")


def _from_accelerate(config) -> dict[str, Any]:
    """The ds_config accelerate's ``DeepSpeedPlugin`` makes of a YAML, then its ``mixed_precision`` applied."""
    path = _accelerate_path(config)
    where = f"accelerate_config: {path}"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping (an accelerate config), got {type(raw).__name__}")
    for key in raw:
        if key not in ACCELERATE_KEYS:
            raise ConfigError(
                f"{where}: unknown key '{key}' (accelerate refuses it too; did you mean "
                f"'{_closest(key, ACCELERATE_KEYS)}'?)"
            )
    kind = raw.get("distributed_type")
    if kind == "FSDP":
        raise ConfigError(
            f"{where}: distributed_type: FSDP; this pipeline shards with DeepSpeed ZeRO: set deepspeed: "
            f"configs/ds_zero3.json (FULL_SHARD's equivalent; ds_zero2.json for SHARD_GRAD_OP) and drop "
            f"accelerate_config"
        )
    if kind != "DEEPSPEED":
        raise ConfigError(
            f"{where}: distributed_type: {kind}; only DEEPSPEED configs are read: drop accelerate_config "
            f"for plain data parallel (ZeRO stage 0, num_processes: N), or use zero1 / zero2 / zero3"
        )
    settings = raw.get("deepspeed_config") or {}
    for key in settings:
        if key not in _ACCELERATE_DS_KEYS:
            raise ConfigError(
                f"{where}: deepspeed_config.{key} is not read here (accelerate's keys: "
                f"{', '.join(sorted(_ACCELERATE_DS_KEYS))}); remove it"
            )
    if settings.get("deepspeed_config_file"):
        ds = _accelerate_with_file(config, settings, where)
    else:
        ds = _accelerate_synthesised(settings, where)
    _accelerate_mixed_precision(ds, raw.get("mixed_precision"), config, where)
    return ds


def _accelerate_with_file(config, settings: dict, where: str) -> dict[str, Any]:
    """accelerate with ``deepspeed_config_file``: that JSON; its ``"auto"`` ZeRO settings take the plugin's defaults."""
    clash = [key for key in settings if key in _ACCELERATE_DS_SETTINGS]
    if clash:
        raise ConfigError(
            f"{where}: deepspeed_config sets {', '.join(clash)} beside deepspeed_config_file; accelerate "
            f"refuses that (they would be ignored): set them in the JSON instead"
        )
    ds = load_ds_config(config.resolve_path(settings["deepspeed_config_file"]))
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        raise ConfigError(
            f"{where}: its deepspeed_config_file has no zero_optimization section, which accelerate "
            f'requires; add one (e.g. {{"stage": 2}})'
        )
    defaults = {"stage": 2, "stage3_gather_16bit_weights_on_model_save": False}
    for key, value in defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict) and zero[section].get("device") == "auto":
            zero[section]["device"] = "none"
    return ds


def _accelerate_synthesised(settings: dict, where: str) -> dict[str, Any]:
    """accelerate without a JSON: the ds_config ``DeepSpeedPlugin`` synthesises (no optimizer or scheduler section,
    so ``optim`` and ``lr_scheduler_type`` apply, as under the HF Trainer)."""
    stage = settings.get("zero_stage", 2)  # the plugin's default
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: deepspeed_config.zero_stage must be 0, 1, 2 or 3, got {stage!r}")
    zero: dict[str, Any] = {"stage": stage}
    for part in ("optimizer", "param"):
        device = str(settings.get(f"offload_{part}_device", "none"))
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(
                f"{where}: deepspeed_config.offload_{part}_device must be none, cpu or nvme, got {device!r}"
            )
        zero[f"offload_{part}"] = {"device": device}
        if device == "nvme":
            zero[f"offload_{part}"]["nvme_path"] = settings.get(f"offload_{part}_nvme_path")
    zero["stage3_gather_16bit_weights_on_model_save"] = bool(settings.get("zero3_save_16bit_model", False))
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": settings.get("gradient_accumulation_steps", "auto"),
        "gradient_clipping": settings.get("gradient_clipping") or "auto",
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,  # accelerate's `inf`, which JSON cannot hold: DeepSpeed never prints
    }


def _accelerate_mixed_precision(ds: dict, mixed_precision, config, where: str) -> None:
    """The YAML's ``mixed_precision`` must agree with ``bf16`` (under TRL the two are one setting); it adds the
    dtype sections accelerate adds, and refuses a JSON that enables the other dtype, as accelerate does."""
    if mixed_precision is None:
        return  # accelerate's default: the trainer's bf16 decides
    mode = "no" if mixed_precision is False else str(mixed_precision)  # YAML reads an unquoted `no` as false
    if mode not in ("no", "bf16", "fp16"):
        raise ConfigError(f"{where}: mixed_precision: {mode} is not supported here; use bf16 (bf16: true) or 'no'")
    if (mode == "bf16") != bool(config.bf16):
        raise ConfigError(
            f"{where}: mixed_precision: {mode} but the config has bf16: "
            f"{str(bool(config.bf16)).lower()}; make them agree (bf16: true with mixed_precision: "
            f"bf16, bf16: false with 'no')"
        )
    if mode == "no":
        return
    other = "fp16" if mode == "bf16" else "bf16"
    if ds.get(other, {}).get("enabled") is True:
        raise ConfigError(f"{where}: mixed_precision: {mode} but its ds_config enables {other}; disable one")
    ds.setdefault(mode, {"enabled": True, "auto_cast": True} if mode == "fp16" else {"enabled": True})
    ds.setdefault(other, {"enabled": False})


# ---------------------------------------------------------------------------------------------- optimizer, schedule
# TrainingArguments' optimizer names (transformers 5.23 OptimizerNames) the training recipe builds, as the HF Trainer
# does (pipeline/train/stage.py); every other one is refused with its reason.
OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")
_ZERO_STATES = (
    "ZeRO partitions optimizer states across ranks already (ZeRO-1/2/3 in a ds_config, with "
    "offload_optimizer to cpu/nvme for more)"
)
_REFUSED_OPTIMS = {
    **dict.fromkeys(
        ("adamw_torch_xla", "adamw_torch_npu_fused"),
        "runs on TPU (torch_xla) / Ascend NPU devices, which DeepSpeed jobs here do not: use adamw_torch_fused",
    ),
    "adamw_anyprecision": "needs torchdistx's AnyPrecisionAdamW: use adamw_torch_fused with bf16: true",
    **dict.fromkeys(
        ("adamw_torch_4bit", "adamw_torch_8bit"), f"keeps torchao low-bit states; {_ZERO_STATES}: use adamw_torch_fused"
    ),
    **dict.fromkeys(
        (
            "adamw_bnb_8bit",
            "adamw_8bit",
            "ademamix",
            "ademamix_8bit",
            "lion_8bit",
            "lion_32bit",
            "paged_adamw_32bit",
            "paged_adamw_8bit",
            "paged_ademamix_32bit",
            "paged_ademamix_8bit",
            "paged_lion_32bit",
            "paged_lion_8bit",
            "rmsprop_bnb",
            "rmsprop_bnb_8bit",
            "rmsprop_bnb_32bit",
        ),
        f"is a bitsandbytes optimizer (quantized or paged states, not installed here); {_ZERO_STATES}: "
        f'use adamw_torch_fused (or rmsprop), or a ds_config optimizer section ({{"type": "Lion"}} '
        f"for Lion)",
    ),
    **dict.fromkeys(
        (
            "galore_adamw",
            "galore_adamw_8bit",
            "galore_adafactor",
            "galore_adamw_layerwise",
            "galore_adamw_8bit_layerwise",
            "galore_adafactor_layerwise",
            "apollo_adamw",
            "apollo_adamw_layerwise",
        ),
        "projects each weight matrix's gradient, which needs whole matrices, "
        "not ZeRO's flat partitions: use adamw_torch_fused with ZeRO-3 (+ offload) for the memory",
    ),
    **dict.fromkeys(
        ("lomo", "adalomo"),
        "updates weights inside the backward pass instead of DeepSpeed's step: use adamw_torch_fused or sgd",
    ),
    **dict.fromkeys(
        ("grokadamw", "stable_adamw"), "needs a third-party package not installed here: use adamw_torch_fused"
    ),
    **dict.fromkeys(
        ("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"),
        "needs the optimizer "
        "switched between train and eval modes and no LR schedule, which the recipe does not do: use "
        "adamw_torch_fused with lr_scheduler_type constant_with_warmup",
    ),
}

# transformers 5.23 SchedulerType names that run without eval metrics, with the scheduler_specific_kwargs
# (lr_scheduler_kwargs) each function accepts; "required" lists those it cannot do without.
LR_SCHEDULERS: dict[str, dict[str, tuple[str, ...]]] = {
    "linear": {"accepts": ()},
    "cosine": {"accepts": ("num_cycles",)},
    "cosine_with_restarts": {"accepts": ("num_cycles",)},
    "polynomial": {"accepts": ("lr_end", "power")},
    "constant": {"accepts": ()},
    "constant_with_warmup": {"accepts": ()},
    "inverse_sqrt": {"accepts": ("timescale",)},
    "cosine_with_min_lr": {"accepts": ("num_cycles", "min_lr", "min_lr_rate")},
    "cosine_warmup_with_min_lr": {"accepts": ("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate")},
    "warmup_stable_decay": {
        "accepts": ("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"),
        "required": ("num_decay_steps",),
    },
}
_NEEDS_METRICS = ("reduce_lr_on_plateau", "greedy")


def check_optim(name: str) -> None:
    """``optim``: one of :data:`OPTIMS`; any other TrainingArguments name is refused with its reason."""
    if name in OPTIMS:
        return
    if name in _REFUSED_OPTIMS:
        raise ConfigError(f"'{name}' {_REFUSED_OPTIMS[name]}")
    raise ConfigError(f"unknown optimizer; one of {', '.join(OPTIMS)} (did you mean '{_closest(name, OPTIMS)}'?)")


def check_lr_scheduler_type(name: str) -> None:
    """``lr_scheduler_type``: a transformers schedule that needs no metrics (:data:`LR_SCHEDULERS`)."""
    if name in LR_SCHEDULERS:
        return
    if name in _NEEDS_METRICS:
        raise ConfigError(
            f"'{name}' steps on evaluation metrics, which the recipe does not feed its schedule; use "
            f"cosine, cosine_with_min_lr or constant_with_warmup"
        )
    raise ConfigError(
        f"unknown schedule; one of {', '.join(LR_SCHEDULERS)} (did you mean '{_closest(name, LR_SCHEDULERS)}'?)"
    )


def num_warmup_steps(config, num_training_steps: int) -> int:
    """Warmup steps as transformers >= 5.15 counts them: ``warmup_steps`` >= 1 is a count, below 1 a ratio of the
    steps (rounded up); ``warmup_ratio`` (TrainingArguments before 5.15) is honoured the same way."""
    ratio = config.warmup_steps if 0 < config.warmup_steps < 1 else config.warmup_ratio
    return int(config.warmup_steps) if config.warmup_steps >= 1 else math.ceil(num_training_steps * ratio)


def _check_schedule(config) -> None:
    if config.warmup_steps and config.warmup_ratio:
        raise ConfigError(
            f"warmup_steps ({config.warmup_steps}) and warmup_ratio ({config.warmup_ratio}) are both "
            f"set; keep one (warmup_steps below 1 is a ratio of the steps, as in transformers >= 5.15)"
        )
    spec, kwargs = LR_SCHEDULERS[config.lr_scheduler_type], config.lr_scheduler_kwargs
    for key in kwargs:
        if key not in spec["accepts"]:
            accepted = ", ".join(spec["accepts"]) or "none"
            raise ConfigError(
                f"lr_scheduler_kwargs: {config.lr_scheduler_type} takes no '{key}' (it accepts: "
                f"{accepted}); remove it or change lr_scheduler_type"
            )
    for key in spec.get("required", ()):
        if key not in kwargs:
            raise ConfigError(
                f"lr_scheduler_kwargs: {config.lr_scheduler_type} needs '{key}', e.g. "
                f"lr_scheduler_kwargs: {{{key}: 100}}"
            )
    if "min_lr" in spec["accepts"] and ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
        raise ConfigError(
            f"lr_scheduler_kwargs: {config.lr_scheduler_type} needs exactly one of min_lr and "
            f"min_lr_rate, e.g. {{min_lr_rate: 0.1}}"
        )
    if "lr_end" in kwargs and kwargs["lr_end"] >= config.learning_rate:  # transformers refuses it at the first step
        raise ConfigError(
            f"lr_scheduler_kwargs: lr_end ({kwargs['lr_end']}) must be below learning_rate ({config.learning_rate})"
        )
    for key in ("warmup_type", "decay_type"):
        if key in kwargs and kwargs[key] not in ("linear", "cosine", "1-sqrt"):
            raise ConfigError(f"lr_scheduler_kwargs: {key} must be linear, cosine or 1-sqrt, got {kwargs[key]!r}")


# DeepSpeed's own optimizer names (0.19.8, matched case-insensitively); any other type is looked up in torch.optim.
_DS_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")
_TORCH_OPTIMIZERS = (
    "ASGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "LBFGS",
    "Muon",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
    "SparseAdam",
)  # torch 2.13
_REQUIRED = object()
# DeepSpeed's schedulers (deepspeed.runtime.lr_schedules, 0.19.8): each one's parameters and defaults.
_WARMUP = {"warmup_num_steps": 1000, "warmup_type": "log", "last_batch_iteration": -1}
DS_SCHEDULERS: dict[str, dict[str, Any]] = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None, **_WARMUP},
    "WarmupDecayLR": {"total_num_steps": _REQUIRED, "warmup_min_lr": 0.0, "warmup_max_lr": 0.001, **_WARMUP},
    "WarmupCosineLR": {"total_num_steps": _REQUIRED, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0001, **_WARMUP},
    "OneCycle": {
        "cycle_min_lr": _REQUIRED,
        "cycle_max_lr": _REQUIRED,
        "decay_lr_rate": 0.0,
        "cycle_first_step_size": 2000,
        "cycle_second_step_size": None,
        "cycle_first_stair_count": 0,
        "cycle_second_stair_count": None,
        "decay_step_size": 0,
        "cycle_momentum": True,
        "cycle_min_mom": 0.8,
        "cycle_max_mom": 0.9,
        "decay_mom_rate": 0.0,
        "last_batch_iteration": -1,
    },
    "LRRangeTest": {
        "lr_range_test_min_lr": 0.001,
        "lr_range_test_step_size": 2000,
        "lr_range_test_step_rate": 1.0,
        "lr_range_test_staircase": False,
        "last_batch_iteration": -1,
    },
}
# Every "auto" the HF Trainer fills (and so this pipeline): any other "auto" would reach DeepSpeed as a string.
FILLED_AUTO = frozenset(
    {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "bf16.enabled",
        "fp16.enabled",
        "zero_optimization.overlap_comm",
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
        "optimizer.params.lr",
        "optimizer.params.betas",
        "optimizer.params.eps",
        "optimizer.params.weight_decay",
        "scheduler.params.warmup_min_lr",
        "scheduler.params.warmup_max_lr",
        "scheduler.params.warmup_num_steps",
        "scheduler.params.total_num_steps",
    }
)


def check_config(config) -> None:
    """Everything about the optimizer, the schedule and the ds_config that the config alone decides; run when the
    config is loaded. The checks that need the model or the step count run in :func:`resolve_ds_config`."""
    _check_schedule(config)
    ds = user_ds_config(config)
    where = _where(config)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if (config.load_in_4bit or config.load_in_8bit) and _no_cuda_for_jobs(config):
        raise ConfigError(qlora_needs_cuda(config))
    if stage == 3 and (config.load_in_4bit or config.load_in_8bit):
        raise ConfigError(
            f"{where}: ZeRO-3 cannot partition bitsandbytes' quantised weights (load_in_4bit / load_in_8bit); use "
            f"a ZeRO 0-2 ds_config (e.g. configs/ds_zero2.json) for QLoRA, or bf16 LoRA under ZeRO-3"
        )
    if "optimizer" in ds:
        _check_optimizer_section(ds["optimizer"], where)
    if "scheduler" in ds:
        _check_scheduler_section(ds["scheduler"], where)
    if _adagrad_under_zero(ds, config):
        raise ConfigError(
            f"{where}: Adagrad under ZeRO stage {stage}: DeepSpeed replaces it with a new Adagrad over "
            f"its partitions, in one parameter group, which the LR schedule no longer reaches (nor the "
            f"no-decay group); use ZeRO stage 0 (no ds_config) for Adagrad, or another optim"
        )
    unfilled = [path for path in _auto_paths(ds) if path not in FILLED_AUTO]
    if unfilled:
        raise ConfigError(
            f'{where}: {unfilled[0]} is "auto", which the HF Trainer never fills (nor does this pipeline); set a value'
        )
    fp16, bf16 = (ds.get(name, {}).get("enabled") is True for name in ("fp16", "bf16"))
    if fp16 and bf16:
        raise ConfigError(f"{where}: fp16.enabled and bf16.enabled are both true; enable one")
    if fp16 and _no_cuda_for_jobs(config):
        raise ConfigError(
            f"{where}: fp16.enabled is true but the stage jobs run without CUDA here (device: "
            f"{config.device}), and DeepSpeed has no fp16 on CPU; set fp16.enabled to false (or "
            f'"auto") and use bf16: true, or fp32'
        )
    _fill_from_config(copy.deepcopy(ds), config, where)  # explicit values that disagree with the config


def _adagrad_under_zero(ds: dict, config) -> bool:
    """Whether DeepSpeed would swap the run's Adagrad for a new one over its flat partitions (ZeRO 1-3 do,
    deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, 0.19.8): one parameter group (a step with the HF
    Trainer's two groups fails) that the LR schedule, built on the original, never updates."""
    section = ds.get("optimizer")
    kind = str(section.get("type", "")).lower() if section else config.optim
    return kind == "adagrad" and zero_stage(ds) >= 1


def qlora_needs_cuda(config) -> str:
    """Why a quantised base is refused without CUDA. bitsandbytes 0.50.2 loads and runs 4-bit weights on CPU, but
    there its kernels did not reproduce the dequantised base (measured on the tiny model: logits 0.6 % off, LoRA
    gradients 1.4 % off, a reference pass and a training forward of the same examples disagreeing at step 0), so
    neither the cached reference nor the gradients could be trusted. QLoRA is a CUDA path."""
    key = "load_in_4bit" if config.load_in_4bit else "load_in_8bit"
    return (
        f"{key}: QLoRA needs a CUDA GPU (bitsandbytes' CPU kernels do not reproduce the dequantised base, so the "
        f"cached reference and the gradients would be off) and the jobs run on CPU here (device: {config.device}); "
        f"set {key}: false (LoRA on the bf16/fp32 base) or run on GPUs"
    )


def _no_cuda_for_jobs(config) -> bool:
    """Whether the stage jobs surely run without CUDA: ``device: cpu``, or jobs on this machine (every launcher
    but slurm, which runs them elsewhere) and no GPU device files here. Torch is not imported to ask."""
    if config.device == "cpu":
        return True
    return config.launcher != "slurm" and not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/kfd"))


def _check_optimizer_section(section: dict, where: str) -> None:
    kind = section.get("type")
    if not isinstance(kind, str) or (kind.lower() not in _DS_OPTIMIZERS and kind not in _TORCH_OPTIMIZERS):
        known = ("Adam", "AdamW", "Adagrad", "Lamb", "Lion", "Muon", *_TORCH_OPTIMIZERS)
        raise ConfigError(
            f"{where}: optimizer.type {kind!r} is not an optimizer DeepSpeed knows (did you mean "
            f"'{_closest(str(kind), known)}'?); fix it, or drop the section to use the config's optim"
        )
    if "max_grad_norm" in section.get("params", {}):
        raise ConfigError(
            f"{where}: optimizer.params.max_grad_norm is refused by DeepSpeed; remove it and set "
            f'gradient_clipping ("auto": the config\'s max_grad_norm)'
        )


def _check_scheduler_section(section: dict, where: str) -> None:
    kind = section.get("type")
    if kind not in DS_SCHEDULERS:
        raise ConfigError(
            f"{where}: scheduler.type {kind!r} is not one of DeepSpeed's schedulers "
            f"({', '.join(DS_SCHEDULERS)}); fix it, or drop the section and set lr_scheduler_type "
            f"(transformers' schedules)"
        )
    accepted = DS_SCHEDULERS[kind]
    params = section.get("params", {})
    for key, value in params.items():
        if key not in accepted:
            hint = (
                " (it scales the optimizer's lr by ratios: use warmup_min_ratio / cos_min_ratio)"
                if kind == "WarmupCosineLR" and key in ("warmup_min_lr", "warmup_max_lr")
                else ""
            )
            raise ConfigError(
                f"{where}: scheduler.params.{key}: {kind} takes no such parameter{hint}; remove it "
                f"({kind} accepts {', '.join(accepted)})"
            )
        if value == "auto" and f"scheduler.params.{key}" not in FILLED_AUTO:
            default = "none: it is required" if accepted[key] is _REQUIRED else repr(accepted[key])
            raise ConfigError(
                f'{where}: scheduler.params.{key} is "auto", which the HF Trainer never fills (nor '
                f"does this pipeline); set a value (DeepSpeed's default: {default})"
            )
    for key, default in accepted.items():
        if default is _REQUIRED and key not in params:
            hint = ' ("auto": the run\'s number of optimizer steps)' if key == "total_num_steps" else ""
            raise ConfigError(f"{where}: scheduler.params.{key} is required by {kind}; add it{hint}")
    steps = params.get("warmup_num_steps", "auto")
    if steps != "auto" and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
        raise ConfigError(
            f"{where}: scheduler.params.warmup_num_steps must be a positive integer (DeepSpeed refuses "
            f'{steps!r}); set one, or "auto" (warmup_steps / warmup_ratio)'
        )
    if params.get("warmup_type", "log") not in ("log", "linear"):
        raise ConfigError(f"{where}: scheduler.params.warmup_type must be log or linear, got {params['warmup_type']!r}")


def _auto_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        if value == "auto":
            paths.append(prefix + key)
        elif isinstance(value, dict):
            paths += _auto_paths(value, f"{prefix}{key}.")
    return paths


def _closest(name: str, choices) -> str:
    return (difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0) or [""])[0]


# ---------------------------------------------------------------------------------------------- "auto" values
def _fill(ds: dict, dotted: str, value: Any, source: str, where: str, *, required: bool = True) -> None:
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
    elif current != value and not (
        isinstance(value, float) and isinstance(current, int | float) and abs(current - value) <= 1e-12 * abs(value)
    ):
        raise ConfigError(
            f"{where}: sets {dotted}={current!r} but the config's {source} gives {value!r}; set it to "
            f'"auto" or make them agree'
        )


def _fill_from_config(ds: dict, config, where: str) -> None:
    """The ``"auto"`` values the config alone gives (the HF Trainer's ``trainer_config_process``), and the check
    that explicit ones agree with it; the batch total (it needs the world size) is the caller's."""
    if ds.get("fp16", {}).get("enabled") == "auto":
        ds["fp16"]["enabled"] = False  # the HF Trainer's `fp16`, which this config does not have
    _fill(ds, "bf16.enabled", bool(config.bf16), "bf16", where)
    _fill(
        ds, "train_micro_batch_size_per_gpu", config.per_device_train_batch_size, "per_device_train_batch_size", where
    )
    _fill(ds, "gradient_accumulation_steps", config.gradient_accumulation_steps, "gradient_accumulation_steps", where)
    _fill(ds, "gradient_clipping", config.max_grad_norm, "max_grad_norm", where)
    if "optimizer" in ds:
        _fill(ds, "optimizer.params.lr", config.learning_rate, "learning_rate", where)
        _fill(ds, "optimizer.params.betas", [config.adam_beta1, config.adam_beta2], "adam_beta1/adam_beta2", where)
        _fill(ds, "optimizer.params.eps", config.adam_epsilon, "adam_epsilon", where)
        _fill(ds, "optimizer.params.weight_decay", config.weight_decay, "weight_decay", where)
    if "scheduler" in ds:
        params = ds["scheduler"].setdefault("params", {})
        if params.get("warmup_min_lr") == "auto":
            params["warmup_min_lr"] = 0.0  # not a Trainer argument: filled, never compared
        _fill(ds, "scheduler.params.warmup_max_lr", config.learning_rate, "learning_rate", where, required=False)


# zero_optimization keys the HF Trainer fills from the hidden size h when "auto".
BUCKET_SIZE_RULES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def model_hidden_size(model_dir: str | Path) -> int | None:
    """The hidden size the HF Trainer sizes ZeRO buckets by, from the model's ``config.json`` (no transformers):
    ``hidden_size``, else the largest of ``hidden_sizes``, else its ``text_config``'s (multimodal models)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    model_config = json.loads(path.read_text())
    for node in (model_config, model_config.get("text_config") or {}):
        if node.get("hidden_size"):
            return int(node["hidden_size"])
        if node.get("hidden_sizes"):
            return int(max(node["hidden_sizes"]))
    return None


def resolve_ds_config(
    config,
    *,
    world: int,
    gpu: bool,
    hidden_size: int | None,
    num_training_steps: int | None = None,
    inference: bool = False,
) -> dict[str, Any]:
    """The ds_config a DeepSpeed engine gets: every ``"auto"`` filled from ``config``, explicit values checked.

    Training: micro batch, gradient accumulation, global batch, clipping, bf16, ZeRO bucket sizes (from
    ``hidden_size``, :func:`model_hidden_size`), the optimizer section's lr/betas/eps/weight_decay, and the
    scheduler section's warmup_min_lr (0), warmup_max_lr (learning_rate), warmup_num_steps (at least 1, from
    warmup_steps / warmup_ratio) and total_num_steps (``num_training_steps``, the run's optimizer steps).
    Inference (the reference pass): batch size = ``precompute_ref_batch_size`` and no optimizer or scheduler."""
    where = _where(config)
    ds = user_ds_config(config)
    if ds.get("fp16", {}).get("enabled") is True and not gpu:
        raise ConfigError(f"{where}: fp16 is not supported on CPU; use bf16 or fp32")
    if inference:
        # DeepSpeed requires a batch size even for inference; the training-only sections are dropped.
        for key in (
            "optimizer",
            "scheduler",
            "gradient_accumulation_steps",
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
        ):
            ds.pop(key, None)
    _fill_from_config(ds, config, where)
    _fill_bucket_sizes(ds, hidden_size, config, where)
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        # On GPUs the gradient reduce-scatter runs on its own stream beside the backward (5-10 % of a ZeRO-2/3
        # step on one node, more across nodes); on CPU there are no streams to overlap on.
        zero["overlap_comm"] = gpu
    if inference:
        ds["train_micro_batch_size_per_gpu"] = config.precompute_ref_batch_size or config.per_device_eval_batch_size
        ds["gradient_accumulation_steps"] = 1
        return ds
    micro, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    _fill(
        ds,
        "train_batch_size",
        micro * accum * world,
        "per_device_train_batch_size x gradient_accumulation_steps x num_processes",
        where,
    )
    if "scheduler" in ds:
        if num_training_steps is None:
            raise ValueError("resolve_ds_config: a scheduler section needs num_training_steps")
        _fill(
            ds,
            "scheduler.params.total_num_steps",
            num_training_steps,
            "number of optimizer steps",
            where,
            required=False,
        )
        _fill(
            ds,
            "scheduler.params.warmup_num_steps",
            max(1, num_warmup_steps(config, num_training_steps)),
            "warmup_steps / warmup_ratio (at least 1, as DeepSpeed requires)",
            where,
            required=False,
        )
    if "optimizer" not in ds:
        # The recipe's own (torch) optimizer: DeepSpeed tests ZeRO with Adam(W) and Adagrad only; the HF Trainer
        # allows the others the same way. With ZeRO offload it also needs the CPU-Adam check switched off.
        ds.setdefault("zero_allow_untested_optimizer", True)
        if _offloads_optimizer(ds):
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _fill_bucket_sizes(ds: dict, hidden: int | None, config, where: str) -> None:
    """``"auto"`` ZeRO bucket sizes from the model's hidden size h, by the HF Trainer's rule: reduce bucket h^2,
    ZeRO-3 prefetch bucket 0.9 h^2, ZeRO-3 persistence threshold 10 h (parameters smaller than that stay
    gathered: norm scales and biases, not matrices). Fixed sizes tuned for 7B models would make a small model's
    buckets a third of the model."""
    zero = ds.get("zero_optimization", {})
    autos = [key for key in BUCKET_SIZE_RULES if zero.get(key) == "auto"]
    if not autos:
        return
    if not hidden:
        raise ConfigError(
            f'{where}: {", ".join(autos)} are "auto" but the config.json of '
            f"{config.model_name_or_path} has no hidden_size to derive them from; set them to numbers "
            f"in the ds_config"
        )
    for key in autos:
        zero[key] = BUCKET_SIZE_RULES[key](hidden)


def _offloads_optimizer(ds: dict) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
