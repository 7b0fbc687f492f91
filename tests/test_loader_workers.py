"""Loaders with workers on, as users run them: every loader path (train, val and eval, on either decode path, and
the feature cache's build) gives the batches it gives without workers, bit for bit, and a worker that dies or
stalls ends the command with one sentence instead of a traceback or a wait for ever."""

import os
import re
import multiprocessing
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import get_worker_info

from bcnn import train as train_cli
from bcnn.config import DataConfig, ModelConfig
from bcnn.data import build_dataset, build_image_loader, write_synthetic_cub
from bcnn.data.loader import build_loader
from bcnn.data.dataset import _ImageDataset
from bcnn.data.gpu import EncodedFiles
from bcnn.errors import exit_on_user_error
from bcnn.feature_cache import build_feature_cache
from bcnn.models import build_model
from helpers.runs import STAGE1

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """3 classes x 5 images: 8 train, 2 val, 5 test; batches of 4 leave a partial last batch in each."""
    return write_synthetic_cub(tmp_path_factory.mktemp("workers") / "cub", classes=3, per_class=5, seed=1)


def data_config(cub, decode: str) -> DataConfig:
    return DataConfig(root=str(cub), resize=40, crop=32, val_fraction=0.2, decode=decode)


def epochs_of_batches(cfg: DataConfig, dataset, train: bool, num_workers: int) -> list:
    """Two epochs of the loader a run builds, read as the engine reads it: the workers persist between them."""
    loader = build_image_loader(cfg, dataset, 4, train, seed=3, device=CPU, num_workers=num_workers)
    batches = []
    for epoch in (1, 2):
        if train:
            loader.sampler.set_epoch(epoch)
        batches += list(loader)
    return batches


@pytest.mark.parametrize("decode", ["cpu", "gpu"], ids=["decode-cpu", "decode-gpu"])  # id "gpu" marks CUDA tests
def test_workers_give_the_batches_the_main_process_gives(cub, decode):
    cfg = data_config(cub, decode)
    for split, train in (("train", True), ("val", False), ("test", False)):
        dataset = build_dataset(cfg, split)
        alone, in_workers = (epochs_of_batches(cfg, dataset, train, workers) for workers in (0, 2))
        assert len(alone) == len(in_workers) == 2 * -(-len(dataset) // 4)
        for (images, labels), (expected, expected_labels) in zip(in_workers, alone):
            assert torch.equal(images, expected) and torch.equal(labels, expected_labels)


@pytest.mark.parametrize("decode", ["cpu", "gpu"], ids=["decode-cpu", "decode-gpu"])  # id "gpu" marks CUDA tests
def test_a_feature_cache_built_in_workers_is_the_one_built_without(cub, decode, tmp_path):
    cfg = data_config(cub, decode)
    views = build_dataset(cfg, "train", train_transform=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_weights="none"), 3, input_size=32)
    caches = [build_feature_cache(model, views, ("center", "flip"), tmp_path / str(workers), CPU, batch_size=4,
                                  num_workers=workers, data_cfg=cfg) for workers in (0, 1)]
    assert np.array_equal(caches[0].features, caches[1].features)


def run_train(cub, run_dir, *extra) -> None:
    """`python -m bcnn.train` in this process (its loader workers are forked from it, patches included), which
    must exit with status 2."""
    command = exit_on_user_error(train_cli.main)
    with pytest.raises(SystemExit) as stop:
        command(["--config", STAGE1, f"--data-root={cub}", f"--run-dir={run_dir}", "--device=cpu", "--data.resize=40",
                 "--data.crop=32", "--data.val_fraction=0.2", "--data.num_workers=1", "--model.backbone_weights=none",
                 "--train.batch_size=4", "--train.epochs=1", "--train.log_every=0", "--train.precision=fp32",
                 f"--train.cache_dir={run_dir.parent / 'cache'}", *extra])
    assert stop.value.code == 2


@pytest.mark.parametrize("path, dataset, options", [
    ("live training, decode gpu", EncodedFiles, ["--data.decode=gpu"]),
    ("feature cache build", _ImageDataset, ["--train.cache_features=true"])], ids=["live-gpu", "cache"])
