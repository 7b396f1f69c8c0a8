"""One run per output directory: an advisory lock on ``<output_dir>/.lock``, held for the whole run.

Two runs on one output directory would both train the same run dir: each appends to ``metrics.jsonl``, and a
resume cuts it back to its own checkpoint under the other's feet, so the file ends with duplicated, unordered
records; checkpoints are pruned under a reader; the work is done twice. Atomic writes prevent torn files, not
that. So every stage entry (:func:`output_dir_lock`, in the CLI and in the Prefect flows) takes this lock.

* **A kernel lock** (``flock(LOCK_EX)`` on a descriptor held until the run ends). The kernel releases it when
  the descriptor closes or the process dies, however it dies (``kill -9`` included): there is never a stale
  lock to clean up, and no pid-file race. The file itself is never deleted: unlinking a lock file lets a
  waiter lock the unlinked inode while a newcomer creates and locks a fresh one.
* **The holder's record**: after locking, the holder writes a small JSON (pid, host, process start time,
  command, since) into the file, for messages only; correctness never depends on it. A waiter names the holder
  from it and, when the recorded process no longer exists (pid and start time, via psutil, on this host), says
  so: the lock is then held by a process the holder forked (a descriptor shared across ``fork``) or, on NFS,
  by a crashed client until its lease expires.
* **wait or fail** (config ``output_dir_lock``). ``wait`` (the default) prints one line naming the holder and
  blocks in ``flock``: the kernel wakes the waiter when the holder ends, with no polling delay, and SIGINT or
  SIGTERM still stop the wait. A second run of unchanged inputs then finds every artifact complete.
  ``fail`` raises :class:`LockError` at once, naming the holder.
* **Re-entrant across the process tree**: the holder sets ``DPO_PIPELINE_LOCK_HELD=<output_dir>`` while it
  holds the lock. Its children (stage jobs, their launcher and ranks, TR-DPO window jobs) inherit it and do
  not lock, and neither do nested entries in the holder's own process (the CLI's ``run`` and the flow inside).
* **Ranks of a launcher nobody of ours started** (``torchrun ... -m pipeline.cli train``, ``srun``,
  ``mpirun``): the ranks have no token. Global rank 0 takes the lock, the others do not, and rank 0 always
  waits: failing one rank would leave the others blocked in their first collective until its timeout. A
  multi-node torchrun job started as ``dpo-pipeline`` on every node is locked by ``node_rank`` 0 only.

Trade-offs: the lock is advisory (``rm -rf`` or another tool is not stopped) and as good as the file system's
``flock``: local file systems and NFSv4 (emulated with byte-range locks across clients) honour it; some FUSE
or parallel file systems keep ``flock`` per node, which makes it a per-node lock there. The token is trusted
as it stands: a process that sets it by hand opts out. The deepspeed launcher's multi-node runner (pdsh)
forwards only some variables to the ranks, so ranks it starts on behalf of a holder lack the token: rank 0
would wait for its own parent; give it the variable (``.deepspeed_env``) when using ``launcher: deepspeed``
with a ``hostfile``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from pipeline.artifacts import storage_errors
from pipeline.config import DPOPipelineConfig
from pipeline.errors import LockError
from pipeline.ranks import scheduler_rank_environment, under_launcher

LOCK_FILE = ".lock"
LOCK_HELD = "DPO_PIPELINE_LOCK_HELD"
_COMMAND_SHOWN = 200  # characters of the holder's command in a message


def lock_path(config: DPOPipelineConfig) -> Path:
    return config.output_path / LOCK_FILE


def _holder_record() -> dict:
    me = psutil.Process()
    return {
        "pid": me.pid,
        "host": socket.gethostname(),
        "started": me.create_time(),
        "command": shlex.join(me.cmdline()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _is_running(record: dict) -> bool:
    try:
        return abs(psutil.Process(int(record["pid"])).create_time() - float(record["started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def describe_holder(path: Path) -> str:
    """Who holds the lock at ``path``, from the holder's record (for messages)."""
    try:
        record = json.loads(path.read_text())
        command = " ".join(str(record["command"]).split())  # one line, whatever the holder's argv held
        command = command if len(command) <= _COMMAND_SHOWN else command[: _COMMAND_SHOWN - 3] + "..."
        who = f"pid {record['pid']} on {record['host']} since {record['since']} ({command})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its record yet)"
    if record["host"] == socket.gethostname() and not _is_running(record):
        who += (
            "; that process has ended, so a process it forked still holds the lock (or, on NFS, a crashed "
            "client's lease has not expired yet)"
        )
    return who


def _must_lock(config: DPOPipelineConfig) -> bool:
    if os.environ.get(LOCK_HELD) == str(config.output_path):
        return False  # this process, or the run it belongs to, holds it
    if under_launcher():
        global_rank = os.environ.get("RANK") or scheduler_rank_environment(os.environ).get("RANK", "0")
        return global_rank == "0"
    return config.num_nodes == 1 or config.node_rank == 0


@contextlib.contextmanager
def output_dir_lock(config: DPOPipelineConfig) -> Iterator[None]:
    """Hold ``<output_dir>/.lock`` for the block (see the module notes): wait for, or refuse, another holder."""
    if not _must_lock(config):
        yield
        return
    root, path = config.output_path, lock_path(config)
    # Opening is the first write of a run: a read-only, full or file-blocked output_dir fails here, in one line.
    with storage_errors(path):
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(path)
            if config.output_dir_lock == "fail" and not under_launcher():
                raise LockError(
                    f"output_dir {root} is in use by {holder}; wait for that run to end or choose "
                    f"another output_dir (output_dir_lock: wait queues behind it)"
                ) from None
            print(
                f"dpo-pipeline: output_dir {root} is in use by {holder}; waiting for that run to end",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        # Best effort: the record only names the holder in messages, and a full disk must fail at the run's
        # first real write (with its own message), not here.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
        previous = os.environ.get(LOCK_HELD)
        os.environ[LOCK_HELD] = str(root)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCK_HELD, None)
            else:
                os.environ[LOCK_HELD] = previous
    finally:
        os.close(fd)  # releases the lock


__all__ = ["LOCK_FILE", "LOCK_HELD", "describe_holder", "lock_path", "output_dir_lock"]
