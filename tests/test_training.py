"""The training loop and evaluation: metrics against a NumPy reference, seeding, schedules, selection without val."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bcnn import train as train_cli
from bcnn.data import write_synthetic_cub
from bcnn.engine import evaluate
from bcnn.errors import UserError

STAGE1 = str(Path(__file__).resolve().parent.parent / "experiments" / "demo_stage1.yaml")
TINY = ["--device=cpu", "--data.crop=32", "--data.resize=40"]


class PixelLinear(nn.Module):
    """A stand-in model whose logits NumPy can recompute: a linear map of the flattened image."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


def numpy_metrics(logits, targets, num_classes):
    top1 = logits.argmax(1) == targets
    order = np.argsort(-logits, axis=1)[:, :5]
    top5 = (order == targets[:, None]).any(1)
    per_class = [top1[targets == c].mean() for c in range(num_classes) if (targets == c).any()]
    return 100 * top1.mean(), 100 * top5.mean(), 100 * np.mean(per_class)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_evaluate_matches_numpy(tta):
    rng = np.random.default_rng(0)
    num_classes, n = 8, 37  # 37: the last batch is partial
    images = rng.normal(size=(n, 3, 4, 6)).astype(np.float32)
    targets = rng.integers(0, num_classes - 1, size=n)  # the last class never occurs: it must not count
    weight = rng.normal(size=(num_classes, 3 * 4 * 6))
    logits = images.reshape(n, -1) @ weight.T
    if tta == "flip":
        logits = (logits + images[..., ::-1].reshape(n, -1) @ weight.T) / 2
    loader = DataLoader(TensorDataset(torch.from_numpy(images), torch.from_numpy(targets)), batch_size=10)

    result = evaluate(PixelLinear(weight), loader, torch.device("cpu"), num_classes, tta=tta)

    top1, top5, mean_class = numpy_metrics(logits, targets, num_classes)
    assert result["count"] == n
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)
    assert result["mean_class_acc"] == pytest.approx(mean_class)
    assert 0 < top1 < 100 and top1 != mean_class, "the reference case should tell the metrics apart"


@pytest.fixture(scope="module")
def tiny_cub(tmp_path_factory):
    return write_synthetic_cub(tmp_path_factory.mktemp("tiny") / "cub", classes=3, per_class=6, seed=3)


def train(tiny_cub, run_dir, *overrides):
    return train_cli.main(["--config", STAGE1, f"--data-root={tiny_cub}", f"--run-dir={run_dir}", *TINY, *overrides])


def model_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_same_seed_same_weights_other_seed_other_weights(tiny_cub, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(tiny_cub, tmp_path / name, "--train.epochs=2", f"--train.seed={seed}")
    a, b, c = (model_weights(tmp_path / name / "last.pt") for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_without_val_a_fixed_schedule_keeps_the_last_epoch(tiny_cub, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cub, run_dir, "--data.val_fraction=0", "--schedule.name=step", "--schedule.step_size=1",
          "--schedule.factor=0.1", "--train.epochs=3")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr_classifier"] for row in rows] == pytest.approx([1.0, 0.1, 0.01])
    assert not any(key.startswith("val_") for key in rows[0])
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 3
    assert all(torch.equal(best["model"][key], value) for key, value in model_weights(run_dir / "last.pt").items())


def test_cosine_schedule_and_a_trainable_backbone_group(tiny_cub, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cub, run_dir, "--schedule.name=cosine", "--train.epochs=2", "--model.freeze_backbone=false",
          "--optim.lr=0.1", "--optim.backbone_lr=0.001", "--optim.name=adamw")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr_classifier"] == pytest.approx(0.1) and rows[0]["lr_backbone"] == pytest.approx(0.001)
    assert rows[1]["lr_classifier"] == pytest.approx(0.05)  # half way down a 2-epoch cosine to 0


def test_init_from_a_checkpoint_of_other_classes_is_refused(tiny_cub, tmp_path):
    train(tiny_cub, tmp_path / "a", "--train.epochs=1")
    other = write_synthetic_cub(tmp_path / "other", classes=4, per_class=6, seed=3)
    with pytest.raises(UserError, match="other classes"):
        train_cli.main(["--config", STAGE1, f"--data-root={other}", f"--run-dir={tmp_path / 'b'}", *TINY,
                        f"--train.init_from={tmp_path / 'a' / 'best.pt'}"])
