"""TR-DPO's windows: which optimizer steps each reference version serves, which examples it scores, and where
each version and each window's scores live in the run directory. No torch: reports read this layout too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DPOPipelineConfig
from pipeline.errors import ConfigError
from pipeline.schedule import TrainingSchedule

VERSION_KIND = "reference_version"
VERSION_SCHEMA = 2


def window_bounds(config: DPOPipelineConfig, schedule: TrainingSchedule) -> list[tuple[int, int]]:
    """``[(k*tau, min((k+1)*tau, num_steps)), ...]``: the optimizer steps of each window."""
    tau = config.ref_model_sync_steps
    return [(start, min(start + tau, schedule.num_steps)) for start in range(0, schedule.num_steps, tau)]


@dataclass(frozen=True)
class WindowPlan:
    """The windows of a run: its schedule and each window's steps and examples."""

    schedule: TrainingSchedule
    bounds: list[tuple[int, int]]

    @classmethod
    def of(cls, config: DPOPipelineConfig, schedule: TrainingSchedule) -> WindowPlan:
        return cls(schedule, window_bounds(config, schedule))

    def window(self, k: int) -> tuple[int, int]:
        if not 0 <= k < len(self.bounds):
            raise ConfigError(f"window {k} does not exist: this run has windows 0 to {len(self.bounds) - 1}")
        return self.bounds[k]

    def window_of(self, step: int) -> int:
        """The window that step ``step`` (0-based) belongs to."""
        return min(step // (self.bounds[0][1] - self.bounds[0][0]), len(self.bounds) - 1)

    def example_ids(self, k: int) -> np.ndarray:
        """The distinct examples window k consumes, sorted: what its reference pass scores."""
        return np.unique(self.schedule.window_ids(*self.window(k)))


def version_dir(run_dir: Path, k: int) -> Path:
    """``<train run dir>/references/v<k>``: the manifest of reference version k (and its export, if asked)."""
    return run_dir / "references" / f"v{k}"


def window_dir(run_dir: Path, k: int) -> Path:
    """``<train run dir>/windows/<k>/reference``: window k's reference log-probs."""
    return run_dir / "windows" / str(k) / "reference"


def read_versions(run_dir: Path) -> list[dict[str, Any]]:
    """The version manifests of a TR-DPO run, in order (for reports and audits)."""
    out, k = [], 0
    while (version_dir(run_dir, k) / "manifest.json").is_file():
        out.append(json.loads((version_dir(run_dir, k) / "manifest.json").read_text()))
        k += 1
    return out
