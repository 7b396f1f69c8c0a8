"""Batch layouts: padded rows against padding-free packing and prefix sharing, on realistic length distributions.

    .venv/bin/pip install --no-deps trl==1.16.0     # bench-only; the library never imports trl
    .venv/bin/python bench/bench_packing.py --steps 4 --warmup 1 --rounds 1   # the recorded 134M run (~13 min)
    .venv/bin/python bench/bench_packing.py                    # = --steps 5 --warmup 2 --rounds 2 (~30 min)
    .venv/bin/python bench/bench_packing.py --preset tiny --steps 4 --rounds 1   # smoke run of the harness (~2 min)

Sides, each in its own subprocess (so that its peak RSS, ``ru_maxrss``, is its own), one process, fp32, the same
global batch (``--batch-size`` pairs, gradient_accumulation_steps 1):

* ``ours-padded``     :func:`pipeline.train.train_stage` with ``padding_free: false``: 2B left-padded rows
                      (chosen, rejected), padded to the micro-batch's longest sequence.
* ``ours-packed``     ``padding_free: true, prefix_sharing: false``: the B pairs as 2B segments of one row, no
                      padding, the prompt run twice (once per sequence).
* ``ours-shared``     ``padding_free: true, prefix_sharing: true`` (the default with SDPA): one segment
                      ``prompt | chosen | rejected`` per pair under a block mask, the prompt run once.
* ``trl-precompute``  TRL 1.16 ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (bench_train.py's), its
                      batch set to ``--batch-size`` here (bench-side: ``trl.DPOConfig`` wrapped). TRL right-pads
                      each batch to its longest sequence; its ``padding_free`` is disabled in 1.16 (it warns and
                      pads).
* ``ref-padded``, ``ref-shared``  the reference pass (:func:`pipeline.reference.compute_reference_logps`, into a
                      fresh directory) over the whole set, padded rows against the shared-prompt layout: tokens/s
                      and seconds from its manifest's ``counts``.

Two length sets (``--sets``), drawn by :func:`sample_lengths` (deterministic from ``--seed``), lognormal in tokens
(BOS and EOS included), clipped, then every length multiplied by ``--length-scale`` (default 0.25, so that a
134M step on one CPU thread takes seconds, not a minute; at least 2 tokens):

* ``ultrafeedback``  (UltraFeedback-like) prompt median 160, sigma 0.9, clipped [16, 1024]; chosen and rejected
                     independent, median 250, sigma 0.7, clipped [8, 1024].
* ``tldr``           (TL;DR-like) prompt median 400, sigma 0.5, clipped [64, 1024]; chosen and rejected
                     independent, median 35, sigma 0.5, clipped [4, 128].

The text is bench_train.py's word salad cut to those token counts (:func:`bench_train.write_pairs`), ``--steps``
x ``--batch-size`` pairs: one epoch, so every side trains on every pair once.

Measured per training side: pairs/s and sequence tokens/s (2 |x| + |y_w| + |y_l| per pair: the tokens of the two
sequences, whatever the layout runs, so the layouts compare), over the steps after ``--warmup``, in wall and
process CPU seconds, and peak RSS. Our three sides train on the same batches (one schedule); TRL draws its own
order, so its tokens are counted from its batches (a bench-side wrapper of ``DPOTrainer.training_step``). Each
of our sides is checked to have run the layout it asked for (its ``metrics.jsonl``: padding fraction, positions).

The arithmetic printed beside the measurement, from the actual micro-batches: the padding fraction of the padded
path (padded positions that are padding), the shared-prompt fraction (prompt tokens / sequence tokens: what prefix
sharing saves of the positions), and the predicted step ratio from training FLOPs per step, 6 (N - N_head)
positions + 6 N_head (lm-head positions) + 12 L A (query, key) pairs, where the padded path's lm-head runs on
the last K + 1 positions of every row (K: the micro-batch's longest completion), the packed ones' on the
completion tokens only, and attention is dense over each row (SDPA computes every (query, key) pair of a row
under a mask: 2B T^2 padded, L^2 for a packed row of L positions). The same counts over the reference pass's
batches (its own: longest first, ``precompute_ref_batch_size`` 8 pairs) give its prediction. Raw figures of every
side go to ``results.json`` in the work dir.

Everything else is bench_train.py's (its functions, imported): the model (a random Llama of SmolLM-135M's shape,
134.5M parameters; ``--preset tiny`` for a smoke run), sigmoid loss with beta 0.1, AdamW lr 1e-6, linear schedule,
clipping 1.0, dropout off, no gradient checkpointing, the reference log-probs read from the cache the reference
stage wrote beforehand, ``--threads`` intra-op threads per process (default 1), ``--rounds`` rounds with the sides
interleaved (the order reversed every other round).
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
    our_config,
    peak_rss,
    run_ours,
    run_side,
    run_trl,
    start_child,  # noqa: E402
    summarize,
    write_pairs,
)

CASE = "fp32"  # bench_train.py's configuration case every side runs (one process, fp32)
SETTINGS = "bench-packing.json"  # in a set's work dir: what the children need beyond bench_train's arguments
# Per set: (prompt, completion) as (median, sigma, low, high) of a lognormal in tokens, before --length-scale.
DISTRIBUTIONS = {
    "ultrafeedback": ((160, 0.9, 16, 1024), (250, 0.7, 8, 1024)),
    "tldr": ((400, 0.5, 64, 1024), (35, 0.5, 4, 128)),
}
LAYOUTS = {
    "ours-shared": dict(padding_free=True, prefix_sharing=True),
    "ours-packed": dict(padding_free=True, prefix_sharing=False),
    "ours-padded": dict(padding_free=False),
}
BASELINE = "ours-padded"  # the ratios are against it
TRAIN_SIDES = (*LAYOUTS, "trl-precompute")  # ours-shared first: bench_train.summarize's ratios are against it
REFERENCE_LAYOUT = {"ref-padded": "ours-padded", "ref-shared": "ours-shared"}  # the reference sides' layouts
REFERENCE_SIDES = {side: LAYOUTS[layout] for side, layout in REFERENCE_LAYOUT.items()}
SIDES = (*TRAIN_SIDES, *REFERENCE_SIDES)


# ------------------------------------------------------------------------------------------------ setup (parent)
def sample_lengths(name: str, pairs: int, *, seed: int, scale: float) -> list[tuple[int, int, int]]:
    """``pairs`` (prompt, chosen, rejected) token counts of set ``name`` (:data:`DISTRIBUTIONS`), scaled."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    prompt, completion = DISTRIBUTIONS[name]

    def draw(median: float, sigma: float, low: int, high: int) -> list[int]:
        tokens = np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(pairs))), low, high)
        # At least 2: one word and BOS (prompt) or EOS (completion), never an empty text.
        return np.maximum(2, np.rint(tokens * scale)).astype(int).tolist()

    return list(zip(draw(*prompt), draw(*completion), draw(*completion), strict=True))


