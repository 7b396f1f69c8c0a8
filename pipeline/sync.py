"""TR-DPO with cached reference log-probs: the reference is refreshed during training, never loaded by it.

TR-DPO (Gorbatovski et al. 2024) sets, every tau = ``ref_model_sync_steps`` optimizer steps,
``ref <- alpha * policy + (1 - alpha) * ref`` (alpha = ``ref_model_mixup_alpha``; 1 is the paper's hard
update). TRL does this with the reference resident in the trainer and refuses to combine it with precomputed
reference log-probs, whose cache would go stale. Here the two combine:

* **Windows.** Training runs in windows of tau steps: window k is steps ``[k*tau, min((k+1)*tau, N))``. The
  data order is fixed in advance (:class:`pipeline.schedule.TrainingSchedule`), so window k's examples are
  known before it starts: the reference pass of window k scores exactly those (each distinct example once),
  with reference version k, into its own Parquet artifact ``windows/<k>/reference``; training window k reads
  it (and refuses one scored with another version). So every example the training consumes costs exactly one
  reference forward (``reference_forwards_per_example`` = 1.00 in ``summary.json``), where re-scoring the
  dataset at each sync would cost ``N_windows * dataset / consumed``. An example that recurs within one window
  (a window longer than an epoch) is scored once: the reference is frozen within the window.
* **Reference versions**, ``references/v<k>``: v0 is the original model (a manifest with its weights hash,
  no copy); v(k+1) = alpha * policy(step end_k) + (1 - alpha) * v(k), computed out of core by
  :func:`mix_safetensors`. Each manifest links the previous version's fingerprint, the policy checkpoint
  (step and content hash) and alpha; each window artifact names the version (and its fingerprint) that scored
  it. The chain from the original model to the final reference is reproducible and auditable.
* **The mix streams** the safetensors files chunk by chunk (plain reads, not mmap: touched map pages stay
  resident), so its peak memory is a few 16 MiB chunks whatever the model size (docs/benchmarks.md, "TR-DPO
  mixing"); loading both state dicts costs two models. Arithmetic in float32, stored in the reference's dtype.
* **Which policy weights are mixed: the module weights** that ``save_pretrained`` writes at the end of the
  window (under bf16 training the bf16 module parameters, not DeepSpeed's fp32 master copy). This is what
  TRL's ``SyncRefModelCallback`` mixes (``model.parameters()``), and it is the policy as a model: the weights
  whose forward gave the policy log-probs, in a standard format under every ZeRO stage (ZeRO-3 gathers them),
  whereas the master weights are an optimizer detail, partitioned in a stage-specific layout. The cost: under
  bf16 the policy's bf16 rounding enters the mix (the reference pass runs the reference in bf16 there anyway).
* **Eval reward accuracy is measured against reference version 0**: the initial reference pass scores only
  the eval split (``reference_stage`` under ``sync_ref_model``), so eval numbers stay comparable across
  windows and with plain DPO; the training loss uses the window's version.
* **Resume.** Every step is idempotent and the driver skips those whose artifact is complete: a kill during a
  window's training resumes from its DeepSpeed checkpoint (one is saved at every window end), during a
  reference pass from its committed shards, during a mix by redoing the mix (files are atomic, the manifest is
  written last). The rerun reaches the same final weights as an uninterrupted run.
* **Executor.** :func:`run_tr_dpo` is one loop over :class:`Step` s; an executor decides how a step runs
  (:func:`run_step`: collective steps as ``launch.run_stage`` jobs, local steps in this process). The Prefect
  flow passes an executor that wraps each step in a Prefect task, e.g.
  ``lambda step, config: task(name=step.name)(run_step)(step, config)``.

Trade-offs: every window pays two job start-ups (launcher, DeepSpeed, model load) and the reference pass of
window k waits for window k-1's mix (no overlap of scoring and training); a real tau (TRL: 512) amortises
both, the shipped demo's tau = 40 does not. Each version and each window's policy checkpoint is a full model
on disk, kept for the audit chain.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import data, distributed, launch, reference, train
from pipeline.artifacts import (
    MANIFEST,
    WEIGHT_SUFFIXES,
    artifact_dir,
    atomic_path,
    expected_fingerprint,
    is_complete,
    model_weights_hash,
    read_manifest,
    write_manifest,
)
from pipeline.config import DPOPipelineConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.schedule import TrainingSchedule

KIND = "reference_version"
SCHEMA_VERSION = 1

__all__ = ["KIND", "SCHEMA_VERSION", "Executor", "InJobExecutor", "Step", "WindowPlan", "mix_safetensors", "mix_window",
           "plan_windows", "reference_version_dir", "reference_window", "run_step", "run_tr_dpo", "safetensors_files",
           "train_window", "window_bounds", "window_reference_dir"]


# ---------------------------------------------------------------------------------------------- windows
def window_bounds(config: DPOPipelineConfig, schedule: TrainingSchedule) -> list[tuple[int, int]]:
    """``[(k*tau, min((k+1)*tau, num_steps)), ...]``: the optimizer steps of each window."""
    tau = config.ref_model_sync_steps
    return [(start, min(start + tau, schedule.num_steps)) for start in range(0, schedule.num_steps, tau)]


@dataclass(frozen=True)
class WindowPlan:
    """The windows of a run: its schedule and each window's steps and examples."""

    schedule: TrainingSchedule
    bounds: list[tuple[int, int]]

    def window(self, k: int) -> tuple[int, int]:
        if not 0 <= k < len(self.bounds):
            raise ConfigError(f"window {k} does not exist: this run has windows 0 to {len(self.bounds) - 1}")
        return self.bounds[k]

    def example_ids(self, k: int) -> np.ndarray:
        """The distinct examples window k consumes, sorted: what its reference pass scores."""
        return np.unique(self.schedule.window_ids(*self.window(k)))

    @property
    def last(self) -> int:
        return len(self.bounds) - 1


