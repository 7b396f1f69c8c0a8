"""A TRL user's DeepSpeed setup carries over: ds_config and accelerate YAML checked when the config is loaded, a
ds_config scheduler section honoured as the HF Trainer does, TrainingArguments' optim and lr_scheduler_type names.

The refusals and the accelerate mapping run without DeepSpeed; the engine tests train the tiny model for a few
steps and compare the learning rate the engine reports with DeepSpeed's (or transformers') formula, computed here.
"""

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import cli
from pipeline.config import REPO_ROOT, load_config
from pipeline.ds_config import (
    DS_SCHEDULERS,
    LR_SCHEDULERS,
    OPTIMS,
    num_warmup_steps,
    resolve_ds_config,
    user_ds_config,
)
from pipeline.errors import ConfigError
from pipeline.plan import Plan

CONFIGS = REPO_ROOT / "configs"
AUTO_BATCH = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}
AUTO_WARMUP = {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}
# The transformers docs' ZeRO-3 example (tests/deepspeed/ds_config_zero3.json in transformers), as written there.
HF_DOCS_ZERO3 = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": AUTO_WARMUP},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e14,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    **AUTO_BATCH,
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
}


def write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def refusal(**values) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, values)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    return message


# ---------------------------------------------------------------------------------------------- at config load
@pytest.mark.parametrize(
    "ds, expected",
    [
        ("{not json", "is not valid JSON"),
        ({"scheduler": {"type": "CosineLR", "params": {}}}, "scheduler.type 'CosineLR' is not one of DeepSpeed's"),
        (
            {"optimizer": {"type": "AdamQ", "params": {}}},
            "optimizer.type 'AdamQ' is not an optimizer DeepSpeed knows (did you mean 'Adam'?)",
        ),
        (
            {"scheduler": {"type": "WarmupCosineLR", "params": {**AUTO_WARMUP, "total_num_steps": "auto"}}},
            "scheduler.params.warmup_min_lr: WarmupCosineLR takes no such parameter (it scales the optimizer's lr by "
            "ratios: use warmup_min_ratio / cos_min_ratio); remove it",
        ),
        (
            {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "cos_min_ratio": "auto"}}},
            'scheduler.params.cos_min_ratio is "auto", which the HF Trainer never fills (nor does this pipeline); '
            "set a value (DeepSpeed's default: 0.0001)",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "auto"}}},
            'scheduler.params.warmup_type is "auto"',
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": AUTO_WARMUP}},
            'scheduler.params.total_num_steps is required by WarmupDecayLR; add it ("auto": the run\'s number',
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10.0}}},
            "scheduler.params.warmup_num_steps must be a positive integer (DeepSpeed refuses 10.0)",
        ),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}}, "warmup_type must be log or linear"),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-4}}},
            "sets scheduler.params.warmup_max_lr=0.0003 but the config's learning_rate gives 0.001",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}},
            "optimizer.params.max_grad_norm is refused",
        ),
        ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, 'zero_optimization.sub_group_size is "auto"'),
        ({"zero_optimization": {"stage": "auto"}}, "zero_optimization.stage must be 0, 1, 2 or 3"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled and bf16.enabled are both true"),
        ({"fp16": {"enabled": True}}, "fp16.enabled is true but the stage jobs run without CUDA here (device: cpu)"),
        (
            {"gradient_accumulation_steps": 4},
            "sets gradient_accumulation_steps=4 but the config's gradient_accumulation_steps gives 1",
        ),
    ],
)
def test_a_bad_ds_config_is_one_line_naming_the_file_and_key_when_the_config_is_loaded(tmp_path, ds, expected):
    path = write(tmp_path / "ds.json", ds)
    message = refusal(deepspeed=path, learning_rate=1e-3, device="cpu")
    assert f"deepspeed: {path}" in message and expected in message


