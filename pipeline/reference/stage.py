"""The reference stage: the frozen reference model scores the tokenized pairs into the cache (:mod:`.cache`).

See :mod:`pipeline.reference` for its features and trade-offs.
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
import torch
from tqdm import tqdm

from pipeline.artifacts import MANIFEST, expected_fingerprint, is_complete, model_weights_hash, write_manifest
from pipeline.config import REPO_ROOT, DPOPipelineConfig
from pipeline.distributed import (
    all_gather_objects,
    barrier,
    check_ranks_agree,
    device,
    init_distributed,
    main_decides,
    on_gpu,
)
from pipeline.ds_config import model_hidden_size, resolve_ds_config, user_ds_config, zero_stage
from pipeline.errors import ConfigError, DataError
from pipeline.layout import BatchLayout
from pipeline.logprobs import collate, completion_logps, honoured_layout
from pipeline.models import code_kwargs, model_kwargs
from pipeline.plan import Plan
from pipeline.ranks import is_main_process, rank, world_size
from pipeline.reference.cache import (
    KIND,
    NAMED_IDS,
    SCHEMA,
    SCHEMA_VERSION,
    SPLITS,
    Shard,
    committed_shards,
    dtype_name,
    plan_shards,
    reference_inputs,
    usable,
    write_shard,
)
from pipeline.tokenize.artifact import load_tokenized, require_tokenized, tokenized_manifest

log = logging.getLogger(__name__)

DEFAULT_DS_CONFIG = REPO_ROOT / "configs" / "ds_zero3.json"
_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


# ---------------------------------------------------------------------------------------------- the stage
def reference_stage(config: DPOPipelineConfig, plan: Plan | None = None) -> Path:
    """Score the tokenized artifact of ``config`` with its reference model. Collective: every rank calls it."""
    plan = plan or Plan.of(config)
    require_tokenized(plan.tokenized_dir)
    tokenized_manifest(plan.tokenized_dir, plan.tokenized_fingerprint, verify_files=False)  # hashed below
    return compute_reference_logps(
        config,
        tokenized_dir=plan.tokenized_dir,
        model_dir=plan.model_dir,
        out_dir=plan.reference_dir,
        splits=plan.reference_splits,
    )


def compute_reference_logps(
    config: DPOPipelineConfig,
    *,
    tokenized_dir: Path,
    out_dir: Path,
    splits: Sequence[str],
    model_dir: Path | None = None,
    engine=None,
    weights: str | None = None,
    example_ids: Mapping[str, Sequence[int] | np.ndarray] | None = None,
    extra_inputs: Mapping | None = None,
    shard_size: int = 2048,
    layout: BatchLayout | None = None,
) -> Path:
    """Score ``splits`` of ``tokenized_dir`` (all examples, or the unique ``example_ids`` given per split) into
    ``out_dir``, with the model in ``model_dir`` (an inference engine loaded here), or with a live ``engine``
    whose weights are identified by ``weights`` (TR-DPO's reference versions inside the training job: the
    identity enters the fingerprint where a model directory's content hash would). ``extra_inputs`` join the
    fingerprint. ``layout``: the batch layout a live engine was already found to honour (None: probed here,
    :func:`pipeline.logprobs.honoured_layout`). Collective.

    Returns at once when ``out_dir`` holds a complete artifact with the same fingerprint; otherwise keeps the
    valid shards already there and computes the rest."""
    tokenized_dir, out_dir = Path(tokenized_dir), Path(out_dir)
    if engine is None:
        if model_dir is None:
            raise TypeError("compute_reference_logps: give model_dir, or a live engine and its weights")
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"reference model directory not found: {model_dir}")
        weights = model_weights_hash(model_dir)
    elif weights is None:
        raise TypeError("compute_reference_logps: a live engine needs the weights that identify it")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or len(set(splits)) != len(splits):
        raise ConfigError(f"reference splits must be distinct names among {', '.join(SPLITS)}; got {list(splits)}")
    tokenized = tokenized_manifest(tokenized_dir)  # kind, schema and Parquet hashes checked
    inputs = reference_inputs(
        tokenized_fingerprint=tokenized["fingerprint"],
        weights_hash=weights,
        dtype=dtype_name(config),
        splits=splits,
        example_ids=example_ids,
        extra_inputs=extra_inputs,
    )
    fp = expected_fingerprint(KIND, SCHEMA_VERSION, inputs)
    init_distributed(config)
    check_ranks_agree(config, what={"reference": fp})
    if main_decides(lambda: is_complete(out_dir, kind=KIND, fingerprint=fp)):
        problem = main_decides(lambda: usable(out_dir, splits))
        if problem is None:
            log.info("reference artifact %s is complete (same inputs): no model work", out_dir)
            return out_dir
        # Never stuck: a committed artifact that readers refuse is rebuilt (its intact shards are kept).
        log.warning("reference artifact %s is complete but unusable (%s): rebuilding it", out_dir, problem)

    tables = {split: _select(tokenized_dir, split, (example_ids or {}).get(split)) for split in splits}
    if engine is None:
        assert model_dir is not None  # checked above: without an engine, model_dir is required
        vocab = _model_vocab_size(config, model_dir)
    else:
        vocab = int(engine.module.config.get_text_config().vocab_size)
    _check_vocabulary(tokenized_dir, tables, vocab)
    _check_fits(BatchLayout.of(config), tables)  # before any model is loaded (the engine's own layout: again)
    plan = plan_shards({split: table.column("example_id").to_numpy() for split, table in tables.items()}, shard_size)

    # Rank 0 decides what is done and everyone follows: ranks must agree on the work to stay in step.
    reused = main_decides(lambda: committed_shards(out_dir, plan, fp))
    todo = [shard for shard in plan if shard.name not in reused]
    if is_main_process():
        (out_dir / MANIFEST).unlink(missing_ok=True)  # an old manifest must not vouch for files that change now
        for stale in out_dir.glob(".tmp-*"):  # left by a killed writer; never read
            stale.unlink()
    stats = _Stats()
    if todo:
        if is_main_process():
            log.info(
                "reference pass: %d of %d shards to compute (%d kept from an earlier run)",
                len(todo),
                len(plan),
                len(reused),
            )
        pad = int(tokenized["pad_token_id"])

        def score(scorer, batch_size: int, known_layout: BatchLayout | None) -> None:
            _score_shards(
                config,
                scorer,
                batch_size,
                tables,
                todo,
                out_dir,
                fp,
                pad_token_id=pad,
                stats=stats,
                layout=known_layout,
            )

        if engine is not None:
            score(engine, _reference_batch_size(config), layout)
        else:
            assert model_dir is not None  # checked above: without an engine, model_dir is required
            loaded = _load_engine(config, model_dir)
            try:
                score(loaded, int(loaded.train_micro_batch_size_per_gpu()), None)  # a new engine: probed
            finally:
                loaded.destroy()
    if is_main_process():
        rows = {split: int(table.num_rows) for split, table in tables.items()}
        write_manifest(
            out_dir,
            kind=KIND,
            schema_version=SCHEMA_VERSION,
            inputs=inputs,
            files=[s.name for s in plan],
            counts={
                "examples": sum(rows.values()),
                "examples_by_split": rows,
                "tokens": sum(_sequence_tokens(table) for table in tables.values()),
                "forwards": stats.forwards,
                "seconds": round(stats.seconds, 3),
                "tokens_per_s": round(stats.tokens / stats.seconds, 1) if stats.seconds else None,
                "shards": len(plan),
                "reused_shards": len(reused),
            },
            shards={split: [s.name for s in plan if s.split == split] for split in splits},
            tokenized_dir=str(tokenized_dir),
            model_path=str(model_dir) if model_dir else None,
            world_size=world_size(),
        )
        log.info("reference artifact written to %s", out_dir)
    barrier()
    return out_dir


# ---------------------------------------------------------------------------------------------- inputs
def _select(tokenized_dir: Path, split: str, ids: Sequence[int] | np.ndarray | None) -> pa.Table:
    """The split's rows in example_id order, restricted to ``ids`` when given (unique, all present)."""
    table = load_tokenized(tokenized_dir, split).select(
        ["example_id", *_TOKEN_COLUMNS, "prompt_length", "chosen_length", "rejected_length"]
    )
    all_ids = table.column("example_id").to_numpy()  # strictly increasing: load_tokenized checks it
    if ids is None:
        return table
    wanted = np.asarray(list(ids), dtype=np.int64)
    values, counts = np.unique(wanted, return_counts=True)
    if np.any(counts > 1):
        raise DataError(
            f"reference pass over {split}: example_ids must be unique; repeated: "
            f"{values[counts > 1][:NAMED_IDS].tolist()}"
        )
    missing = np.setdiff1d(values, all_ids)
    if missing.size:
        raise DataError(
            f"reference pass over {split}: {missing.size} example_ids are not in the tokenized "
            f"artifact at {tokenized_dir}, e.g. {missing[:NAMED_IDS].tolist()}"
        )
    return table.take(pa.array(np.searchsorted(all_ids, values)))


def _model_vocab_size(config: DPOPipelineConfig, model_dir: Path) -> int:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_dir, **code_kwargs(config))
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
                f"model's vocabulary of {vocab_size}; the data was tokenized with another tokenizer"
            )


