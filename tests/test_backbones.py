"""Every registered backbone: its feature map's shape and channels, its weights from a file and from torch's hub
cache, frozen means frozen for the batch-norm families; a full bilinear head on 2,048 channels refused; tiny runs
end to end on one network of each family, on a timm network and of the ResNet-50 recipe (random weights: nothing
is downloaded)."""

import dataclasses
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet50_Weights

from bcnn import eval as eval_cli
from bcnn import train as train_cli
from bcnn.config import ModelConfig, load_config
from bcnn.errors import UserError, exit_on_user_error
from bcnn.models import build_model
from bcnn.models.backbones import FAMILIES, build_backbone, input_normalisation, resolve_cut
from helpers.runs import STAGE1

@pytest.mark.parametrize("name", FAMILIES)
def test_each_cut_gives_the_channels_and_stride_it_reports(name):
    model = FAMILIES[name].build().eval()  # one random model; each cut takes its part of it
    for cut, part in FAMILIES[name].cuts.items():
        stride = resolve_cut(name, cut)[1]
        module = part.take(model)
        with torch.no_grad():
            assert module(torch.zeros(1, 3, 2 * stride, 3 * stride)).shape == (1, part.channels, 2, 3), cut
            # the config's smallest crop is the stride: a 1 x 1 map
            assert module(torch.zeros(1, 3, stride, stride)).shape == (1, part.channels, 1, 1), cut
        assert load_config(None, [f"--model.backbone={name}", f"--model.cut={cut}", f"--data.crop={stride}"])
        with pytest.raises(UserError, match=f"data.crop must be at least {stride} for {name} cut at {cut}"):
            load_config(None, [f"--model.backbone={name}", f"--model.cut={cut}", f"--data.crop={stride - 1}"])
    assert resolve_cut(name, "auto")[0] == next(iter(FAMILIES[name].cuts))


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_a_random_vgg_part_is_initialised_as_torchvision_initialises_vgg(name):
    """VGG is built on the meta device and only its cut part initialised (backbones._vgg_init): its keys and shapes
    are torchvision's, and every convolution is He-normal over its fan-out with zero biases, as VGG.__init__ does."""
    part = build_backbone(name, "none").module
    reference = FAMILIES[name].build(init_weights=False).features[: len(part)]
    assert {key: value.shape for key, value in part.state_dict().items()} == \
        {key: value.shape for key, value in reference.state_dict().items()}
    convolutions = [module for module in part.modules() if isinstance(module, torch.nn.Conv2d)]
    assert len(convolutions) == (13 if name == "vgg16" else 16)
    for conv in convolutions:
        weight = conv.weight.detach().double()
        n = weight.numel()
        expected_std = math.sqrt(2 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))
        # The sample standard deviation of n normal values has a relative standard error of 1 / sqrt(2n): allow
        # five of them (n >= 1,728, so at most 8.5%); a uniform init or a fan-in one misses by far more.
        assert abs(weight.std().item() / expected_std - 1) < 5 / math.sqrt(2 * n), conv
        assert abs(weight.mean().item()) < 5 * expected_std / math.sqrt(n), conv
        assert torch.count_nonzero(conv.bias) == 0
        assert conv.weight.device.type == "cpu" and torch.isfinite(weight).all()


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "convnext_tiny"])  # vgg16: tests/test_models.py
def test_weights_from_a_file_of_the_whole_torchvision_model(name, tmp_path):
    source = FAMILIES[name].build()  # random weights, and batch-norm statistics unlike the defaults
    with torch.no_grad():
        for buffer in source.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone(name, str(path)).module.state_dict()
    expected = FAMILIES[name].cuts[next(iter(FAMILIES[name].cuts))].take(source).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def vgg16_file(folder: Path) -> Path:
    """A state dict with torchvision VGG16's keys and shapes (its convolutions; the classifier left out for size)."""
    features = FAMILIES["vgg16"].build(init_weights=False).features.state_dict()
    path = folder / "vgg16.pth"
    torch.save({f"features.{key}": value for key, value in features.items()}, path)
    return path


