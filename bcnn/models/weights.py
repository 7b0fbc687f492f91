"""Reading weights into a model: backbone files, checkpoints of bcnn and of other codebases, and a message that
says what does not fit.

    load_model_weights(model, state_dict)   # strict; strips module./_orig_mod.; renames a public port's keys
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from bcnn.errors import UserError

# Wrappers that prefix every key of a saved state dict: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The names most public B-CNN ports give the two parts (VGG16 `features`, Linear `fc`), and ours.
PORT_NAMES = (("features.", "backbone."), ("fc.", "classifier."))
def backbone_file_format(name: str, prefix: str) -> str:
    """What a backbone weights file must hold, in words."""
    if prefix:
        return (f'a state dict of torchvision\'s {name} ("{prefix}..." keys) or of its {prefix.rstrip(".")} part '
                f'alone (the same keys without "{prefix}")')
    return f"a state dict of torchvision's {name} (its state_dict() keys)"


def read_backbone_file(path: Path, name: str, prefix: str) -> dict:
    """A backbone's weights file, its keys as the cut part names them: a whole torchvision model's state dict has
    its `prefix` stripped (VGG's "features."), keys of the rest (the classifier) are left for the caller to drop."""
    what = backbone_file_format(name, prefix)
    if path.is_dir():
        raise UserError(f"model.backbone_weights {path} is a folder; give the file in it that holds {what}, or use "
                        "imagenet or none.")
    if not path.is_file():
        raise UserError(f"model.backbone_weights file {path} does not exist; give {what}, or use imagenet or none.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and zip errors have no common type
        raise UserError(f"cannot read {path} as a PyTorch state dict ({err}); give {what}.") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; give {what}.")
    if prefix and any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def describe_mismatch(module: nn.Module, state_dict: dict, limit: int = 3) -> str:
    """A short account of keys missing, unexpected or of another shape; "" when the state dict fits exactly."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)} expected"
                for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)):
        if keys:
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def load_model_weights(model: nn.Module, state_dict: dict) -> None:
    """Load a BilinearCNN state dict strictly, after stripping DataParallel/DDP and torch.compile prefixes;
    a state dict of a public B-CNN port (`features.N.*` + `fc.*`, as HaoMood/bilinear-cnn saves) is renamed."""
    prefix_pattern = "^(?:" + "|".join(re.escape(prefix) for prefix in WRAPPER_PREFIXES) + ")+"
    state_dict = {re.sub(prefix_pattern, "", key): value for key, value in state_dict.items()}
    if not any(key.startswith("backbone.") for key in state_dict):
        state_dict = {_port_to_our_name(key): value for key, value in state_dict.items()}
    mismatch = describe_mismatch(model, state_dict)
    if mismatch:
        raise UserError(f"the checkpoint's weights do not fit this model ({mismatch}); check that the checkpoint "
                        "was trained with the same classes and model config.")
    model.load_state_dict(state_dict)


def _port_to_our_name(key: str) -> str:
    for theirs, ours in PORT_NAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key