def _check_fits(layout: BatchLayout, tables: Mapping[str, pa.Table]) -> None:
    for split, table in tables.items():
        prompt, chosen, rejected = (
            table.column(f"{side}_length").to_numpy() for side in ("prompt", "chosen", "rejected")
        )
        ids = table.column("example_id").to_numpy()
        layout.check_fits(prompt, chosen, rejected, ids, where=f"the tokenized {split} split")


def _sequence_tokens(table: pa.Table) -> int:
    """The pairs' tokens as two sequences: the prompt twice, plus both completions (a shared prompt runs once
    but counts twice, so rates compare across layouts)."""
    return int(pc.sum(table.column("prompt_length")).as_py() or 0) * 2 + sum(
        int(pc.sum(table.column(name)).as_py() or 0) for name in ("chosen_length", "rejected_length")
    )


# ---------------------------------------------------------------------------------------------- model work
@dataclass
class _Stats:
    forwards: int = 0  # forward calls, all ranks, padding repeats included
    tokens: int = 0  # real tokens scored in this run (all ranks)
    seconds: float = 0.0  # wall time of the model work in this run


def _inference_ds_config(config: DPOPipelineConfig, model_dir: Path) -> dict[str, Any]:
    """The reference pass's ds_config: ZeRO-3 (the configured ds_config's, or the shipped one) when the model
    must be sharded, else stage 0, where every rank holds the model and a forward gathers nothing (at 7B bf16
    on one node, ZeRO-3 would all-gather every layer on every forward for no memory need)."""
    stage = config.reference_zero_stage
    quantised = config.load_in_4bit or config.load_in_8bit
    if stage == "auto":
        # A quantised base (QLoRA) cannot be partitioned, and at 0.5-1 byte per parameter it is what fits.
        stage = 0 if quantised or _fits_one_device(config, model_dir) else 3

    if stage == 3 and zero_stage(user_ds_config(config)) != 3:
        config = config.model_copy(update={"deepspeed": str(DEFAULT_DS_CONFIG), "accelerate_config": None})
    ds = resolve_ds_config(
        config, world=world_size(), gpu=on_gpu(), hidden_size=model_hidden_size(model_dir), inference=True
    )
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
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if config.bf16 else torch.float32, **model_kwargs(config)
        )
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
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _reference_batch_size(config: DPOPipelineConfig) -> int:
    return config.precompute_ref_batch_size or config.per_device_eval_batch_size


