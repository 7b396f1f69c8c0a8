"""TR-DPO in one live job against plain DPO: wall time, the cost of one sync, memory, the mix against model size.

    .venv/bin/python bench/bench_tr_dpo.py                      # all three parts (about 15 min on 2 cores)
    .venv/bin/python bench/bench_tr_dpo.py --parts run --rounds 1

Parts, each side in its own process:

* ``run``: the shipped tiny config (configs/default.yaml) cut to 60 steps, through ``dpo-pipeline run`` (the
  whole Prefect flow: tokenize, reference pass, training) with ``sync_ref_model: true`` and tau = 6 (10 windows,
  9 syncs) against the same 60 steps of plain DPO, in fresh output directories, the two sides interleaved over
  ``--rounds``. Reported: the wall-time ratio of the commands, and the marginal cost of one sync from the
  training stages' own wall time (``stage_seconds`` in ``summary.json``): (TR-DPO - plain) / syncs, split into
  the mix (``mix_seconds`` of the version manifests), the re-score (``seconds`` of the window artifacts) and the
  rest (swapping the reference in and out, the window artifact's checks and writes). Note the flows differ in
  more than the syncs: under TR-DPO the reference stage scores the eval split only and each window's examples
  are scored in the training job (960 examples here), where plain DPO's reference stage scores all 4,400.
* ``memory``: a 134M Llama (SmolLM-135M's shape, fp32, ZeRO stage 0, one process) trained 12 steps from the
  reference stage's cache, plain and TR-DPO with tau = 6 (one sync), in-process with a 5 ms RSS sampler
  tagged by phase (bench-side wrappers of the training step and of the window start). Reported: the peak RSS
  during training steps of each side (TR-DPO's includes the reference's host slices, reported separately from
  ``summary.json``), and TR-DPO's peak during its sync.
* ``mix``: :meth:`pipeline.train.tr_dpo.ReferenceSlices.mix` alone on Llamas of 3 sizes (one rank: the whole model is
  the slice; with N ranks each mixes 1/N), median of 5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

RUN_STEPS, RUN_TAU = 60, 6
MEMORY_STEPS, MEMORY_TAU = 12, 6
MIX_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2),
    "25m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8),
    "134m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30),
}


# ------------------------------------------------------------------------------------------------ run
def run_side(work: Path, side: str, round_: int) -> dict:
    out = work / f"run-{side}-{round_}"
    overrides = [
        f"output_dir={out}",
        f"max_steps={RUN_STEPS}",
        f"ref_model_sync_steps={RUN_TAU}",
        f"sync_ref_model={'true' if side == 'tr-dpo' else 'false'}",
        "eval_steps=30",
        "save_steps=30",
    ]
    command = [str(Path(sys.executable).parent / "dpo-pipeline"), "run", "--config", "configs/default.yaml", *overrides]
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{side}: dpo-pipeline run failed\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = json.loads(next(out.glob("train/*/summary.json")).read_text())
    return {
        "wall": wall,
        "stage": summary["stage_seconds"],
        "tr_dpo": summary.get("tr_dpo"),
        "accuracy": summary["eval_reward_accuracy"],
    }


def part_run(work: Path, rounds: int) -> dict:
    results = {"plain": [], "tr-dpo": []}
    for round_ in range(rounds):
        for side in ("plain", "tr-dpo") if round_ % 2 == 0 else ("tr-dpo", "plain"):
            results[side].append(run_side(work, side, round_))
            print(f"  run {side} round {round_}: {results[side][-1]['wall']:.1f} s", flush=True)
    med = {
        side: {key: statistics.median(r[key] for r in runs) for key in ("wall", "stage")}
        for side, runs in results.items()
    }
    tr = results["tr-dpo"][-1]["tr_dpo"]
    syncs = len(tr["windows"]) - 1
    mix = statistics.fmean(tr["mix_seconds"])
    score = statistics.fmean(tr["score_seconds"][1:])
    marginal = (med["tr-dpo"]["stage"] - med["plain"]["stage"]) / syncs
    return {
        "wall": med,
        "ratio": med["tr-dpo"]["wall"] / med["plain"]["wall"],
        "syncs": syncs,
        "stage_ratio": med["tr-dpo"]["stage"] / med["plain"]["stage"],
        "per_sync": {"marginal": marginal, "mix": mix, "score": score, "rest": marginal - mix - score},
        "window0_score": tr["score_seconds"][0],
        "accuracy": {side: [r["accuracy"] for r in runs] for side, runs in results.items()},
    }


# ------------------------------------------------------------------------------------------------ memory
class PhasePeaks:
    """Samples RSS every 5 ms; keeps the peak per phase (the phase is set by the wrappers below)."""

    def __init__(self):
        import psutil

        self.phase, self.peaks, self._stop = "setup", {}, threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = self._process.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def memory_child(work: Path, side: str) -> dict:
    import bench_train
    import torch

    from pipeline.reference.stage import reference_stage
    from pipeline.tokenize.stage import tokenize_stage
    from pipeline.train import tr_dpo
    from pipeline.train.stage import DPOTrainingRecipe, train_stage

    torch.set_num_threads(2)
    config = bench_train.our_config(
        work,
        f"memory-{side}",
        MEMORY_STEPS,
        model_name_or_path=str(work / "model-134m"),
        sync_ref_model=side == "tr-dpo",
        ref_model_sync_steps=MEMORY_TAU,
    )
    tokenize_stage(config)
    reference_stage(config)
    peaks = PhasePeaks()
    step, sync = DPOTrainingRecipe.train_step, tr_dpo.TRDPOWindows.before_step

    def timed_step(self, index):
        peaks.phase = "steps"
        try:
            return step(self, index)
        finally:
            peaks.phase = "between"

    def timed_sync(self, index):
        opens = self.plan.window_of(index) > self.version
        peaks.phase = "sync" if opens else peaks.phase
        try:
            return sync(self, index)
        finally:
            peaks.phase = "between" if opens else peaks.phase

    DPOTrainingRecipe.train_step, tr_dpo.TRDPOWindows.before_step = timed_step, timed_sync
    with peaks:
        run_dir = train_stage(config)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"peaks": peaks.peaks, "slice_bytes": (summary.get("tr_dpo") or {}).get("reference_slice_bytes_per_rank")}


def part_memory(work: Path) -> dict:
    import bench_train

    if not (work / "model-134m").is_dir():
        bench_train.build_model(work / "model-134m", "134m")
        bench_train.write_dataset(work / "data", work / "model-134m", pairs=64, prompt_tokens=96, completion_tokens=64)
    out = {}
    for side in ("plain", "tr-dpo"):
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", side, "--work", str(work)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"memory {side} failed\n{done.stderr[-3000:]}")
        out[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  memory {side}: {out[side]}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ mix
class _Engine:
    """What ReferenceSlices reads of an engine: its module (one rank, ZeRO stage 0)."""

    def __init__(self, module):
        self.module = module


def part_mix() -> dict:
    import torch
    from llama import random_llama

    from pipeline.distributed import prepare_environment
    from pipeline.train.tr_dpo import ReferenceSlices

    prepare_environment()
    torch.set_num_threads(2)
    out = {}
    for name, shape in MIX_SIZES.items():
        model = random_llama(
            **shape,
            num_attention_heads=8 if shape["hidden_size"] > 64 else 4,
            num_key_value_heads=2,
            vocab_size=49152 if name != "tiny" else 512,
        )
        slices = ReferenceSlices(_Engine(model), zero3=False, on_device=False)
        seconds = []
        for _ in range(5):
            started = time.perf_counter()
            slices.mix(0.6)
            seconds.append(time.perf_counter() - started)
        parameters = sum(p.numel() for p in model.parameters())
        out[name] = {
            "parameters": parameters,
            "seconds": statistics.median(seconds),
            "gb_per_s": parameters * 4 * 3 / statistics.median(seconds) / 1e9,
        }  # read 2, write 1
        print(f"  mix {name}: {out[name]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-tr-dpo"))
    parser.add_argument("--parts", default="run,memory,mix")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.memory_child:
        print(json.dumps(memory_child(args.work, args.memory_child)))
        return
    results = {}
    parts = args.parts.split(",")
    if "run" in parts:
        results["run"] = part_run(args.work, args.rounds)
    if "memory" in parts:
        results["memory"] = part_memory(args.work)
    if "mix" in parts:
        results["mix"] = part_mix()
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
