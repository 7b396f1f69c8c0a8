"""ds_config handling: "auto" values come from our config, explicit conflicts are refused."""

import json

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.ds_config import resolve_ds_config, zero_stage
from pipeline.errors import ConfigError

HIDDEN = 64  # the tiny default model's hidden size


def config(**overrides):
    return load_config(
        None, {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-4, **overrides}
    )


@pytest.mark.parametrize(
    "name, stage", [("ds_zero1.json", 1), ("ds_zero2.json", 2), ("ds_zero3.json", 3), ("ds_zero3_offload.json", 3)]
)
def test_shipped_configs_fill_auto(name, stage):
    ds = resolve_ds_config(config(deepspeed=str(REPO_ROOT / "configs" / name)), world=2, gpu=False, hidden_size=HIDDEN)
    assert zero_stage(ds) == stage
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 2, 16)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    assert ds["zero_allow_untested_optimizer"] is True  # the recipe's own optimizer, as under the HF Trainer
    if "offload" in name:
        assert ds["zero_force_ds_cpu_optimizer"] is False  # client torch AdamW with offload


def test_conflicting_batch_size_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
        )
    )
    with pytest.raises(ConfigError, match=rf"{path}: sets train_batch_size=32.*gives 16"):
        resolve_ds_config(config(deepspeed=str(path)), world=2, gpu=False, hidden_size=HIDDEN)


def test_optimizer_section_gets_our_hyperparameters(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}))
    ds = resolve_ds_config(config(deepspeed=str(path)), world=1, gpu=False, hidden_size=HIDDEN)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert "zero_allow_untested_optimizer" not in ds  # DeepSpeed builds its own
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}))
    with pytest.raises(ConfigError, match="learning_rate"):  # when the config is loaded, before any stage
        config(deepspeed=str(path))


def test_fp16_on_cpu_and_missing_file_are_refused_when_the_config_is_loaded(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=rf"{path}: fp16.enabled is true but the stage jobs run without CUDA"):
        config(deepspeed=str(path), device="cpu")
    with pytest.raises(ConfigError, match="not found"):
        config(deepspeed=str(tmp_path / "nope.json"))
    # launcher: slurm runs the jobs on other machines: there a job that finds no GPU refuses it.
    gpu_config = config(deepspeed=str(path), launcher="slurm")
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        resolve_ds_config(gpu_config, world=1, gpu=False, hidden_size=HIDDEN)


def test_inference_config_drops_training_sections():
    ds = resolve_ds_config(
        config(deepspeed=str(REPO_ROOT / "configs" / "ds_zero3.json"), precompute_ref_batch_size=32),
        world=2,
        gpu=False,
        hidden_size=HIDDEN,
        inference=True,
    )
    assert ds["train_micro_batch_size_per_gpu"] == 32 and "train_batch_size" not in ds


def test_bucket_sizes_follow_the_model_hidden_size_like_the_hf_trainer(tmp_path):
    ds = resolve_ds_config(
        config(deepspeed=str(REPO_ROOT / "configs" / "ds_zero3.json")), world=2, gpu=False, hidden_size=HIDDEN
    )
    zero = ds["zero_optimization"]
    assert (
        zero["reduce_bucket_size"],
        zero["stage3_prefetch_bucket_size"],
        zero["stage3_param_persistence_threshold"],
    ) == (64 * 64, int(0.9 * 64 * 64), 640)
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 3, "reduce_bucket_size": 12345, "stage3_prefetch_bucket_size": "auto"}}
        )
    )
    zero = resolve_ds_config(config(deepspeed=str(path)), world=1, gpu=False, hidden_size=HIDDEN, inference=True)[
        "zero_optimization"
    ]
    assert zero["reduce_bucket_size"] == 12345 and zero["stage3_prefetch_bucket_size"] == 3686
    assert "stage3_param_persistence_threshold" not in zero  # DeepSpeed's own default when absent
    with pytest.raises(ConfigError, match='stage3_prefetch_bucket_size are "auto" but the config.json'):
        resolve_ds_config(config(deepspeed=str(path)), world=1, gpu=False, hidden_size=None)
