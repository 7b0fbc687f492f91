"""A run directory's life: held by one run at a time, started or resumed, never losing a checkpoint that the run
was not told to replace, and what a run writes into it as it goes (RunRecorder: progress, curves, metrics.jsonl,
best.pt and last.pt, with RunCounters saying where the run stands).

    run = RunDirectory(Path("runs/cub_vgg16_stage1"))
    try:
        run.hold()                                     # rank 0; another run holding it is refused
        run.prepare(fresh=True, overwrite=False, inputs={"--config": config})  # clears an earlier run, or refuses
        ...
    finally:
        run.release()

Holding: `run.lock` in the directory is locked for the life of the run and names its host and pid. The lock is
a POSIX record lock (lockf, fcntl(2)): the kernel drops it when the process ends, however it ends, so a lock
left by a killed run (a SIGKILL, a pre-empted node, a torchrun restart) is simply taken over; forked children
(DataLoader workers, which can outlive a killed run by seconds) do not inherit it, as they would an flock; and
NFS supports it. Its one trap: closing any descriptor of run.lock in the process drops the lock, so nothing but
RunDirectory opens that file. Commands that only read a run (eval, predict) never take it.

What a run may clear: only files a bcnn command wrote, recognised by name and content (written_by_bcnn), so a
copied or moved run directory is still recognised and a user's file is never taken for one: a checkpoint that
loads as bcnn's (weights, config and classes), the complete resolved config.yaml as bcnn.train dumps it, a
train.log whose first line is bcnn's first log line, a metrics.jsonl of epoch rows, a TensorBoard events file,
and bcnn.eval's JSON (its metric keys) with the CSV and PNGs named after it. A new run into a directory that holds
anything else is refused, naming it. Without --overwrite it clears only what a run left that stopped before its
first checkpoint (config.yaml, train.log, events); an earlier run's results (a checkpoint, evaluations, epoch
rows) need --overwrite. --overwrite moves the earlier run into previous_run/ and deletes that folder once the new
run writes its first last.pt; a run that stops before then (a bad image, Ctrl-C) puts it back as it was.

Why by content and not by a manifest the run writes (a list of its files with their hashes; considered in issue 28
and left): train.log, metrics.jsonl and the TensorBoard events grow with every step, so their hashes would be stale
unless the manifest were rewritten, atomically, after each write; bcnn.eval adds its files to a run's directory from
another process later; and a run killed between writing a file and its manifest entry, a directory written before
manifests or copied by hand, would still need recognising by content. A manifest would add a second rule beside
this one, not replace it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from bcnn.checkpoint import save_checkpoint
from bcnn.config import Config, config_to_dict
from bcnn.errors import UserError
from bcnn.progress import EpochProgress

log = logging.getLogger("bcnn")

LOCK_FILE = "run.lock"
CHECKPOINTS = ("last.pt", "best.pt")
PROJECTOR_FOLDER = "projector"  # TensorBoard's projector of the val embeddings, a log folder of its own
PROJECTOR_FILES = ("tensors.tsv", "metadata.tsv", "sprite.png")
PREVIOUS_RUN = "previous_run"  # the run --overwrite replaces, until the new one has its first last.pt
# save_checkpoint writes .<name>.<random>.tmp and renames it; one left behind means a save was cut short.
STALE_TEMPORARIES = ".*.pt.*.tmp"
# bcnn.eval's files beside its JSON, <JSON stem>_<suffix>, and how each begins.
EVAL_SIBLINGS = {"per_class.csv": b"index,class,images,correct,accuracy\r\n", "confusion.png": b"\x89PNG",
                 "per_class.png": b"\x89PNG", "confused_gallery.png": b"\x89PNG"}
EVAL_KEYS = {"checkpoint", "split", "tta", "top1", "count", "most_confused"}
EMBEDDING_EVAL_KEYS = {"checkpoint", "split", "count", "embeddings_only"}  # bcnn.eval without a classifier to score
TRAIN_LOG_START = re.compile(r"\d\d:\d\d:\d\d run dir")  # bcnn.train's first log line: "run dir(ectory) PATH"
READ_LIMIT = 16 << 20  # no file of these kinds is larger; a larger one is not bcnn's


def describe_os_error(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.notes: list[str] = []  # what holding and preparing did, for the run's log once it is open
        self._lock_file = None
        self._created = False
        self._replacing = False  # the earlier run waits in previous_run/ for this run's first last.pt
        # Writers that reopen their file by path on every write (TensorBoard's): release() closes them first, so
        # none writes into the directory once it is put back or another run holds it.
        self.writers: list = []

    def hold(self) -> None:
        """Create the directory if needed and lock it for this run, or say which run holds it."""
        self._create()
        self._lock()

    def release(self) -> None:
        """Close the run's writers; put back the run --overwrite was replacing if this run wrote no last.pt; unlock
        (a no-op when not held); a directory this run created and wrote nothing to goes again."""
        for writer in self.writers:
            writer.close()
        if self._replacing:
            self._put_back_previous_run()
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
        if self._replacing:
            return (f"this run wrote no checkpoint, so the run that --overwrite was replacing is put back in "
                    f"{self.path} as it was; the same command starts again")
        if not last.exists():
            return f"no checkpoint has been written in {self.path} yet, so the same command starts the run again"
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        where = f"{state['epoch']} epoch(s) done" + (f" and {state['step_in_epoch']} step(s) into the next"
                                                     if state.get("step_in_epoch") else "")
        return f"the last checkpoint is {last} ({where}); the same command resumes from it"

    def _create(self) -> None:
        existed = self.path.exists()
        in_the_way = next((path for path in (self.path, *self.path.parents) if path.exists()), None)
        if in_the_way is not None and not in_the_way.is_dir():
            where = "is a file" if in_the_way == self.path else f"lies under {in_the_way}, which is a file"
            raise UserError(f"--run-dir {self.path} {where}; pass a folder for the run (a new one, or an earlier "
                            "run's).")
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

    def prepare(self, fresh: bool, overwrite: bool, inputs: dict[str, str | None]) -> None:
        """Before the run writes anything: remove what interrupted saves left, and for a fresh start clear or set
        aside an earlier run's files (module docstring), refusing a directory that holds a file bcnn did not
        write, an earlier run's results without --overwrite, or a file this run reads (inputs, by the option
        that names it: the run would delete what it starts from)."""
        for stale in sorted(self.path.glob(STALE_TEMPORARIES)):
            stale.unlink()
            self.notes.append(f"removed {stale}, left by a checkpoint save that was cut short")
        for stale in sorted(self.path.glob(f"{PROJECTOR_FOLDER}*.tmp")):
            if stale.is_dir() and _is_projector(stale):
                shutil.rmtree(stale)
                self.notes.append(f"removed {stale}/, left by a projector write that was cut short")
        previous = self.path / PREVIOUS_RUN
        if not fresh:
            if previous.is_dir() and (self.path / "last.pt").exists():  # the replacing run was killed after it
                self.notes.append(self._remove_previous_run())
            return
        if not overwrite and (self.path / "last.pt").exists():  # absent when this command looked, before holding
            raise UserError(f"run directory {self.path} was written by another run while this one started (it now "
                            "holds a last.pt); run the same command again to resume that run, or pass another "
                            "--run-dir.")
        entries = [path for path in sorted(self.path.iterdir())
                   if path.name != LOCK_FILE and not (path.name == PREVIOUS_RUN and path.is_dir())]
        kept = sorted(previous.iterdir()) if previous.is_dir() else []  # an --overwrite killed before its last.pt
        foreign = [path for path in entries + kept if not written_by_bcnn(path)]
        if foreign:
            raise UserError(f"run directory {self.path} holds {self._names(foreign)}, which bcnn did not write and a "
                            f"new run will not delete; move {'it' if len(foreign) == 1 else 'them'} elsewhere, or "
                            "pass another --run-dir.")
        for option, given in inputs.items():
            if given and Path(given).resolve() in {path.resolve() for path in entries + kept}:
                way_out = ("write this run to a --run-dir of its own, not the one that checkpoint lies in"
                           if option == "train.init_from" else
                           f"copy it out of there and pass the copy as {option}, or write this run to another "
                           "--run-dir")
                raise UserError(f"{option} {given} lies in run directory {self.path}, which this run would clear "
                                f"as it starts; {way_out}.")
        if not overwrite:
            if previous.is_dir():
                raise UserError(f"run directory {self.path} holds {PREVIOUS_RUN}/, the run that an --overwrite "
                                "stopped before its first checkpoint was replacing; move its files back into "
                                f"{self.path} to keep that run, or pass --overwrite to replace it.")
            results = [path for path in entries if path.name in CHECKPOINTS or written_by_eval(path)
                       or (path.name == "metrics.jsonl" and _holds_rows(path))]
            if results:
                raise UserError(f"run directory {self.path} holds an earlier run's {self._names(results)} but no "
                                "last.pt to resume from; pass --overwrite to replace that run, or another "
                                "--run-dir.")
            for path in entries:  # what a run left that stopped before its first checkpoint
                remove(path)
            return
        if previous.is_dir() and (self.path / "last.pt").exists():  # the replacing run was killed after its last.pt
            self.notes.append(self._remove_previous_run())
        if previous.is_dir():
            for path in entries:  # what a killed --overwrite wrote; previous_run/ still holds the run it replaced
                remove(path)
        elif entries:
            previous.mkdir()
            self._replacing = True  # from here on, release() puts back whatever was moved
            for path in entries:
                os.replace(path, previous / path.name)
        if previous.is_dir():
            self._replacing = True
            self.notes.append(f"the run that --overwrite replaces waits in {previous}: it is deleted once this "
                              "run writes its first last.pt, and put back if this run stops before")

    def checkpoint_written(self) -> None:
        """After each last.pt: the first one makes the run that --overwrite replaced unneeded."""
        if self._replacing:
            log.info("run directory %s: %s", self.path, self._remove_previous_run())
            self._replacing = False

    def _remove_previous_run(self) -> str:
        shutil.rmtree(self.path / PREVIOUS_RUN)
        return f"removed {PREVIOUS_RUN}/, the run that --overwrite replaced, now that a new run has its last.pt"

    def _put_back_previous_run(self) -> None:
        previous = self.path / PREVIOUS_RUN
        for path in self.path.iterdir():
            if path.name not in (LOCK_FILE, PREVIOUS_RUN) and written_by_bcnn(path):
                remove(path)
        for path in previous.iterdir():
            os.replace(path, self.path / path.name)
        previous.rmdir()
        self._replacing = False
        log.info("run directory %s: this run stopped before its first last.pt, so the run that --overwrite was "
                 "replacing is back as it was", self.path)

    def _names(self, paths: list[Path]) -> str:
        names = [str(path.relative_to(self.path)) + ("/" if path.is_dir() else "") for path in paths]
        if len(names) > 4:
            names = [*names[:3], f"{len(names) - 3} more"]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def written_by_bcnn(path: Path) -> bool:
    """Whether path is a file a bcnn command wrote into a run directory, by its name and content (module
    docstring); of folders, only the projector's (PROJECTOR_FOLDER) is."""
    if path.is_dir():  # bcnn.train's projector/, bcnn.eval --projector's projector_<checkpoint>_<split>/
        return path.name.startswith(PROJECTOR_FOLDER) and not path.name.endswith(".tmp") and _is_projector(path)
    if not path.is_file():
        return False
    if path.name in CHECKPOINTS:
        return _is_checkpoint(path)
    if path.name == "config.yaml":
        return _is_resolved_config(path)
    if path.name == "train.log":
        head = _read_head(path, 64)
        return head == b"" or TRAIN_LOG_START.match(head.decode("utf-8", "replace")) is not None
    if path.name == "metrics.jsonl":
        return _is_metrics(path)
    if path.name.startswith("events.out.tfevents."):
        head = _read_head(path, 64)
        return head == b"" or b"brain.Event:" in head
    return written_by_eval(path)