def test_a_file_of_another_network_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError) as error:
        build_backbone("resnet50", str(vgg16_file(tmp_path)))
    assert str(error.value) == (
        f"{tmp_path / 'vgg16.pth'} does not fit resnet50's features (318 missing: conv1.weight, bn1.weight, bn1.bias, "
        "...); its keys look like torchvision's vgg16 (features.N.weight); give a state dict of torchvision's "
        "resnet50 (its state_dict() keys), or use imagenet or none.")
    # A deeper network of the same family: every key of resnet50 is in it, with its shape, and more.
    path = tmp_path / "resnet101.pth"
    torch.save(FAMILIES["resnet101"].build().state_dict(), path)
    with pytest.raises(UserError, match=r"resnet101.pth does not fit resnet50's features \(306 unexpected: "
                                        r"layer3.6.conv1.weight, .*its keys look like a resnet101 "):
        build_backbone("resnet50", str(path), "layer3")


def timm_source(arch: str, folder: Path, **options) -> tuple[dict, Path]:
    """A random timm network's state dict and a file holding it, in a checkpoint's "model" entry as timm's and
    DeiT's training scripts save it."""
    timm = pytest.importorskip("timm")
    state = timm.create_model(arch, **options).state_dict()
    path = folder / f"{arch}.pth"
    torch.save({"model": state, "epoch": 3}, path)
    return state, path


@pytest.mark.parametrize("classes", [0, 200])
def test_a_timm_file_loads_whatever_its_classifier(classes, tmp_path):
    # A headless file (DINOv2's, or features saved alone) and a network fine-tuned on 200 classes: the backbone
    # takes every weight but the classifier, which the map never uses.
    state, path = timm_source("vit_tiny_patch16_224", tmp_path, num_classes=classes)
    loaded = build_backbone("timm:vit_tiny_patch16_224", str(path), "auto", 224).module.network.model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.items())
    assert len(loaded) == len([key for key in state if not key.startswith("head.")])


@pytest.mark.parametrize("backbone, source, expected", [
    # A ViT (as issue 28 found it: 8,000 characters of keys) and a convolutional timm network, which timm used to
    # load without a word and leave random, each given VGG16's file.
    ("timm:vit_tiny_patch16_224", None, "vgg16.pth does not fit timm's vit_tiny_patch16_224 (the file holds 0% of its "
                                        "weights; 150 missing: cls_token, pos_embed, patch_embed.proj.weight, ...; 26 "
                                        "unexpected: features.0.weight, features.0.bias, features.2.weight, ...); its "
                                        "keys look like torchvision's vgg16 (features.N.weight); give a state dict of "
                                        "timm's vit_tiny_patch16_224 (timm.create_model(\"vit_tiny_patch16_224\")."
                                        "state_dict() keys), or use imagenet or none."),
    ("timm:resnet18", None, "vgg16.pth does not fit timm's resnet18 (the file holds 0% of its weights; 120 missing: "
                            "conv1.weight, bn1.weight, bn1.bias, ...; 26 unexpected: features.0.weight, "
                            "features.0.bias, features.2.weight, ...); its keys look like torchvision's vgg16"),
    # A shallower network of the same family: its keys are all the deeper one's, which lacks its extra blocks.
    ("timm:resnet34", "resnet18", "resnet18.pth does not fit timm's resnet34 (the file holds 53% of its weights; 96 "
                                  "missing: layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias, ...); its "
                                  "keys look like a resnet18 (conv1, layer1...layer4: torchvision's or timm's); give"),
], ids=["vit", "timm_cnn", "shallower"])
def test_a_timm_backbone_given_a_file_of_another_network_is_refused_in_a_line(backbone, source, expected, tmp_path,
                                                                             caplog):
    pytest.importorskip("timm")
    path = vgg16_file(tmp_path) if source is None else timm_source(source, tmp_path)[1]
    with pytest.raises(UserError) as error:
        build_backbone(backbone, str(path), "auto", 64)
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message, message
    assert len(message) < 600 and "\n" not in message
    assert "Unexpected keys" not in caplog.text  # timm's own list of them, thousands of characters, is not logged


