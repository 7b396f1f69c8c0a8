"""Training stage: DPO with DeepSpeed ZeRO from the cached reference log-probs; no reference model is loaded.

    dpo-pipeline train --config cfg.yaml                                     # 1 process
    dpo-pipeline train --config cfg.yaml num_processes=2 deepspeed=configs/ds_zero3.json
    deepspeed --hostfile hostfile --module pipeline.cli train --config cfg.yaml   # multi-node (README: every launcher)

One recipe class, :class:`DPOTrainingRecipe`, in the order it runs:

1. **Checks before any step**, before the engine exists: the ds_config (``"auto"`` filled from the config,
   conflicts refused by :func:`pipeline.ds_config.resolve_ds_config`); the tokenized artifact; each reference
   artifact was made from exactly this tokenized artifact (and, for the default one, scored with the policy's
   initial weights), has no NaN/inf and no duplicate ids, and holds every example id the steps will read; a
   checkpoint to resume from was made with this config and world size, and every file still has the digest
   its marker recorded (else the one before it is used). Every rank checks it runs rank 0's config on rank 0's
   artifacts, and rank 0 decides what is complete and where to resume (:func:`pipeline.distributed.main_decides`).
2. **Policy**: ``from_pretrained`` with every dropout probability set to 0 (loaded already partitioned under
   ZeRO-3 through ``HfDeepSpeedConfig``), the ``optim`` the HF Trainer would build (torch AdamW, fused or not,
   SGD, Adagrad, RMSprop, Adafactor: no JIT compile) and transformers' ``lr_scheduler_type`` schedule as a
   LambdaLR stepped by DeepSpeed; a ds_config ``optimizer`` / ``scheduler`` section wins, as in the HF Trainer.
   ZeRO 0-3, CPU offload, fp32 or bf16: whatever the ds_config says. With ``use_peft`` the policy is the base
   with LoRA adapters (:mod:`pipeline.train.lora`): the optimizer holds the adapters, checkpoints too.
3. **Step**: the examples of each optimizer step come from :class:`pipeline.schedule.TrainingSchedule` (seeded,
   its own generator), so a resumed or differently sharded run reads the same global batches, cut into
   micro-batches by length (balanced by tokens in packed rows, each weighted by its pairs; grouped by length in
   padded ones). Each micro-batch is one forward over chosen and rejected together, in the layout the model
   honours (:mod:`pipeline.layout`: one packed row, the prompt shared, by default), through
   :func:`pipeline.logprobs.completion_logps`, the function the reference pass used (so step 0 with policy ==
   reference gives ln 2), then
   :func:`pipeline.losses.compute_loss` (every variant, MPO sums). DeepSpeed averages the gradient over
   accumulation and ranks, clips it and steps optimizer and schedule. Under TR-DPO a step that opens a window
   first syncs the reference and scores the window (:mod:`pipeline.train.tr_dpo`), in this engine.
4. **Metrics**: global-batch means (summed on the engine's device, one all-reduce and one host transfer per
   step), tokens/s and MFU (:mod:`pipeline.throughput`) to ``metrics.jsonl`` and the ``report_to`` trackers
   (:mod:`pipeline.trackers`, main process; TR-DPO syncs as events), a progress bar, and an evaluation of the
   held-out split every ``eval_steps`` and at the end (reward accuracy and margins). A non-finite loss or
   gradient norm stops the run before anything is saved (:class:`pipeline.errors.TrainingDiverged`, naming the
   step and the checkpoint to resume from).
5. **Checkpoints** every ``save_steps`` (and at ``stop_step``): DeepSpeed's (weights, optimizer, LR schedule,
   with the step and the loss state as client state), per-rank RNG (and TR-DPO's reference slices), and
   ``trainer_state.json`` written last as the completion marker, with every file's digest. A rerun resumes
   from the newest intact one and ends bit-for-bit where an uninterrupted run ends. Only ``save_total_limit``
   checkpoints are kept, pruned after the new one's marker is written.
6. **End**: ``final_model`` (``save_pretrained``, safetensors, consolidated under ZeRO-3, plus the tokenizer;
   with LoRA the adapter, and ``final_model_merged`` on request), plots and ``summary.json`` (with the
   throughput medians; :mod:`pipeline.metrics`), and ``manifest.json`` last.

Trade-offs: metrics cost one all-reduce per step (a few floats; ZeRO synchronises every step anyway). The
BCO running mean is updated per micro-batch, so gradient accumulation and more ranks at the same global batch
give slightly different BCO losses (every other variant is identical), and AOT sorts within a micro-batch; the
length-aware micro-batches change which pairs those two see together, nothing else.
Checkpoints are DeepSpeed's partitioned format: a resume needs the same world size (checked), while the
final model is plain Hugging Face. Under bf16 the final model holds the module's bf16 weights.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # what AdamW(fused=True) checks
from tqdm import tqdm

from pipeline.artifacts import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    hash_file,
    is_complete,
    read_manifest,
    storage_errors,
    write_manifest,
)
from pipeline.config import DPOPipelineConfig
from pipeline.distributed import (
    all_gather_objects,
    barrier,
    check_ranks_agree,
    device,
    init_distributed,
    main_decides,
    on_gpu,
)
from pipeline.ds_config import model_hidden_size, num_warmup_steps, resolve_ds_config, zero_stage
from pipeline.errors import ArtifactError, ConfigError, TrainingDiverged
from pipeline.layout import BatchLayout
from pipeline.logprobs import (
    PackedPairBatch,
    PairBatch,
    collate,
    completion_logps,
    honoured_layout,
    reference_pair_logps,
)
from pipeline.losses import LossState, PairLogps, compute_loss
from pipeline.metrics import (
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsLog,
    last_record,
    read_summary,
    update_summary,
    write_plots,
)
from pipeline.models import code_kwargs, model_kwargs
from pipeline.plan import TRAIN_KIND, TRAIN_SCHEMA_VERSION, Plan
from pipeline.ranks import is_main_process, rank, world_size
from pipeline.reference.cache import KIND as REFERENCE_KIND
from pipeline.reference.cache import ReferenceLogps, check_made_from, load_reference_logps
from pipeline.schedule import Cadence, TrainingSchedule
from pipeline.throughput import COUNTS, ModelFlops, StepThroughput, peak_flops
from pipeline.tokenize.artifact import SPLIT_FILES, load_tokenized, require_tokenized, tokenized_manifest
from pipeline.trackers import Trackers, check_trackers, flatten_params
from pipeline.train.lora import MERGED_MODEL, add_adapters, save_merged, trainable_state_dict
from pipeline.train.tr_dpo import TRDPOWindows

log = logging.getLogger(__name__)

KIND, SCHEMA_VERSION = TRAIN_KIND, TRAIN_SCHEMA_VERSION
FINAL_MODEL = "final_model"
CHECKPOINTS = "checkpoints"
CHECKPOINT_MARKER = "trainer_state.json"  # written last into a checkpoint: it is complete

# Fault injection for the divergence guard's tests: the loss of this (1-based) step is made NaN.
_INJECTED_NONFINITE_STEP = int(os.environ.get("DPO_PIPELINE_INJECT_NONFINITE_LOSS_AT_STEP", "0"))

__all__ = ["KIND", "SCHEMA_VERSION", "DPOTrainingRecipe", "read_summary", "train_stage", "update_summary"]


# ---------------------------------------------------------------------------------------------- data
class PreferencePairs:
    """One split of the tokenized artifact joined on ``example_id`` with its reference log-probs, batched in
    ``layout`` (padded until the engine has said which layout its model honours)."""

    def __init__(self, tokenized_dir: Path, split: str, ref: ReferenceLogps | None, pad_token_id: int):
        table = load_tokenized(tokenized_dir, split)  # example ids checked strictly increasing
        self.table = table.select(["example_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
        self.ids = table.column("example_id").to_numpy()
        self._lengths = {
            side: table.column(f"{side}_length").to_numpy().astype(np.int64)
            for side in ("prompt", "chosen", "rejected")
        }
        # None until TR-DPO's first window is scored (its windows bring their own reference log-probs).
        self.reference: ReferenceLogps | None = ref
        self.split, self.pad_token_id = split, pad_token_id
        self.layout = BatchLayout(padding_free=False, prefix_sharing=False)  # until the recipe says which

    def _reference(self) -> ReferenceLogps:
        if self.reference is None:
            raise RuntimeError(f"the {self.split} reference log-probs are read before any were loaded")  # a bug
        return self.reference

    def require(self, ids: np.ndarray, where: str) -> None:
        """Refuse ids absent from the tokenized split or from the reference log-probs (naming them)."""
        missing = np.setdiff1d(ids, self.ids)
        if missing.size:
            raise ArtifactError(
                f"{where}: example_ids {missing[:5].tolist()} are not in the tokenized {self.split} "
                f"split ({missing.size} missing)"
            )
        self._reference().take(np.unique(ids))

    def use(self, layout: BatchLayout) -> None:
        """Batch in ``layout`` from now on; refused if a pair of this split does not fit its packed rows."""
        prompt, chosen, rejected = (self._lengths[side] for side in ("prompt", "chosen", "rejected"))
        layout.check_fits(prompt, chosen, rejected, self.ids, where=f"the tokenized {self.split} split")
        self.layout = layout

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        """Each pair's tokens in the layout: its padded row's length, or its positions in a packed row."""
        rows = np.searchsorted(self.ids, ids)
        return self.layout.pair_tokens(*(self._lengths[side][rows] for side in ("prompt", "chosen", "rejected")))

    def batch(self, ids: np.ndarray) -> tuple[PairBatch | PackedPairBatch, PairLogps]:
        rows = self.table.take(np.searchsorted(self.ids, ids)).to_pylist()
        reference = reference_pair_logps(self._reference().take(ids), device())
        return collate(rows, self.pad_token_id, self.layout).to(device()), reference


def _load_reference(ref_dir: Path, split: str, tokenized_fp: str, initial_weights: str | None) -> ReferenceLogps:
    """A reference split, refused unless it was made from this tokenized artifact (and these weights, if given)."""
    check_made_from(ref_dir, tokenized_fp, initial_weights)
    return load_reference_logps(ref_dir, split=split)  # file hashes, duplicates, NaN/inf


# ---------------------------------------------------------------------------------------------- helpers
def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


class MetricSums:
    """Pair-weighted metric sums of one step (or one evaluation) on the engine's device, and their global means.

    Everything stays on ``device`` until the one all-reduce: no host sync per micro-batch (each would stall
    ZeRO-3's prefetch), and the collective runs on the device the process group's backend serves (NCCL takes
    only CUDA tensors). :meth:`means` then makes the step's single device-to-host transfer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.pairs = torch.zeros((), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(COUNTS), dtype=torch.float64, device=device)  # pipeline.throughput's

    def add(self, metrics: dict[str, torch.Tensor], pairs: int, counts: torch.Tensor) -> None:
        for name, value in metrics.items():
            weighted = value.detach().double() * pairs
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.pairs += pairs
        self.counts += counts

    def add_names(self, names) -> None:
        """Zeros under ``names`` (a rank whose evaluation had only stand-in batches must still reduce them)."""
        for name in names:
            self.sums.setdefault(name, torch.zeros((), dtype=torch.float64, device=self.device))

    def reduced(self) -> torch.Tensor:
        """[sum of each metric..., pairs, counts...] summed over ranks, still on the device."""
        return _all_reduce_sum(torch.cat([torch.stack([*self.sums.values(), self.pairs]), self.counts]))

    def means(self) -> tuple[dict[str, float], dict[str, float]]:
        """The metrics' pair-weighted means and the summed throughput counts (by :data:`COUNTS` name)."""
        values = self.reduced().tolist()
        pairs, counts = values[len(self.sums)], values[len(self.sums) + 1 :]
        return {name: values[i] / pairs for i, name in enumerate(self.sums)}, dict(zip(COUNTS, counts, strict=True))


def _policy_logps(out) -> PairLogps:
    (chosen, rejected), (chosen_len, rejected_len), (chosen_pub, rejected_pub) = (
        out.halves("logps"),
        out.halves("lengths"),
        out.halves("public_logps"),
    )
    wpo = out.halves("wpo_log_weights") if out.wpo_log_weights is not None else (None, None)
    return PairLogps(chosen, rejected, chosen_len, rejected_len, chosen_pub, rejected_pub, *wpo)


def _throughput_summary(records: list[dict[str, Any]], peak: dict[str, Any]) -> dict[str, Any]:
    """The run's typical step: medians over its logged steps (the first, which warms kernels up, left out when
    there are others), and the peak MFU was measured against."""
    steps = [r for r in records if "tokens_per_second" in r]
    steps = steps[1:] if len(steps) > 1 else steps
    keys = ("tokens_per_second", "tokens_per_second_per_device", "tflops_per_device", "mfu", "padding_fraction")
    medians = {key: float(np.median([r[key] for r in steps])) for key in keys if steps and key in steps[0]}
    return {**medians, **peak}


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: decay on matrices, none on biases and norm scales (the HF Trainer's rule, by shape).

    By the parameter's full shape: under ZeRO-3 a partitioned parameter's ``.data`` is an empty 1-D tensor and
    its real shape is ``ds_shape``, so ``p.ndim`` would put every weight in the no-decay group."""

    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters, not the frozen base
    groups = [
        {"params": [p for p in trainable if matrix(p)], "weight_decay": weight_decay},
        {"params": [p for p in trainable if not matrix(p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def client_optimizer(groups: list[dict[str, Any]], config: DPOPipelineConfig) -> torch.optim.Optimizer:
    """The config's ``optim`` as the HF Trainer builds it (``get_optimizer_cls_and_kwargs``), on
    :func:`weight_decay_groups`: every one takes ``learning_rate``; AdamW also ``adam_beta1/2`` and ``adam_epsilon``;
    SGD, Adagrad and RMSprop keep torch's defaults for the rest (the Trainer sets momentum and the like only from
    ``optim_args``, which has no equivalent here); Adafactor a fixed learning rate (no relative step, no parameter
    scaling), so the schedule drives it as it drives the others."""
    c = config
    if c.optim in ("adamw_torch", "adamw_torch_fused"):
        # fused: one kernel per parameter group instead of ~10 passes per tensor (3x faster steps on CPU).
        fused = c.optim == "adamw_torch_fused" and device().type in _get_fused_kernels_supported_devices()
        return torch.optim.AdamW(
            groups, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon, fused=fused or None
        )
    if c.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=c.learning_rate, scale_parameter=False, relative_step=False)
    optimizer = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}[c.optim]
    return optimizer(groups, lr=c.learning_rate)


def _newest_intact_checkpoint(root: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose every file still has the digest its marker recorded. Collective.

    Rank 0 lists the candidates (ranks resuming from different checkpoints would mix their ZeRO partitions);
    the ranks hash a share of the files each, and all take the same verdict. A damaged one (a truncated or
    modified file) is passed over with a warning naming it, for the one before."""
    candidates = main_decides(lambda: [(step, str(path), _read_marker(path)) for step, path in _checkpoints(root)])
    for step, path, marker in reversed(candidates):
        files = sorted((marker or {}).get("files", {}).items())
        mine = [
            name
            for name, digest in files[rank() :: world_size()]
            if not (Path(path) / name).is_file() or hash_file(Path(path) / name) != digest
        ]
        damaged = [name for names in all_gather_objects(mine) for name in names]
        if files and not damaged:
            return step, Path(path)
        if is_main_process():
            log.warning(
                "checkpoint %s is damaged (%s); resuming from the one before it",
                path,
                f"{damaged[0]} does not match its recorded digest" if damaged else "no file digests",
            )
    return None


# Below this much free space, a failed torch.save is taken for a full disk.
_NEARLY_FULL_BYTES = 256 << 20


@contextlib.contextmanager
def _checkpoint_storage(directory: Path):
    """Storage faults of a checkpoint write as one line (:class:`pipeline.errors.StorageError`). ``torch.save``
    reports a failed write as a ``RuntimeError`` of its zip writer and loses the ``OSError``: with the disk
    (nearly) full that is ENOSPC; any other such failure keeps its traceback."""
    with storage_errors(directory):
        try:
            yield
        except RuntimeError as exc:
            if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
                raise
            existing = next(p for p in (directory, *directory.parents) if p.exists())
            if shutil.disk_usage(existing).free >= _NEARLY_FULL_BYTES:
                raise
            raise OSError(errno.ENOSPC, "No space left on device", str(directory)) from exc


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (marker present), oldest first."""
    found = [(int(p.name.removeprefix("step-")), p) for p in root.glob("step-*") if (p / CHECKPOINT_MARKER).is_file()]
    return sorted(found)


def _save_hf(module, state_dict, out: Path, tokenizer_dir: Path, trust_remote_code: bool) -> None:
    """``save_pretrained`` into a staging dir renamed over ``out``: a reader never sees half a model."""
    from transformers import AutoTokenizer

    with atomic_dir(out) as staging:
        module.save_pretrained(staging, state_dict=state_dict)
        AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code).save_pretrained(staging)


# ---------------------------------------------------------------------------------------------- the recipe
class DPOTrainingRecipe:
    """One training run in ``run_dir``; every method is collective (all ranks call it) unless it says not."""

    def __init__(self, config: DPOPipelineConfig, plan: Plan, *, train_reference_dir: Path | None = None):
        self.config, self.plan, self.run_dir = config, plan, plan.train_dir
        self.world, self.rank = world_size(), rank()
        self.spec = config.loss_spec()
        self.model_dir = plan.model_dir
        require_tokenized(plan.tokenized_dir)
        tokenized = tokenized_manifest(plan.tokenized_dir, fingerprint=plan.tokenized_fingerprint)
        pad = int(tokenized["pad_token_id"])
        # The default reference artifact must hold the scores of the weights the policy starts from; an explicit
        # one is checked against the data only. Under TR-DPO each window's log-probs come from the run itself.
        initial_weights = plan.reference_weights
        self.reference_dirs = {"eval": plan.reference_dir}
        train_ref = None
        if not config.sync_ref_model:
            self.reference_dirs["train"] = Path(train_reference_dir or plan.reference_dir)
            train_ref = _load_reference(
                self.reference_dirs["train"],
                "train",
                plan.tokenized_fingerprint,
                None if train_reference_dir else initial_weights,
            )
        self.train = PreferencePairs(plan.tokenized_dir, "train", train_ref, pad)
        self.schedule = TrainingSchedule.from_config(config, self.train.ids, self.world)
        self.ds_config = resolve_ds_config(
            config,
            world=self.world,
            gpu=on_gpu(),
            hidden_size=model_hidden_size(self.model_dir),
            num_training_steps=self.schedule.num_steps,
        )
        self.cadence = Cadence.of(config, self.schedule)
        self.tr_dpo = (
            TRDPOWindows(
                config, self.run_dir, self.model_dir, plan.tokenized_dir, plan.tokenized_fingerprint, self.schedule
            )
            if config.sync_ref_model
            else None
        )
        self.eval: PreferencePairs | None = None
        if SPLIT_FILES["eval"] in tokenized["files"]:
            eval_ref = _load_reference(self.reference_dirs["eval"], "eval", plan.tokenized_fingerprint, initial_weights)
            self.eval = PreferencePairs(plan.tokenized_dir, "eval", eval_ref, pad)
            self.eval.require(self.eval.ids, f"eval reference {self.reference_dirs['eval']}")
        for pairs in (self.train, self.eval):  # the layout asked for (setup() confirms it on the model)
            if pairs is not None:
                pairs.use(BatchLayout.of(config))

        self.checkpoint_root = self.run_dir / CHECKPOINTS
        self.resume_key = {"world_size": self.world, **plan.train_inputs}
        self.resume_from = _newest_intact_checkpoint(self.checkpoint_root)
        if self.resume_from:
            self._check_resumable(self.resume_from[1])
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE)
        self.engine: Any = None  # the DeepSpeed engine, from setup() on
        self.step = self.resume_from[0] if self.resume_from else 0  # set again from the checkpoint on load
        self.last_eval_step: int | None = None
        self.loss_state = LossState(all_reduce_sum=_all_reduce_sum if self.world > 1 else None)
        self.started = time.perf_counter()  # train_stage sets it earlier, before the data checks
        self.throughput: StepThroughput  # from setup() on (it needs the engine's module and device)
        self.peak: dict[str, Any] = {}
        self.trackers = Trackers([])  # the main process's, from setup() on (report_to)

    # ------------------------------------------------------------------ setup
    def _check_resumable(self, checkpoint: Path) -> None:
        saved = main_decides(lambda: json.loads((checkpoint / CHECKPOINT_MARKER).read_text()))
        ours, theirs = flatten_params(self.resume_key), flatten_params(saved["resume_key"])  # down to the field
        diffs = [
            f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k)
        ]
        if diffs:
            raise ConfigError(
                f"checkpoint {checkpoint} was made with a different config ({'; '.join(diffs[:6])}); "
                f"restore that config or delete {self.checkpoint_root} to start over"
            )

    def check_window(self, start: int, stop: int) -> None:
        """Before step 1: the train reference covers every example of steps [start, stop) (TR-DPO's windows
        score their own examples as they start)."""
        if stop > start and self.tr_dpo is None:
            self.train.require(self.schedule.window_ids(start, stop), f"train reference {self.reference_dirs['train']}")

    def setup(self) -> None:
        """Build the engine and resume from the newest complete checkpoint, if any."""
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM, get_scheduler
        from transformers.integrations import HfDeepSpeedConfig

        init_distributed(self.config)
        torch.manual_seed(self.config.seed)
        model_config = AutoConfig.from_pretrained(self.model_dir, **code_kwargs(self.config))
        for name, value in model_config.to_dict().items():
            if "dropout" in name and isinstance(value, float):
                setattr(model_config, name, 0.0)  # functional dropout (e.g. Llama's attention) reads the config
        # Alive during from_pretrained: transformers then loads each weight straight into its ZeRO-3 partition.
        zero3_loading = HfDeepSpeedConfig(self.ds_config) if zero_stage(self.ds_config) == 3 else None
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir,
            config=model_config,
            dtype=torch.bfloat16 if self.config.bf16 else torch.float32,
            **model_kwargs(self.config),
        )
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if self.config.gradient_checkpointing:
            kwargs = self.config.gradient_checkpointing_kwargs
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False} if kwargs is None else kwargs
            )
        if self.config.use_peft:
            model = add_adapters(model, self.config)  # after the dropout loop: lora_dropout keeps its value
        groups = weight_decay_groups(model, self.config.weight_decay)
        # The ds_config's optimizer / scheduler sections win over optim / lr_scheduler_type, as in the HF Trainer.
        optimizer = None if "optimizer" in self.ds_config else client_optimizer(groups, self.config)
        steps = self.schedule.num_steps
        if "scheduler" in self.ds_config:
            log.info(
                "the ds_config's %s scheduler sets the learning rate (lr_scheduler_type is not used)",
                self.ds_config["scheduler"]["type"],
            )
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=groups if optimizer is None else None,
            config=self.ds_config,
            lr_scheduler=None
            if "scheduler" in self.ds_config
            else lambda opt: get_scheduler(
                self.config.lr_scheduler_type,
                opt,
                num_warmup_steps=num_warmup_steps(self.config, steps),
                num_training_steps=steps,
                scheduler_specific_kwargs=self.config.lr_scheduler_kwargs,
            ),
        )
        del zero3_loading
        if self.world == 1 and zero_stage(self.ds_config) == 0:
            # Nothing to reduce, but DeepSpeed would still copy every gradient into one flat buffer and back
            # (an extra 4 bytes per parameter at the peak, and two passes over the gradients per step).
            self.engine.enable_backward_allreduce = False
        self.engine.train()
        layout = honoured_layout(self.engine, self.config, self.train.pad_token_id, device())
        for pairs in (self.train, self.eval):
            if pairs is not None:
                pairs.use(layout)
        client = self._load_checkpoint(self.resume_from[1]) if self.resume_from else None
        if self.tr_dpo is not None:
            self.train.reference = self.tr_dpo.start(
                self.engine,
                zero_stage(self.ds_config) == 3,
                self.resume_from[1] if self.resume_from else None,
                client,
                self.step,
                layout,
            )
        barrier()  # CPU ranks measure their matmul peak together, as they will share the cores in training
        peak, peak_source = peak_flops(self.engine.device, torch.bfloat16 if self.config.bf16 else torch.float32)
        self.throughput = StepThroughput(ModelFlops.of(self.engine.module), peak, self.world)
        if is_main_process():
            log.info("MFU is measured against %s", peak_source)
            self.peak = {"peak_flops_per_device": peak, "peak_source": peak_source}
            self.metrics.restart(through_step=self.step)  # drop lines of steps the resumed run will redo
            self.trackers = Trackers.open(self.config, self.run_dir, params=self._run_params(), resume_step=self.step)
        barrier()

    def _run_params(self) -> dict[str, Any]:
        """What a tracker records of the run: every config value and the artifacts' fingerprints."""
        return {
            **flatten_params(json.loads(self.config.to_json())),
            "fingerprints/train": self.plan.train_fingerprint,
            "fingerprints/tokenized": self.plan.tokenized_fingerprint,
            **{f"fingerprints/reference_{split}": path.name for split, path in self.reference_dirs.items()},
        }

    # ------------------------------------------------------------------ steps
    def _forward_loss(self, ids: np.ndarray, pairs: PreferencePairs, state: LossState):
        batch, ref = pairs.batch(ids)
        out = completion_logps(self.engine, batch, with_wpo_weights=self.spec.use_weighting)
        loss, metrics = compute_loss(_policy_logps(out), ref, self.spec, state)
        return loss, metrics, batch.counts()

    def train_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        learning_rate = self.engine.get_lr()[0]
        sums = MetricSums(self.engine.device)
        accumulation, layout = self.config.gradient_accumulation_steps, self.train.layout
        for ids in self.schedule.micro_batches(
            step, self.rank, self.world, accumulation, self.train.lengths, packed=layout.padding_free
        ):
            loss, metrics, counts = self._forward_loss(ids, self.train, self.loss_state)
            if step + 1 == _INJECTED_NONFINITE_STEP:
                loss = loss * float("nan")
                metrics = {**metrics, "loss": loss.detach()}
            self.engine.backward(loss * self.schedule.pair_weight(len(ids), self.world, accumulation))
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            sums.add(metrics, len(ids), counts)
        means, counts = sums.means()  # the host transfer: the step's device work is done
        seconds = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": step + 1,
            "epoch": round((step + 1) / self.schedule.steps_per_epoch, 4),
            **means,
            "learning_rate": learning_rate,
            **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
            **self.throughput.metrics(
                tokens=counts["tokens"],
                padded_positions=counts["padded_positions"],
                seconds=seconds,
                seq_len=counts["squared_lengths"] / counts["tokens"],
                logit_tokens=counts["logit_tokens"],
            ),
            "step_seconds": seconds,
        }
        self._stop_if_diverged(record)
        return record

    def _stop_if_diverged(self, record: dict[str, Any]) -> None:
        """A non-finite loss or gradient norm ends the run before anything is saved: the weights that step
        produced are not trusted, and the newest checkpoint (if any) is where a fixed run resumes."""
        bad = {
            name: record.get(name)
            for name in ("loss", "grad_norm")
            if record.get(name) is not None and not math.isfinite(record[name])
        }
        if not bad:
            return
        latest = _checkpoints(self.checkpoint_root)
        resume = (
            f"the newest checkpoint is {latest[-1][1]} (step {latest[-1][0]}); a rerun resumes there"
            if latest
            else "there is no checkpoint yet; a rerun starts over"
        )
        what = " and ".join(f"{name} ({value})" for name, value in bad.items())
        raise TrainingDiverged(
            f"step {record['step']}: non-finite {what}; "
            f"stopped before saving. {resume}. Lower learning_rate, check bf16 / attention "
            f"(attn_implementation) or the data, then rerun"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Eval-split means; ranks take interleaved batches and make the same number of forwards."""
        evaluation = self.eval
        assert evaluation is not None, "evaluate() runs only when the tokenized artifact has an eval split"
        self.engine.eval()
        per_rank = self.config.per_device_eval_batch_size
        ids = evaluation.ids
        sums = MetricSums(self.engine.device)
        for start in range(0, len(ids), per_rank * self.world):
            mine = ids[start + self.rank * per_rank : start + (self.rank + 1) * per_rank]
            # Under ZeRO-3 a forward gathers parameters collectively: a rank out of examples scores a stand-in.
            state = LossState()  # a frozen copy of the BCO mean, local: ranks may hold different counts here
            state.load_state_dict(self.loss_state.state_dict())
            _, metrics, counts = self._forward_loss(mine if len(mine) else ids[:1], evaluation, state)
            if len(mine):
                sums.add(metrics, len(mine), counts)
            else:
                sums.add_names(metrics)
        means, _ = sums.means()
        self.engine.train()
        self.last_eval_step = self.step
        return {"step": self.step, **{f"eval_{name}": value for name, value in means.items()}}

    def run(self, stop: int) -> None:
        """Optimizer steps from the current one up to ``stop`` (exclusive); a checkpoint there unless it is the end."""
        cadence = self.cadence
        if self.step == 0 and self.eval is not None and self.config.eval_on_start:
            self._log(self.evaluate())
        bar = tqdm(
            total=self.schedule.num_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not is_main_process(),
            dynamic_ncols=True,
        )
        try:
            while self.step < stop:
                if self.tr_dpo is not None:
                    window_logps = self.tr_dpo.before_step(self.step)  # a sync when the step opens a window
                    if window_logps is not None:
                        self.train.reference = window_logps
                        if is_main_process():
                            self.trackers.event("tr_dpo/sync", self.step, self.tr_dpo.last_sync)
                record = self.train_step(self.step)
                self.step += 1
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
                if cadence.due(cadence.logging, self.step) or self.step == self.schedule.num_steps:
                    self._log(record)
                if self.eval is not None and cadence.due(cadence.eval, self.step):
                    self._log(self.evaluate())
                if cadence.due(cadence.save, self.step) and self.step < self.schedule.num_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.step < self.schedule.num_steps and not self._has_checkpoint(self.step):
            self.save_checkpoint()

    def _log(self, record: dict[str, Any]) -> None:
        if is_main_process():
            self.metrics.append(record)
            self.trackers.log(record)

    # ------------------------------------------------------------------ checkpoints
    def _has_checkpoint(self, step: int) -> bool:
        return main_decides(lambda: (self.checkpoint_root / f"step-{step}" / CHECKPOINT_MARKER).is_file())

    def save_checkpoint(self) -> None:
        """DeepSpeed's checkpoint plus per-rank RNG, then the marker with every file's digest, written last.

        The digests are of the files as read back from storage, hashed by all ranks in parallel, so the marker
        vouches for what is on disk; only then are older checkpoints pruned (the last good one survives a
        failed save). A storage fault is one line (:class:`pipeline.errors.StorageError`)."""
        tag = f"step-{self.step}"
        directory = self.checkpoint_root / tag
        if is_main_process():
            (directory / CHECKPOINT_MARKER).unlink(missing_ok=True)  # must not vouch for files being rewritten
        barrier()
        # No 'latest' pointer: the newest intact checkpoint is the one to resume, whatever DeepSpeed wrote.
        client = {"step": self.step, "loss_state": self.loss_state.state_dict()}
        if self.tr_dpo is not None:
            client["tr_dpo"] = self.tr_dpo.state()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        with _checkpoint_storage(directory):
            self.engine.save_checkpoint(
                str(self.checkpoint_root),
                tag=tag,
                save_latest=False,
                client_state=client,
                # LoRA: the frozen base is the model directory's, unchanged; a checkpoint holds the adapters.
                exclude_frozen_parameters=self.config.use_peft,
            )
            if self.tr_dpo is not None:
                self.tr_dpo.started_slices().save(directory)
            with atomic_path(directory / f"rng-rank{self.rank}.pt") as tmp:
                torch.save(rng, tmp)
        barrier()
        names = main_decides(
            lambda: sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".tmp-"))
        )
        digests = {name: hash_file(directory / name) for name in names[self.rank :: self.world]}
        digests = {name: digest for part in all_gather_objects(digests) for name, digest in part.items()}
        if is_main_process():
            atomic_write_json(
                directory / CHECKPOINT_MARKER, {"step": self.step, "resume_key": self.resume_key, "files": digests}
            )
            self._prune_checkpoints()
        barrier()

    def _prune_checkpoints(self) -> None:
        """Main process: delete incomplete checkpoints and all but the newest ``save_total_limit``."""
        complete = [path for _, path in _checkpoints(self.checkpoint_root)]
        limit = self.config.save_total_limit
        keep = set(complete[-limit:] if limit else complete)
        for path in self.checkpoint_root.glob("step-*"):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> dict:
        load_path, client = self.engine.load_checkpoint(
            str(self.checkpoint_root), tag=path.name, load_module_strict=not self.config.use_peft
        )
        if load_path is None:
            raise ArtifactError(f"DeepSpeed could not load checkpoint {path}; delete it to start from the previous one")
        self.step = int(client["step"])
        self.loss_state.load_state_dict(client["loss_state"])
        rng = torch.load(path / f"rng-rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        log.info("resumed from %s at step %d of %d", path, self.step, self.schedule.num_steps)
        return client

    # ------------------------------------------------------------------ saving the policy
    def save_policy(self, out: Path) -> None:
        """The policy and tokenizer as a Hugging Face model directory (ZeRO-3: gathered to the main process);
        with LoRA the adapter (``PeftModel.save_pretrained``), and on request the merged model beside it."""
        zero3 = zero_stage(self.ds_config) == 3
        if self.config.use_peft:
            state = trainable_state_dict(self.engine.module, zero3)
        elif zero3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # any dtype, despite the name
        else:
            state = self.engine.module.state_dict() if is_main_process() else None
        if is_main_process():  # the other ranks go on: whoever reads the model next is rank 0 or waits for it
            _save_hf(self.engine.module, state, out, self.model_dir, self.config.trust_remote_code)
            if self.config.use_peft and self.config.save_merged_model:
                save_merged(out, self.run_dir / MERGED_MODEL, self.model_dir, self.config)

    def finish(self) -> None:
        """Final eval (unless the last step just had one), final model, plots, summary, manifest (last)."""
        if self.eval is not None and self.cadence.final_eval and self.last_eval_step != self.step:
            self._log(self.evaluate())
        self.save_policy(self.run_dir / FINAL_MODEL)
        # Rank 0 alone writes and hashes the outputs; the others are done and need not wait in a collective.
        if is_main_process():
            self._write_outputs()

    def _write_outputs(self) -> None:
        records = self.metrics.records()
        plots = write_plots(records, self.run_dir)
        train, evaluation = last_record(records, "loss"), last_record(records, "eval_loss")
        model_dir = self.run_dir / FINAL_MODEL
        summary = {
            "run_dir": str(self.run_dir),
            "run_name": self.config.run_name or self.run_dir.name,
            "num_steps": self.schedule.num_steps,
            "global_batch_size": self.schedule.global_batch_size,
            "world_size": self.world,
            "train_loss": train.get("loss"),
            "train_reward_accuracy": train.get("rewards/accuracies"),
            "train_reward_margin": train.get("rewards/margins"),
            "eval_loss": evaluation.get("eval_loss"),
            "eval_reward_accuracy": evaluation.get("eval_rewards/accuracies"),
            "eval_reward_margin": evaluation.get("eval_rewards/margins"),
            "train_metrics": train,
            "eval_metrics": evaluation,
            "fingerprints": {
                "train": self.plan.train_fingerprint,
                "tokenized": self.plan.tokenized_fingerprint,
                **{
                    f"reference_{split}": read_manifest(path, kind=REFERENCE_KIND, verify_files=False)["fingerprint"]
                    for split, path in self.reference_dirs.items()
                },
            },
            "paths": {
                "model": str(model_dir),
                **({"merged_model": str(self.run_dir / MERGED_MODEL)} if self.config.save_merged_model else {}),
                "metrics": str(self.run_dir / METRICS_FILE),
                "plots": plots,
                "tokenized": str(self.plan.tokenized_dir),
                **{f"reference_{split}": str(path) for split, path in self.reference_dirs.items()},
            },
            # This call of the stage, from the start (data checks, model load) to here; a resumed run counts its
            # last call only.
            "stage_seconds": round(time.perf_counter() - self.started, 3),
            "throughput": _throughput_summary(records, self.peak),
            **(self.tr_dpo.summary() if self.tr_dpo is not None else {}),
        }
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        self.trackers.close(summary)
        models = [model_dir, *([self.run_dir / MERGED_MODEL] if self.config.save_merged_model else [])]
        files = [str(p.relative_to(self.run_dir)) for d in models if d.is_dir() for p in sorted(d.iterdir())]
        files += [METRICS_FILE, *(str(Path(p).relative_to(self.run_dir)) for p in plots.values())]
        write_manifest(
            self.run_dir,
            kind=KIND,
            schema_version=SCHEMA_VERSION,
            inputs=self.plan.train_inputs,
            files=files,
            counts={"steps": self.schedule.num_steps, "train_examples": len(self.train.ids)},
            model_path=str(model_dir),
            summary=SUMMARY_FILE,
        )


# ---------------------------------------------------------------------------------------------- the stage
def train_stage(
    config: DPOPipelineConfig,
    *,
    stop_step: int | None = None,
    train_reference_dir: Path | None = None,
    plan: Plan | None = None,
) -> Path:
    """Train (or resume) the run of ``config`` up to ``stop_step`` (exclusive) or the end; return the run dir.

    Collective. The reference log-probs are the reference stage's artifact for ``config`` (or
    ``train_reference_dir`` for the train split); under TR-DPO each window's are scored inside the run
    (:mod:`pipeline.train.tr_dpo`). Stopping before the end leaves a checkpoint there (the next call resumes
    exactly). At the end: ``final_model``, ``metrics.jsonl``, plots, ``summary.json`` and ``manifest.json``.
    A complete run dir is returned as is."""
    plan = plan or Plan.of(config)
    run_dir = plan.train_dir
    init_distributed(config)
    check_ranks_agree(config, what={"train": plan.train_fingerprint, "tokenized": plan.tokenized_fingerprint})
    if main_decides(lambda: is_complete(run_dir, kind=KIND, fingerprint=plan.train_fingerprint)):
        log.info("training run %s is complete (same inputs): nothing to do", run_dir)
        return run_dir
    if is_main_process():
        check_trackers(config)  # a tracker that is not installed: one line now, not after the model loads
    started = time.perf_counter()
    recipe = DPOTrainingRecipe(config, plan, train_reference_dir=train_reference_dir)
    recipe.started = started
    end = recipe.schedule.num_steps if stop_step is None else min(stop_step, recipe.schedule.num_steps)
    recipe.check_window(recipe.step, end)
    recipe.setup()
    try:
        recipe.run(end)
        if recipe.step >= recipe.schedule.num_steps:
            recipe.finish()
            log.info("training run written to %s", run_dir)
    except BaseException:
        recipe.trackers.close(failed=True)
        raise
    finally:
        recipe.trackers.close()  # a stop before the end: the run goes on in the next call
        recipe.engine.destroy()
    return run_dir
