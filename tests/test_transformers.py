"""Transformer backbones (issue 19): every named family built for a crop that is not its native size, its map on the
right grid (a marked patch answers in its own cell), prefix tokens dropped, channels-last maps made channels-first,
an earlier block, weights from a file resampled to the crop, a frozen transformer unmoved by a step, sizes that
cannot work refused in one sentence, and tiny runs end to end (train, eval, predict, report) on a ViT and a Swin
with second-order heads. Random weights or a file in a temporary folder: nothing is downloaded."""

import math
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from bcnn import eval as eval_cli  # noqa: E402
from bcnn import predict as predict_cli  # noqa: E402
from bcnn import report as report_cli  # noqa: E402
from bcnn import train as train_cli  # noqa: E402
from bcnn.config import ModelConfig, load_config  # noqa: E402
from bcnn.errors import UserError  # noqa: E402
from bcnn.models import build_model  # noqa: E402
from bcnn.models.backbones import TIMM_FAMILIES, build_backbone, input_normalisation  # noqa: E402
from bcnn.models.pooling import MAX_POOLED_DIM  # noqa: E402
from bcnn.models.pooling import build_pooling  # noqa: E402
from helpers.runs import STAGE1, launch  # noqa: E402

# A size that is not the family's native one (224, 518 for DINOv2, 192 for Swin-V2): whole patches for a ViT (7 x 7
# of 16 px, 8 x 8 of 14 px), whole 32-px cells for a Swin (4 x 4, its window shrunk to 4 to tile them).
SMALL = {name: 128 if name.startswith("swin") else 112 for name in TIMM_FAMILIES}


@pytest.fixture(scope="module")
def family(request):
    """A named family (request.param) built with random weights for its SMALL size, in eval mode: shared by the
    tests below, which only read it."""
    name = request.param
    backbone = build_backbone(name, "none", "auto", SMALL[name])
    backbone.module.eval()
    return name, backbone


# The families the marked-patch test below builds at their SMALL size anyway (one ViT, DeiT, DINOv2 with registers, a
# Swin); every family is also built for 448 px, not its native size either, by the every-head test further down.
MARKED = ["vit_b16_in21k", "deit_b16_distilled", "dinov2_vitb14_reg", "swin_b_in22k"]