@pytest.mark.parametrize("backbone", ["vgg16", "timm:resnet18"])
def test_a_weights_file_that_is_no_state_dict_is_refused_before_anything_is_built(backbone, tmp_path, monkeypatch):
    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    (tmp_path / "folder.pth").mkdir()
    os.mkfifo(tmp_path / "pipe.pth")  # opening it would wait for a writer: it must never be opened
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("not weights")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "settings.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # torch.save(model) rather than its state_dict()
    # nothing is built for a file that is refused: its refusal costs no time
    monkeypatch.setitem(FAMILIES, "vgg16", dataclasses.replace(
        FAMILIES["vgg16"], build=lambda **_: pytest.fail("built before the file was read")))
    expected = {
        "folder.pth": "folder.pth is a folder; give the file in it that holds a state dict of ",
        "pipe.pth": "pipe.pth is a named pipe, not a file; give a file holding a state dict of ",
        "empty.pth": "empty.pth is empty (0 bytes: a download or copy that did not finish?); give a state dict of ",
        "notes.pth": "notes.pth as a PyTorch state dict (",
        "list.pth": "list.pth holds a list, not a state dict; give a state dict of ",
        "settings.pth": "settings.pth holds no tensors (its entries: epoch, lr), so no weights; give a state dict of ",
        "module.pth": "module.pth holds objects other than tensors (torch.nn.modules.linear.Linear, refused for "
                      "safety: unpickling it could run code), as torch.save(model) writes; save model.state_dict() "
                      "instead, and give a state dict of ",
        "missing.pth": "missing.pth does not exist; give a state dict of ",
    }
    for name, sentence in expected.items():
        with pytest.raises(UserError) as error:
            build_backbone(backbone, str(tmp_path / name), "auto", 64)
        assert sentence in str(error.value) and "\n" not in str(error.value), (name, str(error.value))


def test_imagenet_weights_of_another_family_come_from_the_hub_cache(tmp_path, monkeypatch):
    # torchvision's ResNet-50 weights under their file name in torch's hub cache: read, not downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = FAMILIES["resnet50"].build()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source.state_dict(), checkpoints / ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1])

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    loaded = build_backbone("resnet50", "imagenet").module.state_dict()
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in loaded.items())


def test_a_frozen_batch_norm_backbone_does_not_move():
    model = build_model(ModelConfig(backbone="resnet50", cut="layer3", backbone_weights="none", pooling="avg"), 3,
                        input_size=32)
    before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    model.train()
    assert not any(module.training for module in model.backbone.modules()), "batch norm statistics would move"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).mean()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(value, before[key]) for key, value in model.backbone.state_dict().items())


def test_a_full_bilinear_head_on_2048_channels_is_refused_with_the_ways_out():
    with pytest.raises(UserError) as refused:
        build_model(ModelConfig(backbone="resnet50", backbone_weights="none"), 200, input_size=448)
    message = str(refused.value)
    assert "4,194,304-d vector and a 839M-parameter classifier" in message
    assert all(way in message for way in ("model.pooling=compact", "model.pooling=isqrt_cov", "model.cut"))
    assert message.startswith("model.pooling=bilinear on model.backbone=resnet50")  # the setting, not the network


@pytest.mark.parametrize("options, refused, way_out", [
    ({"pooling": "compact", "compact_dim": 2**21}, "model.compact_dim=2,097,152", "model.compact_dim to at most"),
    ({"pooling": "isqrt_cov", "isqrt_reduce_dim": 0}, "model.isqrt_reduce_dim=0", "model.isqrt_reduce_dim=256"),
])
def test_a_refused_head_names_its_setting_and_never_suggests_the_refused_value(options, refused, way_out):
    with pytest.raises(UserError) as error:
        build_model(ModelConfig(backbone="resnet50", backbone_weights="none", **options), 200, input_size=448)
    message = str(error.value)
    assert message.startswith(refused) and way_out in message
    assert f"model.pooling={options['pooling']}" not in message  # the head it refused is no way out


