"""GPU smoke run: multi-rank bf16 DPO training, a reference pass, 2-window TR-DPO, LoRA, LoRA TR-DPO and QLoRA,
all finite, with tokens/s, TFLOP/s per device and model FLOP utilisation (issue 12).

    .venv/bin/python bench/gpu_smoke.py                    # 2 GPUs: nccl, bf16, 134M Llama, 20 steps (a few minutes)
    .venv/bin/python bench/gpu_smoke.py --ranks 1 --install-bnb        # 1 GPU; pip-installs bitsandbytes if missing
    .venv/bin/python bench/gpu_smoke.py --only lora,qlora              # a rerun of some stage groups only
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_smoke.py --device cpu --steps 6    # the same on CPU: gloo, fp32

What it runs, in ``--work`` (default: a new temporary directory; its ``outputs/`` is cleared first, so every run
measures fresh artifacts rather than finding them complete):

1. a random-init Llama built here (``bench_train.build_model``: our BPE tokenizer, SmolLM-135M's shape for
   ``--model-size 134m``, the default on CUDA; the 2-layer ``tiny`` shape, the default on CPU). No download.
2. the configs, in ``<work>``: ``smoke.yaml``: the shipped data ``data/preference``, plain DPO for ``--steps``
   steps, ZeRO-``--zero``, ``num_processes`` = ``--ranks``, ``device`` = ``--device``, bf16 on CUDA and fp32 on
   CPU (this CPU has no bf16 arithmetic: emulated bf16 runs ~10x slower, docs/benchmarks.md, "Training");
   ``smoke-trdpo.yaml``: the same with ``sync_ref_model: true`` and ``ref_model_sync_steps`` = steps / 2, i.e.
   TR-DPO in 2 windows; ``smoke-lora.yaml``: the plain one with LoRA (``use_peft``, r 16, alpha 32, dropout 0,
   ``all-linear``, ``save_merged_model``); ``smoke-lora-trdpo.yaml``: LoRA with the TR-DPO settings;
   ``smoke-qlora.yaml``: LoRA on an nf4 base with nested quantisation (``load_in_4bit``), always under
   ``configs/ds_zero2.json`` (ZeRO-3 cannot partition bitsandbytes' weights: the config refuses it).
3. through the real CLI (``python -m pipeline.cli``, the ``dpo-pipeline`` entry point), one subprocess per stage
   (``reference`` and ``train`` relaunch themselves under torchrun with ``--ranks`` ranks), the stage groups of
   ``--only`` (default all), each with what it needs first:

   ==============  ===========================================================================================
   group           CLI stages (label in the logs)
   ==============  ===========================================================================================
   (every group)   ``tokenize`` of smoke.yaml (one tokenized artifact serves every config)
   dpo             ``reference`` (shared with lora), ``train`` of smoke.yaml (the default layout: packed rows,
                   the prompt shared under SDPA's block mask)
   padded          the dpo group's stages, then ``train`` of smoke-padded.yaml (``padding_free: false``): its
                   loss curve equals the packed one within 2e-2 in bf16 (1e-4 in fp32), its tokens/s beside it
   trdpo           ``train`` of smoke-trdpo.yaml (one job: the eval reference pass, per window a reference
                   pass and training, one in-place mix between the windows)
   lora            ``reference`` (the base model's: the plain run's artifact), ``train`` of smoke-lora.yaml
   lora-trdpo      ``train`` of smoke-lora-trdpo.yaml (one job, as trdpo)
   qlora           ``reference`` of smoke-qlora.yaml (the quantised base has its own reference artifact), then
                   its ``train``. CUDA only: skipped on ``--device cpu`` (the config refuses a 4-bit base
                   there), and skipped when ``import bitsandbytes`` fails, unless ``--install-bnb`` is given:
                   then ``pip install --no-deps bitsandbytes==0.50.2`` first (no deps: pip must not replace the
                   CUDA torch), skipped still if that fails (``<work>/logs/pip-bitsandbytes.log``).
   ==============  ===========================================================================================

   A failed stage fails the groups that need it and the rest go on, so one run on a rare GPU tells all it can;
   ``--only`` reruns what failed. Logs: ``<work>/logs/<label>.log``.

Checks, read from the artifacts (run dirs located with the library's own :class:`pipeline.plan.Plan`, i.e. by the
configs' fingerprints): every number of every ``metrics.jsonl`` line finite, one train line per step, each with a
``grad_norm`` and the throughput keys (``tokens_per_second``, ``tflops_per_device``, ``padding_fraction``; ``mfu``
when the run knew its peak), whose medians after step 1 agree with ``summary.json``'s ``throughput`` section;
every reference log-prob of every Parquet shard finite (manifest hashes verified); every number of
``summary.json`` finite. TR-DPO (plain and LoRA): 2 reference versions and one reference forward per consumed
example; LoRA TR-DPO also ``references/v1/adapter_model.safetensors``. LoRA: its reference artifact is the plain
run's (``Plan.reference_dir`` equal), step-1 loss ln 2 within 1e-3 (2e-3 in bf16: the adapters start at zero, so
the policy is the scored base), ``final_model/adapter_config.json`` and ``final_model_merged/model.safetensors``.
QLoRA: its own reference artifact, step-1 loss ln 2 within 5e-3 (4-bit kernels differ between the reference pass's
and training's batch shapes), ``final_model/adapter_config.json``. Exit 0 when all hold (skipped groups
included), 1 when a stage fails or a check does not hold, 2 (one line) when the device is missing (``--device
cuda`` with fewer GPUs than ``--ranks``, or without bf16). The table is printed at the end and written with
everything else to ``<work>/smoke.json``.

Figures, all from :mod:`pipeline.throughput` (one home for FLOPs and peaks; its docstring has the details):

* training rows: the medians over the steps after the first (warm-up) of ``metrics.jsonl``'s own
  ``tokens_per_second`` (real tokens, prompt + completion of the chosen and the rejected sequence, padding
  excluded, of all ranks per wall second of the step), ``tflops_per_device``, ``mfu`` and ``padding_fraction``,
  as the training job computed them: FLOPs per real token 6N + 12LAs for full training, 4N + 2N_lora + 12LAs
  with LoRA and QLoRA (frozen weights get no weight gradient; N_lora the adapters), where N = the weights of
  every matmul a token goes through (the adapters included, the lm_head included even when tied to the
  embedding, the embedding lookups not), L layers, A = query heads x head dim, s the token-weighted mean
  sequence length; attention (QK^T and AV) counted over the whole context (no causal halving); the lm_head
  counted on the logit tokens only (the completions: DPO needs no prompt logits); no gradient-checkpointing
  recompute (MFU, not HFU). MFU = those FLOPs / (seconds x ranks x per-device peak).
* reference rows: the manifest's ``counts.tokens_per_s`` (all ranks, the pass's model work and shard writes,
  model loading excluded); FLOPs per real token 2N + 4LAs (``ModelFlops.forward_flops_per_token`` of the model
  built on the meta device from its config, the lm_head on the completion tokens), s and the completion share
  from the lengths of the examples the artifact scored; TR-DPO's window references: all windows' tokens over
  all windows' seconds. Padding is not known there (the ranks' batches are not recorded): no padding figure.
* peak per device: :func:`pipeline.throughput.peak_flops`, the one the training jobs use. CUDA: the dense (no
  sparsity) bf16 datasheet figure matched on ``torch.cuda.get_device_name`` (``table_peak``), with a measured bf16
  matmul (8192^3, best of 5 rounds) printed beside it, and used in its place (the training rows' MFU then their
  TFLOP/s over it) when the table does not know the device. CPU: the measured fp32 matmul at
  ``OMP_NUM_THREADS`` threads (default 1 here): this process's for the reference rows, each training job's own
  (its ranks measuring together, after a barrier) for its rows; both printed.

Trade-offs: the stages run as the CLI runs them, so each DeepSpeed job (7 for every group on CUDA) pays its
start-up (imports, process group, model load: the bulk of the wall time at 20 steps) and tokens/s measures the
steps only. A 134M model at batch 16 x ~50 tokens per rank is launch- and communication-bound on a large GPU, so
its MFU is low by nature; this is a smoke check that multi-rank bf16 runs stay finite and fast enough, not a
throughput benchmark. Final model weights are not scanned: a non-finite weight shows in the next step's loss,
and the mixed reference in the second window's reference log-probs.
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
import traceback
from pathlib import Path

import bench_train

REPO_ROOT = bench_train.REPO_ROOT
sys.path.insert(0, str(REPO_ROOT))  # `pipeline` without an editable install, as `python -m pipeline.cli` has it

GROUPS = ("dpo", "padded", "trdpo", "lora", "lora-trdpo", "qlora")
LORA = {
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,  # loss curves that agree across rank counts
    "lora_target_modules": "all-linear",
    "save_merged_model": True,
}
QLORA = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True}
BNB_PIN = "bitsandbytes==0.50.2"
# (label, CLI stage, config, the groups that need it), in the order they run.
STAGES = (
    ("tokenize", "tokenize", "plain", GROUPS),
    ("reference", "reference", "plain", ("dpo", "padded", "lora")),
    ("train", "train", "plain", ("dpo", "padded")),
    ("train-padded", "train", "padded", ("padded",)),
    ("tr-dpo", "train", "trdpo", ("trdpo",)),
    ("lora", "train", "lora", ("lora",)),
    ("lora-tr-dpo", "train", "lora-trdpo", ("lora-trdpo",)),
    ("qlora-reference", "reference", "qlora", ("qlora",)),
    ("qlora", "train", "qlora", ("qlora",)),
)
# The table's rows of each group (reference: the shared reference stage's), for a group that did not run.
ROWS = {
    "reference": ("reference (train+eval)",),
    "dpo": ("train (DPO)",),
    "padded": ("train (DPO, padded rows)",),
    "trdpo": ("TR-DPO window references", "TR-DPO train (2 windows)"),
    "lora": ("train (LoRA)",),
    "lora-trdpo": ("TR-DPO window references (LoRA)", "TR-DPO train (LoRA)"),
    "qlora": ("reference (QLoRA base)", "train (QLoRA)"),
}
CONFIG_OF = {"dpo": "plain"}  # a group's config key in write_configs (the others: the group's name)
# A group's training stage (else its name).
TRAIN_LABEL = {"dpo": "train", "padded": "train-padded", "trdpo": "tr-dpo", "lora-trdpo": "lora-tr-dpo"}
THROUGHPUT_KEYS = ("tokens_per_second", "tokens_per_second_per_device", "tflops_per_device", "padding_fraction")


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


def measured_cuda_peak() -> float:
    """FLOP/s of device 0's best bf16 matmul (8192^3, best of 5 rounds of 10): what the table's figure is worth
    on this machine's clocks and cuBLAS."""
    import torch

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
        seconds.append(start.elapsed_time(stop) / 1000 / repeats)  # elapsed_time is in milliseconds
    del a, b
    torch.cuda.empty_cache()  # this process keeps only its CUDA context (~0.5 GB on device 0) during the stages
    return 2 * n**3 / min(seconds)


