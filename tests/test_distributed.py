"""DDP on the CPU (gloo), against one process: the same training to rounding, the same evaluation, and a crashed
rank that torchrun restarts and that resumes to the very weights of an uninterrupted run; gradient accumulation
against one big batch.

The reference is always a plain one-process run (`python -m bcnn.train`, no process group). Runs are tiny:
a random VGG16 trained end to end (backbone and classifier) on 32 px images for 2 epochs of 3 steps.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bcnn import eval as eval_cli
from bcnn.config import ModelConfig
from bcnn.distributed import per_rank_batch_size, setup
from bcnn.engine import train_one_epoch
from bcnn.errors import UserError
from bcnn.models import BilinearCNN, build_model
from bcnn.models.pooling import BilinearPooling
from helpers.numerics import FORWARD_RTOL, assert_same_training, training_difference
from helpers.runs import WITH_DRAWINGS, launch, small_run_args, suite_threads

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")  # torchrun, from whichever Python runs the suite
KILL_HELPER = str(REPO / "tests" / "helpers" / "kill_after_save.py")


def torchrun(*args, processes=2, env=None, restarts=0):
    return launch(*TORCHRUN, "--standalone", f"--nproc_per_node={processes}", f"--max-restarts={restarts}",
                  *args, env=env, processes=processes)


def weights(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / name, map_location="cpu", weights_only=True)["model"]


def initial_weights():
    """What bcnn.train starts small_run_args from: it seeds torch with train.seed (0) and builds the model."""
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone_weights="none", freeze_backbone=False), num_classes=3,
                       input_size=32).state_dict()


def metric_rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(cub_3x13, tmp_path_factory):
    """small_run_args on two ranks, uninterrupted, with the val heatmaps and the projector, which rank 0 draws alone
    while the other waits (the reference and the restarted run draw neither: drawing changes no weight). Read it,
    never change it."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun("-m", "bcnn.train", *small_run_args(cub_3x13, run_dir, *WITH_DRAWINGS))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def test_two_processes_train_the_model_of_one(reference_run, ddp_run):
    log = (ddp_run / "train.log").read_text()
    assert "2 process(es) x 1 accumulation step(s) x 2" in log
    # each rank takes half the suite's threads, not one per core
    assert f"2 process(es) (process group: gloo), device cpu (GPU none); {max(1, suite_threads() // 2)} CPU threads" \
        in log
    # Rank 0 alone writes: one event file, each epoch logged once.
    assert len(list(ddp_run.glob("events.out.tfevents.*"))) == 1 and log.count("epoch 2 done") == 1
    events = EventAccumulator(str(ddp_run), size_guidance={"images": 0})
    events.Reload()
    assert events.Images("val/heatmaps"), "rank 0 drew the val heatmaps at best.pt"
    assert (ddp_run / "projector" / "projector_config.pbtxt").is_file()

    reference, ddp, initial = weights(reference_run), weights(ddp_run), initial_weights()
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in ddp)
    # Two ranks on batches of 2 round differently from one process on batches of 4 (another oneDNN algorithm,
    # another summation order), so the runs agree to rounding: within 1% of how far training moved each tensor.
    assert_same_training(reference, ddp, initial)
    assert max(training_difference(reference, ddp, initial).values()) > 0, "two ranks really ran apart from one"

    for one, two in zip(metric_rows(reference_run), metric_rows(ddp_run)):
        assert one["train_images"] == two["train_images"] == 12 and one["val_count"] == two["val_count"] == 6
        # Forward passes of weights equal to rounding, on batches of 4 vs 2 (measured apart by 1.4e-7 at most).
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=FORWARD_RTOL)
        assert one["val_top1"] == two["val_top1"] and one["train_top1"] == two["train_top1"]


def test_torchrun_with_one_process_takes_the_distributed_path_and_computes_what_one_process_does(
        cub_3x13, reference_run, tmp_path):
    run_dir = tmp_path / "one_rank"
    result = torchrun("-m", "bcnn.train", *small_run_args(cub_3x13, run_dir), processes=1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "1 process(es) (process group: gloo)" in (run_dir / "train.log").read_text()
    # DDP over one rank averages each gradient with nothing: the same arithmetic as the plain process, bit for bit.
    expected, one_rank = weights(reference_run), weights(run_dir)
    assert all(torch.equal(expected[key], one_rank[key]) for key in expected)


def test_two_process_eval_counts_each_test_image_once(cub_3x13, reference_run, tmp_path):
    checkpoint = str(reference_run / "best.pt")
    single, sharded = tmp_path / "one.json", tmp_path / "two.json"
    eval_cli.main(["--checkpoint", checkpoint, "--device=cpu", "--batch-size=4", f"--output={single}"])
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
    assert one["loss"] == pytest.approx(two["loss"], rel=FORWARD_RTOL)  # the same weights on other batches


def test_a_crashed_rank_is_restarted_by_torchrun_and_resumes(cub_3x13, ddp_run, tmp_path):
    run_dir = tmp_path / "restarted"
    # Rank 0 SIGKILLs itself right after its 2nd last.pt (the end of epoch 1); torchrun restarts both ranks.
    result = torchrun(KILL_HELPER, *small_run_args(cub_3x13, run_dir), restarts=1,
                      env={"KILL_AFTER_SAVES": "2"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "epoch 2, step 0" in log
    # The same two ranks, the same arithmetic: bit for bit the weights of the run that never stopped.
    expected, resumed = weights(ddp_run), weights(run_dir)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert [row["epoch"] for row in metric_rows(run_dir)] == [1, 2]


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
    return BilinearCNN(backbone, BilinearPooling(8), num_classes=4)


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
    # The same gradient summed in another order, so equal to rounding (helpers.numerics.TRAINING_RTOL).
    assert_same_training(big, accumulated, small_model(seed=0).state_dict())
    assert big_stats["images"] == accumulated_stats["images"] == 20
    # The epoch loss: 20 per-image float32 losses averaged per micro-batch and re-weighted, from weights equal
    # to rounding: forward passes of the same maths on other batch splits.
    assert big_stats["loss"] == pytest.approx(accumulated_stats["loss"], rel=FORWARD_RTOL)