def test_unknown_backbones_and_cuts_are_one_sentence():
    with pytest.raises(UserError, match="model.backbone must be one of vgg16, vgg19, resnet50"):
        load_config(None, ["--model.backbone=resnet9000"])
    with pytest.raises(UserError, match=r"got 'VGG16'; did you mean vgg16 or vgg19\?$"):
        load_config(None, ["--model.backbone=VGG16"])
    if importlib.util.find_spec("timm"):
        with pytest.raises(UserError, match=r"got 'vit_small_patch16_224'; timm's vit_small_patch16_224 is "
                                            r"model.backbone=timm:vit_small_patch16_224\.$"):
            load_config(None, ["--model.backbone=vit_small_patch16_224"])
    with pytest.raises(UserError, match="model.cut for resnet50 must be auto or one of layer4, layer3"):
        load_config(None, ["--model.backbone=resnet50", "--model.cut=relu5_3"])


# Without the val heatmaps and the projector: each family's heatmaps are test_explain's
TINY = ["--device=cpu", "--data.resize=40", "--data.crop=32", "--data.val_fraction=0.34", "--data.num_workers=0",
        "--model.backbone_weights=none", "--train.batch_size=4", "--train.epochs=1", "--train.log_every=0",
        "--train.precision=fp32", "--model.freeze_backbone=false", "--optim.lr=0.01", "--optim.backbone_lr=0.001",
        "--train.heatmap_images=0", "--train.projector=false"]


# One network per family (vgg16: tests/test_recipes.py); the deeper members build from the same code, and their
# cuts, channels and strides are checked above.
@pytest.mark.parametrize("backbone, options", [
    ("vgg19", []),
    ("resnet50", ["--model.pooling=compact", "--model.compact_dim=1024"]),  # trains its batch norms too
    ("densenet121", ["--model.pooling=compact", "--model.compact_dim=1024"]),
    ("convnext_tiny", []),  # 768 channels: the full bilinear head, a 589,824-d vector
    ("timm:resnet18", []),  # 512 channels: the full bilinear head
], ids=["vgg19", "resnet50", "densenet121", "convnext_tiny", "timm"])
def test_tiny_run_end_to_end(backbone, options, cub_3x13, tmp_path):
    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    run_dir = tmp_path / "run"
    train_cli.main(["--config", STAGE1, f"--data-root={cub_3x13}", f"--run-dir={run_dir}",
                    f"--model.backbone={backbone}", *TINY, *options])
    evaluated = eval_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "val", "--device", "cpu",
                               "--no-figures"])
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert (evaluated["count"], evaluated["top1"]) == (best["metrics"]["val_count"], best["metrics"]["val_top1"])
    assert best["config"]["model"]["backbone"] == backbone


