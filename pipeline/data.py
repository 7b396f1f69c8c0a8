"""Tokenize stage: a preference dataset -> the ``tokenized`` artifact that the reference pass and training read.

Input (``dataset_name``): a directory of ``{split}.jsonl`` / ``{split}.parquet`` files, a directory written by
``datasets``' ``save_to_disk`` (a DatasetDict keyed by split, or one Dataset = the train split), a single
``.jsonl`` / ``.parquet`` file (the train split, no eval), or else a Hugging Face Hub name. Three row formats,
detected from a split's first row:

* standard:        ``prompt``, ``chosen``, ``rejected`` strings;
* conversational:  the same fields as lists of ``{role, content}`` messages, rendered with the chat template;
* implicit prompt: no ``prompt``; ``chosen``/``rejected`` are whole conversations whose longest common message
  prefix becomes the prompt.

Output: ``<output_dir>/tokenized/<fingerprint[:16]>/`` with ``train.parquet``, ``eval.parquet`` (when the
dataset has ``dataset_test_split``) and ``manifest.json`` (written last). One row per kept pair, sorted by
``example_id`` (the 0-based row of the source split; the 0-based line for JSONL, so skipped rows leave gaps).
The fingerprint covers the dataset content, the tokenizer files, the truncation settings, the schema version
and the tokenizer library versions; it is known before any tokenizing, so a complete artifact is reused.

Bad input: a problem with the dataset as a whole, or with a row's shape (missing file, unsupported extension,
malformed JSON line, missing or mistyped field), is a :class:`DataError` naming file, line/row and field.
A well-formed row that cannot train (see :data:`SKIP_REASONS`) is skipped, counted in the manifest and logged.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.artifacts import (
    MANIFEST,
    artifact_dir,
    expected_fingerprint,
    fingerprint,
    hash_file,
    is_complete,
    read_manifest,
    read_parquet,
    tokenizer_hash,
    write_manifest,
    write_parquet,
)
from pipeline.config import DPOPipelineConfig
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.models import resolve_model_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KIND = "tokenized"
SPLIT_FILES = {"train": "train.parquet", "eval": "eval.parquet"}
SUFFIXES = (".jsonl", ".parquet")

_IDS = pa.list_(pa.int32())
SCHEMA = pa.schema([
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
])

# Why a well-formed row is skipped, in the order the checks run (a row counts once, under the first).
SKIP_REASONS = (
    "empty_prompt",                # prompt blank after strip; implicit prompt: the conversations share no message
    "empty_completion",            # chosen or rejected blank after strip
    "identical_completions",       # chosen == rejected: no preference to learn
    "prompt_exceeds_max_length",   # the prompt leaves no room for a completion token within max_length
    "identical_after_truncation",  # truncation cut away everything that told chosen and rejected apart
)
FIELDS = ("prompt", "chosen", "rejected")
_EXAMPLES_LOGGED = 10    # skipped example ids kept in the manifest (and logged) per reason
_BATCH_ROWS = 8192       # rows per Arrow batch: bounds the Python-object memory of a large split
_ENCODE_ROWS = 512       # rows per tokenizer call


# ---------------------------------------------------------------------------------------------- truncation
@dataclass(frozen=True)
class Truncation:
    """The truncation settings of a config; :meth:`apply` is the rule."""

    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str

    @classmethod
    def from_config(cls, config: DPOPipelineConfig) -> Truncation:
        return cls(config.max_length, config.max_prompt_length, config.max_completion_length,
                   config.truncation_mode)

    def apply(self, prompt: list[int], chosen: list[int],
              rejected: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """The one truncation rule, the same for chosen and rejected (a null limit skips its step):

        1. A prompt longer than ``max_prompt_length`` keeps its first (``keep_start``) or last (``keep_end``)
           ``max_prompt_length`` tokens. keep_end keeps the text nearest the answer (and drops a leading BOS).
        2. A completion longer than ``max_completion_length`` keeps its first ``max_completion_length`` tokens.
        3. A completion with ``len(prompt) + len(completion) > max_length`` keeps its first
           ``max_length - len(prompt)`` tokens. If that is 0 or less (the prompt alone fills ``max_length``,
           possible only when ``max_prompt_length`` is null), returns None: the row is skipped as
           ``prompt_exceeds_max_length``.

        Completions always keep their start, the tokens that directly follow the prompt (a cut completion has
        no EOS). The original DPO repository differs: it cuts the prompt only when the pair is too long, and then
        gives completions ``max_length - max_prompt_length``.
        """
        if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
            keep_start = self.truncation_mode == "keep_start"
            prompt = prompt[:self.max_prompt_length] if keep_start else prompt[-self.max_prompt_length:]
        limit = self.max_completion_length
        if self.max_length is not None:
            room = self.max_length - len(prompt)
            if room <= 0:
                return None
            limit = room if limit is None else min(limit, room)
        if limit is None:
            return prompt, chosen, rejected
        return prompt, chosen[:limit], rejected[:limit]


# ---------------------------------------------------------------------------------------------- sources
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


def _count_rows(source: SplitSource) -> int | None:
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


# ---------------------------------------------------------------------------------------------- rows
def detect_format(row: dict) -> str:
    """'standard', 'conversational' or 'implicit_prompt', from a split's first row."""
    if row.get("prompt") is None:
        return "implicit_prompt" if isinstance(row.get("chosen"), list) else "standard"
    return "conversational" if isinstance(row["prompt"], list) else "standard"


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string (standard format), got {type(value).__name__}")
    return value