def layout_counts(lengths, rows) -> dict[str, int]:
    """One batch (``rows`` of the (prompt, chosen, rejected) length arrays) as each layout runs it in one forward:
    sequence and prompt tokens, and per layout the positions run, the lm-head positions and the dense attention
    (query, key) pairs (one packed row: the layouts' budget, ``max_packed_tokens``, is null without max_length)."""
    import numpy as np

    p, c, r = (side[rows] for side in lengths)
    pairs, width, longest = len(rows), int((p + np.maximum(c, r)).max()), int(np.maximum(c, r).max())
    sequences, shared, completions = int((2 * p + c + r).sum()), int((p + c + r).sum()), int((c + r).sum())
    counts = {"sequence_tokens": sequences, "prompt_tokens": int(p.sum())}
    for layout, positions, head, attention in (
        ("ours-padded", 2 * pairs * width, 2 * pairs * (longest + 1), 2 * pairs * width**2),
        ("ours-packed", sequences, completions, sequences**2),
        ("ours-shared", shared, completions, shared**2),
    ):
        counts |= {f"{layout}_positions": positions, f"{layout}_head": head, f"{layout}_attention": attention}
    return counts


def set_counts(work: Path, steps: int, batch: int) -> tuple[list[dict], dict[str, int]]:
    """:func:`layout_counts` of each optimizer step of our sides (one schedule, the same batches for the three
    layouts; gradient_accumulation_steps 1, so a step is one micro-batch), and summed over the reference pass's
    batches (the stage's own, longest first, ``precompute_ref_batch_size`` pairs)."""
    import numpy as np

    from pipeline.plan import Plan
    from pipeline.reference.stage import _batches
    from pipeline.schedule import TrainingSchedule
    from pipeline.tokenize.artifact import load_tokenized

    config = our_config(work, CASE, steps, per_device_train_batch_size=batch)
    table = load_tokenized(Plan.of(config).tokenized_dir, "train")
    ids = table.column("example_id").to_numpy()
    if len(ids) != steps * batch:  # the tokenize stage skipped some (identical completions): not one epoch
        sys.exit(f"{work}: {len(ids)} pairs tokenized of {steps * batch}; try another --seed")
    lengths = [table.column(f"{s}_length").to_numpy().astype(np.int64) for s in ("prompt", "chosen", "rejected")]
    schedule = TrainingSchedule.from_config(config, ids, 1)
    steps_counts = [layout_counts(lengths, np.searchsorted(ids, schedule.step_ids(s))) for s in range(steps)]
    reference = [layout_counts(lengths, rows) for rows in _batches(table, config.precompute_ref_batch_size)]
    return steps_counts, {key: sum(c[key] for c in reference) for key in reference[0]}


