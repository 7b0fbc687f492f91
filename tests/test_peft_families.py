"""model.adapt on every named transformer family (bcnn/models/adapt.py, prompts.py; the large ones by their
base-size classes): bitfit, lora and vpt_deep with each pooling head at the recipes' 448 px build, and a step gives a
gradient to exactly the tensors the method names (the backbone's biases; LoRA's A and B; the prompts) and the head's,
to nothing else of the frozen backbone; Swin-V2 refuses prompts in one sentence, and LoRA on its qkv gets its
gradient (timm's attention would bypass the layer: bcnn.models.adapt tells it its biases are separate). And LoRA
under DDP: two processes (gloo) end with the weights of one.

Base and large networks at 448 px take seconds per image on a CPU, so they are built and stepped on the meta device:
shapes and autograd's graph without numbers, and the graph is what decides which tensors get a gradient."""

import copy
import dataclasses
import functools
import importlib.util
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

timm = pytest.importorskip("timm")

from bcnn import train as train_cli  # noqa: E402
from bcnn.config import ModelConfig, load_config  # noqa: E402
from bcnn.errors import UserError  # noqa: E402
from bcnn.models import bilinear_cnn, build_model  # noqa: E402
from bcnn.models.backbones import TIMM_FAMILIES, build_backbone  # noqa: E402
from bcnn.models.pooling import MAX_POOLED_DIM, build_pooling  # noqa: E402
from helpers.numerics import assert_same_training  # noqa: E402
from helpers.runs import STAGE1, small_run_args  # noqa: E402
from test_distributed import torchrun, weights  # noqa: E402

SIZE, CLASSES = 448, 200
HEADS = ("bilinear", "matrix_sqrt", "isqrt_cov", "compact", "avg")
# EVA-02's attention has q_proj, k_proj and v_proj where the others have one qkv layer: LoRA on the same three.
LORA_TARGETS = {"eva02_b14_in22k": "q_proj,k_proj,v_proj"}
# The tensors each method trains, by name: biases (Swin-V2's attention keeps its q and v biases apart from its qkv
# layer; a Swin's relative_position_bias_table is a table, not a bias), LoRA's low-rank pair, the prompts.
TRAINS = {"bitfit": lambda key: key.rsplit(".", 1)[-1] in ("bias", "q_bias", "v_bias"),
          "lora": lambda key: ".lora_A." in key or ".lora_B." in key,
          "vpt_deep": lambda key: key.endswith(".prompts")}


@pytest.fixture(scope="module")
def peft():
    """peft, imported once (seconds: transformers comes with it); a module fixture, so the tests that need it run in
    one pytest-xdist worker (tests/conftest.py)."""
    return pytest.importorskip("peft")


@pytest.fixture(scope="module")
def family(request):
    """A named family (request.param) built on the meta device for 448 px, once for its three methods (timm's
    initialisers still take a second op by op on meta): each test adapts its own copy."""
    with torch.device("meta"):
        return request.param, build_backbone(request.param, "none", "auto", SIZE)


@functools.cache
def compact_head_steps(channels: int, grid: int) -> bool:
    """The compact head for real, on the CPU: its bucket table is built from its hashes' values, which a meta tensor
    has none of. On a random (2, channels, grid, grid) map in place of the backbone's: whether the logits have their
    shape and the map and the classifier get finite, nonzero gradients. Asked once per map shape, whatever the method
    (Gram products at 32 x 32 tokens and the table's sort take up to a second)."""
    pooling = build_pooling(ModelConfig(pooling="compact"), channels)
    classifier = nn.Linear(pooling.output_dim, CLASSES)
    feature_map = torch.randn(2, channels, grid, grid, requires_grad=True)
    logits = classifier(pooling(feature_map))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    return logits.shape == (2, CLASSES) and all(torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
                                                 for tensor in (feature_map, classifier.weight))


# ViT-L, DINOv2-L and Swin-L are the timm classes of ViT-B, DINOv2-B and Swin-B with more and wider blocks (the
# adaptations find their tensors by class and name, the same in both); their maps at 448 px are test_transformers'.
LARGE = ("vit_l16_in21k", "dinov2_vitl14", "swin_l_in22k")