def test_every_stage_refuses_a_bad_ds_config_before_any_work(tmp_path, capsys):
    path = write(tmp_path / "ds.json", {"scheduler": {"type": "WarmupLR", "params": {"cos_min_ratio": 0.1}}})
    out = tmp_path / "out"
    for stage in ("tokenize", "reference", "train", "run"):
        assert cli.main([stage, f"deepspeed={path}", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"dpo-pipeline {stage}: error:" in err and "scheduler.params.cos_min_ratio: WarmupLR takes no" in err
    assert not out.exists()
    assert "ds_config file not found" in refusal(deepspeed=str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"optim": "paged_adamw_8bit"}, "optim: 'paged_adamw_8bit' is a bitsandbytes optimizer"),
        ({"optim": "galore_adamw"}, "needs whole matrices, not ZeRO's flat partitions"),
        ({"optim": "schedule_free_adamw"}, "use adamw_torch_fused with lr_scheduler_type constant_with_warmup"),
        ({"optim": "adamw_torhc"}, "unknown optimizer; one of adamw_torch, adamw_torch_fused"),
        (
            {"optim": "adagrad", "deepspeed": str(CONFIGS / "ds_zero2.json")},
            "Adagrad under ZeRO stage 2: DeepSpeed replaces it with a new Adagrad",
        ),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "steps on evaluation metrics"),
        ({"lr_scheduler_type": "cosine_with_min_lr"}, "needs exactly one of min_lr and min_lr_rate"),
        ({"lr_scheduler_type": "warmup_stable_decay"}, "warmup_stable_decay needs 'num_decay_steps'"),
        (
            {"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
            "cosine takes no 'min_lr_rate' (it accepts: num_cycles)",
        ),
        ({"lr_scheduler_kwargs": "{min_lr_rate"}, "lr_scheduler_kwargs: not a JSON object"),
        ({"warmup_steps": 0.1, "warmup_ratio": 0.1}, "warmup_steps (0.1) and warmup_ratio (0.1) are both set"),
        ({"warmup_steps": 2.5}, "warmup_steps: must be a step count (an integer >= 1) or a ratio"),
    ],
)
def test_optim_and_schedule_names_are_checked_when_the_config_is_loaded(values, expected):
    assert expected in refusal(**values)


def test_the_static_name_lists_match_the_installed_transformers():
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for name in OptimizerNames:  # every optimizer name is honoured or refused with its reason
        if name.value not in OPTIMS:
            assert "unknown" not in refusal(optim=name.value), name
    for kind in SchedulerType:
        if kind.value not in LR_SCHEDULERS:
            assert "steps on evaluation metrics" in refusal(lr_scheduler_type=kind.value)
            continue
        accepted = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[kind]).parameters)
        assert set(LR_SCHEDULERS[kind.value]["accepts"]) <= accepted, kind
    import deepspeed.runtime.lr_schedules as ds_schedules

    for kind, params in DS_SCHEDULERS.items():
        signature = inspect.signature(getattr(ds_schedules, kind).__init__).parameters
        assert set(signature) - {"self", "optimizer"} == set(params), kind


def test_warmup_steps_below_one_are_a_ratio_and_warmup_ratio_still_counts():
    def warmup(**values):
        return num_warmup_steps(load_config(None, values), 10)

    assert (warmup(), warmup(warmup_steps=3), warmup(warmup_steps=0.25), warmup(warmup_ratio=0.25)) == (0, 3, 3, 3)
    assert load_config(None, {"lr_scheduler_kwargs": None}).lr_scheduler_kwargs == {}
    from_json = load_config(
        None, {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": '{"min_lr_rate": 0.1}'}
    )  # the command line's form
    assert from_json.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


# ---------------------------------------------------------------------------------------------- accelerate YAMLs
def test_trl_names_synthesise_the_ds_config_accelerate_builds():
    ds = user_ds_config(load_config(None, {"accelerate_config": "zero3", "bf16": True}))
    assert ds == {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "none"},
            "offload_param": {"device": "none"},
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "steps_per_print": 1_000_000,
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
    }
    for name, stage in (("zero1", 1), ("zero2", 2)):
        ds = user_ds_config(load_config(None, {"accelerate_config": name, "bf16": True}))
        assert ds["zero_optimization"]["stage"] == stage
        assert not ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    resolved = resolve_ds_config(
        load_config(None, {"accelerate_config": "zero2", "bf16": True}), world=2, gpu=False, hidden_size=64
    )
    assert resolved["train_batch_size"] == 16 and "auto" not in json.dumps(resolved)


