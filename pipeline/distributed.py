"""DeepSpeed process setup and ``ds_config`` handling, shared by the reference pass and training.

* :func:`init_distributed` makes one code path serve 1 process without a launcher, N processes under
  ``torchrun`` / the ``deepspeed`` launcher, CPU (gloo) and GPU (nccl). On CPU it disables DeepSpeed's
  shared-memory comm op: it JIT-compiles for ~40 s and its fp32 all-reduce segfaults on AVX2-only machines.
* :func:`resolve_ds_config` reads any standard ``ds_config.json`` and fills every ``"auto"`` value from our
  config (as the HF Trainer integration does); a value set explicitly that disagrees with ours is an error.
  The size-dependent ZeRO buckets take the HF Trainer's values from the model's hidden size, so the ZeRO-3
  config of the transformers docs carries over unchanged.
"""

from __future__ import annotations

import copy
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
from pipeline.models import resolve_model_dir

T = TypeVar("T")

NO_LAUNCHER = "DPO_PIPELINE_NO_LAUNCHER"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# DeepSpeed's multi-node runner forwards only some variables to the other nodes (NCCL*, PYTHON*, ...); these
# must reach every rank too, so the launcher docs tell users to put them into .deepspeed_env.
NODE_ENVIRONMENT = ("HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "DS_ACCELERATOR", "OMP_NUM_THREADS", "CUDA_HOME")

_device_choice = "auto"  # the config's `device`, set by init_distributed / use_device


def use_device(choice: str) -> None:
    """Pin where this process runs (the config's ``device``): auto, cuda or cpu. Refuses cuda without a GPU."""
    global _device_choice
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: cuda, but CUDA is not usable on {socket.gethostname()} ({_cuda_diagnosis()}); "
                          f"fix the GPU setup or set device: cpu")
    if choice == "auto" and not torch.cuda.is_available() and _gpu_hardware_present():
        raise ConfigError(f"device: auto found GPU device files on {socket.gethostname()} but CUDA is not usable "
                          f"({_cuda_diagnosis()}); a GPU job must not fall back to CPU silently: fix the GPU "
                          f"setup, or set device: cpu to run on CPU")
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
                raise ConfigError(f"launcher environment on {socket.gethostname()}: RANK={os.environ['RANK']} and "
                                  f"WORLD_SIZE={os.environ['WORLD_SIZE']} are set but LOCAL_RANK is not; start "
                                  f"the job with torchrun, the deepspeed launcher, srun or mpirun")
            os.environ["LOCAL_RANK"] = os.environ["RANK"]  # rank 0 of 1: its own local rank
        return
    if present and NO_LAUNCHER not in os.environ:
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in present]
        raise ConfigError(f"launcher environment on {socket.gethostname()}: {', '.join(present)} set but "
                          f"{', '.join(missing)} not; set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                          f"MASTER_PORT, or start the job with torchrun, the deepspeed launcher, srun or mpirun")
    mapped = scheduler_rank_environment(os.environ)
    if mapped:
        os.environ.update(mapped)
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()), **{NO_LAUNCHER: "1"})


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
        return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": tasks,
                "LOCAL_WORLD_SIZE": env.get("SLURM_STEP_TASKS_PER_NODE", tasks).split("(")[0].split(",")[0],
                "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
                "MASTER_PORT": env.get("MASTER_PORT") or str(port)}
    if "OMPI_COMM_WORLD_RANK" in env:
        size, local_size = env["OMPI_COMM_WORLD_SIZE"], env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
        if "MASTER_ADDR" not in env and size != local_size:
            raise ConfigError("mpirun across nodes: export the first rank's host as MASTER_ADDR "
                              "(mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port> ...)")
        return {"RANK": env["OMPI_COMM_WORLD_RANK"], "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                "WORLD_SIZE": size, "LOCAL_WORLD_SIZE": local_size,
                "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": env.get("MASTER_PORT", "29500")}
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
        NO_LAUNCHER not in os.environ)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            raise ConfigError(f"rank {rank()} on {socket.gethostname()}: LOCAL_RANK {local} but only {visible} "
                              f"GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); "
                              f"num_processes must be at most the GPUs per node")
        torch.cuda.set_device(local)
        configure_cuda_numerics(config)
    else:
        # importlib, not `import deepspeed.comm.torch as m`: that name resolves to the `torch` package.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    timeout = timedelta(seconds=config.ddp_timeout if config is not None else 1800)
    deepspeed.init_distributed(dist_backend="cpu:gloo,cuda:nccl" if on_gpu() else "gloo", timeout=timeout)


def configure_cuda_numerics(config) -> None:
    """TF32 matmuls (bf16/fp32 training on Ampere+ loses nothing that matters, gains up to 8x over fp32), and
    no cuDNN attention for SDPA unless the user picked an attention implementation: on torch 2.13 with H100/H200
    its backward gives NaN gradients with a padding mask (huggingface/trl#7181, pytorch#196678)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if config is None or config.attn_implementation is None:
        torch.backends.cuda.enable_cudnn_sdp(False)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


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
    mine = {"host": socket.gethostname(), "rank": rank(), "sees_output": (out / token).exists(),
            "config": json.loads(config.model_copy(update={"node_rank": 0}).to_json()), "what": dict(what)}
    everyone = all_gather_objects(mine)
    barrier()
    if is_main_process():
        (out / token).unlink(missing_ok=True)
    main = everyone[0]
    for other in everyone[1:]:
        where = f"rank {other['rank']} on {other['host']}"
        if not other["sees_output"]:
            raise ConfigError(f"{where} does not see output_dir {out} as rank 0 on {main['host']} does: output_dir "
                              f"must be on storage shared by every node")
        diff = sorted(k for k in set(main["config"]) | set(other["config"])
                      if main["config"].get(k) != other["config"].get(k))
        if diff:
            raise ConfigError(f"{where} runs another config than rank 0 on {main['host']}: "
                              + "; ".join(f"{k}={other['config'].get(k)!r} there, {main['config'].get(k)!r} on rank 0"
                                          for k in diff[:4]))
        diff = sorted(k for k in main["what"] if main["what"][k] != other["what"].get(k))
        if diff:
            raise ConfigError(f"{where} sees other artifacts than rank 0 on {main['host']} ({', '.join(diff)} "
                              f"differ): every node must read the same output_dir, dataset and model")


# ------------------------------------------------------------------------------------------------ ds_config
def load_ds_config(path: str | Path | None) -> dict[str, Any]:
    """The user's ds_config (any standard DeepSpeed JSON), or ZeRO stage 0 when none is given."""
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed: ds_config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {exc}") from None