def model_flops(model_dir: Path):
    """:class:`pipeline.throughput.ModelFlops` of the model (built on the meta device: shapes only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.throughput import ModelFlops

    with torch.device("meta"):
        return ModelFlops.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))


def step_flops(counts: dict, layout: str, flops) -> float:
    """Training FLOPs of one step in ``layout`` (module docstring): matmuls over the positions run, the lm-head
    over its positions, dense attention over each row's (query, key) pairs."""
    body = flops.non_embedding_params - flops.lm_head_params
    return (
        6 * body * counts[f"{layout}_positions"]
        + 6 * flops.lm_head_params * counts[f"{layout}_head"]
        + 12 * flops.num_layers * flops.attention_width * counts[f"{layout}_attention"]
    )


# ------------------------------------------------------------------------------------------------ sides (children)
def run_layout(work: Path, side: str, args: argparse.Namespace, batch: int) -> dict:
    """One of our training sides, and what its ``metrics.jsonl`` says it ran (positions, padding) per step."""
    from pipeline.plan import Plan

    overrides = dict(per_device_train_batch_size=batch, **LAYOUTS[side])
    result = run_ours(work, CASE, args.steps, args.zero3_config, **overrides)
    train_dir = Plan.of(our_config(work, CASE, args.steps, args.zero3_config, **overrides)).train_dir
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # tokens_per_second counts the positions a step ran (the library's count): the layout check in the parent.
    return result | {
        "run_positions": [round(r["tokens_per_second"] * r["step_seconds"]) for r in steps],
        "padding_fraction": [r["padding_fraction"] for r in steps],
    }


def run_trl_batch(work: Path, args: argparse.Namespace, batch: int) -> dict:
    """bench_train.run_trl's precompute side at ``batch`` pairs per step, with the tokens of each step's batch."""
    import trl

    config_class = trl.DPOConfig
    # run_trl builds its DPOConfig with bench_train's batch of 2; this one sets the batch every side here runs.
    trl.DPOConfig = lambda **kwargs: config_class(**(kwargs | {"per_device_train_batch_size": batch}))
    tokens: list[int] = []
    positions: list[int] = []
    training_step = trl.DPOTrainer.training_step

    def counted_step(self, model, inputs, *rest, **kwargs):
        mask = inputs["attention_mask"]  # (2B, T), right-padded: chosen rows then rejected rows
        tokens.append(int(mask.sum()))
        positions.append(mask.numel())
        return training_step(self, model, inputs, *rest, **kwargs)

    trl.DPOTrainer.training_step = counted_step
    result = run_trl(work, CASE, args.steps, precompute=True)
    return result | {"sequence_tokens": tokens, "run_positions": positions}


