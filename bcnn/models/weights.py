"""Reading weights into a model: backbone files, checkpoints of bcnn and of other codebases, and messages that
say, in a line, what does not fit and which network a file seems to belong to.

    load_model_weights(model, state_dict)   # strict; strips module./_orig_mod.; renames a public port's keys
    state = read_state_file(path, what)      # a weights file, refused in one sentence when it cannot be one
"""

from __future__ import annotations

import pickle
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from bcnn.checkpoint import check_finite
from bcnn.errors import UserError
from bcnn.paths import not_a_file

# Wrappers that prefix every key of a saved state dict: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The names most public B-CNN ports give the two parts (VGG16 `features`, Linear `fc`), and ours.
PORT_NAMES = (("features.", "backbone."), ("fc.", "classifier."))
# Where training codebases keep the weights inside a checkpoint dict (timm, DeiT, MAE, Lightning, mmcv).
NESTED_KEYS = ("state_dict", "model")


def backbone_file_format(name: str, prefix: str) -> str:
    """What a backbone weights file must hold, in words."""
    if prefix:
        return (f'a state dict of torchvision\'s {name} ("{prefix}..." keys) or of its {prefix.rstrip(".")} part '
                f'alone (the same keys without "{prefix}")')
    return f"a state dict of torchvision's {name} (its state_dict() keys)"


def read_state_file(path: Path, what: str, nested: tuple[str, ...] = NESTED_KEYS) -> dict:
    """The state dict in a weights file (torch.save's, or a .safetensors file), its keys without wrapper prefixes,
    taken out of a checkpoint's entry (the first of `nested` it has) when it holds no tensors itself; refused in one
    sentence (ending in `what`, what the file must hold) when it is not a file, is empty, cannot be read or holds
    no tensors."""
    kind = not_a_file(path)  # one stat, nothing opened: reading a named pipe would wait for a writer forever
    if kind == "missing":
        raise UserError(f"model.backbone_weights file {path} does not exist; give {what}, or use imagenet or none.")
    if kind == "a folder":
        raise UserError(f"model.backbone_weights {path} is a folder; give the file in it that holds {what}, or use "
                        "imagenet or none.")
    if kind is not None and kind.startswith("not readable"):
        raise UserError(f"cannot read model.backbone_weights {path}: it is {kind}; give a file this user can read "
                        f"that holds {what}.")
    if kind is not None:
        raise UserError(f"model.backbone_weights {path} is {kind}, not a file; give a file holding {what}, or use "
                        "imagenet or none.")
    if path.stat().st_size == 0:
        raise UserError(f"model.backbone_weights {path} is empty (0 bytes: a download or copy that did not finish?); "
                        f"give {what}.")
    try:
        state = _load_state(path)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # weights_only names the class it would have had to import
        if not found:
            raise UserError(f"cannot read {path} as a PyTorch state dict ({first_line(err)}); give {what}.") from None
        raise UserError(f"{path} holds objects other than tensors ({found.group(1)}, refused for safety: unpickling "
                        "it could run code), as torch.save(model) writes; save model.state_dict() instead, and give "
                        f"{what}.") from None
    except UserError:
        raise
    except Exception as err:  # unpickling, zip and safetensors errors have no common type
        raise UserError(f"cannot read {path} as a PyTorch state dict ({first_line(err)}); give {what}.") from None
    if isinstance(state, dict) and not _tensors(state):
        inside = next((state[key] for key in nested if isinstance(state.get(key), dict)), None)
        state = state if inside is None else inside
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; give {what}.")
    if not _tensors(state):
        entries = ", ".join(map(str, list(state)[:3])) or "none"
        raise UserError(f"{path} holds no tensors (its entries: {entries}), so no weights; give {what}.")
    check_finite(state, f"model.backbone_weights {path}")
    return strip_wrapper_prefixes(state)


def _load_state(path: Path):
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"reading {path} needs safetensors: pip install safetensors, or give the weights as a "
                            "torch.save file.") from None
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def first_line(error: Exception) -> str:
    """torch's load errors run to many lines of advice about weights_only; the first says what happened."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(". ")[:200] if lines else type(error).__name__


def _tensors(state: dict) -> list:
    return [value for value in state.values() if isinstance(value, torch.Tensor)]


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Keys without DataParallel/DDP's and torch.compile's prefixes, in either order."""
    prefix_pattern = "^(?:" + "|".join(re.escape(prefix) for prefix in WRAPPER_PREFIXES) + ")+"
    return {re.sub(prefix_pattern, "", key): value for key, value in state_dict.items()}


