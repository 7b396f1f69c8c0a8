"""TR-DPO with cached reference log-probs: window planning, the streaming mix, the version chain, equivalence
with an in-memory TR-DPO loop, resume after real kills, and bad input.

The run under test: 64 train pairs, global batch 4, 4 steps, tau = 2 (two windows, one mix), alpha = 0.6,
ZeRO-2 like the shipped config. The in-process runs call each step's function directly (the inline executor);
the kill test drives the real ``dpo-pipeline train`` command, whose steps run as launcher jobs.
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

from pipeline import data, sync, train
from pipeline.artifacts import MANIFEST, model_weights_hash, read_manifest
from pipeline.config import REPO_ROOT, load_config, save_config
from pipeline.errors import ArtifactError, ConfigError
from pipeline.launch import job_environment
from pipeline.logprobs import collate_pairs, completion_logps
from pipeline.losses import LossState, PairLogps, compute_loss
from pipeline.reference import load_reference_logps
from pipeline.schedule import TrainingSchedule

TOL = 1e-5
RUN = {"max_length": 64, "max_prompt_length": 32, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
       "max_steps": 4, "sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6,
       "warmup_steps": 1, "precompute_ref_batch_size": 16, "deepspeed": "configs/ds_zero2.json"}


def run_config(root: Path, model_dir: Path, **overrides):
    return load_config(None, {"model_name_or_path": str(model_dir), "output_dir": str(root / "out"),
                              "dataset_name": str(write_small_dataset(root / "data")), **RUN, **overrides})


class Inline:
    """The executor that runs every step in this process (one process: collective steps need no launcher)."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, step: sync.Step, config) -> None:
        self.names.append(step.name)
        step.fn()


@pytest.fixture(scope="module")
def tr_dpo_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted TR-DPO run, in process: (config, run dir, the steps it executed)."""
    config = run_config(tmp_path_factory.mktemp("tr-dpo"), tiny_model_dir)
    executor = Inline()
    run_dir = sync.run_tr_dpo(config, executor)
    return config, run_dir, executor.names


# ---------------------------------------------------------------------------------------------- planning
def test_windows_cover_the_steps_in_blocks_of_tau():
    def bounds(steps, tau):
        config = load_config(None, {"max_steps": steps, "ref_model_sync_steps": tau, "sync_ref_model": True,
                                    "per_device_train_batch_size": 2})
        return sync.window_bounds(config, TrainingSchedule.from_config(config, range(10), 1))

    assert bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert bounds(8, 4) == [(0, 4), (4, 8)]
    assert bounds(3, 512) == [(0, 3)]  # TRL's default tau on a short run: one window, no sync


def test_window_examples_are_the_distinct_ids_its_steps_consume():
    config = load_config(None, {"max_steps": 12, "ref_model_sync_steps": 6, "sync_ref_model": True,
                                "per_device_train_batch_size": 2})
    schedule = TrainingSchedule.from_config(config, range(0, 20, 2), 1)  # 5 steps per epoch: windows span two
    plan = sync.WindowPlan(schedule, sync.window_bounds(config, schedule))
    for k, (start, stop) in enumerate(plan.bounds):
        consumed = np.concatenate([schedule.step_ids(s) for s in range(start, stop)])
        assert np.array_equal(plan.example_ids(k), np.unique(consumed))
        assert len(plan.example_ids(k)) < len(consumed)  # an example recurring in a window is scored once
    with pytest.raises(ConfigError, match="window 2 does not exist: this run has windows 0 to 1"):
        plan.window(2)


@pytest.mark.parametrize(("override", "message"), [
    ({"ref_model_sync_steps": 0}, "ref_model_sync_steps: must be > 0"),
    ({"ref_model_sync_steps": -3}, "ref_model_sync_steps: must be > 0"),
    ({"ref_model_mixup_alpha": 0.0}, r"ref_model_mixup_alpha: must be in \(0, 1\]"),
    ({"ref_model_mixup_alpha": 1.5}, r"ref_model_mixup_alpha: must be in \(0, 1\]"),
    ({"ref_model_mixup_alpha": -0.1}, r"ref_model_mixup_alpha: must be in \(0, 1\]"),
    ({"reference_free": True}, "cannot be reference_free"),
])
def test_bad_tr_dpo_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"sync_ref_model": True, **override})
    assert load_config(None, {"sync_ref_model": True, "ref_model_mixup_alpha": 1.0}).ref_model_mixup_alpha == 1.0


def test_driver_refuses_a_config_without_sync_ref_model(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="sync_ref_model"):
        sync.run_tr_dpo(run_config(tmp_path, tiny_model_dir, sync_ref_model=False))


# ---------------------------------------------------------------------------------------------- the mix
def _llama(seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def _trl_mix(reference, policy, alpha):
    """TRL's SyncRefModelCallback._sync_target_model on copies: the in-memory update we must reproduce."""
    target = copy.deepcopy(reference)
    for target_param, copy_param in zip(target.parameters(), policy.parameters(), strict=True):
        target_param.data.mul_(1.0 - alpha).add_(copy_param.data.to(target_param.dtype), alpha=alpha)
    return target


