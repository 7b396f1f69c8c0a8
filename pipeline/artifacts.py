"""Artifacts: directories of data files plus a ``manifest.json`` that says what made them.

Contract, shared by every stage:

* Every file is written atomically: to a temporary name in the same directory, fsynced, then ``os.replace``d,
  so a reader never sees half a file and a killed writer leaves only a ``.tmp-*`` file that nothing reads.
* The manifest is written last (atomically too) and is the commit marker. It holds the artifact ``kind``, its
  ``schema_version``, the ``fingerprint`` of everything that went into it (``inputs``, hashed canonically),
  ``counts``, and the sha256 of every data file.
* A reader calls :func:`read_manifest` with the fingerprint it expects. It refuses (``ArtifactError``) a
  missing manifest, another kind or schema, another fingerprint, or a data file whose content hash differs
  from the manifest. So a stale cache is never reused silently, and an edited Parquet is never trusted.
* Identity, not only integrity: the reader also recomputes the fingerprint from the manifest's own ``kind``,
  ``schema_version`` and ``inputs``. A manifest whose recorded fingerprint was edited (to make a foreign or
  stale artifact pass for the expected one) no longer matches what it claims to be made from, and is refused.
  What this does not catch is a forger who edits the inputs and the fingerprint consistently: the fingerprint
  is a content address, not a signature (no key), so it guards against accidents and hand edits, not attacks.
* Storage faults a user must fix (no space, a read-only file system, a path component that is a file,
  permission denied) raise one-line :class:`StorageError` s naming the path and what to do, from every write
  here (:func:`storage_errors`); any other ``OSError`` keeps its traceback, as a bug or an unexpected fault
  should. They are refused, never retried: the same write would fail again until the user acts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError, StorageError

MANIFEST = "manifest.json"
_CHUNK = 8 << 20  # 8 MiB reads keep hashing of multi-GB weight files streaming and fast


# ---------------------------------------------------------------------------------------------- hashing
def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values always give equal text (and hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def fingerprint(inputs: Any) -> str:
    """sha256 over the canonical JSON of ``inputs`` (a dict of everything an artifact depends on)."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def hash_file(path: str | Path) -> str:
    """sha256 of a file's content, streamed (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: str | Path, names: Iterable[str]) -> str:
    """One sha256 over several files of a directory: their relative names and content hashes, sorted."""
    root = Path(root)
    return fingerprint({name: hash_file(root / name) for name in sorted(names)})


# Files whose content defines a model's numbers (weights and architecture) and a tokenizer's ids.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_METADATA = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
)


_WEIGHTS_HASHES: dict[tuple, str] = {}
# Where digests of model weights are remembered across processes (one small JSON per model directory).
WEIGHT_DIGESTS_DIR = Path(
    os.environ.get(
        "DPO_PIPELINE_DIGEST_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpo-pipeline" / "weight-digests",
    )
)
REHASH_WEIGHTS = "DPO_PIPELINE_REHASH_WEIGHTS"  # set to 1: hash the weights again, ignore remembered digests


def loaded_weight_files(model_dir: Path) -> list[str]:
    """The weight files ``from_pretrained`` reads: the safetensors when there are any (a Hub snapshot often
    holds the same weights as ``.bin`` too, which would double the hashing), else the pickled formats."""
    files = sorted(p.name for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [name for name in files if name.endswith(".safetensors")]
    return safetensors or files


def model_weights_hash(model_dir: str | Path) -> str:
    """Content hash of a local model directory's loaded weight files and ``config.json`` (streamed).

    A 7B model takes tens of seconds to hash and every stage asks for it (its own fingerprint, its inputs'), on
    every rank of every job. So the digest is computed once and remembered, in this process and on disk
    (:data:`WEIGHT_DIGESTS_DIR`), keyed by each file's (name, size, mtime): a rewritten file changes its mtime
    and is hashed again. Set ``DPO_PIPELINE_REHASH_WEIGHTS=1`` to hash from scratch whatever is remembered."""
    model_dir = Path(model_dir).resolve()
    weights = loaded_weight_files(model_dir)
    if not weights:
        raise ArtifactError(f"no weight files (*.safetensors / *.bin) in model directory {model_dir}")
    names = sorted([*weights, *(n for n in MODEL_METADATA if (model_dir / n).is_file())])
    stats = [[n, (model_dir / n).stat().st_size, (model_dir / n).stat().st_mtime_ns] for n in names]
    key = (str(model_dir), canonical_json(stats))
    rehash = os.environ.get(REHASH_WEIGHTS) == "1"
    if key in _WEIGHTS_HASHES and not rehash:
        return _WEIGHTS_HASHES[key]
    record = WEIGHT_DIGESTS_DIR / f"{fingerprint(str(model_dir))[:24]}.json"
    remembered = None if rehash else _read_digest_record(record)
    if remembered and remembered.get("files") == stats:
        digest = remembered["digest"]
    else:
        digest = hash_files(model_dir, names)
        with contextlib.suppress(OSError):  # a read-only home only costs the next process a re-hash
            atomic_write_json(record, {"model_dir": str(model_dir), "files": stats, "digest": digest})
    _WEIGHTS_HASHES[key] = digest
    return digest


def _read_digest_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tokenizer_hash(model_dir: str | Path) -> str:
    """Content hash of the tokenizer files in a local model directory."""
    model_dir = Path(model_dir)
    names = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not names:
        raise ArtifactError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {model_dir}")
    return hash_files(model_dir, names)


# ---------------------------------------------------------------------------------------------- storage faults
# os.path.exists, not Path.exists: it is False for a path we may not even look at, where Path.exists raises.
def _existing_ancestor(path: Path) -> Path:
    """The deepest of ``path`` and its ancestors that this process can see."""
    return next(p for p in (path, *path.parents) if os.path.exists(p))


def _mount_point(path: Path) -> Path:
    mount = _existing_ancestor(path.absolute())
    while not os.path.ismount(mount):
        mount = mount.parent
    return mount


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a directory (so nothing can be created below)."""
    nearest = next((p for p in path.parents if os.path.exists(p)), None)
    return nearest if nearest is not None and not nearest.is_dir() else None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 30):.1f} GiB" if n_bytes >= 1 << 30 else f"{n_bytes / (1 << 20):.1f} MiB"


