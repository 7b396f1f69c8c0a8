"""One run per output directory, with real processes holding real locks: a second run waits (one line naming
the holder) or fails at once, a killed holder leaves no stale lock, the holder's own children and launcher ranks
do not deadlock, and two concurrent ``dpo-pipeline run`` leave one clean ``metrics.jsonl``."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, load_config, save_config
from pipeline.errors import LockError
from pipeline.lock import LOCK_HELD, lock_path, output_dir_lock
from pipeline.plan import Plan
from pipeline.ranks import NO_LAUNCHER

DPO_PIPELINE = str(Path(sys.executable).parent / "dpo-pipeline")
DEFAULT_CONFIG = str(REPO_ROOT / "configs" / "default.yaml")
# Holds the lock of output_dir argv[1] for argv[2] seconds in mode argv[3]; a refusal prints its line, exits 3.
HOLDER = """
import sys, time
from pipeline.config import load_config
from pipeline.errors import LockError
from pipeline.lock import output_dir_lock
try:
    with output_dir_lock(load_config(None, {"output_dir": sys.argv[1], "output_dir_lock": sys.argv[3]})):
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
except LockError as exc:
    print(exc, flush=True)
    sys.exit(3)
"""


def holder_env(**extra: str) -> dict[str, str]:
    """An environment of a process outside any run (no inherited lock token), with ``extra`` on top."""
    return {**{k: v for k, v in os.environ.items() if k != LOCK_HELD}, **extra}


def hold(output_dir: Path, seconds: float, mode: str = "wait", env: dict | None = None) -> subprocess.Popen:
    """Start a process holding ``output_dir``'s lock; return once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir), str(seconds), mode],
        cwd=REPO_ROOT,
        env=env or holder_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def config_for(output_dir: Path, **values):
    return load_config(None, {"output_dir": str(output_dir), **values})


def test_fail_mode_names_the_holder_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, 60)
    started = time.monotonic()
    with pytest.raises(LockError) as refused, output_dir_lock(config_for(out, output_dir_lock="fail")):
        pass
    assert time.monotonic() - started < 2
    message = str(refused.value)
    assert message.startswith(f"output_dir {out} is in use by pid {holder.pid} on {socket.gethostname()} since ")
    assert "-c" in message and "\n" not in message  # the holder's command, on the one line

    holder.kill()  # SIGKILL: no cleanup at all, and still nothing stale
    holder.wait()
    with output_dir_lock(config_for(out, output_dir_lock="fail")):
        assert json.loads(lock_path(config_for(out)).read_text())["pid"] == os.getpid()


def test_wait_mode_says_once_whom_it_waits_for_then_runs(tmp_path, capsys):
    out = tmp_path / "out"
    holder, held_since = hold(out, 3), time.monotonic()
    with output_dir_lock(config_for(out)):
        assert time.monotonic() - held_since > 2.5  # got the lock only once the holder let it go
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dpo-pipeline: output_dir {out} is in use by pid {holder.pid} ")
    assert line.endswith("; waiting for that run to end")


