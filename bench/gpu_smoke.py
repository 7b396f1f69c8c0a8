"""GPU smoke run: multi-rank bf16 DPO training, a reference pass and 2-window TR-DPO, all finite, with tokens/s
and model FLOP utilisation (issue 12).

    .venv/bin/python bench/gpu_smoke.py                    # 2 GPUs: nccl, bf16, 134M Llama, 20 steps (a few minutes)
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_smoke.py --device cpu --steps 6    # the same on CPU: gloo, fp32

What it runs, in ``--work`` (default: a new temporary directory; its ``outputs/`` is cleared first, so every run
measures fresh artifacts rather than finding them complete):

1. a random-init Llama built here (``bench_train.build_model``: our BPE tokenizer, SmolLM-135M's shape for
   ``--model-size 134m``, the default on CUDA; the 2-layer ``tiny`` shape, the default on CPU). No download.
2. ``smoke.yaml``: the shipped data ``data/preference``, plain DPO for ``--steps`` steps, ZeRO-``--zero``,
   ``num_processes`` = ``--ranks``, ``device`` = ``--device``, bf16 on CUDA and fp32 on CPU (this CPU has no bf16
   arithmetic: emulated bf16 runs ~10x slower, docs/benchmarks.md, "Training"); ``smoke-trdpo.yaml``: the same
   with ``sync_ref_model: true`` and ``ref_model_sync_steps`` = steps / 2, i.e. TR-DPO in 2 windows.
3. through the real CLI (``python -m pipeline.cli``, the ``dpo-pipeline`` entry point), one subprocess per stage
   (``reference`` and ``train`` relaunch themselves under torchrun with ``--ranks`` ranks): ``tokenize``,
   ``reference`` and ``train`` of ``smoke.yaml``, then ``train`` of ``smoke-trdpo.yaml`` (one job: the eval
   reference pass, per window a reference pass and training, one out-of-core mix between the windows). Logs:
   ``<work>/logs/<stage>.log``.

Checks, read from the artifacts (run dirs located with the library's own ``train_dir_for`` /
``reference_dir_for``, i.e. by the configs' fingerprints): every number of every ``metrics.jsonl`` line finite,
one train line per step, each with a ``grad_norm``; every reference log-prob of every Parquet shard finite
(manifest hashes verified); every number of ``summary.json`` finite, and 2 reference versions with one reference
forward per consumed example in the TR-DPO summary. Exit 0 when all hold, 1 when a stage fails or a check does
not hold, 2 (one line) when the device is missing (``--device cuda`` with fewer GPUs than ``--ranks``, or
without bf16). The table is printed at the end and written with everything else to ``<work>/smoke.json``.

Figures:

* tokens/s, training: the median over steps after the first (warm-up) of ``metrics.jsonl``'s
  ``tokens_per_second``: real tokens (prompt + completion of the chosen and the rejected sequence, padding
  excluded) of all ranks per wall second of the step. Reference pass: the manifest's ``counts.tokens_per_s``
  (all ranks, the pass's model work and shard writes, model loading excluded); for TR-DPO the mean over windows.
* MFU = k * N * tokens/s / (ranks * peak), k = 6 for training (forward and backward, Kaplan et al. 2020) and 2
  for the forward-only reference pass; N = non-embedding parameters (all but the token embedding and the LM
  head matrices). 6N leaves out attention scores (4 L T h per token forward: ~2% for 134m at these ~50-token
  sequences) and the LM head (2 V h per completion token forward, ~13% more for 134m), so the MFU is a slight
  underestimate of the arithmetic done.
* peak per device: the dense (no sparsity) bf16 tensor peak of the GPU from :data:`PEAK_BF16_TFLOPS`, matched
  on ``torch.cuda.get_device_name()``, else a measured bf16 matmul (8192^3, best of 5 rounds); the measured figure is
  reported beside the table's either way. On CPU: the measured fp32 matmul of one process with the
  ``OMP_NUM_THREADS`` threads each rank gets (default 1 here), times the ranks (assumes ranks x threads <= cores).

Trade-offs: the stages run as the CLI runs them, so each of the 3 DeepSpeed jobs pays its start-up (imports,
process group, model load: the bulk of the wall time at 20 steps) and tokens/s measures the steps only. A 134M
model at batch 16 x ~50 tokens per rank is launch- and communication-bound on a large GPU, so its MFU is low by
nature; this is a smoke check that multi-rank bf16 runs stay finite and fast enough, not a throughput benchmark.
Final model weights are not scanned: a non-finite weight shows in the next step's loss, and the mixed reference
in the second window's reference log-probs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_reference
import bench_train

REPO_ROOT = bench_train.REPO_ROOT
# Dense bf16 tensor-core peak per device (TFLOP/s, no sparsity, vendor datasheets), first match wins: the more
# specific names come first ("H100 PCIe" before "H100"; \b keeps "A10" from matching "A100", "L40" from "L40S").
PEAK_BF16_TFLOPS = (
    (r"\bB200\b", 2250),
    (r"\bH200 NVL\b", 835),
    (r"\bG?H200\b", 989),
    (r"\bH100 NVL\b", 835),
    (r"\bH100 PCIe\b", 756),
    (r"\bH100\b|\bH800\b", 989),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bA100\b|\bA800\b", 312),
    (r"\bL40S\b", 362),
    (r"\bL40\b", 181),
    (r"\bL4\b", 121),
    (r"\bA10G?\b", 125),
    (r"\bRTX 4090\b", 165),
)


# ------------------------------------------------------------------------------------------------ device
def device_problem(device: str, ranks: int) -> str | None:
    """Why ``device`` cannot run ``ranks`` ranks here, or None."""
    import torch

    if device == "cpu":
        return None
    found = torch.cuda.device_count()
    if found < ranks:
        return f"--device cuda needs {ranks} GPUs for --ranks {ranks}, found {found} (use --device cpu to run on CPU)"
    if not torch.cuda.is_bf16_supported():
        return f"--device cuda runs in bf16, which {torch.cuda.get_device_name(0)} does not support"
    return None


def measured_peak(device: str) -> float:
    """FLOP/s of one device's best matmul: bf16 on CUDA, fp32 on CPU (one rank's threads)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return bench_reference.matmul_flops()
    n, repeats = 8192, 10
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.mm(a, b)  # cuBLAS heuristics and workspace
    seconds = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(a, b)
        stop.record()
        stop.synchronize()
        seconds.append(start.elapsed_time(stop) / 1000 / repeats)
    del a, b
    torch.cuda.empty_cache()  # this process keeps only its CUDA context (~0.5 GB on device 0) during the stages
    return 2 * n**3 / min(seconds)


