"""Typed run configuration: dataclasses, filled from a YAML file, then from `--section.key=value` overrides.

An experiment is data, not code: stage 1 and stage 2 differ only in their YAML files (which parameters train,
where the weights come from, learning rates, schedule, epochs). Unknown keys and values of the wrong type are
errors, so a typo never silently trains with a default. The rules of a pooling head's options and of a backbone
live beside them (Pooling.option_ranges and check_config in bcnn/models/pooling.py, check_config in
bcnn/models/backbones.py); validate() asks them, and keeps the rules of data, optimizer, schedule and training.

    cfg = load_config("experiments/cub_vgg16_stage1.yaml", ["--optim.lr=0.5", "--train.epochs=3"])
    cfg.optim.lr            # 0.5
    config_to_dict(cfg)     # plain dict, stored in checkpoints and run_dir/config.yaml
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from bcnn.errors import UserError
from bcnn.models.backbones import check_config as check_backbone_config
from bcnn.models.pooling import HEADS


@dataclass
class DataConfig:
    # cub | aircraft (fgvc-aircraft-2013b) | cars (torchvision's stanford_cars) | nabirds | flowers (flowers-102) |
    # dogs (Stanford Dogs) | inat2017 | inat2018 | inat2021 | inat2021_mini (2021 with train_mini; for iNaturalist,
    # test is the official val set) | folder: root/train/<class>/*, root/test/<class>/*. The layouts:
    # bcnn/data/<format>.py (inat.py for the four iNaturalist ones) and data/README.md.
    format: str = "cub"
    root: str = "data/CUB_200_2011"
    # Stratified hold-out from the official train split; 0 = train on all of it. A format with its own val split
    # (aircraft) uses that for any value > 0, and trains on train + val with 0.
    val_fraction: float = 0.1
    split_seed: int = 0  # seeds the val hold-out only, so it stays fixed when train.seed changes
    # all: every class in every split | retrieval: metric learning's class-disjoint protocol, the first half of the
    # classes (CUB 1-100, Cars 1-98) trained on, the second half the test split (bcnn/data/class_split.py)
    class_split: str = "all"
    crop_to_bbox: bool = False  # cub, cars, nabirds, dogs: crop every image to its bounding box before the transform
    annotation_level: str = "variant"  # aircraft only: variant (100 classes) | family (70) | manufacturer (30)
    resize: int = 448  # shorter side, before the crop
    crop: int = 448  # square input size the model sees
    hflip: bool = True
    random_resized_crop: bool = False  # replaces Resize + RandomCrop in training
    rrc_min_scale: float = 0.25
    rotation: float = 0.0  # degrees; 0 = off
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    # Per-image augmentations of fine-tuning recipes (DeiT's, MAE's), timm's own (pip install timm); 0 or "" = off:
    # a timm policy string, rand-m9-mstd0.5-inc1 (RandAugment as DeiT), augmix-m5-w4-d2, original (AutoAugment), or
    # trivial (torchvision's TrivialAugmentWide); applied after the crop and flip, before ToTensor
    auto_augment: str = ""
    random_erasing: float = 0.0  # timm's RandomErasing: probability per image, one box of per-pixel noise (DeiT: 0.25)
    # timm's Mixup / CutMix on each training batch, on either decode path (soft targets; train.label_smoothing is
    # folded into them); 0 = off:
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) (DeiT: 0.8)
    cutmix: float = 0.0  # alpha of CutMix's Beta(alpha, alpha) (DeiT: 1.0)
    mixup_prob: float = 1.0  # the probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # with both on: the probability of CutMix rather than mixup for a batch
    num_workers: int = -1  # loader worker processes per training process; -1 = from the machine's cores
    # Where images are decoded and augmented: cpu (PIL, in the loader workers); gpu (whole batches on the training
    # device, nvjpeg on a GPU: bcnn/data/gpu.py); auto (gpu when training on CUDA). The default stays cpu until the
    # GPU path's speed is measured on a GPU.
    decode: str = "cpu"


@dataclass
class ModelConfig:
    backbone: str = "vgg16"  # vgg16 | vgg19 | resnet50/101/152 | densenet121/201 | convnext_tiny/base | a named
    # transformer (vit_b16_in21k, dinov2_vitb14, eva02_b14_in22k, clip_vitb16, swin_b_in22k, ...) | timm:<name>
    backbone_weights: str = "imagenet"  # "imagenet" (torchvision's or timm's cache/download), "none", or a file
    cut: str = "auto"  # where the backbone is cut: auto = its usual place (vgg16: relu5_3, pool5 dropped, as in
    # the paper; resnet: layer4; ...), or one of its cuts (vgg16: pool5; resnet: layer3): bcnn/models/backbones.py
    pooling: str = "bilinear"  # bilinear | matrix_sqrt | isqrt_cov | compact | avg: HEADS in bcnn/models/pooling.py
    sqrt_eps: float = 1e-5  # sqrt(relu(x) + eps) - sqrt(relu(-x) + eps); sqrt(x + eps) for bilinear on ReLU maps
    # matrix_sqrt: Newton-Schulz iterations; 5 as the authors train and test (cvl-umass/bilinear-cnn README), a root
    # 21% from the exact one on VGG16 relu5_3 maps at 448 px; 20 gives it within 0.03% (docs/pooling.md)
    matrix_sqrt_iterations: int = 5
    isqrt_iterations: int = 5  # isqrt_cov: Newton-Schulz iterations, iSQRT-COV's for VGG16
    isqrt_reduce_dim: int = 256  # isqrt_cov: 1x1 conv + BN + ReLU to this many channels first; 0 = none
    compact_dim: int = 8192  # compact: the tensor sketch's dimension
    backbone_b: str = ""  # asymmetric B-CNN: a second backbone whose map meets the first's; "" = symmetric
    backbone_b_weights: str = "imagenet"  # the second backbone's, as backbone_weights
    freeze_backbone: bool = True  # frozen: no gradients, kept in eval mode, weights bit-identical
    # none | bitfit | lora | vpt_deep: with model.freeze_backbone=true, a few of the backbone's tensors train
    # (optim.backbone_lr): its biases, LoRA's low-rank updates of its linear layers (peft), or prompt tokens in every
    # block; the rest stays frozen and in eval mode (bcnn/models/adapt.py)
    adapt: str = "none"
    lora_rank: int = 8  # lora: r
    lora_alpha: float = 8.0  # lora: the update is scaled by alpha / r
    lora_dropout: float = 0.0  # lora: dropout on the adapted layers' inputs, in training
    lora_targets: str = "qkv"  # lora: the linear layers adapted, by name, comma-separated (timm: qkv, proj, fc1, fc2)
    vpt_prompts: int = 10  # vpt_deep: prompt tokens per block (the VPT authors pick 1 to 200 per dataset on val)
    drop_path_rate: float = 0.0  # stochastic depth of a timm backbone while it trains (0.1 in ViT/Swin fine-tuning)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 1.0  # classifier learning rate
    backbone_lr: float = 0.0  # used only when the backbone trains
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-8
    # Fine-tuning a transformer (each off by default):
    layer_decay: float = 1.0  # backbone block i's lr = backbone_lr * layer_decay^(blocks after it); 1 = off (timm's)
    clip_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this before each step; 0 = off


@dataclass
class ScheduleConfig:
    name: str = "plateau"  # plateau (on val top-1) | step | cosine | none
    factor: float = 0.1  # plateau and step: multiply the lr by this
    patience: int = 3  # plateau: epochs without improvement before the lr drops
    step_size: int = 20  # step: epochs between drops
    # cosine: the classifier's final lr, each other group ending at the same fraction of its own peak (optim.lr's
    # share: MAE scales the floor with each group's lr); plateau: every group's floor
    min_lr: float = 0.0
    unit: str = "epoch"  # epoch: step and cosine change the lr once per epoch; step: cosine at every optimizer step
    # a linear warmup to each group's peak over this many epochs' optimizer steps, then the schedule over the steps
    # that remain (as DeiT, MAE and timm); 0 = off
    warmup_epochs: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 55
    batch_size: int = 64  # global: images per optimizer step, over all processes and accumulation steps
    accum_steps: int = 1  # micro-batches per optimizer step: batch_size / (processes * accum_steps) at once
    eval_batch_size: int = 64  # per process; does not change any result
    seed: int = 0
    init_from: str = ""  # checkpoint whose model weights start this run (stage 2 <- stage 1); "" = none
    run_dir: str = "runs/cub_vgg16_stage1"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # backbone autocast: auto (bf16 where supported, fp16 on older GPUs) | bf16 | fp16 | fp32
    channels_last: bool = True  # NHWC backbone and inputs: the layout fast convolutions want
    compile: bool = False  # torch.compile the backbone (minutes of compiling, then faster steps)
    cache_features: bool = False  # frozen backbone only: bilinear features of each train image and its mirror
    cache_dir: str = "cache/features"  # computed once, reused by every run with the same backbone, size, data
    log_every: int = 20  # optimizer steps between log lines; 0 = one line per epoch
    checkpoint_every: int = 0  # optimizer steps between mid-epoch last.pt writes (long epochs); 0 = per epoch
    label_smoothing: float = 0.0  # the training loss's (the val loss stays plain cross-entropy); 0 = off
    ema_decay: float = 0.0  # an exponential moving average of the weights, updated every step and evaluated on val
    best_of: str = "raw"  # which weights best.pt keeps: raw (the trained ones) or ema (train.ema_decay > 0)
    heatmap_images: int = 8  # TensorBoard: the first N val images with their evidence at each best.pt; 0 = none
    projector: bool = True  # TensorBoard: the val set's embed vectors in the projector at the end of training
    # A linear-probe sweep over the feature cache: {lr: [...], weight_decay: [...]}, a classifier per pair of the
    # product trained side by side on the same batches, best.pt the one best on val (bcnn/probe_grid.py); a list left
    # out is optim.lr's or optim.weight_decay's one value; {} = off
    probe_grid: dict = field(default_factory=dict)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Augmentations only the CPU (PIL) decode path does; data.decode=auto falls back to it when one is on.
CPU_ONLY_AUGMENTATIONS = ("random_resized_crop", "rotation", "color_jitter", "auto_augment", "random_erasing")
# Augmentations that draw a new view of an image each epoch, which a feature cache (one view and its mirror) cannot.
VIEW_AUGMENTATIONS = ("random_resized_crop", "rotation", "color_jitter", "auto_augment", "random_erasing", "mixup",
                      "cutmix")
# The policies data.auto_augment names, by their first dash-separated word (timm's, and torchvision's trivial).
AUTO_AUGMENT_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a", "trivial")

CHOICES = {
    ("data", "format"): ("cub", "aircraft", "cars", "nabirds", "flowers", "dogs", "inat2017", "inat2018", "inat2021",
                         "inat2021_mini", "folder"),
    ("data", "annotation_level"): ("variant", "family", "manufacturer"),
    ("data", "class_split"): ("all", "retrieval"),
    ("data", "decode"): ("cpu", "gpu", "auto"),
    ("model", "adapt"): ("none", "bitfit", "lora", "vpt_deep"),
    ("optim", "name"): ("sgd", "adam", "adamw"),
    ("schedule", "name"): ("plateau", "step", "cosine", "none"),
    ("schedule", "unit"): ("epoch", "step"),
    ("train", "best_of"): ("raw", "ema"),
    ("train", "precision"): ("auto", "bf16", "fp16", "fp32"),
}


# The values each number may take, as intervals (the pooling heads' options: each head's option_ranges): "["
# includes the end, "(" excludes it. A value passes by being inside, not by failing a `value < low` test, because
# NaN fails every comparison (nan < 0 is False); the open end at inf refuses inf.
RANGES = {
    "data.val_fraction": "[0, 1)",
    "model.lora_rank": "[1, inf)",
    "model.lora_alpha": "(0, inf)",
    "model.vpt_prompts": "[1, inf)",
    "model.lora_dropout": "[0, 1)",
    "data.split_seed": "[0, inf)",
    "data.resize": "[1, inf)",
    "data.rrc_min_scale": "(0, 1]",
    "data.rotation": "[0, inf)",
    "data.color_jitter": "[0, inf)",
    "data.num_workers": "[-1, inf)",
    "data.random_erasing": "[0, 1]",
    "data.mixup": "[0, inf)",
    "data.cutmix": "[0, inf)",
    "data.mixup_prob": "[0, 1]",
    "data.mixup_switch_prob": "[0, 1]",
    "optim.lr": "[0, inf)",
    "model.drop_path_rate": "[0, 1)",
    "optim.backbone_lr": "[0, inf)",
    "optim.momentum": "[0, 1)",  # at 1 and above the velocity never decays
    "optim.weight_decay": "[0, inf)",
    "schedule.factor": "(0, 1)",  # multiplies the lr: at 1 or above it never drops
    "schedule.patience": "[0, inf)",
    "schedule.step_size": "[1, inf)",
    "schedule.min_lr": "[0, inf)",
    "schedule.warmup_epochs": "[0, inf)",
    "optim.layer_decay": "(0, 1]",
    "optim.clip_grad_norm": "[0, inf)",
    "train.label_smoothing": "[0, 1)",
    "train.heatmap_images": "[0, inf)",
    "train.ema_decay": "[0, 1)",
    "train.epochs": "[1, inf)",
    "train.batch_size": "[1, inf)",
    "train.accum_steps": "[1, inf)",
    "train.eval_batch_size": "[1, inf)",
    "train.seed": "[0, 4294967295]",  # numpy's global seed is 32-bit
    "train.log_every": "[0, inf)",
    "train.checkpoint_every": "[0, inf)",
}


def choices(section: str, key: str) -> tuple[str, ...] | None:
    """The names a key may take; model.pooling's are the registered heads (bcnn.models.pooling.HEADS)."""
    return tuple(HEADS) if (section, key) == ("model", "pooling") else CHOICES.get((section, key))