def device_peak(device: str) -> dict:
    """Peak FLOP/s per device for the reference rows' MFU (:func:`pipeline.throughput.peak_flops`, as the
    training jobs take theirs), where it comes from, and on CUDA a measured matmul beside it."""
    import torch

    from pipeline.throughput import peak_flops

    if device == "cpu":
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # one rank's threads
        peak, source = peak_flops(torch.device("cpu"), torch.float32)
        return {"name": f"cpu ({os.cpu_count()} cores)", "peak": peak, "source": source, "measured": None}
    name = torch.cuda.get_device_name(0)
    table, source = peak_flops(torch.device("cuda", 0), torch.bfloat16)
    measured = measured_cuda_peak()
    if table is None:  # unknown to the table (or a MIG slice): the matmul is the best figure there is
        return {"name": name, "peak": measured, "source": f"measured bf16 matmul ({source})", "measured": measured}
    return {"name": name, "peak": table, "source": source, "measured": measured}


def bitsandbytes_missing(args: argparse.Namespace, logs: Path) -> str | None:
    """Why the qlora group is skipped here, or None when it can run."""

    def importable() -> bool:  # in a child: a broken install fails there, and nothing is cached here
        return subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True).returncode == 0

    if args.device == "cpu":
        return "skipped (CPU)"
    if importable():
        return None
    if not args.install_bnb:
        return "skipped (bitsandbytes not installed)"
    log = logs / "pip-bitsandbytes.log"
    print(f"  pip install {BNB_PIN} (log: {log})", flush=True)
    code: int | str
    with open(log, "w") as out:
        try:
            code = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--retries", "1", "--timeout", "30", BNB_PIN],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timed out after 300 s"
    if code != 0 or not importable():
        how = f"exit {code}" if isinstance(code, int) else code
        return f"skipped (pip install {BNB_PIN} failed, {how}: see logs/{log.name})"
    return None


