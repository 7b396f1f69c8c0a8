"""Signals to ``dpo-pipeline run``, for real: SIGTERM, SIGHUP and SIGINT (to its process group, as Ctrl-C in a
terminal sends it) while a training job runs end the job, the run's temporary Prefect API and the run within
seconds, leaving no process and a Crashed run; ``kill -9`` of the run leaves no process either, and the next run
marks the orphaned run Crashed. The state is read from the run's own database, ``<output_dir>/prefect``."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import write_small_dataset

from flows.local_run import server_dir
from pipeline.config import REPO_ROOT, load_config, save_config
from pipeline.lock import LOCK_HELD

DPO_PIPELINE = str(Path(sys.executable).parent / "dpo-pipeline")
DEFAULT_CONFIG = str(REPO_ROOT / "configs" / "default.yaml")
GONE_WITHIN_S = 30
# The training job's own tqdm bar, relayed to the run's log, past its first step.
_TRAINING = re.compile(r"train:\s+\d+%\|[^|]*\|\s*[1-9]\d*/\d+")


@pytest.fixture(scope="module")
def endless(tmp_path_factory, tiny_model_dir) -> Path:
    """The config file of a run whose training never ends by itself. Every test uses its output directory: the
    first run pays for tokenizing and the reference pass, the later ones find them Cached."""
    root = tmp_path_factory.mktemp("signals")
    config = load_config(
        DEFAULT_CONFIG,
        {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(write_small_dataset(root / "data")),
            "output_dir": str(root / "out"),
            "max_length": 64,
            "max_prompt_length": 32,
            "per_device_train_batch_size": 4,
            "max_steps": 100_000,
            "sync_ref_model": False,
            "eval_steps": None,
            "save_steps": None,
        },
    )
    save_config(config, root / "endless.yaml")
    return root / "endless.yaml"


def output_dir(config_file: Path) -> Path:
    return load_config(config_file).output_path


def start_run(config_file: Path, log: Path) -> subprocess.Popen:
    """``dpo-pipeline run`` as a terminal would start it: leader of its own process group."""
    env = {**{k: v for k, v in os.environ.items() if k != LOCK_HELD}, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        # SIGINT as a terminal leaves it: a runner started in the background (`cmd &` in a script) passes an
        # ignored SIGINT down to every child, and Python then installs no KeyboardInterrupt handler.
        return subprocess.Popen(
            [DPO_PIPELINE, "run", "--config", str(config_file)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def run_processes(out: Path, leader: int) -> list[psutil.Process]:
    """Live processes of the run: the leader, and everything that names the output directory in its command
    line (stage jobs and ranks) or inherited the run's lock token (the temporary API server, the jobs)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (
                proc.pid == leader
                or str(out) in " ".join(proc.info["cmdline"] or [])
                or proc.environ().get(LOCK_HELD) == str(out)
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def assert_nothing_left(out: Path, proc: subprocess.Popen, since: float) -> float:
    """Wait (at most GONE_WITHIN_S) until no process of the run is left; return how long that took."""
    deadline = since + GONE_WITHIN_S
    while left := run_processes(out, proc.pid):  # the ended leader is a zombie until reaped: not listed
        assert time.monotonic() < deadline, f"still running: {[p.info['cmdline'] for p in left]}"
        time.sleep(0.2)
    took = time.monotonic() - since
    proc.wait(timeout=5)
    return took


def flow_runs(out: Path) -> list[tuple[str, str, str | None]]:
    """(name, state type, state message) of every flow run in the run's own Prefect database, oldest first."""
    with sqlite3.connect(server_dir(out) / "prefect.db") as db:
        return db.execute(
            "SELECT flow_run.name, flow_run.state_type, flow_run_state.message FROM flow_run "
            "LEFT JOIN flow_run_state ON flow_run.state_id = flow_run_state.id "
            "ORDER BY flow_run.created"
        ).fetchall()


def run_name(log: Path) -> str:
    return re.search(r"Beginning flow run '([^']+)'", log.read_text())[1]


def training(log: Path):
    return lambda: _TRAINING.search(log.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, to_group",
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGHUP", "SIGINT-to-group"],
)
def test_a_signal_ends_jobs_server_and_run_within_seconds_as_crashed(endless, tmp_path, sig, to_group):
    out, log = output_dir(endless), tmp_path / "run.log"
    proc = start_run(endless, log)
    wait_for(training(log), proc, log, 400, "training job")

    sent = time.monotonic()
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    took = assert_nothing_left(out, proc, sent)

    assert proc.returncode == 128 + sig, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"dpo-pipeline run: stopped by {signal.Signals(sig).name}: ")
    runs = {name: state for name, state, _ in flow_runs(out)}
    assert runs[run_name(log)] == "CRASHED" and "RUNNING" not in runs.values()
    print(f"{signal.Signals(sig).name}: no process left after {took:.1f} s")


@pytest.mark.slow
def test_kill_9_of_the_run_leaves_no_process_and_the_next_run_marks_it_crashed(endless, tmp_path):
    out, log = output_dir(endless), tmp_path / "killed.log"
    proc = start_run(endless, log)
    wait_for(training(log), proc, log, 400, "training job")

    sent = time.monotonic()
    proc.kill()  # SIGKILL: no handler, no hook, no atexit; the server and the job die with their parent
    took = assert_nothing_left(out, proc, sent)
    killed = run_name(log)
    assert {name: state for name, state, _ in flow_runs(out)}[killed] == "RUNNING"  # nobody could report it

    next_log = tmp_path / "next.log"
    following = start_run(endless, next_log)
    wait_for(lambda: "Beginning flow run" in next_log.read_text(), following, next_log, 300, "the next flow run")
    assert "dpo-pipeline run: marked 1 earlier flow run(s)" in next_log.read_text()
    assert "Traceback" not in log.read_text() + next_log.read_text()
    following.send_signal(signal.SIGTERM)
    assert_nothing_left(out, following, time.monotonic())
    states = {name: (state, message) for name, state, message in flow_runs(out)}
    assert states[killed] == (
        "CRASHED",
        "the process running it was killed before it could report; marked Crashed by the next run",
    )
    assert not {state for state, _ in states.values()} & {"RUNNING", "PENDING"}
    print(f"kill -9: no process left after {took:.1f} s")
