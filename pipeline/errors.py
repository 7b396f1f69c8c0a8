"""User-facing errors.

Everything the pipeline refuses (a bad config, a malformed dataset row, a stale or corrupt artifact) raises a
subclass of :class:`PipelineError`. The CLI prints such errors as one line and exits non-zero, so that no
traceback reaches the user for input they can fix; any other exception is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """An error the user can fix; printed without a traceback."""


class ConfigError(PipelineError, ValueError):
    """A config value is unknown, out of range or inconsistent; the message names the field."""


class DataError(PipelineError):
    """A dataset file or row is unusable; the message names the file, the row and the field."""


class ArtifactError(PipelineError):
    """An artifact is missing, incomplete, corrupt or was made from other inputs than expected."""
