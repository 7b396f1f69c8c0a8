"""Experiment trackers for ``report_to``: TensorBoard, Weights & Biases and MLflow, on the main process only.

    check_trackers(config)                                   # before any work: a named tracker must import
    trackers = Trackers.open(config, run_dir, params=flatten_params(...), resume_step=step)
    trackers.log(record)                                     # each metrics.jsonl record
    trackers.event("tr_dpo/sync", step, {"reference_version": 2, ...})
    trackers.close(summary)

What goes where (``docs/trackers.md`` has the table, the environment variables and how to view each):

* **Metric names** as TRL's dashboards have them: TensorBoard and wandb get the HF Trainer's ``rewrite_logs``
  names (``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``), MLflow the record's own names (as HF's
  MLflowCallback logs them), characters MLflow refuses replaced by ``_``. An event's numeric fields are
  ``<prefix>/<field>`` in every tracker (``tr_dpo/reference_version``), plus a text table in TensorBoard.
* **Params** (the flattened config and the fingerprints) once: TensorBoard text ``args`` (as HF's
  TensorBoardCallback writes the TrainingArguments), wandb ``config``, MLflow params (cut to MLflow's length
  limit, sent in batches of its maximum size).
* **wandb**: offline unless WANDB_MODE or WANDB_API_KEY say otherwise (no login, no network), files in
  ``<run dir>/wandb``; the run id comes from the run dir, so a resumed run continues the same run; ``close``
  also stops wandb's service process. **MLflow**: MLFLOW_TRACKING_URI, else a SQLite store
  ``<run dir>/mlflow.db`` (MLflow 3 refuses its old file store unless told to); a resumed run reopens the run
  tagged with this run dir's id. **TensorBoard**: ``logging_dir`` or ``<run dir>/runs``; on resume
  ``purge_step`` hides what a crashed run logged after the checkpoint resumed from.

Trade-offs: a tracker that cannot start is a :class:`ConfigError` (the user asked for it); one that fails
later is dropped with a warning and training goes on, since ``metrics.jsonl`` is the record and a tracker only
a view of it. MLflow cannot delete points, so a resumed run keeps a crashed run's points after the checkpoint
beside the redone ones; online wandb drops steps below the run's last one. Each library is imported only when
its tracker is checked or opened: this module is imported by processes that must stay light (Prefect).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import importlib
import json
import logging
import numbers
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import TRACKERS
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import DPOPipelineConfig

log = logging.getLogger(__name__)

# The module each tracker needs. Importing it is the check: a broken install fails as a missing one does.
MODULES = {"tensorboard": "tensorboard.summary.writer.event_file_writer", "wandb": "wandb", "mlflow": "mlflow"}
RUN_ID_TAG = "dpo_pipeline.run_id"  # MLflow tag that finds a resumed run's MLflow run
RUN_DIR_TAG = "dpo_pipeline.run_dir"


# ---------------------------------------------------------------------------------------------- which ones
@functools.cache
def _import_error(name: str) -> str | None:
    """Why ``name``'s library cannot be imported here (one line), or None when it can."""
    try:
        importlib.import_module(MODULES[name])
    except ImportError as exc:
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    return None


def tracker_names(config: DPOPipelineConfig) -> list[str]:
    """``report_to`` resolved: [] for none; ``all`` is every tracker whose library imports here (as
    TrainingArguments' ``all``: every installed integration); a name or a list is taken as given."""
    report_to = config.report_to
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "none" in names:
        return []
    if "all" in names:
        return [name for name in TRACKERS if _import_error(name) is None]
    return list(dict.fromkeys(names))


def check_trackers(config: DPOPipelineConfig) -> None:
    """Refuse, before any work, a ``report_to`` tracker whose library cannot be imported."""
    for name in tracker_names(config):
        error = _import_error(name)
        if error is not None:
            raise ConfigError(
                f"report_to: {name} needs its package, which cannot be imported here ({error}); "
                f"pip install 'dpo-pipeline[{name}]', or drop {name} from report_to (report_to: none for no tracker)"
            )


