"""Shared fixtures: generated mini-CUBs in the exact CUB_200_2011 layout (bcnn.data.write_synthetic_cub); the
suite's thread budget; the `gpu` marker (tests skipped without CUDA: `make test-gpu` runs them)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers.runs import launch, small_run_args, suite_threads

# One thread budget for the suite, whatever the machine's core count: this process uses it, and every
# subprocess inherits it through OMP_NUM_THREADS (torchrun's ranks split it, helpers.runs.launch). torch.compile's
# worker pool would otherwise start a process per core.
SUITE_THREADS = suite_threads()
os.environ["OMP_NUM_THREADS"] = str(SUITE_THREADS)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch.set_num_threads(SUITE_THREADS)

from bcnn.data import write_synthetic_cub  # noqa: E402  (after the thread budget is set)


def pytest_report_header(config):
    return f"bcnn: {SUITE_THREADS} CPU thread(s) (OMP_NUM_THREADS), CUDA {'yes' if torch.cuda.is_available() else 'no'}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mini_cub(tmp_path_factory) -> Path:
    """5 classes x 12 images, written once per session: read it, never change it (use writable_cub for that)."""
    return write_synthetic_cub(tmp_path_factory.mktemp("mini") / "CUB_200_2011", classes=5, per_class=12, seed=0)


@pytest.fixture
def writable_cub(mini_cub, tmp_path) -> Path:
    """A private copy of mini_cub that a test may corrupt."""
    return Path(shutil.copytree(mini_cub, tmp_path / "CUB_200_2011"))


@pytest.fixture(scope="session")
def cub_3x13(tmp_path_factory) -> Path:
    """3 classes x 13 images: 18 train+val, 21 test (odd, so two ranks get shards of different sizes)."""
    return write_synthetic_cub(tmp_path_factory.mktemp("cub_3x13") / "cub", classes=3, per_class=13, seed=0)


@pytest.fixture(scope="session")
def reference_run(cub_3x13, tmp_path_factory) -> Path:
    """helpers.runs.small_run_args run once, uninterrupted, in one process without torchrun: the reference
    of the DDP and resume tests. Read it, never change it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = launch(sys.executable, "-m", "bcnn.train", *small_run_args(cub_3x13, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
