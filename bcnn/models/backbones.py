"""Backbones: a registry from `model.backbone` to a convolutional feature extractor and what the rest of the
model needs to know about it (its output channels, its stride, the input normalisation its weights expect).

    backbone = build_backbone("resnet50", weights="imagenet", cut="auto")
    backbone.module(images)     # (B, 3, H, W) -> (B, backbone.channels, H / stride, W / stride)

The torchvision families a fine-grained researcher uses, each with its cuts (where the network is cut; "auto" is
the first listed, the usual one), plus `timm:<name>` for any timm network that gives a feature map (timm is an
optional extra: pip install timm), and named timm transformers (ViT, DeiT, DINOv2, EVA-02, CLIP, Swin, Swin-V2) with their
usual weights, built for the crop (bcnn/models/timm_maps.py). Weights: "imagenet" (torchvision's weight enum through torch's hub cache, or
timm's own cache), "none" (random), or a state-dict file (read by bcnn/models/weights.py, which says in a line why a
file does not fit). Nothing outside this module knows which network it is.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from bcnn.errors import UserError
from bcnn.models import timm_maps
from bcnn.models.timm_maps import CUT_PATTERN, build_timm_map
from bcnn.models.weights import (backbone_file_format, describe_mismatch, file_problem, first_line,
                                 read_state_file, share_from_file)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
# The share of a timm network's weights a file must supply: all but what timm resamples for the crop as it loads
# them (position embeddings, relative-position tables: a few percent at most).
TIMM_FILE_SHARE = 0.9
# Where timm's own reader finds the weights in a checkpoint dict, in its order (an exponential average's first).
TIMM_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


@dataclass
class Backbone:
    module: nn.Module
    channels: int  # of the output feature map
    stride: int  # input pixels per output pixel
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Its map never holds a negative value (it ends in a ReLU, or a max-pool of one): the bilinear head then keeps
    # the public ports' sqrt(x + eps) (bcnn/models/pooling.py). False where unknown (timm), which is always safe.
    nonnegative: bool = False


def input_size_problem(name: str, backbone: Backbone, crop: int) -> str | None:
    """Why backbone `name` cannot take data.crop x data.crop images, naming the size it needs; None when it can.
    (A transformer is built for the crop, and refuses one it cannot be built for: timm_maps.size_problem.)"""
    if crop < backbone.stride:
        return (f"data.crop={crop} is too small for model.backbone={name}, whose feature map is 1/{backbone.stride} "
                f"of the image; set data.crop to at least {backbone.stride}.")
    return None


@dataclass(frozen=True)
class Cut:
    channels: int
    stride: int
    take: Callable[[nn.Module], nn.Module]  # the full torchvision model -> the part up to this cut
    nonnegative: bool = True  # the part ends in a ReLU (ConvNeXt's stages end in a residual sum: False)


@dataclass(frozen=True)
class Family:
    """One torchvision network: its builder, its ImageNet weights, its cuts (the first is "auto"), and the prefix
    the cut part's keys carry in a whole model's state dict ("features." for VGG's model.features[:k])."""
    build: Callable[..., nn.Module]
    weights: str  # the torchvision weight enum, e.g. "VGG16_Weights.IMAGENET1K_V1"
    cuts: dict[str, Cut]
    file_prefix: str = ""
    # The family's own random init of the cut part's layers, where building the whole network is costly: the network
    # is then built on the meta device (no memory, no init) and only the part is made real and initialised. VGG's
    # 123M-parameter classifier, which every cut drops, took nine tenths of a build's second.
    init_part: Callable[[nn.Module], None] | None = None


def _vgg(pool5: int) -> dict[str, Cut]:
    """VGG's `features` up to its last ReLU (pool5 dropped, as the B-CNN paper cuts it) or through pool5."""
    last_relu = "relu5_3" if pool5 == 30 else "relu5_4"
    return {last_relu: Cut(512, 16, lambda model: model.features[:pool5]),
            "pool5": Cut(512, 32, lambda model: model.features[: pool5 + 1])}


def _vgg_init(part: nn.Module) -> None:
    """torchvision's VGG init (VGG.__init__), on the convolutions of its features."""
    for module in part.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)


