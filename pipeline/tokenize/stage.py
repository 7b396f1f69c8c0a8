"""The tokenize stage: every split of the dataset through formats -> encode -> truncation into the artifact.

Its fingerprint covers the dataset content, the tokenizer files, the truncation settings, the schema version
and the tokenizer library versions; it is known before any tokenizing, so a complete artifact is reused.

With ``dataset_num_proc`` > 1 the encoding (chat template and tokenizer, the stage's cost) runs in that many
processes, each given the loaded tokenizer once; chunks of rows go out and come back in order, and everything
else (reading, checks, truncation, counts) stays here, so the artifact is byte-identical to a run in one
process. The processes are forked where the platform can (Linux; as ``datasets``' ``map(num_proc=...)``, which
is what TRL's ``dataset_num_proc`` runs): they start at once with the tokenizer in memory, where spawned ones
would first import transformers and torch (seconds each). They only encode: no logging, no locks of the parent.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa
from tqdm import tqdm

from pipeline.artifacts import (
    MANIFEST,
    artifact_dir,
    expected_fingerprint,
    is_complete,
    write_manifest,
    write_parquet,
)
from pipeline.config import DPOPipelineConfig
from pipeline.errors import ConfigError, DataError
from pipeline.models import resolve_model_dir
from pipeline.tokenize.artifact import KIND, SCHEMA, SCHEMA_VERSION, SPLIT_FILES, tokenized_inputs
from pipeline.tokenize.encode import Encoder
from pipeline.tokenize.formats import (
    FIELDS,
    SKIP_REASONS,
    check_columns,
    detect_format,
    extract,
    rename,
    skip_reason,
)
from pipeline.tokenize.sources import SplitSource, count_rows, iter_rows, resolve_sources, split_columns
from pipeline.tokenize.truncation import Truncation

log = logging.getLogger(__name__)

_EXAMPLES_LOGGED = 10  # skipped example ids kept in the manifest (and logged) per reason
_BATCH_ROWS = 8192  # rows per Arrow batch: bounds the Python-object memory of a large split
_ENCODE_ROWS = 512  # rows per tokenizer call (and per task of a dataset_num_proc pool)
_IN_FLIGHT = 2  # chunks queued per pool process: enough to keep it busy, few to hold in memory


# ---------------------------------------------------------------------------------------------- one split
@dataclass
class SplitStats:
    """What happened to a split's rows; its ``counts()`` go to the manifest."""

    format: str | None = None  # detected from the first row
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: dict[str, list[int]] = field(default_factory=dict)
    truncated: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    max_sequence_length: int = 0

    @property
    def written(self) -> int:
        return self.read - sum(self.skipped.values())

    def skip(self, reason: str, example_id: int) -> None:
        self.skipped[reason] += 1
        ids = self.skipped_ids.setdefault(reason, [])
        if len(ids) < _EXAMPLES_LOGGED:
            ids.append(example_id)

    def counts(self) -> dict[str, Any]:
        return {
            "rows_read": self.read,
            "rows_written": self.written,
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS},
            "truncated": {name: self.truncated[name] for name in FIELDS},
            "tokens": {name: self.tokens[name] for name in FIELDS},
            "max_sequence_length": self.max_sequence_length,
        }


class _Columns:
    """Rows gathered into Arrow batches of ``_BATCH_ROWS`` (compact int32 instead of Python ints)."""

    def __init__(self) -> None:
        self.batches: list[pa.RecordBatch] = []
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(self, example_id: int, ids: dict[str, list[int]], truncated: dict[str, bool]) -> None:
        self.rows["example_id"].append(example_id)
        for name in FIELDS:
            self.rows[f"{name}_input_ids"].append(ids[name])
            self.rows[f"{name}_length"].append(len(ids[name]))
            self.rows[f"{name}_truncated"].append(truncated[name])
        if len(self.rows["example_id"]) >= _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.rows["example_id"]:
            self.batches.append(pa.RecordBatch.from_pydict(self.rows, schema=SCHEMA))
            self.rows = {name: [] for name in SCHEMA.names}

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, schema=SCHEMA)


def _checked_pairs(rows, stats: SplitStats, columns: Mapping[str, str] | None) -> Iterator[tuple[int, str, tuple]]:
    """(example_id, location, (prompt, chosen, rejected)) of each row that passes the pre-tokenizing checks."""
    system = columns is not None and "system" in columns.values()
    for example_id, where, row in rows:
        row = rename(row, columns) if columns else row
        if stats.format is None:
            stats.format = detect_format(row, where, system=system)
            _note_layout(stats.format, row, where)
        stats.read += 1
        pair = extract(row, stats.format, where)
        if reason := skip_reason(*pair):
            stats.skip(reason, example_id)
        else:
            yield example_id, where, pair