def test_mix_equals_trl_in_memory_sync_with_a_sharded_bf16_policy(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(sync, "MIX_CHUNK_BYTES", 4096)  # many chunks per tensor: exercises the chunk seams
    reference, policy = _llama(0), _llama(1, torch.bfloat16)
    reference.save_pretrained(tmp_path / "ref")
    policy.save_pretrained(tmp_path / "policy", max_shard_size="20KB")
    assert len(sync.safetensors_files(tmp_path / "policy")) > 1

    stats = sync.mix_safetensors(tmp_path / "ref", tmp_path / "policy", tmp_path / "out", 0.6)

    mixed = load_file(tmp_path / "out" / "model.safetensors")
    for name, param in _trl_mix(reference, policy.float(), 0.6).named_parameters():
        assert mixed[name].dtype == torch.float32 and torch.equal(mixed[name], param.detach()), name
    # Same layout as the reference: its header byte for byte, then the tensors' bytes.
    header = (tmp_path / "ref" / "model.safetensors").read_bytes()[:200]
    assert (tmp_path / "out" / "model.safetensors").read_bytes()[:200] == header
    assert stats["model_bytes"] == (tmp_path / "ref" / "model.safetensors").stat().st_size
    assert stats["files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert stats["tensors"] == len(mixed)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a loadable Hugging Face model directory


def test_a_bf16_sharded_reference_stays_bf16_and_sharded_and_alpha_one_copies_the_policy(tmp_path):
    _llama(0, torch.bfloat16).save_pretrained(tmp_path / "ref", max_shard_size="20KB")
    _llama(1).save_pretrained(tmp_path / "policy")
    reference = {}
    for name in sync.safetensors_files(tmp_path / "ref"):
        reference.update(load_file(tmp_path / "ref" / name))
    policy = load_file(tmp_path / "policy" / "model.safetensors")

    for alpha in (0.25, 1.0):
        out = tmp_path / f"out-{alpha}"
        stats = sync.mix_safetensors(tmp_path / "ref", tmp_path / "policy", out, alpha)
        assert sync.SAFETENSORS_INDEX in stats["files"]
        mixed = {}
        for name in sync.safetensors_files(out):
            mixed.update(load_file(out / name))
        for name, tensor in reference.items():
            expected = (tensor.float() * (1 - alpha) + alpha * policy[name]).to(torch.bfloat16)
            assert mixed[name].dtype == torch.bfloat16 and torch.equal(mixed[name], expected), name
    assert all(torch.equal(mixed[n], policy[n].to(torch.bfloat16)) for n in policy)


def test_mix_refuses_mismatched_or_broken_checkpoints(tmp_path):
    reference = {"a": torch.ones(4, 3), "b": torch.zeros(5)}
    save_file(reference, tmp_path / "model.safetensors")
    (tmp_path / "ref").mkdir()
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "ref")

    def policy(name: str, tensors: dict) -> Path:
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        return tmp_path / name

    def mix(policy_dir: Path, alpha: float = 0.5):
        return sync.mix_safetensors(tmp_path / "ref", policy_dir, tmp_path / "out", alpha)

    with pytest.raises(ArtifactError, match=r"different tensors \(missing from the policy: \['b'\], only in the "
                                            r"policy: \['c'\]\)"):
        mix(policy("renamed", {"a": torch.ones(4, 3), "c": torch.zeros(5)}))
    with pytest.raises(ArtifactError, match=r"tensor a: policy shape \[3, 4\] != reference shape \[4, 3\]"):
        mix(policy("reshaped", {"a": torch.ones(3, 4), "b": torch.zeros(5)}))
    truncated = policy("truncated", reference)
    data_file = truncated / "model.safetensors"
    data_file.write_bytes(data_file.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match="truncated or has trailing bytes"):
        mix(truncated)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        mix(tmp_path / "garbage")
    (tmp_path / "bin-only").mkdir()
    torch.save(reference, tmp_path / "bin-only" / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="no safetensors weights in .*bin-only"):
        mix(tmp_path / "bin-only")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        mix(policy("fine", reference), alpha=0.0)
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing was committed by a failed mix


_MEASURE_MIX = """
import json, sys
from pathlib import Path
from pipeline.sync import mix_safetensors
print(json.dumps(mix_safetensors(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), 0.6)))
"""


@pytest.mark.slow
def test_mix_peak_memory_is_a_few_chunks_not_a_model(tmp_path):
    """A ~300 MB Llama-shaped checkpoint, mixed in a fresh process: peak RSS above its start < 1/4 model."""
    hidden, vocab, layers = 1024, 16000, 4
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        for name, shape in {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // 2, hidden),
                            "self_attn.v_proj": (hidden // 2, hidden), "self_attn.o_proj": (hidden, hidden),
                            "mlp.gate_proj": (2816, hidden), "mlp.up_proj": (2816, hidden),
                            "mlp.down_proj": (hidden, 2816)}.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    for side in ("ref", "policy"):
        (tmp_path / side).mkdir()
        tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        save_file(tensors, tmp_path / side / "model.safetensors", metadata={"format": "pt"})
        del tensors
    model_bytes = (tmp_path / "ref" / "model.safetensors").stat().st_size
    assert model_bytes > 250 << 20

    done = subprocess.run([sys.executable, "-c", _MEASURE_MIX, str(tmp_path / "ref"), str(tmp_path / "policy"),
                           str(tmp_path / "out")], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["model_bytes"] == model_bytes
    assert 0 < stats["peak_rss_delta_bytes"] < model_bytes / 4, stats
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == model_bytes


# ---------------------------------------------------------------------------------------------- the run
def test_driver_runs_each_window_reference_train_then_mix_and_a_rerun_does_nothing(tr_dpo_run):
    config, run_dir, names = tr_dpo_run
    assert names == ["tokenize", "reference-eval", "reference-window-0", "train-window-0", "mix-window-0",
                     "reference-window-1", "train-window-1"]
    again = Inline()
    assert sync.run_tr_dpo(config, again) == run_dir and again.names == []

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reference_versions"] == 2
    assert summary["reference_forwards_per_example"] == 1.0
    assert summary["tr_dpo"]["reference_forwards"] == summary["tr_dpo"]["consumed_examples"] == 16
    # A naive TR-DPO re-scores the whole train split at every version: 2 x 64 forwards for 16 consumed pairs.


def test_version_chain_links_previous_version_policy_checkpoint_and_alpha(tr_dpo_run, tiny_model_dir):
    config, run_dir, _ = tr_dpo_run
    v0 = read_manifest(sync.reference_version_dir(config, 0), kind=sync.KIND)
    v1 = read_manifest(sync.reference_version_dir(config, 1), kind=sync.KIND)
    assert v0["inputs"] == {"version": 0, "model_weights": model_weights_hash(tiny_model_dir)}
    assert v0["files"] == {}  # no copy of the original model
    policy = run_dir / "policy" / "step-2"
    assert v1["inputs"] == {"version": 1, "previous": v0["fingerprint"], "policy_step": 2,
                            "policy_weights": model_weights_hash(policy), "alpha": 0.6}
    assert v1["mix"]["peak_rss_delta_bytes"] is not None
    for k, version in enumerate((v0, v1)):
        extra = read_manifest(sync.window_reference_dir(config, k), kind="reference")["inputs"]["extra"]
        assert extra == {"tr_dpo_window": k, "steps": [2 * k, 2 * k + 2], "reference_version": k,
                         "reference_version_fingerprint": version["fingerprint"]}


def _pair_logps(out) -> PairLogps:
    (chosen, rejected), (chosen_len, rejected_len), (chosen_pub, rejected_pub) = (
        out.halves("logps"), out.halves("lengths"), out.halves("public_logps"))
    return PairLogps(chosen, rejected, chosen_len, rejected_len, chosen_pub, rejected_pub)


def test_windowed_cached_tr_dpo_equals_an_in_memory_loop_with_a_resident_reference(tr_dpo_run):
    """The loop TRL runs: the reference resident, scored every step, mixed every tau steps in place."""
    from transformers import AutoModelForCausalLM, get_scheduler

    config, run_dir, _ = tr_dpo_run
    tokenized = sync._tokenized_dir(config)
    table = data.load_tokenized(tokenized, "train")
    ids = table.column("example_id").to_numpy()
    pad = int(data.tokenized_manifest(tokenized)["pad_token_id"])
    plan = sync.plan_windows(config)
    schedule, tau, alpha = plan.schedule, config.ref_model_sync_steps, config.ref_model_mixup_alpha

    torch.manual_seed(config.seed)
    policy = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32).eval()
    initial = copy.deepcopy(ref)
    # The recipe's optimizer, schedule and clipping (pipeline/train.py): AdamW without decay on 1-D params.
    groups = [{"params": [p for p in policy.parameters() if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in policy.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * schedule.num_steps)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=schedule.num_steps)
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

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cached_losses = [r["loss"] for r in records if "loss" in r]
    np.testing.assert_allclose(cached_losses, losses, rtol=0, atol=TOL)
    final = load_file(run_dir / "final_model" / "model.safetensors")
    for name, param in policy.named_parameters():
        torch.testing.assert_close(final[name], param.detach(), rtol=0, atol=TOL, msg=name)
    # Each window's cached log-probs are the resident reference's at that window (float32 sums near -80, where
    # one ulp is 7.6e-6 and another padding can move the last bits: compared relatively) ...
    for k in range(len(plan.bounds)):
        cached = load_reference_logps(sync.window_reference_dir(config, k), split="train")
        for i, value in zip(cached.example_ids, cached.chosen, strict=True):
            assert value == pytest.approx(ref_logps[(k, int(i))], rel=1e-6, abs=0)
    # ... and the sync mattered: version 0 gives window 1's examples other log-probs.
    window1 = load_reference_logps(sync.window_reference_dir(config, 1), split="train")
    batch = collate_pairs(table.take(np.searchsorted(ids, window1.example_ids)).to_pylist(), pad)
    with torch.no_grad():
        stale = completion_logps(initial, batch).halves("logps")[0].numpy()
    assert np.abs(stale - window1.chosen).max() > 100 * TOL


def _copy_run(config, tmp_path: Path):
    """The finished run's output dir copied elsewhere, and the config pointing there."""
    shutil.copytree(config.output_path, tmp_path / "out")
    return config.model_copy(update={"output_dir": str(tmp_path / "out")})


def test_training_a_window_on_log_probs_of_another_reference_version_is_refused(tr_dpo_run, tmp_path):
    config = _copy_run(tr_dpo_run[0], tmp_path)
    window1 = sync.window_reference_dir(config, 1)
    shutil.rmtree(window1)
    shutil.copytree(sync.window_reference_dir(config, 0), window1)
    with pytest.raises(ArtifactError, match=r"window 1: the reference log-probs at .* were scored for window 0 "
                                            r"with reference version 0 .*, not for window 1 with version 1"):
        sync.train_window(config, 1)


def test_steps_refuse_a_missing_version_or_policy_checkpoint(tr_dpo_run, tmp_path):
    config = _copy_run(tr_dpo_run[0], tmp_path)
    shutil.rmtree(sync.reference_version_dir(config, 1))
    with pytest.raises(ArtifactError, match=r"reference version 1 is not usable .* made by the mix after window 0"):
        sync.reference_window(config, 1)
    shutil.rmtree(train.train_dir_for(config) / "policy")
    with pytest.raises(ArtifactError, match="no policy checkpoint at .*step-2: window 0 has not finished"):
        sync.mix_window(config, 0)
    with pytest.raises(ConfigError, match="window 1 is the last one"):
        sync.mix_window(config, 1)


# ---------------------------------------------------------------------------------------------- kills
# Runs `dpo-pipeline train`, SIGKILLing itself in the middle of writing the mixed weights: a mix is milliseconds
# on the tiny model, too short to hit from outside, so the kill comes from inside at a fixed point.
_DIE_DURING_MIX = """
import os, signal, sys
from pipeline import cli, sync
sync.MIX_CHUNK_BYTES = 4096
reads = 0
real_read = sync._SafetensorsFile.read
def read(self, tensor, start, stop):
    global reads
    reads += 1
    if reads == 40:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_read(self, tensor, start, stop)
sync._SafetensorsFile.read = read
sys.exit(cli.main(sys.argv[1:]))
"""


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    # job_environment(): without the RANK/LOCAL_RANK this test process got from its in-process runs.
    return subprocess.Popen([sys.executable, *args], env=job_environment(), cwd=REPO_ROOT,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process under it (its jobs run in their own process groups)."""
    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_when(proc: subprocess.Popen, condition, what: str, *, settle: float = 0.0, timeout: float = 300) -> None:
    """Poll ``condition``; once true, wait ``settle`` seconds (to land inside the job) and kill the tree."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    time.sleep(settle)
    _kill_tree(proc)


def _job_running(proc: subprocess.Popen, *words: str) -> bool:
    try:
        return any(all(w in child.cmdline() for w in words) for child in psutil.Process(proc.pid).children(True))
    except psutil.Error:
        return False


@pytest.mark.slow
def test_sigkill_during_mix_reference_pass_and_training_then_rerun_gives_the_uninterrupted_weights(
        tr_dpo_run, tmp_path, tiny_model_dir):
    baseline_config, baseline_dir, _ = tr_dpo_run
    config = run_config(tmp_path, tiny_model_dir, save_steps=1)
    assert config.output_path != baseline_config.output_path
    cfg = tmp_path / "config.yaml"
    save_config(config, cfg)
    command, log = ["-m", "pipeline.cli", "train", "--config", str(cfg)], tmp_path / "driver.log"
    run_dir = train.train_dir_for(config)
    v1 = sync.reference_version_dir(config, 1)

    # 1. Killed while writing version 1 (after window 0 trained): a partial temporary file, no manifest.
    dying = _driver(["-c", _DIE_DURING_MIX, *command[2:]], log)
    assert dying.wait(timeout=600) == -signal.SIGKILL, log.read_text()[-3000:]
    assert (run_dir / "policy" / "step-2").is_dir() and not (v1 / MANIFEST).exists()
    assert list(v1.glob(".tmp-model.safetensors.*"))

    # 2. Killed during window 1's reference pass (its job is running).
    driver = _driver(command, log)
    _kill_when(driver, lambda: _job_running(driver, "reference", "--window", "1"), "the reference pass of window 1",
               settle=1.0)
    assert (v1 / MANIFEST).is_file() and not (sync.window_reference_dir(config, 1) / MANIFEST).exists()

    # 3. Killed during window 1's training, after its first step.
    metrics = run_dir / "metrics.jsonl"
    driver = _driver(command, log)
    _kill_when(driver, lambda: metrics.is_file() and '"step": 3,' in metrics.read_text(), "step 3")
    assert not (run_dir / MANIFEST).exists()

    # 4. The rerun finishes.
    driver = _driver(command, log)
    assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]

    for relative in ("final_model/model.safetensors", "references/v1/model.safetensors"):
        ours, theirs = load_file(run_dir / relative), load_file(baseline_dir / relative)
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs), relative
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for d in (run_dir, baseline_dir)]
    assert losses[0] == losses[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reference_forwards_per_example"] == 1.0 and summary["reference_versions"] == 2