def device_peak(device: str) -> dict:
    """Peak FLOP/s per device used for MFU, where it comes from, and the measured matmul beside it."""
    import torch

    measured = measured_peak(device)
    if device == "cpu":
        return {
            "name": f"cpu ({os.cpu_count()} cores)",
            "peak": measured,
            "measured": measured,
            "source": f"measured fp32 matmul, {os.environ['OMP_NUM_THREADS']} thread(s)",
        }
    name = torch.cuda.get_device_name(0)
    tflops = next((value for pattern, value in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)
    if tflops is None:
        return {"name": name, "peak": measured, "measured": measured, "source": "measured bf16 matmul (not in table)"}
    return {"name": name, "peak": tflops * 1e12, "measured": measured, "source": "datasheet dense bf16"}


# ------------------------------------------------------------------------------------------------ setup
def non_embedding_params(model_dir: Path) -> int:
    """Parameters of the model without its token embedding and LM head matrices (a tied pair counts once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return sum(p.numel() for p in model.parameters()) - sum(embeddings.values())


def write_configs(work: Path, model_dir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import yaml

    plain = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(REPO_ROOT / "data" / "preference"),
        "output_dir": str(work / "outputs"),
        # configs/default.yaml's lengths: the shipped pairs are short.
        "max_length": 96,
        "max_prompt_length": 48,
        "max_completion_length": 48,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "precompute_ref_batch_size": 64,
        # Large enough that the loss moves in 20 steps, small for a 134M model: instability would be a finding.
        "learning_rate": 1e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "max_steps": args.steps,
        "logging_steps": 1,
        "bf16": args.device == "cuda",
        "deepspeed": str(REPO_ROOT / "configs" / f"ds_zero{args.zero}.json"),
        "num_processes": args.ranks,
        "device": args.device,
        "sync_ref_model": False,
    }
    tr_dpo = {**plain, "sync_ref_model": True, "ref_model_sync_steps": args.steps // 2}
    paths = work / "smoke.yaml", work / "smoke-trdpo.yaml"
    for path, config in zip(paths, (plain, tr_dpo), strict=True):
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def run_cli(stage: str, config_path: Path, label: str, logs: Path) -> float:
    """``dpo-pipeline <stage> --config <config_path>`` as a subprocess; its wall seconds. Raises on failure."""
    log = logs / f"{label}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", stage, "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            cwd=REPO_ROOT,
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        # The launcher's own traceback buries the ranks' errors: quote those when there are any.
        lines = log.read_text().splitlines()
        errors = list(dict.fromkeys(line for line in lines if re.search(r"\w(Error|Exception)\b: |: error: ", line)))
        quoted = "\n".join(errors[-10:] or lines[-30:])
        raise StageFailed(
            f"{label}: `dpo-pipeline {stage}` exited {proc.returncode} after {seconds:.0f} s; from {log}:\n{quoted}"
        )
    print(f"  {label:<12s} ok  {seconds:6.1f} s", flush=True)
    return seconds


class StageFailed(Exception):
    pass


# ------------------------------------------------------------------------------------------------ checks
def non_finite(obj, where: str) -> list[str]:
    """Every non-finite float in a JSON value, by its path."""
    if isinstance(obj, dict):
        return [p for key, value in obj.items() for p in non_finite(value, f"{where}.{key}")]
    if isinstance(obj, list):
        return [p for i, value in enumerate(obj) for p in non_finite(value, f"{where}[{i}]")]
    return [f"{where} = {obj}"] if isinstance(obj, float) and not math.isfinite(obj) else []


def check_training(run_dir: Path, steps: int, problems: list[str]) -> list[dict]:
    """The train records of a finished run, after checking its manifest, metrics and summary."""
    from pipeline.artifacts import read_manifest
    from pipeline.metrics import METRICS_FILE, SUMMARY_FILE
    from pipeline.train import stage as train

    read_manifest(run_dir, kind=train.KIND)  # hashes of the final model, metrics and plots
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for i, record in enumerate(records, 1):
        problems += non_finite(record, f"{run_dir.name}/{METRICS_FILE}:{i}")
    steps_logged = [r for r in records if "loss" in r]
    if [r["step"] for r in steps_logged] != list(range(1, steps + 1)):
        problems.append(
            f"{run_dir.name}/{METRICS_FILE}: train lines for steps "
            f"{[r['step'] for r in steps_logged]}, expected 1..{steps}"
        )
    problems += [
        f"{run_dir.name}/{METRICS_FILE}: step {r['step']} has no grad_norm"
        for r in steps_logged
        if "grad_norm" not in r
    ]
    problems += non_finite(json.loads((run_dir / SUMMARY_FILE).read_text()), f"{run_dir.name}/{SUMMARY_FILE}")
    return steps_logged


def check_reference(ref_dir: Path, problems: list[str]) -> dict:
    """The manifest of a reference artifact, after checking its hashes and that every log-prob is finite."""
    import numpy as np

    from pipeline.artifacts import read_manifest, read_parquet
    from pipeline.reference import cache as reference

    manifest = read_manifest(ref_dir, kind=reference.KIND)
    for name in manifest["files"]:
        table = read_parquet(ref_dir / name, columns=list(reference.VALUE_COLUMNS))
        for column in reference.VALUE_COLUMNS:
            bad = int((~np.isfinite(table.column(column).to_numpy())).sum())
            if bad:
                problems.append(f"{ref_dir.parent.name}/{ref_dir.name}/{name}: {bad} non-finite {column}")
    return manifest


# ------------------------------------------------------------------------------------------------ figures
def figure(
    label: str, tokens_per_s: float, flops_per_token: float, ranks: int, peak: float, seconds: float | None
) -> dict:
    achieved = flops_per_token * tokens_per_s
    return {
        "stage": label,
        "wall_s": seconds,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s": achieved,
        "mfu": achieved / (ranks * peak),
    }


def median_tokens_per_s(records: list[dict]) -> float:
    return statistics.median(r["tokens_per_second"] for r in records[1:] or records)  # step 1 warms up


def print_table(result: dict) -> None:
    d, m = result["device"], result["model"]
    measured = f"; measured matmul {d['measured'] / 1e12:.4g}" if d["measured"] != d["peak"] else ""
    print(
        f"\ndevice {d['name']} x {result['ranks']} ranks ({result['backend']}, {result['dtype']}, "
        f"ZeRO-{result['zero']}); peak {d['peak'] / 1e12:.4g} TFLOP/s per device ({d['source']}{measured})"
    )
    print(
        f"model {m['size']}: {m['parameters'] / 1e6:.1f}M parameters, N = {m['non_embedding_parameters'] / 1e6:.2f}M "
        f"non-embedding; {result['steps']} steps, TR-DPO tau {result['steps'] // 2}"
    )
    print(f"\n| {'stage':<28s} | {'wall s':>7s} | {'tokens/s':>10s} | {'model TFLOP/s':>13s} | {'MFU':>7s} |")
    print(f"|{'-' * 30}|{'-' * 8}:|{'-' * 11}:|{'-' * 14}:|{'-' * 8}:|")
    for row in result["figures"]:
        wall = f"{row['wall_s']:.1f}" if row["wall_s"] is not None else ""
        print(
            f"| {row['stage']:<28s} | {wall:>7s} | {row['tokens_per_s']:>10.0f} | "
            f"{row['model_flops_per_s'] / 1e12:>13.4g} | {100 * row['mfu']:>6.2f}% |"
        )
    for name, value in result["losses"].items():
        print(f"{name}: loss {value[0]:.4f} at step 1 -> {value[1]:.4f} at step {result['steps']}")
    print(
        f"TR-DPO: {result['tr_dpo']['reference_versions']} reference versions, "
        f"{result['tr_dpo']['reference_forwards_per_example']} reference forwards per example"
    )
    print("all finite: " + ("yes" if not result["problems"] else f"NO, {len(result['problems'])} problem(s):"))
    for problem in result["problems"]:
        print(f"  {problem}")
    print(f"total {result['wall_s']:.0f} s; {result['work']}/smoke.json")


# ------------------------------------------------------------------------------------------------ main
def smoke(work: Path, args: argparse.Namespace, result: dict) -> None:
    """Build, run every stage, check and measure; fills ``result`` as it goes (so a failure keeps what ran)."""
    from pipeline.config import load_config
    from pipeline.metrics import SUMMARY_FILE
    from pipeline.plan import Plan
    from pipeline.train.windows import window_dir

    model_dir = work / f"model-{args.model_size}"
    shutil.rmtree(model_dir, ignore_errors=True)  # cheap to rebuild (seed 0) and never half-written
    parameters = bench_train.build_model(model_dir, args.model_size)
    n = non_embedding_params(model_dir)
    result["model"] = {"size": args.model_size, "parameters": parameters, "non_embedding_parameters": n}
    shutil.rmtree(work / "outputs", ignore_errors=True)
    plain_yaml, tr_dpo_yaml = write_configs(work, model_dir, args)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    print(f"stages ({args.ranks} ranks, logs in {logs}):", flush=True)
    seconds = result["stage_seconds"] = {}
    for stage, path, label in (
        ("tokenize", plain_yaml, "tokenize"),
        ("reference", plain_yaml, "reference"),
        ("train", plain_yaml, "train"),
        ("train", tr_dpo_yaml, "tr-dpo"),
    ):
        seconds[label] = run_cli(stage, path, label, logs)

    problems = result["problems"]
    plain, tr_dpo = load_config(plain_yaml), load_config(tr_dpo_yaml)
    ref_manifest = check_reference(Plan.of(plain).reference_dir, problems)
    check_reference(Plan.of(tr_dpo).reference_dir, problems)  # TR-DPO's eval split, against version 0
    tr_dpo_dir = Plan.of(tr_dpo).train_dir
    windows = [check_reference(window_dir(tr_dpo_dir, k), problems) for k in range(2)]
    plain_steps = check_training(Plan.of(plain).train_dir, args.steps, problems)
    tr_dpo_steps = check_training(tr_dpo_dir, args.steps, problems)
    summary = json.loads((tr_dpo_dir / SUMMARY_FILE).read_text())
    result["tr_dpo"] = {key: summary.get(key) for key in ("reference_versions", "reference_forwards_per_example")}
    if result["tr_dpo"] != {"reference_versions": 2, "reference_forwards_per_example": 1.0}:
        problems.append(f"TR-DPO summary: {result['tr_dpo']}, expected 2 versions and 1.0 forwards per example")

    peak = result["device"]["peak"]
    result["figures"] = [
        figure(
            "reference (train+eval)",
            ref_manifest["counts"]["tokens_per_s"],
            2 * n,
            args.ranks,
            peak,
            seconds["reference"],
        ),
        figure("train (DPO)", median_tokens_per_s(plain_steps), 6 * n, args.ranks, peak, seconds["train"]),
        figure(
            "TR-DPO window references",
            statistics.mean(w["counts"]["tokens_per_s"] for w in windows),
            2 * n,
            args.ranks,
            peak,
            None,
        ),
        figure(
            "TR-DPO train (2 windows)", median_tokens_per_s(tr_dpo_steps), 6 * n, args.ranks, peak, seconds["tr-dpo"]
        ),
    ]
    result["losses"] = {
        name: (steps[0]["loss"], steps[-1]["loss"]) for name, steps in (("DPO", plain_steps), ("TR-DPO", tr_dpo_steps))
    }


def main() -> int:
    from pipeline.errors import PipelineError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--ranks", type=int, default=2, help="processes per DeepSpeed job (one per GPU)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (even: TR-DPO in 2 windows)")
    parser.add_argument(
        "--model-size",
        choices=bench_train.PRESETS,
        default=None,
        help="bench_train preset (default: 134m on cuda, tiny on cpu)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=3, help="ZeRO stage of training")
    args = parser.parse_args()
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and >= 2 (TR-DPO runs 2 windows of steps / 2)")
    args.model_size = args.model_size or ("134m" if args.device == "cuda" else "tiny")
    problem = device_problem(args.device, args.ranks)
    if problem:
        print(f"gpu_smoke: {problem}", file=sys.stderr)
        return 2
    # Inherited by every stage job. OMP_NUM_THREADS: one knob for the ranks' intra-op threads and the CPU peak
    # they are compared with (1 is torchrun's own default). DS_ACCELERATOR: --device cpu means CPU even beside a GPU.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"

    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-smoke-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "work": str(work),
        "ranks": args.ranks,
        "steps": args.steps,
        "zero": args.zero,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "device": device_peak(args.device),
        "problems": [],
    }
    try:
        smoke(work, args, result)
    except (StageFailed, PipelineError) as exc:  # a stage exited non-zero, or an artifact is missing or corrupt
        result["failed"] = str(exc)
    result["wall_s"] = time.perf_counter() - start
    result["ok"] = "failed" not in result and not result["problems"]
    (work / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
    if "failed" in result:
        print(f"gpu_smoke: FAILED: {result['failed']}", file=sys.stderr)
        return 1
    print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
