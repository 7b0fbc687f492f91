"""The bilinear CNN of Lin, RoyChowdhury & Maji (ICCV 2015): a VGG16 backbone, bilinear pooling, a linear classifier.

    model = build_model(cfg.model, num_classes=200)   # VGG16 cut at relu5_3, frozen for stage 1
    logits = model(images)                             # (B, 200) from (B, 3, 448, 448)
    optimizer = torch.optim.SGD(model.param_groups(backbone_lr=0.0, classifier_lr=1.0), momentum=0.9)

The head follows the paper: X (B, C, H*W) -> X Xᵀ / (H*W) -> signed square root -> L2 normalisation -> Linear.
It runs in float32 even under autocast: the C*C outer products and the square root near zero lose too much in
half precision, while the backbone, where the time goes, may still run in bf16/fp16.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bcnn.config import ModelConfig
from bcnn.errors import UserError

# Index of pool5 in torchvision's vgg16().features: dropping it leaves relu5_3, the paper's cut.
_VGG16_POOL5_INDEX = 30
_CUTS = {"relu5_3": _VGG16_POOL5_INDEX, "pool5": _VGG16_POOL5_INDEX + 1}
# Wrappers that prefix every key of a saved state dict: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The names most public B-CNN ports give the two parts (VGG16 `features`, Linear `fc`), and ours.
_PORT_NAMES = (("features.", "backbone."), ("fc.", "head.fc."))
_BACKBONE_FILE_FORMAT = (
    'a VGG16 state dict with "features.N.weight" keys (torchvision) or "N.weight" keys (features only)'
)


def signed_sqrt(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """sign(x) * sqrt(|x| + eps); without the eps the gradient at x = 0 is 0 * inf = NaN."""
    return torch.sign(x) * torch.sqrt(torch.abs(x) + eps)


class BilinearPool(nn.Module):
    """(B, C, H, W) -> (B, C*C): the location-averaged outer product of the features with themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = x.float().reshape(batch, channels, height * width)  # (B, C, H*W)
            gram = torch.bmm(features, features.transpose(1, 2)) / (height * width)  # (B, C, C)
        return gram.reshape(batch, channels * channels)  # (B, C*C)


class BilinearHead(nn.Module):
    """Bilinear pooling -> signed sqrt -> L2 normalisation -> Linear, all in float32."""

    def __init__(self, feature_dim: int, num_classes: int, sqrt_eps: float = 1e-5):
        super().__init__()
        self.sqrt_eps = sqrt_eps
        self.pool = BilinearPool()
        self.fc = nn.Linear(feature_dim * feature_dim, num_classes)
        # The recipe's init (kaiming normal, fan_in; bias 0), as in the ports that reach 84 %.
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) feature map -> (B, C*C) normalised bilinear vector, the classifier's input."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(signed_sqrt(self.pool(x), self.sqrt_eps), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # (B, C*C) float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.fc(features.float())  # (B, num_classes)


def vgg16_features(cut: str = "relu5_3", weights: str = "none") -> nn.Sequential:
    """torchvision's VGG16 convolutional part, cut at relu5_3 (stride 16, pool5 dropped) or pool5 (stride 32).

    weights: "imagenet" (torchvision's IMAGENET1K_V1, from the torch hub cache or downloaded into it),
    "none" (torchvision's random init), or the path of a VGG16 state dict, full ("features.N.weight") or
    features-only ("N.weight").
    """
    if cut not in _CUTS:
        raise UserError(f"model.cut must be one of {', '.join(_CUTS)}, got {cut!r}.")
    if weights == "imagenet":
        features = _imagenet_vgg16().features
    elif weights == "none":
        features = torchvision.models.vgg16().features
    else:
        state = _read_backbone_file(Path(weights))
        # Every weight is overwritten next, so torchvision's init (seconds, mostly the classifier) is skipped.
        features = torchvision.models.vgg16(init_weights=False).features
        mismatch = _describe_mismatch(features, state)
        if mismatch:
            raise UserError(f"{weights} does not fit VGG16's features ({mismatch}); give {_BACKBONE_FILE_FORMAT}.")
        features.load_state_dict(state)
    return features[: _CUTS[cut]]


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


