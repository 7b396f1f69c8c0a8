"""Slurm, for real: a single-node Slurm on 127.0.0.1 (``.ci/slurm.sh``, Debian's slurm-wlm and munge) runs the
training stage's ranks from ``srun`` alone, and a served Prefect deployment's stage jobs, to completion and to
cancellation.

The slow tests use a Slurm that answers ``sinfo``, or start one with ``bash .ci/slurm.sh start`` (root or sudo;
stopped again at the end if this module started it); they are skipped, saying why, only when Slurm's client
tools are missing or no Slurm can be started.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.logging.handlers import APILogHandler
from prefect.states import Cancelled

# test_flows first: it gives Prefect its own home before anything imports Prefect.
from test_flows import (
    DEFAULT_CONFIG,
    background,
    flow_run,
    job_processes,
    prefect,
    prefect_server,  # noqa: F401 (a fixture)
    state_counts,
    tiny,  # noqa: F401 (a fixture)
    trigger,
    wait_until,
)

from flows.jobs import stop_flow_run_jobs
from flows.pipeline_flow import dpo_pipeline
from pipeline import slurm
from pipeline.config import REPO_ROOT, load_config, save_config
from pipeline.errors import ConfigError
from pipeline.launch import job_environment
from pipeline.plan import Plan
from pipeline.ranks import RANK_VARIABLES
from pipeline.reference.stage import reference_stage
from pipeline.tokenize.stage import tokenize_stage
from pipeline.train.stage import read_summary

SLURM_SCRIPT = REPO_ROOT / ".ci" / "slurm.sh"
# Every job here: DeepSpeed on the CPU, one intra-op thread per rank on the 2 shared cores.
JOB_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
NO_EVAL = {"sync_ref_model": False, "eval_steps": None, "save_steps": None}


def _node_up() -> bool:
    states = subprocess.run(
        ["sinfo", "--noheader", "--format", "%t"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.split()
    return any(state in ("idle", "mix", "alloc") for state in states)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A Slurm with a node up: the one that answers, or a local one started here (and stopped at the end)."""
    if not all(map(shutil.which, ("srun", "sinfo", "squeue", "scancel"))):
        pytest.skip(
            "Slurm's client tools (srun, sinfo, squeue, scancel) are not installed; `bash .ci/slurm.sh "
            "start` installs Debian's slurm-wlm and munge and starts a single-node Slurm on 127.0.0.1"
        )
    started = None
    if not _node_up():
        started = subprocess.run(
            ["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=600, check=False
        )
        if started.returncode != 0:
            pytest.skip(f"no Slurm node is up and `bash .ci/slurm.sh start` failed: {started.stderr.strip()[-800:]}")
    yield
    if started is not None:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], capture_output=True, timeout=120, check=False)


@pytest.fixture
def clean_queue(slurm_cluster):
    """An empty queue of this user's jobs before the test, and none left after it (even if it failed)."""
    assert slurm.queued() == {}, "Slurm jobs of this user are queued already; the tests need the node to themselves"
    yield
    slurm.cancel_containing("")


class QueueWatch:
    """The names of every job of this user that ``squeue`` listed while the ``with`` block ran (polled)."""

    def __init__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(0.3):
            self.seen.update(slurm.queued().values())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- no Slurm needed
def _fake_srun(directory: Path) -> str:
    directory.mkdir()
    srun = directory / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    return str(directory)


def test_srun_command_carries_the_config(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_srun(tmp_path / "bin"))
    config = make_config(
        launcher="slurm",
        num_nodes=2,
        num_processes=4,
        slurm_partition="gpu",
        slurm_time="01:00:00",
        slurm_gpus_per_node=4,
        slurm_extra_args=["--account=llm"],
    )
    command = slurm.srun_command(config, ["-m", "pipeline.cli", "train"], "dpo-train-x")
    assert command == [
        "srun",
        "--nodes",
        "2",
        "--ntasks",
        "8",
        "--ntasks-per-node",
        "4",
        "--kill-on-bad-exit=1",
        "--unbuffered",
        "--export=ALL",
        "--job-name",
        "dpo-train-x",
        "--partition",
        "gpu",
        "--time",
        "01:00:00",
        "--gpus-per-node",
        "4",
        "--account=llm",
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
    ]
    bare = slurm.srun_command(make_config(launcher="slurm"), ["-m", "x"], "n")
    assert bare[bare.index("--job-name") + 2 :] == [sys.executable, "-m", "x"]  # no empty options