# ------------------------------------------------------------------------------------------------ setup
def model_flops(model_dir: Path):
    """:class:`pipeline.throughput.ModelFlops` of the model, built on the meta device from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.throughput import ModelFlops

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return ModelFlops.of(model)


def write_configs(work: Path, model_dir: Path, args: argparse.Namespace) -> dict[str, Path]:
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
    tr_dpo = {"sync_ref_model": True, "ref_model_sync_steps": args.steps // 2}
    lora = {**plain, **LORA}
    configs = {
        "plain": plain,
        # The old layout beside the default (packed rows, the prompt shared under SDPA's block mask).
        "padded": {**plain, "padding_free": False},
        "trdpo": {**plain, **tr_dpo},
        "lora": lora,
        "lora-trdpo": {**lora, **tr_dpo},
        # ZeRO-3 cannot partition 4-bit weights (the config refuses it): ZeRO-2 whatever --zero says.
        "qlora": {**lora, **QLORA, "deepspeed": str(REPO_ROOT / "configs" / "ds_zero2.json")},
    }
    names = {"plain": "smoke", "trdpo": "smoke-trdpo"}
    paths = {key: work / f"{names.get(key, f'smoke-{key}')}.yaml" for key in configs}
    for key, config in configs.items():
        paths[key].write_text(yaml.safe_dump(config, sort_keys=False))
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
    print(f"  {label:<16s} ok  {seconds:6.1f} s", flush=True)
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


def check_training(run_dir: Path, steps: int, problems: list[str]) -> tuple[list[dict], dict]:
    """The train records and the summary of a finished run, after checking its manifest, metrics and summary."""
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
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    problems += non_finite(summary, f"{run_dir.name}/{SUMMARY_FILE}")
    peak_known = bool(summary.get("throughput", {}).get("peak_flops_per_device"))
    for r in steps_logged:
        missing = [k for k in ("grad_norm", *THROUGHPUT_KEYS, *(("mfu",) if peak_known else ())) if k not in r]
        if missing:
            problems.append(f"{run_dir.name}/{METRICS_FILE}: step {r['step']} has no {', '.join(missing)}")
    return steps_logged, summary


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


def check_loss_near_ln2(records: list[dict], tolerance: float, what: str, problems: list[str]) -> None:
    """Step 1's loss is ln 2: the policy starts as the reference (adapters at zero), and the loss is its mean."""
    if records and abs(records[0]["loss"] - math.log(2)) > tolerance:
        problems.append(
            f"{what}: step-1 loss {records[0]['loss']:.5f}, expected ln 2 = {math.log(2):.5f} within {tolerance}"
        )


