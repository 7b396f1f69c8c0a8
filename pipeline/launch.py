"""Run a stage as a DeepSpeed job: ``torchrun`` (or the ``deepspeed`` launcher) in its own process group.

The job is the same ``dpo-pipeline <stage>`` command, started under a launcher with ``num_processes``
processes. It runs in a new session, so one ``killpg`` ends the launcher and every rank: on timeout, on an
exception in the caller (a cancelled Prefect task, Ctrl-C) and at interpreter exit. A failed job raises
:class:`JobFailed` with its exit code and the tail of its log.

Multi-node: use DeepSpeed's launcher with a hostfile directly, e.g.
``deepspeed --hostfile hostfile --module pipeline.cli train --config cfg.yaml`` (every node needs the repo,
the config and shared storage for ``output_dir``).
"""

from __future__ import annotations

import atexit
import ctypes
import collections
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import DPOPipelineConfig, save_config
from pipeline.distributed import NO_LAUNCHER, free_port, on_gpu
from pipeline.errors import PipelineError

_LIVE_GROUPS: set[int] = set()
_LOCK = threading.Lock()


class JobFailed(PipelineError):
    """A job exited non-zero. ``refused_input`` is true when a rank printed the CLI's one-line user error
    (bad config, data or artifact): rerunning cannot help, so callers should not retry."""

    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        errors = [line for line in tail.splitlines() if line.startswith(f"dpo-pipeline {stage}: error:")]
        self.refused_input = bool(errors)
        # The launcher adds its own traceback after a rank fails: lead with the stage's own words.
        headline = f"{errors[-1]}\n" if errors else ""
        super().__init__(f"{stage} job failed with exit code {returncode}\n{headline}last lines of its log:\n{tail}")


def kill_all_jobs() -> int:
    """Kill every job group this process started and that is still alive. Returns how many were signalled."""
    with _LOCK:
        groups = list(_LIVE_GROUPS)
    for pgid in groups:
        _kill_group(pgid)
    return len(groups)


def _kill_group(pgid: int, grace: float = 5.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


atexit.register(kill_all_jobs)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started the job dies, even by SIGKILL.

    The job runs in its own session (so one killpg ends it), which also cuts it off from its parent's fate; a
    driver killed outright would otherwise leave a job running that races with the rerun. torchrun and the
    deepspeed launcher end their ranks on SIGTERM."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stage_command(stage: str, config_path: Path, *, num_processes: int, launcher: str,
                  extra_args: tuple[str, ...] = ()) -> list[str]:
    port = str(free_port())
    target = ["pipeline.cli", stage, "--config", str(config_path), *extra_args]
    if launcher == "deepspeed":
        # --num_gpus also sets the process count on CPU; without it the launcher starts one process here.
        return ["deepspeed", "--num_gpus", str(num_processes), "--master_port", port, "--module", *target]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
            "--master_addr", "127.0.0.1", "--master_port", port, "-m", *target]


def job_environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A launcher sets these itself; values inherited from a parent job would confuse it.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", NO_LAUNCHER):
        env.pop(key, None)
    if not on_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run_job(stage: str, command: list[str], *, log_path: Path, on_line: Callable[[str], None] | None = None,
            timeout: float | None = None) -> None:
    """Run ``command`` in a new process group, tee its output to ``log_path`` and ``on_line``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=job_environment(), start_new_session=True, preexec_fn=_die_with_parent)
    with _LOCK:
        _LIVE_GROUPS.add(proc.pid)
    timer = threading.Timer(timeout, _kill_group, args=(proc.pid,)) if timeout else None
    try:
        if timer:
            timer.start()
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
                if on_line:
                    on_line(line.rstrip("\n"))
        proc.wait()
    finally:
        if timer:
            timer.cancel()
        # Reached with the job still running only on an exception here (cancellation, Ctrl-C): end it all.
        _kill_group(proc.pid, grace=2.0)
        with _LOCK:
            _LIVE_GROUPS.discard(proc.pid)
    if proc.returncode != 0:
        if proc.returncode in (-signal.SIGTERM, -signal.SIGKILL) and timer is not None:
            raise JobFailed(stage, proc.returncode, f"(killed after the {timeout:.0f} s timeout)\n" + "\n".join(tail))
        raise JobFailed(stage, proc.returncode, "\n".join(tail))


def run_stage(stage: str, config: DPOPipelineConfig, *, extra_args: tuple[str, ...] = (),
              on_line: Callable[[str], None] | None = None, timeout: float | None = None) -> None:
    """Run ``dpo-pipeline <stage>`` for ``config`` as a launcher job with ``config.num_processes`` ranks."""
    text = config.to_json()
    config_path = config.output_path / "jobs" / f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    save_config(config, config_path)
    command = stage_command(stage, config_path, num_processes=config.num_processes, launcher=config.launcher,
                            extra_args=extra_args)
    run_job(stage, command, log_path=config.output_path / "logs" / f"{stage}.log", on_line=on_line,
            timeout=timeout)