def _resnet_through(last_layer: str) -> Callable[[nn.Module], nn.Module]:
    def take(model: nn.Module) -> nn.Module:
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        names = names[: names.index(last_layer) + 1]
        return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))  # the model's own keys
    return take


def _resnet(expansion: int = 4) -> dict[str, Cut]:
    return {"layer4": Cut(512 * expansion, 32, _resnet_through("layer4")),
            "layer3": Cut(256 * expansion, 16, _resnet_through("layer3"))}


def _densenet(channels: int) -> dict[str, Cut]:
    # torchvision's DenseNet applies a ReLU after features (norm5) in forward(); the cut keeps it.
    return {"features": Cut(channels, 32, lambda model: nn.Sequential(
        OrderedDict(features=model.features, relu=nn.ReLU(inplace=True))))}


def _convnext(widths: tuple[int, int]) -> dict[str, Cut]:
    # model.features: stem, stage 1, downsample, stage 2, downsample, stage 3, downsample, stage 4.
    return {"stage4": Cut(widths[1], 32, lambda model: model.features, nonnegative=False),
            "stage3": Cut(widths[0], 16, lambda model: model.features[:6], nonnegative=False)}


tv = torchvision.models
FAMILIES = {
    "vgg16": Family(tv.vgg16, "VGG16_Weights.IMAGENET1K_V1", _vgg(30), "features.", _vgg_init),
    "vgg19": Family(tv.vgg19, "VGG19_Weights.IMAGENET1K_V1", _vgg(36), "features.", _vgg_init),
    "resnet50": Family(tv.resnet50, "ResNet50_Weights.IMAGENET1K_V2", _resnet()),
    "resnet101": Family(tv.resnet101, "ResNet101_Weights.IMAGENET1K_V2", _resnet()),
    "resnet152": Family(tv.resnet152, "ResNet152_Weights.IMAGENET1K_V2", _resnet()),
    "densenet121": Family(tv.densenet121, "DenseNet121_Weights.IMAGENET1K_V1", _densenet(1024)),
    "densenet201": Family(tv.densenet201, "DenseNet201_Weights.IMAGENET1K_V1", _densenet(1920)),
    "convnext_tiny": Family(tv.convnext_tiny, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", _convnext((384, 768)),
                            "features."),
    "convnext_base": Family(tv.convnext_base, "ConvNeXt_Base_Weights.IMAGENET1K_V1", _convnext((512, 1024)),
                            "features."),
}

# Named timm networks: the transformer families fine-grained work uses, each with its usual pretrained weights (the
# "arch.tag" timm loads for model.backbone_weights=imagenet). Any other is timm:<arch>[.<tag>].
TIMM_FAMILIES = {
    "vit_b16_in21k": "vit_base_patch16_224.orig_in21k",  # ViT-B/16, Google's ImageNet-21k weights (TransFG's)
    "vit_l16_in21k": "vit_large_patch16_224.orig_in21k",  # ViT-L/16, 1,024 channels
    "deit_b16_distilled": "deit_base_distilled_patch16_224.fb_in1k",  # class + distillation tokens
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",  # self-supervised on LVD-142M
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",  # with 4 register tokens
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "eva02_b14_in22k": "eva02_base_patch14_224.mim_in22k",  # EVA-02 masked image modelling on ImageNet-22k
    "clip_vitb16": "vit_base_patch16_clip_224.openai",  # OpenAI CLIP's image tower
    "swin_b_in22k": "swin_base_patch4_window7_224.ms_in22k",  # Swin-B, ImageNet-22k
    "swin_l_in22k": "swin_large_patch4_window12_384.ms_in22k",  # Swin-L, 1,536 channels (HERBS's, PIM's backbone)
    "swinv2_b_in22k": "swinv2_base_window12_192.ms_in22k",  # Swin-V2-B, ImageNet-22k
}
BACKBONE_NAMES = (*FAMILIES, *TIMM_FAMILIES, f"{TIMM_PREFIX}<name>")


def timm_name(name: str) -> str | None:
    """The timm network ("arch" or "arch.tag") behind model.backbone `name`, or None for a torchvision family."""
    if name.startswith(TIMM_PREFIX):
        return name[len(TIMM_PREFIX):]
    return TIMM_FAMILIES.get(name)


