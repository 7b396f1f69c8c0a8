"""The one typed config of the pipeline.

Field names follow TRL's ``DPOConfig`` (and the ``TrainingArguments`` it extends) so that a TRL user's YAML
carries over unchanged; the few pipeline-only fields (``num_processes``, ``launcher``, ``eval_steps`` ...)
sit at the end. Loading goes YAML -> dict -> ``key=value`` overrides -> pydantic validation, and every
refusal is a :class:`ConfigError` naming the field (with the closest valid key for a typo).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

# A relative model, dataset, deepspeed or hostfile path is taken from the working directory when it exists there,
# else from the repository root, so `dpo-pipeline ... --config configs/default.yaml` works from any directory.
# output_dir is always relative to the working directory (``output_path``).
REPO_ROOT = Path(__file__).resolve().parent.parent

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class DPOPipelineConfig(BaseModel):
    """Every knob of the pipeline. Defaults are TRL's unless a comment says why not."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- model and data (TRL script arguments) ---
    model_name_or_path: str = "models/tiny-llama"
    dataset_name: str = "data/preference"
    dataset_train_split: str = "train"
    dataset_test_split: str | None = "test"
    output_dir: str = "outputs/default"

    # --- tokenization / truncation ---
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    max_completion_length: int | None = None
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_end"

    # --- loss ---
    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    reference_free: bool = False
    use_weighting: bool = False
    ld_alpha: float | None = None
    discopop_tau: float = 0.05
    # TRL's IPO averages log-probs over completion tokens; the original DPO repo sums them (our default).
    ipo_length_normalized: bool = False

    # --- reference log-probs ---
    precompute_ref_batch_size: int | None = None

    # --- TR-DPO ---
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    # Where each rank keeps its slice of the reference between syncs: host memory (pinned on GPUs, no device
    # memory) or, with true, the device (syncs skip two host copies; costs 2-4 bytes/param / ranks of it).
    ref_slices_on_device: bool = False
    # Also write each reference version's consolidated weights to references/v<k>/ (an export for audits; the
    # checkpoints' per-rank slices are all a resume needs).
    save_reference_versions: bool = False

    # --- optimisation (TrainingArguments names) ---
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    deepspeed: str | None = None
    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    gradient_checkpointing: bool = False

    ddp_timeout: int = 1800  # seconds a collective may wait (TrainingArguments'; DeepSpeed's own default is 600)

    # --- model loading (TRL ModelConfig names) ---
    # null: transformers' default (SDPA), with the cuDNN SDPA backend switched off on CUDA (NaN gradients with a
    # padding mask on torch 2.13, huggingface/trl#7181); "eager", "sdpa", "flash_attention_2", ... as given.
    attn_implementation: str | None = None

    # --- pipeline-only ---
    # Where the model runs. auto: CUDA when present, else CPU; cuda: refuse to start without a GPU (a GPU job
    # must never fall back to CPU silently); cpu: never touch a GPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    num_processes: int = 1  # processes per node of a DeepSpeed job (CPU: gloo; GPU: one per device)
    # How `reference` / `train` start their ranks when num_processes > 1 or num_nodes > 1 (outside a launcher).
    # torchrun and deepspeed run here (one node, or this machine as node `node_rank` of `num_nodes`);
    # slurm submits the job with srun (see the slurm_* fields), from a login node or inside an allocation.
    launcher: Literal["torchrun", "deepspeed", "slurm"] = "torchrun"
    num_nodes: int = 1         # torchrun: nodes of the job; start the same command on each with its node_rank
    node_rank: int = 0         # torchrun: this machine's index among num_nodes
    rdzv_endpoint: str | None = None  # torchrun: host:port of node 0 (required with num_nodes > 1)
    hostfile: str | None = None       # deepspeed launcher: its hostfile (multi-node over pdsh/ssh)
    slurm_partition: str | None = None  # launcher slurm: srun --partition
    slurm_time: str | None = None       # launcher slurm: srun --time, e.g. "04:00:00"
    slurm_gpus_per_node: int | None = None  # launcher slurm: srun --gpus-per-node (null: CPU job)
    slurm_extra_args: list[str] = []    # launcher slurm: more srun arguments, e.g. ["--account=llm"]
    # The reference pass: ZeRO stage 0 (every rank holds the model, no gathers) when the model fits one device
    # with room to spare, ZeRO-3 (sharded, gathered per layer) when it does not; or force one.
    reference_zero_stage: Literal["auto", 0, 3] = "auto"
    # One run per output_dir (pipeline/lock.py). Another run holds it: wait (one line naming it, then block until
    # it ends) or fail at once with that line. Ranks under a launcher always wait.
    output_dir_lock: Literal["wait", "fail"] = "wait"

    # ------------------------------------------------------------------ validation
    @field_validator("beta")
    @classmethod
    def _beta_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("label_smoothing")
    @classmethod
    def _label_smoothing_range(cls, v: float) -> float:
        if not 0.0 <= v < 0.5:
            raise ValueError("must be in [0, 0.5)")
        return v

    @field_validator("f_divergence_type")
    @classmethod
    def _known_divergence(cls, v: str) -> str:
        if v not in F_DIVERGENCES:
            raise ValueError(f"must be one of {', '.join(F_DIVERGENCES)}")
        return v

    @field_validator("ref_model_mixup_alpha")
    @classmethod
    def _alpha_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator(
        "ref_model_sync_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "num_processes", "logging_steps", "num_nodes", "ddp_timeout",
    )
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("max_length", "max_prompt_length", "max_completion_length", "precompute_ref_batch_size",
                     "eval_steps", "save_steps")
    @classmethod
    def _positive_or_none(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0 (or null to disable)")
        return v

    @field_validator("learning_rate", "num_train_epochs")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DPOPipelineConfig:
        if self.max_length is not None:
            for name in ("max_prompt_length", "max_completion_length"):
                value = getattr(self, name)
                if value is not None and value >= self.max_length:
                    raise ValueError(f"{name} ({value}) must be < max_length ({self.max_length})")
        if self.sync_ref_model and self.reference_free:
            raise ValueError("sync_ref_model: TR-DPO updates a reference model, so it cannot be reference_free")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node_rank: must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}")
        if self.num_nodes > 1 and self.launcher == "torchrun" and not self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint: num_nodes > 1 with launcher torchrun needs node 0's host:port")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("num_train_epochs: set num_train_epochs > 0 or max_steps > 0")
        # Loss-specific checks (names, weights, ranges) live beside the losses: one home per concept.
        self.loss_spec()
        return self

    # ------------------------------------------------------------------ derived views
    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    def loss_spec(self):
        """The loss module's validated view of the loss fields: every :class:`LossSpec` field, by name."""
        from pipeline.loss_spec import LossSpec

        values = {f.name: getattr(self, f.name) for f in fields(LossSpec)}
        values["loss_type"] = self.loss_types
        return LossSpec(**values)

    def resolve_path(self, value: str | None) -> Path | None:
        """A config path as an absolute Path: as given if absolute or existing from the CWD, else repo-relative."""
        if value is None:
            return None
        path = Path(value).expanduser()
        if path.is_absolute() or path.exists():
            return path.resolve()
        return (REPO_ROOT / path).resolve()

    @property
    def output_path(self) -> Path:
        path = Path(self.output_dir).expanduser()
        return path.resolve() if path.is_absolute() else (Path.cwd() / path).resolve()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def subset(self, *names: str) -> dict[str, Any]:
        """The named fields as a plain dict: the explicit inputs of a stage's fingerprint."""
        return {name: getattr(self, name) for name in names}


