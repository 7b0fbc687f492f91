"""A trained model back from its checkpoint: the one way eval, predict and any script of yours load one.

    from bcnn.models.trained import from_checkpoint
    trained = from_checkpoint("runs/cub_vgg16_stage2/best.pt")
    trained.model(trained.transform(image)[None])   # logits over trained.classes; the model is in eval mode
    trained.config.data.crop                          # the run's config, as it trained

The model is built for the crop the run trained at, with every weight from the checkpoint (no ImageNet weights are
read), except after a model.adapt run, whose checkpoint holds what trained: its frozen backbone is rebuilt from
model.backbone_weights and must match the fingerprint the checkpoint carries (bcnn/models/frozen_weights.py). A
checkpoint without the config or class names, with NaN or inf weights, or that does not fit the model its config
describes is refused in one sentence. untrained(cfg, classes) is the model a config describes before any training (a
pretrained backbone's frozen features, scored by bcnn.eval --config). Not re-exported by bcnn.models: it reads
bcnn.config, which itself reads the backbones' and heads' rules from bcnn.models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bcnn.checkpoint import load_checkpoint
from bcnn.config import Config, config_from_dict
from bcnn.data.transforms import build_transforms
from bcnn.errors import UserError
from bcnn.models.backbones import input_normalisation
from bcnn.models.bilinear_cnn import BilinearCNN, build_model
from bcnn.models.frozen_weights import complete_weights, needs_backbone_weights
from bcnn.models.weights import load_model_weights


@dataclass
class TrainedModel:
    model: BilinearCNN  # in eval mode, on the device asked for
    config: Config  # the run's config (model.backbone_weights "none" where every weight came from the checkpoint)
    classes: list[str]  # class names, in the classifier's order
    epoch: int | None  # epochs the run had completed when it wrote the checkpoint
    normalisation: tuple  # (mean, std) the backbone expects
    transform: Callable  # the eval transform: resize, centre crop, to tensor, normalise
    path: Path | None  # the checkpoint; None for untrained()
    global_step: int | None = None  # optimizer steps the run had taken (its TensorBoard curves' x axis)


def from_checkpoint(path: str | Path, device: str | torch.device = "cpu", option: str = "--checkpoint",
                    data_root: str | None = None) -> TrainedModel:
    """The model a bcnn checkpoint (best.pt or last.pt) holds, with what using it needs. option: the command's
    setting that named the file, which an error names; data_root: where the dataset now lives, when it moved."""
    path = Path(path)
    state = load_checkpoint(path, option)
    try:
        cfg = config_from_dict(state["config"])
    except UserError as error:
        raise UserError(f"checkpoint {path}'s config cannot be used: {error}") from None
    if data_root:
        cfg.data.root = data_root
    if not needs_backbone_weights(state):  # every weight comes from the checkpoint
        cfg.model.backbone_weights = cfg.model.backbone_b_weights = "none"
    classes = state["classes"]
    model = build_model(cfg.model, num_classes=len(classes), input_size=cfg.data.crop)
    load_model_weights(model, complete_weights(model, state, f"checkpoint {path}"))
    normalisation = input_normalisation(cfg.model.backbone)
    epoch = state.get("epoch")
    step = state.get("global_step", (state.get("metrics") or {}).get("global_step"))  # last.pt's, or best.pt's row
    return TrainedModel(model=model.to(device).eval(), config=cfg, classes=classes,
                        epoch=epoch if isinstance(epoch, int) else None, normalisation=normalisation,
                        transform=build_transforms(cfg.data, train=False, normalisation=normalisation), path=path,
                        global_step=step if isinstance(step, int) else None)


def untrained(cfg: Config, classes: list[str], device: str | torch.device = "cpu") -> TrainedModel:
    """The model a config describes before any training: the backbone with the weights model.backbone_weights names
    (timm's or torchvision's pretrained ones by default), the head, and an untrained classifier over `classes` that
    no score may read. For scoring a backbone's frozen features (k-NN, retrieval: bcnn.eval --config)."""
    model = build_model(cfg.model, num_classes=len(classes), input_size=cfg.data.crop)
    normalisation = input_normalisation(cfg.model.backbone)
    return TrainedModel(model=model.to(device).eval(), config=cfg, classes=classes, epoch=None,
                        normalisation=normalisation,
                        transform=build_transforms(cfg.data, train=False, normalisation=normalisation), path=None)
