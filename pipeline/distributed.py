"""DeepSpeed process setup, shared by the reference pass and training (the ds_config: :mod:`pipeline.ds_config`).

* :func:`init_distributed` makes one code path serve 1 process without a launcher, N processes under
  ``torchrun`` / the ``deepspeed`` launcher, CPU (gloo) and GPU (nccl). On CPU it disables DeepSpeed's
  shared-memory comm op: it JIT-compiles for ~40 s and its fp32 all-reduce segfaults on AVX2-only machines.
* :func:`prepare_environment` gives every rank the launcher variables (:mod:`pipeline.ranks` reads them);
  :func:`main_decides` and :func:`check_ranks_agree` keep the ranks in step on a shared filesystem.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.errors import ConfigError
from pipeline.ranks import NO_LAUNCHER, free_port, is_main_process, rank, scheduler_rank_environment, world_size

T = TypeVar("T")

_device_choice = "auto"  # the config's `device`, set by init_distributed / use_device


def use_device(choice: str) -> None:
    """Pin where this process runs (the config's ``device``): auto, cuda or cpu. Refuses cuda without a GPU."""
    global _device_choice
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device: cuda, but CUDA is not usable on {socket.gethostname()} ({_cuda_diagnosis()}); "
            f"fix the GPU setup or set device: cpu"
        )
    if choice == "auto" and not torch.cuda.is_available() and _gpu_hardware_present():
        raise ConfigError(
            f"device: auto found GPU device files on {socket.gethostname()} but CUDA is not usable "
            f"({_cuda_diagnosis()}); a GPU job must not fall back to CPU silently: fix the GPU "
            f"setup, or set device: cpu to run on CPU"
        )
    _device_choice = choice


def _gpu_hardware_present() -> bool:
    return Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "unset") not in ("", "-1")


def _cuda_diagnosis() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} built for CUDA {torch.version.cuda}, torch.cuda.is_available() is False"


def on_gpu() -> bool:
    return _device_choice != "cpu" and torch.cuda.is_available()


def gpu_count() -> int:
    return torch.cuda.device_count() if on_gpu() else 0


