"""The recipe's transforms: train Resize -> flip -> RandomCrop (or RandomResizedCrop, rotation, colour jitter), then
the optional per-image augmentations of fine-tuning recipes (data.auto_augment, data.random_erasing: timm's own, as
timm's create_transform builds them); eval Resize -> CenterCrop; both normalised with the mean and std the backbone's
weights expect. docs/augmentation.md describes each key."""

from __future__ import annotations

import importlib
import re

from PIL import Image
from torchvision import transforms as T

from bcnn.config import DataConfig
from bcnn.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORMALISATION = (IMAGENET_MEAN, IMAGENET_STD)  # what torchvision's ImageNet weights expect
# What an auto_augment string may look like, for the sentence that refuses one timm cannot build.
POLICY_EXAMPLES = "rand-m9-mstd0.5-inc1 (RandAugment as DeiT), augmix-m5-w4-d2, original (AutoAugment) or trivial"


def build_transforms(cfg: DataConfig, train: bool, normalisation=IMAGENET_NORMALISATION) -> T.Compose:
    """The recipe: train Resize -> flip -> RandomCrop, eval Resize -> CenterCrop; both ToTensor -> Normalize with
    the (mean, std) the backbone's weights expect (bcnn.models.input_normalisation). Training adds
    data.auto_augment's policy after the crop and flip, and data.random_erasing after Normalize, as timm orders
    them; eval never augments."""
    to_tensor = [T.ToTensor(), T.Normalize(*normalisation)]
    if not train:
        return T.Compose([T.Resize(cfg.resize), T.CenterCrop(cfg.crop), *to_tensor])
    if cfg.random_resized_crop:
        steps = [T.RandomResizedCrop(cfg.crop, scale=(cfg.rrc_min_scale, 1.0))]
    else:
        steps = [T.Resize(cfg.resize)]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg.rotation > 0:
        steps.append(T.RandomRotation(cfg.rotation))  # before the crop, so fewer of its black corners remain
    if not cfg.random_resized_crop:
        steps.append(T.RandomCrop(cfg.crop))
    if cfg.auto_augment:
        steps.append(auto_augment(cfg.auto_augment, cfg.crop, normalisation[0]))
    # Jitter after the policy, as timm orders them (timm drops jitter under a policy; here both are the user's).
    if cfg.color_jitter > 0:
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                   saturation=cfg.color_jitter))
    erasing = [random_erasing(cfg.random_erasing)] if cfg.random_erasing > 0 else []
    return T.Compose(steps + to_tensor + erasing)


def auto_augment(policy: str, crop: int, mean) -> object:
    """data.auto_augment's policy for crop x crop PIL images, built as timm's create_transform builds it for its train
    transform at its default interpolation, bilinear (the recipe's Resize uses it too): translations up to 45% of
    the crop, and the pixels an op uncovers filled with the normalisation's mean, which Normalize then makes about 0.
    "trivial" is torchvision's TrivialAugmentWide, given the same interpolation and fill (its own are nearest and
    black)."""
    fill = tuple(min(255, round(255 * value)) for value in mean)
    check_policy_sections(policy)
    if policy == "trivial":
        return T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR, fill=list(fill))
    timm_policies = _import_from_timm("timm.data.auto_augment", "data.auto_augment")
    params = dict(translate_const=int(crop * 0.45), img_mean=fill, interpolation=Image.BILINEAR)
    name = policy.split("-")[0]
    try:
        if name == "rand":
            return timm_policies.rand_augment_transform(policy, params)
        if name == "augmix":
            return timm_policies.augment_and_mix_transform(policy, {**params, "translate_pct": 0.3})
        return timm_policies.auto_augment_transform(policy, params)
    except (AssertionError, ValueError, KeyError) as error:  # timm's parsers assert, or int() / a lookup fails
        raise UserError(f"timm cannot build data.auto_augment={policy!r} ({error}); write one of its policy "
                        f"strings, e.g. {POLICY_EXAMPLES}.") from None


def check_policy_sections(policy: str) -> None:
    """Refuse a section timm would skip without a word: its parsers read a section as letters then a number (m9,
    mstd0.5) and pass over one without a number, so a typo such as rand-zz would train plain RandAugment. RandAugment's
    t<name> (a transform set) is the one section without a number; trivial takes none."""
    name, *sections = policy.split("-")
    if name == "trivial" and sections:
        raise UserError(f"data.auto_augment={policy!r} gives settings to trivial (torchvision's "
                        f"TrivialAugmentWide), which takes none; write trivial alone.")
    for section in sections:
        if not (re.search(r"\d", section) or (name == "rand" and section.startswith("t"))):
            raise UserError(f"data.auto_augment={policy!r} has a section, {section!r}, that timm would skip "
                            f"unread; write one of its policy strings, e.g. {POLICY_EXAMPLES}.")


def random_erasing(probability: float) -> object:
    """timm's RandomErasing as DeiT configures it (re_prob, re_mode='pixel', re_count=1): with this probability, one
    box of the normalised image replaced by normal noise per pixel."""
    erasing = _import_from_timm("timm.data.random_erasing", "data.random_erasing")
    return erasing.RandomErasing(probability, mode="pixel", max_count=1, device="cpu")


def _import_from_timm(module: str, key: str):
    """timm's module, imported only when a key needs it: timm is an optional extra, and slow to import."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{key} needs timm, an optional extra: pip install timm (or pip install -e \".[timm]\").") \
            from None
