"""The tokenize stage: every split of the dataset through formats -> encode -> truncation into the artifact.

Its fingerprint covers the dataset content, the tokenizer files, the truncation settings, the schema version
and the tokenizer library versions; it is known before any tokenizing, so a complete artifact is reused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

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
from pipeline.tokenize.formats import FIELDS, SKIP_REASONS, detect_format, extract, skip_reason
from pipeline.tokenize.sources import SplitSource, count_rows, iter_rows, resolve_sources
from pipeline.tokenize.truncation import Truncation

log = logging.getLogger(__name__)

_EXAMPLES_LOGGED = 10    # skipped example ids kept in the manifest (and logged) per reason
_BATCH_ROWS = 8192       # rows per Arrow batch: bounds the Python-object memory of a large split
_ENCODE_ROWS = 512       # rows per tokenizer call


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

    def __init__(self):
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


def _checked_pairs(rows, stats: SplitStats) -> Iterator[tuple[int, str, tuple]]:
    """(example_id, location, (prompt, chosen, rejected)) of each row that passes the pre-tokenizing checks."""
    for example_id, where, row in rows:
        stats.format = stats.format or detect_format(row)
        stats.read += 1
        pair = extract(row, stats.format, where)
        if reason := skip_reason(*pair):
            stats.skip(reason, example_id)
        else:
            yield example_id, where, pair


def _add_row(columns: _Columns, stats: SplitStats, truncation: Truncation, example_id: int,
             full: dict[str, list[int]]) -> None:
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
    stats.max_sequence_length = max(stats.max_sequence_length,
                                    len(ids["prompt"]) + max(len(ids["chosen"]), len(ids["rejected"])))
    columns.add(example_id, ids, truncated)


def tokenize_split(source: SplitSource, tokenizer, truncation: Truncation,
                   model_dir: Path) -> tuple[pa.Table, SplitStats]:
    """Tokenize and truncate one split: (table sorted by example_id, stats)."""
    stats, columns = SplitStats(), _Columns()
    rows = tqdm(iter_rows(source), total=count_rows(source), desc=f"tokenize {source.role}", unit="row",
                delay=2.0)  # shown only when a split takes more than 2 s
    pairs = _checked_pairs(rows, stats)
    encoder = None
    while chunk := list(islice(pairs, _ENCODE_ROWS)):
        encoder = encoder or Encoder(tokenizer, stats.format, model_dir, source.label)
        example_ids, wheres, texts = zip(*chunk, strict=True)
        for example_id, full in zip(example_ids, encoder.encode(texts, wheres), strict=True):
            _add_row(columns, stats, truncation, example_id, full)
    if stats.written == 0:
        raise DataError(f"{source.label}: no usable rows ({stats.read} read; skipped: "
                        f"{dict(stats.skipped) or 'none'})")
    return columns.table(), stats


def _log_split(source: SplitSource, stats: SplitStats) -> None:
    unit = "lines" if source.kind == "jsonl" else "rows"
    for reason in (r for r in SKIP_REASONS if stats.skipped[r]):
        first = ", ".join(str(i + 1) for i in stats.skipped_ids[reason])
        log.warning("%s: skipped %d rows (%s), first at %s %s", source.label, stats.skipped[reason], reason, unit,
                    first)
    log.info("%s: %d of %d rows written; truncated prompt/chosen/rejected in %d/%d/%d rows", source.label,
             stats.written, stats.read, *(stats.truncated[name] for name in FIELDS))


# ---------------------------------------------------------------------------------------------- the stage
def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model_name_or_path: cannot load a tokenizer from {model_dir}: {exc}") from None


def _token_ids(tokenizer) -> dict[str, int | None]:
    """What later stages need from the tokenizer without loading it. A tokenizer without a pad token pads
    with EOS (padding is masked out, so any id works; EOS is always in the vocabulary)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "vocab_size": len(tokenizer)}


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
    (out / MANIFEST).unlink(missing_ok=True)  # the directory must not claim completeness while files change
    tokenizer = _load_tokenizer(model_dir)
    truncation = Truncation.from_config(config)
    counts: dict[str, Any] = {}
    formats, skipped_ids = {}, {}
    for role, source in sources.items():
        table, stats = tokenize_split(source, tokenizer, truncation, model_dir)
        write_parquet(table, out / SPLIT_FILES[role])
        counts[role], formats[role], skipped_ids[role] = stats.counts(), stats.format, stats.skipped_ids
        _log_split(source, stats)
    counts["skipped"] = {reason: sum(counts[role]["skipped"][reason] for role in sources) for reason in SKIP_REASONS}
    write_manifest(
        out, kind=KIND, schema_version=SCHEMA_VERSION, inputs=inputs,
        files=[SPLIT_FILES[role] for role in sources], counts=counts,
        model_path=str(model_dir),
        dataset={role: {"source": s.label, "split": s.split, "format": formats[role]} for role, s in sources.items()},
        skipped_example_ids=skipped_ids,
        **_token_ids(tokenizer),
    )
    log.info("tokenized artifact written to %s", out)
    return out