def _tokenized_dir(config: DPOPipelineConfig) -> Path:
    return artifact_dir(config.output_path, data.KIND, data.tokenized_fingerprint(config))


def plan_windows(config: DPOPipelineConfig, tokenized_dir: Path | None = None) -> WindowPlan:
    """The windows of ``config``'s run, from its tokenized train split (as the training recipe builds them)."""
    ids = data.load_tokenized(tokenized_dir or _tokenized_dir(config), "train").column("example_id").to_numpy()
    # The ranks of the training job: this job's own inside a launcher, else the ones the driver will launch.
    world = (distributed.world_size() if distributed.under_launcher()
             else config.num_processes * config.num_nodes)
    schedule = TrainingSchedule.from_config(config, ids, world)
    return WindowPlan(schedule, window_bounds(config, schedule))


# The layout of a TR-DPO run inside the training run dir.
def _version_dir(run_dir: Path, k: int) -> Path:
    return run_dir / "references" / f"v{k}"


def _window_dir(run_dir: Path, k: int) -> Path:
    return run_dir / "windows" / str(k) / "reference"


def reference_version_dir(config: DPOPipelineConfig, k: int) -> Path:
    """``<train_run_dir>/references/v<k>``: reference version k (v0: a manifest pointing at the model)."""
    return _version_dir(train.train_dir_for(config), k)


def window_reference_dir(config: DPOPipelineConfig, k: int) -> Path:
    """``<train_run_dir>/windows/<k>/reference``: window k's reference log-probs."""
    return _window_dir(train.train_dir_for(config), k)


@dataclass(frozen=True)
class _Run:
    """A TR-DPO run's places and windows, resolved once per entry point: the run dir's fingerprint hashes the
    model weights, which for a real model is seconds of reading."""

    config: DPOPipelineConfig
    run_dir: Path
    tokenized_dir: Path
    model_dir: Path
    plan: WindowPlan

    @classmethod
    def of(cls, config: DPOPipelineConfig) -> _Run:
        if not config.sync_ref_model:
            raise ConfigError("sync_ref_model: TR-DPO windows need sync_ref_model: true")
        tokenized_dir = _tokenized_dir(config)
        return cls(config, train.train_dir_for(config), tokenized_dir,
                   config.model_dir(), plan_windows(config, tokenized_dir))

    def version_dir(self, k: int) -> Path:
        return _version_dir(self.run_dir, k)

    def version_model_dir(self, k: int) -> Path:
        """The weights of version k: the configured model for v0 (its hash is checked on read), else the version."""
        return self.model_dir if k == 0 else self.version_dir(k)

    def window_dir(self, k: int) -> Path:
        return _window_dir(self.run_dir, k)

    def policy_dir(self, k: int) -> Path:
        """The policy checkpoint at the end of window k."""
        return train.policy_dir_for(self.run_dir, self.plan.window(k)[1])