def check_files(run_dir: Path, names: tuple[str, ...], problems: list[str]) -> None:
    """Each of ``names`` (paths relative to ``run_dir``) is a file."""
    problems += [f"{run_dir.name}/{name}: missing" for name in names if not (run_dir / name).is_file()]


def check_tr_dpo(summary: dict, what: str, problems: list[str]) -> dict:
    found = {key: summary.get(key) for key in ("reference_versions", "reference_forwards_per_example")}
    if found != {"reference_versions": 2, "reference_forwards_per_example": 1.0}:
        problems.append(f"{what} summary: {found}, expected 2 versions and 1.0 forwards per example")
    return found


# ------------------------------------------------------------------------------------------------ figures
def training_row(label: str, records: list[dict], summary: dict, peak: dict, wall: float, problems: list) -> dict:
    """A training run's figures: the medians of its records' own throughput after step 1 (its warm-up), which
    summary.json's throughput section must repeat."""
    timed = records[1:] or records
    medians = {
        key: statistics.median(r[key] for r in timed)
        for key in (*THROUGHPUT_KEYS, "mfu")
        if timed and all(key in r for r in timed)
    }
    reported = summary.get("throughput", {})
    for key, value in medians.items():
        if not math.isclose(value, reported.get(key, math.nan), rel_tol=1e-9):
            problems.append(f"{label}: median {key} of the steps {value:.6g}, summary.json says {reported.get(key)}")
    mfu, against = medians.get("mfu"), (reported.get("peak_flops_per_device"), reported.get("peak_source"))
    if mfu is None and "tflops_per_device" in medians and peak["peak"]:  # the job's peak unknown: ours
        mfu, against = medians["tflops_per_device"] * 1e12 / peak["peak"], (peak["peak"], peak["source"])
    return {
        "stage": label,
        "wall_s": wall,
        "tokens_per_s": medians.get("tokens_per_second"),
        "tflops_per_device": medians.get("tflops_per_device"),
        "mfu": mfu,
        "padding_fraction": medians.get("padding_fraction"),
        "peak": against[0] if mfu is not None else None,
        "peak_source": against[1],
    }


