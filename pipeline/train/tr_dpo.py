"""TR-DPO inside the one training job: the reference is mixed in place, slice by slice, and re-scores each window.

TR-DPO (Gorbatovski et al. 2024) sets, every tau = ``ref_model_sync_steps`` optimizer steps,
``ref <- alpha * policy + (1 - alpha) * ref`` (alpha = ``ref_model_mixup_alpha``; 1 is the paper's hard
update). TRL does this with the reference resident in the trainer and refuses to combine it with precomputed
reference log-probs, whose cache would go stale. Here the two combine, in the training job itself:

* **Windows.** Training runs in windows of tau steps: window k is steps ``[k*tau, min((k+1)*tau, N))``. The
  data order is fixed in advance (:class:`pipeline.schedule.TrainingSchedule`), so window k's examples are
  known when it starts: they are scored once, with reference version k, into the window's Parquet artifact
  ``windows/<k>/reference``, and window k trains on it. Every example the training consumes costs exactly one
  reference forward (``reference_forwards_per_example`` = 1.00 in ``summary.json``); re-scoring the dataset at
  each sync would cost ``N_windows * dataset / consumed``.
* **Reference slices, not a second model.** Each rank holds only its slice of the reference: partition r of
  every parameter, flattened (under ZeRO-3 exactly DeepSpeed's own partition, ``param.ds_tensor``; under ZeRO
  0-2 the same ceil(n / world) chunking of the replicated parameter), in the module's dtype: 2 or 4 bytes per
  parameter divided by the ranks. Between syncs the slices live in host memory (pinned on GPUs) and cost the
  accelerator nothing; ``ref_slices_on_device: true`` keeps them on the device instead (faster syncs, more
  device memory).
* **The mix is in place, per slice**: ``ref_r <- alpha * policy_r + (1 - alpha) * ref_r``, in float32, stored
  in the module dtype, from the rank's own slice of the policy's module weights. No rank gathers a model, and
  there is no file round trip. Which policy weights are mixed: **the module weights** (under bf16 training the
  bf16 parameters the forward used, not DeepSpeed's fp32 master copy), as TRL's ``SyncRefModelCallback`` mixes
  ``model.parameters()``, and the same under every ZeRO stage.
* **Re-scoring swaps the reference in**: the policy's slices are stashed (host), the reference slices written
  into the very parameters the engine trains (ZeRO-3: the partitions; ZeRO 0-2: all-gathered into the
  replicated tensors), the window is scored by :func:`pipeline.reference.stage.compute_reference_logps` with this
  engine (one implementation: sorted batches, completion-only logits, chunked log-softmax), then the policy is
  written back bit for bit. Chosen over a second inference engine with offloaded parameters, which would hold
  another model's worth of buffers and gather it layer by layer from host memory on every forward.
* **Versions** ``references/v<k>/manifest.json``: v0 is the original model (its weights hash); v(k+1) records
  the previous version's fingerprint, the policy step and the digest of the policy slices it was mixed from,
  and alpha: the chain is reproducible and auditable. The slices themselves are part of every checkpoint
  (``tr-dpo-reference-rank<r>.safetensors``, with their digest in the version manifest), which is all a resume
  needs; ``save_reference_versions: true`` also writes each version's consolidated weights (an export).
* **Resume.** A checkpoint holds the policy, the optimizer and the reference slices of its version; the
  window artifacts are content-addressed by the version's fingerprint. After a kill anywhere (mid-window,
  mid-mix, mid-re-score, mid-checkpoint) the rerun continues from the newest intact checkpoint, redoes any
  sync after it (deterministically: the same slices, the same fingerprints), keeps the committed window
  shards, and ends at the weights of an uninterrupted run.
* **With LoRA** (``use_peft``) the policy is base + adapter and only the adapted weights can move the reference:
  :class:`AdapterReferenceSlices` keeps slices of those base weights alone, mixes in the merged policy
  ``W + s * B @ A`` computed slice by slice, scores with the adapters disabled, and keeps the versions on disk as
  the chain of (alpha, adapter) terms (``references/v<k>/adapter_model.safetensors``) rather than dense slices
  in every checkpoint; a resume rebuilds the slices from the base and the chain, bit for bit.
* **Eval reward accuracy is measured against version 0** (the reference stage's eval artifact), so eval
  numbers stay comparable across windows and with plain DPO.

Trade-offs: a sync stalls training for the mix (a pass over 1/world of the weights) and the window's
re-score (a forward-only pass over its examples, which a resident reference would have spent anyway, padded,
across the window's steps). The slices' host copy costs 2-4 bytes per parameter per node / ranks-per-node.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import (
    atomic_path,
    expected_fingerprint,
    hash_file,
    model_weights_hash,
    read_manifest,
    write_manifest,
)
from pipeline.config import DPOPipelineConfig
from pipeline.distributed import all_gather_objects, device, on_gpu
from pipeline.errors import ArtifactError
from pipeline.layout import BatchLayout
from pipeline.ranks import is_main_process, rank, world_size
from pipeline.reference.cache import ReferenceLogps, load_reference_logps, reference_counts, reference_forward_count
from pipeline.reference.stage import compute_reference_logps
from pipeline.schedule import TrainingSchedule
from pipeline.train.windows import VERSION_KIND, VERSION_SCHEMA, WindowPlan, version_dir, window_dir

log = logging.getLogger(__name__)

SLICES_FILE = "tr-dpo-reference-rank{rank}.safetensors"  # in each checkpoint, one per rank


# ---------------------------------------------------------------------------------------------- slices
def _digest(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ReferenceSlices:
    """This rank's slice of the reference model, beside the policy engine that trains.

    Slice r of a parameter with n elements is the flat range ``[r*c, min((r+1)*c, n))`` with ``c`` the
    partition size: ``param.ds_tensor``'s under ZeRO-3 (DeepSpeed's partition, so no gather is needed to
    read or write it), ``ceil(n / world)`` otherwise. Every method is collective."""

    def __init__(self, engine, zero3: bool, *, on_device: bool):
        self.engine, self.zero3 = engine, zero3
        self.rank, self.world = rank(), world_size()
        self.params = list(self._parameters())
        self.storage = device() if on_device or not on_gpu() else torch.device("cpu")
        self.slices = [self._copy(self._policy_slice(p)) for _, p in self.params]

    def _parameters(self):
        """The parameters whose reference differs from the policy's: all of them."""
        return self.engine.module.named_parameters()

    # ------------------------------------------------------------------ layout
    def _chunk(self, p) -> int:
        return p.ds_tensor.numel() if self.zero3 else math.ceil(p.numel() / self.world)

    def _numel(self, p) -> int:
        return p.ds_numel if self.zero3 else p.numel()

    def _valid(self, p) -> int:
        """Elements of this rank's slice that are the parameter's (a last partition is padded)."""
        chunk = self._chunk(p)
        return max(0, min(chunk, self._numel(p) - self.rank * chunk))

    def _policy_slice(self, p) -> torch.Tensor:
        """A view of this rank's slice of the policy's module weights (valid elements only)."""
        if self.zero3:
            return p.ds_tensor.data.view(-1)[: self._valid(p)]
        chunk = self._chunk(p)
        return p.data.view(-1)[self.rank * chunk : self.rank * chunk + self._valid(p)]

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty(
            tensor.shape, dtype=tensor.dtype, device=self.storage, pin_memory=self.storage.type == "cpu" and on_gpu()
        )
        out.copy_(tensor)
        return out

    # ------------------------------------------------------------------ the mix
    def mix(self, alpha: float) -> None:
        """``ref <- alpha * policy + (1 - alpha) * ref`` on this rank's slices: float32 arithmetic, module dtype."""
        with torch.no_grad():
            for (_, p), ref in zip(self.params, self.slices, strict=True):
                policy = self._policy_slice(p)
                # The operations, in the order, of TRL's SyncRefModelCallback (ref.mul_(1 - alpha).add_(policy,
                # alpha=alpha)), in float32: a resident-reference run gives the same bits.
                if ref.dtype == policy.dtype == torch.float32 and ref.device == policy.device:
                    ref.mul_(1.0 - alpha).add_(policy, alpha=alpha)  # in place: no temporary of the slice's size
                    continue
                mixed = ref.to(policy.device, torch.float32).mul_(1.0 - alpha).add_(policy.float(), alpha=alpha)
                ref.copy_(mixed.to(ref.dtype))

    def digests(self) -> list[str]:
        """Every rank's slice digest, in rank order (what a version manifest records and a resume checks)."""
        return all_gather_objects(_digest(self.slices))

    def sync(self, alpha: float, version: Path) -> str:
        """Mix the policy into the reference (version ``version``'s directory); return the digest of the policy
        weights mixed in."""
        digests = all_gather_objects(_digest([self._policy_slice(p) for _, p in self.params]))
        self.mix(alpha)
        return hashlib.sha256("".join(digests).encode()).hexdigest()

    def restore(self, checkpoint: Path, versions: list[dict[str, Any]], run_dir: Path) -> None:
        """The slices of the last of ``versions`` (their manifests, v0 first), as ``checkpoint`` saved them."""
        self.load(checkpoint, versions[-1]["slice_digests"])

    @contextlib.contextmanager
    def reference_in_engine(self):
        """The engine computes the reference inside the block, and the policy again after it, bit for bit."""
        stash = self.swap_in()
        try:
            yield
        finally:
            self.swap_out(stash)

    # ------------------------------------------------------------------ swapping into the engine
    def _write(self, p, values: torch.Tensor) -> None:
        """Set this rank's slice of ``p`` to ``values``, and the parameter's full copies where they exist
        (ZeRO 0-2: replicated; ZeRO-3: a parameter still gathered, such as the small ``ds_persist`` ones)."""
        if self.zero3:
            self._policy_slice(p).copy_(values)
            if p.data.numel() != p.ds_numel:  # released: the next forward gathers it from the partitions
                return
        chunk = self._chunk(p)
        padded = torch.zeros(chunk, dtype=p.dtype, device=p.data.device)
        padded[: values.numel()] = values
        gathered = torch.empty(chunk * self.world, dtype=p.dtype, device=padded.device)
        if self.world > 1:
            torch.distributed.all_gather_into_tensor(gathered, padded)
        else:
            gathered.copy_(padded)
        p.data.view(-1).copy_(gathered[: self._numel(p)])

    def swap_in(self) -> list[torch.Tensor]:
        """Write the reference into the engine's parameters; return the stashed policy slices."""
        with torch.no_grad():
            self._release_gathered()
            stash = [self._copy(self._policy_slice(p)) for _, p in self.params]
            for (_, p), ref in zip(self.params, self.slices, strict=True):
                self._write(p, ref.to(device()))
            self._release_gathered()
        return stash

    def swap_out(self, stash: list[torch.Tensor]) -> None:
        """Write the stashed policy back into the engine's parameters, bit for bit."""
        with torch.no_grad():
            self._release_gathered()
            for (_, p), policy in zip(self.params, stash, strict=True):
                self._write(p, policy.to(device()))
            self._release_gathered()

    def _release_gathered(self) -> None:
        # ZeRO-3 may keep gathered copies of partitioned parameters between forwards: they must not outlive
        # the partitions they were gathered from.
        if self.zero3:
            self.engine.empty_partition_cache()

    # ------------------------------------------------------------------ checkpoints and export
    def save(self, checkpoint: Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(checkpoint / SLICES_FILE.format(rank=self.rank)) as tmp:
            save_file({name: s.cpu() for (name, _), s in zip(self.params, self.slices, strict=True)}, str(tmp))

    def load(self, checkpoint: Path, expected: list[str]) -> None:
        """This rank's slices from ``checkpoint``, refused unless their digest is the one ``expected``."""
        from safetensors.torch import load_file

        path = checkpoint / SLICES_FILE.format(rank=self.rank)
        try:
            saved = load_file(str(path))
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"TR-DPO reference slice {path} cannot be read ({exc}); delete {checkpoint}") from None
        loaded = [saved[name].to(s.dtype) for (name, _), s in zip(self.params, self.slices, strict=True)]
        if _digest(loaded) != expected[self.rank]:
            raise ArtifactError(
                f"TR-DPO reference slice {path} does not match the digest its version recorded "
                f"(modified or from another run); delete {checkpoint} to resume from an earlier one"
            )
        for target, values in zip(self.slices, loaded, strict=True):
            target.copy_(values)

    def export(self, out: Path, model_dir: Path) -> None:
        """The version's consolidated weights as safetensors (rank 0 writes; parameter by parameter)."""
        from safetensors.torch import save_file

        full = {}
        for (name, p), ref in zip(self.params, self.slices, strict=True):
            chunk = self._chunk(p)
            padded = torch.zeros(chunk, dtype=ref.dtype, device=device())
            padded[: ref.numel()] = ref.to(device())
            gathered = torch.empty(chunk * self.world, dtype=ref.dtype, device=device())
            if self.world > 1:
                torch.distributed.all_gather_into_tensor(gathered, padded)
            else:
                gathered.copy_(padded)
            shape = tuple(p.ds_shape) if self.zero3 else tuple(p.shape)
            if is_main_process():
                full[name] = gathered[: math.prod(shape)].view(shape).cpu().clone()
        if is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / "model.safetensors") as tmp:
                save_file(full, str(tmp), metadata={"format": "pt"})
            (out / "config.json").write_text((model_dir / "config.json").read_text())


