"""model.adapt=vpt_deep (bcnn/models/prompts.py): each token network's map is the prompted forward written out here
(prompts after the prefix tokens, out again after each block), of the plain H x W grid; a Swin window attention
with prompts is the float64 attention over [prompts, window] with zero bias and mask for the prompts; the prompts
are the only backbone tensors that train, counted as prompts x dim per block in train.log; a copy of the model (the
exponential average's) computes what the model does; what cannot take prompts is refused in one sentence."""

import copy
import re

import pytest
import torch
from torch.nn import functional as F

from bcnn import train as train_cli
from bcnn.config import ModelConfig, load_config
from bcnn.errors import UserError
from bcnn.models import build_model
from bcnn.models.prompts import PromptedBlock, PromptedWindowAttention
from helpers.runs import STAGE1, load

pytest.importorskip("timm")

# one of each kind of token network: class token; class + distillation; class + 4 registers (DINOv2); EVA-02's
# rotary embedding; CLIP's norm before the blocks (timm's smallest CLIP ViT, the named family's class)
TOKEN_NETWORKS = {"timm:vit_tiny_patch16_224": (1, 32), "timm:deit_tiny_distilled_patch16_224": (2, 32),
                  "timm:vit_small_patch14_reg4_dinov2": (5, 28), "timm:eva02_tiny_patch14_224": (1, 28),
                  "timm:vit_xsmall_patch16_clip_224": (1, 32)}


def prompted(backbone: str, count: int = 3, size: int = 32, pooling: str = "avg"):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, backbone_weights="none", pooling=pooling, adapt="vpt_deep", vpt_prompts=count)
    return build_model(cfg, 3, input_size=size).eval()


def prompted_map_written_out(network, images: torch.Tensor, prefix: int) -> torch.Tensor:
    """VPT-deep by its definition, from the network's own parts: [prefix, P_i, patches] into block i, its prompt
    outputs dropped, the final norm, the patch tokens on their grid."""
    tokens = network.patch_embed(images)
    embedded = network._pos_embed(tokens)
    tokens, rope = embedded if isinstance(embedded, tuple) else (embedded, None)  # EVA-02: (tokens, rotary table)
    tokens = network.norm_pre(tokens) if hasattr(network, "norm_pre") else tokens
    for wrapped in network.blocks:
        prompts = wrapped.prompts.expand(len(images), -1, -1)
        block_input = torch.cat([tokens[:, :prefix], prompts, tokens[:, prefix:]], dim=1)
        output = wrapped.block(block_input, rope=rope) if rope is not None else wrapped.block(block_input)
        tokens = torch.cat([output[:, :prefix], output[:, prefix + len(wrapped.prompts):]], dim=1)
    patches = network.norm(tokens)[:, prefix:]
    side = int(patches.shape[1] ** 0.5)
    return patches.reshape(len(images), side, side, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backbone", TOKEN_NETWORKS)
def test_a_token_network_s_map_is_the_prompted_forward_on_the_plain_grid(backbone):
    prefix, size = TOKEN_NETWORKS[backbone]
    model = prompted(backbone, size=size)
    network = model.backbone.network.model
    assert network.num_prefix_tokens == prefix and all(isinstance(block, PromptedBlock) for block in network.blocks)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone=backbone, backbone_weights="none", pooling="avg"), 3,
                        input_size=size).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for built in (model, plain):  # DINOv2's layer scales start at 1e-5: at 1, its blocks change the tokens
            for name, parameter in built.named_parameters():
                if name.endswith(".gamma"):
                    parameter.fill_(1.0)
        feature_map = model.backbone(images)
        expected = prompted_map_written_out(network, images, prefix)
        plain = plain.backbone(images)
    assert feature_map.shape == plain.shape  # the head sees the plain H x W grid
    torch.testing.assert_close(feature_map, expected, rtol=0, atol=0)  # the same operations: exactly
    assert (feature_map - plain).abs().max() > 1e-3  # and the prompts did take part


def attention_written_out(attention, prompts, windows, mask):
    """One Swin window attention in float64 over [prompts, window]: bias and mask zero in the prompts' rows and
    columns."""
    inner = attention.attention
    heads, count = inner.num_heads, len(prompts)
    tokens = torch.cat([prompts.expand(len(windows), -1, -1), windows], dim=1).double()
    q, k, v = (F.linear(tokens, inner.qkv.weight.double(), inner.qkv.bias.double())
               .reshape(len(windows), tokens.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4))
    area = windows.shape[1]
    table = inner.relative_position_bias_table.double()[inner.relative_position_index.view(-1)]
    bias = torch.zeros(heads, count + area, count + area, dtype=torch.float64)
    bias[:, count:, count:] = table.view(area, area, heads).permute(2, 0, 1)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
    if mask is not None:
        padded = torch.zeros(len(mask), count + area, count + area, dtype=torch.float64)
        padded[:, count:, count:] = mask
        scores = (scores.view(-1, len(mask), heads, count + area, count + area) + padded[None, :, None]).flatten(0, 1)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(len(windows), count + area, -1)
    return F.linear(out, inner.proj.weight.double(), inner.proj.bias.double())[:, count:]


