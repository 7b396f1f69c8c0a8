"""The one typed config of the pipeline.

Field names follow TRL's ``DPOConfig`` (and the ``TrainingArguments`` it extends) so that a TRL user's YAML
carries over unchanged; the few pipeline-only fields (``num_processes``, ``launcher``, ``eval_steps`` ...)
sit at the end. Loading goes YAML -> dict -> ``key=value`` overrides -> pydantic validation, and every
refusal is a :class:`ConfigError` naming the field (with the closest valid key for a typo).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, TextIO, overload

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.ds_config import check_config, check_lr_scheduler_type, check_optim
from pipeline.errors import ConfigError
from pipeline.layout import layout_error

# A relative model, dataset, deepspeed or hostfile path is taken from the working directory when it exists there,
# else from the repository root, so `dpo-pipeline ... --config configs/default.yaml` works from any directory.
# output_dir is always relative to the working directory (``output_path``).
REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # what report_to can name (pipeline/trackers.py), besides all / none


class MixtureDataset(BaseModel):
    """One dataset of a ``dataset_mixture`` (alignment-handbook's ``DatasetConfig``)."""

    model_config = ConfigDict(extra="forbid")

    id: str  # a local path or a Hub id
    config: str | None = None  # the Hub dataset's configuration
    split: str = "train"
    columns: list[str] | None = None  # the columns kept (null: all)
    weight: float = 1.0  # the fraction of its rows kept, in (0, 1]


class DatasetMixture(BaseModel):
    """alignment-handbook's ``DatasetMixtureConfig``."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[MixtureDataset]
    seed: int = 0
    test_split_size: float | None = None  # rows held out for eval: a count, or a fraction of the mixture below 1


class DPOPipelineConfig(BaseModel):
    """Every knob of the pipeline. Defaults are TRL's unless a comment says why not."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- model and data (TRL script arguments) ---
    model_name_or_path: str = "models/tiny-llama"  # a local model directory or a Hub id (policy start, reference)
    dataset_name: str | None = "data/preference"  # null when dataset_mixture names the data
    dataset_config: str | None = None  # the Hub dataset's configuration (datasets' `name`), e.g. "default"
    dataset_train_split: str = "train"  # the split trained on (a file name, a datasets split, a Hub split)
    dataset_test_split: str | None = "test"  # the held-out split for eval reward accuracy (null: no eval)
    # alignment-handbook's mixture: {datasets: [{id, config, split, columns, weight}], test_split_size, seed}.
    # Each dataset's `weight` is the fraction of its rows kept; the mixture is shuffled with `seed`, and
    # `test_split_size` rows (a count, or a fraction below 1) are held out as the eval split.
    dataset_mixture: DatasetMixture | None = None
    # Renames of dataset columns to the roles a row needs, {column: role}: e.g. {question: prompt} for a
    # dataset without a `prompt` column; role `system` puts that column into the chat template's system turn.
    dataset_columns: dict[str, Literal["prompt", "chosen", "rejected", "system"]] | None = None
    dataset_num_proc: int | None = None  # tokenizer processes (null: one; the tokenizer itself is multithreaded)
    output_dir: str = "outputs/default"  # every artifact below it, content-addressed (relative: to the cwd)

    # --- tokenization / truncation ---
    max_length: int | None = 1024  # prompt + completion tokens per sequence (null: no limit)
    # TRL >= 0.29 has max_length alone; a YAML for TRL < 0.29 sets max_prompt_length / max_completion_length
    # and gets that TRL's rule (pipeline/tokenize/truncation.py). truncation_mode null: that TRL's default,
    # keep_start for the one, keep_end for the other.
    max_prompt_length: int | None = None
    max_completion_length: int | None = None  # TRL < 0.29: each completion keeps its first this many tokens
    truncation_mode: Literal["keep_start", "keep_end"] | None = None  # cut the tail / the head (null: TRL's default)

    # --- loss ---
    beta: float = 0.1  # the KL strength beta (IPO's tau): higher stays closer to the reference
    loss_type: str | list[str] = "sigmoid"  # a DPO variant (docs/losses.md), or a list of them (MPO)
    loss_weights: list[float] | None = None  # one weight per loss_type entry (null: 1 each)
    label_smoothing: float = 0.0  # assumed label-flip rate: conservative DPO / robust / EXO's epsilon
    f_divergence_type: str = "reverse_kl"  # f-DPO's divergence: reverse_kl, forward_kl, js_divergence, alpha_divergence
    f_alpha_divergence_coef: float = 1.0  # alpha of alpha_divergence (TRL 1.x convention: 1 = reverse KL)
    reference_free: bool = False  # a uniform reference (log-probs 0): no reference pass is needed
    use_weighting: bool = False  # WPO's per-pair weights from the policy's length-normalised probabilities
    ld_alpha: float | None = None  # LD-DPO's weight on tokens beyond the shorter completion (null: plain DPO)
    discopop_tau: float = 0.05  # the DiscoPOP loss's temperature
    # TRL's IPO averages log-probs over completion tokens; the original DPO repo sums them (our default).
    ipo_length_normalized: bool = False

    # --- reference log-probs ---
    precompute_ref_batch_size: int | None = None  # pairs per reference forward (null: per_device_eval_batch_size)

    # --- batch layout (pipeline/logprobs.py), in the reference pass and in training alike ---
    # The pairs of a micro-batch as segments of one row, no padding (TRL's DPOConfig name; false: padded rows,
    # grouped by length). The log-probs, losses and gradients are those of padded rows, to float rounding.
    padding_free: bool = True
    # Chosen and rejected as one segment with the prompt computed once (arXiv:2410.20305); needs padding_free and
    # an attention that takes a block mask (sdpa, eager). null: on wherever it can be, off with FlashAttention
    # (which packs by position ids alone), said in one log line.
    prefix_sharing: bool | None = None
    # The longest packed row: a micro-batch with more tokens is several rows (padded to the longest), which bounds
    # the attention's cost (a masked row is dense for SDPA: L^2) and memory. null: 2 x max_length (no bound when
    # max_length is null too). A pair longer than this is refused, naming it.
    max_packed_tokens: int | None = None

    # --- TR-DPO ---
    sync_ref_model: bool = False  # TR-DPO: refresh the reference from the policy every ref_model_sync_steps
    ref_model_mixup_alpha: float = 0.6  # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference
    ref_model_sync_steps: int = 512  # TR-DPO: tau, optimizer steps between reference refreshes
    # Where each rank keeps its slice of the reference between syncs: host memory (pinned on GPUs, no device
    # memory) or, with true, the device (syncs skip two host copies; costs 2-4 bytes/param / ranks of it).
    ref_slices_on_device: bool = False
    # Also write each reference version's consolidated weights to references/v<k>/ (an export for audits; the
    # checkpoints' per-rank slices are all a resume needs).
    save_reference_versions: bool = False

    # --- optimisation (TrainingArguments names) ---
    learning_rate: float = 1e-6  # the peak learning rate (TRL's DPO default)
    per_device_train_batch_size: int = 8  # pairs per micro-batch per rank
    per_device_eval_batch_size: int = 8  # pairs per evaluation batch per rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (global batch = micro x this x ranks)
    num_train_epochs: float = 3.0  # passes over the train split (max_steps wins when > 0)
    max_steps: int = -1  # optimizer steps of the run (-1: from num_train_epochs)
    # transformers' schedules by name (transformers.SchedulerType); lr_scheduler_kwargs are their extra arguments,
    # e.g. {min_lr_rate: 0.1} for cosine_with_min_lr.
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = {}  # extra arguments of the schedule, e.g. {min_lr_rate: 0.1}
    optim: str = "adamw_torch_fused"  # TrainingArguments' optimizer name and default (a ds_config's wins)
    warmup_ratio: float = 0.0  # the fraction of steps of linear warmup
    warmup_steps: int | float = 0  # steps of linear warmup; below 1, a ratio of the steps (transformers >= 5.15)
    weight_decay: float = 0.0  # decoupled weight decay (not on biases and norms)
    adam_beta1: float = 0.9  # AdamW's beta1
    adam_beta2: float = 0.999  # AdamW's beta2
    adam_epsilon: float = 1e-8  # AdamW's epsilon
    max_grad_norm: float = 1.0  # gradient clipping norm
    seed: int = 42  # model init, dropout-free training and (without data_seed) the data order
    bf16: bool = False  # train and score in bfloat16 (GPUs); false: fp32
    deepspeed: str | None = None  # a ds_config JSON (any standard one; "auto" values filled from here); null: ZeRO 0
    # An accelerate config (TRL's `accelerate launch --config_file`, or `trl dpo`'s `accelerate_config: zero3`):
    # a YAML path or TRL's shipped name; its deepspeed_config section gives the ds_config when `deepspeed` is null.
    accelerate_config: str | None = None
    data_seed: int | None = None  # the data order's seed (null: seed)
    tf32: bool | None = None  # TF32 matmuls on Ampere+ GPUs (null: on, as for most DPO runs; false: off)
    # How often to log, evaluate and save (TrainingArguments' strategies): "steps" every *_steps optimizer steps,
    # "epoch" once per epoch, "no" never (null: steps, evaluating also at the end). A *_steps value below 1 is a
    # fraction of the run's steps, as in transformers.
    logging_strategy: Literal["no", "steps", "epoch"] | None = None
    logging_steps: int | float = 1  # a metrics.jsonl line every this many steps
    eval_strategy: Literal["no", "steps", "epoch"] | None = None  # when to evaluate the held-out split
    eval_steps: int | float | None = None  # null with eval_strategy steps: logging_steps, as transformers does
    eval_on_start: bool = False  # evaluate before the first step (the reference's own margins: all zero)
    save_strategy: Literal["no", "steps", "epoch"] | None = None  # when to write a checkpoint
    save_steps: int | float | None = None  # a checkpoint every this many steps (null: only when stopped early)
    save_total_limit: int | None = 2  # checkpoints kept (older ones pruned; null: all)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    gradient_checkpointing_kwargs: dict[str, Any] | None = None  # null: {use_reentrant: false}
    run_name: str | None = None  # a name for the run in logs and the summary (null: the run dir's name)
    # The pipeline's log level in every stage (transformers' names; passive: info on rank 0, warning elsewhere).
    log_level: Literal["debug", "info", "warning", "error", "critical", "passive"] = "passive"

    ddp_timeout: int = 1800  # seconds a collective may wait (TrainingArguments'; DeepSpeed's own default is 600)

    # --- model loading (TRL ModelConfig names) ---
    # null: transformers' default (SDPA), with the cuDNN SDPA backend switched off on CUDA (NaN gradients with a
    # padding mask on torch 2.13, huggingface/trl#7181); "eager", "sdpa", "flash_attention_2", ... as given.
    attn_implementation: str | None = None
    model_revision: str | None = None  # the Hub revision (branch, tag, commit) of model_name_or_path
    trust_remote_code: bool = False  # let transformers run the model repository's own code
    # The dtype the weights are loaded in: must agree with bf16, which decides the training dtype here
    # (null or auto: bf16's; float16 is refused: fp16 training is not supported).
    dtype: Literal["auto", "bfloat16", "float32", "float16"] | None = None

    # --- LoRA / QLoRA (TRL ModelConfig names; peft) ---
    # Train low-rank adapters on the frozen base model instead of every weight. The reference is the base model,
    # scored once by the reference pass, so training never runs an adapter-disabled second forward.
    use_peft: bool = False
    lora_r: int = 16  # the adapters' rank
    lora_alpha: int = 32  # the adapters' scale numerator: delta W = (lora_alpha / lora_r) * B @ A
    lora_dropout: float = 0.05  # dropout on the adapter branch only (the base model's dropout stays off)
    # Module names (suffixes) that get adapters, or "all-linear" (null: peft's default for the architecture).
    lora_target_modules: list[str] | str | None = None
    lora_target_parameters: list[str] | None = None  # parameter names (e.g. MoE experts) that get adapters (peft)
    lora_modules_to_save: list[str] | None = None  # modules trained in full beside the adapters, e.g. [lm_head]
    use_rslora: bool = False  # rank-stabilised LoRA: scale lora_alpha / sqrt(lora_r) instead of / lora_r
    use_dora: bool = False  # weight-decomposed LoRA (DoRA): a trained magnitude per output beside the adapter
    # QLoRA: the base model loaded quantised by bitsandbytes (CUDA GPUs), in the reference pass and in training
    # alike, so the reference log-probs are those of the very base the adapters train on.
    load_in_4bit: bool = False
    load_in_8bit: bool = False  # 8-bit (LLM.int8) base weights instead (bitsandbytes)
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"  # the 4-bit data type
    use_bnb_nested_quant: bool = False  # quantise the quantisation constants too (~0.4 bits/parameter less)
    bnb_4bit_quant_storage: str | None = None  # the dtype 4-bit weights are stored in (null: uint8)
    # Also write final_model_merged/ (the base with the adapters merged in, loadable with AutoModelForCausalLM)
    # beside final_model/ (the adapter alone, loadable with PeftModel.from_pretrained).
    save_merged_model: bool = False

    # --- experiment trackers (TrainingArguments names) ---
    # Where metrics also go: "none", "all" (every installed one), or a list of tensorboard, wandb, mlflow.
    # wandb runs offline unless WANDB_MODE / WANDB_API_KEY say otherwise; mlflow logs to MLFLOW_TRACKING_URI
    # or a file store in the run dir; both name the run run_name.
    report_to: str | list[str] = "none"
    logging_dir: str | None = None  # TensorBoard's event files (null: <run dir>/runs)

    # --- pipeline-only ---
    # Where the model runs. auto: CUDA when present, else CPU; cuda: refuse to start without a GPU (a GPU job
    # must never fall back to CPU silently); cpu: never touch a GPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    num_processes: int = 1  # processes per node of a DeepSpeed job (CPU: gloo; GPU: one per device)
    # How `reference` / `train` start their ranks when num_processes > 1 or num_nodes > 1 (outside a launcher).
    # torchrun and deepspeed run here (one node, or this machine as node `node_rank` of `num_nodes`);
    # slurm submits the job with srun (see the slurm_* fields), from a login node or inside an allocation.
    launcher: Literal["torchrun", "deepspeed", "slurm"] = "torchrun"
    num_nodes: int = 1  # torchrun: nodes of the job; start the same command on each with its node_rank
    node_rank: int = 0  # torchrun: this machine's index among num_nodes
    rdzv_endpoint: str | None = None  # torchrun: host:port of node 0 (required with num_nodes > 1)
    hostfile: str | None = None  # deepspeed launcher: its hostfile (multi-node over pdsh/ssh)
    slurm_partition: str | None = None  # launcher slurm: srun --partition
    slurm_time: str | None = None  # launcher slurm: srun --time, e.g. "04:00:00"
    slurm_gpus_per_node: int | None = None  # launcher slurm: srun --gpus-per-node (null: CPU job)
    slurm_extra_args: list[str] = []  # launcher slurm: more srun arguments, e.g. ["--account=llm"]
    # The reference pass: ZeRO stage 0 (every rank holds the model, no gathers) when the model fits one device
    # with room to spare, ZeRO-3 (sharded, gathered per layer) when it does not; or force one.
    reference_zero_stage: Literal["auto", 0, 3] = "auto"
    # One run per output_dir (pipeline/lock.py). Another run holds it: wait (one line naming it, then block until
    # it ends) or fail at once with that line. Ranks under a launcher always wait.
    output_dir_lock: Literal["wait", "fail"] = "wait"

    # ------------------------------------------------------------------ validation
    @model_validator(mode="before")
    @classmethod
    def _mixture_is_the_data(cls, values: Any) -> Any:
        # An alignment-handbook recipe names its data by dataset_mixture alone: the default dataset_name must not
        # then count as a second source.
        if isinstance(values, dict) and values.get("dataset_mixture") is not None and "dataset_name" not in values:
            return {**values, "dataset_name": None}
        return values

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
        "ref_model_sync_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_processes",
        "num_nodes",
        "ddp_timeout",
    )
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("lora_r", "lora_alpha")
    @classmethod
    def _positive_lora(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("lora_dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, v: Any) -> Any:
        # TrainingArguments takes one name, a list, or null; "none" anywhere means none.
        names = [] if v is None else [v] if isinstance(v, str) else list(v)
        names = [str(name).strip().lower() for name in names]
        unknown = [name for name in names if name not in TRACKERS + ("none", "all")]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a tracker this pipeline reports to; use {', '.join(TRACKERS)}, all or none"
            )
        if not names or "none" in names:
            return "none"
        return names[0] if isinstance(v, str) else names  # as written: a TRL YAML's list stays a list

    @field_validator("logging_steps", "eval_steps", "save_steps")
    @classmethod
    def _steps_or_ratio(cls, v: int | float | None) -> int | float | None:
        if v is not None and (v <= 0 or (v > 1 and v != int(v))):
            raise ValueError("must be a whole number of steps, or a fraction of the run's steps below 1")
        return int(v) if v is not None and v >= 1 else v

    @field_validator(
        "max_length", "max_prompt_length", "max_completion_length", "precompute_ref_batch_size", "max_packed_tokens"
    )
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

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_steps(cls, v: float) -> float:
        if v < 0 or (v >= 1 and v != int(v)):
            raise ValueError("must be a step count (an integer >= 1) or a ratio of the steps in [0, 1)")
        return v

    @field_validator("optim")
    @classmethod
    def _known_optim(cls, v: str) -> str:
        check_optim(v)
        return v

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        check_lr_scheduler_type(v)
        return v

    @field_validator("lr_scheduler_kwargs", mode="before")
    @classmethod
    def _schedule_kwargs(cls, v: Any) -> Any:
        # TrainingArguments takes null (none) or a JSON string (the command line's form) as well as a mapping.
        if v is None:
            return {}
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object: {exc}") from None
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
        if self.sync_ref_model and self.use_peft:
            for key in ("lora_modules_to_save", "use_dora", "load_in_4bit", "load_in_8bit"):
                if getattr(self, key):
                    raise ValueError(
                        f"{key}: TR-DPO with adapters mixes base + adapter delta into the reference, which needs "
                        f"plain LoRA on an unquantised base; unset {key}, or set sync_ref_model: false"
                    )
        if self.sync_ref_model and self.use_peft and self.save_reference_versions:
            raise ValueError(
                "save_reference_versions: with use_peft each reference version is the base plus the (alpha, adapter) "
                "chain in references/v<k>/adapter_model.safetensors; set save_reference_versions: false"
            )
        if (self.load_in_4bit or self.load_in_8bit) and self.reference_zero_stage == 3:
            raise ValueError(
                "reference_zero_stage: 3 cannot partition the quantised base of load_in_4bit / load_in_8bit; set "
                "reference_zero_stage: auto (stage 0: every rank holds the quantised base)"
            )
        if self.save_merged_model and not self.use_peft:
            raise ValueError("save_merged_model: only adapters are merged (use_peft); final_model is the full model")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit: choose one quantisation of the base model")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("load_in_4bit / load_in_8bit: a quantised base is trained through adapters; set use_peft")
        if self.dtype == "float16":
            raise ValueError("dtype: float16 training is not supported; use dtype: bfloat16 with bf16: true")
        if self.dtype == "bfloat16" and not self.bf16:
            raise ValueError("dtype: bfloat16 needs bf16: true (bf16 decides the training dtype here)")
        layout = layout_error(self)
        if layout:
            raise ValueError(layout)
        # Loss-specific checks (names, weights, ranges) live beside the losses: one home per concept.
        self.loss_spec()
        # The ds_config (file, sections, "auto" values), optimizer and schedule: beside the ds_config's completion.
        check_config(self)
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

    @overload
    def resolve_path(self, value: str) -> Path: ...

    @overload
    def resolve_path(self, value: None) -> None: ...

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


def _hint(key: str) -> str:
    """ " (did you mean 'x'?)" for a close misspelling of a field here, else nothing: a key of another library is
    never pointed at a field of another meaning (``use_peft`` is not ``use_weighting``)."""
    match = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.85)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _unknown(key: str) -> str:
    return (
        f"unknown key '{key}'{_hint(key)}; `dpo-pipeline config` lists every accepted key (TRL's, "
        f"TrainingArguments' and alignment-handbook's included)"
    )


