"""Reference pass: score every tokenized example once with the frozen reference model, into Parquet shards.

Training then reads these log-probs and never loads the reference model (TRL's ``precompute_ref_log_probs``,
done as a separate DeepSpeed job).

    dpo-pipeline reference --config cfg.yaml                                  # 1 process
    dpo-pipeline reference --config cfg.yaml num_processes=2 deepspeed=configs/ds_zero3.json

Features:

* **DeepSpeed inference engine, no optimizer.** ``reference_zero_stage: auto`` runs stage 0 (replicated
  weights, no gathers) when the model takes at most half of one device, else ZeRO-3, loaded already
  partitioned through ``HfDeepSpeedConfig``, so a model larger than one device is sharded across the ranks.
  (ZeRO-1/2 shard only optimizer state and gradients, which a forward-only pass does not have.) 1 or N
  processes under any launcher; gloo on CPU, nccl on GPU. ``eval()`` and ``no_grad``.
* **One log-prob function.** :func:`pipeline.logprobs.completion_logps`, the very function training calls for
  the policy: completion tokens only, float32 accumulation whatever the model dtype, no full
  [batch, seq, vocab] float32 log-softmax. Model dtype bf16 when ``bf16`` is set, else fp32.
* **Length-sorted batches.** Within a shard, pairs are sorted by padded length (longest first, so a batch too
  large for memory fails at once) and cut into batches of ``precompute_ref_batch_size``; batch ``i`` goes to
  rank ``i % world``. Output rows are in ``example_id`` order regardless. A progress bar shows tokens/s.
* **Sharded, resumable output.** A shard is a contiguous range of ``shard_size`` example ids of one split:
  ``{split}-{index:05d}.parquet`` with ``example_id``, ``ref_chosen_logps``, ``ref_rejected_logps``,
  ``ref_chosen_public_logps``, ``ref_rejected_public_logps`` (float32; public = sum over the first
  min(|y_w|, |y_l|) completion tokens, for LD-DPO), ``chosen_length``, ``rejected_length`` (int32). Every rank
  computes its batches, the results are gathered, rank 0 writes the shard atomically with the artifact
  fingerprint in its Parquet metadata, then all ranks pass a barrier. ``manifest.json`` comes last. A rerun
  keeps every shard whose metadata, ids and values check out and computes only the others; a complete
  artifact with the same fingerprint is returned without loading the model.
* **Fingerprint** over the tokenized artifact's fingerprint, a streamed content hash of the reference weights,
  the dtype, the splits (and the example-id subset, if any), caller inputs such as TR-DPO's window, and the
  schema version. Batch size, shard size and process count change no value beyond float rounding and are
  left out, so a resume may use other ones.
* **Checks.** Before any forward: the tokenized manifest's file hashes, token ids against the model's
  vocabulary (naming artifact, split and example_id). The reader (:func:`load_reference_logps`) refuses a
  fingerprint mismatch, a missing or extra ``example_id``, a duplicate, a non-finite value.

Trade-offs: shards are the unit of resume (a kill loses at most one shard of work); gathered results go
through ``all_gather_object`` (pickled, small: 7 numbers per pair); under ZeRO-3 every rank must make the same
number of forward calls, so a rank short of batches repeats one and drops its result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import data
from pipeline.artifacts import (
    MANIFEST,
    artifact_dir,
    atomic_write_text,
    expected_fingerprint,
    fingerprint,
    hash_file,
    is_complete,
    model_weights_hash,
    read_manifest,
    write_manifest,
    write_parquet,
)
from pipeline.config import REPO_ROOT, DPOPipelineConfig
from pipeline.distributed import (
    all_gather_objects,
    barrier,
    check_ranks_agree,
    device,
    init_distributed,
    is_main_process,
    load_ds_config,
    main_decides,
    on_gpu,
    rank,
    resolve_ds_config,
    world_size,
    zero_stage,
)
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.logprobs import collate_pairs, completion_logps
from pipeline.losses import PairLogps
from pipeline.models import resolve_model_dir

log = logging.getLogger(__name__)

KIND = "reference"
SCHEMA_VERSION = 1
DEFAULT_DS_CONFIG = REPO_ROOT / "configs" / "ds_zero3.json"
SPLITS = tuple(data.SPLIT_FILES)  # "train", "eval"

SCHEMA = pa.schema([
    pa.field("example_id", pa.int64(), nullable=False),
    pa.field("ref_chosen_logps", pa.float32(), nullable=False),
    pa.field("ref_rejected_logps", pa.float32(), nullable=False),
    pa.field("ref_chosen_public_logps", pa.float32(), nullable=False),
    pa.field("ref_rejected_public_logps", pa.float32(), nullable=False),
    pa.field("chosen_length", pa.int32(), nullable=False),
    pa.field("rejected_length", pa.int32(), nullable=False),
])
VALUE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_public_logps", "ref_rejected_public_logps")
_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
_META_KEY = b"reference"  # Parquet key-value metadata of a shard: which artifact, split and shard it belongs to
_NAMED_IDS = 5            # ids quoted in an error message


# ---------------------------------------------------------------------------------------------- fingerprint
def _dtype_name(config: DPOPipelineConfig) -> str:
    return "bfloat16" if config.bf16 else "float32"


def _inputs(*, tokenized_fingerprint: str, weights_hash: str, dtype: str, splits: Sequence[str],
            example_ids: Mapping[str, Sequence[int]] | None, extra_inputs: Mapping | None) -> dict[str, Any]:
    return {
        "tokenized": tokenized_fingerprint,
        "reference_weights": weights_hash,
        "dtype": dtype,
        "splits": list(splits),
        # A subset is identified by the hash of its sorted ids; None means every example of the split.
        "example_ids": {split: fingerprint(sorted(int(i) for i in ids))
                        for split, ids in sorted((example_ids or {}).items())},
        "extra": dict(extra_inputs or {}),
    }


def _stage_splits(config: DPOPipelineConfig) -> list[str]:
    """train + eval; only eval under TR-DPO, whose driver scores each train window with its own reference."""
    present = data.resolve_sources(config)
    return [split for split in SPLITS if split in present and not (split == "train" and config.sync_ref_model)]


@dataclass(frozen=True)
class _StagePlan:
    tokenized_dir: Path
    tokenized_fingerprint: str
    model_dir: Path
    splits: list[str]
    out_dir: Path


def _stage_plan(config: DPOPipelineConfig, *, tokenized_fingerprint: str | None = None,
                model_dir: Path | None = None) -> _StagePlan:
    model_dir = model_dir or resolve_model_dir(config)
    tokenized_fp = tokenized_fingerprint or data.tokenized_fingerprint(config, model_dir=model_dir)
    splits = _stage_splits(config)
    inputs = _inputs(tokenized_fingerprint=tokenized_fp, weights_hash=model_weights_hash(model_dir),
                     dtype=_dtype_name(config), splits=splits, example_ids=None, extra_inputs=None)
    return _StagePlan(artifact_dir(config.output_path, data.KIND, tokenized_fp), tokenized_fp, model_dir, splits,
                      artifact_dir(config.output_path, KIND, expected_fingerprint(KIND, SCHEMA_VERSION, inputs)))


def reference_dir_for(config: DPOPipelineConfig, *, tokenized_fingerprint: str | None = None,
                      model_dir: Path | None = None) -> Path:
    """Where :func:`reference_stage` puts its artifact for ``config``: hashes of inputs only, no model work."""
    return _stage_plan(config, tokenized_fingerprint=tokenized_fingerprint, model_dir=model_dir).out_dir


# ---------------------------------------------------------------------------------------------- the stage
def reference_stage(config: DPOPipelineConfig) -> Path:
    """Score the tokenized artifact of ``config`` with its reference model. Collective: every rank calls it."""
    plan = _stage_plan(config)
    data.require_tokenized(plan.tokenized_dir)
    read_manifest(plan.tokenized_dir, kind=data.KIND, schema_version=data.SCHEMA_VERSION,
                  fingerprint=plan.tokenized_fingerprint, verify_files=False)  # compute_reference_logps hashes files
    return compute_reference_logps(config, tokenized_dir=plan.tokenized_dir, model_dir=plan.model_dir,
                                   out_dir=plan.out_dir, splits=plan.splits)


def compute_reference_logps(config: DPOPipelineConfig, *, tokenized_dir: Path, out_dir: Path,
                            splits: Sequence[str], model_dir: Path | None = None, engine=None,
                            weights: str | None = None, example_ids: Mapping[str, Sequence[int]] | None = None,
                            extra_inputs: Mapping | None = None, shard_size: int = 2048) -> Path:
    """Score ``splits`` of ``tokenized_dir`` (all examples, or the unique ``example_ids`` given per split) into
    ``out_dir``, with the model in ``model_dir`` (an inference engine loaded here), or with a live ``engine``
    whose weights are identified by ``weights`` (TR-DPO's reference versions inside the training job: the
    identity enters the fingerprint where a model directory's content hash would). ``extra_inputs`` join the
    fingerprint. Collective.

    Returns at once when ``out_dir`` holds a complete artifact with the same fingerprint; otherwise keeps the
    valid shards already there and computes the rest."""
    tokenized_dir, out_dir = Path(tokenized_dir), Path(out_dir)
    if engine is None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"reference model directory not found: {model_dir}")
        weights = model_weights_hash(model_dir)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or len(set(splits)) != len(splits):
        raise ConfigError(f"reference splits must be distinct names among {', '.join(SPLITS)}; got {list(splits)}")
    tokenized = data.tokenized_manifest(tokenized_dir)  # kind, schema and Parquet hashes checked
    inputs = _inputs(tokenized_fingerprint=tokenized["fingerprint"], weights_hash=weights,
                     dtype=_dtype_name(config), splits=splits, example_ids=example_ids, extra_inputs=extra_inputs)
    fp = expected_fingerprint(KIND, SCHEMA_VERSION, inputs)
    init_distributed(config)
    check_ranks_agree(config, what={"reference": fp})
    if main_decides(lambda: is_complete(out_dir, kind=KIND, fingerprint=fp)):
        problem = main_decides(lambda: _usable(out_dir, splits))
        if problem is None:
            log.info("reference artifact %s is complete (same inputs): no model work", out_dir)
            return out_dir
        # Never stuck: a committed artifact that readers refuse is rebuilt (its intact shards are kept).
        log.warning("reference artifact %s is complete but unusable (%s): rebuilding it", out_dir, problem)

    tables = {split: _select(tokenized_dir, split, (example_ids or {}).get(split)) for split in splits}
    vocab = (_model_vocab_size(model_dir) if engine is None
             else int(engine.module.config.get_text_config().vocab_size))
    _check_vocabulary(tokenized_dir, tables, vocab)
    plan = [_Shard(split, index, ids) for split, table in tables.items()
            for index, ids in enumerate(_chunks(table.column("example_id").to_numpy(), shard_size))]

    # Rank 0 decides what is done and everyone follows: ranks must agree on the work to stay in step.
    reused = main_decides(lambda: _committed_shards(out_dir, plan, fp))
    todo = [shard for shard in plan if shard.name not in reused]
    if is_main_process():
        (out_dir / MANIFEST).unlink(missing_ok=True)  # an old manifest must not vouch for files that change now
        for stale in out_dir.glob(".tmp-*"):          # left by a killed writer; never read
            stale.unlink()
    stats = _Stats()
    if todo:
        if is_main_process():
            log.info("reference pass: %d of %d shards to compute (%d kept from an earlier run)", len(todo),
                     len(plan), len(reused))
        pad = int(tokenized["pad_token_id"])
        if engine is not None:
            _score_shards(engine, _reference_batch_size(config), tables, todo, out_dir, fp, pad_token_id=pad,
                          stats=stats)
        else:
            loaded = _load_engine(config, model_dir)
            try:
                _score_shards(loaded, int(loaded.train_micro_batch_size_per_gpu()), tables, todo, out_dir, fp,
                              pad_token_id=pad, stats=stats)
            finally:
                loaded.destroy()
    if is_main_process():
        rows = {split: int(table.num_rows) for split, table in tables.items()}
        write_manifest(
            out_dir, kind=KIND, schema_version=SCHEMA_VERSION, inputs=inputs, files=[s.name for s in plan],
            counts={"examples": sum(rows.values()), "examples_by_split": rows,
                    "tokens": sum(_sequence_tokens(table) for table in tables.values()),
                    "forwards": stats.forwards, "seconds": round(stats.seconds, 3),
                    "tokens_per_s": round(stats.tokens / stats.seconds, 1) if stats.seconds else None,
                    "shards": len(plan), "reused_shards": len(reused)},
            shards={split: [s.name for s in plan if s.split == split] for split in splits},
            tokenized_dir=str(tokenized_dir), model_path=str(model_dir) if model_dir else None,
            world_size=world_size(),
        )
        log.info("reference artifact written to %s", out_dir)
    barrier()
    return out_dir


# ---------------------------------------------------------------------------------------------- inputs
def _select(tokenized_dir: Path, split: str, ids: Sequence[int] | None) -> pa.Table:
    """The split's rows in example_id order, restricted to ``ids`` when given (unique, all present)."""
    table = data.load_tokenized(tokenized_dir, split).select(["example_id", *_TOKEN_COLUMNS, "prompt_length",
                                                              "chosen_length", "rejected_length"])
    all_ids = table.column("example_id").to_numpy()
    if np.any(np.diff(all_ids) <= 0):
        raise ArtifactError(f"tokenized artifact at {tokenized_dir}: {split} rows are not sorted by unique "
                            f"example_id; rebuild it with the tokenize stage")
    if ids is None:
        return table
    wanted = np.asarray(list(ids), dtype=np.int64)
    values, counts = np.unique(wanted, return_counts=True)
    if np.any(counts > 1):
        raise DataError(f"reference pass over {split}: example_ids must be unique; repeated: "
                        f"{values[counts > 1][:_NAMED_IDS].tolist()}")
    missing = np.setdiff1d(values, all_ids)
    if missing.size:
        raise DataError(f"reference pass over {split}: {missing.size} example_ids are not in the tokenized "
                        f"artifact at {tokenized_dir}, e.g. {missing[:_NAMED_IDS].tolist()}")
    return table.take(pa.array(np.searchsorted(all_ids, values)))


def _model_vocab_size(model_dir: Path) -> int:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the reference model config in {model_dir}: {exc}") from None
    return int(model_config.get_text_config().vocab_size)


def _check_vocabulary(tokenized_dir: Path, tables: Mapping[str, pa.Table], vocab_size: int) -> None:
    """Every token id in [0, vocab_size): an id beyond the embedding means another tokenizer made the data."""
    for split, table in tables.items():
        first_bad = []  # (row, column, token id): the first offending token of each column
        for column in _TOKEN_COLUMNS:
            lists = table.column(column).combine_chunks()
            tokens = pc.list_flatten(lists).to_numpy()
            bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
            if bad.size:
                first_bad.append((int(pc.list_parent_indices(lists).to_numpy()[bad[0]]), column, int(tokens[bad[0]])))
        if first_bad:
            row, column, token = min(first_bad)
            raise DataError(
                f"tokenized artifact at {tokenized_dir}, split {split}, example_id "
                f"{table.column('example_id')[row].as_py()}: {column} holds token id {token}, outside the reference "
                f"model's vocabulary of {vocab_size}; the data was tokenized with another tokenizer")


def _sequence_tokens(table: pa.Table) -> int:
    """Real (non-pad) tokens the model reads for these pairs: the prompt twice, plus both completions."""
    return int(pc.sum(table.column("prompt_length")).as_py() or 0) * 2 + sum(
        int(pc.sum(table.column(name)).as_py() or 0) for name in ("chosen_length", "rejected_length"))


def _chunks(ids: np.ndarray, size: int) -> list[np.ndarray]:
    if size <= 0:
        raise ConfigError(f"shard_size must be > 0, got {size}")
    return [ids[start:start + size] for start in range(0, len(ids), size)]


# ---------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class _Shard:
    split: str
    index: int
    example_ids: np.ndarray  # sorted

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"

    def metadata(self, fp: str) -> bytes:
        return f"{fp}:{self.split}:{self.index}".encode()


def _digest_path(out_dir: Path, shard: _Shard) -> Path:
    return out_dir / f"{shard.name}.sha256"


def _committed_shards(out_dir: Path, plan: Sequence[_Shard], fp: str) -> set[str]:
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
        if ((table.schema.metadata or {}).get(_META_KEY) == shard.metadata(fp)
                and table.schema.remove_metadata() == SCHEMA
                and np.array_equal(table.column("example_id").to_numpy(), shard.example_ids)
                and all(np.isfinite(table.column(name).to_numpy()).all() for name in VALUE_COLUMNS)):
            kept.add(shard.name)
    return kept


def _write_shard(out_dir: Path, shard: _Shard, fp: str, results: Sequence[dict[str, np.ndarray]]) -> None:
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


def _usable(out_dir: Path, splits: Sequence[str]) -> str | None:
    """Why a complete-looking artifact cannot be used (a NaN, a missing or modified file), or None."""
    try:
        for split in splits:
            load_reference_logps(out_dir, split=split)
    except ArtifactError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------- model work
@dataclass
class _Stats:
    forwards: int = 0     # forward calls, all ranks, padding repeats included
    tokens: int = 0       # real tokens scored in this run (all ranks)
    seconds: float = 0.0  # wall time of the model work in this run


def _inference_ds_config(config: DPOPipelineConfig, model_dir: Path) -> dict[str, Any]:
    """The reference pass's ds_config: ZeRO-3 (the configured ds_config's, or the shipped one) when the model
    must be sharded, else stage 0, where every rank holds the model and a forward gathers nothing (at 7B bf16
    on one node, ZeRO-3 would all-gather every layer on every forward for no memory need)."""
    stage = config.reference_zero_stage
    if stage == "auto":
        stage = 0 if _fits_one_device(config, model_dir) else 3
    configured = load_ds_config(config.resolve_path(config.deepspeed))
    if stage == 3 and zero_stage(configured) != 3:
        config = config.model_copy(update={"deepspeed": str(DEFAULT_DS_CONFIG)})
    ds = resolve_ds_config(config, world=world_size(), inference=True)
    if stage == 0:
        # Replicated weights. (ZeRO-1/2 partition only optimizer state and gradients, which a forward pass does
        # not have, and DeepSpeed asserts an optimizer for them.)
        ds["zero_optimization"] = {"stage": 0}
    return ds


# Share of one device's memory the replicated reference weights may take; the rest is for activations and the
# completion logits of a large no-grad batch.
REPLICATED_WEIGHTS_SHARE = 0.5


def _fits_one_device(config: DPOPipelineConfig, model_dir: Path) -> bool:
    """The weights, in the run's dtype, take at most :data:`REPLICATED_WEIGHTS_SHARE` of one GPU (or, on CPU,
    of this node's memory divided by its ranks)."""
    weights = model_parameter_count(model_dir) * (2 if config.bf16 else 4)
    if on_gpu():
        capacity = torch.cuda.get_device_properties(device()).total_memory
    else:
        capacity = psutil.virtual_memory().total / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return weights <= REPLICATED_WEIGHTS_SHARE * capacity


def model_parameter_count(model_dir: Path) -> int:
    """Parameters in a model directory's safetensors files, from their headers alone (no tensor is read). A
    model without safetensors counts as too big to replicate (ZeRO-3 is always safe)."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return 1 << 62
    for path in files:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def _load_engine(config: DPOPipelineConfig, model_dir: Path):
    """A DeepSpeed inference engine (no optimizer) around the reference model, in eval mode."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds = _inference_ds_config(config, model_dir)
    # Alive during from_pretrained: transformers then loads each weight straight into its ZeRO-3 partition.
    zero3_loading = HfDeepSpeedConfig(ds) if zero_stage(ds) == 3 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the reference model from {model_dir}: {exc}") from None
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.module.eval()  # dropout off
    del zero3_loading  # later from_pretrained calls in this process must not load partitioned
    return engine


def _batches(table: pa.Table, batch_size: int) -> list[np.ndarray]:
    """Row indices of ``table`` cut into batches, longest padded sequence first (ties by example_id)."""
    prompt = table.column("prompt_length").to_numpy()
    longest = prompt + np.maximum(table.column("chosen_length").to_numpy(), table.column("rejected_length").to_numpy())
    order = np.lexsort((table.column("example_id").to_numpy(), -longest))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _reference_batch_size(config: DPOPipelineConfig) -> int:
    return config.precompute_ref_batch_size or config.per_device_eval_batch_size


def _score_shards(engine, batch_size: int, tables: Mapping[str, pa.Table], todo: Sequence[_Shard], out_dir: Path,
                  fp: str, *, pad_token_id: int, stats: _Stats) -> None:
    me, world = rank(), world_size()
    rows_of = {split: table.column("example_id").to_numpy() for split, table in tables.items()}
    total = sum(_sequence_tokens(tables[s.split].take(pa.array(np.searchsorted(rows_of[s.split], s.example_ids))))
                for s in todo)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="reference", disable=not is_main_process(),
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for shard in todo:
            table = tables[shard.split].take(pa.array(np.searchsorted(rows_of[shard.split], shard.example_ids)))
            batches = _batches(table, batch_size)
            mine = batches[me::world]
            results = []
            for step in range(math.ceil(len(batches) / world)):
                # Under ZeRO-3 each forward gathers parameters collectively: a rank out of batches repeats one.
                indices = mine[step] if step < len(mine) else (mine or batches)[-1]
                scored = _score_batch(engine, table, indices, pad_token_id)
                stats.forwards += 1
                if step < len(mine):
                    results.append(scored)
                    bar.update(scored["tokens"])
            gathered = all_gather_objects(_concat(results))
            done = sum(r["tokens"] for r in gathered)
            bar.update(done - sum(r["tokens"] for r in results))  # the other ranks' tokens
            stats.tokens += done
            if is_main_process():
                _write_shard(out_dir, shard, fp, gathered)
            barrier()
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    stats.forwards = sum(all_gather_objects(stats.forwards))


def _score_batch(engine, table: pa.Table, indices: np.ndarray, pad_token_id: int) -> dict[str, Any]:
    rows = table.select(["example_id", *_TOKEN_COLUMNS]).take(pa.array(indices)).to_pylist()
    batch = collate_pairs(rows, pad_token_id).to(device())
    with torch.no_grad():  # not inference_mode: ZeRO-3's parameter gather hooks modify parameters in place
        out = completion_logps(engine, batch)
    chosen, rejected = (t.cpu().numpy() for t in out.halves("logps"))
    chosen_public, rejected_public = (t.cpu().numpy() for t in out.halves("public_logps"))
    chosen_len, rejected_len = (t.cpu().numpy().astype(np.int32) for t in out.halves("lengths"))
    return {"example_id": batch.example_ids.cpu().numpy(), "ref_chosen_logps": chosen,
            "ref_rejected_logps": rejected, "ref_chosen_public_logps": chosen_public,
            "ref_rejected_public_logps": rejected_public, "chosen_length": chosen_len,
            "rejected_length": rejected_len, "tokens": batch.num_tokens}


def _concat(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {name: np.concatenate([r[name] for r in results]) if results
                              else np.empty(0, dtype=SCHEMA.field(name).type.to_pandas_dtype())
                              for name in SCHEMA.names}
    merged["tokens"] = sum(r["tokens"] for r in results)
    return merged


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ReferenceLogps:
    """One split of a reference artifact, sorted by example_id; float32 sums and int32 completion lengths."""

    split: str
    example_ids: np.ndarray        # int64, strictly increasing
    chosen: np.ndarray             # ref_chosen_logps
    rejected: np.ndarray           # ref_rejected_logps
    chosen_public: np.ndarray      # ref_chosen_public_logps
    rejected_public: np.ndarray    # ref_rejected_public_logps
    chosen_lengths: np.ndarray
    rejected_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.example_ids)

    def pair_logps(self, ids: Sequence[int] | np.ndarray | torch.Tensor,
                   device: torch.device | str | None = None) -> PairLogps:
        """The reference side of the pairs ``ids``, in that order, as a :class:`PairLogps` of (B,) tensors."""
        wanted = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        pos = np.searchsorted(self.example_ids, wanted).clip(max=len(self.example_ids) - 1)
        absent = wanted[self.example_ids[pos] != wanted] if len(self.example_ids) else wanted
        if absent.size:
            raise ArtifactError(f"reference log-probs ({self.split}) have no example_id "
                                f"{absent[:_NAMED_IDS].tolist()}; the reference artifact does not match the data")

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values[pos].astype(np.float32)).to(device or "cpu")

        return PairLogps(chosen=tensor(self.chosen), rejected=tensor(self.rejected),
                         chosen_lengths=tensor(self.chosen_lengths), rejected_lengths=tensor(self.rejected_lengths),
                         chosen_public=tensor(self.chosen_public), rejected_public=tensor(self.rejected_public))


