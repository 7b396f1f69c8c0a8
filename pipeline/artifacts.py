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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError

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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


_WEIGHTS_HASHES: dict[tuple, str] = {}


def model_weights_hash(model_dir: str | Path) -> str:
    """Content hash of a local model directory's weights and ``config.json`` (streamed).

    Remembered per process by each file's (name, size, mtime): stages ask for it several times (their own
    fingerprint, their inputs' fingerprints), and a 7B model takes tens of seconds to hash."""
    model_dir = Path(model_dir).resolve()
    names = sorted(p.name for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_METADATA)
    if not any(Path(n).suffix in WEIGHT_SUFFIXES for n in names):
        raise ArtifactError(f"no weight files (*.safetensors / *.bin) in model directory {model_dir}")
    stats = tuple((n, (model_dir / n).stat().st_size, (model_dir / n).stat().st_mtime_ns) for n in names)
    key = (str(model_dir), stats)
    if key not in _WEIGHTS_HASHES:
        _WEIGHTS_HASHES[key] = hash_files(model_dir, names)
    return _WEIGHTS_HASHES[key]


def tokenizer_hash(model_dir: str | Path) -> str:
    """Content hash of the tokenizer files in a local model directory."""
    model_dir = Path(model_dir)
    names = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not names:
        raise ArtifactError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {model_dir}")
    return hash_files(model_dir, names)


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched (old content or absent)."""
    path = Path(path)
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
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False,
                       store_schema=True)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"cannot read Parquet file {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------- manifests
def write_manifest(directory: str | Path, *, kind: str, schema_version: int, inputs: dict[str, Any],
                   files: Iterable[str], counts: dict[str, Any] | None = None, name: str = MANIFEST,
                   **extra: Any) -> dict[str, Any]:
    """Commit an artifact: hash its data files and write the manifest last, atomically.

    ``inputs`` is everything the artifact depends on; its fingerprint is what readers compare. ``extra`` is
    informational (timings, paths) and is not part of the fingerprint."""
    directory = Path(directory)
    manifest = {
        "kind": kind,
        "schema_version": schema_version,
        "fingerprint": fingerprint({"kind": kind, "schema_version": schema_version, "inputs": inputs}),
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


def read_manifest(directory: str | Path, *, kind: str, schema_version: int | None = None,
                  fingerprint: str | None = None, verify_files: bool = True,
                  name: str = MANIFEST) -> dict[str, Any]:
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
        raise ArtifactError(f"{path} has schema version {manifest.get('schema_version')}, this code reads "
                            f"{schema_version}; rebuild the artifact")
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise ArtifactError(f"{kind} artifact at {directory} was made from other inputs (fingerprint "
                            f"{str(manifest.get('fingerprint'))[:12]}, expected {fingerprint[:12]}); "
                            f"rerun the {kind} stage")
    if verify_files:
        for file, digest in manifest.get("files", {}).items():
            if not (directory / file).is_file():
                raise ArtifactError(f"{kind} artifact at {directory}: file {file} listed in {name} is missing")
            if hash_file(directory / file) != digest:
                raise ArtifactError(f"{kind} artifact at {directory}: {file} does not match the hash in {name} "
                                    f"(modified or corrupt); rerun the {kind} stage")
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
