"""One plan per run: every artifact's directory and fingerprint, computed once from the config.

Data flows one way, tokenize -> reference -> train, and so do fingerprints: each artifact's inputs hold the
fingerprints of the artifacts it reads plus what its own stage reads. :class:`Plan` works them all out at once
(the model resolved and the dataset hashed once), for the stages, the TR-DPO windows and the flows.

**Fingerprint inputs are derived, not listed.** The tokenized and reference artifacts depend on content (the
dataset's bytes, the tokenizer's files, the model's weights) and on the few fields their stages read
(:data:`TOKENIZE_FIELDS`, :data:`REFERENCE_FIELDS`). The training run depends on *every other config field*,
by value, except the declared :data:`NOT_ARTIFACT_FIELDS`, which cannot change a trained model (where outputs
go, how ranks start, how often to log or save). A field added to the config therefore enters the training
fingerprint by default: forgetting a list can cost a needless rerun, never a stale result.
``tests/test_plan.py`` changes every field in turn and checks which fingerprints change.

Fields named by path enter by content, not spelling: ``model_name_or_path`` through the tokenizer's and the
weights' hashes (so a job that receives the resolved local path plans the same run), ``dataset_name`` through
the dataset's hash, ``deepspeed`` through the ds_config's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import data, reference
from pipeline.artifacts import artifact_dir, expected_fingerprint
from pipeline.config import FIELD_NAMES, DPOPipelineConfig
from pipeline.distributed import load_ds_config
from pipeline.models import resolve_model_dir

TRAIN_KIND = "train"
TRAIN_SCHEMA_VERSION = 2

# Read by the tokenize stage; later artifacts see them through the tokenized fingerprint. (The model and the
# dataset enter by content: the tokenizer's files, the dataset's bytes.)
TOKENIZE_FIELDS = frozenset({"model_name_or_path", "dataset_name", "dataset_train_split", "dataset_test_split",
                             "max_length", "max_prompt_length", "max_completion_length", "truncation_mode"})
# Read by the reference stage besides the tokenized artifact: the weights' dtype, and which splits it scores.
REFERENCE_FIELDS = frozenset({"bf16", "sync_ref_model"})
# Cannot change any artifact's content that matters: paths, launching, observation, cadence of saves.
NOT_ARTIFACT_FIELDS = frozenset({
    "output_dir",                                   # where the artifacts go (they are content-addressed below it)
    "num_processes", "num_nodes", "node_rank",      # data parallel: the same global batches (a resume checks it)
    "launcher", "rdzv_endpoint", "hostfile", "device", "ddp_timeout", "output_dir_lock",
    "slurm_partition", "slurm_time", "slurm_gpus_per_node", "slurm_extra_args",
    "logging_steps", "eval_steps", "per_device_eval_batch_size",  # what is measured and logged, not the model
    "save_steps", "save_total_limit", "save_reference_versions",  # checkpoints resume bit for bit
    "precompute_ref_batch_size", "reference_zero_stage", "ref_slices_on_device",  # how scores are computed
})
# Fields that enter the training fingerprint as content, not as their value.
_BY_CONTENT = frozenset({"deepspeed"})


def training_fields() -> tuple[str, ...]:
    """Every config field that enters the training fingerprint by value: all but the declared exceptions."""
    excluded = TOKENIZE_FIELDS | REFERENCE_FIELDS | NOT_ARTIFACT_FIELDS | _BY_CONTENT
    return tuple(name for name in FIELD_NAMES if name not in excluded)


@dataclass(frozen=True)
class Plan:
    """Where each artifact of a run lives and what its fingerprint is, from hashes of the inputs alone."""

    config: DPOPipelineConfig
    model_dir: Path
    tokenized_fingerprint: str
    tokenized_dir: Path
    reference_dir: Path          # the reference stage's artifact: train + eval (eval only under TR-DPO)
    train_inputs: dict[str, Any]  # everything that changes the trained weights
    train_fingerprint: str
    train_dir: Path

    @classmethod
    def of(cls, config: DPOPipelineConfig) -> Plan:
        model_dir = resolve_model_dir(config)
        tokenized_fp = data.tokenized_fingerprint(config, model_dir=model_dir)
        reference_dir = reference.reference_dir_for(config, tokenized_fingerprint=tokenized_fp, model_dir=model_dir)
        inputs = {
            **config.subset(*training_fields()),
            "tokenized": tokenized_fp,
            # The reference artifact's content address: it covers the initial weights, where the policy starts.
            "reference": reference_dir.name,
            "deepspeed": load_ds_config(config.resolve_path(config.deepspeed)),  # the ds_config's content
        }
        fp = expected_fingerprint(TRAIN_KIND, TRAIN_SCHEMA_VERSION, inputs)
        return cls(config, model_dir, tokenized_fp, artifact_dir(config.output_path, data.KIND, tokenized_fp),
                   reference_dir, inputs, fp, artifact_dir(config.output_path, TRAIN_KIND, fp))


__all__ = ["NOT_ARTIFACT_FIELDS", "Plan", "REFERENCE_FIELDS", "TOKENIZE_FIELDS", "training_fields"]
