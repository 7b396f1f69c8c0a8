"""TR-DPO in the one training job: window planning, the version chain, equivalence with an in-memory TR-DPO loop
on ZeRO-0/2/3, resume after real kills in every phase, and bad input.

The run under test: 64 train pairs, global batch 4, 4 steps, tau = 2 (two windows, one sync), alpha = 0.6,
ZeRO-2 like the shipped config. In-process runs call the stages directly (one DeepSpeed process); the kill test
drives the real ``dpo-pipeline train`` command, whose ranks run under torchrun.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import write_small_dataset
from safetensors.torch import load_file, save_file

from pipeline.artifacts import MANIFEST, model_weights_hash, read_manifest
from pipeline.config import REPO_ROOT, load_config, save_config
from pipeline.errors import ArtifactError, ConfigError
from pipeline.launch import job_environment
from pipeline.logprobs import collate_pairs, completion_logps
from pipeline.losses import LossState, PairLogps, compute_loss
from pipeline.plan import Plan
from pipeline.ranks import free_port
from pipeline.reference.cache import load_reference_logps
from pipeline.reference.stage import reference_stage
from pipeline.schedule import TrainingSchedule
from pipeline.tokenize.artifact import load_tokenized, tokenized_manifest
from pipeline.tokenize.stage import tokenize_stage
from pipeline.train import tr_dpo, windows
from pipeline.train.stage import train_stage

TOL = 1e-5
RUN = {
    "max_length": 64,
    "max_prompt_length": 32,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "max_steps": 4,
    "sync_ref_model": True,
    "ref_model_sync_steps": 2,
    "ref_model_mixup_alpha": 0.6,
    "warmup_steps": 1,
    "precompute_ref_batch_size": 16,
    "deepspeed": "configs/ds_zero2.json",
}


def run_config(root: Path, model_dir: Path, **overrides):
    return load_config(
        None,
        {
            "model_name_or_path": str(model_dir),
            "output_dir": str(root / "out"),
            "dataset_name": str(write_small_dataset(root / "data")),
            **RUN,
            **overrides,
        },
    )


def run_tr_dpo(config) -> Path:
    """What ``dpo-pipeline train`` does under TR-DPO, in this process: its inputs, then every window."""
    tokenize_stage(config)
    reference_stage(config)
    return train_stage(config)


def window_plan(config) -> windows.WindowPlan:
    tokenized = Plan.of(config).tokenized_dir
    ids = load_tokenized(tokenized, "train").column("example_id").to_numpy()
    return windows.WindowPlan.of(config, TrainingSchedule.from_config(config, ids, 1))


@pytest.fixture(
    scope="module", params=["configs/ds_zero2.json", None, "configs/ds_zero3.json"], ids=["zero2", "zero0", "zero3"]
)
def tr_dpo_run(request, tmp_path_factory, tiny_model_dir):
    """One uninterrupted TR-DPO run per ZeRO stage, in process: (config, run dir)."""
    config = run_config(tmp_path_factory.mktemp("tr-dpo"), tiny_model_dir, deepspeed=request.param)
    return config, run_tr_dpo(config)


# ---------------------------------------------------------------------------------------------- planning
def test_windows_cover_the_steps_in_blocks_of_tau():
    def bounds(steps, tau):
        config = load_config(
            None,
            {"max_steps": steps, "ref_model_sync_steps": tau, "sync_ref_model": True, "per_device_train_batch_size": 2},
        )
        return windows.window_bounds(config, TrainingSchedule.from_config(config, range(10), 1))

    assert bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert bounds(8, 4) == [(0, 4), (4, 8)]
    assert bounds(3, 512) == [(0, 3)]  # TRL's default tau on a short run: one window, no sync


def test_window_examples_are_the_distinct_ids_its_steps_consume():
    config = load_config(
        None, {"max_steps": 12, "ref_model_sync_steps": 6, "sync_ref_model": True, "per_device_train_batch_size": 2}
    )
    schedule = TrainingSchedule.from_config(config, range(0, 20, 2), 1)  # 5 steps per epoch: windows span two
    plan = windows.WindowPlan.of(config, schedule)
    for k, (start, stop) in enumerate(plan.bounds):
        consumed = np.concatenate([schedule.step_ids(s) for s in range(start, stop)])
        assert np.array_equal(plan.example_ids(k), np.unique(consumed))
        assert len(plan.example_ids(k)) < len(consumed)  # an example recurring in a window is scored once
    with pytest.raises(ConfigError, match="window 2 does not exist: this run has windows 0 to 1"):
        plan.window(2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ref_model_sync_steps": 0}, "ref_model_sync_steps: must be > 0"),
        ({"ref_model_sync_steps": -3}, "ref_model_sync_steps: must be > 0"),
        ({"ref_model_mixup_alpha": 0.0}, r"ref_model_mixup_alpha: must be in \(0, 1\]"),
        ({"ref_model_mixup_alpha": 1.5}, r"ref_model_mixup_alpha: must be in \(0, 1\]"),
        ({"ref_model_mixup_alpha": -0.1}, r"ref_model_mixup_alpha: must be in \(0, 1\]"),
        ({"reference_free": True}, "cannot be reference_free"),
    ],
)
def test_bad_tr_dpo_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"sync_ref_model": True, **override})
    assert load_config(None, {"sync_ref_model": True, "ref_model_mixup_alpha": 1.0}).ref_model_mixup_alpha == 1.0


# ---------------------------------------------------------------------------------------------- the run
def test_one_job_runs_every_window_and_a_rerun_does_nothing(tr_dpo_run):
    config, run_dir = tr_dpo_run
    manifest_before = (run_dir / MANIFEST).read_bytes()
    assert run_tr_dpo(config) == run_dir and (run_dir / MANIFEST).read_bytes() == manifest_before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reference_versions"] == 2
    assert summary["reference_forwards_per_example"] == 1.0
    assert summary["tr_dpo"]["reference_forwards"] == summary["tr_dpo"]["consumed_examples"] == 16
    # A naive TR-DPO re-scores the whole train split at every version: 2 x 64 forwards for 16 consumed pairs.
    assert not (run_dir / "references" / "v1" / "model.safetensors").exists()  # only exported on request
    slice_bytes = summary["tr_dpo"]["reference_slice_bytes_per_rank"]
    assert slice_bytes == 4 * sum(t.numel() for t in load_file(run_dir / "final_model" / "model.safetensors").values())


def test_version_chain_links_previous_version_policy_step_and_alpha(tr_dpo_run, tiny_model_dir):
    config, run_dir = tr_dpo_run
    v0, v1 = (read_manifest(windows.version_dir(run_dir, k), kind=windows.VERSION_KIND) for k in (0, 1))
    assert v0["inputs"] == {"version": 0, "model_weights": model_weights_hash(tiny_model_dir)}
    assert v0["files"] == {}  # no copy of the original model
    assert set(v1["inputs"]) == {"version", "previous", "policy_step", "policy_digest", "alpha"}
    assert (v1["inputs"]["version"], v1["inputs"]["previous"], v1["inputs"]["policy_step"], v1["inputs"]["alpha"]) == (
        1,
        v0["fingerprint"],
        2,
        0.6,
    )
    assert len(v1["slice_digests"]) == 1 and v1["slice_digests"] != v0["slice_digests"]
    for k, version in enumerate((v0, v1)):
        extra = read_manifest(windows.window_dir(run_dir, k), kind="reference")["inputs"]["extra"]
        assert extra == {
            "tr_dpo_window": k,
            "steps": [2 * k, 2 * k + 2],
            "reference_version": k,
            "reference_version_fingerprint": version["fingerprint"],
        }


def _pair_logps(out) -> PairLogps:
    (chosen, rejected), (chosen_len, rejected_len), (chosen_pub, rejected_pub) = (
        out.halves("logps"),
        out.halves("lengths"),
        out.halves("public_logps"),
    )
    return PairLogps(chosen, rejected, chosen_len, rejected_len, chosen_pub, rejected_pub)


def resident_reference_loop(config):
    """The loop TRL runs, in memory, one process: the reference resident, scored every step, mixed every tau
    steps in place. Returns (losses, final policy, the reference's chosen log-probs by (window, example), the
    initial model)."""
    from transformers import AutoModelForCausalLM, get_scheduler

    tokenized = Plan.of(config).tokenized_dir
    table = load_tokenized(tokenized, "train")
    ids = table.column("example_id").to_numpy()
    pad = int(tokenized_manifest(tokenized)["pad_token_id"])
    schedule = window_plan(config).schedule
    tau, alpha = config.ref_model_sync_steps, config.ref_model_mixup_alpha
    torch.manual_seed(config.seed)
    policy = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32).eval()
    initial = copy.deepcopy(ref)
    # The recipe's optimizer, schedule and clipping (pipeline/train/stage.py): AdamW without decay on 1-D params.
    groups = [
        {"params": [p for p in policy.parameters() if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in policy.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
    )
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * schedule.num_steps)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=schedule.num_steps
    )
    state, spec = LossState(), config.loss_spec()
    losses, ref_logps = [], {}
    for step in range(schedule.num_steps):
        batch = collate_pairs(table.take(np.searchsorted(ids, schedule.step_ids(step))).to_pylist(), pad)
        with torch.no_grad():
            reference_side = _pair_logps(completion_logps(ref, batch))
        for i, value in zip(batch.example_ids, reference_side.chosen, strict=True):
            ref_logps[step // tau, int(i)] = float(value)
        loss, _ = compute_loss(_pair_logps(completion_logps(policy, batch)), reference_side, spec, state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % tau == 0:  # SyncRefModelCallback.on_step_end
            for target_param, copy_param in zip(ref.parameters(), policy.parameters(), strict=True):
                target_param.data.mul_(1.0 - alpha).add_(copy_param.data, alpha=alpha)
    return losses, policy, ref_logps, initial


def assert_equals_the_resident_loop(config, run_dir, losses, policy):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in records if "loss" in r], losses, rtol=0, atol=TOL)
    final = load_file(run_dir / "final_model" / "model.safetensors")
    for name, param in policy.named_parameters():
        torch.testing.assert_close(final[name], param.detach(), rtol=0, atol=TOL, msg=name)


def test_tr_dpo_in_the_job_equals_an_in_memory_loop_with_a_resident_reference(tr_dpo_run):
    config, run_dir = tr_dpo_run
    losses, policy, ref_logps, initial = resident_reference_loop(config)
    assert_equals_the_resident_loop(config, run_dir, losses, policy)
    # Each window's cached log-probs are the resident reference's at that window (float32 sums near -80, where
    # one ulp is 7.6e-6 and another padding can move the last bits: compared relatively) ...
    plan = window_plan(config)
    for k in range(len(plan.bounds)):
        cached = load_reference_logps(windows.window_dir(run_dir, k), split="train")
        for i, value in zip(cached.example_ids, cached.chosen, strict=True):
            assert value == pytest.approx(ref_logps[(k, int(i))], rel=1e-6, abs=0)
    # ... and the sync mattered: version 0 gives window 1's examples other log-probs.
    tokenized = Plan.of(config).tokenized_dir
    table = load_tokenized(tokenized, "train")
    ids = table.column("example_id").to_numpy()
    window1 = load_reference_logps(windows.window_dir(run_dir, 1), split="train")
    batch = collate_pairs(
        table.take(np.searchsorted(ids, window1.example_ids)).to_pylist(),
        int(tokenized_manifest(tokenized)["pad_token_id"]),
    )
    with torch.no_grad():
        stale = completion_logps(initial, batch).halves("logps")[0].numpy()
    assert np.abs(stale - window1.chosen).max() > 100 * TOL


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["configs/ds_zero2.json", "configs/ds_zero3.json"], ids=["zero2", "zero3"])
def test_two_ranks_equal_the_resident_loop(tmp_path, tiny_model_dir, deepspeed):
    """The same run on 2 ranks (global batch unchanged: 2 per rank), every window in the one torchrun job."""
    config = run_config(tmp_path, tiny_model_dir, deepspeed=deepspeed, per_device_train_batch_size=2)
    cfg = tmp_path / "config.yaml"
    save_config(config, cfg)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "pipeline.cli",
            "train",
            "--config",
            str(cfg),
        ],
        cwd=REPO_ROOT,
        env={**job_environment(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = Plan.of(config.model_copy(update={"per_device_train_batch_size": 2})).train_dir
    losses, policy, _, _ = resident_reference_loop(config.model_copy(update={"per_device_train_batch_size": 4}))
    assert_equals_the_resident_loop(config, run_dir, losses, policy)
    assert json.loads((run_dir / "summary.json").read_text())["reference_forwards_per_example"] == 1.0


def test_a_window_artifact_scored_by_another_version_is_rescored_not_trained_on(tr_dpo_run, tmp_path):
    """Window 0's log-probs copied over window 1's: their fingerprint names version 0, so the resumed run never
    trains on them; it scores window 1 again with version 1."""
    config, run_dir = tr_dpo_run
    copy_config = config.model_copy(update={"output_dir": str(tmp_path / "out")})
    shutil.copytree(config.output_path, copy_config.output_path)
    copy_dir = Plan.of(copy_config).train_dir
    (copy_dir / MANIFEST).unlink()
    shutil.rmtree(windows.window_dir(copy_dir, 1))
    shutil.copytree(windows.window_dir(copy_dir, 0), windows.window_dir(copy_dir, 1))
    train_stage(copy_config)
    assert (
        read_manifest(windows.window_dir(copy_dir, 1), kind="reference")["fingerprint"]
        == read_manifest(windows.window_dir(run_dir, 1), kind="reference")["fingerprint"]
    )


def test_a_reference_slice_that_does_not_match_its_version_is_refused(tr_dpo_run, tmp_path):
    config, _ = tr_dpo_run
    copy_config = config.model_copy(update={"output_dir": str(tmp_path / "out"), "save_steps": 2})
    tokenize_stage(copy_config)
    reference_stage(copy_config)
    copy_dir = train_stage(copy_config, stop_step=2)  # its checkpoint at step 2 holds version 0's slices
    slices = copy_dir / "checkpoints" / "step-2" / tr_dpo.SLICES_FILE.format(rank=0)
    tensors = load_file(slices)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, slices)
    marker = json.loads((slices.parent / "trainer_state.json").read_text())
    marker["files"][slices.name] = __import__("pipeline.artifacts", fromlist=["hash_file"]).hash_file(slices)
    (slices.parent / "trainer_state.json").write_text(json.dumps(marker))  # the checkpoint itself looks intact
    with pytest.raises(ArtifactError, match=r"TR-DPO reference slice .* does not match the digest its version"):
        train_stage(copy_config)


# ---------------------------------------------------------------------------------------------- kills
# A rank of `dpo-pipeline train` (started by torchrun) that SIGKILLs itself at a fixed point of one phase: a
# mix or a checkpoint of the tiny model takes milliseconds, too short to hit from outside.
_DIE_IN = """
import os, signal, sys
from pipeline import cli
from pipeline.reference import stage as reference
from pipeline.train import tr_dpo
phase = os.environ["DIE_IN"]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if phase == "mix":  # half the parameters mixed
    real_mix = tr_dpo.ReferenceSlices.mix
    def mix(self, alpha):
        self.params, rest = self.params[: len(self.params) // 2], self.params
        self.slices, rest_slices = self.slices[: len(rest) // 2], self.slices
        real_mix(self, alpha)
        die()
    tr_dpo.ReferenceSlices.mix = mix
elif phase == "rescore":  # window 1's examples scored, its shard not yet written
    real_write = reference.write_shard
    def write_shard(out_dir, shard, fp, results):
        if "windows/1" in str(out_dir):
            die()
        real_write(out_dir, shard, fp, results)
    reference.write_shard = write_shard
elif phase == "checkpoint":  # DeepSpeed's files of the step-3 checkpoint written, the slices and marker not
    real_save = tr_dpo.ReferenceSlices.save
    def save(self, checkpoint):
        if checkpoint.name == "step-3":
            die()
        real_save(self, checkpoint)
    tr_dpo.ReferenceSlices.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


def _rank(script: Path, cfg: Path, log: Path, **env) -> subprocess.Popen:
    """One rank under torchrun running ``script`` (job_environment(): no rank variables of this process)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(free_port()),
        str(script),
        "train",
        "--config",
        str(cfg),
    ]
    return subprocess.Popen(
        command,
        env={**job_environment(), "OMP_NUM_THREADS": "1", **env},
        cwd=REPO_ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_in_every_phase_then_rerun_gives_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    baseline = run_config(tmp_path / "baseline", tiny_model_dir)
    baseline_dir = run_tr_dpo(baseline)
    config = run_config(tmp_path, tiny_model_dir, save_steps=1)
    cfg, log, script = tmp_path / "config.yaml", tmp_path / "ranks.log", tmp_path / "die_in.py"
    save_config(config, cfg)
    script.write_text(_DIE_IN)
    tokenize_stage(config)
    reference_stage(config)
    run_dir = Plan.of(config).train_dir

    # 1. Killed in the mix that opens window 1 (at step 2).
    assert _rank(script, cfg, log, DIE_IN="mix").wait(timeout=600) != 0
    assert (run_dir / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert not (windows.version_dir(run_dir, 1) / MANIFEST).exists()
    # 2. Killed while re-scoring window 1 (version 1 committed, its log-probs not).
    assert _rank(script, cfg, log, DIE_IN="rescore").wait(timeout=600) != 0
    assert (windows.version_dir(run_dir, 1) / MANIFEST).is_file()
    assert not (windows.window_dir(run_dir, 1) / MANIFEST).exists()
    # 3. Killed while writing the checkpoint at step 3.
    assert _rank(script, cfg, log, DIE_IN="checkpoint").wait(timeout=600) != 0
    assert not (run_dir / "checkpoints" / "step-3" / "trainer_state.json").exists()
    # 4. Killed from outside during window 1's training, after step 3.
    metrics = run_dir / "metrics.jsonl"
    rank = _rank(script, cfg, log, DIE_IN="none")
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        assert rank.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    _kill_tree(rank)
    # 5. The rerun, through the real command, finishes.
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(cfg)],
        cwd=REPO_ROOT,
        env={**job_environment(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, log.read_text()[-2000:] + done.stdout[-2000:] + done.stderr[-2000:]

    ours, theirs = (load_file(d / "final_model" / "model.safetensors") for d in (run_dir, baseline_dir))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    losses = [
        [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for d in (run_dir, baseline_dir)
    ]
    assert losses[0] == losses[1]
    v1 = [
        read_manifest(windows.version_dir(d, 1), kind=windows.VERSION_KIND)["fingerprint"]
        for d in (run_dir, baseline_dir)
    ]
    assert v1[0] == v1[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reference_forwards_per_example"] == 1.0 and summary["reference_versions"] == 2
