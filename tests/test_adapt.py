"""model.adapt (bcnn/models/adapt.py): BitFit trains a frozen backbone's biases and nothing else of it, LoRA its
low-rank tensors alone and starts as the frozen model exactly, through the command, with loader workers on; train.log
states what trains (against the formula); predict's merged LoRA gives the unmerged logits (the Ctrl-C
resume of a LoRA run: tests/test_peft_checkpoints.py); what cannot work is refused in one sentence."""

import re

import pytest
import torch

from bcnn import eval as eval_cli
from bcnn import predict as predict_cli
from bcnn import train as train_cli
from bcnn.config import load_config
from bcnn.errors import UserError
from bcnn.data import load_rgb
from bcnn.models import build_model
from bcnn.models.adapt import merge_adapters
from bcnn.models.trained import from_checkpoint
from helpers.runs import STAGE1, load

BACKBONES = {"vgg16": ["--model.backbone=vgg16", "--data.crop=32", "--data.resize=36"],
             "vit": ["--model.backbone=timm:vit_tiny_patch16_224", "--data.crop=32", "--data.resize=36"]}


def initial_model(overrides, classes):
    """The model the run builds before its first step: the same seed, the same build (train.seed_everything)."""
    cfg = load_config(STAGE1, overrides)
    train_cli.seed_everything(cfg.train.seed)
    return build_model(cfg.model, classes, input_size=cfg.data.crop)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bitfit_trains_the_backbone_s_biases_and_nothing_else_of_it(backbone, cub_3x6, tmp_path):
    overrides = [f"--data.root={cub_3x6}", *BACKBONES[backbone], "--model.backbone_weights=none",
                 "--model.adapt=bitfit", "--optim.backbone_lr=0.01", "--optim.lr=0.01"]
    run_dir = tmp_path / "run"
    train_cli.main(["--config", STAGE1, *overrides, f"--run-dir={run_dir}", "--device=cpu", "--data.num_workers=2",
                    "--data.val_fraction=0.34", "--train.epochs=1", "--train.batch_size=4", "--train.log_every=0",
                    "--train.precision=fp32", "--train.heatmap_images=0", "--train.projector=false"])
    before = initial_model(overrides, 3).state_dict()
    after = load(run_dir / "last.pt")["model"]
    backbone_keys = [key for key in before if key.startswith("backbone.")]
    biases = [key for key in backbone_keys if key.endswith("bias")]
    assert biases and len(biases) < len(backbone_keys)
    for key in backbone_keys:
        if key in biases:
            continue
        assert torch.equal(before[key], after[key]), f"{key} moved, and BitFit trains biases only"
    moved = [key for key in biases if not torch.equal(before[key], after[key])]
    assert len(moved) > len(biases) // 2, moved  # the biases did train (a few may get no gradient at 32 px)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    # what train.log states, against a count made here from the modules' bias attributes
    model = initial_model(overrides, 3)
    bias_count = sum(module.bias.numel() for module in model.backbone.modules()
                     if isinstance(getattr(module, "bias", None), torch.nn.Parameter))
    head = sum(p.numel() for p in (*model.pooling.parameters(), *model.classifier.parameters()))
    total = sum(p.numel() for p in model.parameters())
    line = next(line for line in (run_dir / "train.log").read_text().splitlines() if "trainable parameters" in line)
    assert f"{bias_count + head} trainable parameters of {total} (" in line, line
    assert "backbone frozen but for model.adapt=bitfit" in line
    # the optimizer's backbone group is the biases, at optim.backbone_lr
    groups = {group["name"]: group for group in load(run_dir / "last.pt")["optimizer"]["param_groups"]}
    assert len(groups["backbone"]["params"]) == len(biases) and groups["backbone"]["lr"] == 0.01  # plateau: unmoved


def test_the_backbone_stays_in_eval_mode_under_bitfit():
    cfg = load_config(STAGE1, ["--model.backbone=timm:vit_tiny_patch16_224", "--model.backbone_weights=none",
                               "--model.adapt=bitfit", "--optim.backbone_lr=0.01", "--model.drop_path_rate=0.1"])
    model = build_model(cfg.model, 3, input_size=32).train()
    assert not any(module.training for module in model.backbone.modules())  # no dropout, no drop path
    assert model.classifier.training