def _is_projector(folder: Path) -> bool:
    """A TensorBoard projector log as bcnn.train writes it: its config, event files, and per step and tag the
    vectors, labels and thumbnails, nothing else."""
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        relative = path.relative_to(folder).parts
        if relative == ("projector_config.pbtxt",) or (len(relative) == 1 and
                                                       path.name.startswith("events.out.tfevents.")):
            continue
        if len(relative) == 3 and relative[0].isdigit() and path.name in PROJECTOR_FILES:
            continue
        return False
    return True


def write_projector_folder(folder: Path, write) -> None:
    """A projector log folder written whole or not at all: write(temporary folder) fills a folder beside it, which
    then replaces `folder` (the projector's config names its files relative to the folder)."""
    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    write(temporary)
    if folder.exists():
        remove(folder)
    os.replace(temporary, folder)


def remove(path: Path) -> None:
    """A file, or the projector's folder, that bcnn wrote."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def written_by_eval(path: Path) -> bool:
    """Whether path is a file bcnn.eval wrote: its JSON, or a CSV or PNG named after one beside it."""
    if _is_eval_json(path):
        return True
    for suffix, start in EVAL_SIBLINGS.items():
        if path.name.endswith(f"_{suffix}") and _read_head(path, len(start)) == start:
            stem = path.name[:-len(suffix) - 1]
            return any(candidate.stem == stem and _is_eval_json(candidate)
                       for candidate in path.parent.glob(glob.escape(stem) + "*"))
    return False


def _read_head(path: Path, size: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None


def _read_text(path: Path) -> str | None:
    """A small UTF-8 text file's content; None when it is large, unreadable or not UTF-8."""
    try:
        if path.stat().st_size > READ_LIMIT:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _is_checkpoint(path: Path) -> bool:
    try:  # memory-mapped: the tensors stay unread
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unpickling, zip and mmap errors have no common type: none is a checkpoint
        return False
    return isinstance(state, dict) and {"model", "config", "classes"} <= state.keys()