def test_launcher_slurm_without_srun_is_one_clear_error(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^launcher: slurm, but `srun` is not on PATH .* set launcher: torchrun"):
        slurm.srun_command(make_config(launcher="slurm"), ["-m", "x"], "n")


# ---------------------------------------------------------------------------------------------- real Slurm
@pytest.mark.slow
def test_srun_two_tasks_train_from_slurm_variables_alone(make_config, clean_queue, tmp_path):
    config = make_config(
        max_steps=4,
        eval_steps=2,
        per_device_eval_batch_size=16,
        launcher="slurm",
        num_processes=2,
        deepspeed=str(REPO_ROOT / "configs" / "ds_zero2.json"),
    )
    tokenize_stage(config)
    reference_stage(config)
    config_path = tmp_path / "train.yaml"
    save_config(config, config_path)
    env = {**job_environment(), **JOB_ENV}
    assert not set(RANK_VARIABLES) & set(env)  # the rank information can only come from Slurm
    result = subprocess.run(
        ["srun", "-N", "1", "-n", "2", sys.executable, "-m", "pipeline.cli", "train", "--config", str(config_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_summary(Plan.of(config).train_dir)
    assert summary["world_size"] == 2 and summary["num_steps"] == 4


@pytest.fixture
def served(prefect_server, clean_queue, tmp_path):  # noqa: F811 (the imported fixture)
    """``python -m flows.serve`` against the test server; yields its environment."""
    env = {**prefect_server, **JOB_ENV}
    log = tmp_path / "serve.log"
    with background([sys.executable, "-m", "flows.serve"], env, log):
        wait_until(lambda: "is being served" in log.read_text(), 120, "flows.serve to start serving")
        yield env


@pytest.mark.slow
def test_a_served_flow_run_submits_its_stage_jobs_through_slurm(served, tiny):  # noqa: F811
    overrides = tiny(launcher="slurm", num_processes=2, max_steps=4, **NO_EVAL)
    with QueueWatch() as queue:
        run_id, out = trigger(served, overrides, "--watch", "--watch-timeout", "500", timeout=600)
    assert flow_run(run_id).state.is_completed(), out
    assert state_counts(run_id) == {"Completed": 3}
    # Each stage job was a Slurm job named for this flow run (what the cancellation hook sweeps by).
    assert {f"dpo-reference-{run_id}", f"dpo-train-{run_id}"} <= queue.seen
    output_dir = Path(overrides["output_dir"])
    assert (output_dir / "logs" / "train.log").read_text().startswith("$ srun --nodes 1 --ntasks 2 ")
    assert read_summary(Plan.of(load_config(DEFAULT_CONFIG, overrides)).train_dir)["world_size"] == 2
    assert slurm.queued() == {}


@pytest.mark.slow
def test_cancelling_a_served_run_leaves_no_slurm_job(served, tiny):  # noqa: F811
    overrides = tiny(launcher="slurm", num_processes=2, max_steps=100_000, **NO_EVAL)
    output_dir = Path(overrides["output_dir"])
    train_log = output_dir / "logs" / "train.log"
    run_id, _ = trigger(served, overrides)
    # Training is under way in Slurm: its job is queued, and its bar has come through srun into the job log.
    wait_until(lambda: f"dpo-train-{run_id}" in slurm.queued().values(), 300, "the training job in squeue")
    wait_until(lambda: train_log.is_file() and "train:" in train_log.read_text(), 300, "the training bar")
    prefect(served, "flow-run", "cancel", run_id)
    wait_until(lambda: flow_run(run_id).state.is_cancelled(), 120, "the run to be cancelled")
    wait_until(lambda: slurm.queued() == {}, 30, "squeue to be empty")
    wait_until(lambda: not job_processes(output_dir), 30, "every rank of the cancelled job to end")


@pytest.mark.slow
def test_the_flow_hook_scancels_the_slurm_jobs_of_its_flow_run_only(prefect_server, clean_queue):  # noqa: F811
    # prefect_server: the hook logs to the flow run (without an API it would start a temporary server to do so).
    mine, other = uuid.uuid4(), uuid.uuid4()
    jobs = [
        subprocess.Popen(
            ["srun", "--job-name", f"dpo-train-{run_id}", "sleep", "300"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for run_id in (mine, other)
    ]
    try:
        wait_until(lambda: len(slurm.queued()) == 2, 60, "both jobs in squeue")
        # Neither srun is a job of this process's launcher nor tagged with a flow run id: only scancel ends one.
        stop_flow_run_jobs(dpo_pipeline, FlowRun(id=mine, name="cancelled-run", flow_id=uuid.uuid4()), Cancelled())
        assert list(slurm.queued().values()) == [f"dpo-train-{other}"]
        assert jobs[0].wait(timeout=30) != 0  # its srun ended with the job
        APILogHandler().flush()
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[mine])))
        assert [log.message for log in logs] == ["flow run Cancelled: ended 0 job process group(s), 1 Slurm job(s)"]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
