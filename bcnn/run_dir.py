"""A run directory's life: held by one run at a time, started or resumed, never losing a checkpoint that the run
was not told to replace, and what a run writes into it as it goes (RunRecorder: progress, curves, metrics.jsonl,
best.pt and last.pt, with RunCounters saying where the run stands).

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
import dataclasses
import errno
import fcntl
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bcnn.checkpoint import save_checkpoint
from bcnn.errors import UserError
from bcnn.progress import EpochProgress

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


@dataclass
class RunCounters:
    """Where a run stands. Checkpoints store these as top-level entries; a resumed run starts from them."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps of the next epoch already taken (a mid-epoch checkpoint)
    global_step: int = 0
    best_score: float = -math.inf  # the selection score of best.pt (val top-1, or the epoch without val)
    epoch_totals: dict | None = None  # the partial epoch's sums at step_in_epoch (loss_sum, correct, seen)
    metrics: dict = field(default_factory=dict)  # the last finished epoch's row of metrics.jsonl

    @classmethod
    def from_checkpoint(cls, state: dict) -> RunCounters:
        return cls(**{name: state[name] for name in cls.__dataclass_fields__})

    def as_checkpoint(self) -> dict:
        return dataclasses.asdict(self)


class RunRecorder:
    """What a run leaves as it goes: progress, TensorBoard curves, metrics.jsonl, best.pt and last.pt (every epoch,
    and every train.checkpoint_every steps); rank 0 writes. Every rank calls the same hooks at the same points,
    since they hold collectives (the NaN check, the sums of a partial epoch).

    model: whose weights go into checkpoints; training_state(): the optimizer, scheduler, scaler and generator
    states a last.pt adds; fixed: entries every checkpoint carries (config, classes)."""

    def __init__(self, run: RunDirectory, counters: RunCounters, model, training_state, fixed: dict, is_main: bool,
                 checkpoint_every: int, diverged_hint: str, board=None):
        self.run, self.counters, self.model, self.training_state = run, counters, model, training_state
        self.fixed, self.is_main, self.checkpoint_every = fixed, is_main, checkpoint_every
        self.diverged_hint, self.board = diverged_hint, board
        self.metrics_path = run.path / "metrics.jsonl"
        if is_main:  # rows of epochs after the checkpoint died with the process that wrote them
            rows = read_metric_rows(self.metrics_path, counters.epoch)
            self.metrics_path.write_text("".join(line + "\n" for line in rows))

    def start_epoch(self, epoch: int, steps_per_epoch: int, lrs: dict, device) -> None:
        self.epoch, self.steps_per_epoch, self.lrs = epoch, steps_per_epoch, lrs
        self.epoch_start_step = self.counters.global_step - self.counters.step_in_epoch
        self.progress = EpochProgress(epoch, steps_per_epoch, self.counters.step_in_epoch, enabled=self.is_main)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def report(self, step: int, stats: dict) -> None:
        """train_one_epoch's on_report: loss, top-1 and images/s since the last report."""
        self.progress.report(step, stats)
        if self.board is not None:
            self.board.step(self.epoch_start_step + step, stats)

    def after_step(self, step: int, meter) -> None:
        """train_one_epoch's after_step; a mid-epoch last.pt every checkpoint_every global steps."""
        self.counters.global_step = self.epoch_start_step + step
        self.progress.advance()
        if step == self.steps_per_epoch:
            self.progress.close()
        every = self.checkpoint_every
        if every and self.counters.global_step % every == 0 and step < self.steps_per_epoch:
            meter.raise_if_diverged(self.epoch, self.diverged_hint)
            totals = meter.totals()  # every rank takes part; rank 0 writes
            if self.is_main:
                self.save_last(dataclasses.replace(self.counters, step_in_epoch=step, epoch_totals=totals))

    def end_epoch(self, train_stats: dict, val_stats: dict | None, val_confusion, device) -> dict:
        """metrics.jsonl, TensorBoard, best.pt when val improved, last.pt; returns the epoch's row."""
        epoch, counters = self.epoch, self.counters
        row = {"epoch": epoch, "global_step": counters.global_step,
               **{f"lr_{name}": lr for name, lr in self.lrs.items()},
               **{f"train_{k}": v for k, v in train_stats.items()},
               **({f"val_{k}": v for k, v in val_stats.items()} if val_stats else {})}
        # Selection on val only; with no val split the paper's fixed schedule keeps the last epoch.
        score = val_stats["top1"] if val_stats else epoch
        improved = score > counters.best_score
        counters.epoch, counters.step_in_epoch, counters.epoch_totals, counters.metrics = epoch, 0, None, row
        counters.best_score = max(counters.best_score, score)
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.board.epoch(counters.global_step, row, self.lrs, device)
            if improved and val_confusion is not None:
                self.board.evaluation_figures("val", val_confusion, self.fixed["classes"], counters.global_step)
            if improved:  # best.pt before last.pt: a crash in between must not lose the best epoch
                save_checkpoint({"model": self.model.state_dict(), **self.fixed, "epoch": epoch, "metrics": row},
                                self.run.path / "best.pt", then=self.run.how_to_continue())
            self.save_last(counters)
        return row

    def save_last(self, counters: RunCounters) -> None:
        state = {"model": self.model.state_dict(), **self.fixed, **self.training_state(), **counters.as_checkpoint()}
        save_checkpoint(state, self.run.path / "last.pt", then=self.run.how_to_continue())