def test_a_timm_network_brings_its_own_normalisation():
    pytest.importorskip("timm")
    assert input_normalisation("timm:inception_v3") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert input_normalisation("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    backbone = build_backbone("timm:inception_v3", "none")
    assert (backbone.mean, backbone.std) == input_normalisation("timm:inception_v3")
    assert backbone.channels == 2048 and backbone.stride == 32


def test_timm_missing_or_unknown_is_one_sentence(monkeypatch):
    pytest.importorskip("timm")
    with pytest.raises(UserError, match="timm has no model 'no_such_net'"):
        build_backbone("timm:no_such_net", "none")
    with pytest.raises(UserError, match=r"^timm has no model 'vit_smal_patch16_224' \(model.backbone=timm:"
                                        r"vit_smal_patch16_224.augreg_in1k\); did you mean timm:vit_small_patch16_224"):
        build_backbone("timm:vit_smal_patch16_224.augreg_in1k", "none")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(UserError, match="needs timm, an optional extra: pip install timm"):
        build_backbone("timm:resnet18", "none")


def test_the_resnet50_isqrt_cov_recipe_trains_and_evaluates(cub_3x13, tmp_path):
    # 64 px: layer4's stride of 32 leaves 2 x 2 positions, the fewest a covariance of centred features needs.
    recipe = Path(STAGE1).parent / "cub_resnet50_isqrt_cov.yaml"
    options = [option for option in TINY if not option.startswith(("--data.resize", "--data.crop"))]
    train_cli.main(["--config", str(recipe), f"--data-root={cub_3x13}", f"--run-dir={tmp_path}", *options,
                    "--data.resize=72", "--data.crop=64", "--model.isqrt_reduce_dim=32"])
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert best["config"]["model"]["backbone"] == "resnet50" and best["config"]["model"]["pooling"] == "isqrt_cov"
    assert math.isfinite(best["metrics"]["train_loss"])
    evaluated = eval_cli.main(["--checkpoint", str(tmp_path / "best.pt"), "--split", "test", "--device", "cpu",
                               "--no-figures"])
    assert evaluated["count"] == 21


@pytest.mark.parametrize("backbone, crop, expected", [
    ("timm:vit_tiny_patch16_224", 72, "data.crop=72 does not fit model.backbone=timm:vit_tiny_patch16_224: it cuts "
                                      "the image into whole 16 x 16 px cells; set data.crop (and data.resize) to 64 "
                                      "or 80."),
    ("timm:resnet18", 16, "data.crop=16 is too small for model.backbone=timm:resnet18, whose feature map is 1/32 of "
                          "the image; set data.crop to at least 32."),
    ("dinov2_vitb14", 448 + 2, "data.crop=450 does not fit model.backbone=dinov2_vitb14: it cuts the image into whole "
                               "14 x 14 px cells; set data.crop (and data.resize) to 448 or 462."),
    ("swin_b_in22k", 112, "data.crop=112 does not fit model.backbone=swin_b_in22k: its windows tile whole 32 x 32 px "
                          "cells; set data.crop (and data.resize) to 96 or 128."),
    ("timm:vit_tiny_patch16_224", 8, "data.crop=8 does not fit model.backbone=timm:vit_tiny_patch16_224: it cuts the "
                                     "image into whole 16 x 16 px cells; set data.crop (and data.resize) to 16."),
])
def test_a_backbone_that_cannot_take_the_input_size_names_the_size_it_needs(backbone, crop, expected):
    with pytest.raises(UserError) as error:
        build_model(ModelConfig(backbone=backbone, backbone_weights="none", pooling="avg"), 3, input_size=crop)
    assert str(error.value).startswith(expected)
    build_model(ModelConfig(backbone=backbone, backbone_weights="none", pooling="avg"), 3, input_size=224)


@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_a_timm_tag_timm_lacks_is_one_sentence_naming_the_tags_it_has(weights, cub_3x13, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    tags = [name.split(".", 1)[1] for name in timm.list_pretrained("vit_small_patch16_224.*")]
    default = timm.models.get_pretrained_cfg("vit_small_patch16_224").tag
    expected = (f"timm's vit_small_patch16_224 has no pretrained tag 'nosuchtag'; its tags are {', '.join(tags[:4])}"
                f"{'' if len(tags) <= 4 else ' and'}")
    with pytest.raises(UserError) as error:
        build_backbone("timm:vit_small_patch16_224.nosuchtag", weights, "auto", 64)
    assert str(error.value).startswith(expected) and str(error.value).endswith(f"for its default, {default}.")
    # As the user meets it: train's first look at the backbone (its input normalisation), before any data is read.
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(train_cli.main)(["--config", STAGE1, f"--data-root={cub_3x13}", f"--run-dir={run_dir}",
                                            "--model.backbone=timm:vit_small_patch16_224.nosuchtag", *TINY,
                                            f"--model.backbone_weights={weights}"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {error.value}\n"  # one line, no traceback
    assert not run_dir.exists()


def test_imagenet_weights_of_a_timm_network_without_any_are_refused():
    timm = pytest.importorskip("timm")
    untrained = next(name for name in timm.list_models("resnet*") if not timm.models.is_model_pretrained(name))
    with pytest.raises(UserError, match=f"^timm has no pretrained weights for {untrained} "
                                        r"\(model.backbone_weights=imagenet\); set model.backbone_weights=none"):
        build_backbone(f"timm:{untrained}", "imagenet", "auto", 64)


@pytest.mark.parametrize("backbone, cells", [
    ("timm:hiera_tiny_224", 7),  # its forward_intermediates refuses to apply the final norm: its maps come without
    ("timm:levit_128", 4),  # 224 px is no whole number of its 64-px cells, yet the size it was made for
])
def test_timm_networks_with_odd_maps_build_and_run_at_their_native_size(backbone, cells):
    pytest.importorskip("timm")
    built = build_backbone(backbone, "none", "auto", 224)
    with torch.no_grad():
        feature_map = built.module.eval()(torch.randn(1, 3, 224, 224))
    assert feature_map.shape == (1, built.channels, cells, cells)
