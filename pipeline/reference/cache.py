"""The reference artifact's format, its writer and its verified reader: what training and TR-DPO import.

``<output_dir>/reference/<fingerprint[:16]>/`` holds one Parquet shard per contiguous range of example ids of
one split, ``{split}-{index:05d}.parquet`` with the columns of :data:`SCHEMA` (float32 sums of completion
log-probs; public = over the first min(|y_w|, |y_l|) completion tokens, for LD-DPO; int32 completion lengths),
rows in ``example_id`` order. Each shard carries ``<fingerprint>:<split>:<index>`` in its Parquet metadata and
has a ``<shard>.sha256`` digest written once the shard is durable; ``manifest.json`` comes last, with
``shards`` (per split, in order), ``counts`` (``examples``, ``examples_by_split``, ``forwards``, ``seconds``,
...) and the ``inputs`` below. Everything here is numpy and pyarrow: reading a cache needs no torch.

The fingerprint's inputs (:func:`reference_inputs`): the tokenized artifact's fingerprint, a content hash of
the reference weights, the dtype, the splits (and the example-id subset, if any), caller inputs such as
TR-DPO's window, and the schema version. Batch size, shard size and process count change no value beyond float
rounding and are left out, so a resume may use other ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    MANIFEST,
    atomic_write_text,
    fingerprint,
    hash_file,
    read_manifest,
    strictly_increasing,
    write_parquet,
)
from pipeline.config import DPOPipelineConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.tokenize.artifact import SPLIT_FILES

KIND = "reference"
SCHEMA_VERSION = 1
SPLITS = tuple(SPLIT_FILES)  # "train", "eval"
# The config fields the artifact depends on besides the tokenized artifact and the weights: the dtype it
# scores in (:func:`dtype_name`) and which splits it scores (:func:`scored_splits`).
REFERENCE_FIELDS = frozenset(
    {
        "bf16",
        "sync_ref_model",
        # QLoRA: the reference is the quantised base the adapters train on (dtype_name says which)
        "load_in_4bit",
        "load_in_8bit",
        "bnb_4bit_quant_type",
        "use_bnb_nested_quant",
        "bnb_4bit_quant_storage",
    }
)

SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("ref_chosen_logps", pa.float32(), nullable=False),
        pa.field("ref_rejected_logps", pa.float32(), nullable=False),
        pa.field("ref_chosen_public_logps", pa.float32(), nullable=False),
        pa.field("ref_rejected_public_logps", pa.float32(), nullable=False),
        pa.field("chosen_length", pa.int32(), nullable=False),
        pa.field("rejected_length", pa.int32(), nullable=False),
    ]
)
VALUE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_public_logps", "ref_rejected_public_logps")
_META_KEY = b"reference"  # Parquet key-value metadata of a shard: which artifact, split and shard it belongs to
NAMED_IDS = 5  # ids quoted in an error message


# ---------------------------------------------------------------------------------------------- fingerprint
def dtype_name(config: DPOPipelineConfig) -> str:
    """The dtype the reference model scores in: bf16 when ``bf16`` is set, else fp32; a quantised base (QLoRA)
    adds its bitsandbytes format, e.g. ``nf4-nested/bfloat16``."""
    compute = "bfloat16" if config.bf16 else "float32"
    if config.load_in_8bit:
        return f"int8/{compute}"
    if config.load_in_4bit:
        nested = "-nested" if config.use_bnb_nested_quant else ""
        storage = f"-{config.bnb_4bit_quant_storage}" if config.bnb_4bit_quant_storage else ""
        return f"{config.bnb_4bit_quant_type}{nested}{storage}/{compute}"
    return compute


def scored_splits(config: DPOPipelineConfig, present: Sequence[str]) -> list[str]:
    """The splits the reference stage scores, of those the dataset has: train + eval; only eval under TR-DPO,
    whose train windows are scored inside the training job, each with its own reference."""
    return [split for split in SPLITS if split in present and not (split == "train" and config.sync_ref_model)]


def reference_inputs(
    *,
    tokenized_fingerprint: str,
    weights_hash: str,
    dtype: str,
    splits: Sequence[str],
    example_ids: Mapping[str, Sequence[int] | np.ndarray] | None = None,
    extra_inputs: Mapping | None = None,
) -> dict[str, Any]:
    """Every input of a reference artifact's fingerprint, in one place."""
    return {
        "tokenized": tokenized_fingerprint,
        "reference_weights": weights_hash,
        "dtype": dtype,
        "splits": list(splits),
        # A subset is identified by the hash of its sorted ids; None means every example of the split.
        "example_ids": {
            split: fingerprint(sorted(int(i) for i in ids)) for split, ids in sorted((example_ids or {}).items())
        },
        "extra": dict(extra_inputs or {}),
    }


