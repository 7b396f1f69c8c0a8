"""Launcher jobs: output streamed, failures reported with exit code and log tail, groups killed."""

import subprocess
import sys
import time

import psutil
import pytest

from pipeline.config import REPO_ROOT
from pipeline.errors import ConfigError, PipelineError
from pipeline.launch import JobFailed, run_job


def test_output_is_streamed_and_logged(tmp_path):
    lines = []
    run_job(
        "demo", [sys.executable, "-c", "print('a'); print('b')"], log_path=tmp_path / "job.log", on_line=lines.append
    )
    assert lines == ["a", "b"]
    assert "a\nb\n" in (tmp_path / "job.log").read_text()


def test_failure_reports_exit_code_and_tail(tmp_path):
    with pytest.raises(JobFailed) as info:
        run_job(
            "demo",
            [sys.executable, "-c", "import sys; print('boom at step 3'); sys.exit(3)"],
            log_path=tmp_path / "job.log",
        )
    assert info.value.returncode == 3 and "boom at step 3" in str(info.value)


def test_timeout_kills_the_whole_process_group(tmp_path):
    # A parent that starts a grandchild and then sleeps: both must be gone after the timeout.
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    pids = []
    start = time.monotonic()
    with pytest.raises(JobFailed, match="timeout"):
        run_job(
            "demo",
            [sys.executable, "-c", script],
            log_path=tmp_path / "job.log",
            timeout=2,
            on_line=lambda line: pids.append(int(line)),
        )
    assert time.monotonic() - start < 20
    time.sleep(0.2)
    assert pids and not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


def test_a_job_dies_with_the_process_that_started_it(tmp_path):
    # A driver starts a job and is then SIGKILLed: the job must not outlive it (it would race with a rerun).
    driver = (
        "import sys; from pathlib import Path; from pipeline.launch import run_job; "
        "run_job('demo', [sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); "
        "time.sleep(60)'], log_path=Path(sys.argv[1]), on_line=print)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, str(tmp_path / "job.log")], stdout=subprocess.PIPE, text=True
    )
    job_pid = int(proc.stdout.readline())
    assert psutil.pid_exists(job_pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(job_pid) and psutil.Process(job_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "job outlived its killed driver"
        time.sleep(0.1)


def test_refused_input_comes_back_with_its_type_and_a_crash_as_job_failed(tmp_path):
    # The real CLI in a job, refusing a config value: the launching process gets the rank's ConfigError itself
    # (not retried, one line), found by type, not by reading the job's output.
    error_file = tmp_path / "error.json"
    refuse = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "tokenize",
        "--config",
        str(REPO_ROOT / "configs" / "default.yaml"),
        "beta=-1",
        "--error-file",
        str(error_file),
    ]
    with pytest.raises(ConfigError, match=r"^invalid config .*default.yaml: beta: must be > 0 \(got -1\)$") as info:
        run_job("tokenize", refuse, log_path=tmp_path / "job.log", error_file=error_file)
    assert isinstance(info.value.__cause__, JobFailed) and info.value.__cause__.returncode == 2
    with pytest.raises(JobFailed) as crash:
        run_job(
            "demo",
            [sys.executable, "-c", "import os; os.abort()"],
            log_path=tmp_path / "job.log",
            error_file=error_file,
        )
    assert not isinstance(crash.value, PipelineError) and crash.value.returncode < 0
    assert not error_file.exists()  # a record of an earlier job never answers for this one
