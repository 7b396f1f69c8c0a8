"""LoRA on a cached reference, for real: peft adapters under DeepSpeed ZeRO on CPU, the tiny model, 4-8 steps.

The reference is the base model's artifact (the one a full fine-tune reads), training loads no reference, and
the adapters start at zero, so step 1 is ln 2. Exported adapters and merged models must reproduce the trained
policy's log-probs; several ranks must reproduce one rank; TR-DPO with adapters must equal the dense TR-DPO of
the merged policy and resume to the same adapter after a kill.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_9_after_checkpoint_then_rerun, metrics_records, train_one_and_two_ranks
from safetensors.torch import load_file

from pipeline.config import REPO_ROOT, load_config
from pipeline.errors import ConfigError
from pipeline.launch import job_environment
from pipeline.logprobs import collate_pairs, completion_logps
from pipeline.metrics import TIMED_KEYS
from pipeline.plan import Plan
from pipeline.reference.cache import load_reference_logps
from pipeline.reference.stage import compute_reference_logps, reference_stage
from pipeline.tokenize.artifact import load_tokenized, tokenized_manifest
from pipeline.tokenize.stage import tokenize_stage
from pipeline.train.stage import read_summary, train_stage
from pipeline.train.windows import version_dir, window_dir

CONFIGS = REPO_ROOT / "configs"
LORA = dict(
    use_peft=True,
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.0,  # dropout draws per rank: off where curves must agree across rank counts
    lora_target_modules="all-linear",
    learning_rate=1e-2,
    max_steps=4,
    eval_steps=2,
    per_device_eval_batch_size=16,
    deepspeed=str(CONFIGS / "ds_zero2.json"),
)
TIMING = TIMED_KEYS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess runs use OMP_NUM_THREADS=1: the same kernels, the same sums
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lora_config(make_config):
    """Factory: a LoRA training config whose tokenized and base reference artifacts exist."""

    def make(**overrides):
        config = make_config(**{**LORA, **overrides})
        tokenize_stage(config)
        reference_stage(config)
        return config

    return make


def train_records(run_dir):
    return [r for r in metrics_records(run_dir) if "loss" in r]


def eval_chosen_logps(config, model) -> float:
    """Mean summed log-prob of the eval split's chosen completions, batched as evaluation batches them."""
    tokenized = tokenize_stage(config)
    rows = load_tokenized(tokenized, "eval").to_pylist()
    pad, size = tokenized_manifest(tokenized)["pad_token_id"], config.per_device_eval_batch_size
    model.eval()
    with torch.no_grad():
        total = sum(
            completion_logps(model, collate_pairs(rows[i : i + size], pad)).halves("logps")[0].sum().item()
            for i in range(0, len(rows), size)
        )
    return total / len(rows)


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_model" / "adapter_model.safetensors")


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------- one rank
@pytest.mark.parametrize("ds_config", [None, "ds_zero1.json", "ds_zero2.json", "ds_zero3.json"])
def test_lora_trains_adapters_on_the_base_reference_and_exports_what_it_trained(lora_config, ds_config, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    deepspeed = str(CONFIGS / ds_config) if ds_config else None  # None: ZeRO stage 0
    config = lora_config(deepspeed=deepspeed, save_merged_model=True, save_steps=2, max_steps=5)
    plan = Plan.of(config)
    full = Plan.of(config.model_copy(update={"use_peft": False, "save_merged_model": False}))
    # The base's reference artifact is the one a full fine-tune of the same data reads: no adapter in its inputs.
    assert plan.reference_dir == full.reference_dir and plan.train_dir != full.train_dir
    run = train_stage(config)
    rows = train_records(run)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5 and abs(rows[0]["rewards/margins"]) < 1e-5  # B = 0: the base
    assert rows[-1]["loss"] < math.log(2) - 0.02

    # A checkpoint holds the adapters only (the base is the model directory's).
    states = torch.load(next((run / "checkpoints").glob("step-*/*model_states.pt")), weights_only=False)
    module_keys = list(states["module"] or {})
    assert all("lora_" in key for key in module_keys), module_keys[:3]

    evaluated = read_summary(run)["eval_metrics"]["eval_logps/chosen"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, run / "final_model")
    assert eval_chosen_logps(config, with_adapter) == pytest.approx(evaluated, rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(run / "final_model_merged")
    assert eval_chosen_logps(config, merged) == pytest.approx(evaluated, rel=1e-5)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(merged.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)
    assert "final_model_merged/model.safetensors" in json.loads((run / "manifest.json").read_text())["files"]


@pytest.mark.parametrize(
    "variant",
    [
        dict(bf16=True, gradient_checkpointing=True),  # non-reentrant checkpointing, TRL's default kwargs
        dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
        dict(use_rslora=True, lora_target_modules=["q_proj", "v_proj"]),
        dict(use_dora=True),
    ],
    ids=["bf16-checkpointing", "reentrant-checkpointing", "rslora", "dora"],
)
def test_lora_variants_start_at_the_base_and_learn(lora_config, variant):
    rows = train_records(train_stage(lora_config(**variant)))
    bf16 = variant.get("bf16", False)
    assert abs(rows[0]["loss"] - math.log(2)) < (2e-3 if bf16 else 1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.01 and all(r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"])
def test_a_stopped_lora_run_resumes_from_its_adapter_only_checkpoint_exactly(lora_config, ds_config):
    import shutil

    config = lora_config(deepspeed=str(CONFIGS / ds_config), max_steps=5, eval_steps=3)
    run = train_stage(config)
    uninterrupted, metrics = adapter(run), [untimed(r) for r in metrics_records(run)]
    shutil.rmtree(run)
    train_stage(config, stop_step=2)
    assert (run / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    train_stage(config)
    assert max_difference(adapter(run), uninterrupted) <= 1e-6
    assert [untimed(r) for r in metrics_records(run)] == metrics


def test_a_lora_target_the_model_lacks_is_one_line_naming_the_key(lora_config):
    config = lora_config(lora_target_modules=["q_proj", "attention.wq"])
    with pytest.raises(ConfigError, match=r"lora_target_modules: .*'attention\.wq'.*its linear layers are .*q_proj"):
        train_stage(config)


def test_changing_the_adapter_or_dropping_it_is_another_run_never_a_resume(lora_config):
    """A LoRA run's checkpoints are never loaded into a full run or one of another rank: those are other runs,
    with their own content address."""
    config = lora_config()
    runs = {
        Plan.of(c).train_dir
        for c in (
            config,
            config.model_copy(update={"lora_r": 4}),
            config.model_copy(update={"use_peft": False}),
            config.model_copy(update={"lora_target_modules": ["q_proj"]}),
        )
    }
    assert len(runs) == 4


def test_qlora_is_refused_on_cpu_and_without_bitsandbytes_with_the_key_and_the_fix(make_config):
    with pytest.raises(ConfigError, match=r"load_in_4bit: QLoRA needs a CUDA GPU .* set load_in_4bit: false"):
        make_config(use_peft=True, load_in_4bit=True)
    with pytest.raises(ConfigError, match=r"load_in_4bit / load_in_8bit: .* set use_peft"):
        make_config(load_in_4bit=True, device="cuda")
    # The job-side check (a job that lands on a CPU node), in a process where bitsandbytes cannot be imported.
    script = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from pipeline.config import DPOPipelineConfig\n"
        "from pipeline.models import quantization_kwargs\n"
        "config = DPOPipelineConfig.model_construct(**{**DPOPipelineConfig().__dict__, 'load_in_4bit': True})\n"
        "quantization_kwargs(config)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=job_environment())
    assert done.returncode != 0 and "load_in_4bit: the quantised base needs bitsandbytes" in done.stderr


@pytest.mark.slow
def test_lora_learns_on_the_shipped_data(tmp_path, tiny_model_dir):
    """The shipped default's data (4000 train / 400 held-out pairs), one epoch of r = 16 all-linear adapters."""
    config = load_config(
        REPO_ROOT / "configs" / "default.yaml",
        [
            f"model_name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}",
            "sync_ref_model=false",
            "save_steps=null",
            "use_peft=true",
            "lora_r=16",
            "lora_alpha=32",
            "lora_target_modules=all-linear",
            "learning_rate=5e-3",
        ],
    )
    tokenize_stage(config)
    reference_stage(config)
    summary = read_summary(train_stage(config))
    assert summary["eval_reward_accuracy"] >= 0.75, summary["eval_metrics"]


# ---------------------------------------------------------------------------------------------- ranks
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"])
def test_two_ranks_give_the_lora_loss_curve_of_one(lora_config, ds_config):
    common = dict(deepspeed=str(CONFIGS / ds_config), per_device_train_batch_size=4, loss_type=["sigmoid", "ipo"])
    run_one, run_two = train_one_and_two_ranks(lora_config, **common)
    assert max_difference(adapter(run_one), adapter(run_two)) <= 1e-5


# ---------------------------------------------------------------------------------------------- TR-DPO
TR_DPO = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, max_steps=6, eval_steps=3)


def dense_reference(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], previous, alpha: float):
    """TRL's SyncRefModelCallback on dense weights: ref <- alpha * merged policy + (1 - alpha) * ref."""
    return {name: previous[name].float().mul(1 - alpha).add(merged[name].float(), alpha=alpha) for name in base}


def merged_weights(base_dir: Path, adapter_file: Path, config) -> dict[str, torch.Tensor]:
    """The base with one version's adapter merged in by peft (the dense policy at that sync)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.train.lora import lora_config as peft_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), peft_config(config))
    saved = load_file(adapter_file)
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.lora_A" in saved:
                module.lora_A["default"].weight.copy_(saved[f"{name}.lora_A"])
                module.lora_B["default"].weight.copy_(saved[f"{name}.lora_B"])
    return model.merge_and_unload().state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"])
def test_tr_dpo_with_lora_on_two_ranks_equals_one(lora_config, ds_config):
    """Each rank mixes its slice of the adapted weights (ZeRO-3: DeepSpeed's partitions) from its rows of B."""
    common = dict(TR_DPO, deepspeed=str(CONFIGS / ds_config), per_device_train_batch_size=4)
    run_one, run_two = train_one_and_two_ranks(lora_config, **common)
    assert max_difference(adapter(run_one), adapter(run_two)) <= 1e-5
    for k in (1, 2):
        a, b = (load_reference_logps(window_dir(run, k), split="train") for run in (run_one, run_two))
        assert np.abs(a.chosen - b.chosen).max() <= 1e-5 * np.abs(a.chosen).max()
    assert read_summary(run_two)["reference_forwards_per_example"] == 1.0


def test_tr_dpo_with_lora_equals_the_dense_tr_dpo_of_the_merged_policy(lora_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = lora_config(**TR_DPO)
    run = train_stage(config)
    summary = read_summary(run)
    assert summary["reference_forwards_per_example"] == 1.0 and summary["reference_versions"] == 3
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    reference = base
    for k in (1, 2):
        merged = merged_weights(tiny_model_dir, version_dir(run, k) / "adapter_model.safetensors", config)
        reference = dense_reference(base, merged, reference, config.ref_model_mixup_alpha)
        dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        dense.load_state_dict(reference)
        dense_dir = tmp_path / f"dense-v{k}"
        dense.save_pretrained(dense_dir)
        ours = load_reference_logps(window_dir(run, k), split="train")
        theirs, base_scores = (
            load_reference_logps(
                compute_reference_logps(
                    config,
                    tokenized_dir=Plan.of(config).tokenized_dir,
                    out_dir=tmp_path / f"{name}-v{k}",
                    splits=["train"],
                    model_dir=model,
                    example_ids={"train": ours.example_ids},
                ),
                split="train",
            )
            for name, model in (("dense", dense_dir), ("base", tiny_model_dir))
        )
        for column in ("chosen", "rejected"):
            a, b = getattr(ours, column), getattr(theirs, column)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (k, column, np.abs(a - b).max())
            assert np.abs(a - getattr(base_scores, column)).max() > 1e-3  # the reference did move off the base


@pytest.mark.slow
def test_kill_9_of_a_lora_tr_dpo_run_then_rerun_gives_the_uninterrupted_adapter(lora_config, tmp_path):
    config = lora_config(**{**TR_DPO, "max_steps": 12, "save_steps": 3})
    run = train_stage(config)
    uninterrupted = adapter(run)
    metrics = [untimed(r) for r in metrics_records(run)]
    import shutil

    shutil.rmtree(run)
    kill_9_after_checkpoint_then_rerun(config, tmp_path, step=6)
    assert max_difference(adapter(run), uninterrupted) == 0.0
    assert [untimed(r) for r in metrics_records(run)] == metrics


def test_tr_dpo_with_what_cannot_be_mixed_as_an_adapter_delta_is_refused(make_config):
    for key, value in (("use_dora", True), ("lora_modules_to_save", ["lm_head"]), ("save_reference_versions", True)):
        with pytest.raises(ConfigError, match=key):
            make_config(**TR_DPO, use_peft=True, **{key: value})