def test_a_worker_that_dies_ends_the_run_with_one_sentence(cub, tmp_path, monkeypatch, capsys, path, dataset, options):
    read = dataset.__getitem__

    def die_in_a_worker(self, item):
        if get_worker_info() is not None:
            os._exit(3)  # as a crash in a C library, or the out-of-memory killer, ends a worker: no exception
        return read(self, item)

    monkeypatch.setattr(dataset, "__getitem__", die_in_a_worker)
    start = time.perf_counter()
    run_train(cub, tmp_path / "run", *options)
    assert time.perf_counter() - start < 60
    # torch names the exit code when its SIGCHLD handler sees the worker go first, not when the main process does
    assert re.fullmatch(r"error: a data loader worker \(pid \d+\) exited unexpectedly( with exit code 3)?; lower "
                        r"data.num_workers \(--num-workers in bcnn.eval and bcnn.bench\), or set it to 0 to see any "
                        r"error in the main process.\n", capsys.readouterr().err)


def test_a_worker_that_stalls_ends_the_run_after_the_timeout(cub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bcnn.data.loader.WORKER_TIMEOUT_S", 1)
    read = _ImageDataset.__getitem__

    def stall_in_validation(self, item):
        if not isinstance(item, tuple):  # val and eval loaders ask for plain indices, TrainSampler for pairs
            # A worker that would never end by itself and ignores the SIGTERM an exiting process sends (as one
            # deadlocked inside fork does): the run must still end, killing it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(600)
        return read(self, item)

    monkeypatch.setattr(_ImageDataset, "__getitem__", stall_in_validation)
    run_train(cub, tmp_path / "run")
    error = capsys.readouterr().err
    assert error == ("error: no batch came from the data loader workers in 1 s (a worker stalled reading the data or "
                     "could not send its batch); check that the data folder's disk responds, or lower "
                     "data.num_workers (--num-workers in bcnn.eval and bcnn.bench), or set it to 0 to see any error "
                     "in the main process.\n")
    assert not multiprocessing.active_children(), "no worker is left behind to keep the process from exiting"


class _CutHandoffs(torch.utils.data.Dataset):
    """Run in a loader worker: a batch handoff to the main process cut as a stopped main process cuts it (its
    socket closed before the handshake, the challenge unread), once with Python's own excepthook and once with the
    one bcnn's loader installs; then an unrelated error. Gives what the worker printed each time."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        import io
        import socket
        import sys
        from multiprocessing import resource_sharer

        def printed_by(excepthook, cut):
            sys.excepthook, installed = excepthook, sys.excepthook
            sys.stderr, stderr = io.StringIO(), sys.stderr
            try:
                if cut:
                    address = resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))._id[0]
                    client = socket.socket(socket.AF_UNIX)
                    client.connect(address)
                    client.close()
                    # A whole handoff after it: served once the cut one has been, so its report is printed by now
                    os.close(resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY)).detach())
                else:
                    try:
                        raise ValueError("a worker's own error")
                    except ValueError:
                        sys.excepthook(*sys.exc_info())
                return sys.stderr.getvalue()
            finally:
                sys.excepthook, sys.stderr = installed, stderr

        return printed_by(sys.__excepthook__, True), printed_by(sys.excepthook, True), printed_by(sys.excepthook, False)


def test_a_cut_batch_handoff_prints_nothing_in_the_worker_and_other_errors_still_print():
    # Ctrl-C or SIGTERM stopping the main process mid-handoff made a worker print a ConnectionResetError traceback
    # above the "stopped training" sentence (CI, test_run_dir's signal test).
    loader = build_loader(_CutHandoffs(), 1, train=False, num_workers=1, seed=0, collate_fn=lambda items: items[0])
    plain, quiet, other = next(iter(loader))
    # Which error the cut gives depends on the moment: a reset or broken pipe (both ConnectionError), or EOF
    assert "resource_sharer.py" in plain and re.search(r"^(ConnectionResetError|BrokenPipeError|EOFError)", plain,
                                                       re.MULTILINE), plain
    assert quiet == ""
    assert "ValueError: a worker's own error" in other