def _validation_message(err: ValidationError, source: str) -> str:
    problems = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            problems.append(_unknown(field))
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {message} (got {item.get('input')!r})" if item["loc"] else message)
    return f"invalid config {source}: " + "; ".join(problems)


def _carry_over(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """A TRL / transformers / alignment-handbook config's keys made ours (pipeline/trl_keys.py): old names
    renamed, keys that change nothing here set aside (returned, for one warning line), a key whose behaviour
    is missing refused with the reason (unless its value switches that behaviour off)."""
    from pipeline import trl_keys

    ours: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    no_effect = []
    for key, value in values.items():
        name = trl_keys.ALIASES.get(key, key)
        if name in FIELD_NAMES:
            if name in ours:
                old_name = next(k for k in (key, given_as[name]) if k != name)
                raise ConfigError(f"invalid config {source}: both '{old_name}' and '{name}' are set; keep '{name}'")
            ours[name], given_as[name] = value, key
        elif key in trl_keys.NO_EFFECT:
            no_effect.append(key)
        elif key in trl_keys.REFUSED:
            accepted, why = trl_keys.REFUSED[key]
            if value not in accepted:
                raise ConfigError(f"invalid config {source}: {key}: {value!r} is not supported here: {why}")
            no_effect.append(key)
        else:
            raise ConfigError(f"invalid config {source}: {_unknown(key)}")
    return ours, no_effect


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML, so ``beta=0.2``, ``loss_type=[sigmoid,ipo]`` and
    ``max_completion_length=null`` all mean what they look like."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (or --key value)")
    key, _, raw = text.partition("=")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> DPOPipelineConfig:
    """Read a YAML (or JSON) config, apply overrides and validate. Raises ConfigError naming the field.

    Keys of TRL's, transformers' and alignment-handbook's configs are accepted as :func:`_carry_over` says;
    those that change nothing here are listed in one warning line."""
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
    values, no_effect = _carry_over(values, source)
    # Overrides are renamed on their own, so that `dtype=...` over a YAML's `torch_dtype` wins, as it reads.
    extra = overrides if isinstance(overrides, dict) else dict(parse_override(item) for item in overrides or [])
    extra, extra_no_effect = _carry_over(extra, "overrides")
    values.update(extra)
    no_effect += extra_no_effect
    try:
        config = DPOPipelineConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source)) from None
    if no_effect:
        log.warning(
            "config %s: %d keys have no effect here and are ignored: %s (docs/trl_keys.md says why)",
            source,
            len(no_effect),
            ", ".join(sorted(no_effect)),
        )
    return config