def resolve_cut(name: str, cut: str) -> tuple[str, int | None]:
    """(the cut, its stride) for model.backbone `name` and model.cut `cut` ("auto": the family's usual one), checked
    without building anything; the stride of a timm network is None (known once it is built)."""
    if timm_name(name) is not None:
        if not CUT_PATTERN.match(cut):
            raise UserError(f"model.cut for {name} must be auto (its last feature map), block<i> (a transformer's "
                            f"block i) or stage<i> (a stage's map), got {cut!r}.")
        return cut, None
    if name not in FAMILIES:
        raise UserError(f"model.backbone must be one of {', '.join(BACKBONE_NAMES)}, got {name!r}"
                        f"{_backbone_hint(name)}")
    cuts = FAMILIES[name].cuts
    cut = next(iter(cuts)) if cut == "auto" else cut
    if cut not in cuts:
        raise UserError(f"model.cut for {name} must be auto or one of {', '.join(cuts)}, got {cut!r}.")
    return cut, cuts[cut].stride


def _backbone_hint(name: str) -> str:
    """The end of the sentence refusing an unknown model.backbone: the registered names nearest it, or timm's
    network of that name."""
    close = difflib.get_close_matches(name.lower(), [*FAMILIES, *TIMM_FAMILIES], n=3)
    if close:
        return f"; did you mean {_one_of(close)}?"
    if name and importlib.util.find_spec("timm") is not None:
        import timm

        if timm.is_model(name.split(".")[0]):
            return f"; timm's {name} is model.backbone=timm:{name}."
    return "."


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_config(cfg) -> None:
    """Refuse, in one sentence (a UserError), a config the backbone(s) cannot run, before anything is built
    (cfg: bcnn.config.Config; asked by its validate): an unknown name or cut, a crop smaller than the cut's stride
    (a feature map needs at least one pixel: each halving needs 2), stochastic depth on a network without it."""
    for backbone in filter(None, (cfg.model.backbone, cfg.model.backbone_b)):
        cut, stride = resolve_cut(backbone, cfg.model.cut)
        if stride is not None and cfg.data.crop < stride:
            raise UserError(f"data.crop must be at least {stride} for {backbone} cut at {cut} (it halves the image "
                            f"{stride.bit_length() - 1} times), got {cfg.data.crop}.")
    if cfg.model.drop_path_rate and not all(timm_name(name) for name in (cfg.model.backbone, cfg.model.backbone_b)
                                            if name):
        raise UserError(f"model.drop_path_rate (stochastic depth) applies to timm backbones only, and "
                        f"model.backbone is {cfg.model.backbone}; set model.drop_path_rate=0 or pick a timm backbone.")


def build_backbone(name: str, weights: str, cut: str = "auto", input_size: int | None = None,
                   drop_path_rate: float = 0.0) -> Backbone:
    """input_size: data.crop, which a transformer is built for (None: its native size); drop_path_rate: stochastic
    depth, for timm networks that have it (a frozen backbone stays in eval mode: none then)."""
    if timm_name(name) is not None:
        resolve_cut(name, cut)
        return _timm_backbone(name, weights, cut, input_size, drop_path_rate)
    cut, _ = resolve_cut(name, cut)
    family = FAMILIES[name]
    part = family.cuts[cut]
    from_file = weights not in ("imagenet", "none")
    whole = read_state_file(Path(weights), backbone_file_format(name, family.file_prefix)) if from_file else None
    if weights == "imagenet":
        module = part.take(_imagenet_model(name, family))
    elif family.init_part is not None:
        with torch.device("meta"):
            module = part.take(family.build())
        module.to_empty(device="cpu")
        if not from_file:  # a file's weights replace every one of the part's (_load_file refuses one that does not)
            with torch.no_grad():
                family.init_part(module)
    else:
        module = part.take(family.build())
    if from_file:
        _load_file(module, whole, Path(weights), name, family)
    return Backbone(module, part.channels, part.stride, nonnegative=part.nonnegative)


