"""Backbones: a registry from `model.backbone` to a convolutional feature extractor and what the rest of the
model needs to know about it (its output channels, its stride, the input normalisation its weights expect).

    backbone = build_backbone("vgg16", weights="imagenet", cut="relu5_3")
    backbone.module(images)     # (B, 3, H, W) -> (B, backbone.channels, H / stride, W / stride)

Nothing outside this module knows that a backbone is a VGG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from bcnn.errors import UserError
from bcnn.models.weights import BACKBONE_FILE_FORMAT, describe_mismatch, read_backbone_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Index of pool5 in torchvision's vgg16().features: dropping it leaves relu5_3, the paper's cut.
_VGG16_POOL5_INDEX = 30
VGG16_CUTS = {"relu5_3": (_VGG16_POOL5_INDEX, 16), "pool5": (_VGG16_POOL5_INDEX + 1, 32)}  # (end, stride)


@dataclass
class Backbone:
    module: nn.Sequential
    channels: int  # of the output feature map
    stride: int  # input pixels per output pixel
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def vgg16_features(cut: str = "relu5_3", weights: str = "none") -> nn.Sequential:
    """torchvision's VGG16 convolutional part, cut at relu5_3 (stride 16, pool5 dropped) or pool5 (stride 32).

    weights: "imagenet" (torchvision's IMAGENET1K_V1, from the torch hub cache or downloaded into it),
    "none" (torchvision's random init), or the path of a VGG16 state dict, full ("features.N.weight") or
    features-only ("N.weight").
    """
    if cut not in VGG16_CUTS:
        raise UserError(f"model.cut must be one of {', '.join(VGG16_CUTS)}, got {cut!r}.")
    if weights == "imagenet":
        features = _imagenet_vgg16().features
    elif weights == "none":
        features = torchvision.models.vgg16().features
    else:
        state = read_backbone_file(Path(weights))
        # Every weight is overwritten next, so torchvision's init (seconds, mostly the classifier) is skipped.
        features = torchvision.models.vgg16(init_weights=False).features
        mismatch = describe_mismatch(features, state)
        if mismatch:
            raise UserError(f"{weights} does not fit VGG16's features ({mismatch}); give {BACKBONE_FILE_FORMAT}.")
        features.load_state_dict(state)
    return features[: VGG16_CUTS[cut][0]]


def _imagenet_vgg16() -> nn.Module:
    imagenet = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    try:
        return torchvision.models.vgg16(weights=imagenet)
    except (URLError, OSError, RuntimeError) as err:
        checkpoints_dir = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(
            f"could not load the ImageNet VGG16 weights ({type(err).__name__}: {err}); place "
            f"{os.path.basename(imagenet.url)} (from {imagenet.url}) in {checkpoints_dir} by hand, "
            f"or set model.backbone_weights=none or to the path of a VGG16 state dict."
        ) from None


def build_vgg16(weights: str, cut: str) -> Backbone:
    return Backbone(vgg16_features(cut, weights), channels=512, stride=VGG16_CUTS[cut][1])


BACKBONES = {"vgg16": build_vgg16}


def build_backbone(name: str, weights: str, cut: str) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {name!r}.")
    return BACKBONES[name](weights, cut)
