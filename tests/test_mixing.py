"""Mixup and CutMix of training batches (bcnn/mixing.py): timm's own Mixup, seeded per micro-batch from the run's
seed, checked against timm called directly and against the mixing formula computed here in float64."""

import numpy as np
import pytest
import torch
from timm.data import Mixup

from bcnn.config import load_config
from bcnn.errors import UserError
from bcnn.mixing import build_mixer

CLASSES = 5


def mixer_for(*options, rank=0):
    return build_mixer(load_config(None, list(options)), CLASSES, rank)


def batch(size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, CLASSES, (size,), generator=generator)


def smoothed_one_hot(targets, smoothing):
    off = smoothing / CLASSES
    return torch.full((len(targets), CLASSES), off, dtype=torch.float64).scatter_(
        1, targets[:, None], 1 - smoothing + off)


def test_off_by_default():
    assert mixer_for() is None


def test_the_batch_is_timms_mixup_for_the_seeded_draw_and_numpys_state_is_left_alone():
    mixer = mixer_for("--data.mixup=0.8", "--data.cutmix=1.0", "--train.label_smoothing=0.1", "--train.seed=3")
    images, targets = batch()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    mixed, soft = mixer(images.clone(), targets, epoch=2, step=5, position=1)
    assert np.array_equal(np.random.get_state()[1], before), "the caller's numpy state is put back"
    # the reference: timm's Mixup with DeiT's options, numpy seeded as the docstring says
    np.random.seed(np.random.SeedSequence([3, 2, 5, 1, 0]).generate_state(1)[0])
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=0.1, num_classes=CLASSES)
    expected_images, expected_soft = reference(images.clone(), targets)
    assert torch.equal(mixed, expected_images) and torch.equal(soft, expected_soft)
    torch.testing.assert_close(soft.sum(1), torch.ones(len(soft)), rtol=0, atol=CLASSES * 2**-24)  # float32 sums


@pytest.mark.parametrize("size", [6, 5])  # an epoch's last batch may be odd: its last image is paired with image 0
def test_mixup_is_lambda_times_the_image_plus_the_rest_times_its_partner(size):
    mixer = mixer_for("--data.mixup=0.8", "--train.label_smoothing=0.1")
    images, targets = batch(size)
    mixed, soft = mixer(images.clone(), targets, epoch=1, step=0, position=0)
    assert mixed.shape == images.shape and soft.shape == (size, CLASSES)
    padded = torch.cat([images, images[-1:]]) if size % 2 else images
    padded_targets = torch.cat([targets, targets[-1:]]) if size % 2 else targets
    partner, partner_targets = padded.flip(0)[:size], padded_targets.flip(0)[:size]
    own, other = smoothed_one_hot(targets, 0.1), smoothed_one_hot(partner_targets, 0.1)
    # lambda from the first image's targets: its own class weight is lam * (1 - s + s/C) + (1 - lam) * (s/C) when
    # its partner's class is another (else 1 - s + s/C, and any lambda fits it)
    row = next(i for i in range(size) if targets[i] != partner_targets[i])
    lam = float((soft[row].double() - other[row]) @ (own[row] - other[row]) / ((own[row] - other[row]) ** 2).sum())
    torch.testing.assert_close(soft.double(), lam * own + (1 - lam) * other, rtol=0, atol=1e-6)  # float32 targets
    expected = lam * padded[:size].double() + (1 - lam) * partner.double()
    torch.testing.assert_close(mixed.double(), expected, rtol=0, atol=1e-5)  # float32 images of size ~4: 4 ulp


def test_the_draw_is_a_function_of_seed_epoch_step_micro_batch_and_rank():
    images, targets = batch()
    mix = lambda mixer, *where: mixer(images.clone(), targets, *where)  # noqa: E731
    first, again = mixer_for("--data.cutmix=1.0"), mixer_for("--data.cutmix=1.0")
    assert all(torch.equal(a, b) for a, b in zip(mix(first, 1, 2, 0), mix(again, 1, 2, 0)))
    reference = mix(first, 1, 2, 0)[1]
    for other in (mix(first, 2, 2, 0), mix(first, 1, 3, 0), mix(first, 1, 2, 1),
                  mix(mixer_for("--data.cutmix=1.0", rank=1), 1, 2, 0),
                  mix(mixer_for("--data.cutmix=1.0", "--train.seed=1"), 1, 2, 0)):
        assert not torch.equal(other[1], reference)


def test_mixing_needs_timm_in_one_sentence(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "timm.data", None)  # as if timm were not installed
    with pytest.raises(UserError, match=r"^data.mixup and data.cutmix use timm's Mixup, an optional extra: pip "):
        mixer_for("--data.mixup=0.8")


def test_a_feature_cache_refuses_mixing_in_one_sentence():
    with pytest.raises(UserError, match=r"train.cache_features computes one view .* data.mixup draws a new one"):
        load_config(None, ["--train.cache_features=true", "--data.mixup=0.8"])


# A run that mixes, stopped by Ctrl-C and resumed, ends on the uninterrupted run's weights bit for bit, and mixes
# every micro-batch: tests/test_augment.py (with the per-image augmentations on too, in one run).
