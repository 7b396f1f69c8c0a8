"""The streaming safetensors mix ``out = alpha * policy + (1 - alpha) * reference``: an export and audit tool.

TR-DPO mixes in place inside the training job (:mod:`pipeline.train.tr_dpo`); this module recomputes a version from
saved weights (``save_reference_versions: true`` exports, or any two Hugging Face model directories), e.g. to
audit a version chain or to build a reference offline, with constant memory:

* **Streams** the safetensors files chunk by chunk (plain reads, not mmap: touched map pages stay resident),
  so the peak memory is a few 16 MiB chunks whatever the model size (docs/benchmarks.md, "TR-DPO mixing");
  loading both state dicts costs two models. Arithmetic in float32, stored in the reference's dtype: the same
  as the in-job mix.
* Tensors are matched **by name**, so a policy saved in 5 GB shards mixes against a reference in other shards;
  the reference's file layout (and index) is kept. A mismatch (missing tensor, other shape) is refused.

    python -m pipeline.train.mix REFERENCE_DIR POLICY_DIR OUT_DIR ALPHA
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.artifacts import MANIFEST, WEIGHT_SUFFIXES, atomic_path
from pipeline.errors import ArtifactError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Bytes of float32 per mixed chunk. The mix holds about four chunks at once (reference and policy bytes, their
# float32 views, the output cast), so its peak memory is ~ 4 x this, whatever the model size.
MIX_CHUNK_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit: a larger header means a corrupt file

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
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
            tensors = [
                _Tensor(
                    name,
                    _DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    data_start + info["data_offsets"][0],
                    data_start + info["data_offsets"][1],
                )
                for name, info in json.loads(raw).items()
                if name != "__metadata__"
            ]
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
            raise ArtifactError(
                f"{path} is truncated or has trailing bytes ({path.stat().st_size} bytes, header describes {position})"
            )
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
    raise ArtifactError(
        f"no safetensors weights in {model_dir} (TR-DPO mixes model.safetensors or a sharded "
        f"{SAFETENSORS_INDEX}; re-save the model with save_pretrained(safe_serialization=True))"
    )


class PeakRss:
    """Peak resident memory of this process above its level at start, from Linux's VmHWM.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark to the current RSS, so the reading
    covers this block alone, not whatever the process did before. None where /proc is unavailable."""

    def __enter__(self) -> PeakRss:
        self.delta: int | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start: int | None = _proc_status_bytes("VmRSS")
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
    with PeakRss() as peak, contextlib.ExitStack() as files:
        reference_files = [
            files.enter_context(_SafetensorsFile(reference_dir / name)) for name in safetensors_files(reference_dir)
        ]
        policy_files = [
            files.enter_context(_SafetensorsFile(policy_dir / name)) for name in safetensors_files(policy_dir)
        ]
        policy_tensors = {name: (f, t) for f in policy_files for name, t in f.tensors.items()}
        reference_names, policy_names = {name for f in reference_files for name in f.tensors}, set(policy_tensors)
        if reference_names != policy_names:
            missing, extra = sorted(reference_names - policy_names), sorted(policy_names - reference_names)
            raise ArtifactError(
                f"policy {policy_dir} and reference {reference_dir} have different tensors "
                f"(missing from the policy: {missing[:5]}, only in the policy: {extra[:5]})"
            )
        for source in reference_files:
            _mix_file(source, policy_tensors, out_dir / source.path.name, alpha)
            written.append(source.path.name)
    for path in sorted(reference_dir.iterdir()):
        if (
            path.is_file()
            and path.suffix not in WEIGHT_SUFFIXES
            and path.name != MANIFEST
            and not path.name.startswith(".")
        ):
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
                raise ArtifactError(
                    f"tensor {tensor.name}: policy shape {list(policy_tensor.shape)} != reference "
                    f"shape {list(tensor.shape)}"
                )
            for start in range(0, tensor.numel, chunk):
                stop = min(start + chunk, tensor.numel)
                ref = source.read(tensor, start, stop)
                if ref.is_floating_point():
                    # The same operations, in the same order, as TRL's SyncRefModelCallback on float32 params:
                    # ref.mul_(1 - alpha).add_(policy, alpha=alpha).
                    mixed = ref.to(torch.float32).mul_(1.0 - alpha)
                    mixed.add_(policy_file.read(policy_tensor, start, stop).to(torch.float32), alpha=alpha)
                    ref = mixed.to(tensor.dtype)
                # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12.
                out.write(ref.view(torch.uint8).numpy())  # type: ignore[arg-type]


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python -m pipeline.train.mix REFERENCE_DIR POLICY_DIR OUT_DIR ALPHA")
    print(
        json.dumps(
            mix_safetensors(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])), indent=2
        )
    )
