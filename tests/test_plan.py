"""The fingerprint guard: every config field, changed in turn, changes exactly the artifacts it can affect.

A field the tokenize stage reads changes the tokenized artifact and so everything after it; a field the
reference stage reads changes the reference artifact and the training run; every other field changes the
training run, except the declared few that cannot change an artifact. A new config field fails here until it
has an alternative value below: adding one is the moment to decide which stage reads it.
"""

import json
import shutil

import pytest

from pipeline.config import FIELD_NAMES, REPO_ROOT
from pipeline.plan import NOT_ARTIFACT_FIELDS, REFERENCE_FIELDS, TOKENIZE_FIELDS, Plan
from pipeline.tokenize.stage import tokenize_stage

# One valid change per field (a few need a companion field to be valid: both are of the same kind).
ALTERNATIVES = {
    "model_name_or_path": "<a copy of the model with another tokenizer_config.json>",
    "dataset_name": "<a copy of the data without its last training pair>",
    "dataset_train_split": "train2",
    "dataset_test_split": None,
    "output_dir": "<another directory>",
    "max_length": 60,
    "max_prompt_length": 30,
    "max_completion_length": 20,
    "truncation_mode": "keep_start",
    "beta": 0.2,
    "loss_type": "ipo",
    "loss_weights": [1.0],
    "label_smoothing": 0.1,
    "f_divergence_type": "js_divergence",
    "f_alpha_divergence_coef": 0.5,
    "reference_free": True,
    "use_weighting": True,
    "ld_alpha": 0.5,
    "discopop_tau": 0.1,
    "ipo_length_normalized": True,
    "precompute_ref_batch_size": 4,
    "padding_free": False,
    "prefix_sharing": False,
    "max_packed_tokens": 4096,
    "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.5,
    "ref_model_sync_steps": 100,
    "ref_slices_on_device": True,
    "save_reference_versions": True,
    "learning_rate": 2e-3,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "num_train_epochs": 2.0,
    "max_steps": 10,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "warmup_steps": 2,
    "weight_decay": 0.1,
    "adam_beta1": 0.8,
    "adam_beta2": 0.99,
    "adam_epsilon": 1e-6,
    "max_grad_norm": 0.5,
    "seed": 1,
    "bf16": True,
    "deepspeed": str(REPO_ROOT / "configs" / "ds_zero2.json"),
    "logging_steps": 5,
    "eval_steps": 5,
    "save_steps": 5,
    "save_total_limit": 1,
    "gradient_checkpointing": True,
    "ddp_timeout": 60,
    "attn_implementation": "eager",
    "device": "cpu",
    "num_processes": 2,
    "launcher": "deepspeed",
    "num_nodes": {"num_nodes": 2, "rdzv_endpoint": "node0:29500"},
    "node_rank": {"num_nodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29500"},
    "rdzv_endpoint": "node0:29500",
    "hostfile": "hostfile",
    "slurm_partition": "gpu",
    "slurm_time": "01:00:00",
    "slurm_gpus_per_node": 8,
    "slurm_extra_args": ["--account=llm"],
    "reference_zero_stage": 3,
    "output_dir_lock": "fail",
    "dataset_config": "default",
    "dataset_num_proc": 2,
    "dataset_columns": {"dataset_columns": {"prompt": "prompt", "chosen": "rejected", "rejected": "chosen"}},
    "dataset_mixture": {
        "dataset_name": None,
        "dataset_mixture": {
            "datasets": [{"id": "<the data>", "split": "train", "weight": 0.5}],
            "test_split_size": 2,
            "seed": 3,
        },
    },
    "lr_scheduler_kwargs": {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
    "optim": "adamw_torch",
    "accelerate_config": str(REPO_ROOT / "configs" / "accelerate_zero3_offload.yaml"),
    "data_seed": 7,
    "tf32": False,
    "logging_strategy": "epoch",
    "eval_strategy": "no",
    "eval_on_start": True,
    "save_strategy": "no",
    "run_name": "another",
    "gradient_checkpointing_kwargs": {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
    "log_level": "debug",
    "model_revision": "v2",
    "trust_remote_code": True,
    "dtype": "float32",
    "use_peft": True,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "lora_target_modules": ["q_proj"],
    "lora_target_parameters": ["mlp.experts.down_proj"],
    "lora_modules_to_save": ["lm_head"],
    "use_rslora": True,
    "use_dora": True,
    "save_merged_model": {"use_peft": True, "save_merged_model": True},
    # QLoRA is refused where jobs run on CPU here; a Slurm job runs elsewhere (on the GPU nodes).
    "load_in_4bit": {"use_peft": True, "load_in_4bit": True, "launcher": "slurm"},
    "load_in_8bit": {"use_peft": True, "load_in_8bit": True, "launcher": "slurm"},
    "bnb_4bit_quant_type": {"use_peft": True, "load_in_4bit": True, "launcher": "slurm", "bnb_4bit_quant_type": "fp4"},
    "use_bnb_nested_quant": {"use_peft": True, "load_in_4bit": True, "launcher": "slurm", "use_bnb_nested_quant": True},
    "bnb_4bit_quant_storage": {
        "use_peft": True,
        "load_in_4bit": True,
        "launcher": "slurm",
        "bnb_4bit_quant_storage": "bfloat16",
    },
    "report_to": "tensorboard",
    "logging_dir": "tb",
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_model_dir):
    """The base config's plan and, per field, the plan with that field changed."""
    from conftest import write_small_dataset

    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("plan")
    data_dir = write_small_dataset(root / "data")
    lines = (data_dir / "train.jsonl").read_text().splitlines(keepends=True)
    (data_dir / "train2.jsonl").write_text("".join(lines[:-2]))
    other_data = root / "other-data"
    shutil.copytree(data_dir, other_data)
    (other_data / "train.jsonl").write_text("".join(lines[:-1]))
    other_model = root / "other-model"
    shutil.copytree(tiny_model_dir, other_model)
    tokenizer_config = json.loads((other_model / "tokenizer_config.json").read_text())
    (other_model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 77}))
    base = {
        "model_name_or_path": str(tiny_model_dir),
        "output_dir": str(root / "out"),
        "dataset_name": str(data_dir),
        "max_length": 64,
        "max_prompt_length": 32,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
    }
    concrete = {
        "model_name_or_path": str(other_model),
        "dataset_name": str(other_data),
        "output_dir": str(root / "elsewhere"),
    }
    plans = {None: Plan.of(load_config(None, base))}
    for field, value in ALTERNATIVES.items():
        change = value if isinstance(value, dict) else {field: concrete.get(field, value)}
        # A placeholder inside a companion value (the mixture's dataset id) is this fixture's data.
        change = json.loads(json.dumps(change).replace('"<the data>"', json.dumps(str(data_dir))))
        plans[field] = Plan.of(load_config(None, {**base, **change}))
    return plans