def _load_file(module: nn.Module, whole: dict, path: Path, name: str, family: Family) -> None:
    """whole: the file's state dict (read_state_file), of the whole torchvision model or of the cut part."""
    prefix, state = family.file_prefix, whole
    if prefix and any(key.startswith(prefix) for key in state):  # a whole torchvision model: its features part
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    # Keys outside the cut part (a classifier, later stages) are not needed; every key inside it must fit (a deeper
    # network's extra blocks within it included).
    parts = {part for part, _ in module.named_children()}
    state = {key: value for key, value in state.items() if key.split(".")[0] in parts}
    mismatch = describe_mismatch(module, state)
    if mismatch:
        raise UserError(file_problem(path, f"{name}'s features", mismatch, whole,
                                     backbone_file_format(name, prefix)))
    module.load_state_dict(state)


def _imagenet_model(name: str, family: Family) -> nn.Module:
    enum_name, member = family.weights.split(".")
    imagenet = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return family.build(weights=imagenet)
    except (URLError, OSError, RuntimeError) as err:
        checkpoints_dir = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(
            f"could not load the ImageNet {name} weights ({type(err).__name__}: {err}); place "
            f"{os.path.basename(imagenet.url)} (from {imagenet.url}) in {checkpoints_dir} by hand, "
            f"or set model.backbone_weights=none or to the path of a {name} state dict."
        ) from None


def input_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the images backbone `name`'s weights expect, without building it: ImageNet's for the
    torchvision families, the model's own pretrained config for timm (0.5 for many of its networks)."""
    network = timm_name(name)
    if network is not None:
        config = _timm(network).models.get_pretrained_cfg(network)
        if config is not None:
            return tuple(config.mean), tuple(config.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _timm(name: str):
    """The timm module, once it is known to be installed and to have the network `name` ("arch" or "arch.tag")."""
    try:
        import timm
    except ImportError:
        raise UserError(f"a timm network ({name}) needs timm, an optional extra: pip install timm "
                        "(or pip install -e \".[timm]\").") from None
    arch, tagged, tag = name.partition(".")
    if not arch:
        raise UserError(f"model.backbone=timm:{name} names no timm network; write timm:<name>, e.g. timm:resnet50 "
                        "(timm.list_models() lists them).")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = (f"did you mean {_one_of([f'timm:{close_name}' for close_name in close])}?" if close else
                "pick one that timm.list_models() lists, e.g. timm:resnet50 or timm:vit_base_patch16_224.")
        raise UserError(f"timm has no model {arch!r} (model.backbone=timm:{name}); {hint}")
    if tagged:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # timm's "Invalid pretrained tag"
            raise UserError(_tag_problem(timm, arch, tag)) from None
    return timm


def _tag_problem(timm, arch: str, tag: str) -> str:
    """Why timm:arch.tag is refused, naming a few of the tags timm has weights for."""
    tags = [network.split(".", 1)[1] for network in timm.list_pretrained(f"{arch}.*")]
    if not tags:
        return (f"timm's {arch} has no pretrained tag {tag!r} (it has no pretrained weights at all); write "
                f"model.backbone=timm:{arch} with model.backbone_weights=none or a file.")
    more = f" and {len(tags) - 4} more (timm.list_pretrained('{arch}.*'))" if len(tags) > 4 else ""
    return (f"timm's {arch} has no pretrained tag {tag!r}; its tags are {', '.join(tags[:4])}{more}: write "
            f"model.backbone=timm:{arch}.<tag>, or timm:{arch} for its default, "
            f"{timm.models.get_pretrained_cfg(arch).tag}.")


def _timm_backbone(backbone: str, weights: str, cut: str, input_size: int | None, drop_path_rate: float) -> Backbone:
    name = timm_name(backbone)
    timm = _timm(name)
    options, state = {}, None
    if weights == "imagenet":
        if not timm.models.is_model_pretrained(name):
            raise UserError(f"timm has no pretrained weights for {name} (model.backbone_weights=imagenet); set "
                            "model.backbone_weights=none or to a file, or pick a network timm has weights for "
                            f"(timm.list_pretrained('{name.split('.')[0]}*')).")
        options["pretrained"] = True
    elif weights != "none":
        path = Path(weights)
        # Read here as timm reads it next (an average's weights first), to refuse in one sentence a file that is none.
        state = read_state_file(path, _timm_file_format(name), TIMM_NESTED_KEYS)
        # A network without a classifier (the map never uses one) and a pretrained config that says it has one: timm
        # then drops the file's classifier, whatever its classes (or none), and loads the rest leniently, which the
        # check after the load makes up for.
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(path), "num_classes": 1}, num_classes=0)
    try:
        with _quiet_timm_loader() if state is not None else contextlib.nullcontext():
            built = build_timm_map(timm, backbone, name, options, cut, input_size, drop_path_rate)
    except (RuntimeError, KeyError, ValueError) as err:  # a file that does not fit (timm's filters or its load)
        if state is not None and _timm_mismatch(timm, name, state):
            raise UserError(_timm_file_problem(timm, name, weights, state)) from None
        if not isinstance(err, RuntimeError):
            raise
        # timm's "does not support features_only"
        raise UserError(f"timm could not build {name} as a feature extractor ({first_line(err)}); pick a network "
                        "that gives a feature map or a token grid.") from None
    except (URLError, OSError) as err:
        raise UserError(f"could not load timm's pretrained weights of {name} ({type(err).__name__}: {err}); "
                        f"{_timm_cache_hint(timm, name)}, or set model.backbone_weights=none or to a file.") from None
    # timm loads a file leniently once the classifier is dropped (a missing key is logged, not refused): check that
    # the weights are the file's.
    if state is not None:
        share = share_from_file(built.module, state)
        if share < TIMM_FILE_SHARE:
            raise UserError(_timm_file_problem(timm, name, weights, state, share))
    mean, std = input_normalisation(backbone)
    return Backbone(built.module, channels=built.channels, stride=built.stride, mean=mean, std=std)


