"""Run a stage as a DeepSpeed job: ``torchrun`` (or the ``deepspeed`` launcher) in its own process group.

The job is the same ``dpo-pipeline <stage>`` command, started under a launcher with ``num_processes``
processes. It runs in a new session, so one ``killpg`` ends the launcher and every rank: on timeout, on an
exception in the caller (a cancelled Prefect task, Ctrl-C) and at interpreter exit. A failed job raises
:class:`JobFailed` with its exit code and the tail of its log.

Launchers (``launcher`` in the config): torchrun (one node, or ``num_nodes`` with ``node_rank`` and
``rdzv_endpoint``), the deepspeed launcher (``--num_gpus`` or ``hostfile``), or Slurm's ``srun``
(:mod:`pipeline.slurm`). Every node needs the repo, the config and shared storage for ``output_dir``. The job's
config names the model by its local path, resolved once before launching (:func:`job_config`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.artifacts import storage_errors
from pipeline.config import DPOPipelineConfig, save_config
from pipeline.errors import ConfigError, from_record
from pipeline.models import resolve_model_dir
from pipeline.ranks import NO_LAUNCHER, RANK_VARIABLES, free_port

_LIVE_GROUPS: set[int] = set()
_LOCK = threading.Lock()


class JobFailed(Exception):
    """A job crashed: it exited non-zero without refusing its input (that is the :class:`PipelineError` its
    rank raised, rebuilt by :func:`run_job`). Not a PipelineError: it keeps its traceback and is worth a retry."""

    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        super().__init__(f"{stage} job failed with exit code {returncode}\nlast lines of its log:\n{tail}")


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
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


atexit.register(kill_all_jobs)


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started the job dies, even by SIGKILL.

    The job runs in its own session (so one killpg ends it), which also cuts it off from its parent's fate; a
    driver killed outright would otherwise leave a job running that races with the rerun. torchrun and the
    deepspeed launcher end their ranks on SIGTERM."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


_ENDING_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _job_preexec() -> None:
    """In the child: the signal mask of the parent's spawn window is not the job's, then :func:`die_with_parent`."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _ENDING_SIGNALS)
    die_with_parent()


def stage_command(
    stage: str,
    config_path: Path,
    config: DPOPipelineConfig,
    *,
    extra_args: tuple[str, ...] = (),
    job_name: str | None = None,
) -> list[str]:
    """The launcher command that runs ``dpo-pipeline <stage>`` with ``config.num_processes`` ranks per node.

    torchrun: one node on loopback, or this machine as node ``node_rank`` of ``num_nodes`` with node 0 at
    ``rdzv_endpoint`` (start the same command on every node). deepspeed: ``--num_gpus`` on one node (or the
    GPUs of CUDA_VISIBLE_DEVICES, which ``--num_gpus`` would ignore), or ``hostfile``. slurm: ``srun``."""
    target = ["pipeline.cli", stage, "--config", str(config_path), *extra_args]
    if stage == "tokenize":
        return [sys.executable, "-m", *target]  # one process on this machine, whatever the launcher: no ranks
    nproc = str(config.num_processes)
    if config.launcher == "slurm":
        from pipeline import slurm

        return slurm.srun_command(config, ["-m", *target], job_name or f"dpo-{stage}")
    if config.launcher == "deepspeed":
        # The launcher script of this interpreter's environment: a venv's bin/ need not be on PATH.
        beside = Path(sys.executable).parent / "deepspeed"
        command = [str(beside) if beside.is_file() else "deepspeed"]
        if config.hostfile:
            command += ["--hostfile", str(config.resolve_path(config.hostfile)), "--num_gpus", nproc]
        elif os.environ.get("CUDA_VISIBLE_DEVICES") and node_gpus(config.device):
            # --num_gpus drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1: on a shared node, someone else's.
            visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[: config.num_processes]
            command += ["--include", f"localhost:{','.join(visible)}"]
        else:
            # --num_gpus also sets the process count on CPU; without it the launcher starts one process here.
            command += ["--num_gpus", nproc]
        return [*command, "--master_port", str(free_port()), "--module", *target]
    if config.num_nodes > 1:
        assert config.rdzv_endpoint, "the config refuses torchrun with num_nodes > 1 and no rdzv_endpoint"
        host, _, port = config.rdzv_endpoint.rpartition(":")
        nodes = [
            "--nnodes",
            str(config.num_nodes),
            "--node_rank",
            str(config.node_rank),
            "--master_addr",
            host,
            "--master_port",
            port,
        ]
    else:
        nodes = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, *nodes, "-m", *target]