def test_an_accelerate_yaml_is_read_as_accelerate_reads_it(tmp_path):
    def yaml_config(**fields):
        ds_fields = fields.pop("deepspeed_config", {})
        return write(
            tmp_path / "acc.yaml",
            yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": ds_fields, **fields}),
        )

    path = yaml_config(
        deepspeed_config={
            "zero_stage": 2,
            "offload_optimizer_device": "cpu",
            "gradient_accumulation_steps": 4,
            "gradient_clipping": 0.5,
        }
    )
    ds = user_ds_config(
        load_config(None, {"accelerate_config": path, "gradient_accumulation_steps": 4, "max_grad_norm": 0.5})
    )
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 0.5)
    assert "sets gradient_accumulation_steps=4 but the config's" in refusal(accelerate_config=path)
    assert "deepspeed_config.zero_stag is not read here" in refusal(
        accelerate_config=yaml_config(deepspeed_config={"zero_stag": 3})
    )
    assert "unknown key 'mixed_precison'" in refusal(accelerate_config=yaml_config(mixed_precison="bf16"))
    # An unquoted `no` is YAML's false: still accelerate's "no".
    assert "mixed_precision: no but the config has bf16: true" in refusal(
        accelerate_config=write(tmp_path / "no.yaml", "distributed_type: DEEPSPEED\nmixed_precision: no\n"), bf16=True
    )
    assert "mixed_precision: bf16 but the config has bf16: false; make them agree" in refusal(accelerate_config="zero3")
    assert "distributed_type: FSDP; this pipeline shards with DeepSpeed ZeRO: set deepspeed: configs/ds_zero3.json" in (
        refusal(accelerate_config=yaml_config(distributed_type="FSDP"))
    )
    assert "distributed_type: MULTI_GPU; only DEEPSPEED configs" in refusal(
        accelerate_config=yaml_config(distributed_type="MULTI_GPU")
    )
    assert "TRL's 'fsdp2' is a FSDP config" in refusal(accelerate_config="fsdp2")
    assert "are both set; keep one" in refusal(
        accelerate_config="zero3", bf16=True, deepspeed=str(CONFIGS / "ds_zero2.json")
    )
    # With deepspeed_config_file: that JSON; the settings it owns may not be repeated beside it.
    assert "sets zero_stage beside deepspeed_config_file; accelerate refuses that" in refusal(
        accelerate_config=yaml_config(
            deepspeed_config={"deepspeed_config_file": str(CONFIGS / "ds_zero2.json"), "zero_stage": 3}
        )
    )
    no_zero = write(tmp_path / "ds.json", {"train_batch_size": "auto"})
    assert "has no zero_optimization section, which accelerate requires" in refusal(
        accelerate_config=yaml_config(deepspeed_config={"deepspeed_config_file": no_zero})
    )
    fp16 = write(tmp_path / "fp16.json", {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}})
    assert "mixed_precision: bf16 but its ds_config enables fp16" in refusal(
        accelerate_config=yaml_config(mixed_precision="bf16", deepspeed_config={"deepspeed_config_file": fp16}),
        bf16=True,
    )


def test_the_plan_hashes_the_effective_ds_config_however_it_was_given(make_config, tmp_path):
    """The same JSON as `deepspeed:` or through an accelerate YAML's deepspeed_config_file: one training run."""
    as_json = Plan.of(make_config(deepspeed=str(CONFIGS / "ds_zero3_offload.json")))
    as_yaml = Plan.of(make_config(accelerate_config=str(CONFIGS / "accelerate_zero3_offload.yaml")))
    assert as_yaml.train_inputs["deepspeed"] == json.loads((CONFIGS / "ds_zero3_offload.json").read_text())
    assert as_yaml.train_fingerprint == as_json.train_fingerprint
    # Another JSON behind the same YAML path changes the run.
    yaml_path = tmp_path / "acc.yaml"
    shutil.copy(CONFIGS / "accelerate_zero3_offload.yaml", yaml_path)
    yaml_path.write_text(yaml_path.read_text().replace("ds_zero3_offload.json", "ds_zero3.json"))
    assert Plan.of(make_config(accelerate_config=str(yaml_path))).train_fingerprint != as_yaml.train_fingerprint


# ---------------------------------------------------------------------------------------------- engine runs
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: tiny steps run faster on one intra-op thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("ds-out")


