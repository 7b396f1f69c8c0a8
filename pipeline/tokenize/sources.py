"""Where a split's rows come from: ``dataset_name`` (or ``dataset_mixture``) resolved to one :class:`SplitSource`
per split.

``dataset_name`` is a directory written by ``datasets``' ``save_to_disk`` (a DatasetDict keyed by split, or one
Dataset = the train split); a directory of data files (``.jsonl``, ``.json``, ``.parquet``, ``.arrow``; JSON
also gzipped), such as the shipped ``data/preference`` or a Hub snapshot; a single data file (the train split,
no eval); or else a Hugging Face Hub name, loaded with ``datasets.load_dataset(name, dataset_config)``.

In a directory of data files a split is ``{split}.{ext}`` at its top (the pipeline's own layout), else it is
found by file name as ``load_dataset`` finds it in a Hub snapshot (:func:`data_files`): several files of one
split (shards) are read one after the other in that order, and ``example_id`` counts across them.

``dataset_mixture`` (:mod:`.mixture`) names several such datasets; its splits are a ``"mixture"`` source that
reads them in turn. A source knows the files its content hash covers, so the tokenized fingerprint is known
before any row is read.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import fingerprint, hash_file
from pipeline.config import DatasetMixture, DPOPipelineConfig, MixtureDataset
from pipeline.errors import ConfigError, DataError
from pipeline.tokenize.mixture import Mixture, check_settings

log = logging.getLogger(__name__)

# The data files read, by name ending (gzipped JSON as Anthropic/hh-rlhf ships it), and the reader each needs.
DATA_SUFFIXES = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".arrow": "ipc",
}
_LONGEST_FIRST = sorted(DATA_SUFFIXES, key=len, reverse=True)  # ".jsonl.gz" before ".gz"-less ".jsonl"
# datasets' names of the three standard splits in file and directory names (data_files.SPLIT_KEYWORDS), the
# characters that may surround them, and the metadata files that are never data.
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "[-._ 0-9]"
_NOT_DATA = {"config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
# push_to_hub's shard names: data/{split}-NNNNN-of-NNNNN.parquet, or {config}/{split}-... for a named configuration.
_SHARD_NAME = r"(?P<split>[^/]+?)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*"


@dataclass(frozen=True)
class SplitSource:
    """Where one split's rows come from."""

    role: str  # "train" or "eval": the artifact file it feeds
    split: str  # the split's name in the dataset
    label: str  # how messages name it: a file path, or "<dir> [split]"
    # "jsonl", "json", "parquet", "ipc" (Arrow IPC files), "arrow" (a datasets.Dataset: save_to_disk or the Hub)
    # or "mixture" (rows of ``members``, placed by ``mixture``)
    kind: str
    files: tuple[Path, ...]  # the files its content hash covers, in reading order
    dataset: Any = None  # an already loaded datasets.Dataset (Hub datasets); else read from the files
    members: tuple[tuple[SplitSource, tuple[str, ...] | None], ...] = ()  # mixture: (source, columns kept)
    mixture: Mixture | None = None

    def content_hash(self) -> str:
        if self.kind == "mixture":
            return fingerprint([member.content_hash() for member, _ in self.members])
        return fingerprint([hash_file(path) for path in self.files])


def _split_roles(config: DPOPipelineConfig) -> dict[str, str]:
    roles = {"train": config.dataset_train_split}
    if config.dataset_test_split is not None:
        roles["eval"] = config.dataset_test_split
    return roles


# ---------------------------------------------------------------------------------------------- local files
def _suffix(path: Path) -> str | None:
    return next((suffix for suffix in _LONGEST_FIRST if path.name.endswith(suffix)), None)


def _data_suffix(path: Path) -> str:
    """The suffix of a path already known to be a data file (its callers' paths all passed :func:`_suffix`)."""
    suffix = _suffix(path)
    assert suffix is not None, f"{path} is not a data file"
    return suffix


def _files_source(files: list[Path], role: str, split: str, label: str) -> SplitSource:
    kinds = {DATA_SUFFIXES[_data_suffix(path)] for path in files}
    if len(kinds) > 1:
        raise DataError(f"{label}: the split's files mix formats ({', '.join(sorted(kinds))}); keep one")
    return SplitSource(role, split, str(files[0]) if len(files) == 1 else label, kinds.pop(), tuple(files))