@functools.cache
def node_gpus(device: str) -> int:
    """The GPUs this node gives a job for the config's ``device``, without importing torch into this process
    (the driver, or the Prefect process: torch there would cost seconds and hundreds of MB per flow run).

    No NVIDIA device files means no GPU, the answer on every CPU machine; otherwise torch answers in a child
    process, which also refuses ``device: cuda`` without usable CUDA and ``auto`` on a broken GPU setup, as
    the ranks would (:func:`pipeline.distributed.use_device`)."""
    if device == "cpu" or (device == "auto" and not Path("/dev/nvidiactl").exists()):
        return 0
    probe = subprocess.run(
        [sys.executable, "-m", "pipeline.distributed", device],
        capture_output=True,
        text=True,
        env=dict(os.environ, DPO_PIPELINE_NO_LAUNCHER="1"),
    )
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or [f"exit code {probe.returncode}"]
        raise ConfigError(lines[-1].removeprefix("error: "))
    return int(probe.stdout.strip().splitlines()[-1])


def job_environment(device: str = "auto") -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A launcher sets these itself; values inherited from a parent job would confuse it.
    for key in (*RANK_VARIABLES, NO_LAUNCHER):
        env.pop(key, None)
    if not node_gpus(device):
        env.setdefault("DS_ACCELERATOR", "cpu")
    # The driver resolved the model and the dataset before launching (job_config): the ranks read the local
    # copies and caches, and never ask the Hub (compute nodes are often offline; N ranks x M lookups otherwise).
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def check_launch(config: DPOPipelineConfig) -> None:
    """Before launching: the ranks per node fit the GPUs this node has (a job on a node of its own, under
    Slurm, is checked by its ranks), and every host of a hostfile resolves (a typo would otherwise surface as
    pdsh's or ssh's failure on one node, after the others started)."""
    gpus = node_gpus(config.device)
    if config.launcher == "deepspeed" and config.hostfile:
        hostfile = config.resolve_path(config.hostfile)
        assert hostfile is not None, "resolve_path returns None only for None, and hostfile is a str here"
        _check_hostfile(hostfile)
    if gpus and config.launcher != "slurm" and config.num_processes > gpus:
        raise ConfigError(
            f"num_processes: {config.num_processes} ranks per node, but {socket.gethostname()} has "
            f"{gpus} visible GPU(s); set num_processes to at most that"
        )


def _check_hostfile(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"hostfile: {path} not found")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        host = line.split("#")[0].split()
        if not host:
            continue
        try:
            socket.getaddrinfo(host[0], None)
        except OSError:
            raise ConfigError(
                f"hostfile {path}, line {number}: host '{host[0]}' does not resolve; fix the name or remove the line"
            ) from None


def job_config(config: DPOPipelineConfig) -> DPOPipelineConfig:
    """The config a job runs: names resolved to local paths once, here, so that no rank of any job asks the Hub
    again (compute nodes are often offline) and every rank reads the very same files."""
    from pipeline.tokenize.sources import resolve_sources

    resolve_sources(config)  # a Hub dataset lands in the datasets cache here, once
    return config.model_copy(update={"model_name_or_path": str(resolve_model_dir(config))})


