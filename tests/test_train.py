"""The training stage, for real: DeepSpeed on CPU, the tiny model, Parquet reference caches, 2-6 steps.

Fast tests run one process in-process; multi-process parity and the SIGKILL resume are ``slow``.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_same_curves, kill_9_after_checkpoint_then_rerun, metrics_records, train_one_and_two_ranks
from safetensors.torch import load_file

from pipeline.artifacts import MANIFEST, hash_file, is_complete
from pipeline.config import REPO_ROOT
from pipeline.errors import ArtifactError, ConfigError
from pipeline.logprobs import collate_pairs, completion_logps
from pipeline.metrics import TIMED_KEYS
from pipeline.plan import Plan
from pipeline.reference.stage import compute_reference_logps, reference_stage
from pipeline.schedule import TrainingSchedule
from pipeline.tokenize.artifact import load_tokenized, tokenized_manifest
from pipeline.tokenize.stage import tokenize_stage
from pipeline.train.stage import read_summary, train_stage, update_summary

CONFIGS = REPO_ROOT / "configs"
TRAIN = dict(max_steps=4, eval_steps=2, per_device_eval_batch_size=16, deepspeed=str(CONFIGS / "ds_zero2.json"))
TIMING = TIMED_KEYS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machines' 2 cores are shared: one intra-op thread per process runs these tiny steps ~5x faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout 0.5 in its config: training must switch it off (the reference
    pass runs in eval mode), or the first loss would not be ln 2."""
    path = tmp_path_factory.mktemp("dropout") / "tiny-llama"
    shutil.copytree(tiny_model_dir, path)
    model_config = json.loads((path / "config.json").read_text())
    model_config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(model_config))
    return path


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-out")


@pytest.fixture
def prepared(make_config, dropout_model_dir, shared_out):
    """Factory: a training config whose tokenized and reference artifacts exist. Artifacts are content-addressed,
    so tests sharing ``shared_out`` make them once; a test that replaces an artifact passes its own output_dir."""

    def make(*, reference=True, **overrides):
        config = make_config(
            **{"model_name_or_path": str(dropout_model_dir), "output_dir": str(shared_out), **TRAIN, **overrides}
        )
        tokenize_stage(config)
        if reference:
            reference_stage(config)
        return config

    return make