def field_help() -> dict[str, str]:
    """Each field's meaning: the comment on its line in this file, else the comment block right above it (the
    config's documentation lives beside the fields, as nanoGPT's does)."""
    import ast

    source = Path(__file__).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOPipelineConfig").body
    found = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = lines[node.lineno - 1]
        if "#" in line.split("=", 1)[-1]:
            found[node.target.id] = line.split("#", 1)[1].strip()
            continue
        above: list[str] = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#") and not lines[row].strip().startswith("# ---"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        found[node.target.id] = " ".join(above)
    return found


def describe_keys() -> str:
    """Every key a config may hold: the fields (default and meaning), then other libraries' keys and what
    loading does with them (``dpo-pipeline config``)."""
    from pipeline import trl_keys

    meaning = field_help()
    rows = ["# fields (TRL / TrainingArguments names where they exist): key = default  # meaning"]
    for name, info in DPOPipelineConfig.model_fields.items():
        default = info.default.model_dump() if isinstance(info.default, BaseModel) else info.default
        rows.append(f"{name} = {json.dumps(default)}  # {meaning.get(name, '')}".rstrip(" #"))
    rows.append("\n# other names, renamed on load")
    rows += [f"{old} -> {new}" for old, new in sorted(trl_keys.ALIASES.items())]
    rows.append("\n# accepted, with no effect here (one warning line lists them)")
    rows += [f"{key}  # {why}" for key, why in sorted(trl_keys.NO_EFFECT.items())]
    rows.append("\n# refused unless set to what switches them off")
    rows += [
        f"{key} (accepted: {', '.join(json.dumps(v) for v in accepted) or 'never'})  # {why}"
        for key, (accepted, why) in sorted(trl_keys.REFUSED.items())
    ]
    return "\n".join(rows)