def _score_shards(
    config: DPOPipelineConfig,
    engine,
    batch_size: int,
    tables: Mapping[str, pa.Table],
    todo: Sequence[Shard],
    out_dir: Path,
    fp: str,
    *,
    pad_token_id: int,
    stats: _Stats,
    layout: BatchLayout | None = None,
) -> None:
    me, world = rank(), world_size()
    if layout is None:
        layout = honoured_layout(engine, config, pad_token_id, device())
    _check_fits(layout, tables)
    rows_of = {split: table.column("example_id").to_numpy() for split, table in tables.items()}
    total = sum(
        _sequence_tokens(tables[s.split].take(pa.array(np.searchsorted(rows_of[s.split], s.example_ids)))) for s in todo
    )
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="reference", disable=not is_main_process(), dynamic_ncols=True
    )
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
                scored = _score_batch(engine, table, indices, pad_token_id, layout)
                stats.forwards += 1
                if step < len(mine):
                    results.append(scored)
                    bar.update(scored["tokens"])
            gathered = all_gather_objects(_concat(results))
            done = sum(r["tokens"] for r in gathered)
            bar.update(done - sum(r["tokens"] for r in results))  # the other ranks' tokens
            stats.tokens += done
            if is_main_process():
                write_shard(out_dir, shard, fp, gathered)
            barrier()
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    stats.forwards = sum(all_gather_objects(stats.forwards))


def _score_batch(
    engine, table: pa.Table, indices: np.ndarray, pad_token_id: int, layout: BatchLayout
) -> dict[str, Any]:
    rows = table.select(["example_id", *_TOKEN_COLUMNS]).take(pa.array(indices)).to_pylist()
    batch = collate(rows, pad_token_id, layout).to(device())
    with torch.no_grad():  # not inference_mode: ZeRO-3's parameter gather hooks modify parameters in place
        out = completion_logps(engine, batch)
    chosen, rejected = (t.cpu().numpy() for t in out.halves("logps"))
    chosen_public, rejected_public = (t.cpu().numpy() for t in out.halves("public_logps"))
    chosen_len, rejected_len = (t.cpu().numpy().astype(np.int32) for t in out.halves("lengths"))
    return {
        "example_id": batch.example_ids.cpu().numpy(),
        "ref_chosen_logps": chosen,
        "ref_rejected_logps": rejected,
        "ref_chosen_public_logps": chosen_public,
        "ref_rejected_public_logps": rejected_public,
        "chosen_length": chosen_len,
        "rejected_length": rejected_len,
        "tokens": _sequence_tokens(table.take(pa.array(indices))),  # whatever the layout ran
    }


def _concat(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        name: np.concatenate([r[name] for r in results])
        if results
        else np.empty(0, dtype=SCHEMA.field(name).type.to_pandas_dtype())
        for name in SCHEMA.names
    }
    merged["tokens"] = sum(r["tokens"] for r in results)
    return merged