def _is_resolved_config(path: Path) -> bool:
    text = _read_text(path)
    try:
        config = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return False
    return (isinstance(config, dict) and set(config) == set(config_to_dict(Config()))
            and all(isinstance(values, dict) for values in config.values())
            and yaml.safe_dump(config, sort_keys=False) == text)


def _is_metrics(path: Path) -> bool:
    text = _read_text(path)
    return text is not None and isinstance(_metric_rows(text), list)


def _holds_rows(path: Path) -> bool:
    """Whether a metrics.jsonl bcnn wrote holds a whole epoch row: a run's result, which only --overwrite replaces."""
    rows = _metric_rows(_read_text(path) or "")
    return not isinstance(rows, list) or len(rows) > 0


def _metric_rows(text: str) -> list[tuple[str, dict]] | int:
    """metrics.jsonl's rows as (line, row), or the number of the first line that is not an epoch row. A last line
    without its newline that does not parse is a row whose write a kill or a full disk cut short (metrics are
    written before the epoch's last.pt, so no checkpoint holds that epoch): it is left out, not counted as damage."""
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends in a newline, as every whole row does
    rows = []
    for number, line in enumerate(lines + [torn], 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and {"epoch", "global_step"} <= row.keys()):
            if number == len(lines) + 1:
                break
            return number
        rows.append((line, row))
    return rows