# ---------------------------------------------------------------------------------------------- versions
def _initial_version_inputs(run: _Run) -> dict[str, Any]:
    return {"version": 0, "model_weights": model_weights_hash(run.model_dir)}


def _initial_version_recorded(run: _Run) -> bool:
    return is_complete(run.version_dir(0), kind=KIND,
                       fingerprint=expected_fingerprint(KIND, SCHEMA_VERSION, _initial_version_inputs(run)))


def _write_initial_version(run: _Run) -> None:
    """v0: the original model, recorded by content hash (no copy). Fails early if it cannot be mixed later."""
    safetensors_files(run.model_dir)
    write_manifest(run.version_dir(0), kind=KIND, schema_version=SCHEMA_VERSION, inputs=_initial_version_inputs(run),
                   files=[], model_dir=str(run.model_dir))


def _read_version(run: _Run, k: int) -> dict[str, Any]:
    """The verified manifest of reference version k; ArtifactError if it is missing, incomplete or modified."""
    directory = run.version_dir(k)
    try:
        manifest = read_manifest(directory, kind=KIND, schema_version=SCHEMA_VERSION)
    except ArtifactError as exc:
        made_by = "the TR-DPO driver" if k == 0 else f"the mix after window {k - 1}"
        raise ArtifactError(f"reference version {k} is not usable ({exc}); it is made by {made_by}: run "
                            f"`dpo-pipeline train` with this config, which resumes where the run stopped") from None
    if manifest["inputs"]["version"] != k:
        raise ArtifactError(f"{directory} holds reference version {manifest['inputs']['version']}, not {k}")
    if k == 0 and model_weights_hash(run.model_dir) != manifest["inputs"]["model_weights"]:
        raise ArtifactError(f"the model {run.model_dir} changed after reference version 0 was recorded at {directory}")
    return manifest


def _version_follows(run: _Run, k: int) -> bool:
    """Version k (k >= 1) is committed and made from the current version k-1, at the end of window k-1, with
    this alpha (the policy's content hash is checked when the mix runs; the run dir fixes the training)."""
    try:
        manifest, previous = (read_manifest(run.version_dir(v), kind=KIND, schema_version=SCHEMA_VERSION,
                                            verify_files=False) for v in (k, k - 1))
    except ArtifactError:
        return False
    inputs = manifest["inputs"]
    return (inputs["previous"] == previous["fingerprint"] and inputs["policy_step"] == run.plan.window(k - 1)[1]
            and inputs["alpha"] == run.config.ref_model_mixup_alpha)


# ---------------------------------------------------------------------------------------------- window steps
def _window_extra(run: _Run, k: int, version_fingerprint: str) -> dict[str, Any]:
    """What a window's reference artifact records about TR-DPO (part of its fingerprint)."""
    return {"tr_dpo_window": k, "steps": list(run.plan.window(k)), "reference_version": k,
            "reference_version_fingerprint": version_fingerprint}


def reference_window(config: DPOPipelineConfig, k: int) -> Path:
    """Score exactly window k's distinct examples with reference version k. Collective (every rank calls it).

    Refuses if version k is not complete; returns at once if the window artifact already is."""
    run = _Run.of(config)
    version = _read_version(run, k)
    return reference.compute_reference_logps(
        config, tokenized_dir=run.tokenized_dir, model_dir=run.version_model_dir(k), out_dir=run.window_dir(k),
        splits=["train"], example_ids={"train": run.plan.example_ids(k)},
        extra_inputs=_window_extra(run, k, version["fingerprint"]))