def _add_row(
    columns: _Columns, stats: SplitStats, truncation: Truncation, example_id: int, full: dict[str, list[int]]
) -> None:
    """Truncate one encoded row and add it to the columns, or count why it is skipped."""
    cut = truncation.apply(full["prompt"], full["chosen"], full["rejected"])
    if cut is None:
        stats.skip("prompt_exceeds_max_length", example_id)
        return
    ids = dict(zip(FIELDS, cut, strict=True))
    if ids["chosen"] == ids["rejected"]:
        stats.skip("identical_after_truncation", example_id)
        return
    truncated = {name: len(ids[name]) < len(full[name]) for name in FIELDS}
    stats.truncated.update(name for name in FIELDS if truncated[name])
    stats.tokens.update({name: len(ids[name]) for name in FIELDS})
    stats.max_sequence_length = max(
        stats.max_sequence_length, len(ids["prompt"]) + max(len(ids["chosen"]), len(ids["rejected"]))
    )
    columns.add(example_id, ids, truncated)


def _note_layout(fmt: str, row: dict, where: str) -> None:
    """Transcript strings beside other text columns may hide a prompt under another name (Intel/orca_dpo_pairs'
    ``question``): the common start of the two answers would then be a meaningless prompt."""
    others = [name for name, value in row.items() if isinstance(value, str) and name not in FIELDS]
    if fmt == "implicit_prompt_text" and others:
        log.warning(
            "%s: no 'prompt' column, so the prompt is the common start of chosen and rejected; if one of "
            "%s holds the prompt, map it with dataset_columns: {<column>: prompt}",
            where,
            ", ".join(others),
        )


def _chunks(pairs) -> Iterator[tuple[tuple, tuple, tuple]]:
    """(example_ids, locations, (prompt, chosen, rejected)s) of ``_ENCODE_ROWS`` rows at a time."""
    while chunk := list(islice(pairs, _ENCODE_ROWS)):
        example_ids, wheres, texts = zip(*chunk, strict=True)
        yield example_ids, wheres, texts


def _encode_here(chunks, stats: SplitStats, tokenizer, model_dir: Path, label: str):
    encoder = None
    for example_ids, wheres, texts in chunks:
        assert stats.format is not None  # _checked_pairs detects it from the first row, before yielding any
        encoder = encoder or Encoder(tokenizer, stats.format, model_dir, label)
        yield example_ids, encoder.encode(texts, wheres)


_worker: dict[str, Any] = {}  # a pool process's tokenizer and its encoders, one per layout


def _start_worker(tokenizer, model_dir: Path) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism: one thread per process
    _worker.update(tokenizer=tokenizer, model_dir=model_dir)


def _encode_chunk(fmt: str, label: str, texts: tuple, wheres: tuple) -> list[dict[str, list[int]]]:
    if fmt not in _worker:
        _worker[fmt] = Encoder(_worker["tokenizer"], fmt, _worker["model_dir"], label)
    return _worker[fmt].encode(texts, wheres)


def _encode_in_pool(chunks, stats: SplitStats, tokenizer, model_dir: Path, label: str, num_proc: int):
    """The chunks encoded by ``num_proc`` processes, yielded in order; at most ``_IN_FLIGHT`` per process wait."""
    import multiprocessing

    # Forked, the workers inherit the tokenizer; spawned (no fork on the platform), each unpickles it once.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        num_proc,
        mp_context=multiprocessing.get_context(method),
        initializer=_start_worker,
        initargs=(tokenizer, model_dir),
    )
    pending: deque[tuple[tuple, Future]] = deque()
    checked = False
    try:
        try:
            for example_ids, wheres, texts in chunks:
                assert stats.format is not None  # _checked_pairs detects it from the first row, before yielding any
                if not checked:  # refuse a layout the tokenizer cannot render here, as one process would
                    Encoder(tokenizer, stats.format, model_dir, label)
                    checked = True
                pending.append((example_ids, pool.submit(_encode_chunk, stats.format, label, texts, wheres)))
                if len(pending) >= num_proc * _IN_FLIGHT:
                    example_ids, future = pending.popleft()
                    yield example_ids, future.result()
        except DataError:
            # A bad row read ahead: an earlier chunk's error comes first, as it would in one process.
            for _, future in pending:
                future.result()
            raise
        while pending:
            example_ids, future = pending.popleft()
            yield example_ids, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def tokenize_split(
    source: SplitSource,
    tokenizer,
    truncation: Truncation,
    model_dir: Path,
    *,
    columns: Mapping[str, str] | None = None,
    num_proc: int | None = None,
) -> tuple[pa.Table, SplitStats]:
    """Tokenize and truncate one split: (table sorted by example_id, stats). ``columns``: dataset_columns'
    renames; ``num_proc`` > 1: encode in that many processes (the same table)."""
    for label, names in split_columns(source):  # a mapping that names a missing column fails before any row
        check_columns(columns, names, label)
    stats, table = SplitStats(), _Columns()
    rows = tqdm(
        iter_rows(source), total=count_rows(source), desc=f"tokenize {source.role}", unit="row", delay=2.0
    )  # shown only when a split takes more than 2 s
    chunks = _chunks(_checked_pairs(rows, stats, columns))
    encoded = (
        _encode_in_pool(chunks, stats, tokenizer, model_dir, source.label, num_proc)
        if num_proc is not None and num_proc > 1
        else _encode_here(chunks, stats, tokenizer, model_dir, source.label)
    )
    for example_ids, encodings in encoded:
        for example_id, full in zip(example_ids, encodings, strict=True):
            _add_row(table, stats, truncation, example_id, full)
    if stats.written == 0:
        raise DataError(f"{source.label}: no usable rows ({stats.read} read; skipped: {dict(stats.skipped) or 'none'})")
    result = table.table()
    ids = result.column("example_id").to_numpy()
    # A mixture's rows arrive dataset by dataset, their ids (places in the shuffled split) out of order.
    return (result if (ids[1:] > ids[:-1]).all() else result.sort_by("example_id")), stats