def storage_error(exc: OSError, path: str | Path | None = None) -> StorageError | None:
    """The one-line :class:`StorageError` for a write of ``path`` (default: the file ``exc`` names) that failed
    with ``exc``, or None when ``exc`` is not a fault the user fixes, or names no path (the caller then re-raises
    it as it is).

    ``path`` is what was being written (the destination, not a temporary name): the message leads with it.
    Each case says what to do; the mount point, the file in the way or the unwritable directory is found from
    the path, because the exception names only the call that failed (pyarrow's names nothing)."""
    if path is None and not isinstance(exc.filename, (str, bytes, os.PathLike)):
        return None
    path = Path(path if path is not None else os.fsdecode(exc.filename))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        mount = _mount_point(path)
        return StorageError(
            f"cannot write {path}: no space left on {mount} ({_size(shutil.disk_usage(mount).free)} "
            f"free); free space there or choose another output_dir, then rerun (committed artifacts "
            f"are kept and reused)"
        )
    if exc.errno == errno.EROFS:
        return StorageError(
            f"cannot write {path}: {_mount_point(path)} is a read-only file system; choose another output_dir"
        )
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(path)) is not None:
        return StorageError(
            f"cannot write {path}: {blocker} is a file, not a directory; move it away or choose another output_dir"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(
            f"cannot write {path}: permission denied in {_existing_ancestor(path)}; make it "
            f"writable for this user or choose another output_dir"
        )
    return None


@contextlib.contextmanager
def storage_errors(path: str | Path) -> Iterator[None]:
    """Turn the storage faults of writing ``path`` inside the block into one-line :class:`StorageError` s."""
    try:
        yield
    except OSError as exc:
        error = storage_error(exc, path)
        if error is None:
            raise
        raise error from None


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched (old content or absent). A storage
    fault, in this function or in the caller's writing of the temporary file, is a :class:`StorageError`."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside ``path``; on success it replaces ``path`` (a reader sees the old
    directory or the whole new one, never half a model). On an exception the staging directory is removed."""
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
        try:
            yield staging
            if path.exists():
                shutil.rmtree(path)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Atomic, deterministic Parquet: the same table gives byte-identical files on every run."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False, store_schema=True)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"cannot read Parquet file {path}: {exc}") from None


def strictly_increasing(ids: Any, where: str, *, fix: str) -> None:
    """Refuse example ids (a numpy array) that repeat or are out of order, naming the first repeats."""
    import numpy as np

    step = np.diff(ids)
    if np.any(step == 0):
        raise ArtifactError(f"{where}: example_id {ids[1:][step == 0][:5].tolist()} appears more than once; {fix}")
    if np.any(step < 0):
        raise ArtifactError(f"{where}: rows are not in example_id order; {fix}")


# ---------------------------------------------------------------------------------------------- manifests
def write_manifest(
    directory: str | Path,
    *,
    kind: str,
    schema_version: int,
    inputs: dict[str, Any],
    files: Iterable[str],
    counts: dict[str, Any] | None = None,
    name: str = MANIFEST,
    **extra: Any,
) -> dict[str, Any]:
    """Commit an artifact: hash its data files and write the manifest last, atomically.

    ``inputs`` is everything the artifact depends on; its fingerprint is what readers compare. ``extra`` is
    informational (timings, paths) and is not part of the fingerprint."""
    directory = Path(directory)
    manifest = {
        "kind": kind,
        "schema_version": schema_version,
        "fingerprint": expected_fingerprint(kind, schema_version, inputs),
        "inputs": inputs,
        "files": {file: hash_file(directory / file) for file in sorted(files)},
        "counts": counts or {},
        **extra,
    }
    atomic_write_json(directory / name, manifest)
    return manifest


def expected_fingerprint(kind: str, schema_version: int, inputs: dict[str, Any]) -> str:
    """The fingerprint :func:`write_manifest` will record for these inputs (computable before any work)."""
    return fingerprint({"kind": kind, "schema_version": schema_version, "inputs": inputs})


def read_manifest(
    directory: str | Path,
    *,
    kind: str,
    schema_version: int | None = None,
    fingerprint: str | None = None,
    verify_files: bool = True,
    name: str = MANIFEST,
) -> dict[str, Any]:
    """Load and check a manifest; raise ArtifactError saying exactly what does not match."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        raise ArtifactError(f"{kind} artifact at {directory} is missing or incomplete (no {name})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"manifest {path} is not valid JSON: {exc}") from None
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{path} describes a '{manifest.get('kind')}' artifact, expected '{kind}'")
    if schema_version is not None and manifest.get("schema_version") != schema_version:
        raise ArtifactError(
            f"{path} has schema version {manifest.get('schema_version')}, this code reads "
            f"{schema_version}; rebuild the artifact"
        )
    # Identity before the expected fingerprint: an edited fingerprint that now equals the expected one must be
    # refused as edited, not accepted.
    if manifest.get("fingerprint") != expected_fingerprint(
        kind, manifest.get("schema_version"), manifest.get("inputs")
    ):
        raise ArtifactError(
            f"{kind} artifact at {directory}: the fingerprint in {name} does not match the inputs "
            f"it records (edited or corrupt manifest); rerun the {kind} stage"
        )
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"{kind} artifact at {directory} was made from other inputs (fingerprint "
            f"{str(manifest.get('fingerprint'))[:12]}, expected {fingerprint[:12]}); "
            f"rerun the {kind} stage"
        )
    if verify_files:
        for file, digest in manifest.get("files", {}).items():
            if not (directory / file).is_file():
                raise ArtifactError(f"{kind} artifact at {directory}: file {file} listed in {name} is missing")
            if hash_file(directory / file) != digest:
                raise ArtifactError(
                    f"{kind} artifact at {directory}: {file} does not match the hash in {name} "
                    f"(modified or corrupt); rerun the {kind} stage"
                )
    return manifest


def is_complete(directory: str | Path, *, kind: str, fingerprint: str, name: str = MANIFEST) -> bool:
    """True when a committed artifact with exactly this fingerprint (and intact files) is at ``directory``."""
    try:
        read_manifest(directory, kind=kind, fingerprint=fingerprint, name=name)
    except ArtifactError:
        return False
    return True


def artifact_dir(root: str | Path, stage: str, fp: str) -> Path:
    """Content-addressed home of an artifact: ``<output_dir>/<stage>/<fingerprint[:16]>``.

    Addressing by fingerprint means changing one input (say ``beta``) writes a new training artifact next to
    the old one while the tokenized and reference artifacts, whose fingerprints did not change, are reused."""
    return Path(root) / stage / fp[:16]