def load_reference_logps(ref_dir: Path, *, split: str, expected_ids: Sequence[int] | None = None,
                         fingerprint: str | None = None) -> ReferenceLogps:
    """Read and verify one split of a reference artifact.

    Refuses (ArtifactError) an incomplete artifact, another fingerprint than ``fingerprint``, modified files,
    duplicate or missing example ids (against ``expected_ids``, else the manifest's count), non-finite values."""
    ref_dir = Path(ref_dir)
    manifest = read_manifest(ref_dir, kind=KIND, schema_version=SCHEMA_VERSION, fingerprint=fingerprint)
    if split not in manifest["shards"]:
        raise ArtifactError(f"reference artifact at {ref_dir} has no {split} split "
                            f"(it holds {', '.join(manifest['shards']) or 'none'})")
    tables = [pq.read_table(ref_dir / name).replace_schema_metadata(None) for name in manifest["shards"][split]]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    where = f"reference artifact at {ref_dir}, split {split}"
    ids = table.column("example_id").to_numpy()
    step = np.diff(ids)
    if np.any(step == 0):
        raise ArtifactError(f"{where}: example_id {ids[1:][step == 0][:_NAMED_IDS].tolist()} appears more than once")
    if np.any(step < 0):
        raise ArtifactError(f"{where}: rows are not in example_id order; rerun the reference stage")
    for name in VALUE_COLUMNS:
        values = table.column(name).to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            raise ArtifactError(f"{where}: {name} is not finite for example_id {ids[bad][:_NAMED_IDS].tolist()}")
    if expected_ids is not None:
        expected = np.unique(np.asarray(list(expected_ids), dtype=np.int64))
        missing, extra = np.setdiff1d(expected, ids), np.setdiff1d(ids, expected)
        if missing.size:
            raise ArtifactError(f"{where}: {missing.size} expected example_ids are missing, e.g. "
                                f"{missing[:_NAMED_IDS].tolist()}; rerun the reference stage")
        if extra.size:
            raise ArtifactError(f"{where}: {extra.size} example_ids are not expected, e.g. "
                                f"{extra[:_NAMED_IDS].tolist()}; the artifact was made for other data")
    elif len(ids) != manifest["counts"]["examples_by_split"][split]:
        raise ArtifactError(f"{where}: {len(ids)} rows, the manifest says "
                            f"{manifest['counts']['examples_by_split'][split]}")
    column = table.column
    return ReferenceLogps(split, ids.astype(np.int64), *(column(n).to_numpy() for n in VALUE_COLUMNS),
                          column("chosen_length").to_numpy(), column("rejected_length").to_numpy())


def reference_forward_count(ref_dir: Path) -> int:
    """Examples this artifact scored with the reference model (all its splits), from the manifest."""
    manifest = read_manifest(ref_dir, kind=KIND, schema_version=SCHEMA_VERSION, verify_files=False)
    return int(manifest["counts"]["examples"])


__all__ = ["KIND", "SCHEMA", "SCHEMA_VERSION", "ReferenceLogps", "compute_reference_logps", "load_reference_logps",
           "reference_dir_for", "reference_forward_count", "reference_stage"]
