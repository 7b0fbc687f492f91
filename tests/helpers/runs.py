"""The small training run that the DDP and resume tests compare against, one launcher for every subprocess the
suite starts (and one for a command run in this process instead), and the suite's CPU thread budget."""

import contextlib
import functools
import gc
import io
import json
import multiprocessing
import os
import signal
import subprocess
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent.parent
STAGE1 = str(REPO / "experiments" / "demo_stage1.yaml")
# Past 4 threads the suite's tiny convolutions (32-112 px, batches of 2-8) gain nothing and OpenMP's
# start-up and barriers cost more than they save (see the README's test section for the figures).
MAX_SUITE_THREADS = 4


def thread_share() -> int:
    """CPU threads for this process: the suite's budget (OMP_NUM_THREADS when it is set, as in
    `OMP_NUM_THREADS=1 make test`, else this machine's cores up to MAX_SUITE_THREADS), split evenly between
    pytest-xdist's workers when the suite runs in several (`make test` starts one per core)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        budget = int(os.environ["OMP_NUM_THREADS"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        budget = min(cores, MAX_SUITE_THREADS)
    return max(1, budget // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@functools.cache
def suite_threads() -> int:
    """thread_share() as the suite started (conftest then sets OMP_NUM_THREADS to it, for the processes this one
    starts): every process the suite runs at a time shares the budget."""
    return thread_share()


def small_run_args(data, run_dir, *extra):
    """Stage 2 style (everything trains), 12 train images (a multiple of 2 ranks and of the batch) in steps of
    4: 3 steps per epoch, 2 epochs, a last.pt every 2 steps. float32, so runs differ only by summation order.
    The demo's stage-2 learning rates: at the recipe's 10x larger ones a random VGG16 amplifies rounding
    differences between runs (helpers.numerics.TRAINING_RTOL). Without the val heatmaps and the projector (WITH_DRAWINGS
    puts them back): a fifth of a run's CPU, and captum's and matplotlib's imports in a new process, for what
    test_explain and the DDP run check."""
    return ["--config", STAGE1, f"--data-root={data}", "--device=cpu", f"--run-dir={run_dir}", "--data.crop=32",
            "--data.resize=40", "--data.val_fraction=0.34", "--train.epochs=2", "--train.batch_size=4",
            "--train.log_every=0", "--train.checkpoint_every=2", "--model.freeze_backbone=false",
            "--optim.lr=0.01", "--optim.backbone_lr=0.001", "--train.precision=fp32", "--data.num_workers=1",
            "--train.heatmap_images=0", "--train.projector=false", *extra]


# small_run_args' extra options that draw the val heatmaps (at each best.pt) and write the projector (at the end)
WITH_DRAWINGS = ("--train.heatmap_images=4", "--train.projector=true")


def launch(*command, env=None, processes=1):
    """A subprocess from the repository root that can import bcnn and tests/helpers. `processes`: how many
    processes the command starts (torchrun's ranks); they split the suite's threads between them."""
    threads = str(max(1, suite_threads() // processes))
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, **(env or {})})


def run_in_process(main, *argv) -> subprocess.CompletedProcess:
    """`python -m bcnn.<entry point> ARGV` as the entry point's __main__ runs it (exit_on_user_error(main)), in this
    process: for tests of what a command does and says rather than of the process, without the seconds a new
    interpreter takes to import torch. Its exit status, stdout and stderr, Python's warnings written to stderr as
    the interpreter writes them."""
    from bcnn.errors import exit_on_user_error

    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    children_before = set(multiprocessing.active_children())
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            exit_on_user_error(main)(list(map(str, argv)))
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:
            end_children_as_an_exit_would(children_before)
    for warning in caught:
        stderr.write(warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno))
    return subprocess.CompletedProcess([main.__module__, *argv], status, stdout.getvalue(), stderr.getvalue())


def end_children_as_an_exit_would(children_before: set) -> None:
    """Kill the daemon processes a command run in this process left behind (the persistent loader workers of a run
    that failed, held by its traceback), as the command's own process would at its exit, then collect what held
    them. Left alone, they were shut down at a later garbage collection: each took torch's 5-s join timeout to
    end, forked as they were from a test process with threads of its own, and one interrupted the xdist worker's
    exit. torch's SIGCHLD handler is set aside meanwhile: it would take their deaths for a worker failure."""
    left = [child for child in multiprocessing.active_children() if child.daemon and child not in children_before]
    if not left:  # the usual case: nothing to end, and no collection to pay for
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in left:
            child.kill()
            child.join(timeout=5)
        gc.collect()  # the loaders' __del__: their workers' pids leave torch's registry
    finally:
        signal.signal(signal.SIGCHLD, previous)


def interrupt_after_first_last_pt(monkeypatch):
    """Ctrl-C right after the first last.pt is written, as a user would press it (in this process)."""
    stop_after_last_pt(monkeypatch, 1, KeyboardInterrupt)


def stop_after_last_pt(monkeypatch, saves: int, exception) -> None:
    """`exception` raised in this process right after the `saves`-th last.pt is written (KeyboardInterrupt: a
    Ctrl-C; an exception nothing in bcnn catches: a crash); later writes go through as usual."""
    from bcnn import run_dir

    real_save, written = run_dir.save_checkpoint, []

    def save_then_stop(state, path, **options):
        real_save(state, path, **options)
        if Path(path).name == "last.pt":
            written.append(path)
            if len(written) == saves:
                monkeypatch.setattr(run_dir, "save_checkpoint", real_save)
                raise exception

    monkeypatch.setattr(run_dir, "save_checkpoint", save_then_stop)


def load(path):
    """A checkpoint, as the tests read one."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rows_without_timing(run_dir):
    """A run's metrics.jsonl rows without their wall-clock figures: what two runs of the same training share."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in ("train_seconds", "train_images_per_sec")}
            for row in rows]
