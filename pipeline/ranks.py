"""Which rank this process is: the launchers' environment variables, read without torch.

torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*; ``srun`` and ``mpirun``
set their own, mapped by :func:`scheduler_rank_environment`. The driver (and the Prefect process) reads these
to decide whether it runs under a launcher; the ranks' process group is :mod:`pipeline.distributed`'s.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from pipeline.errors import ConfigError

NO_LAUNCHER = "DPO_PIPELINE_NO_LAUNCHER"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# DeepSpeed's multi-node runner forwards only some variables to the other nodes (NCCL*, PYTHON*, ...); these
# must reach every rank too, so the launcher docs tell users to put them into .deepspeed_env.
NODE_ENVIRONMENT = ("HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "DS_ACCELERATOR", "OMP_NUM_THREADS", "CUDA_HOME")


def scheduler_rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from Slurm's ``srun`` or OpenMPI's ``mpirun``
    variables; empty when neither started this process as one of several ranks.

    Slurm: only a job *step* (``srun``) has one task per rank; an ``sbatch`` script or ``salloc`` shell is one
    process (SLURM_PROCID 0 of the allocation's tasks) and runs as a single process, relaunching itself with
    srun when the config says ``launcher: slurm``. The master is the step's first node; the port is derived
    from the job and step ids, so every task computes the same one without talking to the others.
    OpenMPI: ranks come from OMPI_COMM_WORLD_*; a multi-node mpirun must export MASTER_ADDR (``-x``), since
    nothing in its environment names the first rank's host."""
    if env.get("SLURM_STEP_ID", "").isdigit() and "SLURM_PROCID" in env:
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        port = 20000 + (int(env.get("SLURM_JOB_ID", "0")) * 17 + int(env["SLURM_STEP_ID"])) % 20000
        return {
            "RANK": env["SLURM_PROCID"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": tasks,
            "LOCAL_WORLD_SIZE": env.get("SLURM_STEP_TASKS_PER_NODE", tasks).split("(")[0].split(",")[0],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT") or str(port),
        }
    if "OMPI_COMM_WORLD_RANK" in env:
        size, local_size = env["OMPI_COMM_WORLD_SIZE"], env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
        if "MASTER_ADDR" not in env and size != local_size:
            raise ConfigError(
                "mpirun across nodes: export the first rank's host as MASTER_ADDR "
                "(mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port> ...)"
            )
        return {
            "RANK": env["OMPI_COMM_WORLD_RANK"],
            "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            "WORLD_SIZE": size,
            "LOCAL_WORLD_SIZE": local_size,
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    return {}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-010,012],cpu1`` -> ``gpu003`` (what ``scontrol show
    hostnames`` would print first, without a subprocess per rank)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def under_launcher() -> bool:
    """True in a rank started by torchrun, the deepspeed launcher, srun or mpirun (not in a plain process)."""
    return ("LOCAL_RANK" in os.environ or bool(scheduler_rank_environment(os.environ))) and (
        NO_LAUNCHER not in os.environ
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0
