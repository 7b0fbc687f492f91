"""The recipes in experiments/, and every pooling head through the same commands.

Each stage 2 continues its own stage 1: same data, same head, init_from its best.pt (that every YAML loads and
validates: tests/test_config.py). Then each head's recipe runs end to end at a tiny size (32 px, a random
VGG16): stage 1 from cached features where the head allows it, the final stage interrupted by Ctrl-C after its
first epoch and re-run, which must reach the weights of an uninterrupted run bit for bit; bcnn.eval of the result
scores what training measured on the same split; bcnn.predict classifies an image with it.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bcnn import eval as eval_cli
from bcnn import predict as predict_cli
from bcnn import train as train_cli
from bcnn.config import load_config
from bcnn.errors import Interrupted, UserError
from helpers.runs import interrupt_after_first_last_pt

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize("stage2", sorted(EXPERIMENTS.glob("*_stage2.yaml")), ids=lambda path: path.stem)
def test_each_stage_2_continues_its_own_stage_1(stage2):
    stage1_path = stage2.with_name(stage2.name.replace("_stage2", "_stage1"))
    assert stage1_path.exists(), f"{stage2.name} has no stage 1 beside it"
    first, second = load_config(stage1_path), load_config(stage2)
    # The split and what val and test images look like must be stage 1's; stage 2 may augment its training images
    # more (the transformers' MAE fine-tuning augmentation).
    same_view = ("format", "root", "val_fraction", "split_seed", "crop_to_bbox", "annotation_level", "resize", "crop")
    assert [getattr(second.data, key) for key in same_view] == [getattr(first.data, key) for key in same_view], \
        "another data section would select on another val split, or evaluate other views"
    assert second.train.init_from == str(Path(first.train.run_dir) / "best.pt")
    assert first.model.freeze_backbone and not second.model.freeze_backbone
    head = ("pooling", "cut", "sqrt_eps", "matrix_sqrt_iterations", "isqrt_iterations", "isqrt_reduce_dim",
            "compact_dim", "backbone_b")
    assert [getattr(first.model, key) for key in head] == [getattr(second.model, key) for key in head]


# Each head's recipes: (stage 1 or None, the final stage, extra options). avg has no published CUB recipe of its
# own; the demo's two stages with its head are the baseline run.
HEADS = {
    # 3 Newton-Schulz steps, not 10, at this size (the root itself: tests/test_pooling.py): 512 x 512 products
    # are most of this test's time on a CPU.
    "matrix_sqrt": ("cub_vgg16_matrix_sqrt_stage1.yaml", "cub_vgg16_matrix_sqrt_stage2.yaml",
                    ["--model.matrix_sqrt_iterations=3"]),
    "compact": ("cub_vgg16_compact_stage1.yaml", "cub_vgg16_compact_stage2.yaml", []),
    "isqrt_cov": (None, "cub_vgg16_isqrt_cov.yaml", ["--model.isqrt_reduce_dim=32"]),
    "avg": ("demo_stage1.yaml", "demo_stage2.yaml", ["--model.pooling=avg"]),
}

TINY = ["--device=cpu", "--data.resize=40", "--data.crop=32", "--data.val_fraction=0.34", "--data.num_workers=0",
        "--model.backbone_weights=none", "--train.batch_size=4", "--train.eval_batch_size=8", "--train.log_every=0",
        "--train.precision=fp32", "--optim.backbone_lr=0.001"]


def run(recipe, data, run_path, *extra):
    return train_cli.main(["--config", str(EXPERIMENTS / recipe), f"--data-root={data}", f"--run-dir={run_path}",
                           *TINY, *extra])


@pytest.mark.parametrize("head", HEADS)
def test_each_head_trains_caches_resumes_evaluates_and_predicts(head, cub_3x6, tmp_path, monkeypatch):
    stage1, final, options = HEADS[head]
    init = []
    if stage1:
        cache_dir = tmp_path / "cache"
        run(stage1, cub_3x6, tmp_path / "stage1", *options, "--train.epochs=1", "--train.cache_features=true",
            f"--train.cache_dir={cache_dir}")
        assert "feature cache: computing" in (tmp_path / "stage1" / "train.log").read_text()
        # Each image's cached row is the head's vector (8,192 values for compact), never a C x C matrix.
        expected = {"matrix_sqrt": 512 * 512, "compact": 8192, "avg": 512}[head]
        for meta in cache_dir.rglob("meta.json"):
            rows, row_size = json.loads(meta.read_text())["shape"]
            assert row_size == expected
            assert (meta.parent / "features.f16").stat().st_size == rows * expected * 2  # float16
        init = [f"--train.init_from={tmp_path / 'stage1' / 'best.pt'}"]
    else:
        with pytest.raises(UserError, match="cache_features needs a pooling head without trainable layers"):
            run(final, cub_3x6, tmp_path / "cached", *options, "--model.freeze_backbone=true",
                "--train.cache_features=true")

    final_args = [*options, *init, "--train.epochs=2"]
    uninterrupted = run(final, cub_3x6, tmp_path / "whole", *final_args)
    interrupt_after_first_last_pt(monkeypatch)
    with pytest.raises(Interrupted, match="stopped training"):
        run(final, cub_3x6, tmp_path / "resumed", *final_args)
    resumed = run(final, cub_3x6, tmp_path / "resumed", *final_args)
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()
    assert (resumed["train_loss"], resumed["val_top1"]) == (uninterrupted["train_loss"], uninterrupted["val_top1"])
    whole, again = (torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)["model"]
                    for name in ("whole", "resumed"))
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[key], again[key]) for key in whole), "resumed != uninterrupted"
    assert any(key.startswith("pooling.") for key in whole) == (head in ("compact", "isqrt_cov"))

    best = tmp_path / "whole" / "best.pt"
    measured = torch.load(best, map_location="cpu", weights_only=True)["metrics"]
    evaluated = eval_cli.main(["--checkpoint", str(best), "--split", "val", "--device", "cpu", "--no-figures"])
    assert (evaluated["count"], evaluated["top1"]) == (measured["val_count"], measured["val_top1"])
    assert evaluated["loss"] == pytest.approx(measured["val_loss"], rel=1e-5)  # another batch size: summation order

    image = next((cub_3x6 / "images").rglob("*.jpg"))
    [prediction] = predict_cli.main([str(image), "--checkpoint", str(best), "--device", "cpu", "--topk", "3"])
    assert len(prediction["predictions"]) == 3
    assert sum(p["probability"] for p in prediction["predictions"]) == pytest.approx(1.0, abs=1e-5)


# The model.adapt recipes (docs/peft.md), each through the command at a tiny size: timm's ViT-Ti in place of
# ViT-B/16, random weights, 32 px, one epoch, the recipe's learning rates. That only the adapted tensors move:
# tests/test_adapt.py and tests/test_prompts.py.
ADAPT_RECIPES = ["cub_vit_b16_in21k_bitfit.yaml", "cub_vit_b16_in21k_lora.yaml", "cub_vit_b16_in21k_vpt_deep.yaml",
                 "cub_vit_b16_in21k_lora_matrix_sqrt_448.yaml"]


@pytest.mark.parametrize("recipe", ADAPT_RECIPES)
def test_each_model_adapt_recipe_trains_through_the_command(recipe, cub_3x6, tmp_path):
    cfg = load_config(EXPERIMENTS / recipe)
    assert cfg.model.adapt != "none" and cfg.model.freeze_backbone and cfg.optim.lr == cfg.optim.backbone_lr
    run_dir = tmp_path / "run"
    result = run(recipe, cub_3x6, run_dir, "--model.backbone=timm:vit_tiny_patch16_224", "--train.epochs=1",
                 "--train.accum_steps=1", "--train.heatmap_images=0", "--train.projector=false",
                 f"--optim.lr={cfg.optim.lr}", f"--optim.backbone_lr={cfg.optim.backbone_lr}")
    assert math.isfinite(result["train_loss"])
    assert f"backbone frozen but for model.adapt={cfg.model.adapt}" in (run_dir / "train.log").read_text()
    stored = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert stored["config"]["model"]["pooling"] == cfg.model.pooling
    assert {group["name"] for group in stored["optimizer"]["param_groups"]} == {"backbone", "classifier"}


def test_make_sweep_trains_and_evaluates_on_val_one_run_per_learning_rate():
    # PY=echo: make prints the commands it would run, each as the shell expanded it.
    result = subprocess.run(["make", "-s", "sweep", "CONFIG=experiments/cub_vit_b16_in21k_lora.yaml",
                             "LRS=1.5e-4 7.5e-3", "PY=echo"], cwd=EXPERIMENTS.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    runs = ["runs/cub_vit_b16_in21k_lora_lr1.5e-4", "runs/cub_vit_b16_in21k_lora_lr7.5e-3"]
    common = "--data-root data/CUB_200_2011 --device auto"
    assert result.stdout.splitlines() == [
        line for lr, run_dir in zip(("1.5e-4", "7.5e-3"), runs) for line in (
            f"-m bcnn.train --config experiments/cub_vit_b16_in21k_lora.yaml {common} --optim.lr={lr} "
            f"--optim.backbone_lr={lr} --run-dir={run_dir}",
            f"-m bcnn.eval --checkpoint {run_dir}/best.pt --split val {common}")
    ] + ["-m bcnn.report --split val " + " ".join(runs)]  # the test split is never read
    refused = subprocess.run(["make", "-s", "sweep", "CONFIG=experiments/cub_vit_b16_in21k_lora.yaml", "PY=echo"],
                             cwd=EXPERIMENTS.parent, capture_output=True, text=True)
    assert refused.returncode != 0 and "make sweep needs LRS=" in refused.stdout
