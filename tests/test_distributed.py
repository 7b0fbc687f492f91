"""DDP on the CPU (gloo), against one process: the same weights, the same evaluation, and a crashed rank that
torchrun restarts and that resumes; gradient accumulation against one big batch.

The reference is always a plain one-process run (`python -m bcnn.train`, no process group). Runs are tiny:
a random VGG16 trained end to end (backbone and classifier) on 32 px images for 2 epochs of 3 steps.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bcnn.config import ModelConfig
from bcnn.distributed import per_rank_batch_size, setup
from bcnn.engine import train_one_epoch
from bcnn.errors import UserError
from bcnn.model import BilinearCNN, build_model
from helpers.runs import launch, small_run_args

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
KILL_HELPER = str(REPO / "tests" / "helpers" / "kill_after_save.py")
TOLERANCE = 1e-6  # float32 sums in another order (2 ranks' gradients averaged vs one batch)


def torchrun(*args, processes=2, env=None, restarts=0):
    return launch(TORCHRUN, "--standalone", f"--nproc_per_node={processes}", f"--max-restarts={restarts}",
                  *args, env=env)


def weights(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / name, map_location="cpu", weights_only=True)["model"]


def max_difference(a, b):
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_two_processes_reach_the_weights_of_one(cub_3x13, reference_run, tmp_path):
    run_dir = tmp_path / "two"
    result = torchrun("-m", "bcnn.train", *small_run_args(cub_3x13, run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "2 process(es) x 1 accumulation step(s) x 2" in log
    # Rank 0 alone writes: one event file, each epoch logged once.
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1 and log.count("epoch 2 done") == 1

    reference, ddp = weights(reference_run), weights(run_dir)
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in ddp)
    assert max_difference(reference, ddp) < TOLERANCE
    # ...and that closeness means something: training moved every tensor 1000x more than the runs differ.
    torch.manual_seed(0)  # what train.py does before it builds the model
    initial = build_model(ModelConfig(backbone_weights="none", freeze_backbone=False), num_classes=3).state_dict()
    for key in initial:
        moved = (reference[key] - initial[key]).abs().max().item()
        assert (reference[key] - ddp[key]).abs().max().item() < moved / 1000, key

    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (reference_run, run_dir)]
    for one, two in zip(*rows):
        assert one["train_images"] == two["train_images"] == 12 and one["val_count"] == two["val_count"] == 6
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-5)
        assert one["val_top1"] == two["val_top1"] and one["train_top1"] == two["train_top1"]


def test_two_process_eval_counts_each_test_image_once(cub_3x13, reference_run, tmp_path):
    checkpoint = str(reference_run / "best.pt")
    single, sharded = tmp_path / "one.json", tmp_path / "two.json"
    result = launch(sys.executable, "-m", "bcnn.eval", "--checkpoint", checkpoint, "--device=cpu",
                    "--batch-size=4", f"--output={single}")
    assert result.returncode == 0, result.stderr[-2000:]
    result = torchrun("-m", "bcnn.eval", "--checkpoint", checkpoint, "--device=cpu", "--batch-size=4",
                      f"--output={sharded}")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(sharded.read_text())
    split_lines = (cub_3x13 / "train_test_split.txt").read_text().splitlines()
    test_images = sum(line.split()[1] == "0" for line in split_lines)
    assert test_images % 2 == 1
    assert one["count"] == two["count"] == test_images
    for key in ("top1", "top5", "mean_class_acc"):
        assert one[key] == two[key], key
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)


def test_a_crashed_rank_is_restarted_by_torchrun_and_resumes(cub_3x13, reference_run, tmp_path):
    run_dir = tmp_path / "restarted"
    # Rank 0 SIGKILLs itself right after its 2nd last.pt (the end of epoch 1); torchrun restarts both ranks.
    result = torchrun(KILL_HELPER, *small_run_args(cub_3x13, run_dir), restarts=1,
                      env={"KILL_AFTER_SAVES": "2"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "epoch 2, step 0" in log
    assert max_difference(weights(reference_run), weights(run_dir)) < TOLERANCE
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_batch_that_does_not_split_over_the_processes_is_refused(cub_3x13, tmp_path):
    result = torchrun("-m", "bcnn.train", *small_run_args(cub_3x13, tmp_path / "run"), "--train.batch_size=5")
    assert result.returncode != 0
    assert "error: train.batch_size 5 must be divisible by the number of processes (2)" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and not (tmp_path / "run" / "last.pt").exists()


def test_one_process_without_torchrun_creates_no_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.device.type) == (0, 1, True, "cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("batch, processes, accum, expected",
                         [(64, 1, 1, 64), (64, 4, 1, 16), (64, 2, 4, 8), (6, 4, 1, None), (64, 3, 2, None)])
def test_per_rank_batch_size(batch, processes, accum, expected):
    if expected is None:
        with pytest.raises(UserError, match="must be divisible"):
            per_rank_batch_size(batch, processes, accum)
    else:
        assert per_rank_batch_size(batch, processes, accum) == expected


def small_model(seed):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU())
    return BilinearCNN(num_classes=4, backbone=backbone, feature_dim=8)


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulating_micro_batches_equals_one_big_batch(accum):
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(20, 3, 12, 12, generator=generator), torch.randint(0, 4, (20,), generator=generator)
    dataset = TensorDataset(images, targets)
    results = {}
    for name, batch, steps in (("big", 8, 1), ("accumulated", 8 // accum, accum)):
        model = small_model(seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        loader = DataLoader(dataset, batch_size=batch)  # 20 images: steps of 8, 8 and a partial 4
        stats = train_one_epoch(model, loader, optimizer, torch.device("cpu"), epoch=1, accum_steps=steps,
                                log_every=0)
        results[name] = (model.state_dict(), stats)
    (big, big_stats), (accumulated, accumulated_stats) = results["big"], results["accumulated"]
    assert max_difference(big, accumulated) < 1e-6
    assert max_difference(big, small_model(seed=0).state_dict()) > 1e-2, "the steps must have moved the weights"
    assert big_stats["images"] == accumulated_stats["images"] == 20
    assert big_stats["loss"] == pytest.approx(accumulated_stats["loss"], rel=1e-6)
