"""Where a split's rows come from: ``dataset_name`` resolved to one :class:`SplitSource` per split.

A directory of ``{split}.jsonl`` / ``{split}.parquet`` files, a directory written by ``datasets``'
``save_to_disk`` (a DatasetDict keyed by split, or one Dataset = the train split), a single ``.jsonl`` /
``.parquet`` file (the train split, no eval), or else a Hugging Face Hub name. A source knows the files its
content hash covers, so the tokenized fingerprint is known before any row is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import fingerprint, hash_file
from pipeline.config import DPOPipelineConfig
from pipeline.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class SplitSource:
    """Where one split's rows come from."""

    role: str                # "train" or "eval": the artifact file it feeds
    split: str               # the split's name in the dataset
    label: str               # how messages name it: a file path, or "<dir> [split]"
    kind: str                # "jsonl", "parquet" or "arrow" (a datasets.Dataset)
    files: tuple[Path, ...]  # the files its content hash covers
    dataset: Any = None      # an already loaded datasets.Dataset (Hub datasets); else read from the files

    def content_hash(self) -> str:
        return fingerprint([hash_file(path) for path in self.files])


def _split_roles(config: DPOPipelineConfig) -> dict[str, str]:
    roles = {"train": config.dataset_train_split}
    if config.dataset_test_split is not None:
        roles["eval"] = config.dataset_test_split
    return roles


def _file_source(path: Path, role: str, split: str) -> SplitSource:
    if path.suffix not in SUFFIXES:
        raise DataError(f"dataset_name: unsupported file extension '{path.suffix}' of {path} (use .jsonl or "
                        f".parquet, a directory of {{split}}.jsonl/.parquet files, or a datasets directory)")
    return SplitSource(role, split, str(path), path.suffix[1:], (path,))


def _saved_split_source(split_dir: Path, role: str, split: str, label: str) -> SplitSource:
    # The .arrow shards are the content and dataset_info.json the features. state.json is left out: its
    # _fingerprint records how the rows were made (transform history, random for unhashable transforms), not
    # what they are, so the same rows saved after another .map() would needlessly re-tokenize.
    files = sorted(p for p in split_dir.iterdir() if p.suffix == ".arrow" or p.name == "dataset_info.json")
    return SplitSource(role, split, label, "arrow", tuple(files))


def _directory_source(root: Path, role: str, split: str) -> SplitSource | None:
    """The split in a directory of split files or a saved datasets directory; None when it has no such split."""
    if (root / "dataset_dict.json").is_file():
        split_dir = root / split
        return _saved_split_source(split_dir, role, split, f"{root} [{split}]") if split_dir.is_dir() else None
    if (root / "state.json").is_file():  # a single saved Dataset: the train split only
        return _saved_split_source(root, role, split, str(root)) if role == "train" else None
    found = [root / f"{split}{suffix}" for suffix in SUFFIXES if (root / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"dataset_name: both {found[0].name} and {found[1].name} in {root}; keep one")
    return _file_source(found[0], role, split) if found else None


def _looks_local(config: DPOPipelineConfig) -> bool:
    """True when ``dataset_name`` can only be a path, so that a typo fails at once instead of after a minute of
    Hub retries: absolute, relative to ``.``/``~``, with a file extension, deeper than ``owner/name``, or in
    an existing directory (``data/preferencez``)."""
    name = config.dataset_name
    path = Path(name)
    return (path.is_absolute() or name.startswith((".", "~")) or path.suffix != "" or name.count("/") > 1
            or ("/" in name and config.resolve_path(str(path.parent)).is_dir()))


def _hub_sources(name: str, roles: dict[str, str]) -> dict[str, SplitSource]:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is the user's "no such dataset"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"dataset_name '{name}': not a local path, and loading it from the Hugging Face Hub "
                        f"failed: {first_line}") from None
    sources = {}
    for role, split in roles.items():
        if split in loaded:
            files = tuple(Path(f["filename"]) for f in loaded[split].cache_files)
            sources[role] = SplitSource(role, split, f"{name} [{split}]", "arrow", files, loaded[split])
    return sources


def resolve_sources(config: DPOPipelineConfig) -> dict[str, SplitSource]:
    """The train (required) and eval (when present) splits that ``dataset_name`` names."""
    roles = _split_roles(config)
    path = config.resolve_path(config.dataset_name)
    if path.is_file():
        sources = {"train": _file_source(path, "train", roles["train"])}
    elif path.is_dir():
        sources = {role: source for role, split in roles.items()
                   if (source := _directory_source(path, role, split)) is not None}
        if "train" not in sources:
            others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            raise DataError(f"dataset_name: no '{roles['train']}' split (.jsonl, .parquet or a datasets split) "
                            f"in {path}; it holds: {', '.join(others) or 'nothing'}")
    elif _looks_local(config):
        raise DataError(f"dataset_name: no such file or directory: {path}")
    else:
        sources = _hub_sources(config.dataset_name, roles)
        if "train" not in sources:
            raise DataError(f"dataset_name '{config.dataset_name}' has no '{roles['train']}' split")
    if "eval" in roles and "eval" not in sources:
        log.info("dataset %s has no '%s' split: no eval split", path, roles["eval"])
    return sources


def _parquet_file(source: SplitSource) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source.files[0])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{source.label}: cannot read Parquet: {exc}") from None


def count_rows(source: SplitSource) -> int | None:
    """The number of rows (JSONL: lines) for the progress bar; None when it would cost a load."""
    if source.kind == "parquet":
        return _parquet_file(source).metadata.num_rows
    if source.kind == "jsonl":
        with open(source.files[0], "rb") as handle:
            return sum(1 for _ in handle)
    return None


def _load_arrow(source: SplitSource):
    import datasets

    dataset = source.dataset if source.dataset is not None else datasets.load_from_disk(str(source.files[0].parent))
    return dataset.with_format(None)  # plain Python rows, whatever format the dataset was saved with


def iter_rows(source: SplitSource) -> Iterator[tuple[int, str, dict]]:
    """(example_id, location for messages, row) for every row; a malformed JSONL line is a DataError."""
    if source.kind == "jsonl":
        with open(source.files[0], "rb") as handle:
            for index, raw in enumerate(handle):
                where = f"{source.label} line {index + 1}"
                if not raw.strip():
                    continue  # a blank line holds no row (it still counts for line numbers and example ids)
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                except UnicodeDecodeError:
                    raise DataError(f"{where}: malformed JSON (not valid UTF-8)") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield index, where, row
    elif source.kind == "parquet":
        index = 0
        for batch in _parquet_file(source).iter_batches():
            for row in batch.to_pylist():
                yield index, f"{source.label} row {index + 1}", row
                index += 1
    else:
        for index, row in enumerate(_load_arrow(source)):
            yield index, f"{source.label} row {index + 1}", row

