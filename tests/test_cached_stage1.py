"""Stage 1 from cached features, end to end: computed once, reused by the next run, and the classifier it
trains gives the live model's accuracy on val."""

from pathlib import Path

import pytest
import torch

from bcnn import eval as eval_cli
from bcnn import train as train_cli
from bcnn.data import write_synthetic_cub
from bcnn.errors import UserError

STAGE1 = str(Path(__file__).resolve().parent.parent / "experiments" / "demo_stage1.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_cub(tmp_path_factory.mktemp("cached") / "cub", classes=3, per_class=13, seed=0)


def args_for(data, run_dir, cache_dir, *extra):
    return ["--config", STAGE1, f"--data-root={data}", "--device=cpu", f"--run-dir={run_dir}", "--data.crop=32",
            "--data.resize=40", "--data.val_fraction=0.34", "--train.epochs=4", "--train.batch_size=4",
            "--train.cache_features=true", f"--train.cache_dir={cache_dir}", "--train.precision=fp32", *extra]


def test_cached_stage1_is_computed_once_and_matches_the_live_model(data, tmp_path):
    cache_dir = tmp_path / "cache"
    first = train_cli.main(args_for(data, tmp_path / "a", cache_dir))
    assert "feature cache: computing" in (tmp_path / "a" / "train.log").read_text()
    # 12 train images x (image, mirror) per epoch
    assert first["train_images"] == 24
    train_cli.main(args_for(data, tmp_path / "b", cache_dir))
    log = (tmp_path / "b" / "train.log").read_text()
    assert "feature cache: reusing" in log and "feature cache: computing" not in log
    a = torch.load(tmp_path / "a" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a), "the same cache and seed: the same classifier"

    # best.pt is a whole model: evaluated live (images through the backbone) it scores what training
    # measured on the cached val features of the same epoch.
    best = torch.load(tmp_path / "a" / "best.pt", map_location="cpu", weights_only=True)["metrics"]
    live = eval_cli.main(["--checkpoint", str(tmp_path / "a" / "best.pt"), "--split", "val", "--device", "cpu",
                          "--no-figures"])
    assert live["count"] == best["val_count"] == 6
    assert live["top1"] == best["val_top1"]
    assert live["loss"] == pytest.approx(best["val_loss"], rel=1e-3)  # float16 storage of the features


def test_the_cache_needs_a_frozen_backbone(data, tmp_path):
    with pytest.raises(UserError, match="cache_features needs model.freeze_backbone=true"):
        train_cli.main(args_for(data, tmp_path / "run", tmp_path / "cache", "--model.freeze_backbone=false",
                                "--optim.backbone_lr=0.01"))