def run_job(
    stage: str,
    command: list[str],
    *,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    slurm_job_name: str | None = None,
    device: str = "auto",
    error_file: Path | None = None,
) -> None:
    """Run ``command`` in a new process group, tee its output to ``log_path`` and ``on_line``. A Slurm job
    (``slurm_job_name``) is also scancel'ed when it is ended early: srun killed outright leaves its step running.

    A job that refused its input wrote the error to ``error_file`` (``dpo-pipeline --error-file``): that error is
    raised here, with its own type; any other failure is a :class:`JobFailed`."""
    if error_file is not None:
        error_file.unlink(missing_ok=True)
    with storage_errors(log_path):  # an unwritable or full logs/ is one line, before any job starts
        log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    env = job_environment(device)
    # A SIGTERM or Ctrl-C between the start of the job and the `try` below would leave the job running, its
    # group unknown to the `finally` that ends it: such a signal waits until the job is registered.
    in_main = threading.current_thread() is threading.main_thread()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING_SIGNALS) if in_main else None
    try:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
            preexec_fn=_job_preexec,
        )
        with _LOCK:
            _LIVE_GROUPS.add(proc.pid)
    except BaseException:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    timer = threading.Timer(timeout, _kill_group, args=(proc.pid,)) if timeout else None
    try:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is raised here
        if timer:
            timer.start()
        with storage_errors(log_path), open(log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            assert proc.stdout is not None, "Popen was given stdout=PIPE"
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
        if slurm_job_name and proc.poll() != 0:
            from pipeline import slurm

            slurm.cancel(slurm_job_name)
        with _LOCK:
            _LIVE_GROUPS.discard(proc.pid)
    if proc.returncode != 0:
        if error_file is not None and error_file.is_file():
            raise from_record(json.loads(error_file.read_text())) from JobFailed(
                stage, proc.returncode, "\n".join(tail)
            )
        if proc.returncode in (-signal.SIGTERM, -signal.SIGKILL) and timer is not None:
            raise JobFailed(stage, proc.returncode, f"(killed after the {timeout:.0f} s timeout)\n" + "\n".join(tail))
        raise JobFailed(stage, proc.returncode, "\n".join(tail))


# The line a stage prints when it refuses its input (pipeline/cli.py).
_REFUSAL = re.compile(r"^dpo-pipeline [\w-]+: error: ")


def until_refusal(on_line: Callable[[str], None]) -> Callable[[str], None]:
    """``on_line`` for a job's lines up to its refusal of its input: the refusal comes back as the error itself,
    raised once by :func:`run_job`, and what the job prints after it (each rank's copy of the line, the
    launcher's traceback of ranks that exited 2) stays in the job's log file."""
    refused = False

    def forward(line: str) -> None:
        nonlocal refused
        refused = refused or bool(_REFUSAL.match(line))
        if not refused:
            on_line(line)

    return forward


def run_stage(
    stage: str,
    config: DPOPipelineConfig,
    *,
    extra_args: tuple[str, ...] = (),
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``dpo-pipeline <stage>`` for ``config`` as a launcher job with ``config.num_processes`` ranks per node."""
    check_launch(config)
    config = job_config(config)
    text = config.to_json()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    config_path = config.output_path / "jobs" / f"{stage}-{digest}.yaml"
    save_config(config, config_path)
    # A Slurm job is found again by its name (to cancel it): the flow run's id when there is one.
    job_name = f"dpo-{stage}-{os.environ.get('PREFECT__FLOW_RUN_ID', digest)[:36]}"
    error_file = config.output_path / "jobs" / f"{stage}-{digest}.error.json"
    command = stage_command(
        stage, config_path, config, extra_args=(*extra_args, "--error-file", str(error_file)), job_name=job_name
    )
    run_job(
        stage,
        command,
        log_path=config.output_path / "logs" / f"{stage}.log",
        on_line=until_refusal(on_line) if on_line else None,
        timeout=timeout,
        slurm_job_name=job_name if config.launcher == "slurm" else None,
        device=config.device,
        error_file=error_file,
    )