def ranges() -> dict[str, str]:
    """Every number's interval: RANGES and each pooling head's option_ranges (an option two heads share, such as
    model.sqrt_eps, must have one range)."""
    merged = dict(RANGES)
    for name, head in HEADS.items():
        for key, interval in head.option_ranges.items():
            if merged.setdefault(key, interval) != interval:
                raise ValueError(f"pooling head {name} gives {key} the range {interval}, another gave {merged[key]}")
    return merged



def _coerce(value: Any, typ: type, where: str) -> Any:
    """Check a value against the field's declared type; strings are parsed (command line, and YAML
    numbers like 1e-5 that PyYAML reads as strings)."""
    if typ is dict:
        return _coerce_lists(value, where)
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        try:
            if typ is bool:
                if text in ("true", "yes", "1", "on"):
                    return True
                if text in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return typ(text)
        except ValueError:
            raise UserError(f"{where} must be of type {typ.__name__}, got {value!r}; fix the value.") from None
    ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(f"{where} must be of type {typ.__name__}, got {value!r}; fix the value.")
    return value


def _coerce_lists(value: Any, where: str) -> dict[str, list[float]]:
    """A mapping of names to lists of numbers (train.probe_grid), from YAML or from the command line written as YAML
    (--train.probe_grid="{lr: [0.1, 0.01]}"); a single number is a list of one, nothing is {}."""
    refusal = UserError(f"{where} must be a mapping of names to lists of numbers, such as {{lr: [0.1, 0.01]}}, got "
                        f"{value!r}; fix the value.")
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise refusal from None
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise refusal
    return {key: [_coerce(number, float, f"{key} in {where}") for number in
                  (numbers if isinstance(numbers, list) else [numbers])] for key, numbers in value.items()}


