"""User-facing errors.

Everything the pipeline refuses (a bad config, a malformed dataset row, a stale or corrupt artifact) and every
storage fault a user must fix (a full disk, a read-only or unwritable output directory) raises a subclass of
:class:`PipelineError`. The CLI prints such errors as one line and exits non-zero, so that no
traceback reaches the user for input they can fix; any other exception is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """An error the user can fix; printed without a traceback."""

    def record(self) -> dict[str, str]:
        """This error as data, for the process that launched the job which raised it (:func:`from_record`)."""
        return {"type": type(self).__name__, "message": str(self)}


class ConfigError(PipelineError, ValueError):
    """A config value is unknown, out of range or inconsistent; the message names the field."""


class DataError(PipelineError):
    """A dataset file or row is unusable; the message names the file, the row and the field."""


class ArtifactError(PipelineError):
    """An artifact is missing, incomplete, corrupt or was made from other inputs than expected."""


class StorageError(PipelineError):
    """Writing failed for a reason only the user can fix (no space, read-only file system, a path component that
    is a file, permission denied); the message names the path, what happened and what to do."""


class LockError(PipelineError):
    """Another run holds the output directory (``output_dir_lock: fail``); the message names the holder."""


class TrainingDiverged(PipelineError):
    """The loss or gradient norm became non-finite; the message names the step and the checkpoint to resume."""


def from_record(record: dict[str, str]) -> PipelineError:
    """The error a job's rank raised, rebuilt from :meth:`PipelineError.record` with its own class, so that a
    launcher's caller tells a refused input from a crash by type, not by parsing the job's output."""
    kinds = {cls.__name__: cls for cls in subclasses(PipelineError)}
    return kinds.get(record.get("type", ""), PipelineError)(record.get("message", ""))


def subclasses(cls: type[PipelineError]) -> list[type[PipelineError]]:
    """``cls`` and every class below it."""
    return [cls, *(sub for direct in cls.__subclasses__() for sub in subclasses(direct))]