def test_the_holders_children_and_nested_entries_do_not_lock(tmp_path):
    out = tmp_path / "out"
    strict = config_for(out, output_dir_lock="fail")
    with output_dir_lock(strict):
        assert os.environ[LOCK_HELD] == str(out)
        with output_dir_lock(strict):  # the CLI's `run` holds it, then the flow inside enters it again
            pass
        child = subprocess.run(
            [sys.executable, "-c", HOLDER, str(out), "0", "fail"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0 and child.stdout.strip() == "holding"  # a stage job of this run
        stranger = subprocess.run(
            [sys.executable, "-c", HOLDER, str(out), "0", "fail"],
            cwd=REPO_ROOT,
            env=holder_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert stranger.returncode == 3 and f"is in use by pid {os.getpid()}" in stranger.stdout
    assert LOCK_HELD not in os.environ


def test_launcher_ranks_other_than_rank_0_do_not_lock_and_rank_0_always_waits(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    strict = config_for(out, output_dir_lock="fail")
    monkeypatch.delenv(NO_LAUNCHER, raising=False)
    holder, held_since = hold(out, 3), time.monotonic()
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    with output_dir_lock(strict):  # at once, with another run holding the directory
        assert holder.poll() is None
    # The second node of a multi-node torchrun job started as `dpo-pipeline` on each node: node 0 locks.
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("RANK")
    with output_dir_lock(
        config_for(out, output_dir_lock="fail", num_nodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29500")
    ):
        assert holder.poll() is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    with output_dir_lock(strict):  # fail mode, yet rank 0 waits: failing one rank would hang the others
        assert time.monotonic() - held_since > 2.5
    assert "waiting for that run to end" in capsys.readouterr().err


def test_a_record_left_by_an_ended_process_is_reported_as_such(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    raw = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('holding', flush=True); time.sleep(60)"
    )
    # Locked by a process that writes no record (like a child the recorded holder forked): first no record ...
    locker = subprocess.Popen([sys.executable, "-c", raw, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "holding"
        with (
            pytest.raises(LockError, match="another process \\(it has not written its record yet\\)"),
            output_dir_lock(config_for(out, output_dir_lock="fail")),
        ):
            pass
        # ... then the record of a process that has ended.
        ended = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        )
        (out / ".lock").write_text(
            json.dumps(
                {
                    "pid": int(ended.stdout),
                    "host": socket.gethostname(),
                    "started": 0.0,
                    "command": "dpo-pipeline run",
                    "since": "then",
                }
            )
        )
        with (
            pytest.raises(LockError, match="that process has ended, so a process it forked still holds the lock"),
            output_dir_lock(config_for(out, output_dir_lock="fail")),
        ):
            pass
    finally:
        locker.kill()
        locker.wait()


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_concurrent_runs_on_one_output_dir_leave_one_clean_metrics_log(make_config, tmp_path):
    small = make_config().subset(
        "model_name_or_path",
        "dataset_name",
        "output_dir",
        "max_length",
        "max_prompt_length",
        "per_device_train_batch_size",
    )
    config = load_config(
        DEFAULT_CONFIG, {**small, "max_steps": 4, "sync_ref_model": False, "eval_steps": None, "save_steps": None}
    )
    config_file = tmp_path / "tiny.yaml"
    save_config(config, config_file)
    env = holder_env(OMP_NUM_THREADS="1")

    def start(name: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                [DPO_PIPELINE, "run", "--config", str(config_file), *overrides],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log

    first, first_log = start("first")
    deadline = time.monotonic() + 120
    while not (lock_path(config).is_file() and f'"pid": {first.pid},' in lock_path(config).read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()
        time.sleep(0.2)
    refused = subprocess.run(
        [DPO_PIPELINE, "run", "--config", str(config_file), "output_dir_lock=fail"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    second, second_log = start("second")
    assert first.wait(timeout=600) == 0, first_log.read_text()[-3000:]
    assert second.wait(timeout=300) == 0, second_log.read_text()[-3000:]

    assert refused.returncode == 2 and refused.stdout == ""
    assert (
        refused.stderr.startswith(
            f"dpo-pipeline run: error: output_dir {config.output_path} is in use by pid {first.pid} "
        )
        and len(refused.stderr.splitlines()) == 1
    )
    waited = [line for line in second_log.read_text().splitlines() if "is in use by" in line]
    assert len(waited) == 1 and f"pid {first.pid} " in waited[0] and waited[0].endswith("waiting for that run to end")
    # The second run came after the first, found everything complete and did no model work.
    assert second_log.read_text().count("Finished in state Cached") == 3
    records = [json.loads(line) for line in (Plan.of(config).train_dir / "metrics.jsonl").read_text().splitlines()]
    # Each step's train record once, in order, then the final eval record: one run's worth, nothing doubled.
    assert [(r["step"], "loss" in r) for r in records] == [(1, True), (2, True), (3, True), (4, True), (4, False)]