def _field_types(obj: Any) -> dict[str, type]:
    hints = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in dataclasses.fields(obj)}


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if len(parts) != 2 or parts[0] not in sections:
        raise UserError(
            f"unknown config key {dotted!r} in {source}; keys look like section.name with section one of "
            f"{', '.join(sorted(sections))} (see bcnn/config.py)."
        )
    section = getattr(cfg, parts[0])
    types = _field_types(section)
    if parts[1] not in types:
        raise UserError(
            f"unknown config key {dotted!r} in {source}; known keys of {parts[0]}: {', '.join(types)}."
        )
    value = _coerce(value, types[parts[1]], f"{dotted} ({source})")
    allowed = choices(parts[0], parts[1])
    if allowed and value not in allowed:
        raise UserError(f"{dotted} ({source}) must be one of {', '.join(allowed)}, got {value!r}.")
    setattr(section, parts[1], value)


def apply_dict(cfg: Config, values: dict, source: str) -> Config:
    """Apply a nested {section: {key: value}} dict, as read from YAML or stored in a checkpoint."""
    if not isinstance(values, dict):
        raise UserError(f"{source} must hold a mapping of sections (data, model, optim, ...); fix the file.")
    for section, entries in values.items():
        if not isinstance(entries, dict):
            raise UserError(f"section {section!r} in {source} must be a mapping of key: value; fix the file.")
        for key, value in entries.items():
            _set(cfg, f"{section}.{key}", value, source)
    return cfg


