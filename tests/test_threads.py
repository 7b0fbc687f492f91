"""The suite's CPU threads do not grow with the machine: one budget (helpers.runs.suite_threads) that this
process uses and every process it starts shares: CLI runs, torchrun's ranks (who split it) and loader workers
(one thread each)."""

import sys

import torch
from torch.utils.data import Dataset

from bcnn.data import build_loader
from helpers import runs
from helpers.runs import launch, suite_threads

PRINT_THREADS = "import torch; print(torch.get_num_threads())"


def test_this_process_and_the_commands_it_runs_use_the_budget():
    budget = suite_threads()
    assert torch.get_num_threads() == budget
    assert int(launch(sys.executable, "-c", PRINT_THREADS).stdout) == budget
    # two ranks of torchrun split it (at least one thread each)
    assert int(launch(sys.executable, "-c", PRINT_THREADS, processes=2).stdout) == max(1, budget // 2)


def test_the_budget_is_the_cores_up_to_four_or_what_omp_num_threads_says_split_between_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    for cores, expected in ((1, 1), (2, 2), (16, runs.MAX_SUITE_THREADS), (192, runs.MAX_SUITE_THREADS)):
        monkeypatch.setattr(runs.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert runs.thread_share() == expected, cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runs.thread_share() == 3
    # pytest-xdist's workers (one per core under make test) split the budget, one thread each at least
    for workers, expected in (("1", 3), ("2", 1), ("16", 1)):
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
        assert runs.thread_share() == expected, workers


class ThreadsInWorker(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.get_num_threads()


def test_a_loader_worker_runs_on_one_thread():
    loader = build_loader(ThreadsInWorker(), batch_size=2, train=False, num_workers=1, seed=0)
    assert next(iter(loader)).tolist() == [1, 1]
