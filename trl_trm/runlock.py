"""One run per `output_dir`: the lock file `trl-trm train` takes before it trains.

Two runs writing into one `output_dir` interleave their `trm_stats.jsonl` and overwrite each other's model. So
`trl-trm train` creates `output_dir/_trl_trm.lock` (`_*` is not uploaded by `push_to_hub`) holding the PID, host and
start time of the run, before any check that could delete or write files there, and removes it when the command ends,
also on an error. A lock whose process is gone (a killed run) is stale: it is taken over with a warning naming that
process. A lock held by a live process refuses the run with one line (`trl-trm` exits with code 2).

Several processes (`torchrun`, `accelerate launch`): only the main process takes the lock, and its answer is
broadcast, so every rank stops when it is refused. That first collective is also where `ddp_timeout` is applied to
the process group (`trl_trm.distributed.apply_timeout`). A command that relaunches itself under `accelerate launch` takes
the lock in the launching process; the processes it starts (`LAUNCHED_ENV` set) do not take it again.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings

LOCK_FILE = "_trl_trm.lock"


class RunLockError(ValueError):
    """Another live run holds the lock of this output_dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
        return held if isinstance(held, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # cut short while being written: treated as stale below


def prepare_output_dir(output_dir: str) -> None:
    """Create `output_dir`, refusing with one line a path that is a file or a folder that cannot be written."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} is a file, not a folder: choose another output_dir.")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"Cannot create output_dir {output_dir!r} ({err.strerror}): choose a folder you can write to."
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ValueError(
            f"output_dir {output_dir!r} is not writable: the checkpoints, model and trm_stats.jsonl go there. Choose "
            "a folder you can write to (or fix its permissions)."
        )


class RunLock:
    """The lock file of one run in `output_dir` (see the module docstring)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock; a stale one is taken over with a RuntimeWarning; a live one raises RunLockError."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockError(f"Could not take the lock {self.path}: another run keeps taking it. Try again.")

    def _take_over_if_stale(self, host: str) -> None:
        held = _read(self.path)
        pid, other_host = held.get("pid"), held.get("host")
        who = f"PID {pid} on {other_host}, started {held.get('started', '?')}"
        if isinstance(pid, int) and other_host == host and _pid_alive(pid):
            raise RunLockError(
                f"output_dir {os.path.dirname(self.path)!r} is in use by another run ({who}): two runs in one "
                f"output_dir mix their logs and overwrite each other's model. Wait for it to end, or choose another "
                f"output_dir (if no such run exists, delete {self.path})."
            )
        if isinstance(pid, int) and other_host not in (None, host):
            raise RunLockError(
                f"output_dir {os.path.dirname(self.path)!r} is locked by a run on another machine ({who}), which "
                f"cannot be checked from here: wait for it, or delete {self.path} if it is gone."
            )
        warnings.warn(
            f"Taking over the stale lock {self.path}: the run that held it ({who}) is gone (killed or crashed).",
            RuntimeWarning,
            stacklevel=4,
        )
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        self.held = False
        if _read(self.path).get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def take_run_lock(config) -> RunLock | None:
    """Take the lock of `config.output_dir`. Several processes (WORLD_SIZE > 1): the main process takes it and
    broadcasts the outcome, so every process raises RunLockError (or the output_dir error) when it could not.
    Returns the lock on the process that holds it, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process (or the launcher of `accelerate launch`)
        prepare_output_dir(config.output_dir)
        return RunLock(config.output_dir).acquire()
    from accelerate import PartialState

    from .distributed import apply_timeout

    config.device  # noqa: B018 (sets up the process group as training will)
    apply_timeout(config.ddp_timeout)  # also on CPU, where transformers leaves it out (see apply_timeout)
    state = PartialState()
    lock, error = None, None
    if state.is_main_process:
        try:
            prepare_output_dir(config.output_dir)
            lock = RunLock(config.output_dir).acquire()
        except ValueError as err:
            error = str(err)
    from accelerate.utils import broadcast_object_list

    box = [error]
    broadcast_object_list(box, from_process=0)
    if box[0] is not None:
        from .distributed import shutdown_distributed

        shutdown_distributed()  # every rank stops here: exit cleanly, not with an abort at interpreter exit
        raise RunLockError(box[0])
    return lock