def test_every_config_field_has_an_alternative_here():
    assert set(ALTERNATIVES) == set(FIELD_NAMES), "classify the new field (pipeline/plan.py) and add it here"


@pytest.mark.parametrize("field", sorted(ALTERNATIVES))
def test_a_changed_field_changes_exactly_the_artifacts_it_can_affect(variants, field):
    base, changed = variants[None], variants[field]
    moved = {
        "tokenized": base.tokenized_fingerprint != changed.tokenized_fingerprint,
        "reference": base.reference_dir.name != changed.reference_dir.name,
        "train": base.train_fingerprint != changed.train_fingerprint,
    }
    if field in NOT_ARTIFACT_FIELDS:
        expected = {"tokenized": False, "reference": False, "train": False}
    elif field in TOKENIZE_FIELDS:
        expected = {"tokenized": True, "reference": True, "train": True}
    elif field in REFERENCE_FIELDS:
        expected = {"tokenized": False, "reference": True, "train": True}
    else:
        expected = {"tokenized": False, "reference": False, "train": True}
    assert moved == expected


def test_no_field_outside_the_tokenize_fields_changes_what_tokenize_writes(variants):
    """By content, not by fingerprint: tokenizing with any other field changed writes the same bytes."""

    def written(plan, name: str) -> dict[str, bytes]:  # into a directory of its own: nothing to reuse
        out = tokenize_stage(plan.config.model_copy(update={"output_dir": str(plan.config.output_path / name)}))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}

    reference = written(variants[None], "base")
    for field, plan in variants.items():
        if field is not None and field not in TOKENIZE_FIELDS:
            assert written(plan, field) == reference, field