@pytest.mark.parametrize("method", TRAINS)
@pytest.mark.parametrize("family", [name for name in TIMM_FAMILIES if name not in LARGE], indirect=True)
def test_every_head_on_every_named_family_steps_with_each_method_at_448_px(family, method, peft, monkeypatch):
    name, backbone = family
    cfg = ModelConfig(backbone=name, backbone_weights="none", pooling="avg", adapt=method,
                      lora_targets=LORA_TARGETS.get(name, "qkv"))
    # build_model as the commands call it (sizes checked, frozen, adapted), on a copy of the backbone built once
    monkeypatch.setattr(bilinear_cnn, "build_backbone", lambda *args: copy.deepcopy(backbone))
    if name == "swinv2_b_in22k" and method == "vpt_deep":
        with torch.device("meta"), pytest.raises(UserError) as refused:
            build_model(cfg, CLASSES, input_size=SIZE)
        message = str(refused.value)
        assert message.startswith(f"model.adapt=vpt_deep inserts prompt tokens into a transformer's blocks, and "
                                  f"model.backbone={name} is Swin-V2 (its attention adds its position bias inside); "
                                  "use model.adapt=lora or bitfit")
        assert "\n" not in message and ". " not in message and message.endswith(".")  # one sentence
        return
    with torch.device("meta"):
        model = build_model(cfg, CLASSES, input_size=SIZE).train()
    named = dict(model.backbone.named_parameters())
    trained = {key for key, parameter in named.items() if parameter.requires_grad}
    assert trained == {key for key in named if TRAINS[method](key)}
    if method != "bitfit":  # in each block, A and B of each target; one prompt tensor
        blocks = sum(1 for key, _ in backbone.module.named_modules() if re.search(r"blocks\.\d+$", key))
        assert len(trained) == blocks * (2 * len(cfg.lora_targets.split(",")) if method == "lora" else 1)
    images = torch.randn(2, 3, SIZE, SIZE, device="meta")
    feature_map = model.backbone(images)
    grid = SIZE // backbone.stride  # ViTs: 28 x 28 tokens; DINOv2 and EVA-02: 32 x 32; Swins: 14 x 14
    assert feature_map.shape == (2, backbone.channels, grid, grid)
    assert feature_map.requires_grad, f"none of the {len(trained)} tensors {method} trains takes part in the map"

    # Each head as BilinearCNN.forward runs it past the backbone (without its autocast, which has no meta device),
    # its loss back to the map; then the map's gradient, summed over the heads, back through the backbone once: the
    # chain rule in two halves, one backward pass through the backbone instead of one per head.
    map_gradient, heads = torch.zeros_like(feature_map), nn.ModuleList()
    for head in HEADS:
        if head == "compact":
            assert compact_head_steps(backbone.channels, grid)
            continue
        if head == cfg.pooling:  # the model's own
            pooling, classifier = model.pooling, model.classifier
        else:
            config = dataclasses.replace(cfg, pooling=head)
            with torch.device("meta"):
                pooling = build_pooling(config, backbone.channels, nonnegative_maps=backbone.nonnegative)
                assert pooling.output_dim <= MAX_POOLED_DIM  # (Swin-L's would not be: test_transformers)
                classifier = nn.Linear(pooling.output_dim, CLASSES)
            heads.extend([pooling, classifier])
        on_map = feature_map.detach().requires_grad_()
        logits = classifier(pooling(on_map.float()))
        assert logits.shape == (2, CLASSES), head
        F.cross_entropy(logits, torch.tensor([0, 1], device="meta")).backward()
        assert on_map.grad is not None, f"{head} passes the map no gradient"
        assert all(parameter.grad is not None for parameter in (*pooling.parameters(), *classifier.parameters()))
        map_gradient += on_map.grad
    feature_map.backward(map_gradient)
    graded = {key for key, parameter in named.items() if parameter.grad is not None}
    assert graded == trained, (f"trained without a gradient: {sorted(trained - graded)[:4]}; a gradient though "
                               f"frozen: {sorted(graded - trained)[:4]}")

    groups = model.param_groups(backbone_lr=0.01, classifier_lr=0.01)
    backbone_group = next(group for group in groups if group["name"] == "backbone")
    assert {id(parameter) for parameter in backbone_group["params"]} == {id(named[key]) for key in trained}
    optimizer = torch.optim.SGD([*groups, {"params": list(heads.parameters()), "lr": 0.01}], lr=0.01, momentum=0.9)
    optimizer.step()


# small_run_args (12 images in steps of 4, 2 epochs) on the frozen random ViT-Ti at 32 px with LoRA, its dropout off:
# the two runs differ in nothing but how each batch is split. The average head: behind the bilinear head, the same
# runs end with LoRA tensors up to 8% of their movement apart, and so do one process on batches of 4 and one with
# train.accum_steps=2 (the same split, no DDP): rounding that head amplifies on a random ViT's map, not the processes.
LORA_RUN = ["--model.backbone=timm:vit_tiny_patch16_224", "--model.pooling=avg", "--model.freeze_backbone=true",
            "--model.adapt=lora", "--model.lora_dropout=0", "--optim.backbone_lr=0.01", "--train.heatmap_images=0",
            "--train.projector=false"]


# Not the peft fixture: its module scope would put this test in the xdist worker of the 33 above (tests/conftest.py).
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="model.adapt=lora needs peft (pip install peft)")
def test_lora_on_two_processes_trains_the_model_of_one(cub_3x13, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_cli.main(small_run_args(cub_3x13, one, *LORA_RUN))  # one process, no process group
    result = torchrun("-m", "bcnn.train", *small_run_args(cub_3x13, two, *LORA_RUN))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 process(es) (process group: gloo)" in (two / "train.log").read_text()

    overrides = [arg for arg in small_run_args(cub_3x13, one, *LORA_RUN) if re.match(r"--\w+\.", arg)]  # --section.key=
    cfg = load_config(STAGE1, overrides)
    train_cli.seed_everything(cfg.train.seed)
    initial = build_model(cfg.model, 3, input_size=cfg.data.crop).state_dict()  # what both runs start from
    reference, ddp = weights(one), weights(two)
    low_rank = [key for key in initial if ".lora_" in key]
    assert len(low_rank) == 2 * 12 and all(not torch.equal(initial[key], reference[key]) for key in low_rank)
    # As test_distributed compares a whole VGG16's training: within 1% of how far training moved each tensor
    # (helpers.numerics.TRAINING_RTOL); a tensor training did not move, all of the frozen backbone, bit for bit.
    # Measured here: 3.5e-6 apart at most, on LoRA's A.
    assert_same_training(reference, ddp, initial)
