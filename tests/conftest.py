"""Shared fixtures: generated mini-CUBs in the exact CUB_200_2011 layout (bcnn.data.write_synthetic_cub); the
suite's thread budget; the `gpu` marker (tests skipped without CUDA: `make test-gpu` runs them)."""

import gc
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers.runs import end_children_as_an_exit_would, launch, small_run_args, suite_threads

# One thread budget for the suite, whatever the machine's core count: this process uses it, and every
# subprocess inherits it through OMP_NUM_THREADS (torchrun's ranks split it, helpers.runs.launch). torch.compile's
# worker pool would otherwise start a process per core.
SUITE_THREADS = suite_threads()
os.environ["OMP_NUM_THREADS"] = str(SUITE_THREADS)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch.set_num_threads(SUITE_THREADS)

from bcnn.data import write_synthetic_cub  # noqa: E402  (after the thread budget is set)


def pytest_collection_finish(session):
    """Set aside for the garbage collector what the process holds once every test module is imported (torch, timm,
    the tests themselves: half a million objects): a full collection (Python's own, helpers.runs's after a command
    that left workers, the bench's around each case) then walks only what the tests made since (0.2 s before)."""
    gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A loader a test left behind (held by a cycle, e.g. a refused command's traceback) is ended now, its workers
    killed, rather than by pytest's last garbage collection, where its join of live workers was cut short by the
    worker's own exit (an "Exception ignored in _MultiProcessingDataLoaderIter.__del__" after the last test)."""
    end_children_as_an_exit_would(set())


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (make test): one pytest-xdist worker more than this machine's cores. A worker waits at times (a
    checkpoint's fsync, a command's process starting), and one more keeps the cores busy then: 6 min 28 s against
    6 min 52 s for the same suite on 2 cores (docs/tests.md). PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own hook reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


def pytest_report_header(config):
    return f"bcnn: {SUITE_THREADS} CPU thread(s) (OMP_NUM_THREADS), CUDA {'yes' if torch.cuda.is_available() else 'no'}"


# Session fixtures that train a model for tests in several files. pytest-xdist (`make test`) builds a session or
# module fixture once in each worker that runs a test needing it: with `--dist loadgroup`, the tests that share one
# of these, or a module fixture of their file, run in one worker, so each is built once per suite.
SHARED_RUNS = {"reference_run"}


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    group_tests_that_share_a_run(items)  # before pytest-xdist's worker reads the groups
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    yield
    if config.getoption("loadgroup", False):  # a pytest-xdist worker under --dist loadgroup
        name_the_groups_in_node_ids(items)


def group_tests_that_share_a_run(items) -> None:
    """An xdist_group per set of tests linked by the shared fixtures they use: a run of SHARED_RUNS, or their
    file's module fixtures (a trained run, a model, a generated dataset)."""
    parent = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys = {}
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        per_module = {name for name, defs in (definitions.name2fixturedefs.items() if definitions else ())
                      if defs and defs[-1].scope == "module"}
        keys[item] = [name if name in SHARED_RUNS else str(item.path) for name in item.fixturenames
                      if name in SHARED_RUNS or name in per_module]
        for key in keys[item][1:]:
            parent[root(key)] = root(keys[item][0])
    for item, linked in keys.items():
        if linked:
            item.add_marker(pytest.mark.xdist_group(Path(root(linked[0])).name))


def name_the_groups_in_node_ids(items) -> None:
    """What pytest-xdist's worker does for --dist loadgroup, where its scheduler reads each test's group: the group's
    name after an @ at the end of its node id. Under pytest 9.2 the assignment xdist 3.8 makes no longer changes the
    node id (pytest-dev/pytest-xdist#1386) and every test would be scheduled on its own; where xdist did it, this does
    nothing."""
    for item in items:
        group = item.get_closest_marker("xdist_group")
        if group is not None and not item.nodeid.endswith(f"@{group.args[0]}"):
            from _pytest.nodeid import NodeId  # pytest >= 9.2: node ids are NodeId objects

            item._id = NodeId.parse(f"{item.nodeid}@{group.args[0]}")


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
def cub_3x6(tmp_path_factory) -> Path:
    """3 classes x 6 images: at data.val_fraction=0.34, 6 train (two steps of 4), 3 val, 9 test. For the runs whose
    claims hold at any size, where fewer images are fewer steps."""
    return write_synthetic_cub(tmp_path_factory.mktemp("cub_3x6") / "cub", classes=3, per_class=6, seed=0)


@pytest.fixture(scope="session")
def reference_run(cub_3x13, tmp_path_factory) -> Path:
    """helpers.runs.small_run_args run once, uninterrupted, in one process without torchrun: the reference
    of the DDP and resume tests. Read it, never change it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = launch(sys.executable, "-m", "bcnn.train", *small_run_args(cub_3x13, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