def prepare_environment() -> None:
    """The rank variables every DeepSpeed process needs; safe to call more than once, before importing deepspeed.

    torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*. A task started by
    ``srun`` or ``mpirun`` has only the scheduler's own variables, which are mapped here (DeepSpeed's own MPI
    discovery would need mpi4py). A plain process gets made-up variables for rank 0 of 1, marked so that
    :func:`under_launcher` tells them from a launcher's. A partial set (``WORLD_SIZE`` without ``RANK``) is an
    error: guessing would start independent rank-0 runs that write into one output directory."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    present = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name in os.environ]
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if "LOCAL_RANK" not in os.environ:
            if os.environ["WORLD_SIZE"] != "1":
                raise ConfigError(
                    f"launcher environment on {socket.gethostname()}: RANK={os.environ['RANK']} and "
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} are set but LOCAL_RANK is not; start "
                    f"the job with torchrun, the deepspeed launcher, srun or mpirun"
                )
            os.environ["LOCAL_RANK"] = os.environ["RANK"]  # rank 0 of 1: its own local rank
        return
    if present and NO_LAUNCHER not in os.environ:
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in present]
        raise ConfigError(
            f"launcher environment on {socket.gethostname()}: {', '.join(present)} set but "
            f"{', '.join(missing)} not; set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
            f"MASTER_PORT, or start the job with torchrun, the deepspeed launcher, srun or mpirun"
        )
    mapped = scheduler_rank_environment(os.environ)
    if mapped:
        os.environ.update(mapped)
        return
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()),
        **{NO_LAUNCHER: "1"},
    )


def init_distributed(config=None) -> None:
    """Start (once) the process group, with the device set from LOCAL_RANK and checked against the GPUs.

    On GPUs the group is ``cpu:gloo,cuda:nccl``: NCCL for the model's tensors, gloo for the few host-side
    object collectives (decisions, shard results), which NCCL would otherwise stage through the GPU. With
    ``config``: its ``device`` choice, ``ddp_timeout`` and attention setting apply."""
    if config is not None:
        use_device(config.device)
    prepare_environment()
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    if on_gpu():
        local, visible = int(os.environ["LOCAL_RANK"]), gpu_count()
        if local >= visible:
            raise ConfigError(
                f"rank {rank()} on {socket.gethostname()}: LOCAL_RANK {local} but only {visible} "
                f"GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); "
                f"num_processes must be at most the GPUs per node"
            )
        torch.cuda.set_device(local)
        configure_cuda_numerics(config)
    else:
        # importlib, not `import deepspeed.comm.torch as m`: that name resolves to the `torch` package.
        comm_torch: Any = importlib.import_module("deepspeed.comm.torch")  # untyped: patch an attribute on it
        comm_torch.build_shm_op = lambda: None
    timeout = timedelta(seconds=config.ddp_timeout if config is not None else 1800)
    deepspeed.init_distributed(dist_backend="cpu:gloo,cuda:nccl" if on_gpu() else "gloo", timeout=timeout)


def end_distributed(*, completed: bool) -> None:
    """Destroy the process group before the interpreter exits. Left to finalisation, gloo's worker threads can
    still hold work whose tensors need the GIL while Python tears down, and the rank dies of SIGABRT
    ("terminate called without an active exception", pytorch/pytorch#190489) after its work is done; NCCL
    warns and can block a peer. After a ``completed`` command the ranks first meet in a barrier, so none
    tears its group down while rank 0 still writes the outputs over it (the teardown race CI met on the rank
    that left first). After a failure there is no barrier: a peer may be gone, and the group ends locally."""
    if not torch.distributed.is_initialized():
        return
    if completed and world_size() > 1:
        barrier()
    torch.distributed.destroy_process_group()


def configure_cuda_numerics(config) -> None:
    """TF32 matmuls (bf16/fp32 training on Ampere+ loses nothing that matters, gains up to 8x over fp32), and
    no cuDNN attention for SDPA unless the user picked an attention implementation: on torch 2.13 with H100/H200
    its backward gives NaN gradients with a padding mask (huggingface/trl#7181, pytorch#196678)."""
    tf32 = config is None or config.tf32 is not False  # TrainingArguments' tf32: false turns it off
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if config is None or config.attn_implementation is None:
        torch.backends.cuda.enable_cudnn_sdp(False)


def device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu() else torch.device("cpu")


def barrier() -> None:
    import deepspeed

    if deepspeed.comm.is_initialized() and world_size() > 1:
        deepspeed.comm.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (gloo and nccl alike)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def main_decides(decide: Callable[[], T]) -> T:
    """Rank 0's answer to ``decide()``, on every rank. Collective.

    For every choice made from the shared filesystem (is an artifact complete, which checkpoint to resume):
    on NFS, attribute caching can show one node a marker another does not see yet, and ranks that decide
    alone then part ways (some return, the rest hang in a collective; or ZeRO-3 partitions of a resume and of
    a fresh start get mixed)."""
    if world_size() == 1:
        return decide()
    return all_gather_objects(decide() if is_main_process() else None)[0]


def check_ranks_agree(config, *, what: Mapping[str, Any]) -> None:
    """Before any model work: every rank runs the same config (the node rank aside) on the same artifacts
    (``what``: fingerprints), and sees ``output_dir`` as rank 0 does (shared storage). One clear line naming the
    rank and the node otherwise, instead of a hang until the collective timeout. Collective."""
    if world_size() == 1:
        return
    token = f".rank0-{os.getpid()}-{time.time_ns()}"
    out = config.output_path
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / token).touch()
    token = all_gather_objects(token)[0]
    mine = {
        "host": socket.gethostname(),
        "rank": rank(),
        "sees_output": (out / token).exists(),
        "config": json.loads(config.model_copy(update={"node_rank": 0}).to_json()),
        "what": dict(what),
    }
    everyone = all_gather_objects(mine)
    barrier()
    if is_main_process():
        (out / token).unlink(missing_ok=True)
    main = everyone[0]
    for other in everyone[1:]:
        where = f"rank {other['rank']} on {other['host']}"
        if not other["sees_output"]:
            raise ConfigError(
                f"{where} does not see output_dir {out} as rank 0 on {main['host']} does: output_dir "
                f"must be on storage shared by every node"
            )
        diff = sorted(
            k for k in set(main["config"]) | set(other["config"]) if main["config"].get(k) != other["config"].get(k)
        )
        if diff:
            raise ConfigError(
                f"{where} runs another config than rank 0 on {main['host']}: "
                + "; ".join(
                    f"{k}={other['config'].get(k)!r} there, {main['config'].get(k)!r} on rank 0" for k in diff[:4]
                )
            )
        diff = sorted(k for k in main["what"] if main["what"][k] != other["what"].get(k))
        if diff:
            raise ConfigError(
                f"{where} sees other artifacts than rank 0 on {main['host']} ({', '.join(diff)} "
                f"differ): every node must read the same output_dir, dataset and model"
            )


if __name__ == "__main__":
    # The driver's device probe (pipeline.launch.node_gpus): the GPUs this node gives a job, or the refusal.
    import sys

    try:
        use_device(sys.argv[1])
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    print(gpu_count())
