"""The pipeline's Prefect tasks: one per stage, cached by artifact fingerprint.

* **Cache key = artifact fingerprint.** A stage task gets the content-addressed directory of its artifact
  (``<output_dir>/<stage>/<fingerprint[:16]>``, computed from the inputs before any work) and its cache key is
  ``<task>-<that directory name>``: the content, not the config path or the run. Unchanged inputs give a
  ``Cached`` state and no job at all; a changed ``beta`` changes only the training fingerprint.
* **Cache records live beside the artifacts** (``<output_dir>/prefect-cache``), so two output directories
  never answer for each other, and deleting an output directory deletes its records too.
* **Prefect's cache is a shortcut, never the truth.** A task whose artifact is not intact on disk (no
  manifest, or a listed file missing or modified) refreshes its record (runs, then overwrites it), so a
  ``Cached`` state always means the files are there as committed. And every stage itself reuses a complete
  artifact, rebuilds an unusable one, and resumes a partial one, without Prefect.
* **Every stage is a job** through :func:`pipeline.launch.run_stage`, in its own process group, its output and
  progress streamed by :class:`flows.jobs.JobOutput`: the reference pass and training with ``num_processes``
  ranks under the launcher, tokenizing as one plain process. So the flow's process never imports torch (nor
  transformers, which imports it), and a job's failure is its own.
* **Retries** (:data:`JOB_RETRIES`) for the reference pass and training: a retried reference
  pass keeps its committed shards and a retried training resumes from its last DeepSpeed checkpoint, because
  that is what the stages do when rerun. A job that refused its input (bad config, data or artifact) or hit a
  storage fault (no space, a read-only output_dir, a file in the way) is not retried: the same input would be
  refused again, the same write fail again, until the user acts.
* **TR-DPO** is the training task like plain DPO: one job syncs and re-scores every window in place
  (:mod:`pipeline.train.tr_dpo`), so a retry resumes from its last checkpoint.

Trade-offs: the cache key holds the first 16 hex digits of the fingerprint (64 bits, as the directory name
does). Tasks run one after the other in the flow's process, which mostly waits on its jobs; the stages depend
on each other, so there is nothing to run in parallel.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from flows.jobs import JobOutput
from pipeline import launch
from pipeline.artifacts import MANIFEST, read_manifest, storage_error
from pipeline.config import DPOPipelineConfig
from pipeline.errors import ArtifactError, PipelineError

CACHE_DIR = "prefect-cache"
JOB_RETRIES = 2
JOB_RETRY_DELAY_S = 10


def _worth_retrying(task, task_run, state) -> bool:
    """Retry crashes and kills (the stage resumes); not input the stage refused, nor a storage fault (a full or
    read-only disk, a file in the way), which would be refused again until the user acts."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, OSError):
        return storage_error(error) is None
    return not isinstance(error, PipelineError)


def _artifact_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"{context.task.name}-{Path(parameters['artifact']).name}"


def _stage_task(name: str, *, retries: int = 0) -> Callable:
    return task(
        name=name,
        cache_key_fn=_artifact_key,
        persist_result=True,
        retries=retries,
        retry_delay_seconds=JOB_RETRY_DELAY_S,
        retry_condition_fn=_worth_retrying,
    )


def _intact(artifact: Path) -> bool:
    """The artifact is committed and every file its manifest lists is there with its recorded hash: a cache
    record may answer for it. (A missing or modified file makes the task run: the stage rebuilds what is bad.)"""
    try:
        manifest = json.loads((artifact / MANIFEST).read_text())
        read_manifest(artifact, kind=manifest["kind"])
    except (OSError, ValueError, KeyError, ArtifactError):
        return False
    return True


def run_cached(stage_task, config: DPOPipelineConfig, artifact: Path, **kwargs: Any) -> str:
    """Run ``stage_task(config, artifact, **kwargs)`` with its cache records under the output dir, refreshed
    when ``artifact`` is not committed on disk."""
    configured = stage_task.with_options(
        result_storage=config.output_path / CACHE_DIR, refresh_cache=not _intact(artifact)
    )
    return configured(config, str(artifact), **kwargs)


def run_job(
    stage: str,
    config: DPOPipelineConfig,
    *,
    artifact: str,
    extra_args: tuple[str, ...] = (),
    timeout: float | None = None,
) -> None:
    """A stage as a launcher job, its output in this task's log and its progress in the ``<stage>-progress``
    artifact (under TR-DPO the training bar counts all steps, so it shows the whole run across windows)."""
    output = JobOutput(stage, f"{stage}-progress", f"{stage} -> {artifact}")
    launch.run_stage(stage, config, extra_args=extra_args, on_line=output, timeout=timeout)
    output.finish()


# ---------------------------------------------------------------------------------------------- stage tasks
@_stage_task("tokenize")
def tokenize_task(config: DPOPipelineConfig, artifact: str) -> str:
    # A process of its own (no launcher: one process, no model): transformers imports torch, which must stay
    # out of the Prefect process, and dataset_num_proc forks its workers from there, not from Prefect's threads.
    run_job("tokenize", config, artifact=artifact)
    return artifact


@_stage_task("reference-pass", retries=JOB_RETRIES)
def reference_task(config: DPOPipelineConfig, artifact: str, timeout: float | None = None) -> str:
    run_job("reference", config, artifact=artifact, timeout=timeout)
    return artifact


@_stage_task("train", retries=JOB_RETRIES)
def train_task(config: DPOPipelineConfig, artifact: str, timeout: float | None = None) -> str:
    run_job("train", config, artifact=artifact, timeout=timeout)
    return artifact