def scored_lengths(manifests: list[tuple[Path, dict]], tokenized_dir: Path) -> dict[str, float]:
    """Real tokens, the sum of squared sequence lengths and the completion (logit) tokens of the examples that
    reference artifacts scored: their shards' ids joined with the tokenized lengths (pipeline.throughput's
    ``batch_counts`` of every scored sequence, the prompt counted in both)."""
    import numpy as np

    from pipeline.artifacts import read_parquet
    from pipeline.tokenize.artifact import load_tokenized

    totals = {"tokens": 0.0, "squared_lengths": 0.0, "logit_tokens": 0.0}
    tables: dict = {}
    for ref_dir, manifest in manifests:
        for split, names in manifest["shards"].items():
            if split not in tables:
                tables[split] = load_tokenized(tokenized_dir, split)
            table = tables[split]
            ids = np.concatenate(
                [read_parquet(ref_dir / name, columns=["example_id"]).column(0).to_numpy() for name in names]
            )
            rows = np.searchsorted(table.column("example_id").to_numpy(), ids)
            prompt, chosen, rejected = (
                table.column(f"{part}_length").to_numpy()[rows].astype(np.float64)
                for part in ("prompt", "chosen", "rejected")
            )
            lengths = np.concatenate([prompt + chosen, prompt + rejected])
            totals["tokens"] += float(lengths.sum())
            totals["squared_lengths"] += float((lengths * lengths).sum())
            totals["logit_tokens"] += float(chosen.sum() + rejected.sum())
    return totals


def reference_row(
    label: str,
    manifests: list[tuple[Path, dict]],
    tokenized_dir: Path,
    flops,
    peak: dict,
    wall: float | None,
    problems: list[str],
) -> dict:
    """Reference artifacts' figures: all their tokens over all their seconds, FLOPs through
    :class:`pipeline.throughput.StepThroughput` as a forward-only step."""
    from pipeline.throughput import StepThroughput

    lengths = scored_lengths(manifests, tokenized_dir)
    tokens = sum(m["counts"]["tokens"] for _, m in manifests)
    if tokens != lengths["tokens"]:
        problems.append(
            f"{label}: the manifests count {tokens} tokens, the scored examples' lengths {lengths['tokens']}"
        )
    seconds = sum(m["counts"]["seconds"] for _, m in manifests)
    ranks = manifests[0][1].get("world_size", 1)
    figures = StepThroughput(flops, peak["peak"], ranks, forward_only=True).metrics(
        tokens=tokens,
        padded_positions=tokens,  # unknown (not recorded): the padding figure is dropped below
        seconds=seconds,
        seq_len=lengths["squared_lengths"] / lengths["tokens"],
        logit_tokens=lengths["logit_tokens"],
    )
    return {
        "stage": label,
        "wall_s": wall,
        "tokens_per_s": figures["tokens_per_second"],
        "tflops_per_device": figures["tflops_per_device"],
        "mfu": figures.get("mfu"),
        "padding_fraction": None,
        "peak": peak["peak"],
        "peak_source": peak["source"],
    }


