"""The pipeline as Prefect flows: one per stage and ``dpo-pipeline`` for the whole run.

    dpo-pipeline run --config configs/default.yaml          # this flow, locally, on a temporary Prefect API

Features:

* **Flows** ``dpo-tokenize``, ``dpo-reference``, ``dpo-train`` and ``dpo-pipeline`` (tokenize -> reference
  pass -> train; under TR-DPO the training task is one job that syncs and re-scores every window in place).
  Their parameters are JSON (a config path, an overrides dict, a job timeout), so deployments and the UI can
  set them; the config is validated first thing, so a bad value fails the run at once with the config's own
  message, before any tokenizing.
* **Caching and retries** by artifact fingerprint: see :mod:`flows.tasks`.
* **No orphan process**: DeepSpeed jobs run in their own process groups, ended on cancellation and crash by
  the flows' hooks and on timeout by the launcher (see :mod:`flows.jobs`).
* **Prefect artifacts**: a progress bar per long stage while it runs, then the final metrics table and a
  markdown report with the plots and the artifact manifests (:mod:`flows.report`).
* **One run per output directory**: every flow holds the output directory's lock (:mod:`pipeline.lock`) for
  its whole run, so an overlapping run (a scheduled deployment running long, a second ``dpo-pipeline run``)
  waits for it, or fails at once with ``output_dir_lock: fail``; the jobs a flow starts inherit the lock.
* :func:`run_pipeline` is what ``dpo-pipeline run`` calls: it checks the Prefect API first (an unreachable
  ``PREFECT_API_URL`` is one clear line, not a connection traceback), runs the flow in this process on its own
  temporary API, ended cleanly by SIGTERM, SIGINT and SIGHUP (:mod:`flows.local_run`), and prints where
  everything is.

Prefect is imported only under ``flows/``: the ``pipeline`` library and its stage commands run without it.

Trade-off: the parameters are a path and a free-form dict rather than the typed config, so the UI's run form
cannot check a value as it is typed; the flow's first line does, and fails the run before any work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

from prefect import flow, get_client
from prefect.settings import PREFECT_API_URL

from flows.jobs import stop_flow_run_jobs
from flows.local_run import refusals_once, run_api, signals_end_the_run
from flows.report import format_report, publish_report
from flows.tasks import (
    reference_task,
    run_cached,
    tokenize_task,
    train_task,
)
from pipeline.config import DPOPipelineConfig, load_config
from pipeline.errors import PipelineError
from pipeline.lock import output_dir_lock
from pipeline.plan import Plan
from pipeline.trackers import check_trackers

if TYPE_CHECKING:
    from prefect.flows import FlowStateHook

DEFAULT_CONFIG = "configs/default.yaml"


class _JobHooks(TypedDict):
    """The hooks of a flow that runs jobs; a TypedDict, so that ``**_JOB_HOOKS`` type-checks against ``@flow``."""

    on_cancellation: list[FlowStateHook[..., Any]]
    on_crashed: list[FlowStateHook[..., Any]]


_JOB_HOOKS: _JobHooks = {"on_cancellation": [stop_flow_run_jobs], "on_crashed": [stop_flow_run_jobs]}


def _tokenize(config: DPOPipelineConfig, plan: Plan) -> str:
    return run_cached(tokenize_task, config, plan.tokenized_dir)


def _reference(config: DPOPipelineConfig, plan: Plan, timeout: float | None) -> str:
    return run_cached(reference_task, config, plan.reference_dir, timeout=timeout)


def _train(config: DPOPipelineConfig, plan: Plan, timeout: float | None) -> str:
    # Under TR-DPO too: every window runs inside this one job (its progress is the task's progress artifacts).
    return run_cached(train_task, config, plan.train_dir, timeout=timeout)


@flow(name="dpo-tokenize")
def tokenize_flow(config_path: str | None = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> str:
    """Tokenize the preference dataset (returns the tokenized artifact's directory)."""
    config = load_config(config_path, overrides)
    with output_dir_lock(config):
        return _tokenize(config, Plan.of(config))


@flow(name="dpo-reference", **_JOB_HOOKS)
def reference_flow(
    config_path: str | None = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    job_timeout_s: float | None = None,
) -> str:
    """The reference pass (needs the tokenized artifact; returns the reference artifact's directory)."""
    config = load_config(config_path, overrides)
    with output_dir_lock(config):
        return _reference(config, Plan.of(config), job_timeout_s)


@flow(name="dpo-train", **_JOB_HOOKS)
def train_flow(
    config_path: str | None = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    job_timeout_s: float | None = None,
) -> str:
    """Training from the cached reference log-probs (returns the run directory)."""
    config = load_config(config_path, overrides)
    check_trackers(config)
    with output_dir_lock(config):
        run_dir = _train(config, Plan.of(config), job_timeout_s)
        publish_report(config, run_dir)
    return run_dir


@flow(name="dpo-pipeline", **_JOB_HOOKS)
def dpo_pipeline(
    config_path: str | None = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    job_timeout_s: float | None = None,
) -> dict[str, str]:
    """tokenize -> reference pass -> train. ``overrides`` are config values (``{"beta": 0.2}``) applied over
    ``config_path``; ``job_timeout_s`` bounds each DeepSpeed job. Returns the artifact directories."""
    config = load_config(config_path, overrides)
    check_trackers(config)  # a report_to tracker that is not installed fails the run before any tokenizing
    with output_dir_lock(config):
        plan = Plan.of(config)  # every artifact's place, worked out once for the run
        paths = {"tokenized": _tokenize(config, plan)}
        paths["reference"] = _reference(config, plan, job_timeout_s)
        paths["train"] = _train(config, plan, job_timeout_s)
        publish_report(config, paths["train"])
    return paths


# ---------------------------------------------------------------------------------------------- local runs
def check_prefect_api(*, server_required: bool = False) -> None:
    """Raise a one-line PipelineError when ``PREFECT_API_URL`` is set but nothing healthy answers there (or,
    with ``server_required``, when it is unset). Unset, a run gets a temporary API (:mod:`flows.local_run`)."""
    url = PREFECT_API_URL.value()
    start = "start one with `prefect server start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
    if not url:
        if server_required:
            raise PipelineError(f"this needs a running Prefect server: {start}")
        return
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        fallback = "" if server_required else ", or unset PREFECT_API_URL to run on a temporary local API"
        raise PipelineError(
            f"the Prefect API at {url} is unreachable ({type(error).__name__}: {error}); "
            f"start it with `prefect server start`{fallback}"
        )


def run_pipeline(config: DPOPipelineConfig) -> dict[str, str]:
    """Run the ``dpo-pipeline`` flow in this process for a validated config; print where the results are.

    Under the output directory's lock, on this run's own temporary API unless ``PREFECT_API_URL`` names one,
    and ended by SIGTERM, SIGINT or SIGHUP with its jobs, its API and a Crashed state (:mod:`flows.local_run`)."""
    check_prefect_api()
    # The flow takes JSON parameters: the config travels as its values (all of them, so nothing depends on a
    # file), with output_dir absolute so the run's records name the real place.
    values = config.model_dump(mode="json") | {"output_dir": str(config.output_path)}
    with signals_end_the_run("dpo-pipeline run"), output_dir_lock(config), run_api(config.output_path), refusals_once():
        paths = dpo_pipeline(config_path=None, overrides=values)
    print(format_report(config, paths))
    return paths
