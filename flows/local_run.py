"""What ``dpo-pipeline run`` adds around the flow: its own temporary Prefect API, and signals that end the run.

**The temporary API.** With ``PREFECT_API_URL`` unset, Prefect 3.8.8 would start a temporary server by itself
(``SubprocessASGIServer``): a plain child in the run's process group, with no parent-death signal, its state
in the machine-wide ``~/.prefect`` database. Three faults follow: a ``kill -9`` of the run leaves that server
serving forever; a Ctrl-C in a terminal (SIGINT to the foreground group) reaches the server as it reaches the
flow, so the server may be gone before the flow reports how it ended, and the run stays Running; and every
concurrent run of the machine writes one SQLite file. :func:`temporary_api` runs the same server command
(uvicorn on ``prefect.server.api.server:create_app`` in Prefect's ephemeral mode: no UI, only the services a
run needs) but owned by this process:

* on a free loopback port, in its own session (no signal to the run's group reaches it), with
  ``PR_SET_PDEATHSIG`` (it gets SIGTERM when the run's process dies, however it dies);
* its database in ``<output_dir>/prefect/prefect.db`` (``PREFECT_HOME`` of the server), next to the Prefect
  cache records, written only under the output directory's lock (:mod:`pipeline.lock`): one server at a time;
* stopped only after the flow has reported its final state and Prefect's log and event queues are drained;
* the flow reaches it through ``PREFECT_API_URL`` in this process's environment and Prefect's global settings
  (refreshed from it), so Prefect's background threads (logs, events) use it too, not a second server.

**Runs left Running.** A run killed outright (SIGKILL, the OOM killer, a power cut) cannot report its end. Its
database is private to the output directory and used only under the lock, so whatever run it still shows as
Pending, Running or Cancelling when the next ``dpo-pipeline run`` starts is an orphan: :func:`crash_orphans`
marks it, and its unfinished task runs, Crashed before the new run begins.

**Signals.** Inside the flow Prefect turns SIGTERM into ``TerminationSignal`` and Ctrl-C is
``KeyboardInterrupt``; either way the flow run is marked Crashed and its ``on_crashed`` hook ends the stage
jobs (:mod:`flows.jobs`). :func:`signals_end_the_run` gives SIGHUP (a closed terminal or SSH session), and
SIGTERM outside the flow (while the server starts), the same ``TerminationSignal``, and turns the end into one
line and exit status 128 + the signal number. Jobs cannot outlive the run either way: they die with their
parent (:func:`pipeline.launch.run_job`).

Trade-offs: this couples to how Prefect starts its server (the app factory and ``PREFECT__SERVER_EPHEMERAL``,
unchanged across 3.x, and Prefect is pinned); the run history lives with the output directory rather than in
``~/.prefect``: browse it with ``PREFECT_HOME=<output_dir>/prefect prefect server start`` when no run is in
progress. With ``PREFECT_API_URL`` set, none of this applies: that server keeps the history, and a run killed
outright stays Running there until cancelled or cleaned up by that server's own zombie detection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import prefect
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.context import refresh_global_settings_context
from prefect.events.worker import EventsWorker
from prefect.exceptions import TerminationSignal
from prefect.logging.handlers import APILogWorker, PrefectConsoleHandler
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
from prefect.states import Crashed

from pipeline.artifacts import storage_errors
from pipeline.errors import PipelineError, subclasses
from pipeline.launch import die_with_parent
from pipeline.ranks import free_port

SERVER_DIR = "prefect"
# The first start migrates a fresh SQLite database: on a busy 2-core machine that takes longer than Prefect's
# default 20 s wait for its own temporary server.
STARTUP_TIMEOUT_S = 180
_UNFINISHED = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
_ORPHAN_CAUSE = "the process running it was killed before it could report"
_ORPHAN_MESSAGE = f"{_ORPHAN_CAUSE}; marked Crashed by the next run"


def server_dir(output_dir: Path) -> Path:
    return Path(output_dir) / SERVER_DIR


def _server_environment(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_DATABASE")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_UI_ENABLED="false",
        PREFECT__SERVER_EPHEMERAL="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Explicit, so that no database setting of the user's (environment, profile, prefect.toml) is used.
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    )
    env.pop("PREFECT_API_URL", None)
    return env


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), STARTUP_TIMEOUT_S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
            raise PipelineError(
                f"the temporary Prefect API exited with code {proc.returncode} while starting "
                f"(its log {log} ends: {last})"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise PipelineError(f"the temporary Prefect API did not answer within {timeout:.0f} s (its log: {log})")


def _drain_prefect_queues() -> None:
    """Send the logs and events still queued in this process while the server is up (else they are lost, with a
    connection error for each at exit)."""
    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)


@contextlib.contextmanager
def _api_url(url: str) -> Iterator[None]:
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        refresh_global_settings_context()


@contextlib.contextmanager
def temporary_api(output_dir: Path) -> Iterator[str]:
    """A Prefect API server owned by this process, its database under ``output_dir``; yields its URL, with this
    process's Prefect pointed at it. Call it only under the output directory's lock."""
    home = server_dir(output_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    # The command line heads the log, written (and flushed) here: a full disk is then one clear line now, not
    # a server that dies unable to say why.
    with storage_errors(log):
        home.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            handle.write(f"$ {shlex.join(command)}\n")
            handle.flush()
            proc = subprocess.Popen(
                command,
                env=_server_environment(home),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
    try:
        _wait_healthy(proc, url, log)
        with _api_url(url):
            try:
                yield url
            finally:
                _drain_prefect_queues()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def crash_orphans() -> int:
    """Mark Crashed every unfinished flow run (and its unfinished task runs) of the current API; returns how
    many flow runs. Only for a private API that no live run uses (see the module notes)."""
    unfinished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_UNFINISHED)))
    with get_client(sync_client=True) as client:
        orphans = client.read_flow_runs(flow_run_filter=unfinished)
        for run in orphans:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_UNFINISHED))),
            )
            for task_run in tasks:
                client.set_task_run_state(task_run.id, Crashed(message=_ORPHAN_MESSAGE), force=True)
            client.set_flow_run_state(run.id, Crashed(message=_ORPHAN_MESSAGE), force=True)
    return len(orphans)


def _raise_termination(signum: int, frame) -> None:
    raise TerminationSignal(signal=signum)


@contextlib.contextmanager
def signals_end_the_run(command: str) -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``TerminationSignal`` (Prefect's own, inside the flow), Ctrl-C raises
    ``KeyboardInterrupt``; once everything inside has been unwound, print one line and exit 128 + signal."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only: there is nothing to install
        return
    previous = {sig: signal.signal(sig, _raise_termination) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except (TerminationSignal, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signal", signal.SIGINT)
        print(
            f"{command}: stopped by {signal.Signals(signum).name}: its jobs are ended and its flow run, if it had "
            f"begun, is marked Crashed; rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _RefusalsOnce(logging.Filter):
    """For the console only: Prefect's records of a run that failed on refused input (the task's and the flow's
    error, each with a traceback) are left out, so the terminal shows the CLI's one line. The API's logs, and
    the run's states in the UI, keep every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PipelineError):
            return False
        # The flow's final state line repeats the error as text: "Failed('Flow run encountered ... ConfigError: ...')"
        return not _REFUSAL_IN_STATE.search(record.getMessage())


_REFUSAL_IN_STATE = re.compile(
    "|".join(rf"\b{name}: " for name in sorted(cls.__name__ for cls in subclasses(PipelineError)))
)


@contextlib.contextmanager
def refusals_once() -> Iterator[None]:
    """While a ``dpo-pipeline run`` runs: :class:`_RefusalsOnce` on every Prefect console handler."""
    handlers = {
        handler
        for logger in (logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict))
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, PrefectConsoleHandler)
    }
    quiet = _RefusalsOnce()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


@contextlib.contextmanager
def run_api(output_dir: Path) -> Iterator[None]:
    """The API a ``dpo-pipeline run`` reports to: ``PREFECT_API_URL`` when set, else :func:`temporary_api`, its
    orphaned runs marked Crashed first. Under the output directory's lock."""
    if PREFECT_API_URL.value():
        yield
        return
    with temporary_api(output_dir):
        if crashed := crash_orphans():
            print(
                f"dpo-pipeline run: marked {crashed} earlier flow run(s) in {server_dir(output_dir)} Crashed: "
                f"{_ORPHAN_CAUSE}",
                file=sys.stderr,
                flush=True,
            )
        yield
