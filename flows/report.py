"""What a finished run shows: Prefect artifacts in the UI and a short report on the console.

* ``dpo-final-metrics`` (table): every scalar of the run's ``summary.json`` (losses, reward accuracies and
  margins, steps, batch size, and whatever the TR-DPO driver adds), so new summary fields appear unasked.
* ``dpo-run-report`` (markdown): the plots, inlined as base64 PNG data URIs (the UI cannot read the worker's
  disk; the three plots are a few tens of kB each), and the manifest of every artifact the run read or wrote
  (as ``summary.json`` names them; under TR-DPO also each window's reference and each reference version):
  path, kind, fingerprint and counts.
* :func:`format_report`: the console lines ``dpo-pipeline run`` prints.

Trade-off: inlined plots make each report about 100 kB in the Prefect database; links to files would be
smaller but dead wherever the UI runs away from the training machine.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.artifacts import read_manifest
from pipeline.config import DPOPipelineConfig
from pipeline.metrics import read_summary
from pipeline.plan import TRAIN_KIND
from pipeline.reference import cache as reference
from pipeline.tokenize import artifact as tokenized
from pipeline.train.windows import VERSION_KIND, window_dir


def _scalars(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"metric": key, "value": value}
        for key, value in summary.items()
        if value is None or isinstance(value, (int, float))
    ]


def _artifacts(config: DPOPipelineConfig, summary: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """(label, kind, directory) of every artifact the run read or wrote, as its summary names them."""
    paths = summary["paths"]
    found = [("tokenized", tokenized.KIND, paths["tokenized"])]
    found += [(label, reference.KIND, path) for label, path in paths.items() if label.startswith("reference_")]
    if "tr_dpo" in summary:
        windows = range(len(summary["tr_dpo"]["windows"]))
        run_dir = Path(summary["run_dir"])
        found += [(f"window {k} reference", reference.KIND, window_dir(run_dir, k)) for k in windows]
        found += [(f"reference v{k}", VERSION_KIND, path) for k, path in enumerate(summary["tr_dpo"]["versions"])]
    found.append(("train", TRAIN_KIND, summary["run_dir"]))
    # One row per directory: a later, more specific label ("window 1 reference" for "reference_train") replaces
    # an earlier one, and the row keeps the place where the directory first appeared.
    unique = {}
    for label, kind, path in found:
        unique[Path(path)] = (label, kind)
    return [(label, kind, path) for path, (label, kind) in unique.items()]


def _manifest_table(config: DPOPipelineConfig, summary: dict[str, Any]) -> list[str]:
    rows = ["| artifact | kind | fingerprint | path | counts |", "|---|---|---|---|---|"]
    for label, kind, directory in _artifacts(config, summary):
        manifest = read_manifest(directory, kind=kind, verify_files=False)
        counts = json.dumps(manifest.get("counts", {}), sort_keys=True)
        rows.append(f"| {label} | {kind} | `{manifest['fingerprint'][:16]}` | `{directory}` | {counts} |")
    return rows


def publish_report(config: DPOPipelineConfig, run_dir: str | Path) -> None:
    """Create the run's table and markdown artifacts from its training ``summary.json``."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    create_table_artifact(key="dpo-final-metrics", table=_scalars(summary), description=f"Final metrics of {run_dir}")
    lines = [
        f"# DPO run `{run_dir.name}`",
        "",
        (
            f"eval reward accuracy **{summary.get('eval_reward_accuracy')}**, train reward accuracy "
            f"**{summary.get('train_reward_accuracy')}** after {summary.get('num_steps')} steps"
        ),
        "",
        "## Plots",
        "",
    ]
    for name, plot in summary["paths"]["plots"].items():
        encoded = base64.b64encode(Path(plot).read_bytes()).decode()
        lines += [f"### {name}", f"![{name}](data:image/png;base64,{encoded})", f"`{plot}`", ""]
    lines += [
        "## Artifacts",
        "",
        *_manifest_table(config, summary),
        "",
        f"Model: `{summary['paths']['model']}`  ",
        f"Metrics: `{summary['paths']['metrics']}`  ",
        f"Job logs: `{config.output_path / 'logs'}`",
    ]
    create_markdown_artifact(
        key="dpo-run-report", markdown="\n".join(lines), description=f"Plots and artifact manifests of {run_dir}"
    )


def format_report(config: DPOPipelineConfig, paths: dict[str, str]) -> str:
    """The console summary of a finished run: where every artifact, plot and log is."""
    summary = read_summary(paths["train"])
    plots = list(summary["paths"]["plots"].values())
    width = max(len(label) for label in [*paths, "model", "metrics", "plots", "logs"])
    lines = ["DPO pipeline finished:"]
    lines += [f"  {label:<{width}}  {path}" for label, path in paths.items()]
    lines += [
        f"  {'model':<{width}}  {summary['paths']['model']}",
        f"  {'metrics':<{width}}  {summary['paths']['metrics']}",
        f"  {'plots':<{width}}  {Path(plots[0]).parent}/ ({', '.join(Path(p).name for p in plots)})",
        f"  {'logs':<{width}}  {config.output_path / 'logs'}",
        (
            f"  eval reward accuracy {summary.get('eval_reward_accuracy')}, "
            f"train reward accuracy {summary.get('train_reward_accuracy')} ({summary.get('num_steps')} steps)"
        ),
    ]
    return "\n".join(lines)