def print_table(result: dict) -> None:
    d, m = result["device"], result.get("model")
    measured = (
        f"; measured bf16 matmul {d['measured'] / 1e12:.4g} vs table {d['peak'] / 1e12:.4g}"
        if d["measured"] and d["measured"] != d["peak"]
        else ""
    )
    print(
        f"\ndevice {d['name']} x {result['ranks']} ranks ({result['backend']}, {result['dtype']}, "
        f"ZeRO-{result['zero']}; QLoRA ZeRO-2); peak {d['peak'] / 1e12:.4g} TFLOP/s per device "
        f"({d['source']}{measured})"
    )
    if m:
        print(
            f"model {m['size']}: {m['parameters'] / 1e6:.1f}M parameters, N = {m['matmul_parameters'] / 1e6:.2f}M in "
            f"matmuls (lm_head included), L = {m['layers']}, A = {m['attention_width']}; {result['steps']} steps, "
            f"TR-DPO tau {result['steps'] // 2}"
        )
    print(
        f"\n| {'stage':<31s} | {'wall s':>7s} | {'tokens/s':>10s} | {'TFLOP/s/dev':>11s} | {'MFU':>7s} | "
        f"{'padding':>7s} |"
    )
    print(f"|{'-' * 33}|{'-' * 8}:|{'-' * 11}:|{'-' * 12}:|{'-' * 8}:|{'-' * 8}:|")

    def cell(value, fmt: str) -> str:
        return format(value, fmt) if value is not None else ""

    def percent(value, fmt: str) -> str:
        return f"{100 * value:{fmt}}%" if value is not None else ""

    for row in result["figures"]:
        if "note" in row:
            print(f"| {row['stage']:<31s} | {row['note']} | | | | |")
            continue
        print(
            f"| {row['stage']:<31s} | {cell(row['wall_s'], '.1f'):>7s} | {cell(row['tokens_per_s'], '.0f'):>10s} | "
            f"{cell(row['tflops_per_device'], '.4g'):>11s} | {percent(row['mfu'], '.3g'):>7s} | "
            f"{percent(row['padding_fraction'], '.1f'):>7s} |"
        )
    peaks: dict = {}  # (peak, source) -> the rows measured against it (each training job measures its own)
    for row in result["figures"]:
        if row.get("peak"):
            peaks.setdefault((row["peak"], row["peak_source"]), []).append(row["stage"])
    for (value, source), stages in peaks.items():
        print(f"MFU of {', '.join(stages)}: against {value / 1e12:.4g} TFLOP/s per device ({source})")
    for name, (first, last) in result["losses"].items():
        print(f"{name}: loss {first:.4f} at step 1 -> {last:.4f} at step {result['steps']}")
    for name, found in result["tr_dpo"].items():
        print(
            f"{name}: {found['reference_versions']} reference versions, "
            f"{found['reference_forwards_per_example']} reference forwards per example"
        )
    for group, status in result["groups"].items():
        print(f"{group}: {status}")
    failed = f"; failed: {', '.join(result['failed'])}" if result["failed"] else ""
    verdict = "yes" if not result["problems"] and not failed else f"NO, {len(result['problems'])} problem(s){failed}"
    print(f"all checks hold: {verdict}")
    for problem in result["problems"]:
        print(f"  {problem}")
    print(f"total {result['wall_s']:.0f} s; {result['work']}/smoke.json")