@contextlib.contextmanager
def _quiet_timm_loader():
    """timm logs every key a lenient load passes over, thousands of characters for a file of another network; the
    check after the load says what matters in one sentence."""
    logger = logging.getLogger("timm.models._builder")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _timm_file_format(name: str) -> str:
    return f'a state dict of timm\'s {name} (timm.create_model("{name.split(".")[0]}").state_dict() keys)'


def _timm_mismatch(timm, name: str, state: dict) -> str:
    """What of a state dict does not fit timm's network `name` at its native size, by key and shape (its classifier
    aside); the network is built on the meta device: no memory, no time."""
    with torch.device("meta"):
        network = timm.create_model(name.split(".")[0], num_classes=0)
    config = timm.models.get_pretrained_cfg(name) or network.pretrained_cfg
    classifier = (config if isinstance(config, dict) else config.to_dict()).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {key: value for key, value in state.items() if key.rpartition(".")[0] not in classifier}
    return describe_mismatch(network.state_dict(), state)


def _timm_file_problem(timm, name: str, path, state: dict, share: float | None = None) -> str:
    mismatch = _timm_mismatch(timm, name, state)
    took = f"the file holds {share:.0%} of its weights" if share is not None else ""
    detail = "; ".join(filter(None, (took, mismatch)))
    return file_problem(path, f"timm's {name}", detail, state, _timm_file_format(name))


def layer_decay_groups(module: nn.Module, backbone_lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """A backbone's parameters in optimizer groups by depth, for optim.layer_decay < 1: a timm transformer's
    (timm_maps.layer_decay_groups); any other backbone is refused in one sentence."""
    groups = timm_maps.layer_decay_groups(module, backbone_lr, layer_decay, weight_decay)
    if groups is None:
        raise UserError(f"optim.layer_decay={layer_decay} needs a backbone whose blocks timm can group by depth (a "
                        "named transformer or timm:<vit or swin>); set optim.layer_decay=1 for this one.")
    return groups


def _timm_cache_hint(timm, name: str) -> str:
    """Where timm looks for a network's weights offline: the Hugging Face hub cache (HF_HOME), or torch's."""
    config = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(config, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        return (f"download them where there is a network (huggingface-cli download {hub_id}) and copy the "
                f"models--{hub_id.replace('/', '--')} folder into the Hugging Face cache, {HF_HUB_CACHE}")
    return f"put them in torch's hub cache by hand ({Path(torch.hub.get_dir()) / 'checkpoints'})"


def vgg16_features(cut: str = "relu5_3", weights: str = "none") -> nn.Module:
    """torchvision's VGG16 convolutional part, cut at relu5_3 (stride 16, pool5 dropped) or pool5 (stride 32)."""
    return build_backbone("vgg16", weights, cut).module
