"""LoRA training steps: our LoRA path against our full fine-tuning and TRL's ``DPOTrainer`` with ``peft_config``.

    .venv/bin/pip install --no-deps trl==1.16.0     # bench-only; the library never imports trl
    .venv/bin/python bench/bench_lora.py                                  # 134M Llama, fp32: 8 steps, 2 rounds
    .venv/bin/python bench/bench_lora.py --preset tiny --steps 3 --rounds 1   # smoke run of the harness

Sides, each in its own subprocess (so that its peak RSS, ``ru_maxrss``, is its own), one process, fp32:

* ``ours-lora``            :func:`pipeline.train.train_stage` with ``use_peft=True, lora_r=16, lora_alpha=32,
                           lora_dropout=0.0, lora_target_modules="all-linear"``: adapters on the frozen base, the
                           reference log-probs read from the Parquet cache that the reference stage wrote
                           beforehand (the base scored once; the same artifact the full fine-tune reads). One
                           forward and one backward per step, no reference model.
* ``ours-full``            the same stage, full fine-tuning (bench_train.py's fp32 ``ours``).
* ``trl-peft``             TRL 1.16 ``DPOTrainer`` with ``peft_config=LoraConfig(r=16, lora_alpha=32,
                           lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")`` and
                           ``precompute_ref_log_probs=False`` (its default): the reference is the base run a second
                           time with the adapter disabled, a forward every step.
* ``trl-peft-precompute``  the same with ``precompute_ref_log_probs=True``: the adapter-disabled base scores the data
                           before training (not timed), no reference forward in the steps.

Everything else is bench_train.py's (its functions, imported): the model (a random Llama of SmolLM-135M's shape,
134.5M parameters; ``--preset tiny`` for a smoke run), the data, batch 2 pairs, sigmoid loss with beta 0.1, AdamW
lr 1e-6 with a linear schedule, clipping 1.0, dropout off, no gradient checkpointing, ``--threads`` intra-op threads
per process (default 1), ``--rounds`` rounds with the sides interleaved (the order reversed every other round), and
per side the median over rounds of the median step after ``--warmup``, in wall and process CPU seconds.

Theory, per token of the batch with N the parameters in matmuls: full fine-tuning is a forward (2N) and a backward
that computes input and weight gradients (4N), 6N; LoRA's backward computes input gradients only (2N, the adapters'
own are ~1 % of it), 4N; TRL with ``peft_config`` adds the adapter-disabled reference forward (2N), 6N. So a step of
ours-lora should take about 4/6 = 0.67 of ours-full and of trl-peft, and about the same as trl-peft-precompute. Model
state in bytes per base parameter (fp32): full fine-tuning 16 (weights, gradients, two AdamW moments), LoRA 4 + 16 f
with f the adapters' parameters per base parameter (TRL's reference is the same base weights: no extra). Neither
counts activations or the fixed cost of the Python process (~0.6 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

from bench_train import (  # noqa: E402  (bench/ on the path first)
    PRESETS,
    STATE_BYTES,
    add_side_arguments,
    build_model,
    run_ours,
    run_side,
    run_trl,
    start_child,  # noqa: E402
    summarize,
    write_dataset,
)

CASE = "fp32"  # bench_train.py's configuration case every side runs (one process, fp32)
REPORT_CASE = "lora"  # this benchmark's key in STATE_BYTES and the heading of its table
SIDES = ("ours-lora", "ours-full", "trl-peft", "trl-peft-precompute")  # ours-lora first: the ratios are against it
LORA = dict(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules="all-linear")
FLOPS_PER_TOKEN = {"ours-lora": 4, "ours-full": 6, "trl-peft": 6, "trl-peft-precompute": 4}  # x N, see the docstring


def trl_lora_config():
    """What a TRL user passes as ``peft_config`` for the adapters of :data:`LORA`."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------ sides (children)
def count_parameters(side: str) -> dict:
    """Patches the side's trainer (bench-only) to record its trainable and total parameters once it is built."""
    counts: dict = {}

    def record(module) -> None:
        params = list(module.parameters())
        counts["trainable"] = sum(p.numel() for p in params if p.requires_grad)
        counts["total"] = sum(p.numel() for p in params)

    if side.startswith("ours"):
        from pipeline.train.stage import DPOTrainingRecipe

        setup = DPOTrainingRecipe.setup

        def counted_setup(self):
            setup(self)
            record(self.engine.module)

        DPOTrainingRecipe.setup = counted_setup
    else:
        from trl import DPOTrainer

        train = DPOTrainer.train

        def counted_train(self, *args, **kwargs):
            record(self.model)
            return train(self, *args, **kwargs)

        DPOTrainer.train = counted_train
    return counts