# ------------------------------------------------------------------------------------------------ main
def check_group(group: str, ctx: dict, problems: list[str]) -> list[dict]:
    """Check one group's artifacts and measure them; its rows of the table."""
    from pipeline.train.lora import MERGED_MODEL
    from pipeline.train.stage import FINAL_MODEL
    from pipeline.train.tr_dpo import AdapterReferenceSlices
    from pipeline.train.windows import version_dir, window_dir

    args, plan_of, seconds, peak, result = ctx["args"], ctx["plan"], ctx["seconds"], ctx["peak"], ctx["result"]
    plan = plan_of(CONFIG_OF.get(group, group))
    bf16 = args.device == "cuda"
    adapter = (f"{FINAL_MODEL}/adapter_config.json",)
    rows = []
    if group == "qlora":
        ref_dir = plan.reference_dir
        if ref_dir == plan_of("plain").reference_dir:
            problems.append(f"QLoRA: its reference artifact is the unquantised base's ({ref_dir})")
        manifest = check_reference(ref_dir, problems)
        rows.append(
            reference_row(
                ROWS["qlora"][0],
                [(ref_dir, manifest)],
                plan.tokenized_dir,
                ctx["flops"],
                peak,
                seconds["qlora-reference"],
                problems,
            )
        )
    if group in ("trdpo", "lora-trdpo"):
        check_reference(plan.reference_dir, problems)  # the eval split, against version 0
        windows = [(path, check_reference(path, problems)) for path in (window_dir(plan.train_dir, k) for k in (0, 1))]
        rows.append(reference_row(ROWS[group][0], windows, plan.tokenized_dir, ctx["flops"], peak, None, problems))
    records, summary = check_training(plan.train_dir, args.steps, problems)
    rows.append(training_row(ROWS[group][-1], records, summary, peak, seconds[TRAIN_LABEL.get(group, group)], problems))
    name = {
        "dpo": "DPO",
        "padded": "DPO (padded)",
        "trdpo": "TR-DPO",
        "lora": "LoRA",
        "lora-trdpo": "TR-DPO (LoRA)",
        "qlora": "QLoRA",
    }[group]
    if records:
        result["losses"][name] = (records[0]["loss"], records[-1]["loss"])
    if group in ("trdpo", "lora-trdpo"):
        result["tr_dpo"][name] = check_tr_dpo(summary, name, problems)
    if group == "lora":
        base = plan_of("plain").reference_dir
        if plan.reference_dir != base:
            problems.append(f"LoRA: reference {plan.reference_dir}, not the base model's (the plain run's) {base}")
        check_loss_near_ln2(records, 2e-3 if bf16 else 1e-3, name, problems)
        check_files(plan.train_dir, (*adapter, f"{MERGED_MODEL}/model.safetensors"), problems)
    if group == "padded":
        # Same reference, same batches: the default layout's curve, to bf16 rounding (1e-5 in fp32 on CPU).
        default, _ = check_training(plan_of("plain").train_dir, args.steps, problems)
        tolerance = 2e-2 if bf16 else 1e-4
        for packed, padded in zip(default, records, strict=False):
            if abs(packed["loss"] - padded["loss"]) > tolerance:
                problems.append(f"step {padded['step']}: loss {padded['loss']} padded, {packed['loss']} packed")
    if group == "lora-trdpo":
        chain = version_dir(plan.train_dir, 1) / AdapterReferenceSlices.ADAPTER_FILE
        check_files(plan.train_dir, (str(chain.relative_to(plan.train_dir)),), problems)
    if group == "qlora":
        check_loss_near_ln2(records, 5e-3, name, problems)
        check_files(plan.train_dir, adapter, problems)
    return rows