def _read_backbone_file(path: Path) -> dict:
    """The features part of a VGG16 state dict file, keyed "N.weight" like vgg16().features."""
    if not path.is_file():
        raise UserError(
            f"model.backbone_weights file {path} does not exist; give {_BACKBONE_FILE_FORMAT}, "
            f"or use imagenet or none."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and zip errors have no common type
        raise UserError(f"cannot read {path} as a PyTorch state dict ({err}); give {_BACKBONE_FILE_FORMAT}.") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; give {_BACKBONE_FILE_FORMAT}.")
    if any(key.startswith("features.") for key in state):
        # A whole torchvision VGG16: the classifier weights are not needed.
        state = {key[len("features.") :]: value for key, value in state.items() if key.startswith("features.")}
    return state


def _describe_mismatch(module: nn.Module, state_dict: dict, limit: int = 3) -> str:
    """A short account of keys missing, unexpected or of another shape; "" when the state dict fits exactly."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [
        f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)} expected"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


class BilinearCNN(nn.Module):
    """A backbone producing a (B, feature_dim, H, W) map, followed by the bilinear head."""

    def __init__(self, num_classes: int, backbone: nn.Sequential, sqrt_eps: float = 1e-5, feature_dim: int = 512):
        super().__init__()
        self.backbone = backbone
        self.head = BilinearHead(feature_dim, num_classes, sqrt_eps)
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 3, H, W) -> (B, C, h, w) -> (B, num_classes)

    def freeze_backbone(self) -> BilinearCNN:
        """No gradients into the backbone, and eval mode for good, so its weights stay bit-identical."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        return self

    def unfreeze_backbone(self) -> BilinearCNN:
        self.backbone_frozen = False
        self.backbone.requires_grad_(True)
        self.backbone.train(self.training)
        return self

    def train(self, mode: bool = True) -> BilinearCNN:
        # A frozen backbone is a fixed feature extractor: dropout or batch-norm updates would move it.
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def param_groups(self, backbone_lr: float, classifier_lr: float) -> list[dict]:
        """Optimizer parameter groups, one lr each; a frozen backbone contributes none."""
        groups = []
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": backbone_lr, "name": "backbone"})
        classifier_params = [p for p in self.head.parameters() if p.requires_grad]
        if classifier_params:
            groups.append({"params": classifier_params, "lr": classifier_lr, "name": "classifier"})
        return groups


def build_model(cfg: ModelConfig, num_classes: int) -> BilinearCNN:
    """VGG16 [D,D] bilinear CNN as the config describes it; frozen for stage 1 when cfg.freeze_backbone."""
    backbone = vgg16_features(cfg.cut, cfg.backbone_weights)
    model = BilinearCNN(num_classes, backbone, sqrt_eps=cfg.sqrt_eps)
    if cfg.freeze_backbone:
        model.freeze_backbone()
    return model


def load_model_weights(model: nn.Module, state_dict: dict) -> None:
    """Load a BilinearCNN state dict strictly, after stripping DataParallel/DDP and torch.compile prefixes;
    a state dict of a public B-CNN port (`features.N.*` + `fc.*`, as HaoMood/bilinear-cnn saves) is renamed."""
    prefix_pattern = "^(?:" + "|".join(re.escape(prefix) for prefix in _WRAPPER_PREFIXES) + ")+"
    state_dict = {re.sub(prefix_pattern, "", key): value for key, value in state_dict.items()}
    if not any(key.startswith("backbone.") for key in state_dict):
        state_dict = {_port_to_our_name(key): value for key, value in state_dict.items()}
    mismatch = _describe_mismatch(model, state_dict)
    if mismatch:
        raise UserError(
            f"the checkpoint's weights do not fit this model ({mismatch}); check that the checkpoint was "
            f"trained with the same classes and model config."
        )
    model.load_state_dict(state_dict)


def _port_to_our_name(key: str) -> str:
    for theirs, ours in _PORT_NAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key