def test_a_swin_window_attention_with_prompts_is_the_attention_over_prompts_and_window():
    model = prompted("timm:swin_tiny_patch4_window7_224", size=224)
    blocks = [block for block in model.backbone.modules() if hasattr(block, "shift_size")]
    shifted = next(block for block in blocks if block.attn_mask is not None)  # the shifted windows' mask
    attention = shifted.attn
    assert isinstance(attention, PromptedWindowAttention)
    with torch.no_grad():
        attention.prompts.normal_()  # values like a trained prompt's
        windows = torch.randn(2 * len(shifted.attn_mask), 49, attention.prompts.shape[1])
        for mask in (None, shifted.attn_mask):
            got = attention(windows, mask=mask)
            # float32 sums of 49 + 3 terms per score and per output against float64: 1e-5 is many times their
            # rounding, a missing bias or mask entry changes outputs at 1e-1
            torch.testing.assert_close(got.double(), attention_written_out(attention, attention.prompts, windows, mask),
                                       rtol=1e-5, atol=1e-5)


def test_a_copy_of_a_prompted_swin_computes_what_it_does():
    model = prompted("timm:swin_tiny_patch4_window7_224", size=224)
    twin = copy.deepcopy(model)  # what timm's exponential average keeps
    with torch.no_grad():
        images = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(twin(images), model(images), rtol=0, atol=0)
        twin.backbone.network.model.layers[0].blocks[0].attn.attention.relative_position_bias_table.add_(1.0)
        assert not torch.equal(twin(images), model(images))  # the copy reads its own bias table, not the model's


def test_vpt_trains_the_prompts_alone_and_train_log_counts_them(cub_3x6, tmp_path):
    overrides = [f"--data.root={cub_3x6}", "--model.backbone=timm:vit_tiny_patch16_224", "--model.backbone_weights=none",
                 "--model.pooling=avg", "--data.crop=32", "--data.resize=36", "--model.adapt=vpt_deep",
                 "--model.vpt_prompts=5", "--optim.backbone_lr=0.1", "--optim.lr=0.01"]
    run_dir = tmp_path / "run"
    train_cli.main(["--config", STAGE1, *overrides, f"--run-dir={run_dir}", "--device=cpu", "--data.num_workers=2",
                    "--data.val_fraction=0.34", "--train.epochs=1", "--train.batch_size=4", "--train.log_every=0",
                    "--train.precision=fp32", "--train.heatmap_images=0", "--train.projector=false"])
    cfg = load_config(STAGE1, overrides)
    train_cli.seed_everything(cfg.train.seed)
    before = build_model(cfg.model, 3, input_size=32).state_dict()
    after = load(run_dir / "last.pt")["model"]
    prompts = [key for key in before if key.endswith(".prompts")]
    assert len(prompts) == 12 and all(before[key].shape == (5, 192) for key in prompts)
    for key in before:
        if key.startswith("backbone.") and key not in prompts:
            assert torch.equal(before[key], after[key]), f"{key} moved, and VPT trains the prompts only"
    assert all(not torch.equal(before[key], after[key]) for key in prompts)
    head = sum(after[key].numel() for key in after if key.startswith(("classifier.", "pooling.")))
    line = next(line for line in (run_dir / "train.log").read_text().splitlines() if "trainable parameters" in line)
    assert f" {5 * 192 * 12 + head} trainable parameters of " in line, line  # prompts x dim x depth, and the head
    assert "backbone frozen but for model.adapt=vpt_deep" in line


def test_swin_prompts_count_prompts_times_each_block_s_width():
    model = prompted("timm:swin_tiny_patch4_window7_224", count=4, size=224)
    trained = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    # Swin-T: 2, 2, 6, 2 blocks of 96, 192, 384, 768 channels
    assert trained == 4 * (2 * 96 + 2 * 192 + 6 * 384 + 2 * 768)


@pytest.mark.parametrize("backbone, message", [
    ("vgg16", "model.adapt=vpt_deep inserts prompt tokens into a transformer's blocks, and model.backbone=vgg16 is not "
              "a ViT or Swin; use model.adapt=lora or bitfit"),
    ("timm:swinv2_tiny_window8_256", "is Swin-V2 (its attention adds its position bias inside)"),
])
def test_what_cannot_take_prompts_is_one_sentence(backbone, message):
    with pytest.raises(UserError, match=re.escape(message)):
        prompted(backbone, size=256 if "swinv2" in backbone else 32)


def test_vpt_prompts_without_vpt_is_refused():
    with pytest.raises(UserError, match=re.escape("model.vpt_prompts applies to model.adapt=vpt_deep, and model.adapt "
                                                  "is lora")):
        load_config(STAGE1, ["--model.adapt=lora", "--optim.backbone_lr=0.01", "--model.vpt_prompts=4"])