def run_reference(work: Path, side: str, args: argparse.Namespace, batch: int) -> dict:
    """The reference pass over the set in ``side``'s layout, into a fresh directory: its manifest's counts."""
    import shutil

    from pipeline.plan import Plan
    from pipeline.reference.stage import compute_reference_logps

    layout = REFERENCE_SIDES[side]
    config = our_config(work, CASE, args.steps, args.zero3_config, per_device_train_batch_size=batch, **layout)
    plan = Plan.of(config)
    out_dir = work / f"bench-{side}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a complete artifact would be returned as is, not recomputed
    compute_reference_logps(
        config, tokenized_dir=plan.tokenized_dir, model_dir=plan.model_dir, out_dir=out_dir, splits=["train"]
    )
    counts = json.loads((out_dir / "manifest.json").read_text())["counts"]
    return {key: counts[key] for key in ("tokens", "forwards", "seconds", "tokens_per_s")} | {
        "peak_rss": peak_rss(),
        "main": True,
    }


def child(args: argparse.Namespace) -> None:
    work = start_child(args)  # bench_train.py's: threads, seed, and the shared prepare side
    if work is None:
        return
    batch = json.loads((work / SETTINGS).read_text())["batch_size"]
    if args.side in LAYOUTS:
        result = run_layout(work, args.side, args, batch)
    elif args.side in REFERENCE_SIDES:
        result = run_reference(work, args.side, args, batch)
    else:
        result = run_trl_batch(work, args, batch)
    if result.pop("main"):
        print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ orchestration
def check_layouts(name: str, rounds: dict[str, list[dict]], counts: list[dict]) -> None:
    """Each of our sides ran the layout it asked for (a model that failed the stage's probe would have run padded
    rows): packed sides their layout's positions and no padding, the padded side the sequence tokens and its
    padding fraction, per step."""
    for side, results in rounds.items():
        if side not in LAYOUTS:
            continue
        padded = side == BASELINE
        positions = [c["sequence_tokens" if padded else f"{side}_positions"] for c in counts]
        padding = [1 - c["sequence_tokens"] / c[f"{BASELINE}_positions"] if padded else 0.0 for c in counts]
        for result in results:
            off = max(abs(a - b) for a, b in zip(result["padding_fraction"], padding, strict=True))
            if result["run_positions"] != positions or off > 1e-6:
                sys.exit(
                    f"{name} {side}: ran {result['run_positions']} positions per step with padding "
                    f"{result['padding_fraction']}, expected {positions} and {padding}"
                )


def fractions(counts: list[dict]) -> dict[str, float]:
    """The arithmetic of the set's steps: padding of the padded path, the prompt's share of the sequences."""
    total = {key: sum(c[key] for c in counts) for key in counts[0]}
    return {
        "padding": 1 - total["sequence_tokens"] / total[f"{BASELINE}_positions"],
        "shared_prompt": total["prompt_tokens"] / total["sequence_tokens"],
    }


