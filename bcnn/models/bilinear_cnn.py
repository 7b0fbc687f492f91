"""The model: one backbone (or two, for the asymmetric B-CNN), a pooling head, a linear classifier.

    model = build_model(cfg.model, num_classes=200, input_size=448)   # VGG16 to relu5_3, bilinear, for 448-px crops
    vectors = model.embed(images)                      # (B, model.pooling.output_dim), the classifier's input
    logits = model(images)                             # (B, 200)
    optimizer = torch.optim.SGD(model.param_groups(backbone_lr=0.0, classifier_lr=1.0), momentum=0.9)

The pooling and the classifier run in float32 even under autocast, while the backbone, where the time goes, may
run in bf16/fp16.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bcnn.errors import UserError
from bcnn.models.adapt import TRAINS_IN_FROZEN_BACKBONE, adapt_backbone
from bcnn.models.backbones import build_backbone, input_size_problem, layer_decay_groups
from bcnn.models.pooling import HEADS, MAX_CLASSIFIER_PARAMS, MAX_POOLED_DIM, Pooling, build_pooling


class BilinearCNN(nn.Module):
    def __init__(self, backbone: nn.Module, pooling: Pooling, num_classes: int, backbone_b: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.backbone_b = backbone_b
        self.pooling = pooling
        self.classifier = nn.Linear(pooling.output_dim, num_classes)
        # The recipe's init (kaiming normal, fan_in; bias 0), as in the ports that reach 84 %.
        nn.init.kaiming_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.backbone_frozen = False

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, output_dim) float32: the pooled, normalised vector the classifier reads."""
        with torch.no_grad() if self.backbone_fixed_in_training() else contextlib.nullcontext():
            feature_map = self.backbone(images)  # (B, C, h, w)
            feature_map_b = self.backbone_b(images) if self.backbone_b is not None else None
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.pooling(feature_map.float(), None if feature_map_b is None else feature_map_b.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vectors = self.embed(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.classifier(vectors)  # (B, num_classes)

    def backbone_fixed_in_training(self) -> bool:
        """Training with a frozen backbone none of which trains (no model.adapt): nothing flows back into it, so it
        runs without autograd's record. That also keeps grad mode what the val pass has, so torch.compile (which
        guards on it) compiles the backbone once for both, not twice. In eval mode gradients may still be asked of it
        (the heatmaps' attributions reach the input through it)."""
        return self.training and self.backbone_frozen and not any(
            parameter.requires_grad for backbone in self.backbones() for parameter in backbone.parameters())

    def backbones(self) -> list[nn.Module]:
        return [self.backbone] + ([self.backbone_b] if self.backbone_b is not None else [])

    def freeze_backbone(self) -> BilinearCNN:
        """No gradients into the backbone(s), and eval mode for good, so their weights stay bit-identical."""
        self.backbone_frozen = True
        for backbone in self.backbones():
            backbone.requires_grad_(False)
            backbone.eval()
        return self

    def train(self, mode: bool = True) -> BilinearCNN:
        # A frozen backbone is a fixed feature extractor: dropout or batch-norm updates would move it.
        super().train(mode)
        if self.backbone_frozen:
            for backbone in self.backbones():
                backbone.eval()
                for module in backbone.modules():  # what model.adapt trains in it (LoRA's dropout)
                    if getattr(module, TRAINS_IN_FROZEN_BACKBONE, False):
                        module.train(mode)
        return self

    def param_groups(self, backbone_lr: float, classifier_lr: float, layer_decay: float = 1.0,
                     weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups, one lr each: "backbone" (none when frozen) and "classifier", which also
        holds the pooling head's own layers (iSQRT-COV's 1x1 reduction): new layers, trained like the classifier.
        layer_decay < 1: the backbone in groups by depth instead, each with its lr and weight decay
        (bcnn.models.backbones.layer_decay_groups)."""
        groups = []
        backbone_params = [p for backbone in self.backbones() for p in backbone.parameters() if p.requires_grad]
        if backbone_params and layer_decay < 1:
            groups += [group for backbone in self.backbones()
                       for group in layer_decay_groups(backbone, backbone_lr, layer_decay, weight_decay)]
        elif backbone_params:
            groups.append({"params": backbone_params, "lr": backbone_lr, "name": "backbone"})
        head_params = [p for module in (self.pooling, self.classifier) for p in module.parameters() if p.requires_grad]
        if head_params:
            groups.append({"params": head_params, "lr": classifier_lr, "name": "classifier"})
        return groups


def build_model(cfg, num_classes: int, *, input_size: int) -> BilinearCNN:
    """The model the config describes (cfg: bcnn.config.ModelConfig); its backbone(s) frozen when
    cfg.freeze_backbone (stage 1). input_size: the crop it will be fed (data.crop), required: a transformer backbone
    is built for it (its native size would refuse the recipe's 448 px), and a backbone that cannot take it is refused
    in one sentence, so a script on the library builds the model the commands build."""
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights, cfg.cut, input_size, cfg.drop_path_rate)
    backbone_b = (build_backbone(cfg.backbone_b, cfg.backbone_b_weights, cfg.cut, input_size, cfg.drop_path_rate)
                  if cfg.backbone_b else None)
    for name, built in ((cfg.backbone, backbone), (cfg.backbone_b, backbone_b)):
        problem = built and input_size_problem(name, built, input_size)
        if problem:
            raise UserError(problem)
    if backbone_b is not None and (backbone_b.mean, backbone_b.std) != (backbone.mean, backbone.std):
        raise UserError(f"model.backbone_b={cfg.backbone_b} expects images normalised with mean {backbone_b.mean} and "
                        f"std {backbone_b.std}, model.backbone={cfg.backbone} with {backbone.mean} and {backbone.std}; "
                        "the two networks of an asymmetric B-CNN read one input: pick two that agree.")
    nonnegative = backbone.nonnegative and (backbone_b is None or backbone_b.nonnegative)
    pooling = build_pooling(cfg, backbone.channels, backbone_b.channels if backbone_b else None, nonnegative)
    if pooling.output_dim > MAX_POOLED_DIM:
        raise UserError(too_large(cfg, backbone.channels, pooling.output_dim, num_classes))
    if (pooling.output_dim + 1) * num_classes > MAX_CLASSIFIER_PARAMS:
        raise UserError(classifier_too_large(cfg, backbone.channels, pooling.output_dim, num_classes))
    model = BilinearCNN(backbone.module, pooling, num_classes, backbone_b.module if backbone_b else None)
    if cfg.freeze_backbone:
        model.freeze_backbone()
        adapt_backbone(model.backbone, cfg)  # model.adapt: the few tensors that train again
    return model


def classifier_too_large(cfg, channels: int, output_dim: int, num_classes: int) -> str:
    """Why a classifier over many classes (iNaturalist's 10,000) is refused, with the size of each head that fits."""
    params = (output_dim + 1) * num_classes
    fits = []
    if cfg.pooling == "compact":
        fits.append(f"model.compact_dim={MAX_CLASSIFIER_PARAMS // num_classes - 1:,} or less")
    else:
        fits.append(f"model.pooling=compact (model.compact_dim={cfg.compact_dim:,}: "
                    f"{(cfg.compact_dim + 1) * num_classes / 1e6:,.0f}M)")
    reduced = min(cfg.isqrt_reduce_dim or 256, channels)
    if cfg.pooling != "isqrt_cov" or not cfg.isqrt_reduce_dim:
        triangle = reduced * (reduced + 1) // 2
        fits.append(f"model.pooling=isqrt_cov with model.isqrt_reduce_dim={reduced} ({triangle:,}-d: "
                    f"{(triangle + 1) * num_classes / 1e6:,.0f}M)")
    return (f"model.pooling={cfg.pooling} on model.backbone={cfg.backbone} ({channels} channels) gives a "
            f"{output_dim:,}-d vector, and over {num_classes:,} classes a {params / 1e6:,.0f}M-parameter classifier "
            f"({params * 4 / 1e9:.1f} GB of float32 weights, {params * 16 / 1e9:.0f} GB with its gradient and Adam's "
            f"moments), over the {MAX_CLASSIFIER_PARAMS / 1e6:,.0f}M bcnn allows; use "
            f"{' or '.join(fits)}.")


def too_large(cfg, channels: int, output_dim: int, num_classes: int) -> str:
    """Why a head's vector is refused, naming the setting that made it so and a way out that is not that setting:
    the head's own advice (Pooling.too_large), else a head that fits or a cut with fewer channels."""
    size = f"a {output_dim:,}-d vector and a {output_dim * num_classes / 1e6:,.0f}M-parameter classifier"
    return HEADS[cfg.pooling].too_large(cfg, channels, size) or (
        f"model.pooling={cfg.pooling} on model.backbone={cfg.backbone} ({channels} channels at model.cut="
        f"{cfg.cut}) would make {size}; use model.pooling=compact (a {cfg.compact_dim:,}-d sketch), "
        "model.pooling=isqrt_cov (its 1x1 reduction to 256 channels), or a model.cut with fewer channels.")