class AdapterReferenceSlices(ReferenceSlices):
    """TR-DPO's reference beside a LoRA policy: the reference is ``base + D`` and only the weights that carry
    adapters can differ from the base, so the slices cover those base weights alone (the rest of the reference
    *is* the frozen base the engine holds). A sync mixes the merged policy, ``W + s * B @ A`` (``s`` peft's
    scaling), computed slice by slice from the rows of ``B`` that the slice spans, so no rank ever builds a
    merged weight; re-scoring writes ``W + D`` into the base weights and disables the adapters.

    On disk the versions are the chain of adapters, ``references/v<k>/adapter_model.safetensors`` (what was
    mixed in at sync k, with alpha in the version manifest), not dense slices: a checkpoint then holds the
    adapters and their optimizer state only (a 70B all-linear reference would be ~130 GB of slices per
    checkpoint; its chain is ~40 MB per version). A resume rebuilds the slices from the base and the chain by
    the same float32 mix in the same order, which gives the same bits (checked against the digests the version
    recorded)."""

    ADAPTER_FILE = "adapter_model.safetensors"

    def __init__(self, engine, zero3: bool, *, on_device: bool):
        from peft.tuners.lora import LoraLayer

        # Before super(): it slices self.params. Each LoRA-wrapped layer's base weight, in module order.
        # peft's layers hold their adapters in ModuleDicts by adapter name ("default"): Any, as peft types them.
        self.layers: list[tuple[str, Any]] = [
            (name, m) for name, m in engine.module.named_modules() if isinstance(m, LoraLayer)
        ]
        self._base_params = [(f"{name}.base_layer.weight", m.get_base_layer().weight) for name, m in self.layers]
        super().__init__(engine, zero3, on_device=on_device)

    def _parameters(self):
        return self._base_params

    # ------------------------------------------------------------------ the merged policy
    def _adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (A, B) in full on this rank (ZeRO-3: gathered; an adapter is small)."""
        import deepspeed

        out = {}
        for name, layer in self.layers:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with deepspeed.zero.GatheredParameters([a, b], enabled=self.zero3):
                out[name] = (a.data.detach().clone(), b.data.detach().clone())
        return out

    def _merged_slice(self, layer, p, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``W + s * B @ A`` (float32), from the rows of B the slice spans."""
        base, valid = self._policy_slice(p), self._valid(p)
        if valid == 0:
            return base.float()
        columns = a.shape[1]
        start = self.rank * self._chunk(p)
        first, last = start // columns, -(-(start + valid) // columns)
        delta = (b[first:last].float() @ a.float()).mul_(layer.scaling["default"]).view(-1)
        offset = start - first * columns
        return base.float() + delta[offset : offset + valid].to(base.device)

    def mix_adapters(self, alpha: float, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``ref <- alpha * (W + s * B @ A) + (1 - alpha) * ref`` on this rank's slices (float32 arithmetic, in
        the order of the dense mix)."""
        with torch.no_grad():
            for (name, layer), (_, p), ref in zip(self.layers, self.params, self.slices, strict=True):
                a, b = adapters[name]
                policy = self._merged_slice(layer, p, a.to(p.device), b.to(p.device))
                mixed = ref.to(policy.device, torch.float32).mul_(1.0 - alpha).add_(policy, alpha=alpha)
                ref.copy_(mixed.to(ref.dtype))

    def mix(self, alpha: float) -> None:
        self.mix_adapters(alpha, self._adapters())

    def sync(self, alpha: float, version: Path) -> str:
        """Save the adapter being mixed in as version ``version``'s term of the chain, then mix it."""
        from safetensors.torch import save_file

        adapters = self._adapters()
        path = version / self.ADAPTER_FILE
        if is_main_process():
            tensors = {f"{n}.lora_A": a.cpu().contiguous() for n, (a, _) in adapters.items()}
            tensors |= {f"{n}.lora_B": b.cpu().contiguous() for n, (_, b) in adapters.items()}
            version.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
        digest = all_gather_objects(hash_file(path) if is_main_process() else None)[0]
        self.mix_adapters(alpha, adapters)
        return digest

    def _chain_term(self, path: Path, expected: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file

        if not path.is_file() or hash_file(path) != expected:
            raise ArtifactError(
                f"TR-DPO adapter {path} is missing or does not match the digest its version recorded; delete the "
                f"run's checkpoints to start over"
            )
        saved = load_file(str(path), device=str(device()))
        return {name: (saved[f"{name}.lora_A"], saved[f"{name}.lora_B"]) for name, _ in self.layers}

    def restore(self, checkpoint: Path, versions: list[dict[str, Any]], run_dir: Path) -> None:
        """Rebuild the last version's slices: the base (the engine's frozen weights), then each version's
        (alpha, adapter) term, mixed as the live run mixed them."""
        for k, manifest in enumerate(versions[1:], start=1):
            inputs = manifest["inputs"]
            self.mix_adapters(
                inputs["alpha"], self._chain_term(version_dir(run_dir, k) / self.ADAPTER_FILE, inputs["policy_digest"])
            )
        if self.digests() != versions[-1]["slice_digests"]:
            log.warning(
                "the TR-DPO reference rebuilt from its adapter chain differs in its last bits from the one the run "
                "recorded (a different matmul kernel on this hardware); training continues with the rebuilt one"
            )

    def save(self, checkpoint: Path) -> None:
        """Nothing: the chain of adapters in the version directories is the reference on disk."""

    @contextlib.contextmanager
    def reference_in_engine(self):
        with super().reference_in_engine(), self.engine.module.disable_adapter():
            yield


# ---------------------------------------------------------------------------------------------- the run
class TRDPOWindows:
    """The TR-DPO part of a training run: which version and which window's log-probs the steps use, the sync
    at each window start, the slices in checkpoints. Created by the recipe; every method is collective."""

    def __init__(
        self,
        config: DPOPipelineConfig,
        run_dir: Path,
        model_dir: Path,
        tokenized_dir: Path,
        tokenized_fingerprint: str,
        schedule: TrainingSchedule,
    ):
        self.config, self.run_dir, self.model_dir = config, run_dir, model_dir
        self.tokenized_dir, self.tokenized_fingerprint = tokenized_dir, tokenized_fingerprint
        self.plan = WindowPlan.of(config, schedule)
        self.slices: ReferenceSlices | None = None
        self.layout: BatchLayout | None = None  # the windows' batch layout, set by start()
        self.loaded_window: int | None = None  # the window whose log-probs the steps read now
        self.version = -1
        self.fingerprints: dict[int, str] = {}
        self.digests: list[str] = []  # the current version's slice digest per rank
        self.last_sync: dict[str, Any] = {}  # what the last window start did (a tracker's tr_dpo/sync event)

    def started_slices(self) -> ReferenceSlices:
        """The reference slices; :meth:`start` creates them, and every other method runs after it."""
        assert self.slices is not None, "TRDPOWindows.start() runs first"
        return self.slices

    # ------------------------------------------------------------------ versions
    def _v0_inputs(self) -> dict[str, Any]:
        return {"version": 0, "model_weights": model_weights_hash(self.model_dir)}

    def _commit_version(self, k: int, inputs: dict[str, Any], **timings: float) -> None:
        slices = self.started_slices()
        digests = slices.digests()
        fp = expected_fingerprint(VERSION_KIND, VERSION_SCHEMA, inputs)
        if is_main_process():
            rounded: dict[str, Any] = {k_: round(v, 4) for k_, v in timings.items()}
            write_manifest(
                version_dir(self.run_dir, k),
                kind=VERSION_KIND,
                schema_version=VERSION_SCHEMA,
                inputs=inputs,
                files=[],
                slice_digests=digests,
                world_size=slices.world,
                zero3=slices.zero3,
                **rounded,
            )
        self.fingerprints[k], self.version, self.digests = fp, k, digests

    def _read_version(self, k: int) -> dict[str, Any]:
        return read_manifest(
            version_dir(self.run_dir, k), kind=VERSION_KIND, schema_version=VERSION_SCHEMA, verify_files=False
        )

    def start(
        self, engine, zero3: bool, resumed: Path | None, client: dict | None, step: int, layout: BatchLayout
    ) -> ReferenceLogps:
        """At setup: v0 from the policy's initial weights, or the checkpoint's version and slices on resume;
        returns the log-probs of the window ``step`` is in (synced and scored first where needed). ``layout``:
        the batch layout training found ``engine`` honours, which every window is scored in."""
        self.layout = layout
        kind = AdapterReferenceSlices if self.config.use_peft else ReferenceSlices
        self.slices = kind(engine, zero3, on_device=self.config.ref_slices_on_device)
        if resumed is None:
            self._commit_version(0, self._v0_inputs())
        else:
            state = client.get("tr_dpo") if client else None
            if state is None:
                raise ArtifactError(f"checkpoint {resumed} has no TR-DPO reference state; delete it to start over")
            manifest = self._read_version(state["version"])
            if manifest["fingerprint"] != state["fingerprint"]:
                raise ArtifactError(
                    f"checkpoint {resumed} holds reference version {state['version']} "
                    f"({state['fingerprint'][:12]}), but {version_dir(self.run_dir, state['version'])} "
                    f"records {manifest['fingerprint'][:12]}; delete the checkpoint"
                )
            versions = [self._read_version(v) for v in range(state["version"] + 1)]
            self.slices.restore(resumed, versions, self.run_dir)
            self.fingerprints = {v: state["chain"][str(v)] for v in range(state["version"] + 1)}
            self.version, self.digests = state["version"], manifest["slice_digests"]
        logps = self.before_step(step)
        assert logps is not None, "no window is loaded before start, so before_step loads one"
        return logps

    def state(self) -> dict[str, Any]:
        """What a checkpoint records about the reference (its slices are saved beside it)."""
        return {
            "version": self.version,
            "fingerprint": self.fingerprints[self.version],
            "chain": {str(v): fp for v, fp in self.fingerprints.items()},
        }

    # ------------------------------------------------------------------ windows
    def before_step(self, step: int) -> ReferenceLogps | None:
        """Before step ``step``: sync if it opens a new window, and return the window's log-probs when they
        change (None when the current ones still apply)."""
        k = self.plan.window_of(step)
        if k == self.version and self.loaded_window == k:
            return None
        mix_seconds = None  # no mix: a resumed run's window of its checkpoint's version
        if k > self.version:
            started = time.perf_counter()
            policy_digest = self.started_slices().sync(self.config.ref_model_mixup_alpha, version_dir(self.run_dir, k))
            mix_seconds = time.perf_counter() - started
            inputs = {
                "version": k,
                "previous": self.fingerprints[k - 1],
                "policy_step": step,
                "policy_digest": policy_digest,
                "alpha": self.config.ref_model_mixup_alpha,
            }
            self._commit_version(k, inputs, mix_seconds=mix_seconds)
            if self.config.save_reference_versions:
                self.started_slices().export(version_dir(self.run_dir, k), self.model_dir)
        started = time.perf_counter()
        out = self._score_window(k)
        self.last_sync = {
            "reference_version": k,
            "examples": len(self.plan.example_ids(k)),
            "score_seconds": time.perf_counter() - started,
            **({"mix_seconds": mix_seconds} if mix_seconds is not None else {}),
        }
        if is_main_process():
            start, stop = self.plan.window(k)
            log.info(
                "TR-DPO window %d/%d (steps %d-%d): reference version %d, %d examples scored in %.2f s",
                k + 1,
                len(self.plan.bounds),
                start + 1,
                stop,
                k,
                len(self.plan.example_ids(k)),
                time.perf_counter() - started,
            )
        self.loaded_window = k
        return load_reference_logps(out, split="train", expected_ids=self.plan.example_ids(k))

    def _extra(self, k: int) -> dict[str, Any]:
        return {
            "tr_dpo_window": k,
            "steps": list(self.plan.window(k)),
            "reference_version": k,
            "reference_version_fingerprint": self.fingerprints[k],
        }

    def _score_window(self, k: int) -> Path:
        """Window k's examples scored with version k, in this engine (kept if already committed)."""
        slices = self.started_slices()
        engine = slices.engine
        engine.eval()
        try:
            with slices.reference_in_engine():
                return compute_reference_logps(
                    self.config,
                    tokenized_dir=self.tokenized_dir,
                    out_dir=window_dir(self.run_dir, k),
                    splits=["train"],
                    engine=engine,
                    weights=self.fingerprints[k],
                    example_ids={"train": self.plan.example_ids(k)},
                    extra_inputs=self._extra(k),
                    layout=self.layout,
                )
        finally:
            engine.train()

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        windows = range(len(self.plan.bounds))
        forwards = sum(reference_forward_count(window_dir(self.run_dir, k)) for k in windows)
        consumed = sum(len(self.plan.example_ids(k)) for k in windows)
        versions = [self._read_version(k) for k in windows]
        return {
            "reference_versions": len(self.plan.bounds),
            "reference_forwards_per_example": round(forwards / consumed, 4),
            "tr_dpo": {
                "tau": self.config.ref_model_sync_steps,
                "alpha": self.config.ref_model_mixup_alpha,
                "windows": [list(b) for b in self.plan.bounds],
                "reference_forwards": forwards,
                "consumed_examples": consumed,
                "versions": [str(version_dir(self.run_dir, k)) for k in windows],
                "mix_seconds": [v.get("mix_seconds") for v in versions[1:]],
                "score_seconds": [reference_counts(window_dir(self.run_dir, k))["seconds"] for k in windows],
                "reference_slice_bytes_per_rank": sum(
                    s.numel() * s.element_size() for s in self.started_slices().slices
                ),
            },
        }