def _check_window_reference(run: _Run, k: int, *, verify_files: bool) -> None:
    """Window k's reference artifact must have been scored for window k with the current version k."""
    directory = run.window_dir(k)
    manifest = read_manifest(directory, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION,
                             verify_files=verify_files)
    found = manifest["inputs"].get("extra", {})
    expected = _window_extra(run, k, _read_version(run, k)["fingerprint"])
    if found != expected:
        raise ArtifactError(
            f"window {k}: the reference log-probs at {directory} were scored for window "
            f"{found.get('tr_dpo_window')} with reference version {found.get('reference_version')} "
            f"({str(found.get('reference_version_fingerprint'))[:12]}), not for window {k} with version {k} "
            f"({expected['reference_version_fingerprint'][:12]}); delete {directory} and rerun `dpo-pipeline train`")


def train_window(config: DPOPipelineConfig, k: int) -> Path:
    """Train window k: resume from the newest checkpoint, stop at its end, save the policy there. Collective.

    Checks first that window k's reference artifact was scored with version k (clear error otherwise). The eval
    split is scored against the initial reference (version 0, the reference stage's artifact)."""
    run = _Run.of(config)
    _check_window_reference(run, k, verify_files=False)  # the training reader verifies the files
    return train.train_stage(config, stop_step=run.plan.window(k)[1], train_reference_dir=run.window_dir(k),
                             eval_reference_dir=None, save_policy_at_stop=True)


def mix_window(config: DPOPipelineConfig, k: int) -> Path:
    """Reference version k+1 = alpha * policy(end of window k) + (1 - alpha) * version k, out of core.

    Single process. Its manifest links version k's fingerprint, the policy checkpoint (step, content hash) and
    alpha, and records the mix's peak memory. Returns the version dir (at once if it is already complete)."""
    return _mix_window(_Run.of(config), k)


def _mix_window(run: _Run, k: int) -> Path:
    if k == run.plan.last:
        raise ConfigError(f"window {k} is the last one: no reference version follows it")
    previous = _read_version(run, k)
    policy = run.policy_dir(k)
    if not policy.is_dir():
        raise ArtifactError(f"no policy checkpoint at {policy}: window {k} has not finished training")
    alpha = run.config.ref_model_mixup_alpha
    inputs = {"version": k + 1, "previous": previous["fingerprint"], "policy_step": run.plan.window(k)[1],
              "policy_weights": model_weights_hash(policy), "alpha": alpha}
    out = run.version_dir(k + 1)
    if is_complete(out, kind=KIND, fingerprint=expected_fingerprint(KIND, SCHEMA_VERSION, inputs)):
        return out
    (out / MANIFEST).unlink(missing_ok=True)  # must not vouch for the files about to be rewritten
    stats = mix_safetensors(run.version_model_dir(k), policy, out, alpha)
    write_manifest(out, kind=KIND, schema_version=SCHEMA_VERSION, inputs=inputs, files=stats["files"],
                   counts={"tensors": stats["tensors"], "model_bytes": stats["model_bytes"]},
                   mix={"peak_rss_delta_bytes": stats["peak_rss_delta_bytes"], "seconds": stats["seconds"]},
                   model_dir=str(out), previous_dir=str(run.version_dir(k)), policy_dir=str(policy))
    return out


# ---------------------------------------------------------------------------------------------- the driver
@dataclass(frozen=True)
class Step:
    """One unit of the TR-DPO driver.

    ``fn`` is what the step does in one process. A collective step (``stage`` set) is meant to run as the job
    ``dpo-pipeline <stage> --config ... <args>`` with ``num_processes`` ranks, each of which calls exactly
    ``fn`` (the CLI routes ``--window K`` to it); with one process ``fn()`` may also be called directly. A
    local step (``stage`` None) runs ``fn()`` in the driver's process. ``artifact`` is the directory the step
    completes: a key for caching and progress display."""

    name: str  # unique in a run: tokenize, reference-eval, reference-window-<k>, train-window-<k>, mix-window-<k>
    artifact: Path
    fn: Callable[[], Any]
    stage: str | None = None
    args: tuple[str, ...] = ()


