"""Training step time and peak memory: our training stage against TRL's ``DPOTrainer``.

    .venv/bin/pip install --no-deps trl==1.16.0     # bench-only; the library never imports trl
    .venv/bin/python bench/bench_train.py                       # 134M Llama: fp32, bf16, 2-process ZeRO-3
    .venv/bin/python bench/bench_train.py --preset tiny --steps 4 --cases fp32   # smoke run of the harness

Sides, each in its own subprocess so that its peak RSS (``ru_maxrss``, the max over ranks) is its own:

* ``ours``            :func:`pipeline.train.train_stage` as shipped (DeepSpeed engine, ZeRO stage 0 on one process,
                      ZeRO-3 on two; fused torch AdamW), reading the reference log-probs from the Parquet cache that
                      the reference stage wrote beforehand in another process. No reference model in memory.
* ``trl-resident``    TRL 1.16 ``DPOTrainer`` with ``precompute_ref_log_probs=False``: the reference model stays in
                      memory and runs a forward every step.
* ``trl-precompute``  TRL with ``precompute_ref_log_probs=True``: reference log-probs computed in memory with the
                      policy before training (not timed), no reference model during training.

Cases: ``fp32`` and ``bf16`` (one process, the three sides) and ``zero3x2`` (ours on 2 processes with ZeRO-3
against ours on 1 process: TRL's DeepSpeed path does not start on a CPU-only machine, where accelerate leaves
DeepSpeed off and its batch-size check then fails).

Same model (a Llama built here with random weights: 134M parameters, SmolLM-135M's shape; ``--preset tiny`` for a
smoke run), same text (prompts and completions of ``--prompt-tokens``/``--completion-tokens`` tokens, completions
starting with a space so both tokenizations give the same ids), batch 2 per process, sigmoid loss with beta 0.1,
AdamW lr 1e-6 with a linear schedule, clipping 1.0, dropout off, no gradient checkpointing on either side (TRL's
default turns it on). fp32: everything fp32. bf16: mixed precision on both sides with fp32 master weights (ours:
DeepSpeed's bf16 section; TRL: its default ``bf16=True``, autocast over fp32 weights).

Timing on a shared machine: ``--threads`` intra-op threads per process (default 1, so a busy neighbour slows a side
without also making its threads wait for each other), ``--rounds`` rounds with the sides interleaved, and per side
the median over rounds of the median step after ``--warmup``. Reported: wall seconds and process CPU seconds per
step (the CPU time barely depends on the machine's load). The theoretical memory ratio counts bytes per parameter
of the model state (weights, gradients, AdamW moments, master weights, a resident reference), not activations or
the fixed cost of the Python process (~0.6 GiB here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SIDES = ("ours", "trl-resident", "trl-precompute")
# Each case: label -> (side, configuration case), the first label being ours.
CASES = {
    "fp32": {
        "ours": ("ours", "fp32"),
        "trl-resident": ("trl-resident", "fp32"),
        "trl-precompute": ("trl-precompute", "fp32"),
    },
    "bf16": {
        "ours": ("ours", "bf16"),
        "trl-resident": ("trl-resident", "bf16"),
        "trl-precompute": ("trl-precompute", "bf16"),
    },
    "zero3x2": {"ours ZeRO-3 x2 (per rank)": ("ours", "zero3x2"), "ours stage 0 x1": ("ours", "fp32")},
}
# Model-state bytes per parameter (per process) of each label, for the theoretical ratios.
STATE_BYTES = {
    # fp32 AdamW: weights 4 + gradients 4 + two moments 8; a resident fp32 reference 4.
    "fp32": {"ours": 16, "trl-resident": 16 + 4, "trl-precompute": 16},
    # Ours (DeepSpeed bf16): bf16 weights 2 + fp32 master 4 + fp32 gradient accumulator 4 + moments 8 (each bf16
    # gradient is added to the fp32 one as it is produced). TRL (autocast): fp32 weights 4 + gradients 4 + moments
    # 8, and a reference loaded in the policy's dtype, fp32: 4.
    "bf16": {"ours": 18, "trl-resident": 16 + 4, "trl-precompute": 16},
    # ZeRO-3 on 2 ranks: fp32 weights, gradients and moments each split in two (a resident ZeRO-3 reference would
    # add 2 per rank: 8 / 10 = 0.8 against one); one process at stage 0 holds all 16.
    "zero3x2": {"ours ZeRO-3 x2 (per rank)": 8, "ours stage 0 x1": 16},
}
PRESETS = {
    # SmolLM-135M's shape: 134.5M parameters with tied embeddings.
    "134m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
}


# ------------------------------------------------------------------------------------------------ setup (parent)
def build_model(model_dir: Path, preset: str) -> int:
    """Our tokenizer plus a randomly initialised Llama of the preset's shape; returns the parameter count."""
    from llama import save_random_llama

    from pipeline.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    return save_random_llama(
        model_dir,
        tokenizer=tokenizer,
        **PRESETS[preset],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_dataset(data_dir: Path, model_dir: Path, *, pairs: int, prompt_tokens: int, completion_tokens: int) -> None:
    """``train.jsonl`` of ``pairs`` pairs of word salad, every prompt and completion of the same token counts."""
    write_pairs(data_dir, model_dir, [(prompt_tokens, completion_tokens, completion_tokens)] * pairs)


def write_pairs(data_dir: Path, model_dir: Path, lengths: list[tuple[int, int, int]]) -> None:
    """``train.jsonl`` of word salad from the shipped data, one pair per ``(prompt, chosen, rejected)`` of
    ``lengths``, each cut to exactly that many tokens (BOS and EOS included; one word at least)."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = sorted(
        {
            w
            for line in (REPO_ROOT / "data" / "preference" / "train.jsonl").read_text().splitlines()
            for text in json.loads(line).values()
            for w in text.split()
        }
    )
    rng = random.Random(0)

    def text(tokens: int, *, leading_space: bool) -> str:
        out = ""
        while True:
            longer = out + " " + rng.choice(words) if out or leading_space else rng.choice(words)
            if len(tokenizer(longer, add_special_tokens=False)["input_ids"]) > tokens:
                return out or longer  # one word at least: a budget below a word's tokens must not give ""
            out = longer

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as handle:
        for prompt_tokens, chosen_tokens, rejected_tokens in lengths:
            row = {
                "prompt": text(prompt_tokens - 1, leading_space=False),  # + BOS
                "chosen": text(chosen_tokens - 1, leading_space=True),  # + EOS
                "rejected": text(rejected_tokens - 1, leading_space=True),
            }
            handle.write(json.dumps(row) + "\n")


def our_config(
    work: Path, case: str, steps: int, zero3_config: str = str(REPO_ROOT / "configs" / "ds_zero3.json"), **overrides
):
    """The benchmarks' config of our pipeline for ``case`` (fp32, bf16, zero3x2), ``overrides`` on top."""
    from pipeline.config import load_config

    return load_config(
        None,
        {
            "model_name_or_path": str(work / "model"),
            "dataset_name": str(work / "data"),
            "dataset_test_split": None,
            "output_dir": str(work / f"ours-{case}"),
            "max_length": None,
            "max_prompt_length": None,
            "max_completion_length": None,
            "per_device_train_batch_size": 2,
            "precompute_ref_batch_size": 8,
            "learning_rate": 1e-6,
            "beta": 0.1,
            "loss_type": "sigmoid",
            "max_steps": steps,
            "lr_scheduler_type": "linear",
            "max_grad_norm": 1.0,
            "bf16": case == "bf16",
            "logging_steps": 1,
            "deepspeed": zero3_config if case == "zero3x2" else None,
            "num_processes": 2 if case == "zero3x2" else 1,
        }
        | overrides,
    )


# ------------------------------------------------------------------------------------------------ sides (children)
def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(work: Path, case: str, steps: int, zero3_config: str, **overrides) -> dict:
    """Our side of ``case``; ``overrides`` go to :func:`our_config` (bench_lora.py's LoRA fields)."""
    import shutil

    from pipeline.distributed import all_gather_objects
    from pipeline.plan import Plan
    from pipeline.ranks import is_main_process
    from pipeline.train.stage import DPOTrainingRecipe, train_stage

    cpu_seconds = []
    train_step = DPOTrainingRecipe.train_step

    def timed_step(self, step):  # bench-only wrapper: the library reports wall time only
        start = time.process_time()
        record = train_step(self, step)
        cpu_seconds.append(time.process_time() - start)
        return record

    DPOTrainingRecipe.train_step = timed_step
    config = our_config(work, case, steps, zero3_config, **overrides)
    shutil.rmtree(Plan.of(config).train_dir, ignore_errors=True)
    run = train_stage(config)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peaks = all_gather_objects(peak_rss())
    return {
        "step_seconds": [r["step_seconds"] for r in rows if "loss" in r],
        "cpu_seconds": cpu_seconds,
        "peak_rss": max(peaks),
        "first_loss": rows[0]["loss"],
        "main": is_main_process(),
    }


def run_trl(work: Path, case: str, steps: int, *, precompute: bool, peft_config=None) -> dict:
    """TRL's side of ``case``; ``peft_config`` (a peft ``LoraConfig``) goes to ``DPOTrainer`` (bench_lora.py)."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu_seconds, self.start = [], [], (0.0, 0.0)

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start[0])
            self.cpu_seconds.append(time.process_time() - self.start[1])

    args = DPOConfig(
        output_dir=str(work / f"trl-{case}-{precompute}"),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-6,
        beta=0.1,
        loss_type=["sigmoid"],
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=8,
        bf16=case == "bf16",
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_length=None,
        disable_dropout=True,
        dataloader_num_workers=0,
        seed=42,
    )
    dataset = datasets.load_dataset("json", data_files=str(work / "data" / "train.jsonl"), split="train")
    timer = StepTimer()
    trainer = DPOTrainer(
        model=str(work / "model"),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(work / "model"),
        callbacks=[timer],
        peft_config=peft_config,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "step_seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "peak_rss": peak_rss(),
        "first_loss": losses[0],
        "main": True,
    }


def start_child(args: argparse.Namespace) -> Path | None:
    """A side's process: its threads and seed; the work dir, or None once ``prepare`` (the tokenize and
    reference stages of our config, shared by every side) is done. The benches that reuse this script call it."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work)
    if args.side != "prepare":
        return work
    from pipeline.reference.stage import reference_stage
    from pipeline.tokenize.stage import tokenize_stage

    config = our_config(work, args.case, args.steps, args.zero3_config)
    tokenize_stage(config)
    reference_stage(config)
    return None