def _log_split(source: SplitSource, stats: SplitStats) -> None:
    # 1-based lines and rows, as the error messages count them; a mixture's rows by their example_id.
    unit, base = {"jsonl": ("lines", 1), "mixture": ("example_ids", 0)}.get(source.kind, ("rows", 1))
    for reason in (r for r in SKIP_REASONS if stats.skipped[r]):
        first = ", ".join(str(i + base) for i in stats.skipped_ids[reason])
        log.warning(
            "%s: skipped %d rows (%s), first at %s %s", source.label, stats.skipped[reason], reason, unit, first
        )
    log.info(
        "%s: %d of %d rows written; truncated prompt/chosen/rejected in %d/%d/%d rows",
        source.label,
        stats.written,
        stats.read,
        *(stats.truncated[name] for name in FIELDS),
    )


# ---------------------------------------------------------------------------------------------- the stage
def _load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model_name_or_path: cannot load a tokenizer from {model_dir}: {exc}") from None


class _TokenIds(TypedDict):
    pad_token_id: int | None
    eos_token_id: int | None
    bos_token_id: int | None
    vocab_size: int


def _token_ids(tokenizer) -> _TokenIds:
    """What later stages need from the tokenizer without loading it. A tokenizer without a pad token pads
    with EOS (padding is masked out, so any id works; EOS is always in the vocabulary)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "pad_token_id": pad,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "vocab_size": len(tokenizer),
    }


def tokenize_stage(config: DPOPipelineConfig) -> Path:
    """Build (or reuse, if an artifact with the same fingerprint is complete) the tokenized artifact; return its dir."""
    model_dir = resolve_model_dir(config)
    sources = resolve_sources(config)
    inputs = tokenized_inputs(config, model_dir, sources)
    fp = expected_fingerprint(KIND, SCHEMA_VERSION, inputs)
    out = artifact_dir(config.output_path, KIND, fp)
    if is_complete(out, kind=KIND, fingerprint=fp):
        log.info("tokenized artifact %s is complete (same inputs): reusing it", out)
        return out
    if config.dataset_num_proc is not None and config.dataset_num_proc < 1:
        raise ConfigError(f"dataset_num_proc: must be >= 1 (or null for one process), got {config.dataset_num_proc}")
    (out / MANIFEST).unlink(missing_ok=True)  # the directory must not claim completeness while files change
    tokenizer = _load_tokenizer(model_dir, config.trust_remote_code)
    truncation = Truncation.from_config(config)
    counts: dict[str, Any] = {}
    formats, skipped_ids = {}, {}
    for role, source in sources.items():
        table, stats = tokenize_split(
            source, tokenizer, truncation, model_dir, columns=config.dataset_columns, num_proc=config.dataset_num_proc
        )
        write_parquet(table, out / SPLIT_FILES[role])
        counts[role], formats[role], skipped_ids[role] = stats.counts(), stats.format, stats.skipped_ids
        _log_split(source, stats)
    counts["skipped"] = {reason: sum(counts[role]["skipped"][reason] for role in sources) for reason in SKIP_REASONS}
    write_manifest(
        out,
        kind=KIND,
        schema_version=SCHEMA_VERSION,
        inputs=inputs,
        files=[SPLIT_FILES[role] for role in sources],
        counts=counts,
        model_path=str(model_dir),
        dataset={role: {"source": s.label, "split": s.split, "format": formats[role]} for role, s in sources.items()},
        skipped_example_ids=skipped_ids,
        **_token_ids(tokenizer),
    )
    log.info("tokenized artifact written to %s", out)
    return out