def _messages_field(row: dict, name: str, where: str, fmt: str) -> list[dict]:
    value = row.get(name)
    if value is None:
        hint = " (implicit-prompt rows need 'chosen' and 'rejected')" if fmt == "implicit_prompt" else ""
        raise DataError(f"{where}: missing field '{name}'{hint}")
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of {{role, content}} messages ({fmt} format), "
                        f"got {type(value).__name__}")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field '{name}' message {i} must be {{role: str, content: str}}, "
                            f"got {str(message)[:80]}")
    return value


def extract(row: dict, fmt: str, where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): strings (standard) or message lists (conversational, implicit prompt)."""
    if fmt == "standard":
        return tuple(_text_field(row, name, where) for name in FIELDS)
    if fmt == "conversational":
        return tuple(_messages_field(row, name, where, fmt) for name in FIELDS)
    chosen = _messages_field(row, "chosen", where, fmt)
    rejected = _messages_field(row, "rejected", where, fmt)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _is_blank(value: str | list[dict]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not message["content"].strip() for message in value)


def skip_reason(prompt, chosen, rejected) -> str | None:
    """The reason to skip a well-formed row before tokenizing, or None to keep it."""
    if _is_blank(prompt):
        return "empty_prompt"
    if _is_blank(chosen) or _is_blank(rejected):
        return "empty_completion"
    if chosen == rejected:
        return "identical_completions"
    return None


class Encoder:
    """Text or messages -> token ids, so that prompt ids + completion ids are exactly what training sees.

    Standard rows: prompt = ``tokenizer(prompt)`` (with special tokens: the BOS a Llama tokenizer adds);
    completion = ``tokenizer(completion, add_special_tokens=False)`` + EOS. Conversational rows: the prompt
    is the chat template's rendering with the generation prompt, the completion is the rendering of prompt +
    completion minus that prefix, both encoded without special tokens (the template carries BOS); EOS is
    appended only when the rendered completion does not already end with it."""

    def __init__(self, tokenizer, fmt: str, model_dir: Path, label: str):
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model_name_or_path: the tokenizer in {model_dir} has no eos_token")
        if fmt != "standard" and not tokenizer.chat_template:
            raise DataError(f"{label}: rows are {fmt} (message lists) but the tokenizer in {model_dir} has no "
                            f"chat template to render them")
        self.tokenizer = tokenizer
        self.chat = fmt != "standard"

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids if ids and ids[-1] == eos else ids + [eos]

    def _render(self, messages: list[dict], where: str, **kwargs) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except TemplateError as exc:
            raise DataError(f"{where}: the chat template cannot render this row: {exc}") from None

    def _render_pair(self, prompt, chosen, rejected, where: str) -> tuple[str, str, str]:
        prompt_text = self._render(prompt, where, add_generation_prompt=True)
        completions = []
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            full = self._render(prompt + messages, where)
            if not full.startswith(prompt_text):
                raise DataError(f"{where}: field '{name}': the chat template renders prompt + {name} without the "
                                f"rendered prompt as its prefix, so the completion cannot be split off")
            completions.append(full[len(prompt_text):])
        return prompt_text, *completions

    def encode(self, pairs, wheres) -> list[dict[str, list[int]]]:
        """Token ids of a batch of (prompt, chosen, rejected): batched, as the tokenizer is several times
        faster on lists than row by row."""
        texts = ([self._render_pair(*pair, where) for pair, where in zip(pairs, wheres, strict=True)]
                 if self.chat else pairs)
        prompts, chosen, rejected = (list(column) for column in zip(*texts, strict=True))
        return [{"prompt": p, "chosen": self._with_eos(c), "rejected": self._with_eos(r)} for p, c, r in zip(
            self._ids(prompts, not self.chat), self._ids(chosen, False), self._ids(rejected, False), strict=True)]


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
    rows = tqdm(iter_rows(source), total=_count_rows(source), desc=f"tokenize {source.role}", unit="row",
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


def _inputs(config: DPOPipelineConfig, model_dir: Path, sources: dict[str, SplitSource]) -> dict[str, Any]:
    return {
        "dataset": {role: sources[role].content_hash() if role in sources else None for role in SPLIT_FILES},
        "tokenizer": tokenizer_hash(model_dir),
        "truncation": config.subset("max_length", "max_prompt_length", "max_completion_length",
                                    "truncation_mode"),
        # The libraries that turn text into ids: an upgrade may tokenize or render templates differently.
        "libraries": {name: version(name) for name in ("tokenizers", "transformers")},
    }


def tokenized_fingerprint(config: DPOPipelineConfig, *, model_dir: Path | None = None) -> str:
    """The fingerprint of the artifact ``config`` gives, computed from the inputs alone (no tokenizing)."""
    return expected_fingerprint(KIND, SCHEMA_VERSION,
                                _inputs(config, model_dir or resolve_model_dir(config), resolve_sources(config)))


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
    inputs = _inputs(config, model_dir, sources)
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


def require_tokenized(artifact_dir: Path) -> None:
    """A stage that reads the tokenized artifact refuses to start without one, naming the command that makes it."""
    if not (Path(artifact_dir) / MANIFEST).is_file():
        raise ArtifactError(f"no tokenized artifact for this config at {artifact_dir}: run the tokenize stage first "
                            f"(dpo-pipeline tokenize --config ...)")


def tokenized_manifest(artifact_dir: Path, fingerprint: str | None = None) -> dict:
    """The verified manifest of a tokenized artifact (kind, schema and file hashes checked; with ``fingerprint``,
    its identity too: a foreign artifact with a manifest of its own is refused)."""
    return read_manifest(artifact_dir, kind=KIND, schema_version=SCHEMA_VERSION, fingerprint=fingerprint)


def load_tokenized(artifact_dir: Path, split: str) -> pa.Table:
    """One split ("train" or "eval") of a tokenized artifact, after verifying its manifest."""
    if split not in SPLIT_FILES:
        raise ArtifactError(f"tokenized artifacts have splits {', '.join(SPLIT_FILES)}, not '{split}'")
    manifest = tokenized_manifest(artifact_dir)
    if SPLIT_FILES[split] not in manifest["files"]:
        raise ArtifactError(f"tokenized artifact at {artifact_dir} has no {split} split (the dataset had no "
                            f"test split, or dataset_test_split is null)")
    return read_parquet(Path(artifact_dir) / SPLIT_FILES[split])


__all__ = ["KIND", "SCHEMA", "SCHEMA_VERSION", "SKIP_REASONS", "Truncation", "load_tokenized", "tokenize_stage",
           "tokenized_fingerprint", "tokenized_manifest"]