Executor = Callable[[Step, DPOPipelineConfig], None]


def run_step(step: Step, config: DPOPipelineConfig) -> None:
    """The default executor: a collective step as a launcher job (its output printed), a local one inline."""
    if step.stage is None:
        step.fn()
    else:
        launch.run_stage(step.stage, config, extra_args=step.args, on_line=print)


class InJobExecutor:
    """The executor inside a launcher's job (torchrun, deepspeed, srun, mpirun started every rank): each rank
    runs the driver, collective steps in-process on all ranks together, local steps (tokenize, mix) on rank 0
    while the others wait, and every skip decision is rank 0's (:func:`pipeline.distributed.main_decides`)."""

    def __init__(self, config: DPOPipelineConfig):
        distributed.init_distributed(config)

    def __call__(self, step: Step, config: DPOPipelineConfig) -> None:
        if step.stage is not None:
            step.fn()
            return
        if distributed.is_main_process():
            step.fn()
        distributed.barrier()

    decide = staticmethod(distributed.main_decides)


def _decide(execute: Executor, question: Callable[[], bool]) -> bool:
    """The executor's answer to a skip question (rank 0's inside a job), else the question asked here."""
    decide = getattr(execute, "decide", None)
    return decide(question) if decide else question()


def _committed(directory: Path, kind: str) -> bool:
    """A content-addressed artifact (``<stage>/<fingerprint[:16]>``) whose manifest is there and matches."""
    try:
        return read_manifest(directory, kind=kind)["fingerprint"][:16] == directory.name
    except ArtifactError:
        return False


def _window_reference_complete(run: _Run, k: int) -> bool:
    try:
        _check_window_reference(run, k, verify_files=True)
    except ArtifactError:
        return False
    return True


def run_tr_dpo(config: DPOPipelineConfig, executor: Executor | None = None) -> Path:
    """Run (or resume) TR-DPO training: tokenize, the initial eval reference pass, then for each window its
    reference pass, its training and the mix that makes the next version. Returns the training run dir.

    Steps whose artifact is complete are skipped, so rerunning after a kill anywhere continues the run. Ends by
    adding ``reference_versions`` and ``reference_forwards_per_example`` (and a ``tr_dpo`` block) to
    ``summary.json``."""
    if not config.sync_ref_model:
        raise ConfigError("sync_ref_model: the TR-DPO driver needs sync_ref_model: true")
    execute = executor or run_step
    tokenized = _tokenized_dir(config)
    if not _decide(execute, lambda: is_complete(tokenized, kind=data.KIND,
                                                fingerprint=data.tokenized_fingerprint(config))):
        execute(Step("tokenize", tokenized, partial(data.tokenize_stage, config)), config)
    eval_reference = reference.reference_dir_for(config)
    if not _decide(execute, lambda: _committed(eval_reference, reference.KIND)):
        execute(Step("reference-eval", eval_reference, partial(reference.reference_stage, config), "reference"),
                config)
    run = _Run.of(config)
    if not _decide(execute, lambda: _initial_version_recorded(run)):
        if distributed.is_main_process():
            _write_initial_version(run)
        distributed.barrier()
    for k in range(len(run.plan.bounds)):
        last = k == run.plan.last
        if not last and _decide(execute, partial(_version_follows, run, k + 1)):
            continue  # window k trained and mixed
        trained = (partial(_committed, run.run_dir, train.KIND) if last else run.policy_dir(k).is_dir)
        if not _decide(execute, trained):
            window = ("--window", str(k))
            if not _decide(execute, partial(_window_reference_complete, run, k)):
                execute(Step(f"reference-window-{k}", run.window_dir(k), partial(reference_window, config, k),
                             "reference", window), config)
            execute(Step(f"train-window-{k}", run.run_dir if last else run.policy_dir(k),
                         partial(train_window, config, k), "train", window), config)
        if not last:
            execute(Step(f"mix-window-{k}", run.version_dir(k + 1), partial(_mix_window, run, k)), config)
    if distributed.is_main_process():
        _write_summary(run)
    distributed.barrier()
    return run.run_dir