# ---------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    example_ids: np.ndarray  # sorted

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"

    def metadata(self, fp: str) -> bytes:
        return f"{fp}:{self.split}:{self.index}".encode()


def _digest_path(out_dir: Path, shard: Shard) -> Path:
    return out_dir / f"{shard.name}.sha256"


def committed_shards(out_dir: Path, plan: Sequence[Shard], fp: str) -> set[str]:
    """Shards of ``plan`` already in ``out_dir`` from an interrupted run of the same fingerprint.

    A shard is kept only when its content still has the sha256 recorded when it was committed (the digest
    file is written after the shard is durable): a byte flipped since, even one that leaves the file readable
    with the right ids and finite values, makes it be recomputed. Its metadata must also name this artifact
    and shard, and its ids be exactly the planned ones."""
    kept = set()
    for shard in plan:
        path = out_dir / shard.name
        try:
            digest = _digest_path(out_dir, shard).read_text().strip()
            if not path.is_file() or hash_file(path) != digest:
                continue
            table = pq.read_table(path)
        except (OSError, pa.ArrowException):
            continue
        if (
            (table.schema.metadata or {}).get(_META_KEY) == shard.metadata(fp)
            and table.schema.remove_metadata() == SCHEMA
            and np.array_equal(table.column("example_id").to_numpy(), shard.example_ids)
            and all(np.isfinite(table.column(name).to_numpy()).all() for name in VALUE_COLUMNS)
        ):
            kept.add(shard.name)
    return kept


def write_shard(out_dir: Path, shard: Shard, fp: str, results: Sequence[dict[str, np.ndarray]]) -> None:
    """Rank 0: merge the ranks' results into example_id order, check coverage, write atomically, then record
    the shard's digest (what a resumed pass checks before keeping it)."""
    merged = {name: np.concatenate([r[name] for r in results]) for name in SCHEMA.names}
    order = np.argsort(merged["example_id"], kind="stable")
    merged = {name: values[order] for name, values in merged.items()}
    if not np.array_equal(merged["example_id"], shard.example_ids):
        raise RuntimeError(f"reference shard {shard.name}: gathered ids do not match the plan")  # a bug, not input
    table = pa.table(merged, schema=SCHEMA.with_metadata({_META_KEY: shard.metadata(fp)}))
    _digest_path(out_dir, shard).unlink(missing_ok=True)  # a digest must never vouch for the file being replaced
    try:
        write_parquet(table, out_dir / shard.name)
    except OSError as exc:
        raise ArtifactError(f"writing reference shard {out_dir / shard.name} failed: {exc}") from exc
    atomic_write_text(_digest_path(out_dir, shard), hash_file(out_dir / shard.name) + "\n")


def usable(out_dir: Path, splits: Sequence[str]) -> str | None:
    """Why a complete-looking artifact cannot be used (a NaN, a missing or modified file), or None."""
    try:
        for split in splits:
            load_reference_logps(out_dir, split=split)
    except ArtifactError as exc:
        return str(exc)
    return None


def plan_shards(ids_by_split: Mapping[str, np.ndarray], shard_size: int) -> list[Shard]:
    """The shards of an artifact: each split's sorted example ids cut into runs of ``shard_size``."""
    if shard_size <= 0:
        raise ConfigError(f"shard_size must be > 0, got {shard_size}")
    return [
        Shard(split, index, ids[start : start + shard_size])
        for split, ids in ids_by_split.items()
        for index, start in enumerate(range(0, len(ids), shard_size))
    ]


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ReferenceLogps:
    """One split of a reference artifact, sorted by example_id; float32 sums and int32 completion lengths."""

    split: str
    example_ids: np.ndarray  # int64, strictly increasing
    chosen: np.ndarray  # ref_chosen_logps
    rejected: np.ndarray  # ref_rejected_logps
    chosen_public: np.ndarray  # ref_chosen_public_logps
    rejected_public: np.ndarray  # ref_rejected_public_logps
    chosen_lengths: np.ndarray
    rejected_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.example_ids)

    def take(self, ids: Sequence[int] | np.ndarray) -> ReferenceLogps:
        """The rows of ``ids``, in that order (repeats allowed); an id the artifact lacks is refused."""
        wanted = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.example_ids, wanted).clip(max=max(len(self.example_ids) - 1, 0))
        absent = wanted[self.example_ids[pos] != wanted] if len(self.example_ids) else wanted
        if absent.size:
            raise ArtifactError(
                f"reference log-probs ({self.split}) have no example_id "
                f"{absent[:NAMED_IDS].tolist()}; the reference artifact does not match the data"
            )
        return ReferenceLogps(
            self.split,
            wanted,
            *(
                values[pos]
                for values in (
                    self.chosen,
                    self.rejected,
                    self.chosen_public,
                    self.rejected_public,
                    self.chosen_lengths,
                    self.rejected_lengths,
                )
            ),
        )


