"""timm networks as feature-map backbones at the input size the config asks for: token sequences and channels-last
maps become (B, C, H, W), transformers are built for the crop, and the cut is read from the built network.

    built = build_timm_map("vit_base_patch14_dinov2.lvd142m", pretrained_options, cut="auto", input_size=448)
    built.module(images)   # (B, 3, 448, 448) -> (B, 768, 32, 32): the patch tokens on their grid, prefix tokens dropped

Two kinds of network:
- token networks (ViT, DeiT, DINOv2, EVA-02, CLIP ViT) and windowed ones (Swin, Swin-V2), whose pretrained config
  fixes the input size: built with img_size = the crop (timm resamples the position embeddings of pretrained
  weights as it loads them) and, for windowed ones, the window that tiles every stage's grid, nearest the pretrained
  one (timm resizes the relative-position tables). Their maps come from timm's forward_intermediates, which drops
  the class, distillation and register tokens, lays the patch tokens out on their grid and applies the final norm
  (where it can: Hiera's maps come without).
- every other network (convolutional ones, which take any size): timm's features_only, its map made channels-first
  where timm gives it channels-last.
The cut: "auto" is the last map; block<i> (token networks) or stage<i> (the others) an earlier one, i counted as
timm's out_indices count them.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from bcnn.errors import UserError

CUT_PATTERN = re.compile(r"^(auto|block\d+|stage\d+)$")


@dataclass
class TimmMap:
    module: nn.Module
    channels: int
    stride: int


@dataclass(frozen=True)
class Layout:
    """What a network is, read from an unweighted copy of it built on the meta device (no memory, no time)."""
    cut_names: tuple[str, ...]  # block0..blockN or stage0..stageN, timm's feature indices
    sized: bool  # its pretrained config fixes the input size: built for the crop
    native_size: int
    window: int | None  # a windowed network's pretrained window, else None
    last_stride: int  # the whole network's input pixels per output cell
    final_norm: bool = True  # its forward_intermediates applies the final norm to a map (Hiera's refuses to)


@functools.lru_cache(maxsize=None)  # the same answer for the same name: asked at every build (a meta copy each)
def read_layout(timm, name: str) -> Layout:
    with torch.device("meta"):
        network = timm.create_model(name.split(".")[0], pretrained=False)
    config = timm.models.get_pretrained_cfg(name) or network.pretrained_cfg
    config = config if isinstance(config, dict) else config.to_dict()
    info = network.feature_info
    word = "block" if all(entry["module"].startswith("blocks") for entry in info) else "stage"
    windows = [module.window_size for module in network.modules() if hasattr(module, "window_size")
               and hasattr(module, "shift_size")]
    window = windows[0] if windows else None
    sized, native_size = bool(config.get("fixed_input_size")), config.get("input_size", (3, 224, 224))[-1]
    return Layout(cut_names=tuple(f"{word}{index}" for index in range(len(info))), sized=sized,
                  native_size=native_size,
                  window=None if window is None else int(window[0] if isinstance(window, tuple) else window),
                  last_stride=info[-1]["reduction"],
                  final_norm=not sized or applies_final_norm(network, len(info) - 1, native_size))


def applies_final_norm(network: nn.Module, index: int, size: int) -> bool:
    """Whether the network's forward_intermediates can apply its final norm to a map: most can, Hiera's asserts it
    cannot (which would first show as a traceback in the first training step). Asked of the meta-device copy: no
    computation."""
    if not hasattr(network, "forward_intermediates"):
        return True  # build_timm_map refuses it
    try:
        network.forward_intermediates(torch.zeros(1, 3, size, size, device="meta"), indices=[index], norm=True,
                                      intermediates_only=True)
    except AssertionError:
        return False
    except Exception:  # an operation the meta device lacks: the real forward applies the norm or says why not
        return True
    return True


def size_problem(backbone: str, layout: Layout, crop: int) -> str | None:
    """Why a network built for the crop cannot take crop x crop images; None when it can."""
    cell = layout.last_stride
    if crop % cell == 0 or crop == layout.native_size:  # the size it was made for works, whole cells or not (LeViT)
        return None
    lower, upper = crop // cell * cell, (crop // cell + 1) * cell
    what = "its windows tile" if layout.window else "it cuts the image into"
    sizes = f"{lower} or {upper}" if lower else f"{upper}"
    native = f", or its native {layout.native_size}" if layout.native_size % cell else ""
    return (f"data.crop={crop} does not fit model.backbone={backbone}: {what} whole {cell} x {cell} px cells; set "
            f"data.crop (and data.resize) to {sizes}{native}.")


def window_for(layout: Layout, crop: int) -> int:
    """The window that tiles the last stage's grid (so every stage's, each twice the next), nearest the pretrained
    one (the larger on a tie): timm pads a grid its window does not tile, which pretrained networks never saw."""
    grid = crop // layout.last_stride
    divisors = [size for size in range(1, grid + 1) if grid % size == 0]
    return min(divisors, key=lambda size: (abs(size - layout.window), -size))


def cut_index(backbone: str, layout: Layout, cut: str) -> int:
    if cut == "auto":
        return len(layout.cut_names) - 1
    if cut not in layout.cut_names:
        raise UserError(f"model.cut for {backbone} must be auto or one of {layout.cut_names[0]}..."
                        f"{layout.cut_names[-1]} (timm's feature indices), got {cut!r}.")
    return layout.cut_names.index(cut)


class ChannelsFirst(nn.Module):
    """A timm features_only network (a list of maps) -> its one map, (B, C, H, W) whatever layout timm gives."""

    def __init__(self, network: nn.Module, channels_last: bool):
        super().__init__()
        self.network, self.channels_last = network, channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feature_map = self.network(images)[-1]
        return feature_map.permute(0, 3, 1, 2) if self.channels_last else feature_map


class LastFeatureMap(nn.Module):
    """A timm FeatureGetterNet (forward_intermediates: one NCHW map per index asked) -> its one map."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)[-1]