def model_dir(config):
    return config.resolve_path(config.model_name_or_path)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(run_dir, name="final_model"):
    return load_file(run_dir / name / "model.safetensors")


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def eval_chosen_logps(config, model_path):
    """Mean summed log-prob of the eval split's chosen completions under a saved model, batched as evaluation
    batches them (so the padding is the same): equal to the run's last eval_logps/chosen iff the saved model is
    the trained one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenized = tokenize_stage(config)
    rows = load_tokenized(tokenized, "eval").to_pylist()
    pad, size = tokenized_manifest(tokenized)["pad_token_id"], config.per_device_eval_batch_size
    with torch.no_grad():
        total = sum(
            completion_logps(model, collate_pairs(rows[i : i + size], pad)).halves("logps")[0].sum().item()
            for i in range(0, len(rows), size)
        )
    return total / len(rows)


def assert_no_step_taken(config):
    run = Plan.of(config).train_dir
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- a whole run
def test_run_writes_metrics_model_plots_and_summary(prepared, dropout_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = prepared(lr_scheduler_type="cosine", warmup_steps=2, learning_rate=2e-3)
    run = train_stage(config)
    assert run == Plan.of(config).train_dir
    rows = records(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # Step 0: policy == reference (dropout off, same log-prob function) -> sigmoid loss ln 2, zero margins.
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-4
    assert abs(train_rows[0]["rewards/margins"]) < 1e-4
    for key in (
        "loss/sigmoid",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
    ):
        assert key in train_rows[-1], key
    # Warmup 2 steps then cosine over the remaining 2: lr x (0, 1/2, 1, 1/2).
    assert [r["learning_rate"] for r in train_rows] == pytest.approx([0.0, 1e-3, 2e-3, 1e-3])
    assert train_rows[-1]["loss"] < math.log(2)  # it learns something in 2 real steps
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every eval_steps; the end coincides, so no extra one

    summary = read_summary(run)
    assert summary["eval_reward_accuracy"] == evals[-1]["eval_rewards/accuracies"]
    assert summary["eval_reward_margin"] == evals[-1]["eval_rewards/margins"]
    assert summary["train_loss"] == train_rows[-1]["loss"]
    assert summary["fingerprints"]["reference_train"].startswith(Plan.of(config).reference_dir.name)
    for path in summary["paths"]["plots"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(summary["paths"]["model"])
    AutoTokenizer.from_pretrained(summary["paths"]["model"])
    initial = AutoModelForCausalLM.from_pretrained(dropout_model_dir)
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    assert is_complete(run, kind="train", fingerprint=summary["fingerprints"]["train"])
    assert eval_chosen_logps(config, run / "final_model") == pytest.approx(evals[-1]["eval_logps/chosen"], rel=1e-5)

    # Complete -> no work at all; another beta -> another run dir, same tokenized and reference artifacts.
    before = (run / "metrics.jsonl").stat().st_mtime_ns
    assert train_stage(config) == run and (run / "metrics.jsonl").stat().st_mtime_ns == before
    other = config.model_copy(update={"beta": 0.2})
    assert Plan.of(other).train_dir != run and Plan.of(other).reference_dir == Plan.of(config).reference_dir
    update_summary(run, reference_versions=3)
    assert read_summary(run)["reference_versions"] == 3
    assert is_complete(run, kind="train", fingerprint=summary["fingerprints"]["train"])  # summary not hashed


@pytest.mark.parametrize("ds_config, bf16", [("ds_zero3.json", False), ("ds_zero1.json", True)])
def test_resume_after_stop_is_exact(prepared, ds_config, bf16):
    """Stop at step 2 (checkpoint), resume in a fresh engine: same weights, same metrics, incl. the BCO mean."""
    config = prepared(
        deepspeed=str(CONFIGS / ds_config),
        bf16=bf16,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[1.0, 0.5, 0.1],
        max_steps=5,
        eval_steps=3,
        warmup_steps=1,
    )
    run = train_stage(config)
    uninterrupted, metrics = weights(run), without_timing(records(run))
    shutil.rmtree(run)

    assert train_stage(config, stop_step=2) == run
    assert (run / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert not (run / MANIFEST).exists()
    train_stage(config)
    assert max_difference(weights(run), uninterrupted) <= 1e-6
    assert without_timing(records(run)) == metrics
    # The saved model (gathered from ZeRO-3 partitions; bf16 weights under bf16) is the one that was evaluated.
    assert eval_chosen_logps(config, run / "final_model") == pytest.approx(
        read_summary(run)["eval_metrics"]["eval_logps/chosen"], rel=1e-3 if bf16 else 1e-5
    )


def test_a_reference_that_covers_only_the_steps_run_so_far(prepared, tmp_path):
    """A reference artifact for the first 2 steps' examples: training to step 2 works, step 3 is refused first."""
    # A run dir of its own (the bad-input tests check that theirs stays empty); ZeRO stage 0, no ds_config.
    config = prepared(seed=7, deepspeed=None)
    tokenized = tokenize_stage(config)
    ids = load_tokenized(tokenized, "train").column("example_id").to_numpy()
    window = np.unique(TrainingSchedule.from_config(config, ids, world=1).window_ids(0, 2))
    ref = compute_reference_logps(
        config,
        tokenized_dir=tokenized,
        model_dir=model_dir(config),
        out_dir=tmp_path / "window-0",
        splits=["train"],
        example_ids={"train": window},
        extra_inputs={"window": 0},
    )
    run = train_stage(config, stop_step=2, train_reference_dir=ref)
    with pytest.raises(ArtifactError, match="have no example_id"):
        train_stage(config, stop_step=4, train_reference_dir=ref)  # steps 2-3 read examples it lacks
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2]  # refused before step 3


# ---------------------------------------------------------------------------------------------- bad input
def test_reference_from_another_tokenized_artifact_is_refused(prepared):
    config, other = prepared(), prepared(max_length=48)
    with pytest.raises(ArtifactError, match="made from another tokenized artifact"):
        train_stage(config, train_reference_dir=Plan.of(other).reference_dir)
    assert_no_step_taken(config)


def test_reference_from_another_model_is_refused(prepared, tiny_model_dir, tmp_path):
    config = prepared(output_dir=str(tmp_path / "out"), reference=False)
    compute_reference_logps(
        config,
        tokenized_dir=tokenize_stage(config),
        model_dir=tiny_model_dir,
        out_dir=Plan.of(config).reference_dir,
        splits=["train", "eval"],
    )
    with pytest.raises(ArtifactError, match="other model weights"):
        train_stage(config)
    assert_no_step_taken(config)


def test_reference_missing_examples_is_refused(prepared, tmp_path):
    config = prepared()
    tokenized = tokenize_stage(config)
    ids = load_tokenized(tokenized, "train").column("example_id").to_numpy()
    partial = compute_reference_logps(
        config,
        tokenized_dir=tokenized,
        model_dir=model_dir(config),
        out_dir=tmp_path / "partial",
        splits=["train"],
        example_ids={"train": ids[:-8]},
    )
    with pytest.raises(ArtifactError, match="have no example_id"):
        train_stage(config, train_reference_dir=partial)
    assert_no_step_taken(config)