def throughput_table(
    name: str, rounds: dict[str, list[dict]], counts: list[dict], args: argparse.Namespace, model_dir: Path
) -> list[str]:
    """Pairs/s and sequence tokens/s after the warmup (median over rounds), against ours-padded, with the FLOP
    prediction for our layouts and peak RSS."""
    timed = counts[args.warmup :]

    def rate(side: str, key: str) -> tuple[float, float]:
        """(pairs/s, sequence tokens/s) over the timed steps, on ``key`` seconds, median over rounds."""
        per_round = []
        for result in rounds[side]:
            seconds = sum(result[key][args.warmup :])
            if side in LAYOUTS:
                tokens = sum(c["sequence_tokens"] for c in timed)
            else:
                tokens = sum(result["sequence_tokens"][args.warmup :])
            per_round.append((args.batch_size * len(result[key][args.warmup :]) / seconds, tokens / seconds))
        return statistics.median(p for p, _ in per_round), statistics.median(t for _, t in per_round)

    wall = {side: rate(side, "step_seconds") for side in rounds}
    cpu = {side: rate(side, "cpu_seconds") for side in rounds}
    model = model_flops(model_dir)
    flops = {side: sum(step_flops(c, side, model) for c in timed) for side in LAYOUTS}
    gib = 1024**3
    lines = [
        f"| side | pairs/s | sequence tokens/s | x {BASELINE} (wall) | x {BASELINE} (CPU) | x {BASELINE}, "
        "FLOPs | positions per step | peak RSS GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side in rounds:
        if side in LAYOUTS:
            predicted = f"{flops[BASELINE] / flops[side]:.2f}"
            positions = statistics.mean(c[f"{side}_positions"] for c in timed)
        else:
            predicted = ""
            positions = statistics.mean(statistics.mean(r["run_positions"][args.warmup :]) for r in rounds[side])
        rss = statistics.median(r["peak_rss"] for r in rounds[side])
        lines.append(
            f"| {side} | {wall[side][0]:.3f} | {wall[side][1]:.0f} | {wall[side][1] / wall[BASELINE][1]:.2f} | "
            f"{cpu[side][1] / cpu[BASELINE][1]:.2f} | {predicted} | {positions:.0f} | {rss / gib:.2f} |"
        )
    return lines + [""]


def reference_table(rounds: dict[str, list[dict]], counts: dict[str, int], model_dir: Path) -> list[str]:
    """The reference pass's tokens/s (its manifest's: the two sequences' tokens per second), median over rounds,
    with the FLOP prediction (forward FLOPs are a third of each term of :func:`step_flops`: the same ratio)."""
    gib = 1024**3
    rate = {side: statistics.median(r["tokens_per_s"] for r in rounds[side]) for side in rounds}
    model = model_flops(model_dir)
    flops = {side: step_flops(counts, layout, model) for side, layout in REFERENCE_LAYOUT.items()}
    lines = [
        "| reference pass | forwards | seconds | sequence tokens/s | x ref-padded | x ref-padded, FLOPs | positions "
        "| peak RSS GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side, results in rounds.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rss = statistics.median(r["peak_rss"] for r in results)
        lines.append(
            f"| {side} | {results[0]['forwards']} | {seconds:.2f} | {rate[side]:.0f} | "
            f"{rate[side] / rate['ref-padded']:.2f} | {flops['ref-padded'] / flops[side]:.2f} | "
            f"{counts[REFERENCE_LAYOUT[side] + '_positions']} | {rss / gib:.2f} |"
        )
    return lines + [""]


def prepare_set(work: Path, name: str, args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """The set's work dir: the shared model (a link), its data, its settings, its tokenized and reference
    artifacts (bench_train's prepare side)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").exists():
        (work / "model").symlink_to(work.parent / "model", target_is_directory=True)
    lengths = sample_lengths(name, args.steps * args.batch_size, seed=args.seed, scale=args.length_scale)
    settings = {"batch_size": args.batch_size, "lengths": lengths}
    if not (work / SETTINGS).is_file() or json.loads((work / SETTINGS).read_text()) != settings:
        write_pairs(work / "data", work / "model", lengths)
        (work / SETTINGS).write_text(json.dumps(settings))
    run_side(work, "prepare", CASE, args, __file__)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="134m")
    parser.add_argument("--sets", default=",".join(DISTRIBUTIONS), help="comma-separated: " + ", ".join(DISTRIBUTIONS))
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, with {BASELINE}, ref-padded")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (per device, no accumulation)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per side and round (one epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the rates")
    parser.add_argument("--length-scale", type=float, default=0.25, help="every drawn length times this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths")
    add_side_arguments(parser, SIDES, CASE)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    sides = args.sides.split(",")
    sets = args.sets.split(",")
    if set(sides) - set(SIDES) or set(sets) - set(DISTRIBUTIONS):
        parser.error(f"--sides: any of {', '.join(SIDES)}; --sets: any of {', '.join(DISTRIBUTIONS)}")
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    train_sides = [s for s in TRAIN_SIDES if s in sides]  # ours-shared first: summarize's ratios
    reference_sides = [s for s in REFERENCE_SIDES if s in sides]
    if (train_sides and BASELINE not in train_sides) or (reference_sides and "ref-padded" not in reference_sides):
        parser.error(f"--sides: the ratios need {BASELINE} (training) and ref-padded (reference pass)")

    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-packing-"))
    if not (work / "model").is_dir():
        build_model(work / "model", args.preset)
    load_before = Path("/proc/loadavg").read_text().strip()
    print(
        f"{args.preset} preset; batch {args.batch_size} pairs, fp32, 1 process; {args.steps} steps, rates after "
        f"{args.warmup}; {args.rounds} rounds; length scale {args.length_scale}, seed {args.seed}; {args.threads} "
        f"thread(s) per process; work dir {work}; /proc/loadavg before: {load_before}",
        flush=True,
    )
    started = time.perf_counter()
    counts, reference_counts = {}, {}
    for name in sets:
        prepare_set(work / name, name, args)
        counts[name], reference_counts[name] = set_counts(work / name, args.steps, args.batch_size)
    order = train_sides + reference_sides
    rounds: dict[str, dict[str, list[dict]]] = {name: {side: [] for side in order} for name in sets}
    for round_ in range(args.rounds):
        for name in sets:
            for side in order if round_ % 2 == 0 else reversed(order):
                result = run_side(work / name, side, CASE, args, __file__)
                rounds[name][side].append(result)
                if side in REFERENCE_SIDES:
                    said = f"{result['tokens_per_s']:.0f} tokens/s"
                else:
                    said = f"step {statistics.median(result['step_seconds'][args.warmup :]):.2f} s wall"
                print(f"  round {round_ + 1} {name} {side}: {said}, load {os.getloadavg()[0]:.1f}", flush=True)
    (work / "results.json").write_text(json.dumps(rounds))  # every side's raw figures, for a second look
    report = []
    for name in sets:
        training = {side: rounds[name][side] for side in train_sides}
        share = fractions(counts[name])
        lengths = json.loads((work / name / SETTINGS).read_text())["lengths"]
        medians = [statistics.median(side) for side in zip(*lengths, strict=True)]
        report += [
            f"## {name}",
            "",
            f"{len(lengths)} pairs; drawn median tokens prompt {medians[0]:.0f}, chosen {medians[1]:.0f}, "
            f"rejected {medians[2]:.0f}; padding fraction of the padded path {share['padding']:.3f}; "
            f"shared-prompt fraction {share['shared_prompt']:.3f}",
            "",
        ]
        if "trl-precompute" in training:  # the same pairs over the run, tokenized alike: the same total
            trl_tokens = sum(training["trl-precompute"][0]["sequence_tokens"])
            ours = sum(c["sequence_tokens"] for c in counts[name])
            report += [f"sequence tokens over the run: TRL's batches {trl_tokens}, ours {ours}", ""]
        if training:
            check_layouts(name, training, counts[name])
            STATE_BYTES[name] = dict.fromkeys(training, 16)  # fp32 AdamW on every side: 16 bytes per parameter
            report += summarize(name, training, args.warmup)
            report += throughput_table(name, training, counts[name], args, work / "model")
        if reference_sides:
            reference = {side: rounds[name][side] for side in reference_sides}
            report += reference_table(reference, reference_counts[name], work / "model")
    load_after = Path("/proc/loadavg").read_text().strip()
    print("\n".join(report), flush=True)
    print(f"/proc/loadavg after: {load_after}; {time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