def build_timm_map(timm, backbone: str, name: str, options: dict, cut: str, input_size: int | None,
                   drop_path_rate: float = 0.0) -> TimmMap:
    """timm's network `name` as a map backbone (backbone: the config's name, for messages). options: create_model's
    weight options (pretrained, pretrained_cfg_overlay); input_size: data.crop (None: the network's native size)."""
    layout = read_layout(timm, name)
    index = cut_index(backbone, layout, cut)
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    if not layout.sized:
        network = timm.create_model(name, features_only=True, out_indices=(index,), **options, **extra)
        channels_last = str(getattr(network, "output_fmt", "NCHW")).endswith("NHWC")
        info = network.feature_info
        return TimmMap(ChannelsFirst(network, channels_last), info.channels()[-1], info.reduction()[-1])
    size = input_size or layout.native_size
    problem = size_problem(backbone, layout, size)
    if problem:
        raise UserError(problem)
    extra["img_size"] = size
    if layout.window:
        extra["window_size"] = window_for(layout, size)
    network = timm.create_model(name, **options, **extra)
    if not hasattr(network, "forward_intermediates"):
        raise UserError(f"timm's {name} cannot give its intermediate maps (no forward_intermediates); pick a ViT, "
                        "Swin or convolutional network, or update timm.")
    from timm.models._features import FeatureGetterNet  # timm's own adapter: prefix tokens dropped, NCHW grid

    getter = FeatureGetterNet(network, out_indices=(index,), output_fmt="NCHW", norm=layout.final_norm)
    return TimmMap(LastFeatureMap(getter), getter.feature_info.channels()[-1], getter.feature_info.reduction()[-1])


def layer_decay_groups(module: nn.Module, backbone_lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """A timm backbone's parameters in groups by depth (timm's param_groups_layer_decay, as BEiT and timm fine-tune):
    the last block's lr is backbone_lr, each block before it layer_decay times the next, the patch embedding the
    smallest; no weight decay on biases, norms and position embeddings (timm's rule with layer decay).
    None for a module that is not a timm transformer built here."""
    network = getattr(getattr(module, "network", None), "model", None)  # LastFeatureMap -> FeatureGetterNet -> net
    if network is None or not hasattr(network, "group_matcher"):
        return None
    from timm.optim import param_groups_layer_decay

    skip = network.no_weight_decay() if hasattr(network, "no_weight_decay") else ()
    groups = param_groups_layer_decay(network, weight_decay=weight_decay, no_weight_decay_list=skip,
                                      layer_decay=layer_decay)
    # Each group's depth from its scale (layer_decay^(blocks above it)), named from the input: backbone_layer0 is
    # the patch embedding; "_no_wd" marks the groups without weight decay.
    above = [round(math.log(group["lr_scale"]) / math.log(layer_decay)) if layer_decay < 1 else 0 for group in groups]
    top = max(above)
    return [{"params": group["params"], "lr": backbone_lr * group["lr_scale"], "weight_decay": group["weight_decay"],
             "name": f"backbone_layer{top - up}{'' if group['weight_decay'] else '_no_wd'}"}
            for up, group in zip(above, groups)]