@pytest.mark.parametrize(
    "damage, message", [("duplicate", "appears more than once"), ("nan", "not finite"), ("inf", "not finite")]
)
def test_damaged_reference_cache_is_refused(prepared, tmp_path, damage, message):
    """A cache whose manifest vouches for its files (hashes updated) but whose content is wrong."""
    config = prepared()
    copy = tmp_path / "reference"
    shutil.copytree(Plan.of(config).reference_dir, copy)
    shard = copy / "train-00000.parquet"
    table = pq.read_table(shard)
    if damage == "duplicate":
        table = pa.concat_tables([table.slice(0, 1), table])
    else:
        values = table.column("ref_chosen_logps").to_numpy().copy()
        values[3] = np.nan if damage == "nan" else np.inf
        table = table.set_column(1, "ref_chosen_logps", pa.array(values, pa.float32()))
    pq.write_table(table, shard)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"][shard.name] = hash_file(shard)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        train_stage(config, train_reference_dir=copy)
    assert_no_step_taken(config)


def test_conflicting_ds_config_is_refused(prepared, tmp_path):
    ds = json.loads((CONFIGS / "ds_zero2.json").read_text())
    ds["train_batch_size"] = 6  # 4 per device x 1 x 1 process = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config = prepared(deepspeed=str(tmp_path / "ds.json"))
    with pytest.raises(ConfigError, match="train_batch_size=6"):
        train_stage(config)
    assert_no_step_taken(config)


def test_a_pair_longer_than_a_packed_row_is_refused_before_the_engine_is_built(prepared, monkeypatch):
    config = prepared().model_copy(update={"max_packed_tokens": 8})
    monkeypatch.setattr("deepspeed.initialize", lambda *a, **k: pytest.fail("built an engine"))
    with pytest.raises(ConfigError, match=r"max_packed_tokens: the tokenized train split: example_id \d+ takes"):
        train_stage(config)
    assert_no_step_taken(config)


def test_resume_from_a_checkpoint_of_another_config_is_refused(prepared):
    config = prepared(beta=0.3)
    run = train_stage(config, stop_step=1)
    other = config.model_copy(update={"beta": 0.4})
    shutil.copytree(run / "checkpoints", Plan.of(other).train_dir / "checkpoints")
    with pytest.raises(ConfigError, match=r"\(beta: 0\.3 there, 0\.4 here\)"):
        train_stage(other)
    assert not (Plan.of(other).train_dir / "metrics.jsonl").exists()
    # The same config from a run with another process count: refused too (ZeRO partitions are per rank).
    marker = run / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(marker.read_text())
    state["resume_key"]["world_size"] = 2
    marker.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="world_size: 2 there, 1 here"):
        train_stage(config)


# ---------------------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_sigkill_then_rerun_reaches_the_uninterrupted_weights(prepared, tmp_path):
    config = prepared(max_steps=40, save_steps=3, eval_steps=20)
    run = train_stage(config)
    uninterrupted, metrics = weights(run), without_timing(records(run))
    shutil.rmtree(run)
    kill_9_after_checkpoint_then_rerun(config, tmp_path, step=6)
    assert max_difference(weights(run), uninterrupted) <= 1e-6
    assert without_timing(records(run)) == metrics


def curve_settings(ds_config: str, **settings) -> dict:
    """A run whose curve other runs must equal: the ds_config, sigmoid + IPO (two terms, large gradients)."""
    return dict(deepspeed=str(CONFIGS / ds_config), loss_type=["sigmoid", "ipo"], **settings)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"])
def test_packed_rows_with_a_shared_prompt_give_the_padded_loss_curve(prepared, ds_config):
    """20 steps in padded rows, and in the default layout (packed rows, the prompt shared) on 1 and 2 ranks: the
    same losses, rewards, gradient norms and evaluations, with no padding left."""
    common = curve_settings(ds_config, per_device_train_batch_size=2, max_steps=20, eval_steps=10)
    padded = train_stage(prepared(padding_free=False, gradient_accumulation_steps=2, **common))
    run_one, run_two = train_one_and_two_ranks(prepared, **common)
    assert_same_curves(metrics_records(padded), metrics_records(run_one), ignore=("padding_fraction",))
    # 20 Adam steps: its per-coordinate normalisation turns rounding in near-zero gradients into lr-sized moves.
    assert max_difference(weights(padded), weights(run_two)) <= 1e-4
    steps = [r for r in metrics_records(run_two) if "loss" in r]
    assert len(steps) == 20 and abs(steps[0]["loss/sigmoid"] - math.log(2)) < 1e-5  # policy == reference
    assert all(r["padding_fraction"] == 0.0 for r in steps)
    assert min(r["padding_fraction"] for r in metrics_records(padded) if "loss" in r) > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"])
def test_two_processes_give_the_loss_curve_of_one(prepared, ds_config):
    """1 process x accumulation 2 and 2 processes x accumulation 1: the same global batches, the same curve."""
    common = curve_settings(ds_config, per_device_train_batch_size=4, max_steps=4, eval_steps=2)
    run_one, run_two = train_one_and_two_ranks(prepared, **common)
    assert max_difference(weights(run_one), weights(run_two)) <= 1e-5
    assert read_summary(run_two)["world_size"] == 2