def _file_source(path: Path, role: str, split: str) -> SplitSource:
    if _suffix(path) is None:
        raise DataError(
            f"dataset_name: unsupported file extension '{path.suffix}' of {path} (use .jsonl, .json, "
            f".parquet or .arrow, a directory of such files, or a datasets directory)"
        )
    return _files_source([path], role, split, str(path))


def _saved_split_source(split_dir: Path, role: str, split: str, label: str) -> SplitSource:
    # The .arrow shards are the content and dataset_info.json the features. state.json is left out: its
    # _fingerprint records how the rows were made (transform history, random for unhashable transforms), not
    # what they are, so the same rows saved after another .map() would needlessly re-tokenize.
    files = sorted(p for p in split_dir.iterdir() if p.suffix == ".arrow" or p.name == "dataset_info.json")
    return SplitSource(role, split, label, "arrow", tuple(files))


def _is_data_file(relative: Path) -> bool:
    # datasets skips hidden and __dunder__ paths and its metadata files; only the formats read here count.
    return (
        not any(part.startswith((".", "__")) for part in relative.parts)
        and relative.name not in _NOT_DATA
        and _suffix(relative) is not None
    )


def _keyword_patterns(keyword: str) -> tuple[list[re.Pattern], list[re.Pattern]]:
    """datasets' patterns for a split keyword, in its order (fsspec >= 2023.12): in a directory name first, then
    in a file name (``**/{kw}[sep]*`` ...), as regular expressions over the path relative to the root."""
    any_dirs, name = "(?:.*/)?", "[^/]*"
    in_dir = [
        f"{keyword}/.*",
        f"{keyword}{_SEP}{name}/.*",
        f"{name}{_SEP}{keyword}/.*",
        f"{name}{_SEP}{keyword}{_SEP}{name}/.*",
    ]
    in_file = [f"{keyword}{_SEP}{name}", f"{name}{_SEP}{keyword}{_SEP}{name}"]
    return [re.compile(any_dirs + pattern) for pattern in in_dir], [re.compile(any_dirs + p) for p in in_file]


def data_files(root: Path, shards_in: str = "data") -> dict[str, list[Path]]:
    """The data files of each split in a directory, by datasets' rules for a directory without README
    ``configs`` (``data_files._get_data_files_patterns``), the first rule that matches any file winning:

    1. ``data/{split}-NNNNN-of-NNNNN*.*`` (what ``push_to_hub`` writes): any split name, from the file name;
    2. a split keyword (``SPLIT_KEYWORDS``) as a directory name or between separators in one (``train/``,
       ``helpful-base-train/``);
    3. a split keyword at the start of a file name or between separators (``train.jsonl.gz``, ``my_test-1.json``);
    4. otherwise every file is the train split.

    Within a split the files keep datasets' order (pattern by pattern, each sorted by path)."""
    # Sorted as strings, as fsspec's glob sorts them ("a-b/x" before "a/x").
    found = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and _is_data_file(path.relative_to(root))
    )
    shard = re.compile(f"{re.escape(shards_in)}/{_SHARD_NAME}" if shards_in else _SHARD_NAME)
    shards: dict[str, list[str]] = {}
    for path in found:
        if match := shard.fullmatch(path):
            shards.setdefault(match["split"], []).append(path)
    if shards:
        return {split: [root / path for path in paths] for split, paths in shards.items()}
    for which in (0, 1):  # keywords in directory names, then in file names
        splits: dict[str, list[str]] = {}
        for split, keywords in SPLIT_KEYWORDS.items():
            patterns = [pattern for keyword in keywords for pattern in _keyword_patterns(keyword)[which]]
            # dict.fromkeys: a file that two patterns match is read once, where the first one put it.
            paths = list(dict.fromkeys(path for pattern in patterns for path in found if pattern.fullmatch(path)))
            if paths:
                splits[split] = paths
        if splits:
            return {split: [root / path for path in paths] for split, paths in splits.items()}
    return {"train": [root / path for path in found]} if found else {}


def _saved_splits(root: Path) -> list[str] | None:
    """The splits of a save_to_disk directory, or None when it is not one."""
    if (root / "dataset_dict.json").is_file():
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ["train"] if (root / "state.json").is_file() else None


