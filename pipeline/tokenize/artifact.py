"""The ``tokenized`` artifact's format: its schema, its files and the verified reader later stages use.

One row per kept pair, sorted by ``example_id``; ``{train,eval}.parquet`` and ``manifest.json`` (written
last) under ``<output_dir>/tokenized/<fingerprint[:16]>/``. The stage that writes it is :mod:`.stage`.
"""

from __future__ import annotations

from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.artifacts import (
    MANIFEST,
    expected_fingerprint,
    read_manifest,
    read_parquet,
    strictly_increasing,
    tokenizer_hash,
)
from pipeline.config import DPOPipelineConfig
from pipeline.errors import ArtifactError
from pipeline.models import resolve_model_dir
from pipeline.tokenize.mixture import settings as mixture_settings
from pipeline.tokenize.sources import SplitSource, resolve_sources
from pipeline.tokenize.truncation import TRUNCATION_FIELDS, Truncation

SCHEMA_VERSION = 1
KIND = "tokenized"
SPLIT_FILES = {"train": "train.parquet", "eval": "eval.parquet"}
# The config fields the artifact depends on (the model through its tokenizer's files, the dataset through its
# bytes): what :func:`tokenized_inputs` reads. Later artifacts see them through the tokenized fingerprint.
TOKENIZE_FIELDS = frozenset(
    {
        "model_name_or_path",
        "dataset_name",
        "dataset_config",
        "dataset_train_split",
        "dataset_test_split",
        "dataset_mixture",
        "dataset_columns",
        *TRUNCATION_FIELDS,
    }
)

_IDS = pa.list_(pa.int32())
SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("prompt_input_ids", _IDS, nullable=False),
        pa.field("chosen_input_ids", _IDS, nullable=False),
        pa.field("rejected_input_ids", _IDS, nullable=False),
        pa.field("prompt_length", pa.int32(), nullable=False),
        pa.field("chosen_length", pa.int32(), nullable=False),
        pa.field("rejected_length", pa.int32(), nullable=False),
        pa.field("prompt_truncated", pa.bool_(), nullable=False),
        pa.field("chosen_truncated", pa.bool_(), nullable=False),
        pa.field("rejected_truncated", pa.bool_(), nullable=False),
    ]
)


# ---------------------------------------------------------------------------------------------- fingerprint
def tokenized_inputs(config: DPOPipelineConfig, model_dir: Path, sources: dict[str, SplitSource]) -> dict[str, Any]:
    """Every input of the tokenized artifact's fingerprint, in one place."""
    truncation = Truncation.from_config(config)
    # The dataset options enter only when set, so that a config without them keeps its fingerprint (and reuses
    # its artifact). A mixture's datasets enter by content ("dataset"), its settings here.
    options = {
        name: value
        for name, value in (
            ("dataset_config", config.dataset_config),
            ("dataset_columns", config.dataset_columns or None),
            ("dataset_mixture", config.dataset_mixture and mixture_settings(config.dataset_mixture)),
        )
        if value is not None
    }
    return {
        **options,
        "dataset": {role: sources[role].content_hash() if role in sources else None for role in SPLIT_FILES},
        "tokenizer": tokenizer_hash(model_dir),
        # The resolved rule, not the raw fields: an unset truncation_mode means what the YAML's TRL version meant.
        "truncation": {**asdict(truncation), "rule": truncation.rule},
        # The libraries that turn text into ids: an upgrade may tokenize or render templates differently.
        "libraries": {name: version(name) for name in ("tokenizers", "transformers")},
    }


def tokenized_fingerprint(
    config: DPOPipelineConfig, *, model_dir: Path | None = None, sources: dict[str, SplitSource] | None = None
) -> str:
    """The fingerprint of the artifact ``config`` gives, computed from the inputs alone (no tokenizing)."""
    return expected_fingerprint(
        KIND,
        SCHEMA_VERSION,
        tokenized_inputs(config, model_dir or resolve_model_dir(config), sources or resolve_sources(config)),
    )


# ---------------------------------------------------------------------------------------------- reading
def require_tokenized(artifact_dir: Path) -> None:
    """A stage that reads the tokenized artifact refuses to start without one, naming the command that makes it."""
    if not (Path(artifact_dir) / MANIFEST).is_file():
        raise ArtifactError(
            f"no tokenized artifact for this config at {artifact_dir}: run the tokenize stage first "
            f"(dpo-pipeline tokenize --config ...; `dpo-pipeline run` runs every stage)"
        )


def tokenized_manifest(artifact_dir: Path, fingerprint: str | None = None, *, verify_files: bool = True) -> dict:
    """The verified manifest of a tokenized artifact (kind, schema and file hashes checked; with ``fingerprint``,
    its identity too: a foreign artifact with a manifest of its own is refused)."""
    return read_manifest(
        artifact_dir, kind=KIND, schema_version=SCHEMA_VERSION, fingerprint=fingerprint, verify_files=verify_files
    )


def load_tokenized(artifact_dir: Path, split: str) -> pa.Table:
    """One split ("train" or "eval") of a tokenized artifact, after verifying its manifest."""
    if split not in SPLIT_FILES:
        raise ArtifactError(f"tokenized artifacts have splits {', '.join(SPLIT_FILES)}, not '{split}'")
    manifest = tokenized_manifest(artifact_dir)
    if SPLIT_FILES[split] not in manifest["files"]:
        raise ArtifactError(
            f"tokenized artifact at {artifact_dir} has no {split} split (the dataset had no "
            f"test split, or dataset_test_split is null)"
        )
    table = read_parquet(Path(artifact_dir) / SPLIT_FILES[split])
    strictly_increasing(
        table.column("example_id").to_numpy(),
        f"tokenized artifact at {artifact_dir}, split {split}",
        fix="rebuild it with the tokenize stage",
    )
    return table
