"""Nothing corrupt or foreign is trusted, and every storage fault is one clear line: on real file systems (a
small tmpfs filled up or remounted read-only, a file where a directory should be, a directory we may not write)
and through the real CLI, whose refusals print one line and exit 2."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import cli
from pipeline.artifacts import (
    atomic_write_text,
    expected_fingerprint,
    is_complete,
    read_manifest,
    write_manifest,
    write_parquet,
)
from pipeline.config import REPO_ROOT, save_config
from pipeline.errors import ArtifactError, StorageError
from pipeline.launch import JobFailed, job_environment, run_stage
from pipeline.lock import output_dir_lock
from pipeline.metrics import MetricsLog
from pipeline.plan import Plan

DPO_PIPELINE = str(Path(sys.executable).parent / "dpo-pipeline")


def small_table() -> pa.Table:
    return pa.table({"example_id": pa.array(range(5), pa.int64())})


# ---------------------------------------------------------------------------------------------- identity
def test_a_manifest_with_an_edited_fingerprint_is_refused(tmp_path):
    write_parquet(small_table(), tmp_path / "data.parquet")
    manifest = write_manifest(tmp_path, kind="demo", schema_version=1, inputs={"beta": 0.1}, files=["data.parquet"])
    # Someone makes this artifact pass for the one another config expects: only the fingerprint is edited.
    wanted = expected_fingerprint("demo", 1, {"beta": 0.2})
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": wanted}))

    with pytest.raises(ArtifactError) as refused:
        read_manifest(tmp_path, kind="demo", fingerprint=wanted)
    message = str(refused.value)
    assert str(tmp_path) in message and "does not match the inputs it records" in message
    assert message.endswith("rerun the demo stage") and "\n" not in message
    assert not is_complete(tmp_path, kind="demo", fingerprint=wanted)
    with pytest.raises(ArtifactError, match="edited or corrupt manifest"):
        read_manifest(tmp_path, kind="demo")  # refused without any expectation too: it is not what it says


# ---------------------------------------------------------------------------------------------- file systems
@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs at ``tmp_path/fs`` (needs root, or CAP_SYS_ADMIN), unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path) -> Path:
    """Write ``mount/filler`` until the file system is full."""
    filler = mount / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as handle:
        while True:
            handle.write(b"\0" * 4096)
    return filler


def dpo_pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DPO_PIPELINE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def one_error_line(result_or_text, stage: str) -> str:
    """The refusal's single line (``dpo-pipeline <stage>: error: ...``), asserting there is exactly one and no
    traceback anywhere in the output."""
    text = result_or_text if isinstance(result_or_text, str) else result_or_text.stdout + result_or_text.stderr
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith(f"dpo-pipeline {stage}: error: ")]
    assert len(errors) == 1, text
    return errors[0]


def parquet_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_equals_an_uninterrupted_run(
    tmpfs, make_config, tmp_path
):
    config = make_config(output_dir=str(tmpfs / "out"))
    config_file = tmp_path / "cfg.yaml"
    save_config(config, config_file)
    reference = make_config(output_dir=str(tmp_path / "uninterrupted"))
    reference_file = tmp_path / "uninterrupted.yaml"
    save_config(reference, reference_file)

    filler = fill(tmpfs)
    full = dpo_pipeline("tokenize", "--config", str(config_file))
    assert full.returncode == 2
    line = one_error_line(full, "tokenize")
    assert f"no space left on {tmpfs}" in line and "free space there" in line and "tokenized" in line
    assert not list(tmpfs.rglob("manifest.json")) and not list(tmpfs.rglob(".tmp-*"))  # nothing half-made

    filler.unlink()
    assert dpo_pipeline("tokenize", "--config", str(config_file)).returncode == 0
    assert dpo_pipeline("tokenize", "--config", str(reference_file)).returncode == 0
    written = parquet_files(config.output_path)
    assert written and written == parquet_files(reference.output_path)  # same fingerprint dir, same bytes


@pytest.mark.parametrize("writer", ["manifest", "parquet", "metrics", "job config"])
def test_every_writer_reports_a_full_disk_as_a_storage_error(tmpfs, make_config, writer):
    directory = tmpfs / "artifact"
    write_parquet(small_table(), directory / "data.parquet")
    fill(tmpfs)
    writes = {
        "manifest": lambda: write_manifest(directory, kind="demo", schema_version=1, inputs={}, files=["data.parquet"]),
        "parquet": lambda: write_parquet(small_table(), directory / "more.parquet"),
        "metrics": lambda: MetricsLog(directory / "metrics.jsonl").append({"step": 1, "loss": 0.69}),
        "job config": lambda: save_config(make_config(), directory / "jobs" / "train.yaml"),
    }
    with pytest.raises(StorageError, match=f"^cannot write {directory}/.*: no space left on {tmpfs} "):
        writes[writer]()


def test_a_read_only_output_dir_is_one_line_for_every_stage(tmpfs, make_config, tmp_path, capsys):
    config = make_config(output_dir=str(tmpfs / "out"))
    config_file = tmp_path / "cfg.yaml"
    save_config(config, config_file)
    with output_dir_lock(config):  # an output dir a run has used
        pass
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)

    real = dpo_pipeline("tokenize", "--config", str(config_file))  # one real process: its whole output
    assert real.returncode == 2
    assert one_error_line(real, "tokenize").endswith(f"{tmpfs} is a read-only file system; choose another output_dir")
    for stage in ("reference", "train", "run"):
        assert cli.main([stage, "--config", str(config_file)]) == 2
        captured = capsys.readouterr()
        line = one_error_line(captured.out + captured.err, stage)
        assert line.endswith("is a read-only file system; choose another output_dir")
        assert "tokenize stage first" not in captured.err


@pytest.mark.parametrize("output_dir", ["a-file", "a-file/below"])
def test_an_output_dir_that_is_a_file_is_one_line_for_every_stage(make_config, tmp_path, capsys, output_dir):
    (tmp_path / "a-file").write_text("not a directory")
    config_file = tmp_path / "cfg.yaml"
    save_config(make_config(output_dir=str(tmp_path / output_dir)), config_file)
    for stage in ("tokenize", "reference", "train", "run"):
        assert cli.main([stage, "--config", str(config_file)]) == 2
        captured = capsys.readouterr()
        line = one_error_line(captured.out + captured.err, stage)
        assert line.endswith(
            f"{tmp_path / 'a-file'} is a file, not a directory; move it away or choose another output_dir"
        )


def test_a_log_directory_that_is_a_file_is_one_line(make_config, tmp_path, capsys):
    config = make_config(num_processes=2)
    config_file = tmp_path / "cfg.yaml"
    save_config(config, config_file)
    config.output_path.mkdir(parents=True)
    (config.output_path / "logs").write_text("not a directory")
    assert cli.main(["reference", "--config", str(config_file)]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.out + captured.err, "reference")
    assert f"cannot write {config.output_path}/logs/reference.log: {config.output_path}/logs is a file" in line


@pytest.fixture
def as_nobody():
    """Run the block with effective uid nobody: root ignores permission bits, nobody does not."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch the effective uid")

    @contextlib.contextmanager
    def switched():
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)

    return switched