def _fill(ds: dict, dotted: str, value: Any, source: str, *, required: bool = True) -> None:
    """Set ``ds[dotted]`` to ``value`` when missing (if ``required``) or ``"auto"``; refuse a conflict."""
    *parents, leaf = dotted.split(".")
    node = ds
    for key in parents:
        if key not in node:
            if not required:
                return
            node[key] = {}
        node = node[key]
    current = node.get(leaf, "auto" if required else None)
    if current is None:
        return
    if current == "auto":
        node[leaf] = value
    elif current != value and not (isinstance(value, float) and abs(current - value) <= 1e-12 * abs(value)):
        raise ConfigError(f"deepspeed: ds_config sets {dotted}={current!r} but the config's {source} gives "
                          f"{value!r}; set it to \"auto\" or make them agree")


# zero_optimization keys the HF Trainer fills from the hidden size h when "auto".
BUCKET_SIZE_RULES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def resolve_ds_config(config, *, world: int, inference: bool = False) -> dict[str, Any]:
    """Fill ``"auto"`` values from ``config`` and check the explicit ones agree with it.

    Training: micro batch, gradient accumulation, global batch, clipping, bf16, ZeRO bucket sizes, and the
    optimizer's lr/betas/eps/weight_decay when the ds_config names an optimizer (else the recipe passes torch
    AdamW).
    Inference (the reference pass): batch size = ``precompute_ref_batch_size`` and no optimizer."""
    ds = copy.deepcopy(load_ds_config(config.resolve_path(config.deepspeed)))
    if ds.get("fp16", {}).get("enabled") in (True, "auto") and not on_gpu():
        if ds["fp16"]["enabled"] is True:
            raise ConfigError("deepspeed: fp16 is not supported on CPU; use bf16 or fp32")
        ds["fp16"]["enabled"] = False
    _fill(ds, "bf16.enabled", bool(config.bf16), "bf16")
    _fill_bucket_sizes(ds, config)
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        # On GPUs the gradient reduce-scatter runs on its own stream beside the backward (5-10 % of a ZeRO-2/3
        # step on one node, more across nodes); on CPU there are no streams to overlap on.
        zero["overlap_comm"] = on_gpu()
    if inference:
        micro = config.precompute_ref_batch_size or config.per_device_eval_batch_size
        # DeepSpeed requires a batch size even for inference; the training-only sections are dropped.
        for key in ("optimizer", "scheduler", "gradient_accumulation_steps", "train_batch_size"):
            ds.pop(key, None)
        ds["train_micro_batch_size_per_gpu"] = micro
        ds["gradient_accumulation_steps"] = 1
        return ds
    micro, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", micro * accum * world,
          "per_device_train_batch_size x gradient_accumulation_steps x num_processes")
    _fill(ds, "gradient_clipping", config.max_grad_norm, "max_grad_norm")
    if "optimizer" in ds:
        _fill(ds, "optimizer.params.lr", config.learning_rate, "learning_rate")
        _fill(ds, "optimizer.params.betas", [config.adam_beta1, config.adam_beta2], "adam_beta1/adam_beta2")
        _fill(ds, "optimizer.params.eps", config.adam_epsilon, "adam_epsilon")
        _fill(ds, "optimizer.params.weight_decay", config.weight_decay, "weight_decay")
    if "scheduler" in ds:
        raise ConfigError("deepspeed: the ds_config 'scheduler' section is not used; set lr_scheduler_type, "
                          "warmup_ratio / warmup_steps in the pipeline config instead")
    # A client (torch) optimizer with ZeRO offload needs DeepSpeed's CPU-Adam check switched off.
    if "optimizer" not in ds and _offloads_optimizer(ds):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def _fill_bucket_sizes(ds: dict, config) -> None:
    """``"auto"`` ZeRO bucket sizes from the model's hidden size h, by the HF Trainer's rule: reduce bucket h^2,
    ZeRO-3 prefetch bucket 0.9 h^2, ZeRO-3 persistence threshold 10 h (parameters smaller than that stay
    gathered: norm scales and biases, not matrices). Fixed sizes tuned for 7B models would make a small model's
    buckets a third of the model."""
    zero = ds.get("zero_optimization", {})
    autos = [key for key in BUCKET_SIZE_RULES if zero.get(key) == "auto"]
    if not autos:
        return
    from transformers import AutoConfig

    model_dir = resolve_model_dir(config)
    model_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    hidden = getattr(model_config, "hidden_size", None) or max(getattr(model_config, "hidden_sizes", None) or [0])
    if not hidden:
        raise ConfigError(f"deepspeed: {', '.join(autos)} are \"auto\" but {model_dir}/config.json has no "
                          f"hidden_size to derive them from; set them to numbers in the ds_config")
    for key in autos:
        zero[key] = BUCKET_SIZE_RULES[key](hidden)


def _offloads_optimizer(ds: dict) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