FIELD_NAMES = tuple(DPOPipelineConfig.model_fields)


def _closest_key(key: str) -> str:
    match = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.0)
    return match[0] if match else FIELD_NAMES[0]


def _validation_message(err: ValidationError, source: str) -> str:
    problems = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{field}' (did you mean '{_closest_key(field)}'?)")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {message} (got {item.get('input')!r})" if item["loc"] else message)
    return f"invalid config {source}: " + "; ".join(problems)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML, so ``beta=0.2``, ``loss_type=[sigmoid,ipo]`` and
    ``max_completion_length=null`` all mean what they look like."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if key not in FIELD_NAMES:
        raise ConfigError(f"unknown key '{key}' in override '{text}' (did you mean '{_closest_key(key)}'?)")
    return key, yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> DPOPipelineConfig:
    """Read a YAML (or JSON) config, apply overrides and validate. Raises ConfigError naming the field."""
    values: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        values.update(parse_override(item) for item in overrides or [])
    try:
        return DPOPipelineConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source)) from None


def save_config(config: DPOPipelineConfig, path: Path) -> None:
    """Write the resolved config as YAML (what a launched stage subprocess reads back)."""
    from pipeline.artifacts import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


__all__ = ["DPOPipelineConfig", "FIELD_NAMES", "load_config", "parse_override", "save_config"]