@pytest.mark.parametrize("overrides, message", [
    (["--model.freeze_backbone=false", "--optim.backbone_lr=0.01"],
     "model.adapt=bitfit trains a few of a frozen backbone's tensors, and model.freeze_backbone=false trains all"),
    ([], "model.adapt=bitfit trains a few of a frozen backbone's tensors at optim.backbone_lr, which is 0"),
    (["--optim.backbone_lr=0.01", "--train.cache_features=true"], "so its features change as it trains and cannot be "
                                                                  "cached"),
    (["--model.adapt=prefix"], "model.adapt (command line) must be one of none, bitfit, lora, vpt_deep, got 'prefix'"),
])
def test_what_cannot_adapt_is_refused_in_one_sentence(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(STAGE1, ["--model.adapt=bitfit", *overrides])


LORA = ["--model.backbone=timm:vit_tiny_patch16_224", "--model.backbone_weights=none", "--model.pooling=avg",
        "--data.crop=32", "--data.resize=36", "--optim.backbone_lr=0.01", "--optim.lr=0.01"]
TARGETS = {"qkv": (192, 576), "proj": (192, 192), "fc1": (192, 768), "fc2": (768, 192)}  # ViT-Ti: in, out


@pytest.fixture(scope="module")
def peft():
    """peft, imported once (its import takes seconds: transformers comes with it); a module fixture, so the tests
    that need it run in one pytest-xdist worker (tests/conftest.py)."""
    return pytest.importorskip("peft")


def test_lora_starts_as_the_frozen_model_and_trains_its_low_rank_tensors_alone(peft, cub_3x6, tmp_path):
    overrides = [f"--data.root={cub_3x6}", *LORA, "--model.adapt=lora", "--model.lora_rank=4",
                 "--model.lora_targets=qkv,proj,fc1,fc2", "--model.lora_dropout=0.1"]
    # At initialisation B = 0: the frozen model's logits exactly (the same seed builds the same base weights).
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        frozen = initial_model([f"--data.root={cub_3x6}", *LORA[:-2]], 3).eval()(images)
        adapted = initial_model(overrides, 3).eval()(images)
    assert torch.equal(frozen, adapted)
    run_dir = tmp_path / "run"
    train_cli.main(["--config", STAGE1, *overrides, f"--run-dir={run_dir}", "--device=cpu", "--data.num_workers=2",
                    "--data.val_fraction=0.34", "--train.epochs=1", "--train.batch_size=4", "--train.log_every=0",
                    "--train.precision=fp32", "--train.heatmap_images=0", "--train.projector=false"])
    before, after = initial_model(overrides, 3).state_dict(), load(run_dir / "last.pt")["model"]
    low_rank = [key for key in before if ".lora_" in key]
    assert len(low_rank) == 2 * 12 * len(TARGETS)  # A and B of each target in each of the 12 blocks
    for key in before:
        if key.startswith("backbone.") and key not in low_rank:
            assert torch.equal(before[key], after[key]), f"{key} moved, and LoRA trains A and B only"
    assert all(not torch.equal(before[key], after[key]) for key in low_rank if ".lora_B." in key)
    # r x (in + out) per target and block, against train.log's count
    head = sum(after[key].numel() for key in after if key.startswith(("classifier.", "pooling.")))
    expected = 12 * 4 * sum(i + o for i, o in TARGETS.values()) + head
    line = next(line for line in (run_dir / "train.log").read_text().splitlines() if "trainable parameters" in line)
    assert f" {expected} trainable parameters of " in line, line
    # the checkpoint is read back by the commands users run; bcnn.predict merges the updates into the weights
    evaluated = eval_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "val", "--device", "cpu",
                               "--no-figures", f"--output={tmp_path / 'val.json'}"])
    assert evaluated["count"] == 3
    image = sorted((cub_3x6 / "images").rglob("*.jpg"))[0]
    (predicted,) = predict_cli.main([str(image), "--checkpoint", str(run_dir / "best.pt"), "--json", "--device",
                                     "cpu"])
    trained = from_checkpoint(run_dir / "best.pt")
    with torch.no_grad():
        unmerged = torch.softmax(trained.model(trained.transform(load_rgb(str(image)))[None]), dim=1)[0]
    top = predicted["predictions"][0]
    # merged for predict, unmerged here: the same probability up to float rounding (see the test below)
    assert top["probability"] == pytest.approx(float(unmerged.max()), abs=1e-5)
    assert top["class"] == trained.classes[int(unmerged.argmax())]


def test_merged_lora_gives_the_unmerged_logits_up_to_float_rounding(peft):
    cfg = load_config(STAGE1, [*LORA, "--model.adapt=lora", "--model.lora_targets=qkv,proj,fc1,fc2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, input_size=32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)  # a trained update: B is 0 only at initialisation
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(images)
        assert merge_adapters(model) == 12 * 4  # every adapted layer of the 12 blocks
        merged = model(images)
    # x (W + s B A)^T against x W^T + s (x A^T) B^T: the same sums in another order, float32 rounding of sums over
    # 192-768 terms through 12 blocks (a relative 1e-4 bounds it with room; a wrong merge differs at 1e-1)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["--model.adapt=lora", "--model.lora_targets=q_proj"],
     "model.lora_targets='q_proj' names q_proj, which matches no linear layer of model.backbone=timm:vit_tiny_patch16_224 "
     "(its linear layers are named fc1, fc2, proj, qkv)"),
])
def test_a_lora_target_that_names_nothing_is_one_sentence(peft, overrides, message):
    cfg = load_config(STAGE1, [*LORA, *overrides])
    with pytest.raises(UserError, match=re.escape(message)):
        build_model(cfg.model, 3, input_size=32)


def test_lora_keys_without_lora_are_refused():
    with pytest.raises(UserError, match=re.escape("model.lora_rank applies to model.adapt=lora, and model.adapt is "
                                                  "bitfit")):
        load_config(STAGE1, ["--model.adapt=bitfit", "--optim.backbone_lr=0.01", "--model.lora_rank=4"])


def test_lora_on_swin_v2_s_qkv_takes_part_in_its_attention(peft):
    # timm's Swin-V2 attention multiplies by its qkv layer's weight itself when it has q and v biases, which would
    # bypass LoRA's layer: the map must move with B, and equal the plain model's at B = 0.
    def model(adapt):
        torch.manual_seed(0)
        cfg = load_config(STAGE1, ["--model.backbone=timm:swinv2_tiny_window8_256", "--model.backbone_weights=none",
                                   "--model.pooling=avg", "--optim.backbone_lr=0.01", f"--model.adapt={adapt}"])
        built = build_model(cfg.model, 3, input_size=256).eval()
        with torch.no_grad():
            for name, parameter in built.named_parameters():
                if name.endswith(("norm1.weight", "norm2.weight")):  # timm starts Swin-V2's post-norms at 0: at 1,
                    parameter.fill_(1.0)                              # each block's attention reaches the map
        return built

    plain, adapted = model("none"), model("lora")
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(adapted.backbone(images), plain.backbone(images))  # B = 0
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)
        assert (adapted.backbone(images) - plain.backbone(images)).abs().max() > 1e-3
