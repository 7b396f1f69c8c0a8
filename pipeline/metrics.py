"""Training metrics on disk: ``metrics.jsonl``, the PNG plots and ``summary.json`` of a training run dir.

* ``metrics.jsonl``: one JSON object per line. A train record has ``step`` (optimizer steps done, 1-based),
  ``epoch``, the loss and each loss term, ``rewards/*``, ``logps/*``, ``learning_rate``, ``grad_norm``,
  ``padding_fraction`` and the throughput of :data:`TIMED_KEYS`; an eval record has ``step`` and ``eval_*``
  keys. Lines are appended as training goes (so a crashed run keeps its curve) and :meth:`MetricsLog.restart`
  cuts the file back to a checkpoint's step on resume, so a resumed run's file equals an uninterrupted run's
  (a half-written last line is dropped).
* plots: ``plots/loss.png``, ``plots/reward_accuracy.png``, ``plots/reward_margins.png``, train and eval
  curves on one axis each (matplotlib, Agg backend: no display needed).
* ``summary.json``: the final train and eval metrics, fingerprints and paths. It is not part of the
  training manifest's hashed files, so the TR-DPO driver can add fields with :func:`update_summary`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_path, atomic_write_json, atomic_write_text, storage_errors
from pipeline.errors import ArtifactError

METRICS_FILE = "metrics.jsonl"
# The keys of a train record measured by the clock (pipeline/throughput.py): the rest of a record is a function
# of the config and the data, equal bit for bit between a run and its resumed or re-ranked twin.
TIMED_KEYS = ("tokens_per_second", "tokens_per_second_per_device", "tflops_per_device", "mfu", "step_seconds")
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"
# plot file -> (title, train key, eval key)
PLOTS = {
    "loss.png": ("loss", "loss", "eval_loss"),
    "reward_accuracy.png": ("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
    "reward_margins.png": ("reward margin (chosen - rejected)", "rewards/margins", "eval_rewards/margins"),
}


class MetricsLog:
    """Append-only ``metrics.jsonl``, written by the main process only."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break  # a kill during the last append leaves a partial line: that step is redone on resume
                raise ArtifactError(f"{self.path} line {number}: not valid JSON") from None
        return records

    def restart(self, through_step: int) -> None:
        """Keep the records of steps <= ``through_step`` (0: none), i.e. the state of the resumed checkpoint."""
        kept = [r for r in self.records() if r["step"] <= through_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        with storage_errors(self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def last_record(records: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The last record that has ``key`` (train records have ``loss``, eval records ``eval_loss``), or {}."""
    return next((r for r in reversed(records) if key in r), {})


def write_plots(records: list[dict[str, Any]], run_dir: Path) -> dict[str, str]:
    """The three PNGs of the run; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for name, (title, train_key, eval_key) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label, style in (
            (train_key, "train", {"linewidth": 0.8, "alpha": 0.7}),
            (eval_key, "eval", {"marker": "o", "linewidth": 1.5}),
        ):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=label, **style)
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / PLOTS_DIR / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        paths[name.removesuffix(".png")] = str(path)
    return paths


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise ArtifactError(f"no {SUMMARY_FILE} in {run_dir}: the training run has not finished")
    return json.loads(path.read_text())


def update_summary(run_dir: str | Path, **fields: Any) -> None:
    """Add or replace top-level fields of ``summary.json`` (atomically)."""
    summary = read_summary(run_dir)
    summary.update(fields)
    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)