def _write_summary(run: _Run) -> None:
    windows = range(len(run.plan.bounds))
    forwards = sum(reference.reference_forward_count(run.window_dir(k)) for k in windows)
    consumed = sum(len(run.plan.example_ids(k)) for k in windows)
    train.update_summary(
        run.run_dir,
        reference_versions=len(run.plan.bounds),
        reference_forwards_per_example=round(forwards / consumed, 4),
        tr_dpo={"tau": run.config.ref_model_sync_steps, "alpha": run.config.ref_model_mixup_alpha,
                "windows": [list(b) for b in run.plan.bounds], "reference_forwards": forwards,
                "consumed_examples": consumed, "versions": [str(run.version_dir(k)) for k in windows]})


# ---------------------------------------------------------------------------------------------- streaming mix
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Bytes of float32 per mixed chunk. The mix holds about four chunks at once (reference and policy bytes, their
# float32 views, the output cast), so its peak memory is ~ 4 x this, whatever the model size.
MIX_CHUNK_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit: a larger header means a corrupt file

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def numel(self) -> int:
        return (self.end - self.begin) // self.dtype.itemsize


class _SafetensorsFile:
    """One ``.safetensors`` file: its raw header, its tensors in file order, and chunked reads with ``readinto``.

    Plain reads rather than ``safe_open``'s mmap: every page of a memory map that has been touched stays in
    the process's resident set until the map is closed, so streaming a model through a map looks (and, under
    memory pressure, behaves) like holding it. A read into a chunk-sized buffer keeps the resident set at one
    chunk; the page cache still serves repeated reads."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < size <= _MAX_HEADER_BYTES:
                raise ArtifactError(f"{path} is not a safetensors file (bad header length)")
            raw = handle.read(size)
        self.header_bytes = prefix + raw
        data_start = 8 + size
        try:
            tensors = [_Tensor(name, _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + info["data_offsets"][0],
                               data_start + info["data_offsets"][1])
                       for name, info in json.loads(raw).items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:  # JSONDecodeError is a ValueError
            raise ArtifactError(f"{path} is not a safetensors file (bad header: {exc!r})") from None
        tensors.sort(key=lambda t: t.begin)
        # A valid file packs its tensors back to back from the end of the header to the end of the file; the
        # mixed file reuses this header verbatim, so it must describe exactly that layout.
        position = data_start
        for tensor in tensors:
            if tensor.begin != position or tensor.end - tensor.begin != tensor.dtype.itemsize * math.prod(tensor.shape):
                raise ArtifactError(f"{path}: tensor {tensor.name} has inconsistent data offsets")
            position = tensor.end
        if position != path.stat().st_size:
            raise ArtifactError(f"{path} is truncated or has trailing bytes ({path.stat().st_size} bytes, header "
                                f"describes {position})")
        self.tensors = {tensor.name: tensor for tensor in tensors}
        self._handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by __exit__

    def __enter__(self) -> _SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def read(self, tensor: _Tensor, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of ``tensor`` (flattened) as a new 1-D tensor of its dtype."""
        size = tensor.dtype.itemsize
        buffer = bytearray((stop - start) * size)
        self._handle.seek(tensor.begin + start * size)
        if self._handle.readinto(buffer) != len(buffer):
            raise ArtifactError(f"{self.path}: short read in tensor {tensor.name} (file changed while mixing?)")
        return torch.frombuffer(buffer, dtype=tensor.dtype)


def safetensors_files(model_dir: Path) -> list[str]:
    """The safetensors weight files of a Hugging Face model directory (sharded or not), by name."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{index} is not a valid safetensors index ({exc})") from None
        return sorted(set(weight_map.values()))
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return [SAFETENSORS_SINGLE]
    raise ArtifactError(f"no safetensors weights in {model_dir} (TR-DPO mixes model.safetensors or a sharded "
                        f"{SAFETENSORS_INDEX}; re-save the model with save_pretrained(safe_serialization=True))")


class _PeakRss:
    """Peak resident memory of this process above its level at start, from Linux's VmHWM.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark to the current RSS, so the reading
    covers this block alone, not whatever the process did before. None where /proc is unavailable."""

    def __enter__(self) -> _PeakRss:
        self.delta: int | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _proc_status_bytes("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.delta = max(0, _proc_status_bytes("VmHWM") - self._start)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def mix_safetensors(reference_dir: Path, policy_dir: Path, out_dir: Path, alpha: float) -> dict:
    """Write ``alpha * policy + (1 - alpha) * reference`` to ``out_dir``, streaming, and return statistics.

    Every floating tensor is mixed chunk by chunk in float32 and stored in the reference's dtype, so the
    output has the reference's exact layout: its header (and shard index) are copied verbatim and each
    tensor's bytes are written in file order. Non-floating tensors (integer buffers) are not parameters and
    are copied from the reference. The policy may be sharded differently and use another dtype; its tensor
    names and shapes must match. Other files of the reference (config, tokenizer) are copied, so ``out_dir``
    loads with ``from_pretrained``. Each file is written atomically; the caller writes the manifest.

    Returns ``files`` (written, by name), ``tensors``, ``model_bytes`` (the reference's weight bytes, equal to
    the output's), ``peak_rss_delta_bytes`` (peak resident memory above the level at the call, None off
    Linux) and ``seconds``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    reference_dir, policy_dir, out_dir = Path(reference_dir), Path(policy_dir), Path(out_dir)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # atomic_path's temporaries, left by a killed mix; never read
        stale.unlink()
    written: list[str] = []
    with _PeakRss() as peak, contextlib.ExitStack() as files:
        reference_files = [files.enter_context(_SafetensorsFile(reference_dir / name))
                           for name in safetensors_files(reference_dir)]
        policy_files = [files.enter_context(_SafetensorsFile(policy_dir / name))
                        for name in safetensors_files(policy_dir)]
        policy_tensors = {name: (f, t) for f in policy_files for name, t in f.tensors.items()}
        reference_names, policy_names = {name for f in reference_files for name in f.tensors}, set(policy_tensors)
        if reference_names != policy_names:
            missing, extra = sorted(reference_names - policy_names), sorted(policy_names - reference_names)
            raise ArtifactError(f"policy {policy_dir} and reference {reference_dir} have different tensors "
                                f"(missing from the policy: {missing[:5]}, only in the policy: {extra[:5]})")
        for source in reference_files:
            _mix_file(source, policy_tensors, out_dir / source.path.name, alpha)
            written.append(source.path.name)
    for path in sorted(reference_dir.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.name != MANIFEST \
                and not path.name.startswith("."):
            with atomic_path(out_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)
            written.append(path.name)
    return {
        "files": sorted(written),
        "tensors": len(reference_names),
        "model_bytes": sum(f.path.stat().st_size for f in reference_files),
        "peak_rss_delta_bytes": peak.delta,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _mix_file(source: _SafetensorsFile, policy_tensors: dict, target: Path, alpha: float) -> None:
    chunk = MIX_CHUNK_BYTES // 4
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(source.header_bytes)
        for tensor in source.tensors.values():
            policy_file, policy_tensor = policy_tensors[tensor.name]
            if policy_tensor.shape != tensor.shape:
                raise ArtifactError(f"tensor {tensor.name}: policy shape {list(policy_tensor.shape)} != reference "
                                    f"shape {list(tensor.shape)}")
            for start in range(0, tensor.numel, chunk):
                stop = min(start + chunk, tensor.numel)
                ref = source.read(tensor, start, stop)
                if ref.is_floating_point():
                    # The same operations, in the same order, as TRL's SyncRefModelCallback on float32 params:
                    # ref.mul_(1 - alpha).add_(policy, alpha=alpha).
                    mixed = ref.to(torch.float32).mul_(1.0 - alpha)
                    mixed.add_(policy_file.read(policy_tensor, start, stop).to(torch.float32), alpha=alpha)
                    ref = mixed.to(tensor.dtype)
                out.write(ref.view(torch.uint8).numpy())