def _directory_source(root: Path, role: str, split: str, shards_in: str = "data") -> SplitSource | None:
    """The split in a saved datasets directory or a directory of data files; None when it has no such split."""
    if (root / "dataset_dict.json").is_file():
        split_dir = root / split
        return _saved_split_source(split_dir, role, split, f"{root} [{split}]") if split_dir.is_dir() else None
    if (root / "state.json").is_file():  # a single saved Dataset: the train split only
        return _saved_split_source(root, role, split, str(root)) if role == "train" else None
    top = [root / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (root / f"{split}{suffix}").is_file()]
    if len(top) > 1:
        raise DataError(f"dataset_name: both {top[0].name} and {top[1].name} in {root}; keep one")
    if top:
        return _files_source(top, role, split, str(top[0]))
    files = data_files(root, shards_in).get(split)
    return _files_source(files, role, split, f"{root} [{split}]") if files else None


def _splits_in(root: Path, shards_in: str = "data") -> list[str]:
    """Every split name a directory offers, for the message that says one is missing."""
    saved = _saved_splits(root)
    if saved is not None:
        return saved
    top = {p.name.removesuffix(_data_suffix(p)) for p in root.iterdir() if p.is_file() and _is_data_file(Path(p.name))}
    return sorted(top | set(data_files(root, shards_in)))


def _local_config(name: str | None, path: Path, field: str) -> tuple[Path, str]:
    """Where a local dataset's configuration ``name`` is, as (root, the folder of its shards): the default one's
    shards in ``data/``, a named one's in its own folder (what ``push_to_hub`` writes: ``<name>/<split>-NNNNN-
    of-NNNNN.parquet``). README ``configs`` are not read."""
    if name in (None, "default"):
        return path, "data"
    if path.is_dir() and (path / name).is_dir():
        return path / name, ""
    raise DataError(
        f"{field}: '{name}' names a configuration, but the local dataset {path} has no folder '{name}' (a named "
        f"configuration's files are in one; README configs are not read): point at that configuration's "
        f"folder instead, or set it to null"
    )


def _looks_local(name: str, config: DPOPipelineConfig) -> bool:
    """True when a dataset name can only be a path, so that a typo fails at once instead of after a minute of
    Hub retries: absolute, relative to ``.``/``~``, with a file extension, deeper than ``owner/name``, or in
    an existing directory (``data/preferencez``)."""
    path = Path(name)
    return (
        path.is_absolute()
        or name.startswith((".", "~"))
        or path.suffix != ""
        or name.count("/") > 1
        or ("/" in name and config.resolve_path(str(path.parent)).is_dir())
    )