def child(args: argparse.Namespace) -> None:
    work = start_child(args)  # bench_train.py's: threads, seed, and the shared prepare side
    if work is None:
        return
    counts = count_parameters(args.side)
    if args.side == "ours-lora":
        result = run_ours(work, CASE, args.steps, args.zero3_config, **LORA)
    elif args.side == "ours-full":
        result = run_ours(work, CASE, args.steps, args.zero3_config)
    else:
        precompute = args.side == "trl-peft-precompute"
        result = run_trl(work, CASE, args.steps, precompute=precompute, peft_config=trl_lora_config())
    if result.pop("main"):
        print("RESULT " + json.dumps(result | counts), flush=True)


# ------------------------------------------------------------------------------------------------ orchestration
def parameters_table(rounds: dict[str, list[dict]]) -> list[str]:
    """Trainable parameters per side and the step-time ratios the FLOP count predicts."""
    first = next(iter(rounds))
    lines = [
        "| side | trainable parameters | of total | FLOPs per token, theory | ours-lora / side, theory |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, results in rounds.items():
        trainable, total = results[0]["trainable"], results[0]["total"]
        flops = FLOPS_PER_TOKEN[label]
        lines.append(
            f"| {label} | {trainable / 1e6:.2f}M | {100 * trainable / total:.2f} % | {flops}N | "
            f"{FLOPS_PER_TOKEN[first] / flops:.2f} |"
        )
    return lines + [""]


def state_bytes(rounds: dict[str, list[dict]]) -> dict[str, float]:
    """Model-state bytes per base parameter of each side: 16 for full fine-tuning, 4 + 16 f with adapters (f: the
    adapters' parameters per base parameter; weights 4, and gradients and AdamW moments 12 for the adapters)."""

    def of(label: str) -> float:
        if label == "ours-full":
            return 16
        result = rounds[label][0]
        return round(4 + 16 * result["trainable"] / (result["total"] - result["trainable"]), 2)

    return {label: of(label) for label in rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="134m")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="comma-separated, ours-lora first: " + ", ".join(SIDES)
    )
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=64)
    add_side_arguments(parser, SIDES, CASE)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    sides = args.sides.split(",")
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or sides[0] != "ours-lora":
        parser.error(f"--sides: ours-lora first, then any of {', '.join(SIDES[1:])} (got {args.sides})")
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-lora-"))
    if not (work / "model").is_dir():
        build_model(work / "model", args.preset)
    data = work / "data" / "train.jsonl"
    if not data.is_file() or len(data.read_text().splitlines()) < 2 * args.steps:
        # Every step's 2 pairs once (one process).
        write_dataset(
            work / "data",
            work / "model",
            pairs=2 * args.steps,
            prompt_tokens=args.prompt_tokens,
            completion_tokens=args.completion_tokens,
        )
    load_before = Path("/proc/loadavg").read_text().strip()
    print(
        f"{args.preset} preset; batch 2 pairs, {args.prompt_tokens}+{args.completion_tokens} tokens, fp32, 1 process; "
        f"{args.steps} steps, median after {args.warmup}; {args.rounds} rounds; {args.threads} thread(s) per process; "
        f"work dir {work}; /proc/loadavg before: {load_before}",
        flush=True,
    )
    started = time.perf_counter()
    run_side(work, "prepare", CASE, args, __file__)  # the reference artifact ours-lora and ours-full read
    rounds: dict[str, list[dict]] = {label: [] for label in sides}
    for round_ in range(args.rounds):
        for label in sides if round_ % 2 == 0 else reversed(sides):
            result = run_side(work, label, CASE, args, __file__)
            rounds[label].append(result)
            print(
                f"  round {round_ + 1} {label}: step {statistics.median(result['step_seconds'][args.warmup :]):.2f} s "
                f"wall, {statistics.median(result['cpu_seconds'][args.warmup :]):.2f} s CPU, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    STATE_BYTES[REPORT_CASE] = state_bytes(rounds)
    report = summarize(REPORT_CASE, rounds, args.warmup) + parameters_table(rounds)
    load_after = Path("/proc/loadavg").read_text().strip()
    print("\n".join(report), flush=True)
    print(f"/proc/loadavg after: {load_after}; {time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