def _is_eval_json(path: Path) -> bool:
    if not path.is_file() or _read_head(path, 1) != b"{":
        return False
    text = _read_text(path)
    try:
        result = json.loads(text) if text is not None else None
    except ValueError:
        return False
    return isinstance(result, dict) and (EVAL_KEYS <= result.keys() or EMBEDDING_EVAL_KEYS <= result.keys())


def _read_holder(lock_file) -> str:
    """"host H, pid P, started T" from a lock file, or "unknown process" when it names none."""
    lock_file.seek(0)
    try:
        holder = json.loads(lock_file.read() or "{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


def read_metric_rows(path: Path, up_to_epoch: int) -> list[str]:
    """metrics.jsonl lines of the epochs a checkpoint covers; later ones died with the process that wrote them, as
    did a last row whose write was cut short."""
    if not path.exists():
        return []
    rows = _metric_rows(path.read_text(encoding="utf-8", errors="replace"))
    if isinstance(rows, int):
        raise UserError(f"line {rows} of {path} is not an epoch row as bcnn.train writes them, so resuming would "
                        "lose the run's earlier curves; restore the file, or move it aside to resume with "
                        "metrics.jsonl holding only the epochs from here on.")
    return [line for line, row in rows if row["epoch"] <= up_to_epoch]


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
    states a last.pt adds; fixed: entries every checkpoint carries (config, classes); frozen: what a model.adapt run's
    checkpoints leave out (bcnn.models.frozen_weights.FrozenBackbone, or None). probe: a linear-probe sweep
    (bcnn.probe_grid.ProbeGrid), whose members' val numbers end_epoch receives as a tuple: the epoch's best member
    stands for the run, and best.pt holds the best (member, epoch) as a plain model."""

    def __init__(self, run: RunDirectory, counters: RunCounters, model, training_state, fixed: dict, is_main: bool,
                 checkpoint_every: int, diverged_hint: str, board=None, ema=None, best_of: str = "raw",
                 on_best=None, probe=None, frozen=None):
        self.run, self.counters, self.model, self.training_state = run, counters, model, training_state
        self.frozen = frozen  # a model.adapt run's frozen backbone (FrozenBackbone), which checkpoints leave out
        self.probe = probe
        self.ema, self.best_of = ema, best_of  # the weights' average (AveragedModel), and which of the two best.pt keeps
        self.on_best = on_best  # on_best(weights, global_step): after each best.pt, on rank 0 (the val heatmaps)
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

    def end_epoch(self, train_stats: dict, val_stats: dict | None, device, ema_val_stats: dict | None = None) -> dict:
        """metrics.jsonl, TensorBoard, best.pt when val improved, last.pt; returns the epoch's row. val_stats (and
        ema_val_stats, the average's) hold a "confusion" matrix, drawn when best.pt is written."""
        epoch, counters = self.epoch, self.counters
        members = val_stats if isinstance(val_stats, tuple) else None
        if members is not None:  # a probe grid's: the epoch's best member (the first of equals) stands for the run
            winner = max(range(len(members)), key=lambda member: members[member]["top1"])
            val_stats = members[winner]
        val_stats, ema_val_stats = (dict(stats) if stats else None for stats in (val_stats, ema_val_stats))
        confusions = {name: stats.pop("confusion", None) for name, stats in (("raw", val_stats),
                                                                             ("ema", ema_val_stats)) if stats}
        row = {"epoch": epoch, "global_step": counters.global_step,
               **{f"lr_{name}": lr for name, lr in self.lrs.items()},
               **{f"train_{k}": v for k, v in train_stats.items()},
               **({f"val_{k}": v for k, v in val_stats.items()} if val_stats else {}),
               **({f"val_ema_{k}": v for k, v in ema_val_stats.items()} if ema_val_stats else {}),
               **(self.probe.epoch_entries(members, winner) if members is not None else {})}
        # Selection on val only (the weights train.best_of names); with no val split the paper's fixed schedule
        # keeps the last epoch.
        selected = ema_val_stats if self.best_of == "ema" else val_stats
        val_confusion = confusions.get(self.best_of)
        score = selected["top1"] if selected else epoch
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
                weights = self.ema.module if self.best_of == "ema" else self.model
                fixed = self.fixed
                if members is not None:  # the winner's classifier in the model, its plain run's config
                    self.probe.select(winner)
                    fixed = {**fixed, **self.probe.best_entries(fixed["config"], winner)}
                save_checkpoint({**self.weights(weights), **fixed, "epoch": epoch, "metrics": row},
                                self.run.path / "best.pt", then=self.run.how_to_continue())
                if self.on_best is not None:
                    self.on_best(weights, counters.global_step)
            self.save_last(counters)
        return row

    def save_last(self, counters: RunCounters) -> None:
        state = {**self.weights(self.model), **self.fixed, **self.training_state(), **counters.as_checkpoint()}
        save_checkpoint(state, self.run.path / "last.pt", then=self.run.how_to_continue())
        self.run.checkpoint_written()

    def weights(self, model) -> dict:
        """A checkpoint's model entry: every weight, or (model.adapt) those that trained and the fingerprint of the
        frozen rest (bcnn/models/frozen_weights.py)."""
        if self.frozen is None:
            return {"model": model.state_dict()}
        return {"model": self.frozen.without(model.state_dict()), **self.frozen.entry()}