# ---------------------------------------------------------------------------------------------- names
def rewrite_logs(metrics: Mapping[str, float]) -> dict[str, float]:
    """The HF Trainer's names for TensorBoard and wandb (transformers' ``integration_utils.rewrite_logs``):
    ``eval_x`` -> ``eval/x``, ``test_x`` -> ``test/x``, anything else -> ``train/x``."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("eval_"):
            out["eval/" + key.removeprefix("eval_")] = value
        elif key.startswith("test_"):
            out["test/" + key.removeprefix("test_")] = value
        else:
            out["train/" + key] = value
    return out


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``: nested mappings joined with ``.``; lists
    and scalars stay values. For ``params``: ``flatten_params(json.loads(config.to_json()))`` plus e.g.
    ``{"fingerprints/train": fp}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = value
    return flat


def run_id(run_dir: Path) -> str:
    """An id that stays the same for every resume of ``run_dir``: its name and a digest of its absolute path
    (two output dirs training one config are two runs, not one run written twice)."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', Path(run_dir).name)[:48]}-{digest}"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy floats too; not True/False


def _number(value: Any) -> int | float:
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _table(fields: Mapping[str, Any]) -> str:
    """Markdown, which TensorBoard's text tab renders."""
    return "| field | value |\n|---|---|\n" + "".join(f"| {key} | {value} |\n" for key, value in fields.items())


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _tensorboard_dir(config: DPOPipelineConfig, run_dir: Path) -> Path:
    return Path(config.logging_dir).expanduser() if config.logging_dir else run_dir / "runs"


def _wandb_mode() -> str:
    # Offline unless told otherwise: a run must never stop on a missing login or network (wandb sync uploads).
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def _mlflow_uri(run_dir: Path) -> str:
    # MLflow 3's own default is sqlite:///mlflow.db in the working directory; the run dir keeps each run's store
    # beside its files, and no two nodes share one SQLite file (SQLite locks badly on NFS).
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


# ---------------------------------------------------------------------------------------------- trackers
class _Tracker(abc.ABC):
    """The protocol every tracker keeps: params once, metrics per step, close once."""

    name = ""
    trl_names = True  # metric names through rewrite_logs (train/..., eval/...), as HF's callback for it does

    @abc.abstractmethod
    def __init__(self, config: DPOPipelineConfig, run_dir: Path, resume_step: int): ...

    @classmethod
    @abc.abstractmethod
    def fix(cls, config: DPOPipelineConfig, run_dir: Path) -> str:
        """What the user can change when this tracker does not start."""
        ...

    @abc.abstractmethod
    def log_params(self, params: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, int | float], step: int) -> None: ...

    def log_text(self, tag: str, text: str, step: int) -> None:  # noqa: B027 -- a no-op default, on purpose
        """Only TensorBoard shows text beside its curves; the others have the numbers."""

    @abc.abstractmethod
    def close(self, summary: dict[str, Any], step: int, failed: bool) -> None: ...


class _TensorBoard(_Tracker):
    name = "tensorboard"

    def __init__(self, config: DPOPipelineConfig, run_dir: Path, resume_step: int):
        self.step = resume_step
        from torch.utils.tensorboard import SummaryWriter  # torch only now: the import alone costs a second

        # purge_step: TensorBoard hides the events of steps >= it that were written before this writer started,
        # i.e. what a crashed run logged after the checkpoint this run resumes from (a fresh start: everything),
        # so the curves are an uninterrupted run's. Nothing else is hidden: the log dir is this run's alone.
        self.writer = SummaryWriter(log_dir=str(_tensorboard_dir(config, run_dir)), purge_step=resume_step + 1)

    @classmethod
    def fix(cls, config: DPOPipelineConfig, run_dir: Path) -> str:
        return f"check that logging_dir ({_tensorboard_dir(config, run_dir)}) is writable"

    def log_params(self, params: dict[str, Any]) -> None:
        # As HF's TensorBoardCallback: the arguments as one JSON text under "args"; indented, the markdown of
        # the text tab shows it as a code block instead of one run-on paragraph.
        text = json.dumps(params, indent=2, sort_keys=True, default=str)
        self.writer.add_text("args", textwrap.indent(text, "    "), global_step=self.step)

    def log_metrics(self, metrics: dict[str, int | float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # as HF's callback: a crash loses no step it logged (one small write per record)

    def log_text(self, tag: str, text: str, step: int) -> None:  # noqa: B027 -- a no-op default, on purpose
        self.writer.add_text(tag, text, global_step=step)
        self.writer.flush()

    def close(self, summary: dict[str, Any], step: int, failed: bool) -> None:
        if summary:
            self.writer.add_text("summary", _table(summary), global_step=step)
        self.writer.close()


class _Wandb(_Tracker):
    name = "wandb"

    def __init__(self, config: DPOPipelineConfig, run_dir: Path, resume_step: int):
        import wandb

        self.wandb = wandb
        self.pending: int | None = None  # the step of the history row wandb holds open (rows of a step merge)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "huggingface"),  # HF's WandbCallback default
                name=config.run_name or run_dir.name,
                dir=str(run_dir),
                id=os.environ.get("WANDB_RUN_ID") or run_id(run_dir),
                resume="allow",  # the same id again (a resume) continues the run; a new id starts one
                mode=_wandb_mode(),  # type: ignore[arg-type]  # whatever WANDB_MODE says; wandb checks it
                reinit="create_new",  # never finish, nor log into, a run the calling program has open
            )
        except BaseException:
            self._stop_service()
            raise

    @classmethod
    def fix(cls, config: DPOPipelineConfig, run_dir: Path) -> str:
        return f"check WANDB_MODE / WANDB_API_KEY (mode {_wandb_mode()}; WANDB_MODE=offline needs no login or network)"

    def log_params(self, params: dict[str, Any]) -> None:
        # allow_val_change: a resume may change a setting that cannot change results (logging_steps, ...)
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, int | float], step: int) -> None:
        # train/global_step in every row, as HF's WandbCallback: TRL dashboards plot against it. Rows of one
        # step (train, then eval, then an event) merge into one history row.
        self.run.log({**metrics, "train/global_step": step}, step=step)
        self.pending = step

    def close(self, summary: dict[str, Any], step: int, failed: bool) -> None:
        if self.pending is not None:  # commit the last row first, or its values would overwrite the summary's
            self.run.log({}, step=self.pending, commit=True)
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.finish(exit_code=1 if failed else 0)
        self._stop_service()

    def _stop_service(self) -> None:
        # wandb keeps its service process (wandb-core) until the interpreter exits; a driver that goes on (a
        # Prefect flow, a test) should not keep it. Left running while another run of this process uses it.
        from wandb.sdk import wandb_setup

        if wandb_setup.singleton().most_recent_active_run is None:
            self.wandb.teardown()


