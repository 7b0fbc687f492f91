"""Where a model looks: the evidence for a class over the backbone's last feature map, for any head and backbone.

The evidence at a position p is the map weighted by the class score's gradient there, summed over channels, its
positive part: relu(sum_c A_c(p) dS/dA_c(p)) (gradient x activation: Grad-CAM without Grad-CAM's averaging of the
gradient over positions). For a bilinear head that average would throw away what makes the head second-order:
before its normalisation the score is sum_p x_p' W x_p / HW, and x_p . dS/dx_p = 2 x_p' W x_p / HW is exactly
position p's term of it. For the average head the two methods agree up to the map's scale at each position.

    maps = class_heatmaps(model, images, classes)   # (B, 3, H, W) normalised images, (B,) class indices
    maps.shape                                      # (B, h, w): the backbone map's grid, float32, >= 0
    upsample(maps, (H, W))                          # on the image, bilinear, each scaled to [0, 1]

The attribution comes from captum (PyTorch's interpretability library: LayerGradientXActivation), an optional
extra with light dependencies (pip install captum, or pip install -e ".[explain]"): it hooks the layer, runs the
model and takes the gradient, which we would otherwise write again; grad-cam (pytorch-grad-cam) would do as well
but brings opencv. The method needs only a differentiable path from the backbone's map to the class score, so every pooling head (bilinear, matrix square root, iSQRT-COV, compact,
average) and every backbone (VGG, ResNet, ConvNeXt, a transformer's token grid) is explained the same way. The
model runs in float32 (no autocast), on whatever device it is; its weights get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bcnn.errors import UserError

INSTALL = 'pip install captum (or pip install -e ".[explain]")'


def require_captum():
    try:
        from captum.attr import LayerGradientXActivation
    except ImportError:
        raise UserError(f"heatmaps need captum, an optional extra: {INSTALL}.") from None
    return LayerGradientXActivation


def class_heatmaps(model, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Each image's evidence for its class over model.backbone's map: (B, 3, H, W), (B,) -> (B, h, w), >= 0."""
    gradient_x_activation = require_captum()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            attributions = gradient_x_activation(model, model.backbone).attribute(
                images.float(), target=classes.to(images.device))  # (B, C, h, w)
    finally:
        model.train(was_training)
    return attributions.detach().float().sum(1).clamp_min(0)  # (B, h, w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) bilinear, each map scaled to [0, 1] by its maximum (an all-zero map stays zero)."""
    resized = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    peak = resized.flatten(1).amax(1).clamp_min(torch.finfo(resized.dtype).tiny).view(-1, 1, 1)
    return resized / peak


def peak_cells(maps: torch.Tensor) -> list[tuple[int, int]]:
    """Each map's (row, column) of its largest value: where it points."""
    width = maps.shape[-1]
    return [divmod(int(index), width) for index in maps.flatten(1).argmax(1)]
