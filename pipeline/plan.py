"""One plan per run: every artifact's directory and fingerprint, computed once from the config.

Data flows one way, tokenize -> reference -> train, and so do fingerprints: each artifact's inputs hold the
fingerprints of the artifacts it reads plus what its own stage reads. :class:`Plan` works them all out at once
(the model resolved and the dataset hashed once), for the stages, the TR-DPO windows and the flows.

**Fingerprint inputs are derived, not listed.** The tokenized and reference artifacts depend on content (the
dataset's bytes, the tokenizer's files, the model's weights) and on the few fields their stages read
(``TOKENIZE_FIELDS``, ``REFERENCE_FIELDS``, each declared beside the code that
reads them). The training run depends on *every other config field*,
by value, except the declared :data:`NOT_ARTIFACT_FIELDS`, which cannot change a trained model (where outputs
go, how ranks start, how often to log or save). A field added to the config therefore enters the training
fingerprint by default: forgetting a list can cost a needless rerun, never a stale result.
``tests/test_plan.py`` changes every field in turn and checks which fingerprints change.

Fields named by path enter by content, not spelling: ``model_name_or_path`` through the tokenizer's and the
weights' hashes (so a job that receives the resolved local path plans the same run), ``dataset_name`` through
the dataset's hash, ``deepspeed`` and ``accelerate_config`` through the ds_config they give (its JSON, or the one
an accelerate YAML makes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import artifact_dir, expected_fingerprint, model_weights_hash
from pipeline.config import FIELD_NAMES, DPOPipelineConfig
from pipeline.ds_config import user_ds_config
from pipeline.models import resolve_model_dir
from pipeline.reference import cache as reference_cache
from pipeline.reference.cache import REFERENCE_FIELDS, dtype_name, reference_inputs, scored_splits
from pipeline.tokenize import artifact as tokenized
from pipeline.tokenize.artifact import TOKENIZE_FIELDS
from pipeline.tokenize.sources import SplitSource, resolve_sources

TRAIN_KIND = "train"
TRAIN_SCHEMA_VERSION = 2

# Cannot change any artifact's content that matters: paths, launching, observation, cadence of saves.
NOT_ARTIFACT_FIELDS = frozenset(
    {
        "output_dir",  # where the artifacts go (they are content-addressed below it)
        "dataset_num_proc",  # tokenizer processes: the same ids in the same order
        "num_processes",
        "num_nodes",
        "node_rank",  # data parallel: the same global batches (a resume checks it)
        "launcher",
        "rdzv_endpoint",
        "hostfile",
        "device",
        "ddp_timeout",
        "output_dir_lock",
        "slurm_partition",
        "slurm_time",
        "slurm_gpus_per_node",
        "slurm_extra_args",
        "logging_steps",
        "eval_steps",
        "per_device_eval_batch_size",  # what is measured and logged, not the model
        "logging_strategy",
        "eval_strategy",
        "eval_on_start",
        "run_name",
        "log_level",
        "report_to",  # where metrics also go
        "logging_dir",
        "save_strategy",  # as save_steps
        "dtype",  # must agree with bf16, which decides the training dtype
        "save_steps",
        "save_total_limit",
        "save_reference_versions",  # checkpoints resume bit for bit
        "precompute_ref_batch_size",
        "reference_zero_stage",
        "ref_slices_on_device",  # how scores are computed
    }
)
# Fields that enter the training fingerprint as content, not as their value.
_BY_CONTENT = frozenset({"deepspeed", "accelerate_config"})


def training_fields() -> tuple[str, ...]:
    """Every config field that enters the training fingerprint by value: all but the declared exceptions."""
    excluded = TOKENIZE_FIELDS | REFERENCE_FIELDS | NOT_ARTIFACT_FIELDS | _BY_CONTENT
    return tuple(name for name in FIELD_NAMES if name not in excluded)


@dataclass(frozen=True)
class Plan:
    """Where each artifact of a run lives and what its fingerprint is, from hashes of the inputs alone."""

    config: DPOPipelineConfig
    model_dir: Path
    sources: dict[str, SplitSource]  # the dataset's splits, by role ("train", "eval")
    tokenized_fingerprint: str
    tokenized_dir: Path
    reference_weights: str  # content hash of the initial weights: the reference, and where the policy starts
    reference_splits: list[str]  # what the reference stage scores: train + eval (eval only under TR-DPO)
    reference_dir: Path
    train_inputs: dict[str, Any]  # everything that changes the trained weights
    train_fingerprint: str
    train_dir: Path

    @classmethod
    def of(cls, config: DPOPipelineConfig) -> Plan:
        model_dir = resolve_model_dir(config)
        sources = resolve_sources(config)
        tokenized_fp = tokenized.tokenized_fingerprint(config, model_dir=model_dir, sources=sources)
        weights = model_weights_hash(model_dir)
        splits = scored_splits(config, list(sources))
        reference_fp = expected_fingerprint(
            reference_cache.KIND,
            reference_cache.SCHEMA_VERSION,
            reference_inputs(
                tokenized_fingerprint=tokenized_fp, weights_hash=weights, dtype=dtype_name(config), splits=splits
            ),
        )
        reference_dir = artifact_dir(config.output_path, reference_cache.KIND, reference_fp)
        inputs = {
            **config.subset(*training_fields()),
            "tokenized": tokenized_fp,
            # The reference artifact's content address: it covers the initial weights, where the policy starts.
            "reference": reference_dir.name,
            "deepspeed": user_ds_config(config),  # the ds_config's content, from `deepspeed` or `accelerate_config`
        }
        fp = expected_fingerprint(TRAIN_KIND, TRAIN_SCHEMA_VERSION, inputs)
        tokenized_dir = artifact_dir(config.output_path, tokenized.KIND, tokenized_fp)
        return cls(
            config,
            model_dir,
            sources,
            tokenized_fp,
            tokenized_dir,
            weights,
            splits,
            reference_dir,
            inputs,
            fp,
            artifact_dir(config.output_path, TRAIN_KIND, fp),
        )


__all__ = ["NOT_ARTIFACT_FIELDS", "Plan", "REFERENCE_FIELDS", "TOKENIZE_FIELDS", "training_fields"]