@pytest.fixture
def prepared(make_config, shared_out):
    """A training config whose tokenized and reference artifacts exist (made once: content-addressed)."""
    from pipeline.reference.stage import reference_stage
    from pipeline.tokenize.stage import tokenize_stage

    def make(**overrides):
        config = make_config(**{"output_dir": str(shared_out), "max_steps": 8, **overrides})
        tokenize_stage(config)
        reference_stage(config)
        return config

    return make


def learning_rates(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["learning_rate"] for row in rows if "loss" in row]


def deepspeed_lrs(kind: str, params: dict, lr: float, steps: int) -> list[float]:
    """The learning rate of each optimizer step by DeepSpeed's formulas (deepspeed.runtime.lr_schedules): the
    schedule sits at iteration -1 (its minimum) for the first step and advances once after each step."""
    warmup, total = max(2, params["warmup_num_steps"]), params.get("total_num_steps")
    linear = params.get("warmup_type", "log") == "linear"
    rates = []
    for it in range(-1, steps - 1):
        ramp = 0.0 if it < 0 else it / warmup if linear else math.log(it + 1) / math.log(warmup)
        if kind == "WarmupCosineLR":  # ratios of the optimizer's lr
            low, floor = params.get("warmup_min_ratio", 0.0), params["cos_min_ratio"]
            if it < 0:
                ratio = 0.0
            elif it < warmup:
                ratio = low + ramp * (1 - low)
            else:
                progress = min(1.0, (it - warmup + 1) / max(1, total - warmup))
                ratio = floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
            rates.append(lr * ratio)
            continue
        if it < warmup:
            gamma = ramp
        elif kind == "WarmupLR":
            gamma = 1.0
        else:  # WarmupDecayLR: linear to 0 at total_num_steps
            gamma = max(0.0, (total - it) / max(1, total - warmup))
        rates.append(params["warmup_min_lr"] + (params["warmup_max_lr"] - params["warmup_min_lr"]) * gamma)
    return rates


@pytest.mark.parametrize(
    "kind, params, warmup_steps, expected_params",
    [
        ("WarmupLR", AUTO_WARMUP, 3, {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 3}),
        (
            "WarmupDecayLR",
            {**AUTO_WARMUP, "total_num_steps": "auto", "warmup_type": "linear"},
            0.25,
            {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": 1e-3,
                "warmup_num_steps": 2,
                "total_num_steps": 8,
                "warmup_type": "linear",
            },
        ),
        # No warmup: DeepSpeed refuses warmup_num_steps 0, so "auto" is 1 (the HF Trainer's max(1, ...)).
        (
            "WarmupCosineLR",
            {"warmup_num_steps": "auto", "total_num_steps": "auto", "cos_min_ratio": 0.1},
            0,
            {"warmup_num_steps": 1, "total_num_steps": 8, "cos_min_ratio": 0.1},
        ),
    ],
)
def test_a_ds_config_scheduler_section_sets_the_learning_rate(
    prepared, tmp_path, kind, params, warmup_steps, expected_params
):
    from pipeline.train.stage import train_stage

    ds = {**AUTO_BATCH, "zero_optimization": {"stage": 2}, "scheduler": {"type": kind, "params": params}}
    config = prepared(
        deepspeed=write(tmp_path / "ds.json", ds), warmup_steps=warmup_steps, lr_scheduler_type="cosine"
    )  # not used: the section owns the schedule
    resolved = resolve_ds_config(config, world=1, gpu=False, hidden_size=64, num_training_steps=8)
    assert resolved["scheduler"]["params"] == expected_params
    expected = deepspeed_lrs(kind, expected_params, 1e-3, 8)
    assert learning_rates(train_stage(config)) == pytest.approx(expected, abs=1e-12)
    assert len(set(expected)) >= 3  # the schedule moves