def load_reference_logps(
    ref_dir: Path, *, split: str, expected_ids: Sequence[int] | np.ndarray | None = None, fingerprint: str | None = None
) -> ReferenceLogps:
    """Read and verify one split of a reference artifact.

    Refuses (ArtifactError) an incomplete artifact, another fingerprint than ``fingerprint``, modified files,
    duplicate or missing example ids (against ``expected_ids``, else the manifest's count), non-finite values."""
    ref_dir = Path(ref_dir)
    manifest = read_manifest(ref_dir, kind=KIND, schema_version=SCHEMA_VERSION, fingerprint=fingerprint)
    if split not in manifest["shards"]:
        raise ArtifactError(
            f"reference artifact at {ref_dir} has no {split} split (it holds {', '.join(manifest['shards']) or 'none'})"
        )
    tables = [pq.read_table(ref_dir / name).replace_schema_metadata(None) for name in manifest["shards"][split]]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    where = f"reference artifact at {ref_dir}, split {split}"
    ids = table.column("example_id").to_numpy()
    strictly_increasing(ids, where, fix="rerun the reference stage")
    for name in VALUE_COLUMNS:
        values = table.column(name).to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            raise ArtifactError(f"{where}: {name} is not finite for example_id {ids[bad][:NAMED_IDS].tolist()}")
    if expected_ids is not None:
        expected = np.unique(np.asarray(list(expected_ids), dtype=np.int64))
        missing, extra = np.setdiff1d(expected, ids), np.setdiff1d(ids, expected)
        if missing.size:
            raise ArtifactError(
                f"{where}: {missing.size} expected example_ids are missing, e.g. "
                f"{missing[:NAMED_IDS].tolist()}; rerun the reference stage"
            )
        if extra.size:
            raise ArtifactError(
                f"{where}: {extra.size} example_ids are not expected, e.g. "
                f"{extra[:NAMED_IDS].tolist()}; the artifact was made for other data"
            )
    elif len(ids) != manifest["counts"]["examples_by_split"][split]:
        raise ArtifactError(
            f"{where}: {len(ids)} rows, the manifest says {manifest['counts']['examples_by_split'][split]}"
        )
    column = table.column
    chosen, rejected, chosen_public, rejected_public = (column(n).to_numpy() for n in VALUE_COLUMNS)
    return ReferenceLogps(
        split,
        ids.astype(np.int64),
        chosen,
        rejected,
        chosen_public,
        rejected_public,
        column("chosen_length").to_numpy(),
        column("rejected_length").to_numpy(),
    )


def reference_counts(ref_dir: Path) -> dict[str, Any]:
    """What the pass that made this artifact did (``examples``, ``forwards``, ``seconds``, ...), from its manifest."""
    return read_manifest(ref_dir, kind=KIND, schema_version=SCHEMA_VERSION, verify_files=False)["counts"]


def reference_forward_count(ref_dir: Path) -> int:
    """Examples this artifact scored with the reference model (all its splits), from the manifest."""
    return int(reference_counts(ref_dir)["examples"])


def check_made_from(ref_dir: Path, tokenized_fingerprint: str, weights_hash: str | None = None) -> None:
    """Refuse a reference artifact made from another tokenized artifact (or, given ``weights_hash``, scored
    with other weights), or one whose directory holds another artifact than its name says."""
    if not (Path(ref_dir) / MANIFEST).is_file():
        raise ArtifactError(
            f"no reference artifact for this config at {ref_dir}: run the reference stage first "
            f"(dpo-pipeline reference --config ...; `dpo-pipeline run` runs every stage)"
        )
    manifest = read_manifest(ref_dir, kind=KIND, schema_version=SCHEMA_VERSION, verify_files=False)
    made_from = manifest["inputs"]["tokenized"]
    if made_from != tokenized_fingerprint:
        raise ArtifactError(
            f"reference artifact at {ref_dir} was made from another tokenized artifact "
            f"({made_from[:12]}, this run's is {tokenized_fingerprint[:12]}); rerun the reference "
            f"stage"
        )
    if weights_hash is not None and manifest["inputs"]["reference_weights"] != weights_hash:
        raise ArtifactError(
            f"reference artifact at {ref_dir} was scored with other model weights than the "
            f"policy's initial model; rerun the reference stage"
        )
    if manifest["fingerprint"][:16] != ref_dir.name and ref_dir.parent.name == KIND:
        raise ArtifactError(
            f"reference artifact at {ref_dir} holds another artifact (fingerprint "
            f"{manifest['fingerprint'][:16]}, not its directory's name); rerun the reference stage"
        )