def save_config(config: DPOPipelineConfig, path: Path | TextIO) -> None:
    """Write the resolved config as YAML (what a launched stage subprocess reads back), atomically to ``path``
    or to an open text stream."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if not isinstance(path, (str, Path)):
        path.write(text)
        return
    from pipeline.artifacts import atomic_write_text

    atomic_write_text(path, text)


def key_disposition(key: str) -> tuple[str, str]:
    """(what loading does with ``key``, why): honoured, renamed, no effect, refused (or unknown)."""
    from pipeline import trl_keys

    if key in FIELD_NAMES:
        return "honoured", field_help().get(key, "")
    if key in trl_keys.ALIASES:
        return "honoured", f"another name of `{trl_keys.ALIASES[key]}`"
    if key in trl_keys.NO_EFFECT:
        return "accepted, no effect", trl_keys.NO_EFFECT[key]
    if key in trl_keys.REFUSED:
        accepted, why = trl_keys.REFUSED[key]
        off = ", ".join(f"`{value!r}`" for value in accepted)
        return ("refused" + (f" unless {off}" if off else "")), why
    return "unknown", ""


def keys_markdown(inventory: dict[str, list[str]]) -> str:
    """docs/trl_keys.md: every key of the inventory (key -> the configs that define it) and what happens to it."""
    rows = [
        "# Every TRL / TrainingArguments / alignment-handbook key, and what a config here does with it",
        "",
        "Generated by `python -m pipeline.config tests/data/trl_key_inventory.json > docs/trl_keys.md` "
        "(tests/test_trl_keys.py checks it is current). A key that changes nothing here is accepted and listed "
        "in one warning line when the config is loaded; a refused key names the reason and what to do.",
        "",
        "| key | defined by | here | why / meaning |",
        "|---|---|---|---|",
    ]
    for key, sources in sorted(inventory.items()):
        what, why = key_disposition(key)
        rows.append(f"| `{key}` | {', '.join(sources)} | {what} | {why.replace('|', '/')} |")
    own = [name for name in FIELD_NAMES if name not in inventory]
    rows += ["", "## Fields of this pipeline only", "", "| key | meaning |", "|---|---|"]
    rows += [f"| `{name}` | {field_help().get(name, '').replace('|', '/')} |" for name in own]
    return "\n".join(rows) + "\n"


__all__ = ["DPOPipelineConfig", "FIELD_NAMES", "load_config", "parse_override", "save_config"]


if __name__ == "__main__":
    # docs/trl_keys.md from the inventory of the public configs' keys (tests/data/trl_key_inventory.json).
    import sys

    print(keys_markdown(json.loads(Path(sys.argv[1]).read_text())["keys"]), end="")