class _Mlflow(_Tracker):
    name = "mlflow"
    trl_names = False  # HF's MLflowCallback logs the Trainer's own names (loss, eval_loss)

    def __init__(self, config: DPOPipelineConfig, run_dir: Path, resume_step: int):
        from mlflow.tracking import MlflowClient

        given = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=_mlflow_uri(run_dir))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpo-pipeline")
        experiment_id = self._experiment(name, None if given else (run_dir / "mlartifacts").resolve().as_uri())
        key = run_id(run_dir)
        run = None
        if os.environ.get("MLFLOW_RUN_ID"):  # as HF's callback: log into a run made elsewhere
            run = self.client.get_run(os.environ["MLFLOW_RUN_ID"])
        elif resume_step > 0:
            found = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_ID_TAG}` = '{key}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run = found[0] if found else None
        if run is None:
            tags = {RUN_ID_TAG: key, RUN_DIR_TAG: str(run_dir.resolve())}
            run = self.client.create_run(experiment_id, run_name=config.run_name or run_dir.name, tags=tags)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self.logged_params = dict(run.data.params)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(name)  # another run created it meanwhile
            if experiment is None:
                raise
            return experiment.experiment_id

    @classmethod
    def fix(cls, config: DPOPipelineConfig, run_dir: Path) -> str:
        return f"check MLFLOW_TRACKING_URI ({_mlflow_uri(run_dir)}), or unset it for a store in the run dir"

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        values = {_mlflow_key(key): _text(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
        # MLflow refuses to change a logged param: a resumed run logs only the new ones and names the changed.
        changed = sorted(key for key, value in values.items() if self.logged_params.get(key, value) != value)
        if changed:
            log.warning("mlflow: run %s keeps its logged values of %s", self.run_id, ", ".join(changed))
        new = [Param(key, value) for key, value in values.items() if key not in self.logged_params]
        for batch in _batches(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, int | float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(key), float(value), now, step) for key, value in metrics.items()]
        for part in _batches(batch, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=part)

    def close(self, summary: dict[str, Any], step: int, failed: bool) -> None:
        from mlflow.entities import RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        self.log_metrics({key: value for key, value in summary.items() if _is_number(value)}, step)
        tags = [RunTag(_mlflow_key(k), _text(v)[:MAX_TAG_VAL_LENGTH]) for k, v in summary.items() if not _is_number(v)]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    """A name MLflow takes: only alphanumerics, ``_ - . : /`` and spaces (others -> ``_``, as HF's callback
    does), no empty, ``.`` or ``..`` path part, at most 250 characters."""
    key = re.sub(r"[^\w\-. :/]", "_", key)
    return "/".join(part if part.strip(".") else "_" for part in key.split("/"))[:250]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


OPENERS: dict[str, type[_Tracker]] = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


def _start_errors(name: str) -> tuple[type[BaseException], ...]:
    """What a tracker raises when it cannot start for a reason the user fixes (a path, a URI, a setting)."""
    errors: tuple[type[BaseException], ...] = (OSError, ImportError)  # requests' errors are OSErrors
    if name == "wandb":
        import wandb.errors

        errors += (wandb.errors.Error, ValueError)  # ValueError: its settings' check (a bad WANDB_MODE, ...)
    elif name == "mlflow":
        from mlflow.exceptions import MlflowException

        errors += (MlflowException,)
    return errors


# ---------------------------------------------------------------------------------------------- the facade
class Trackers:
    """The trackers of one run; with none it does nothing. Use it on the main process only."""

    def __init__(self, trackers: list[_Tracker], step: int = 0):
        self._trackers = trackers
        self._step = step  # the last step logged: where close() puts the summary
        self._closed = False

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self._trackers]

    @classmethod
    def open(
        cls, config: DPOPipelineConfig, run_dir: Path, *, params: dict[str, Any], resume_step: int = 0
    ) -> Trackers:
        """Start every ``report_to`` tracker and log ``params`` once; a tracker that cannot start is a
        :class:`ConfigError` naming it and the fix (the ones already started are closed first)."""
        check_trackers(config)
        opened = cls([], resume_step)
        try:
            for name in tracker_names(config):
                opened._trackers.append(_start(name, config, Path(run_dir), params, resume_step))
        except BaseException:
            opened.close(failed=True)
            raise
        return opened

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: its numeric values (nan and inf too) at ``record["step"]``."""
        if not self._trackers:
            return
        step = int(record["step"])
        metrics = {key: _number(value) for key, value in record.items() if key != "step" and _is_number(value)}
        if metrics:
            self._step = max(self._step, step)
            trl = rewrite_logs(metrics)
            self._each("log", lambda tracker: tracker.log_metrics(trl if tracker.trl_names else metrics, step))

    def event(self, name: str, step: int, fields: dict[str, Any]) -> None:
        """Something that happened at ``step`` (``tr_dpo/sync``): numeric fields as ``<prefix>/<field>``
        metrics, all fields as a text table (TensorBoard)."""
        if not self._trackers:
            return
        prefix = name.split("/")[0]
        metrics = {f"{prefix}/{key}": _number(value) for key, value in fields.items() if _is_number(value)}
        self._step = max(self._step, step)

        def send(tracker: _Tracker) -> None:
            if metrics:
                tracker.log_metrics(metrics, step)
            tracker.log_text(name, _table(fields), step)

        self._each("log an event", send)

    def close(self, summary: dict[str, Any] | None = None, *, failed: bool = False) -> None:
        """Flush and finish every tracker (``failed``: mark the run failed where the tracker can); the
        summary's scalars go to wandb's run summary, MLflow metrics (numbers) or tags, a TensorBoard text.
        A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        flat = flatten_params(summary or {})
        scalars = {key: value for key, value in flat.items() if isinstance(value, str | int | float)}
        self._each("close", lambda tracker: tracker.close(scalars, self._step, failed), close_dropped=False)
        self._trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)

    def _each(self, what: str, call: Callable[[_Tracker], None], *, close_dropped: bool = True) -> None:
        for tracker in list(self._trackers):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 -- a tracker must not stop training: metrics.jsonl has it all
                log.warning("report_to: %s failed to %s (%s); it gets nothing more this run", tracker.name, what, exc)
                self._trackers.remove(tracker)
                if close_dropped:
                    with contextlib.suppress(Exception):  # its failure is reported already
                        tracker.close({}, self._step, True)


def _start(name: str, config: DPOPipelineConfig, run_dir: Path, params: dict[str, Any], resume_step: int) -> _Tracker:
    """One tracker started with its params logged, or a ConfigError naming it and the fix."""
    kind, errors = OPENERS[name], _start_errors(name)

    def refused(exc: BaseException) -> ConfigError:
        return ConfigError(f"report_to: {name} could not start ({_one_line(exc)}); {kind.fix(config, run_dir)}")

    try:
        tracker = kind(config, run_dir, resume_step)
    except errors as exc:
        raise refused(exc) from exc
    try:
        tracker.log_params(params)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            tracker.close({}, resume_step, True)
        if isinstance(exc, errors):
            raise refused(exc) from exc
        raise
    return tracker
