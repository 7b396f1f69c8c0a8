"""Stage jobs under Slurm: the ``srun`` command that starts a stage's ranks, and ``scancel`` to end them.

With ``launcher: slurm`` a stage job is ``srun ... python -m pipeline.cli <stage>``, run by
:func:`pipeline.launch.run_job` like any launcher: its output is srun's, streamed to the job log (and, in a
flow, to Prefect). From a login node srun asks for a new allocation of ``num_nodes`` x ``num_processes``
tasks; inside one (``salloc``, an ``sbatch`` script) it starts a job step there. Every task is one rank and
learns its rank from Slurm's own variables (:func:`pipeline.distributed.scheduler_rank_environment`): no
torchrun, no rendezvous service, no port chosen on the submitting host.

Design choices and their costs:

* ``--export=ALL`` (spelled out: an ``sbatch --export=NONE`` script exports SLURM_EXPORT_ENV=NONE, which srun
  would obey) carries the submitting environment, the venv's ``sys.executable`` and thread settings included,
  to every task. So the compute nodes need the same paths: the repo, the venv and ``output_dir`` on shared
  storage, as for any multi-node run.
* ``--ntasks`` is given as well as ``--ntasks-per-node``: inside an allocation srun would otherwise take its
  task count from the inherited SLURM_NTASKS, the allocation's, and start the wrong number of ranks.
* ``--unbuffered``: srun otherwise forwards a task's output a whole line at a time, which holds tqdm's
  carriage-return refreshes back until the stage's next newline (training prints none until it ends), so its
  progress would not move. The cost: lines two ranks print to stdout at the same instant may interleave
  (stderr, where logging and the CLI's error line go, arrives a whole line per write; measured: 0 of 600).
* ``--kill-on-bad-exit=1``: one failed rank ends the others at once instead of leaving them blocked in a
  collective until the timeout.
* :func:`cancel` matters because srun is not the job: a SIGKILLed srun leaves a job that was still waiting
  for its allocation in the queue, to start later with nobody reading it. Jobs are found by name
  (``dpo-<stage>-<flow run id or config digest>``, chosen by :func:`pipeline.launch.run_stage`), among this
  user's only. A flow run's hook sweeps by the flow run's id (:func:`cancel_containing`). That sweep asks
  ``squeue`` whenever Slurm's client is installed: a few milliseconds, or about 9 s once per cancelled run
  on a machine whose controller is down.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 15.0  # a cancelled job lists as COMPLETING until its tasks are gone: SIGTERM, a clean exit
_CLIENT_TIMEOUT_S = 30.0  # one squeue/scancel call; a controller that is down makes them retry for ~9 s


def srun_command(config, target_args: list[str], job_name: str) -> list[str]:
    """``srun <allocation and task options> <this python> <target_args>`` for a stage job of ``config``:
    ``num_nodes`` nodes, ``num_processes`` tasks (ranks) per node, the ``slurm_*`` fields, then
    ``slurm_extra_args`` (last, so they can override any option above)."""
    if shutil.which("srun") is None:
        raise ConfigError(
            f"launcher: slurm, but `srun` is not on PATH on {socket.gethostname()}; run from a "
            f"Slurm login node or allocation (or load Slurm, e.g. `module load slurm`), or set "
            f"launcher: torchrun to run here"
        )
    tasks = config.num_nodes * config.num_processes
    command = [
        "srun",
        "--nodes",
        str(config.num_nodes),
        "--ntasks",
        str(tasks),
        "--ntasks-per-node",
        str(config.num_processes),
        "--kill-on-bad-exit=1",
        "--unbuffered",
        "--export=ALL",
        "--job-name",
        job_name,
    ]
    if config.slurm_partition:
        command += ["--partition", config.slurm_partition]
    if config.slurm_time:
        command += ["--time", config.slurm_time]
    if config.slurm_gpus_per_node:
        command += ["--gpus-per-node", str(config.slurm_gpus_per_node)]
    return [*command, *config.slurm_extra_args, sys.executable, *target_args]


def queued(select: Callable[[str], bool] = lambda name: True) -> dict[str, str]:
    """This user's queued or running Slurm jobs and job steps whose name passes ``select``: ``{id: name}``.

    Steps count because inside an allocation srun starts a step named after the job, not a job; a step of a
    job that is itself listed is left out (cancelling the job ends it). Empty without Slurm's client."""
    if shutil.which("squeue") is None:
        return {}
    found: dict[str, str] = {}
    for steps in ([], ["--steps"]):
        lines = _client(["squeue", "--noheader", "--user", _user(), "--format", "%i %j", *steps])
        for line in lines:
            job_id, _, name = line.strip().partition(" ")
            if select(name) and job_id.split(".")[0] not in found:
                found[job_id] = name
    return found


def cancel(job_name: str, timeout: float = CANCEL_WAIT_S) -> bool:
    """scancel this user's jobs (or steps) named ``job_name`` and wait up to ``timeout`` s for them to leave the
    queue. True when none is left; never raises (it runs in ``finally`` blocks), a failure is logged."""
    return _cancel(lambda name: name == job_name, timeout)[1] == 0


def cancel_containing(text: str, timeout: float = CANCEL_WAIT_S) -> int:
    """Like :func:`cancel`, for every job or step whose name contains ``text`` (a flow run's id). Returns how
    many were cancelled."""
    return _cancel(lambda name: text in name, timeout)[0]


def _cancel(select: Callable[[str], bool], timeout: float) -> tuple[int, int]:
    """Cancel the matching jobs: how many there were, and how many are still listed when ``timeout`` runs out."""
    targets = queued(select)
    found = len(targets)
    if targets:
        _client(["scancel", "--quiet", *targets])
    deadline = time.monotonic() + timeout
    while targets and time.monotonic() < deadline:
        time.sleep(0.2)
        targets = queued(select)
    if targets:
        log.warning(
            "Slurm jobs still listed %.0f s after scancel: %s",
            timeout,
            ", ".join(f"{job_id} ({name})" for job_id, name in targets.items()),
        )
    return found, len(targets)


def _client(command: list[str]) -> list[str]:
    """The output lines of a Slurm client command; none (and a warning) when it fails or hangs."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s failed: %s", command[0], exc)
        return []
    if result.returncode != 0:
        log.warning("%s exited %d: %s", command[0], result.returncode, result.stderr.strip())
        return []
    return result.stdout.splitlines()


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name
