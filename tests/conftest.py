"""Shared fixtures: the tiny model (built once per session), a small config factory and a tokenized artifact."""

import os

# Before anything imports DeepSpeed or the Hugging Face libraries: DeepSpeed must not probe for CUDA here, and
# with no internet a Hub lookup should fail at once instead of retrying for half a minute.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Remembered weight digests go to a private place, not the user's cache.
os.environ.setdefault("DPO_PIPELINE_DIGEST_CACHE", __import__("tempfile").mkdtemp(prefix="dpo-digests-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.config import REPO_ROOT, load_config  # noqa: E402

SHIPPED_DATA = REPO_ROOT / "data" / "preference"
SMALL_SPLITS = {"train": 64, "test": 32}  # rows kept from the head of each shipped split


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pipeline.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


def write_small_dataset(directory: Path) -> Path:
    """The first rows of the shipped splits, byte for byte, as ``directory/{train,test}.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in SMALL_SPLITS.items():
        lines = (SHIPPED_DATA / f"{split}.jsonl").read_text().splitlines(keepends=True)[:rows]
        (directory / f"{split}.jsonl").write_text("".join(lines))
    return directory


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    """Factory: ``make_config(**overrides)`` -> a validated config on the tiny model and 64/32 rows of data."""
    data_dir = write_small_dataset(tmp_path / "data")

    def make(**overrides):
        values = {
            "model_name_or_path": str(tiny_model_dir),
            "output_dir": str(tmp_path / "out"),
            "dataset_name": str(data_dir),
            "max_length": 64,
            "max_prompt_length": 32,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
        }
        values.update(overrides)
        return load_config(None, values)

    return make


@pytest.fixture
def tokenized_dir(make_config) -> Path:
    """The tokenized artifact of the default small config."""
    from pipeline.tokenize.stage import tokenize_stage

    return tokenize_stage(make_config())


def metrics_records(run_dir: Path) -> list[dict]:
    """A training run's ``metrics.jsonl``, one dict per line."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a: list[dict], b: list[dict], tol: float = 1e-5, ignore: tuple[str, ...] = ()) -> None:
    """Two runs' records step for step, every number but the clock's (and ``ignore``'s) within ``tol``, relative
    for numbers above 1 (a gradient norm of 140 carries float32 rounding of 1e-5)."""
    from pipeline.metrics import TIMED_KEYS

    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key not in TIMED_KEYS and key not in ignore:
                assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])


def train_one_and_two_ranks(make, **common) -> tuple[Path, Path]:
    """The run of ``make(**common)`` on 1 rank x accumulation 2 (in this process) and on 2 ranks x accumulation 1
    (a launcher job): the same global batches, so the same curve. Returns both run dirs."""
    from pipeline.launch import run_stage
    from pipeline.plan import Plan
    from pipeline.train.stage import train_stage

    one = make(gradient_accumulation_steps=2, **common)
    two = make(gradient_accumulation_steps=1, num_processes=2, **common)
    run_one = train_stage(one)
    run_stage("train", two, timeout=600)
    run_two = Plan.of(two).train_dir
    assert_same_curves(metrics_records(run_one), metrics_records(run_two))
    return run_one, run_two


def kill_9_after_checkpoint_then_rerun(config, tmp_path: Path, step: int, timeout: float = 300) -> None:
    """``train`` as a fresh single-process job (no rank variables of this process, one thread as here), killed
    with SIGKILL once its step-``step`` checkpoint is complete, then run again to the end."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline.artifacts import MANIFEST
    from pipeline.config import save_config
    from pipeline.launch import job_environment
    from pipeline.plan import Plan

    run = Plan.of(config).train_dir
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    command = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(config_path)]
    env = dict(job_environment(), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not (run / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / MANIFEST).exists()  # killed mid-run
    rerun = subprocess.run(command, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