def test_permission_denied_is_a_storage_error(as_nobody):
    # Straight under /tmp: pytest's tmp_path lies in a directory nobody may not even look into.
    locked = Path(tempfile.mkdtemp(prefix="dpo-not-yours-"))
    locked.chmod(0o755)  # nobody may look in, not write
    target = locked / "run" / "manifest.json"
    with as_nobody(), pytest.raises(StorageError) as refused:
        atomic_write_text(target, "{}")
    locked.rmdir()
    assert str(refused.value) == (
        f"cannot write {target}: permission denied in {locked}; make it writable for this "
        f"user or choose another output_dir"
    )


@pytest.mark.slow
def test_a_stage_job_refused_by_storage_is_not_worth_a_retry(make_config, tokenized_dir):
    config = make_config()
    (config.output_path / "reference").write_text("not a directory")  # where the job writes its artifact
    with pytest.raises(StorageError) as failed:  # the rank's own error, by type: flows.tasks does not retry it
        run_stage("reference", config)
    assert str(failed.value).startswith("cannot write ")
    assert f"{config.output_path / 'reference'} is a file, not a directory" in str(failed.value)
    assert isinstance(failed.value.__cause__, JobFailed)


@pytest.mark.slow
def test_a_full_disk_at_a_training_checkpoint_is_one_line_and_the_rerun_is_exact(make_config, tmp_path):
    """Training on a 48 MiB tmpfs filled up to its last MiB before the step-2 checkpoint: one line, exit 2, no
    traceback, the previous state intact; after freeing space the rerun ends at the uninterrupted weights."""
    from safetensors.torch import load_file

    from pipeline.reference.stage import reference_stage
    from pipeline.tokenize.stage import tokenize_stage
    from pipeline.train.stage import train_stage

    settings = dict(max_steps=4, save_steps=2, eval_steps=None, deepspeed=str(REPO_ROOT / "configs" / "ds_zero2.json"))
    uninterrupted = make_config(output_dir=str(tmp_path / "uninterrupted"), **settings)
    tokenize_stage(uninterrupted)
    reference_stage(uninterrupted)
    expected = load_file(train_stage(uninterrupted) / "final_model" / "model.safetensors")

    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = make_config(output_dir=str(mount / "out"), **settings)
        tokenize_stage(config)
        reference_stage(config)
        save_config(config, tmp_path / "config.yaml")
        ballast = mount / "ballast"
        fill(mount)
        (mount / "filler").rename(ballast)
        with open(ballast, "r+b") as handle:  # give back 1 MiB: metrics fit, a checkpoint (~3 MiB) does not
            handle.truncate(ballast.stat().st_size - (1 << 20))

        def train() -> subprocess.CompletedProcess:  # without the rank variables of this test process
            return subprocess.run(
                [DPO_PIPELINE, "train", "--config", str(tmp_path / "config.yaml")],
                text=True,
                capture_output=True,
                timeout=300,
                env={**job_environment(), "OMP_NUM_THREADS": "1"},
            )

        done = train()
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        line = one_error_line(done, "train")
        assert "no space left on" in line and "checkpoints" in line and "free space there" in line
        run_dir = Plan.of(config).train_dir
        assert not (run_dir / "checkpoints" / "step-2" / "trainer_state.json").exists()
        ballast.unlink()
        assert train().returncode == 0
        final = load_file(run_dir / "final_model" / "model.safetensors")
        assert all((final[name] == expected[name]).all() for name in expected)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow  # a whole `dpo-pipeline run`: its own Prefect API, a reference and a training job (~40 s)
def test_input_a_stage_job_refuses_under_run_is_one_line_on_stderr_once_with_exit_code_2(make_config, tmp_path):
    # An explicit global batch only the training job, knowing its ranks, can check: the flow gets that far.
    ds_config = tmp_path / "ds_batch.json"
    ds_config.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 0}}))
    save_config(make_config(deepspeed=str(ds_config), max_steps=2), tmp_path / "config.yaml")
    env = {**job_environment(), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # the run's own temporary API, as on a user's machine
    done = subprocess.run(
        [DPO_PIPELINE, "run", "--config", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done, "run")
    assert "sets train_batch_size=999" in line
    assert done.stderr.count("train_batch_size=999") == 1  # not the job's line, the task's, the flow's as well
    assert "train_batch_size=999" in (make_config().output_path / "logs" / "train.log").read_text()  # the details
