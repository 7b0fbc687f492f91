"""--cost: every pooling head on every torchvision backbone family, with the figures papers print beside accuracy:
backbone, head and classifier parameters, the pooled vector's size and one image's forward GFLOPs
(bcnn.models.cost.model_cost). Random weights, nothing downloaded, nothing trained; the timm backbones are left out.

    python -m bcnn.bench --cost                    # at the recipe's 448 px, 200 classes
    python -m bcnn.bench --cost --image-size 224 --json
"""

from __future__ import annotations

import torch

from bcnn.bench.settings import Settings
from bcnn.config import ModelConfig
from bcnn.models import BilinearCNN
from bcnn.models.backbones import FAMILIES, build_backbone, input_size_problem
from bcnn.models.cost import model_cost
from bcnn.models.pooling import HEADS, MAX_POOLED_DIM, build_pooling


def head_cost(backbone, head: str, image_size: int, classes: int, device: torch.device) -> dict:
    """One head on one built backbone: its cost, or why build_model would refuse it (its vector too large)."""
    pooling = build_pooling(ModelConfig(pooling=head), backbone.channels, None, backbone.nonnegative)
    if pooling.output_dim > MAX_POOLED_DIM:
        return {"refused": f"a {pooling.output_dim:,}-d vector is over MAX_POOLED_DIM ({MAX_POOLED_DIM:,})",
                "vector_size": pooling.output_dim}
    # The classifier is allocated, not initialised: its values change no count, and filling a 1M-d vector's
    # classifier (840 MB for 200 classes) would take most of the bench's time.
    with torch.device("meta"):
        model = BilinearCNN(backbone.module, pooling, classes)
    model.classifier.to_empty(device="cpu")
    return model_cost(model.to(device), image_size, device)


def run_cost(settings: Settings) -> dict:
    families = {}
    for name in FAMILIES:
        # Built on the meta device and given uninitialised memory: a count reads no value, and random init of the
        # large families (ResNet-152, DenseNet-201, ConvNeXt-B) took most of the bench's time.
        with torch.device("meta"):
            backbone = build_backbone(name, "none", "auto", settings.image_size)
        backbone.module.to_empty(device="cpu")
        problem = input_size_problem(name, backbone, settings.image_size)
        families[name] = {head: {"refused": problem} if problem else
                          head_cost(backbone, head, settings.image_size, settings.classes, settings.device)
                          for head in HEADS}
    return {
        "device": settings.device.type,
        "torch": torch.__version__,
        "image_size": settings.image_size,
        "classes": settings.classes,
        "families": families,
        "command": (f"python -m bcnn.bench --cost --device {settings.device.type} --image-size {settings.image_size} "
                    f"--classes {settings.classes}"),
    }
