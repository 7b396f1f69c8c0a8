"""Stage jobs seen from Prefect: their output in the task's log, their progress as an artifact, and their end.

* :class:`JobOutput` is the ``on_line`` of :func:`pipeline.launch.run_stage`: every line of the job goes to the
  Prefect task's log (up to a refusal of its input, :func:`pipeline.launch.until_refusal`), except the
  refreshes of the stage's own tqdm bar (described by the stage's name:
  ``train:  45%|...``; one line per refresh, because the launcher reads the pipe in text mode, which turns
  tqdm's carriage returns into line ends). Those drive a progress artifact instead, updated (and logged) every
  :data:`PROGRESS_STEP` percent, and every :data:`PROGRESS_SECONDS` while the bar moves, so a long stage costs
  about two API calls a minute, not one per step, and its log still shows the current step.
* :func:`stop_flow_run_jobs` is the flow's ``on_cancellation`` / ``on_crashed`` hook. It ends the jobs this
  process started (:func:`pipeline.launch.kill_all_jobs`) and every other process group whose leader carries
  the flow run's id in its environment. The second part matters for deployments: there the runner (worker or
  ``serve``) runs ``on_cancellation`` hooks in its own process, while the jobs belong to the flow-run
  subprocess it started. Every job inherits ``PREFECT__FLOW_RUN_ID``: a worker's flow-run process has it, and
  :class:`JobOutput` sets it before each job, because ``flow.serve`` (a spawned process) and an in-process run
  do not. Slurm jobs may run on other hosts, out of reach of signals: the hook scancels this user's jobs whose
  name carries the flow run's id (:func:`pipeline.slurm.cancel_containing`; ``run_stage`` names them so).

How a cancelled run leaves no process, in order: the runner SIGTERMs the flow-run process; Prefect turns that
into an exception in the main thread, where the task is blocked reading the job's output; ``run_job``'s
``finally`` kills the job's whole process group. The hook then sweeps anything left, even after a SIGKILLed
flow process. Timeouts are the launcher's (``run_stage(timeout=...)`` kills the group itself), not Prefect's
``timeout_seconds``: Prefect can interrupt a blocked pipe read only in the main thread.

Trade-offs: progress comes from tqdm's default bar format; a stage printing another format still logs every
line, but its progress artifact then moves only at the end. The sweep reads the environment of every process
of this user (psutil), a few milliseconds, once per cancelled or crashed run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from typing import cast
from uuid import UUID

import psutil
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import flow_run as current_flow_run

from pipeline import slurm
from pipeline.launch import kill_all_jobs

PROGRESS_STEP = 5.0  # percent between two updates of a progress artifact
PROGRESS_SECONDS = 30.0  # and at least this often while a bar moves: a long run shows its step in the log
# tqdm's default bar: "<desc>: <percent>%|<bar>| <n>/<total> [...]"
_TQDM = re.compile(r"^\s*(?P<desc>[\w .-]*?):\s+(?P<percent>\d{1,3})%\|")


# pipeline.train.tr_dpo's line at each window start, and the loss in the training bar's postfix.
_WINDOW = re.compile(
    r"TR-DPO window (?P<k>\d+)/(?P<n>\d+) \(steps (?P<steps>[\d-]+)\): reference version "
    r"(?P<version>\d+)"
)
_LOSS = re.compile(r"loss=(?P<loss>[-\d.naif]+)")


def parse_progress(line: str) -> tuple[str, float] | None:
    """``(description, percent)`` of a tqdm progress line, or None for any other line."""
    match = _TQDM.match(line)
    return (match["desc"], float(match["percent"])) if match else None


class JobOutput:
    """``on_line`` for a stage job inside a Prefect task: lines to the task's log, and the stage's own tqdm bar
    (the one whose description is ``bar``, e.g. "train"; not "Loading weights") to a progress artifact."""

    def __init__(self, bar: str, key: str, description: str):
        self.bar = bar
        self.logger = get_run_logger()
        # Tags the job about to start (see the module's note); set per job, since one process may run many flows.
        flow_run_id = current_flow_run.get_id()
        assert flow_run_id is not None, "JobOutput runs in a stage task of a flow run"
        os.environ["PREFECT__FLOW_RUN_ID"] = flow_run_id
        # A sync task, so async_dispatch calls the sync function; its annotation adds the async variant's coroutine.
        self.artifact_id = cast(UUID, create_progress_artifact(progress=0.0, key=key, description=description))
        self.shown: float | None = None  # the percentage last shown; None until the bar first appears
        self.shown_at = time.monotonic()
        self.windows: list[dict[str, str]] = []  # TR-DPO windows started so far, with the loss each ended at
        self.key = key

    def __call__(self, line: str) -> None:
        if not line.strip():
            return  # tqdm's carriage returns leave empty lines
        if window := _WINDOW.search(line):
            self._window_started(window)
        progress = parse_progress(line)
        if progress is None or progress[0].split(" ")[0] != self.bar:  # "tokenize train" is the tokenize bar
            self.logger.info(line)
            return
        if self.windows and (loss := _LOSS.search(line)):
            self.windows[-1]["loss"] = loss["loss"]
        percent = progress[1]
        due = time.monotonic() - self.shown_at >= PROGRESS_SECONDS
        if self.shown is None or percent >= self.shown + PROGRESS_STEP or (percent == 100.0 > self.shown) or due:
            self.shown, self.shown_at = percent, time.monotonic()
            update_progress_artifact(self.artifact_id, progress=percent)
            self.logger.info(line)

    def _window_started(self, window: re.Match) -> None:
        """A TR-DPO window began (its reference version mixed and its examples scored): a markdown artifact
        of the windows done, the current one and the training loss, while the job runs."""
        self.windows.append(
            {
                "window": window["k"],
                "of": window["n"],
                "steps": window["steps"],
                "version": window["version"],
                "loss": "",
            }
        )
        rows = [f"| {w['window']}/{w['of']} | {w['steps']} | v{w['version']} | {w['loss']} |" for w in self.windows]
        current = self.windows[-1]
        create_markdown_artifact(
            key=f"{self.key.removesuffix('-progress')}-tr-dpo-windows",
            description=f"TR-DPO: window {current['window']} of {current['of']} running",
            markdown="\n".join(
                [
                    f"## TR-DPO windows ({len(self.windows) - 1} reference syncs so far)",
                    "",
                    "| window | steps | reference | loss at its end |",
                    "|---|---|---|---|",
                    *rows,
                ]
            ),
        )

    def finish(self) -> None:
        """After a successful job. One that showed no bar found its artifact complete: it is 100 % done. (One
        that did, say a TR-DPO window ending at step 40 of 120, keeps the share its bar reached.)"""
        if self.shown is None:
            self.shown = 100.0
            update_progress_artifact(self.artifact_id, progress=100.0)


def kill_flow_run_groups(flow_run_id: str, grace: float = 5.0) -> int:
    """SIGTERM (then SIGKILL after ``grace`` s) every process group, other than ours, led by a process of the flow
    run ``flow_run_id``. Returns how many groups were signalled."""
    own_group = os.getpgrp()
    leaders = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == own_group or os.getpgid(proc.pid) != proc.pid:
                continue
            if proc.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                leaders.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue  # gone meanwhile, a zombie, or another user's process
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for leader in leaders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader.pid, sig)
        if sig == signal.SIGTERM:
            psutil.wait_procs(leaders, timeout=grace)  # a launcher ends its ranks on SIGTERM; give it the chance
    return len(leaders)


def stop_flow_run_jobs(flow, flow_run, state) -> None:
    """Flow hook (on_cancellation, on_crashed): no job of this flow run outlives it."""
    ended = kill_all_jobs() + kill_flow_run_groups(str(flow_run.id))
    cancelled = slurm.cancel_containing(str(flow_run.id))
    if ended or cancelled:
        # flow_run_logger, not get_run_logger: a runner calls this hook outside any run context.
        flow_run_logger(flow_run, flow).warning(
            "flow run %s: ended %d job process group(s), %d Slurm job(s)", state.name, ended, cancelled
        )
