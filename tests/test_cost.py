"""A model's cost (bcnn.models.cost): VGG16 + bilinear against a hand count, the bench's --cost table, train.log."""

import contextlib
import io
import json
import re

import pytest
import torch

from bcnn import train as train_cli
from bcnn.bench.__main__ import main as bench_main
from bcnn.config import ModelConfig
from bcnn.models import build_model
from bcnn.models.backbones import FAMILIES
from bcnn.models.cost import model_cost
from bcnn.models.pooling import HEADS, MAX_POOLED_DIM
from helpers.runs import run_in_process, small_run_args

# VGG16's 13 convolutions up to relu5_3, all 3x3 with padding 1: (input channels, output channels, max-pools before).
VGG16_CONVS = [(3, 64, 0), (64, 64, 0), (64, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 2), (256, 256, 2),
               (256, 512, 3), (512, 512, 3), (512, 512, 3), (512, 512, 4), (512, 512, 4), (512, 512, 4)]


def hand_count(crop: int, classes: int) -> dict:
    """Parameters and forward FLOPs of VGG16 + bilinear, counted from the architecture (2 FLOPs a multiply-add)."""
    conv_params = sum(3 * 3 * cin * cout + cout for cin, cout, _ in VGG16_CONVS)
    conv_flops = sum(2 * 3 * 3 * cin * cout * (crop // 2 ** pools) ** 2 for cin, cout, pools in VGG16_CONVS)
    positions = (crop // 16) ** 2  # relu5_3: four max-pools
    gram_flops = 2 * 512 * 512 * positions  # X Xᵀ over the positions
    classifier_flops = 2 * 512 * 512 * classes
    return {"backbone_params": conv_params, "head_params": 0, "classifier_params": 512 * 512 * classes + classes,
            "vector_size": 512 * 512, "flops": conv_flops + gram_flops + classifier_flops}


@pytest.mark.parametrize("crop", [32, 448])
def test_vgg16_bilinear_cost_equals_the_hand_count(crop):
    model = build_model(ModelConfig(backbone_weights="none"), num_classes=3, input_size=crop)
    cost, expected = model_cost(model, crop), hand_count(crop, classes=3)
    for key in ("backbone_params", "head_params", "classifier_params", "vector_size"):
        assert cost[key] == expected[key], key
    assert cost["total_params"] == expected["backbone_params"] + expected["classifier_params"]
    # FlopCounterMode counts the convolutions, the Gram bmm and the classifier's matmul, nothing else (no biases,
    # ReLUs, pools, square roots): the hand count exactly, up to the division by 1e9.
    assert cost["gflops"] * 1e9 == pytest.approx(expected["flops"], rel=1e-12)
    print(f"vgg16 + bilinear at {crop} px: {cost['total_params']:,} parameters, {cost['gflops']:.3f} GFLOPs")


def test_model_cost_leaves_the_model_in_its_mode():
    model = build_model(ModelConfig(backbone_weights="none", pooling="isqrt_cov", freeze_backbone=False),
                        num_classes=3, input_size=32)
    running_mean = model.pooling.reduce[1].running_mean.clone()
    model_cost(model, 32)
    assert model.training and model.pooling.reduce[1].running_mean.equal(running_mean)


def test_the_cost_bench_lists_every_head_on_every_family(monkeypatch):
    # Two families stand for the nine (each takes about a second a head to count): VGG16, whose heads all fit, and
    # ResNet-50, whose 2,048 channels make the full bilinear vector too large.
    from bcnn.bench import cost as cost_bench
    monkeypatch.setattr(cost_bench, "FAMILIES", {name: FAMILIES[name] for name in ("vgg16", "resnet50")})
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench_main(["--cost", "--json", "--image-size", "32", "--classes", "3"])
    result = json.loads(stdout.getvalue())
    assert list(result["families"]) == ["vgg16", "resnet50"]
    for family, heads in result["families"].items():
        assert list(heads) == list(HEADS)
        for head, cost in heads.items():
            if "refused" in cost:
                assert cost["vector_size"] > MAX_POOLED_DIM, (family, head)
                continue
            assert all(cost[key] > 0 for key in ("backbone_params", "classifier_params", "total_params",
                                                 "vector_size", "gflops")), (family, head, cost)
    assert "refused" in result["families"]["resnet50"]["bilinear"]


def test_the_cost_bench_refuses_timing_options():
    from bcnn.errors import UserError

    with pytest.raises(UserError, match="--steps does not apply with --cost"):
        bench_main(["--cost", "--steps", "3"])


def test_train_log_states_the_models_cost(cub_3x13, tmp_path):
    result = run_in_process(train_cli.main, *small_run_args(cub_3x13, tmp_path / "run", "--train.epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "cost:" in line)
    total = sum(hand_count(32, classes=3)[key] for key in ("backbone_params", "classifier_params"))
    assert f"cost: {total:,} parameters" in line
    assert float(re.search(r"([\d.]+) GFLOPs per 32-px image", line).group(1)) == pytest.approx(
        hand_count(32, classes=3)["flops"] / 1e9, abs=0.005)


# The README's CUB table: each of our rows' vector size and parameters, against the model its recipe builds (on the
# meta device: counts, no memory). Row -> (recipe file, overrides).
README_ROWS = {
    "**bcnn stage 1**": ("cub_vgg16_stage1.yaml", []),
    "**bcnn stage 2**": ("cub_vgg16_stage2.yaml", []),
    "**bcnn improved B-CNN**": ("cub_vgg16_matrix_sqrt_stage2.yaml", []),
    "**bcnn compact** (": ("cub_vgg16_compact_stage2.yaml", []),
    "**bcnn iSQRT-COV** (`cub_vgg16": ("cub_vgg16_isqrt_cov.yaml", []),
    "**bcnn iSQRT-COV** (`cub_resnet50": ("cub_resnet50_isqrt_cov.yaml", []),
    "**bcnn average pooling baseline**": ("cub_vgg16_stage2.yaml", ["--model.pooling=avg"]),
    "**bcnn average of tokens, stage 2** (`RECIPE=cub_vit": ("cub_vit_b16_in21k_stage2.yaml", []),
    "**bcnn average of tokens, stage 1 / stage 2** (`RECIPE=cub_dinov2": ("cub_dinov2_vitb14_avg_stage2.yaml", []),
    "**bcnn matrix square root, stage 1 / stage 2**": ("cub_dinov2_vitb14_matrix_sqrt_stage2.yaml", []),
    "**bcnn compact, stage 2** (`RECIPE=cub_swin": ("cub_swin_b_in22k_compact_stage2.yaml", []),
    "**bcnn BitFit, 224 px": ("cub_vit_b16_in21k_bitfit.yaml", []),
    "**bcnn LoRA, 224 px": ("cub_vit_b16_in21k_lora.yaml", []),
    "**bcnn VPT-deep, 224 px": ("cub_vit_b16_in21k_vpt_deep.yaml", []),
    "**bcnn LoRA + matrix square root, 448 px": ("cub_vit_b16_in21k_lora_matrix_sqrt_448.yaml", []),
}


def test_the_readme_gives_each_recipe_s_vector_size_and_parameters():
    from bcnn.config import load_config
    from helpers.runs import REPO

    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| **bcnn")]
    cub_rows = [row for row in rows if row.count(" | ") == 7]  # the CUB table's eight columns
    assert len(cub_rows) == len(README_ROWS)
    for start, (recipe, overrides) in README_ROWS.items():
        (row,) = [row for row in cub_rows if row[2:].startswith(start)]
        cfg = load_config(REPO / "experiments" / recipe, ["--model.backbone_weights=none", *overrides])
        with torch.device("meta"):
            model = build_model(cfg.model, 200, input_size=cfg.data.crop)
        vector, parameters = row.split(" | ")[2:4]
        assert vector == f"{model.pooling.output_dim:,}", row
        assert parameters == f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M", row


def test_the_readme_says_how_many_weights_each_model_adapt_recipe_trains():
    # The parameters column counts every weight; a model.adapt row's method says how many train: the adapted tensors,
    # the head and the classifier, as train.log counts them (requires_grad), on the meta device.
    from bcnn.config import load_config
    from helpers.runs import REPO

    rows = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| **bcnn")]
    adapted = 0
    for start, (recipe, overrides) in README_ROWS.items():
        cfg = load_config(REPO / "experiments" / recipe, ["--model.backbone_weights=none", *overrides])
        if cfg.model.adapt == "none":
            continue
        (row,) = [row for row in rows if row[2:].startswith(start)]
        with torch.device("meta"):
            model = build_model(cfg.model, 200, input_size=cfg.data.crop)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert f", {trained / 1e6:.2f}M trained**" in row.split(" | ")[0], row
        adapted += 1
    assert adapted == 4  # BitFit, LoRA, VPT-deep at 224 px; LoRA with the matrix square root at 448
