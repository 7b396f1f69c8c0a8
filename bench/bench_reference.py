"""Reference-pass throughput and memory: our pass against a naive full-vocab pass and TRL's precompute.

    .venv/bin/python bench/bench_reference.py                 # ~50M-param Llama, 32 pairs, batch 8, 2 rounds
    .venv/bin/python bench/bench_reference.py --pairs 16 --rounds 1 --hidden 128 --layers 2   # smoke run

Sides, each run in its own subprocess (so peak RSS is per side), on the same model, data and batch size:

* ``ours``        :func:`pipeline.reference.compute_reference_logps` as shipped: DeepSpeed ZeRO-3 inference engine
                  (the default), length-sorted batches, ``completion_logps`` (logits of completion positions only,
                  chunked float32 log-softmax), Parquet shards + manifest.
* ``ours-stage0`` the same with a ZeRO stage-0 ds_config: what ZeRO-3's parameter hooks cost on one process.
* ``naive``       plain transformers forward over whole sequences in dataset order, ``log_softmax(logits.float())``
                  over the full vocabulary, gather, masked sum.
* ``trl``         TRL 1.16's ``DPOTrainer._precompute_ref_logps`` (``precompute_ref_log_probs=True``): dataset order,
                  right padding, its fused LM head; results cached through ``datasets``. Bench-only dependency:
                  ``pip install --no-deps trl==1.16.0``; the library never imports trl.

Reported per side: tokens/s of the pass (model loaded; real tokens, padding excluded; best and median of the
rounds, sides interleaved so background load hits them alike), peak RSS during the pass and its rise above the
RSS with the model loaded, achieved FLOP/s = 2 * params * tokens / s (params without the input embedding, whose
lookup is no matmul) against this machine's measured fp32 matmul FLOP/s. The sums of every side are compared
with ours. The generated data are random token ids: prompts 16-128 tokens, completions 16-192.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
SIDES = ("ours", "ours-stage0", "naive", "trl")
PAD, EOS = 0, 1


# ------------------------------------------------------------------------------------------------ setup (parent)
def build_model(model_dir: Path, *, hidden: int, layers: int, vocab: int) -> int:
    """A randomly initialised Llama saved with save_pretrained; returns the parameter count."""
    from llama import save_random_llama

    return save_random_llama(
        model_dir,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )


def build_tokenized(out: Path, *, pairs: int, vocab: int, seed: int = 0) -> Path:
    """A tokenized artifact (the tokenize stage's schema and manifest) of random token ids."""
    import pyarrow as pa

    from pipeline.artifacts import write_manifest, write_parquet
    from pipeline.tokenize import artifact as data

    rng = np.random.default_rng(seed)

    def ids(low: int, high: int) -> list[int]:
        return rng.integers(2, vocab, size=int(rng.integers(low, high + 1))).tolist()

    rows = [
        {"prompt": ids(16, 128), "chosen": ids(15, 191) + [EOS], "rejected": ids(15, 191) + [EOS]} for _ in range(pairs)
    ]
    columns = {"example_id": list(range(pairs))}
    for name in ("prompt", "chosen", "rejected"):
        columns[f"{name}_input_ids"] = [r[name] for r in rows]
    for name in ("prompt", "chosen", "rejected"):
        columns[f"{name}_length"] = [len(r[name]) for r in rows]
    for name in ("prompt", "chosen", "rejected"):
        columns[f"{name}_truncated"] = [False] * pairs
    write_parquet(pa.table(columns, schema=data.SCHEMA), out / "train.parquet")
    write_manifest(
        out,
        kind=data.KIND,
        schema_version=data.SCHEMA_VERSION,
        inputs={"generated": {"pairs": pairs, "vocab": vocab, "seed": seed}},
        files=["train.parquet"],
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        vocab_size=vocab,
    )
    return out


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM FLOP/s of this machine (torch.mm, n x n), with torch's default threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ one side (child)
class PeakRss:
    """Samples this process's RSS every 5 ms in a thread; ``peak`` is the highest seen since ``start``."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def run_ours(work: Path, batch_size: int, stage0: bool) -> dict:
    from pipeline.artifacts import read_manifest
    from pipeline.config import load_config
    from pipeline.reference import cache
    from pipeline.reference import stage as ref

    overrides = {"precompute_ref_batch_size": batch_size, "output_dir": str(work / "unused")}
    if stage0:
        ds = work / "ds_stage0.json"
        ds.write_text(
            json.dumps(
                {
                    "train_micro_batch_size_per_gpu": "auto",
                    "bf16": {"enabled": "auto"},
                    "zero_optimization": {"stage": 0},
                    "steps_per_print": 10**9,
                }
            )
        )
        overrides["deepspeed"] = str(ds)
    config = load_config(None, overrides)
    loaded = {}
    load_engine = ref._load_engine

    def load_and_measure(*args):  # RSS with the model loaded, to separate the pass's own memory from the model's
        engine = load_engine(*args)
        loaded["rss"] = _rss()
        return engine

    ref._load_engine = load_and_measure
    out = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    with PeakRss() as peak:
        ref.compute_reference_logps(
            config,
            tokenized_dir=work / "tokenized",
            model_dir=work / "model",
            out_dir=out,
            splits=["train"],
            shard_size=10**9,
        )
    counts = read_manifest(out, kind=cache.KIND)["counts"]
    logps = cache.load_reference_logps(out, split="train")
    return {
        "seconds": counts["seconds"],
        "tokens": counts["tokens"],
        "rss_loaded": loaded["rss"],
        "peak_rss": peak.peak,
        "chosen": logps.chosen.tolist(),
        "rejected": logps.rejected.tolist(),
    }


def _rows(work: Path) -> list[dict]:
    from pipeline.tokenize.artifact import load_tokenized

    return load_tokenized(work / "tokenized", "train").to_pylist()


def run_naive(work: Path, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.logprobs import collate_pairs

    rows = _rows(work)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    rss_loaded = _rss()
    chosen, rejected, tokens = [], [], 0
    with PeakRss() as peak, torch.no_grad():
        start = time.perf_counter()
        for begin in range(0, len(rows), batch_size):
            batch = collate_pairs(rows[begin : begin + batch_size], PAD)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # the full [2B, T, V] float32 tensor
            labels = batch.input_ids[:, 1:]
            per_token = logps.gather(-1, labels[..., None]).squeeze(-1)
            # Left-padded: the completion is the last `length` labels of each row.
            width = labels.shape[1]
            in_completion = torch.arange(width)[None, :] >= width - batch.completion_lengths[:, None]
            sums = torch.where(in_completion, per_token, 0.0).sum(-1)
            chosen += sums[: batch.num_pairs].tolist()
            rejected += sums[batch.num_pairs :].tolist()
            tokens += batch.num_tokens
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rss_loaded": rss_loaded,
        "peak_rss": peak.peak,
        "chosen": chosen,
        "rejected": rejected,
    }


def run_trl(work: Path, batch_size: int) -> dict:
    import datasets
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    rows = _rows(work)
    # TRL's collator pads with the tokenizer's pad id; a word-level tokenizer is enough (the data are ids already).
    vocab = {"<pad>": PAD, "</s>": EOS, "a": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")), pad_token="<pad>", eos_token="</s>"
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=batch_size,
        precompute_ref_batch_size=batch_size,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    placeholder = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["a"], "rejected": ["a a"]})
    trainer = DPOTrainer(model=model, args=args, train_dataset=placeholder, processing_class=tokenizer)
    from trl.trainer.utils import hash_module

    trainer._precompute_model_hash = hash_module(trainer.model)  # what __init__ does with precompute_ref_log_probs
    dataset = datasets.Dataset.from_dict(
        {
            "prompt_ids": [r["prompt_input_ids"] for r in rows],
            "chosen_ids": [r["chosen_input_ids"] for r in rows],
            "rejected_ids": [r["rejected_input_ids"] for r in rows],
        }
    )
    rss_loaded = _rss()
    with PeakRss() as peak:
        start = time.perf_counter()
        scored = trainer._precompute_ref_logps(dataset, "bench", batch_size)
        seconds = time.perf_counter() - start
    tokens = sum(2 * r["prompt_length"] + r["chosen_length"] + r["rejected_length"] for r in rows)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rss_loaded": rss_loaded,
        "peak_rss": peak.peak,
        "chosen": [float(x) for x in scored["ref_chosen_logps"]],
        "rejected": [float(x) for x in scored["ref_rejected_logps"]],
    }


def run_side(side: str, work: Path, batch_size: int) -> dict:
    runner = {
        "ours": lambda: run_ours(work, batch_size, stage0=False),
        "ours-stage0": lambda: run_ours(work, batch_size, stage0=True),
        "naive": lambda: run_naive(work, batch_size),
        "trl": lambda: run_trl(work, batch_size),
    }[side]
    result = runner()
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# ------------------------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every side, interleaved")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, args.work, args.batch_size)))
        return

    import torch

    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        work = Path(tmp)
        params = build_model(work / "model", hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        matmul_params = params - args.vocab * args.hidden  # the input embedding is a lookup
        build_tokenized(work / "tokenized", pairs=args.pairs, vocab=args.vocab)
        peak_flops = matmul_flops()
        print(
            f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.1f}M "
            f"params ({matmul_params / 1e6:.1f}M in matmuls); {args.pairs} pairs, batch {args.batch_size}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
            f"fp32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s",
            flush=True,
        )
        runs: dict[str, list[dict]] = {side: [] for side in args.sides}
        for round_ in range(args.rounds):
            for side in args.sides:
                command = [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--work",
                    str(work),
                    "--batch-size",
                    str(args.batch_size),
                ]
                proc = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    env=dict(os.environ, TQDM_DISABLE="1", DS_ACCELERATOR="cpu"),
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"side {side} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                result = json.loads(line.removeprefix("RESULT "))
                runs[side].append(result)
                print(f"  round {round_ + 1} {side:12s} {result['tokens'] / result['seconds']:8.0f} tok/s", flush=True)
        report(runs, matmul_params, peak_flops)


def report(runs: dict[str, list[dict]], matmul_params: int, peak_flops: float) -> None:
    mib = 1 << 20
    reference = runs.get("ours", next(iter(runs.values())))[0]
    best = {side: max(r["tokens"] / r["seconds"] for r in results) for side, results in runs.items()}
    base = best.get("ours")
    print(
        f"\n{'side':12s} {'tok/s best':>10s} {'median':>8s} {'ours/side':>9s} {'peak RSS':>9s} {'pass rise':>9s} "
        f"{'ours rise/side':>14s} {'GFLOP/s':>8s} {'% matmul':>8s} {'max |Δ| vs ours':>15s}"
    )
    rise_ours = min(r["peak_rss"] - r["rss_loaded"] for r in runs["ours"]) if "ours" in runs else None
    for side, results in runs.items():
        median = statistics.median(r["tokens"] / r["seconds"] for r in results)
        rise = min(r["peak_rss"] - r["rss_loaded"] for r in results)
        peak = min(r["max_rss"] for r in results)
        flops = 2 * matmul_params * best[side]
        diff = max(np.abs(np.asarray(results[0][k]) - np.asarray(reference[k])).max() for k in ("chosen", "rejected"))
        print(
            f"{side:12s} {best[side]:10.0f} {median:8.0f} {base / best[side] if base else float('nan'):9.2f} "
            f"{peak / mib:8.0f}M {rise / mib:8.0f}M "
            f"{rise_ours / rise if rise_ours is not None and rise > 0 else float('nan'):14.2f} "
            f"{flops / 1e9:8.1f} {100 * flops / peak_flops:7.1f}% {diff:15.2e}"
        )
    print(
        "\nours/side: our tokens/s over the side's (>1: ours faster). pass rise: peak RSS during the pass minus "
        "RSS with the model loaded; ours rise/side < 1: ours uses less. Peak RSS: whole process, min over rounds."
    )


if __name__ == "__main__":
    main()