@pytest.mark.parametrize("family", MARKED, indirect=True)
def test_each_named_family_builds_for_a_crop_that_is_not_its_native_size(family):
    name, backbone = family
    size = SMALL[name]
    native = timm.models.get_pretrained_cfg(TIMM_FAMILIES[name]).input_size[-1]
    assert native != size
    with torch.no_grad():
        feature_map = backbone.module(torch.randn(2, 3, size, size))
    assert feature_map.shape == (2, backbone.channels, size // backbone.stride, size // backbone.stride)
    assert (backbone.mean, backbone.std) == input_normalisation(name)


def response_cells(module, size: int, stride: int, patches: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each input patch (row, column) painted over, the map cell whose features change most."""
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 0.1
    marked = images.repeat(len(patches), 1, 1, 1)  # one image per patch, marked in that patch alone
    for image, (row, column) in zip(marked, patches):
        image[:, row * stride:(row + 1) * stride, column * stride:(column + 1) * stride] = 3.0
    with torch.no_grad():
        change = (module(marked) - module(images)).norm(dim=1)  # (patches, H, W)
    return [divmod(int(cell.argmax()), change.shape[2]) for cell in change]


# A ViT (one class token), DeiT (class + distillation), DINOv2 with 4 registers, a Swin: a prefix token left in,
# or a grid laid out transposed or shifted, moves the response out of the marked cell.
@pytest.mark.parametrize("family", MARKED, indirect=True)
def test_a_marked_patch_answers_in_its_own_cell_of_the_map(family):
    name, backbone = family
    size = SMALL[name]  # 7 x 7 patches of 16 px, 8 x 8 of 14 px, 4 x 4 cells of 32 px
    cells = size // backbone.stride
    patches = [(0, 0), (cells - 1, 1), (2, cells - 1), (cells // 2, cells // 2)]
    assert response_cells(backbone.module, size, backbone.stride, patches) == patches


def test_an_earlier_block_is_that_block_s_tokens_on_their_grid_after_the_final_norm():
    backbone = build_backbone("timm:vit_tiny_patch16_224", "none", "block5", 64)
    network = backbone.module.network.model  # timm's ViT, cut after block 5 (the later blocks are pruned)
    assert len(network.blocks) == 6
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # By hand from the ViT's parts: patches, class token and position embedding, blocks 0-5, the final norm,
        # the class token dropped, the 16 patch tokens laid out row by row on the 4 x 4 grid.
        tokens = network.norm(network.blocks(network.norm_pre(network._pos_embed(network.patch_embed(images)))))
        expected = tokens[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        assert torch.allclose(backbone.module.eval()(images), expected, atol=1e-6)  # same ops, same order
    with pytest.raises(UserError, match=r"model.cut for timm:vit_tiny_patch16_224 must be auto or one of "
                                        r"block0...block11 \(timm's feature indices\), got 'block12'"):
        build_backbone("timm:vit_tiny_patch16_224", "none", "block12", 64)
    with pytest.raises(UserError, match="must be auto or one of block0...block11"):
        build_backbone("timm:vit_tiny_patch16_224", "none", "stage2", 64)
    with pytest.raises(UserError, match=r"model.cut for timm:resnet18 must be auto \(its last feature map\), "
                                        r"block<i>"):
        load_config(None, ["--model.backbone=timm:resnet18", "--model.cut=layer4"])


def test_a_channels_last_map_is_made_channels_first():
    # MambaOut's timm feature maps are (B, H, W, C); its forward_features, on the same random weights (the same
    # seed, the same initialisation order), is the same map: the reference.
    torch.manual_seed(0)
    backbone = build_backbone("timm:mambaout_femto", "none", "auto", 64)
    torch.manual_seed(0)
    network = timm.create_model("mambaout_femto")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, reference = backbone.module.eval()(images), network.eval().forward_features(images)
    assert reference.shape == (2, 2, 2, backbone.channels)  # channels last
    assert torch.equal(ours, reference.permute(0, 3, 1, 2))


def test_weights_from_a_file_are_resampled_to_the_crop(tmp_path):
    # A ViT's state dict at its native 224 px (a 14 x 14 position grid) and a Swin's with its 7 x 7 window, read
    # into networks built for 64 px (4 x 4) and 128 px (window 4): timm resamples what depends on the size.
    for name, arch, size in (("timm:vit_tiny_patch16_224", "vit_tiny_patch16_224", 64),
                             ("timm:swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", 128)):
        source = timm.create_model(arch)
        path = tmp_path / f"{arch}.pth"
        torch.save(source.state_dict(), path)
        loaded = build_backbone(name, str(path), "auto", size).module.network.model.state_dict()
        same_shape = [key for key, value in loaded.items() if key in source.state_dict()
                      and value.shape == source.state_dict()[key].shape]
        assert len(same_shape) > 0.9 * len(loaded)
        assert all(torch.equal(loaded[key], source.state_dict()[key]) for key in same_shape)
        if arch.startswith("vit"):
            assert loaded["pos_embed"].shape == (1, 1 + 16, 192)


def test_a_frozen_transformer_is_bit_identical_after_a_step_and_drops_no_path():
    cfg = ModelConfig(backbone="timm:vit_tiny_patch16_224", backbone_weights="none", pooling="matrix_sqrt",
                      drop_path_rate=0.5, freeze_backbone=True)
    model = build_model(cfg, 3, input_size=64).train()
    before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    images = torch.randn(4, 3, 64, 64)
    first = model.embed(images)
    assert torch.equal(first, model.embed(images))  # train mode, yet no stochastic depth: the same vector twice
    optimizer = torch.optim.SGD(model.param_groups(backbone_lr=0.1, classifier_lr=0.1), lr=0.1)
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert all(torch.equal(before[key], value) for key, value in model.backbone.state_dict().items())
    # Training, the same backbone drops paths: two passes differ.
    trained = build_model(ModelConfig(**{**vars(cfg), "freeze_backbone": False}), 3, input_size=64).train()
    assert not torch.equal(trained.embed(images), trained.embed(images))


def test_drop_path_on_a_torchvision_backbone_is_refused():
    with pytest.raises(UserError, match="model.drop_path_rate .stochastic depth. applies to timm backbones only"):
        load_config(None, ["--model.drop_path_rate=0.1"])


def test_a_bilinear_head_too_large_for_swin_l_names_the_ways_out():
    with pytest.raises(UserError, match=r"model.pooling=bilinear on model.backbone=swin_l_in22k \(1536 channels"):
        build_model(ModelConfig(backbone="swin_l_in22k", backbone_weights="none"), 200, input_size=128)


# The two kinds end to end with second-order heads, loader workers on: a ViT (16-px patches, 4 x 4 tokens at 64 px)
# with the matrix square root, a Swin (2 x 2 cells at 64 px, its window shrunk to 2) with the compact head.
@pytest.mark.parametrize("backbone, options", [
    ("timm:vit_tiny_patch16_224", ["--model.pooling=matrix_sqrt"]),
    ("timm:swin_tiny_patch4_window7_224", ["--model.pooling=compact", "--model.compact_dim=1024"]),
], ids=["vit", "swin"])
def test_tiny_transformer_run_end_to_end(backbone, options, cub_3x6, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train_cli.main(["--config", STAGE1, f"--data-root={cub_3x6}", f"--run-dir={run_dir}", "--device=cpu",
                    f"--model.backbone={backbone}", "--model.backbone_weights=none", "--data.resize=72",
                    "--data.crop=64", "--data.val_fraction=0.34", "--data.num_workers=2", "--train.batch_size=4",
                    "--train.epochs=1", "--train.log_every=0", "--train.precision=fp32",
                    "--model.freeze_backbone=false", "--model.drop_path_rate=0.1", "--optim.lr=0.01",
                    "--optim.backbone_lr=0.001", *options])
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert best["config"]["model"]["backbone"] == backbone
    evaluated = eval_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "test", "--device", "cpu",
                               "--no-figures"])
    assert evaluated["count"] == 9  # the test split
    images = sorted((cub_3x6 / "images").rglob("*.jpg"))[:2]
    predicted = predict_cli.main([*map(str, images), "--checkpoint", str(run_dir / "best.pt"), "--json",
                                  "--device", "cpu"])
    assert [len(result["predictions"]) for result in predicted] == [3, 3]
    capsys.readouterr()
    summary = report_cli.main([str(run_dir), "--json"])
    assert summary["summary"]["top1"]["mean"] == evaluated["top1"]


# The transformer recipes of experiments/ as `make stage1 stage2 RECIPE=...` runs them, shrunk: random weights, one
# epoch each, 2 x 2 tokens (of 14-, 16- and 32-px cells), loader workers on. Without the val heatmaps and the
# projector, a third of each run's time: the tiny ViT and Swin runs above draw both through the same code.
TRANSFORMER_RECIPES = {"cub_dinov2_vitb14_avg": 28, "cub_dinov2_vitb14_matrix_sqrt": 28, "cub_vit_b16_in21k": 32,
                       "cub_swin_b_in22k_compact": 64}


@pytest.mark.parametrize("recipe", TRANSFORMER_RECIPES)
def test_each_transformer_recipe_runs_both_stages(recipe, cub_3x6, tmp_path):
    crop, experiments = TRANSFORMER_RECIPES[recipe], Path(STAGE1).parent
    shrink = [f"--data-root={cub_3x6}", "--device=cpu", f"--data.resize={crop + 4}", f"--data.crop={crop}",
              "--data.val_fraction=0.34", "--data.num_workers=2", "--train.epochs=1", "--train.batch_size=4",
              "--train.log_every=0", "--train.precision=fp32", "--train.heatmap_images=0", "--train.projector=false"]
    train_cli.main(["--config", str(experiments / f"{recipe}_stage1.yaml"), f"--run-dir={tmp_path / 's1'}",
                    "--model.backbone_weights=none", *shrink])
    stage2 = train_cli.main(["--config", str(experiments / f"{recipe}_stage2.yaml"), f"--run-dir={tmp_path / 's2'}",
                             f"--train.init_from={tmp_path / 's1' / 'best.pt'}", *shrink])
    assert math.isfinite(stage2["train_loss"])
    config = torch.load(tmp_path / "s2" / "best.pt", map_location="cpu", weights_only=True)["config"]
    assert config["model"]["backbone"] == load_config(experiments / f"{recipe}_stage2.yaml").model.backbone


# Every head on every named family at the recipes' 448 px (DINOv2 and EVA-02: 32 x 32 tokens; ViTs: 28 x 28; Swins:
# 14 x 14), or refused where its vector would pass the size build_model allows (Swin-L's 1,536 channels). One network
# of each timm class runs for real here (a DINOv2 ViT with registers, DeiT with its distillation token, EVA-02, Swin-B);
# the others are built and run on the meta device (shapes, no numbers: a second instead of 3-17), and their class is
# checked to be the one that ran for real.
ON_META = {"vit_l16_in21k": "dinov2_vitb14_reg", "dinov2_vitl14": "dinov2_vitb14_reg", "swin_l_in22k": "swin_b_in22k",
           "vit_b16_in21k": "dinov2_vitb14_reg", "dinov2_vitb14": "dinov2_vitb14_reg",
           "clip_vitb16": "dinov2_vitb14_reg",
           # Swin-V2-B at 448 px takes 20 s here: on the meta device too (it runs for real at 128 px, above)
           "swinv2_b_in22k": "timm:swinv2_tiny_window8_256"}


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_every_head_on_every_named_family_at_the_recipe_s_448_px(name):
    assert timm.models.get_pretrained_cfg(TIMM_FAMILIES[name]).input_size[-1] != 448  # built for a size not its own
    with torch.device("meta" if name in ON_META else "cpu"):
        backbone = build_backbone(name, "none", "auto", 448)
        assert (backbone.mean, backbone.std) == input_normalisation(name)
        with torch.no_grad():
            feature_map = backbone.module.eval()(torch.randn(1, 3, 448, 448))
    if name in ON_META:  # random numbers of the map's shape for the heads; the class is its sibling's
        with torch.device("meta"):
            sibling = build_backbone(ON_META[name], "none", "auto", 448)
        assert type(backbone.module.network.model) is type(sibling.module.network.model)
        feature_map = torch.randn(feature_map.shape)
    grid = 448 // backbone.stride
    assert feature_map.shape == (1, backbone.channels, grid, grid) and grid in (14, 28, 32)
    for head in ("bilinear", "matrix_sqrt", "isqrt_cov", "compact", "avg"):
        pooling = build_pooling(ModelConfig(pooling=head), backbone.channels).eval()
        if pooling.output_dim > MAX_POOLED_DIM:
            assert backbone.channels > 1024 and head in ("bilinear", "matrix_sqrt")
            continue
        with torch.no_grad():
            vector = pooling(feature_map)
        assert vector.shape == (1, pooling.output_dim) and torch.isfinite(vector).all(), head


CACHED_WEIGHTS = """
import os, sys, torch
from pathlib import Path
from safetensors.torch import save_file
import timm
from bcnn.errors import UserError
from bcnn.models.backbones import build_backbone
cache = Path(os.environ["HF_HOME"]) / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
(cache / "refs").mkdir(parents=True)
(cache / "refs" / "main").write_text("0" * 40)  # the layout huggingface_hub's own download leaves
(cache / "snapshots" / ("0" * 40)).mkdir(parents=True)
source = timm.create_model("vit_tiny_patch16_224").state_dict()
save_file({key: value.contiguous() for key, value in source.items()}, cache / "snapshots" / ("0" * 40) / "model.safetensors")
loaded = build_backbone("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", "imagenet", "auto", 64).module.network.model
assert torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
assert loaded.state_dict()["pos_embed"].shape == (1, 17, 192)  # resampled to 4 x 4 patches as it loaded
try:
    build_backbone("dinov2_vitb14", "imagenet", "auto", 112)
except UserError as error:
    print(error)
"""


def test_pretrained_weights_come_from_the_hugging_face_cache_offline(tmp_path):
    # A fresh process: huggingface_hub reads HF_HOME as it is imported. Offline, a network whose weights are not
    # in the cache is one sentence saying how to put them there.
    result = launch(sys.executable, "-c", CACHED_WEIGHTS, env={"HF_HOME": str(tmp_path / "hf"),
                                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("could not load timm's pretrained weights of vit_base_patch14_dinov2.lvd142m" in result.stdout
            and "huggingface-cli download timm/vit_base_patch14_dinov2.lvd142m" in result.stdout
            and str(tmp_path / "hf" / "hub") in result.stdout), result.stdout