def describe_mismatch(module: nn.Module | dict, state_dict: dict, limit: int = 3) -> str:
    """A short account of keys missing, unexpected or of another shape, each with its count and its first `limit`
    keys; "" when the state dict fits exactly. module: the model, or its state dict (shapes are all it reads)."""
    expected = module if isinstance(module, dict) else module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)} expected"
                for key, value in state_dict.items()
                if key in expected and getattr(value, "shape", None) != expected[key].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
        if keys:
            more = ", ..." if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def looks_like(state_dict: dict) -> str | None:
    """The network a state dict's keys suggest, for a message ("torchvision's vgg16 (features.N.weight)"); None
    when they suggest none of the families fine-grained work uses."""
    state_dict = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    keys = set(state_dict)

    def count(pattern: str) -> int:  # distinct values of the pattern's group
        return len({match.group(1) for key in keys if (match := re.match(pattern, key))})

    if any(key.startswith("backbone.") for key in keys) and "classifier.weight" in keys:
        return "a whole bcnn model (backbone.*, classifier.weight), which train.init_from starts a run from"
    convs = [key for key in keys if re.fullmatch(r"features\.\d+\.weight", key) and state_dict[key].dim() == 4]
    if convs:
        batch_norm = "_bn" if any(re.fullmatch(r"features\.\d+\.running_mean", key) for key in keys) else ""
        return f"torchvision's vgg{len(convs) + 3}{batch_norm} (features.N.weight)"
    if "conv1.weight" in keys and "layer4.0.conv1.weight" in keys:
        bottleneck = "layer1.0.conv3.weight" in keys
        blocks = sum(count(rf"layer{stage}\.(\d+)\.") for stage in range(1, 5))
        return f"a resnet{blocks * (3 if bottleneck else 2) + 2} (conv1, layer1...layer4: torchvision's or timm's)"
    if any(key.startswith("features.denseblock1.") for key in keys):
        layers = sum(count(rf"features\.denseblock{block}\.denselayer(\d+)\.") for block in range(1, 5))
        return f"torchvision's densenet{2 * layers + 5} (features.denseblockN)"
    if any(re.match(r"features\.\d+\.\d+\.block\.", key) for key in keys):
        return "torchvision's ConvNeXt (features.N.M.block)"
    if "patch_embed.proj.weight" in keys and any(key.startswith("blocks.") for key in keys):
        depth, width = count(r"blocks\.(\d+)\."), state_dict["patch_embed.proj.weight"].shape[0]
        return f"a ViT of {depth} blocks of width {width} (blocks.N: timm's)"
    if any(re.match(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position", key) for key in keys):
        return "a Swin transformer (layers.N.blocks.M: timm's)"
    if any(re.match(r"stages\.\d+\.blocks\.\d+\.conv_dw\.", key) for key in keys):
        return "timm's ConvNeXt (stages.N.blocks.M.conv_dw)"
    return None


def file_problem(path: Path, network: str, mismatch: str, state_dict: dict, what: str) -> str:
    """Why a weights file does not fit a network, in one sentence: what does not fit (describe_mismatch's counts and
    first keys), which network the file's keys suggest, and what to give instead."""
    guess = looks_like(state_dict)
    seems = f"; its keys look like {guess}" if guess else ""
    return f"{path} does not fit {network} ({mismatch}){seems}; give {what}, or use imagenet or none."


def share_from_file(module: nn.Module, state_dict: dict) -> float:
    """The share of a module's weights (counted in values) that a state dict holds: what a non-strict load took from
    it. A weight counts when the file holds a tensor with as many values and the same minimum and maximum, so that
    one renamed, reshaped or transposed by the loader (timm's checkpoint filters) still counts, and one that kept
    its initial values (a key the file lacks) does not."""
    def fingerprint(tensor: torch.Tensor) -> tuple:
        return tensor.numel(), float(tensor.min()), float(tensor.max())

    in_file = Counter(fingerprint(value) for value in _tensors(state_dict)
                      if value.is_floating_point() and value.numel())
    weights = [value for value in module.state_dict().values() if value.is_floating_point() and value.numel()]
    total = sum(value.numel() for value in weights)
    found = sum(value.numel() for value in weights if in_file[fingerprint(value)])
    return found / total if total else 1.0


def load_model_weights(model: nn.Module, state_dict: dict) -> None:
    """Load a BilinearCNN state dict strictly, after stripping DataParallel/DDP and torch.compile prefixes;
    a state dict of a public B-CNN port (`features.N.*` + `fc.*`, as HaoMood/bilinear-cnn saves) is renamed."""
    state_dict = strip_wrapper_prefixes(state_dict)
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