def test_a_resumed_run_with_a_scheduler_section_continues_bit_for_bit(prepared, tmp_path):
    from pipeline.train.stage import train_stage

    ds = {
        **AUTO_BATCH,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"},
        "scheduler": {"type": "WarmupDecayLR", "params": {**AUTO_WARMUP, "total_num_steps": "auto"}},
    }
    config = prepared(deepspeed=write(tmp_path / "ds.json", ds), max_steps=5, warmup_steps=2, save_steps=None)
    run = train_stage(config)
    uninterrupted = load_file(run / "final_model" / "model.safetensors")
    lrs = learning_rates(run)
    shutil.rmtree(run)
    train_stage(config, stop_step=2)
    assert (run / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    train_stage(config)
    resumed = load_file(run / "final_model" / "model.safetensors")
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    assert learning_rates(run) == lrs


def test_lr_scheduler_kwargs_reach_the_transformers_schedule(prepared):
    from pipeline.train.stage import train_stage

    config = prepared(
        deepspeed=str(CONFIGS / "ds_zero2.json"),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.25,
    )
    warmup, total = 2, 8  # ceil(0.25 x 8)

    def expected(step):  # transformers' cosine with a floor: linear warmup, then half a cosine down to 10 %
        if step < warmup:
            return 1e-3 * step / warmup
        progress = (step - warmup) / (total - warmup)
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    assert learning_rates(train_stage(config)) == pytest.approx([expected(s) for s in range(total)], abs=1e-12)


@pytest.fixture(scope="module")
def trainer_optimizers(tmp_path_factory):
    """What transformers' Trainer builds for each optim name: (class, keyword arguments)."""
    from transformers import Trainer, TrainingArguments

    out = {}
    for name in OPTIMS:
        args = TrainingArguments(
            output_dir=str(tmp_path_factory.mktemp("args")),
            optim=name,
            learning_rate=1e-3,
            adam_beta1=0.8,
            adam_beta2=0.99,
            adam_epsilon=1e-7,
            report_to=[],
        )
        out[name] = Trainer.get_optimizer_cls_and_kwargs(args)
    return out


@pytest.mark.parametrize("optim", OPTIMS)
def test_each_optim_is_the_optimizer_the_hf_trainer_builds(prepared, trainer_optimizers, optim):
    from pipeline.distributed import init_distributed
    from pipeline.train.stage import DPOTrainingRecipe

    zero = None if optim == "adagrad" else str(CONFIGS / "ds_zero2.json")  # Adagrad: ZeRO 0 only (checked at load)
    config = prepared(
        deepspeed=zero, optim=optim, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7, weight_decay=0.1, max_steps=2
    )
    init_distributed(config)
    recipe = DPOTrainingRecipe(config, Plan.of(config))
    recipe.setup()
    try:
        before = [p.detach().clone() for p in recipe.engine.module.parameters()]
        recipe.run(2)
        optimizer = recipe.engine.basic_optimizer
        cls, kwargs = trainer_optimizers[optim]
        assert type(optimizer) is cls
        for key, value in kwargs.items():
            assert optimizer.defaults[key] == value, key
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]  # matrices, then the rest
        assert any(not torch.equal(a, b) for a, b in zip(before, recipe.engine.module.parameters(), strict=True))
        # The linear schedule drives the optimizer DeepSpeed steps (under ZeRO, the partitions'): 1e-3, 5e-4, 0.
        assert learning_rates(recipe.run_dir) == pytest.approx([1e-3, 5e-4])
        assert recipe.engine.optimizer.param_groups[0]["lr"] == 0.0
    finally:
        recipe.engine.destroy()


@pytest.mark.slow
def test_the_transformers_docs_zero3_config_trains_as_given(prepared, tmp_path):
    """transformers' ds_config_zero3.json, unchanged: fp16 "auto" (off here), DeepSpeed's AdamW (its CPU Adam with
    offload, a one-time JIT build), its WarmupLR section with "auto" values, ZeRO-3 with CPU offload."""
    from pipeline.train.stage import train_stage

    config = prepared(
        deepspeed=write(tmp_path / "ds_config_zero3.json", HF_DOCS_ZERO3),
        warmup_steps=3,
        max_steps=4,
        weight_decay=0.01,
    )
    resolved = resolve_ds_config(config, world=1, gpu=False, hidden_size=64, num_training_steps=4)
    assert resolved["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 3}
    assert resolved["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    assert resolved["fp16"]["enabled"] is False and "auto" not in json.dumps(resolved)
    run = train_stage(config)
    assert learning_rates(run) == pytest.approx(deepspeed_lrs("WarmupLR", resolved["scheduler"]["params"], 1e-3, 4))
    assert (run / "final_model" / "model.safetensors").is_file()