def parse_overrides(args: Iterable[str]) -> list[tuple[str, str]]:
    """`--section.key=value` or `--section.key value` -> [(section.key, value)].

    A value never starts with `--`: an override missing its value must not take the next option as one.
    """
    args = list(args)
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"cannot read argument {arg!r}; overrides look like --section.key=value.")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise UserError(f"override {arg} has no value; write it as {arg}=VALUE.")
        pairs.append((key, value))
        i += 1
    return pairs


class _ConfigFileError(yaml.MarkedYAMLError):
    """What _ConfigLoader refuses; its problem is the message's sentence."""


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load, with a sentence for what it would raise as a bare ValueError (a date-like 2024-13-45)
    and a refusal of what it would silently accept: a key given twice."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except ValueError as e:
            kind = node.tag.rsplit(":", 1)[-1]
            raise _ConfigFileError(
                problem=f"YAML reads {node.value!r} as a {kind} but cannot make one ({e}); quote it if it is a string",
                problem_mark=node.start_mark,
            ) from None

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _ConfigFileError(
                        problem=f"{key_node.value!r} is given twice (also on line {seen[key_node.value] + 1}), and "
                        "YAML would silently keep the last; keep one",
                        problem_mark=key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_undefined(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _ConfigFileError(
            problem=f"the tag {tag} is not allowed, config files hold plain values only (numbers, strings, "
            "true/false); write the value itself",
            problem_mark=node.start_mark,
        )


_ConfigLoader.add_constructor(None, _ConfigLoader.construct_undefined)


def _read_yaml(path: Path) -> Any:
    """The file's values; a file YAML cannot read is one sentence naming the file and the place."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} on line {line}); "
                        "save it as UTF-8, or pass the YAML file you meant.") from None
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        if isinstance(e, _ConfigFileError):
            problem = e.problem
        elif text[mark.index:mark.index + 1] == "\t":
            problem = "a tab, which YAML does not allow there (it indents with spaces only); use spaces"
        else:
            problem = f"this is not valid YAML ({e.problem}); fix the syntax there"
        raise UserError(f"config file {path}, line {mark.line + 1}, column {mark.column + 1}: {problem}.") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise UserError(f"config file {path} holds the control character U+{e.character:04X} on line {line}, which "
                        "YAML does not allow; pass a YAML text file.") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file, then command-line overrides; every value type-checked."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"--config {path} is a folder; pass a YAML file, e.g. one of experiments/*.yaml.")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist; pass one of the files in experiments/.")
        apply_dict(cfg, _read_yaml(path) or {}, str(path))
    for key, value in parse_overrides(overrides):
        _set(cfg, key, value, "command line")
    validate(cfg)
    return cfg


def _check_range(key: str, value: float, interval: str) -> None:
    low_text, high_text = interval[1:-1].split(", ")
    low, high = float(low_text), float(high_text)
    above = low <= value if interval[0] == "[" else low < value
    below = value <= high if interval[-1] == "]" else value < high
    if above and below:
        return
    if high == math.inf:
        allowed = f"at least {low_text}" if interval[0] == "[" else f"greater than {low_text}"
        if isinstance(value, float):
            allowed = f"finite and {allowed}"
    else:
        allowed = f"in {interval}"
    raise UserError(f"{key} must be {allowed}, got {value}.")


def validate(cfg: Config) -> None:
    """Values each of the right type can still be out of range or impossible together; say which and why."""
    for key, interval in ranges().items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), interval)
    check_backbone_config(cfg)  # the backbones' own rules, before anything is built (bcnn/models/backbones.py)
    if cfg.data.crop > cfg.data.resize and not cfg.data.random_resized_crop:
        raise UserError(f"data.crop ({cfg.data.crop}) cannot exceed data.resize ({cfg.data.resize}).")
    if cfg.data.annotation_level != "variant" and cfg.data.format != "aircraft":
        raise UserError(f"data.annotation_level applies to data.format=aircraft only, and data.format is "
                        f"{cfg.data.format}; remove data.annotation_level.")
    off_device = [name for name in CPU_ONLY_AUGMENTATIONS if getattr(cfg.data, name)]
    if cfg.data.decode == "gpu" and off_device:
        raise UserError(f"data.decode=gpu does the recipe's resize, crop and flip only, not data.{off_device[0]}; "
                        "set data.decode=cpu (or auto, which then decodes on the CPU).")
    policy = cfg.data.auto_augment.split("-")[0]
    if cfg.data.auto_augment and policy not in AUTO_AUGMENT_POLICIES:
        raise UserError(f"data.auto_augment must start with one of {', '.join(AUTO_AUGMENT_POLICIES)} (e.g. "
                        f"rand-m9-mstd0.5-inc1, RandAugment as DeiT), got {cfg.data.auto_augment!r}.")
    if cfg.train.cache_features:
        drawn = [name for name in VIEW_AUGMENTATIONS if getattr(cfg.data, name)]
        if drawn:
            raise UserError(f"train.cache_features computes one view of each image (and its mirror) once, and "
                            f"data.{drawn[0]} draws a new one each epoch; turn one of them off.")
    if cfg.schedule.name == "plateau" and cfg.data.val_fraction == 0:
        raise UserError(
            "schedule.name=plateau watches val accuracy but data.val_fraction is 0 (no val split); "
            "use schedule.name=step, cosine or none, or set data.val_fraction > 0."
        )
    if cfg.schedule.name == "plateau" and (cfg.schedule.warmup_epochs or cfg.schedule.unit == "step"):
        raise UserError("schedule.warmup_epochs and schedule.unit=step need a schedule that is a function of the step "
                        "(step, cosine or none), and plateau follows val accuracy; pick one of those, or set "
                        "schedule.warmup_epochs=0 and schedule.unit=epoch.")
    if cfg.train.best_of == "ema" and not cfg.train.ema_decay:
        raise UserError("train.best_of=ema needs train.ema_decay > 0 (0.9998 is common for ViT fine-tuning); set it, "
                        "or train.best_of=raw.")
    if cfg.train.ema_decay and cfg.train.cache_features:
        raise UserError("train.ema_decay averages a fine-tuned model's weights, and train.cache_features trains the "
                        "classifier alone on fixed features; turn one of them off.")
    if cfg.optim.layer_decay < 1 and cfg.model.freeze_backbone:
        raise UserError("optim.layer_decay scales the backbone's learning rates, and model.freeze_backbone=true "
                        "trains none; set model.freeze_backbone=false or optim.layer_decay=1.")
    HEADS[cfg.model.pooling].check_config(cfg)  # the head's own refusals (bcnn/models/pooling.py)
    if cfg.train.cache_features and not cfg.model.freeze_backbone:
        raise UserError("train.cache_features needs model.freeze_backbone=true (a training backbone changes the "
                        "features); turn one of them off.")
    if not cfg.model.freeze_backbone and cfg.optim.backbone_lr == 0:
        raise UserError("model.freeze_backbone is false but optim.backbone_lr is 0; set optim.backbone_lr > 0.")
    if cfg.model.adapt != "none":
        adapted = f"model.adapt={cfg.model.adapt} trains a few of a frozen backbone's tensors"
        if not cfg.model.freeze_backbone:
            raise UserError(f"{adapted}, and model.freeze_backbone=false trains all of them; set "
                            "model.freeze_backbone=true, or model.adapt=none.")
        if cfg.optim.backbone_lr == 0:
            raise UserError(f"{adapted} at optim.backbone_lr, which is 0; set optim.backbone_lr > 0.")
        if cfg.train.cache_features:
            raise UserError(f"{adapted}, so its features change as it trains and cannot be cached; set "
                            "train.cache_features=false, or model.adapt=none.")
        if cfg.model.backbone_b:
            raise UserError(f"{adapted}; with model.backbone_b (two backbones) it is not supported yet: set "
                            "model.adapt=none or model.backbone_b= (empty).")
    lora_keys = [key for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
                 if getattr(cfg.model, key) != getattr(ModelConfig(), key)]
    if lora_keys and cfg.model.adapt != "lora":
        raise UserError(f"model.{lora_keys[0]} applies to model.adapt=lora, and model.adapt is {cfg.model.adapt}; set "
                        f"model.adapt=lora, or remove model.{lora_keys[0]}.")
    if cfg.model.vpt_prompts != ModelConfig().vpt_prompts and cfg.model.adapt != "vpt_deep":
        raise UserError(f"model.vpt_prompts applies to model.adapt=vpt_deep, and model.adapt is {cfg.model.adapt}; set "
                        "model.adapt=vpt_deep, or remove model.vpt_prompts.")
    _check_probe_grid(cfg)


# train.probe_grid's lists: the key each stands in for, and its values' interval (an lr of 0 trains nothing).
PROBE_GRID_LISTS = {"lr": ("optim.lr", "(0, inf)"), "weight_decay": ("optim.weight_decay", "[0, inf)")}
MAX_PROBE_MEMBERS = 64  # each member holds a classifier, its gradient and its optimizer state (3 x 210 MB for CUB's)


def _check_probe_grid(cfg: Config) -> None:
    """The sweep's lists, and what it needs: the feature cache and a val split; each refusal one sentence."""
    grid = cfg.train.probe_grid
    if not grid:
        return
    unknown = [key for key in grid if key not in PROBE_GRID_LISTS]
    if unknown:
        raise UserError(f"train.probe_grid takes the lists lr and weight_decay, got {unknown[0]!r}; rename it or "
                        "remove it.")
    for key, values in grid.items():
        if not values:
            raise UserError(f"train.probe_grid's {key} list is empty; give it a value at least, or leave it out to "
                            f"use {PROBE_GRID_LISTS[key][0]}.")
        for value in values:
            _check_range(f"train.probe_grid's {key}", value, PROBE_GRID_LISTS[key][1])
        twice = next((value for value in values if values.count(value) > 1), None)
        if twice is not None:
            raise UserError(f"train.probe_grid's {key} list holds {twice} twice; list each value once.")
    if "lr" not in grid and cfg.optim.lr == 0:
        raise UserError("train.probe_grid has no lr list, so each member trains at optim.lr, which is 0; give it an "
                        "lr list, or set optim.lr > 0.")
    lrs, decays = len(grid.get("lr", [cfg.optim.lr])), len(grid.get("weight_decay", [cfg.optim.weight_decay]))
    if lrs * decays > MAX_PROBE_MEMBERS:
        raise UserError(f"train.probe_grid has {lrs * decays} members ({lrs} learning rates x {decays} weight "
                        f"decays), more than the {MAX_PROBE_MEMBERS} one sweep trains side by side; shorten a list, "
                        "or split the sweep into several runs.")
    if not cfg.train.cache_features:
        raise UserError("train.probe_grid trains linear classifiers side by side on the feature cache's vectors; set "
                        "train.cache_features=true (a frozen backbone), or remove train.probe_grid.")
    if cfg.data.val_fraction == 0:
        raise UserError("train.probe_grid picks its member on val, and data.val_fraction is 0 (no val split, nothing "
                        "to pick on); set data.val_fraction > 0, or remove train.probe_grid.")
    if cfg.optim.clip_grad_norm:
        raise UserError("optim.clip_grad_norm would clip the norm of all of train.probe_grid's members' gradients "
                        "together, where each member's plain run clips its own; set optim.clip_grad_norm=0, or "
                        "remove train.probe_grid.")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict, source: str = "checkpoint") -> Config:
    cfg = apply_dict(Config(), values, source)
    validate(cfg)
    return cfg
