"""A run directory's life: held by one run at a time, started or resumed, and never losing a checkpoint that the
run was not told to replace.

    run = RunDirectory(Path("runs/cub_vgg16_stage1"))
    try:
        run.hold()                                     # rank 0; another run holding it is refused
        run.prepare(fresh=True, overwrite=False, inputs=[init_from])   # clears an earlier run's files, or refuses
        ...
    finally:
        run.release()

Holding: `run.lock` in the directory is locked for the life of the run and names its host and pid. The lock is
a POSIX record lock (lockf, fcntl(2)): the kernel drops it when the process ends, however it ends, so a lock
left by a killed run (a SIGKILL, a pre-empted node, a torchrun restart) is simply taken over; forked children
(DataLoader workers, which can outlive a killed run by seconds) do not inherit it, as they would an flock; and
NFS supports it. Its one trap: closing any descriptor of run.lock in the process drops the lock, so nothing but
RunDirectory opens that file. Commands that only read a run (eval, predict) never take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch

from bcnn.errors import UserError

LOCK_FILE = "run.lock"
CHECKPOINTS = ("last.pt", "best.pt")
# What a run writes; a new run (or --overwrite) removes them so no stale curve or checkpoint mixes in.
RUN_FILES = (*CHECKPOINTS, "metrics.jsonl", "train.log", "config.yaml", "events.out.tfevents.*", "eval_*")
# save_checkpoint writes .<name>.<random>.tmp and renames it; one left behind means a save was cut short.
STALE_TEMPORARIES = ".*.pt.*.tmp"


def describe_os_error(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.notes: list[str] = []  # what holding and preparing did, for the run's log once it is open
        self._lock_file = None
        self._created = False

    def hold(self) -> None:
        """Create the directory if needed and lock it for this run, or say which run holds it."""
        self._create()
        self._lock()

    def release(self) -> None:
        """Unlock (a no-op when not held); a directory this run created and wrote nothing to goes again."""
        self._unlock()
        if self._created and not any(entry.name != LOCK_FILE for entry in self.path.iterdir()):
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()
            self._created = False

    def how_to_continue(self) -> str:
        """What to do after a checkpoint could not be written, by what the directory holds now."""
        if (self.path / "last.pt").exists():
            return "run the same command again: it resumes from last.pt"
        return "start the run again with --overwrite (no last.pt has been written to resume from)"

    def describe_last_checkpoint(self) -> str:
        """Where a stopped run stands, from last.pt's small entries (memory-mapped: its tensors stay unread)."""
        last = self.path / "last.pt"
        if not last.exists():
            return f"no checkpoint has been written in {self.path} yet, so the same command starts the run again"
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        where = f"{state['epoch']} epoch(s) done" + (f" and {state['step_in_epoch']} step(s) into the next"
                                                     if state.get("step_in_epoch") else "")
        return f"the last checkpoint is {last} ({where}); the same command resumes from it"

    def _create(self) -> None:
        existed = self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = not existed
        except OSError as error:
            raise UserError(f"cannot create run directory {self.path} ({describe_os_error(error)}); pass a --run-dir "
                            "on a disk this user can write to.") from None

    def _lock(self) -> None:
        path = self.path / LOCK_FILE
        try:
            lock_file = open(path, "a+")
        except OSError as error:
            raise UserError(f"cannot write in run directory {self.path} ({describe_os_error(error)}); pass a "
                            "--run-dir on a disk this user can write to.") from None
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(lock_file)
            lock_file.close()
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"run directory {self.path} is in use by another run ({holder}); wait for it to end, "
                            "or pass another --run-dir.") from None
        earlier = _read_holder(lock_file)
        if earlier != "unknown process":
            self.notes.append(f"took over the lock of {earlier}, which no longer runs")
        lock_file.seek(0)
        lock_file.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, lock_file)
        lock_file.flush()
        self._lock_file = lock_file

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.seek(0)
            self._lock_file.truncate()  # an empty lock file: nobody holds the directory
            self._lock_file.close()  # closing drops the lock
            self._lock_file = None

    def prepare(self, fresh: bool, overwrite: bool, inputs: list[str]) -> None:
        """Before the run writes anything: remove what interrupted saves left, and for a fresh start clear an
        earlier run's files, unless they include a checkpoint the run was not told to replace (then refuse)
        or a file this run reads (init_from: refuse, or the run would delete what it starts from)."""
        for stale in sorted(self.path.glob(STALE_TEMPORARIES)):
            stale.unlink()
            self.notes.append(f"removed {stale}, left by a checkpoint save that was cut short")
        if not fresh:
            return
        if not overwrite and (self.path / "last.pt").exists():  # absent when this command looked, before holding
            raise UserError(f"run directory {self.path} was written by another run while this one started (it now "
                            "holds a last.pt); run the same command again to resume that run, or pass another "
                            "--run-dir.")
        earlier = [path for pattern in RUN_FILES for path in sorted(self.path.glob(pattern))]
        for given in filter(None, inputs):
            if Path(given).resolve() in {path.resolve() for path in earlier}:
                raise UserError(f"{given} lies in run directory {self.path}, which this run would clear as it "
                                "starts; write this run to another --run-dir (stage 2's is runs/cub_vgg16_stage2).")
        checkpoints = [path.name for path in earlier if path.name in CHECKPOINTS]
        if checkpoints and not overwrite:
            raise UserError(f"run directory {self.path} holds an earlier run's {' and '.join(checkpoints)} but no "
                            "last.pt to resume from; pass --overwrite to replace that run, or another --run-dir.")
        for path in earlier:
            path.unlink()


def _read_holder(lock_file) -> str:
    """"host H, pid P, started T" from a lock file, or "unknown process" when it names none."""
    lock_file.seek(0)
    try:
        holder = json.loads(lock_file.read() or "{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


def read_metric_rows(path: Path, up_to_epoch: int) -> list[str]:
    """metrics.jsonl lines of the epochs a checkpoint covers; later ones died with the process that wrote them."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= up_to_epoch]
