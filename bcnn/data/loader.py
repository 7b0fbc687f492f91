"""DataLoader construction: the samplers (bcnn.sampling), worker seeding, worker counts from the machine, and a
bounded wait for the workers (WORKER_TIMEOUT_S, worker_errors)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import sys
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bcnn.errors import UserError
from bcnn.sampling import ShardSampler, TrainSampler

# How long the main process waits for the workers' next batch before it ends the run. A worker normally has one
# ready in a second or two (15 PIL workers fed 666 images/s on a 16-core H100 machine: 1.4 s for a batch of 64
# at 448 px); five minutes leaves room for a cold network filesystem or a machine swapping, and still ends a run
# whose worker hangs on a dead disk or cannot send its batch, instead of leaving it waiting for ever.
WORKER_TIMEOUT_S = 300
# What the user can do about a worker that died or stalled, whichever command ran it.
_WORKER_ADVICE = ("lower data.num_workers (--num-workers in bcnn.eval and bcnn.bench), or set it to 0 to see any "
                  "error in the main process")


def _start_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random augmentations follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    sys.excepthook = _quiet_cut_handoff(sys.excepthook)


def _quiet_cut_handoff(print_error):
    """sys.excepthook for a worker, silent for one error only. A worker hands each batch's shared memory to the
    main process over a socket, served by multiprocessing's resource_sharer thread, which reports any error
    through sys.excepthook and goes on serving. When Ctrl-C or SIGTERM stops the main process in the middle of
    such a handoff, the worker's thread sees the connection reset and printed its traceback above bcnn's "stopped
    training; the last checkpoint is ..." (seen in CI): noise about a handoff nobody is waiting for any more."""
    def excepthook(kind, error, trace):
        cut = issubclass(kind, (ConnectionError, EOFError))
        if cut and trace is not None and os.path.basename(trace.tb_frame.f_code.co_filename) == "resource_sharer.py":
            return
        print_error(kind, error, trace)
    return excepthook


def default_num_workers() -> int:
    """Loader workers per training process: the cores this process may use, shared with the other processes
    torchrun started on this machine, minus one for the training loop itself (PIL decoding is what a GPU waits
    for: on an H100 with 16 cores, 15 workers fed 666 images/s where 8 fed 507). At most 16: each worker keeps
    4 batches ready, and 16 x 4 batches of 64 images at 448 px are already 10 GB of float32."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cores // processes_here - 1))


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, collate_fn=None) -> DataLoader:
    """This rank's loader. Train: TrainSampler, eval: ShardSampler (in order, each image on exactly one rank).

    For training call loader.sampler.set_epoch(epoch, skip) before each epoch: order and augmentations are then
    a function of (seed, epoch, sample index) alone, the same for any world_size, num_workers or resume point,
    and the dataset must accept the (index, augment_seed) items the sampler yields, as _ImageDataset does.
    num_workers=-1 picks default_num_workers(); workers persist across epochs and each keeps 4 batches ready.
    A batch the workers have not sent within WORKER_TIMEOUT_S raises; read the loader in a function decorated
    with worker_errors() to turn that, or a worker's death, into one sentence.
    pin_memory: for batches bound for a GPU (the copy then overlaps the step); a CPU run on a GPU machine
    leaves it off, since pinning starts CUDA in the process for nothing. collate_fn: DataLoader's (default: stack).
    """
    if num_workers < 0:
        num_workers = default_num_workers()
    if train:
        sampler = TrainSampler(dataset, rank, world_size, seed)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=_start_worker,
                      generator=generator, collate_fn=collate_fn,
                      timeout=WORKER_TIMEOUT_S if num_workers > 0 else 0)



def _kill_workers() -> None:
    """SIGKILL this process's loader workers (daemon children) before it ends with an error. A stalled worker may
    never answer the SIGTERM that exiting sends it: one forked while another thread held an interpreter lock
    deadlocks inside fork (seen once under torchrun on CPython 3.11) and keeps the inherited Python SIGTERM handler,
    so the exiting process would wait for it for ever, and its torchrun job with it. torch's SIGCHLD handler is set
    aside meanwhile: it would report these deaths as a worker failure at some later, random point."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()
                child.join(timeout=5)
    finally:
        signal.signal(signal.SIGCHLD, previous)


@contextlib.contextmanager
def worker_errors():
    """Torch's errors for a loader worker that died, or for a batch that did not come within WORKER_TIMEOUT_S,
    as one sentence (a UserError); every other error passes unchanged. As a decorator of the whole function that
    reads a loader, not only around next(): torch raises a worker's death from its SIGCHLD handler, wherever the
    main process is at that moment (in a training step, usually)."""
    try:
        yield
    except RuntimeError as error:
        message = str(error)
        if message.startswith(("DataLoader timed out after", "DataLoader worker (")):
            _kill_workers()
        if message.startswith("DataLoader timed out after"):
            raise UserError(f"no batch came from the data loader workers in {WORKER_TIMEOUT_S} s (a worker stalled "
                            f"reading the data or could not send its batch); check that the data folder's disk "
                            f"responds, or {_WORKER_ADVICE}.") from None
        if message.startswith("DataLoader worker ("):
            # torch's first sentence names the worker and how it ended: an exit code, or a signal.
            how = message.split(". ", 1)[0].removeprefix("DataLoader worker ").rstrip(". ")
            how = how.replace("(pid(s) ", "(pid ").replace("is killed by signal:", "was killed by signal")
            # SIGKILL is most often the out-of-memory killer, SIGBUS a full /dev/shm.
            cause = " (out of memory, or of shared memory in /dev/shm?)" if "signal" in how else ""
            raise UserError(f"a data loader worker {how}{cause}; {_WORKER_ADVICE}.") from None
        raise