def smoke(work: Path, args: argparse.Namespace, result: dict) -> None:
    """Build, run every stage of the chosen groups, check and measure; fills ``result`` as it goes (so a
    failure keeps what ran). A failed stage or check fails its groups only."""
    from pipeline.config import load_config
    from pipeline.plan import Plan

    model_dir = work / f"model-{args.model_size}"
    shutil.rmtree(model_dir, ignore_errors=True)  # cheap to rebuild (seed 0) and never half-written
    parameters = bench_train.build_model(model_dir, args.model_size)
    flops = model_flops(model_dir)
    result["model"] = {
        "size": args.model_size,
        "parameters": parameters,
        "matmul_parameters": flops.non_embedding_params,
        "layers": flops.num_layers,
        "attention_width": flops.attention_width,
    }
    shutil.rmtree(work / "outputs", ignore_errors=True)
    paths = write_configs(work, model_dir, args)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    status = result["groups"] = dict.fromkeys(args.only, "ok")
    if "qlora" in status:
        skipped = bitsandbytes_missing(args, logs)
        if skipped:
            status["qlora"] = skipped
    print(f"stages ({args.ranks} ranks, logs in {logs}):", flush=True)
    seconds = result["stage_seconds"] = {}
    for label, stage, key, needed_by in STAGES:
        groups = [g for g in needed_by if status.get(g) == "ok"]
        if not groups:
            continue
        try:
            seconds[label] = run_cli(stage, paths[key], label, logs)
        except StageFailed as exc:
            print(f"  {label:<16s} FAILED (log: {logs / label}.log)", flush=True)
            for group in groups:
                status[group] = f"FAILED at stage {label}"
            result["failed"][label] = str(exc)

    plans: dict = {}

    def plan_of(key: str):
        """The Plan of config ``key`` (its artifacts' directories), made once."""
        if key not in plans:
            plans[key] = Plan.of(load_config(paths[key]))
        return plans[key]

    ctx = {"args": args, "plan": plan_of, "seconds": seconds, "peak": result["device"], "flops": flops}
    ctx["result"] = result
    figures = result["figures"]
    if "reference" in seconds:  # the shared reference stage ran (for dpo, lora or both)
        problems: list[str] = []
        try:
            plain = plan_of("plain")
            manifest = check_reference(plain.reference_dir, problems)
            figures.append(
                reference_row(
                    ROWS["reference"][0],
                    [(plain.reference_dir, manifest)],
                    plain.tokenized_dir,
                    flops,
                    result["device"],
                    seconds["reference"],
                    problems,
                )
            )
        except Exception:  # noqa: BLE001 -- a check that breaks must not lose the other groups' results
            result["failed"]["reference checks"] = traceback.format_exc()
            problems.append("reference checks raised: see smoke.json's failed")
        result["problems"] += [f"reference: {p}" for p in problems]
    elif {"dpo", "lora"} & set(args.only):
        note = "FAILED at stage reference" if "reference" in result["failed"] else "not run"
        figures += [{"stage": row, "note": note} for row in ROWS["reference"]]
    for group in args.only:
        if status[group] != "ok":
            figures += [{"stage": row, "note": status[group]} for row in ROWS[group]]
            continue
        problems = []
        try:
            figures += check_group(group, ctx, problems)
        except Exception:  # noqa: BLE001 -- a missing artifact, or a check that breaks: this group only
            result["failed"][f"{group} checks"] = traceback.format_exc()
            problems.append("its checks raised: see smoke.json's failed")
            figures += [{"stage": row, "note": "FAILED in checks"} for row in ROWS[group]]
        if problems:
            status[group] = f"NO: {len(problems)} problem(s)"
        result["problems"] += [f"{group}: {p}" for p in problems]


def main() -> int:
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
    parser.add_argument("--zero", type=int, choices=(2, 3), default=3, help="ZeRO stage of training (QLoRA: 2)")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma list of stage groups to run, of {','.join(GROUPS)} (default: all)",
    )
    parser.add_argument(
        "--install-bnb",
        action="store_true",
        help=f"pip install --no-deps {BNB_PIN} when it is missing (else the qlora group is skipped)",
    )
    args = parser.parse_args()
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and >= 2 (TR-DPO runs 2 windows of steps / 2)")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in GROUPS]
    if unknown or not only:
        parser.error(f"--only: {', '.join(unknown) or 'nothing given'}; choose from {','.join(GROUPS)}")
    args.only = [g for g in GROUPS if g in only]  # their order, once each
    args.model_size = args.model_size or ("134m" if args.device == "cuda" else "tiny")
    # Inherited by every stage job. OMP_NUM_THREADS: one knob for the ranks' intra-op threads and the CPU peak
    # they are compared with (1 is torchrun's own default). DS_ACCELERATOR: --device cpu means CPU even beside a GPU.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    problem = device_problem(args.device, args.ranks)
    if problem:
        print(f"gpu_smoke: {problem}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-smoke-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = {
        "work": str(work),
        "ranks": args.ranks,
        "steps": args.steps,
        "zero": args.zero,
        "only": args.only,
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "device": device_peak(args.device),
        "groups": {},
        "figures": [],
        "losses": {},
        "tr_dpo": {},
        "problems": [],
        "failed": {},
    }
    try:
        smoke(work, args, result)
    except Exception:  # noqa: BLE001 -- the setup itself (model, configs): keep what there is, say so
        result["failed"]["setup"] = traceback.format_exc()
    result["wall_s"] = time.perf_counter() - start
    result["ok"] = not result["failed"] and not result["problems"]
    (work / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    for what, message in result["failed"].items():
        print(f"\ngpu_smoke: FAILED: {what}:\n{message}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