def add_side_arguments(parser: argparse.ArgumentParser, sides: tuple[str, ...], case: str) -> None:
    """The arguments a bench reusing :func:`run_side` takes besides its own: interleaving, threads, the work dir,
    and the hidden ones its child processes get (``--side``, ``--case``, ``--zero3-config``)."""
    parser.add_argument("--rounds", type=int, default=2, help="rounds, sides interleaved")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--side", choices=("prepare", *sides), help=argparse.SUPPRESS)
    parser.add_argument("--case", default=case, help=argparse.SUPPRESS)
    parser.add_argument("--zero3-config", default=str(REPO_ROOT / "configs" / "ds_zero3.json"), help=argparse.SUPPRESS)


def child(args: argparse.Namespace) -> None:
    work = start_child(args)
    if work is None:
        return
    if args.side == "ours":
        result = run_ours(work, args.case, args.steps, args.zero3_config)
    else:
        result = run_trl(work, args.case, args.steps, precompute=args.side == "trl-precompute")
    if result.pop("main"):
        print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ orchestration
def run_side(work: Path, side: str, case: str, args: argparse.Namespace, script_path: str = __file__) -> dict:
    """``side`` of ``case`` in a subprocess of ``script_path`` (this script, or one whose children it runs)."""
    script = [
        str(Path(script_path).resolve()),
        "--side",
        side,
        "--case",
        case,
        "--work",
        str(work),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--zero3-config",
        args.zero3_config,
    ]
    if case == "zero3x2" and side != "prepare":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            *script,
        ]
    else:
        command = [sys.executable, *script]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(args.threads),
    )
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{side} ({case}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if side == "prepare":
        return {}
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def summarize(case: str, rounds: dict[str, list[dict]], warmup: int) -> list[str]:
    """Median over rounds of each round's median step (wall and CPU) and of the peak RSS."""

    def median_of(label: str, key: str) -> float:
        return statistics.median(statistics.median(r[key][warmup:]) for r in rounds[label])

    gib = 1024**3
    wall = {label: median_of(label, "step_seconds") for label in rounds}
    cpu = {label: median_of(label, "cpu_seconds") for label in rounds}
    rss = {label: statistics.median(r["peak_rss"] for r in rounds[label]) for label in rounds}
    ours, *others = rounds
    lines = [
        f"### {case}",
        "",
        "| side | step wall s | step CPU s | peak RSS GiB | first loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, results in rounds.items():
        lines.append(
            f"| {label} | {wall[label]:.2f} | {cpu[label]:.2f} | {rss[label] / gib:.2f} | "
            f"{results[0]['first_loss']:.4f} |"
        )
    lines += [
        "",
        "| ratio | step wall | step CPU | peak RSS measured | model state, theory |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for other in others:
        mine, theirs = STATE_BYTES[case][ours], STATE_BYTES[case][other]
        lines.append(
            f"| {ours} / {other} | {wall[ours] / wall[other]:.2f} | {cpu[ours] / cpu[other]:.2f} | "
            f"{rss[ours] / rss[other]:.2f} | {mine} / {theirs} B/param = {mine / theirs:.2f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="134m")
    parser.add_argument("--cases", default="fp32,bf16,zero3x2", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per side and round")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per case, sides interleaved")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument(
        "--zero3-config", default=str(REPO_ROOT / "configs" / "ds_zero3.json"), help="ds_config of the zero3x2 case"
    )
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--side", choices=("prepare", *SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    if not (work / "model").is_dir():
        params = build_model(work / "model", args.preset)
        # Enough pairs for every step of the 2-process case (global batch 4), once each.
        write_dataset(
            work / "data",
            work / "model",
            pairs=4 * args.steps,
            prompt_tokens=args.prompt_tokens,
            completion_tokens=args.completion_tokens,
        )
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with __import__("torch").device("meta"):
            params = sum(
                p.numel()
                for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "model")).parameters()
            )
    print(
        f"model: {params / 1e6:.1f}M parameters ({args.preset}); batch 2 per process, "
        f"{args.prompt_tokens}+{args.completion_tokens} tokens; {args.steps} steps, median after {args.warmup}; "
        f"{args.rounds} rounds; {args.threads} thread(s) per process; work dir {work}",
        flush=True,
    )
    report = []
    for case in args.cases.split(","):
        sides = CASES[case]
        for config_case in {config_case for _, config_case in sides.values()}:
            run_side(work, "prepare", config_case, args)
        rounds: dict[str, list[dict]] = {label: [] for label in sides}
        for _ in range(args.rounds):
            for label, (side, config_case) in sides.items():
                rounds[label].append(run_side(work, side, config_case, args))
        section = summarize(case, rounds, args.warmup)
        print("\n".join(section), f"(load average after: {os.getloadavg()[0]:.1f})", sep="\n", flush=True)
        report += section
    print("\n".join(report))


if __name__ == "__main__":
    main()