# ---------------------------------------------------------------------------------------------- the Hub
def _load_hub(name: str, config_name: str | None, field: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(name, config_name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is the user's "no such dataset"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        which = f" (configuration '{config_name}')" if config_name is not None else ""
        raise DataError(
            f"{field} '{name}'{which}: not a local path, and loading it from the Hugging Face Hub failed: {first_line}"
        ) from None


def _hub_source(dataset, name: str, role: str, split: str) -> SplitSource:
    files = tuple(Path(f["filename"]) for f in dataset.cache_files)
    return SplitSource(role, split, f"{name} [{split}]", "arrow", files, dataset)


def _hub_sources(name: str, config_name: str | None, roles: dict[str, str]) -> dict[str, SplitSource]:
    loaded = _load_hub(name, config_name, "dataset_name")
    return {role: _hub_source(loaded[split], name, role, split) for role, split in roles.items() if split in loaded}


# ---------------------------------------------------------------------------------------------- dataset_mixture
def _member_source(entry: MixtureDataset, i: int, config: DPOPipelineConfig) -> SplitSource:
    """One dataset of the mixture: its split, local (as ``dataset_name`` would be) or from the Hub."""
    field = f"dataset_mixture.datasets[{i}]"
    path = config.resolve_path(entry.id)
    if path.exists():
        path, shards_in = _local_config(entry.config, path, f"{field}.config")
        single = path.is_file() or (path / "state.json").is_file()  # a file or a saved Dataset: train alone
        if single and entry.split != "train":
            source = None
        elif path.is_file():
            source = _file_source(path, "train", "train")
        else:
            source = _directory_source(path, "train", entry.split, shards_in)
        if source is None:
            offered = _splits_in(path, shards_in) if path.is_dir() else ["train"]
            raise DataError(
                f"{field}: '{entry.id}' has no split '{entry.split}'; its splits: {', '.join(offered) or 'none'}"
            )
        return source
    if _looks_local(entry.id, config):
        raise DataError(f"{field}: no such file or directory: {path}")
    return _hub_source(
        _load_hub(entry.id, entry.config, f"{field}.id", split=entry.split), entry.id, "train", entry.split
    )


def _mixture_sources(config: DPOPipelineConfig, mixture: DatasetMixture) -> dict[str, SplitSource]:
    check_settings(mixture)
    members: list[tuple[SplitSource, tuple[str, ...] | None]] = []
    for i, entry in enumerate(mixture.datasets):
        source = _member_source(entry, i, config)
        if entry.columns is not None:
            have = columns_of(source)
            if missing := [c for c in entry.columns if c not in have]:
                raise DataError(
                    f"dataset_mixture.datasets[{i}].columns: '{missing[0]}' is not a column of "
                    f"{source.label}; its columns: {', '.join(have) or 'none'}"
                )
        members.append((source, None if entry.columns is None else tuple(entry.columns)))
    placed = Mixture.of(mixture, [row_count(source) for source, _ in members])
    files = tuple(path for source, _ in members for path in source.files)
    # The handbook's split names: its train_test_split calls them train and test.
    splits = {"train": "train", "eval": "test"} if placed.test_rows else {"train": "train"}
    return {
        role: SplitSource(
            role, split, f"dataset_mixture [{split}]", "mixture", files, members=tuple(members), mixture=placed
        )
        for role, split in splits.items()
    }


# ---------------------------------------------------------------------------------------------- resolving
def resolve_sources(config: DPOPipelineConfig) -> dict[str, SplitSource]:
    """The train (required) and eval (when present) splits that ``dataset_name`` or ``dataset_mixture`` names."""
    if (config.dataset_name is None) == (config.dataset_mixture is None):
        which = "both set" if config.dataset_mixture is not None else "both null"
        raise ConfigError(
            f"dataset_name, dataset_mixture: {which}; name the data with exactly one (with "
            f"dataset_mixture, set dataset_name: null)"
        )
    if config.dataset_mixture is not None:
        return _mixture_sources(config, config.dataset_mixture)
    # Exactly one of the two is set (checked above), and it is not dataset_mixture.
    assert config.dataset_name is not None
    roles = _split_roles(config)
    path, shards_in = config.resolve_path(config.dataset_name), "data"
    if path.exists():
        path, shards_in = _local_config(config.dataset_config, path, "dataset_config")
    if path.is_file():
        sources = {"train": _file_source(path, "train", roles["train"])}
    elif path.is_dir():
        sources = {
            role: source
            for role, split in roles.items()
            if (source := _directory_source(path, role, split, shards_in)) is not None
        }
        if "train" not in sources:
            others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            split, offered = roles["train"], _splits_in(path, shards_in)
            hint = f" (set dataset_train_split to one of its splits: {', '.join(offered)})" if offered else ""
            raise DataError(
                f"dataset_name: no '{split}' split (a {split}.jsonl/.json/.parquet/.arrow file, "
                f"data/{split}-NNNNN-of-NNNNN.* shards or a datasets split) in {path}; it holds: "
                f"{', '.join(others) or 'nothing'}{hint}"
            )
    elif _looks_local(config.dataset_name, config):
        raise DataError(f"dataset_name: no such file or directory: {path}")
    else:
        sources = _hub_sources(config.dataset_name, config.dataset_config, roles)
        if "train" not in sources:
            raise DataError(f"dataset_name '{config.dataset_name}' has no '{roles['train']}' split")
    if "eval" in roles and "eval" not in sources:
        log.info("dataset %s has no '%s' split: no eval split", path, roles["eval"])
    return sources


# ---------------------------------------------------------------------------------------------- reading
def _parquet_file(path: Path, label: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{label}: cannot read Parquet: {exc}") from None


def _open_text(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _load_arrow(source: SplitSource):
    import datasets

    dataset = source.dataset if source.dataset is not None else datasets.load_from_disk(str(source.files[0].parent))
    return dataset.with_format(None)  # plain Python rows, whatever format the dataset was saved with


def _ipc_batches(path: Path) -> Iterator[pa.RecordBatch]:
    # datasets writes Arrow IPC streams; an Arrow IPC file (random-access format) is read as well.
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def _json_lines(path: Path, start: int) -> Generator[tuple[int, str, dict], None, int]:
    """JSON Lines rows; returns the number of lines (a blank one holds no row but counts for ids)."""
    lines = 0
    with _open_text(path) as handle:
        for lines, raw in enumerate(handle, start=1):
            where = f"{path} line {lines}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            except UnicodeDecodeError:
                raise DataError(f"{where}: malformed JSON (not valid UTF-8)") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield start + lines - 1, where, row
    return lines


def _file_rows(path: Path, kind: str, start: int) -> Generator[tuple[int, str, dict], None, int]:
    """(example_id, location, row) of one data file, ids from ``start``; returns how many ids it used."""
    batches: Iterable[Any]
    if kind == "json":
        with _open_text(path) as handle:
            first = handle.read(64).lstrip()[:1]
        if first != b"[":  # datasets' json reader takes JSON Lines in a .json file too
            return (yield from _json_lines(path, start))
        try:
            with _open_text(path) as handle:
                rows = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: malformed JSON ({exc})") from None
        batches = [rows]
    elif kind == "jsonl":
        return (yield from _json_lines(path, start))
    elif kind == "parquet":
        batches = (batch.to_pylist() for batch in _parquet_file(path, str(path)).iter_batches())
    else:
        batches = (batch.to_pylist() for batch in _ipc_batches(path))
    index = 0
    for batch in batches:
        for row in batch:
            if not isinstance(row, dict):
                raise DataError(f"{path} row {index + 1}: expected an object, got {type(row).__name__}")
            yield start + index, f"{path} row {index + 1}", row
            index += 1
    return index


def _mixture_rows(source: SplitSource) -> Iterator[tuple[int, str, dict]]:
    """The mixture's rows of this split, read dataset by dataset in their own order (ids are not in order)."""
    assert source.mixture is not None  # _mixture_sources gives every "mixture" source its placement
    for (member, columns), ids in zip(source.members, source.mixture.ids(source.role), strict=True):
        wanted = ids >= 0
        if not wanted.any():
            continue
        last = int(wanted.nonzero()[0][-1])
        for position, (_, where, row) in enumerate(iter_rows(member)):
            if ids[position] >= 0:
                yield int(ids[position]), where, (row if columns is None else {c: row.get(c) for c in columns})
            if position == last:
                break


def iter_rows(source: SplitSource) -> Iterator[tuple[int, str, dict]]:
    """(example_id, location for messages, row) for every row; a malformed JSON line is a DataError."""
    if source.kind == "mixture":
        yield from _mixture_rows(source)
    elif source.kind == "arrow":
        for index, row in enumerate(_load_arrow(source)):
            yield index, f"{source.label} row {index + 1}", row
    else:
        start = 0
        for path in source.files:
            start += yield from _file_rows(path, source.kind, start)


def count_rows(source: SplitSource) -> int | None:
    """The number of rows (JSONL: lines) for the progress bar; None when it would cost a load."""
    if source.kind == "mixture":
        assert source.mixture is not None  # _mixture_sources gives every "mixture" source its placement
        return source.mixture.rows(source.role)
    if source.kind == "parquet":
        return _parquet_rows(source)
    if source.kind == "jsonl" and not any(path.name.endswith(".gz") for path in source.files):
        total = 0
        for path in source.files:
            with open(path, "rb") as handle:
                total += sum(1 for _ in handle)
        return total
    return None


def _parquet_rows(source: SplitSource) -> int:
    return sum(_parquet_file(path, source.label).metadata.num_rows for path in source.files)


def row_count(source: SplitSource) -> int:
    """The exact number of rows :func:`iter_rows` yields (a blank JSONL line is none), without parsing JSON Lines."""
    if source.kind == "parquet":
        return _parquet_rows(source)
    if source.kind == "arrow":
        return len(_load_arrow(source))
    if source.kind == "ipc":
        return sum(batch.num_rows for path in source.files for batch in _ipc_batches(path))
    if source.kind == "jsonl":
        total = 0
        for path in source.files:
            with _open_text(path) as handle:
                total += sum(1 for raw in handle if raw.strip())
        return total
    return sum(1 for _ in iter_rows(source))  # .json: an array is parsed anyway


def columns_of(source: SplitSource) -> list[str]:
    """The split's column names: from the schema where that is cheap, else from its first row."""
    if source.kind == "parquet":
        return list(_parquet_file(source.files[0], source.label).schema_arrow.names)
    if source.kind == "arrow":
        return list(_load_arrow(source).column_names)
    first = next(iter_rows(source), None)
    return list(first[2]) if first else []


def split_columns(source: SplitSource) -> list[tuple[str, list[str]]]:
    """(label, columns) of each dataset a split reads: one, or one per dataset of a mixture."""
    if source.kind == "mixture":
        return [(member.label, list(kept) if kept else columns_of(member)) for member, kept in source.members]
    return [(source.label, columns_of(source))]
