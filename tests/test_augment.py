"""timm's per-image augmentations (data.auto_augment, data.random_erasing): each equals timm's own transform as
timm's create_transform builds it, drawn from the same generators; through the loader's workers they are a function
of (seed, epoch, sample index) alone and leave the caller's generators as they were; eval never sees them; a run
with them stopped by Ctrl-C resumes to the uninterrupted run's weights bit for bit; a policy timm cannot build, a
missing timm and the batched GPU decode are one sentence each."""

import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bcnn import train as train_cli
from bcnn.config import DataConfig, load_config
from bcnn.data import (IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_loader, build_transforms,
                       decode_on_device)
from bcnn.data.gpu import DeviceDecodeLoader
from bcnn.errors import Interrupted, UserError
from bcnn.mixing import BatchMixer
from helpers.runs import interrupt_after_first_last_pt, load, rows_without_timing, run_in_process, small_run_args

RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's
POLICIES = [RANDAUGMENT, "augmix-m5-w4-d2", "original", "3a"]  # one of each of timm's builders, and 3a's jitter
AUGMENTED_RUN = [f"--data.auto_augment={RANDAUGMENT}", "--data.random_erasing=0.25"]


def seed_every_generator(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def textured_image(size: int = 32) -> Image.Image:
    """Gradients and noise: every op of the policies (equalize, posterize, shear...) changes some pixels."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size]
    pixels = np.stack([rows * 7, cols * 5, (rows + cols) * 3], axis=-1) + rng.integers(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def timm_reference(policy: str, erasing: float, crop: int):
    """timm's own train transform minus its crop and flip: create_transform's policy (with its hyper-parameters,
    bilinear as we pass) and its ToTensor -> Normalize -> RandomErasing, as DeiT asks for them."""
    from timm.data import create_transform
    from torchvision import transforms as T

    _, policy_part, final = create_transform(crop, is_training=True, auto_augment=policy, interpolation="bilinear",
                                             color_jitter=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                             re_prob=erasing, re_mode="pixel", re_count=1, separate=True)
    return T.Compose([*policy_part.transforms, *final.transforms])


@pytest.mark.parametrize("policy", POLICIES)
def test_the_policy_and_random_erasing_are_timms_own(policy):
    # A crop-sized image with flip off: the recipe's Resize and RandomCrop leave it as it is and draw nothing,
    # so both pipelines see the same image and the same generators' states.
    ours = build_transforms(DataConfig(resize=32, crop=32, hflip=False, auto_augment=policy, random_erasing=0.5),
                            train=True)
    reference, image = timm_reference(policy, 0.5, 32), textured_image()
    plain = build_transforms(DataConfig(resize=32, crop=32, hflip=False), train=True)(image)
    outputs = []
    for seed in range(12):
        seed_every_generator(seed)
        outputs.append(ours(image))
        seed_every_generator(seed)
        assert torch.equal(outputs[-1], reference(image)), f"seed {seed}"
    assert sum(not torch.equal(output, plain) for output in outputs) >= 9, "the policy changes most images"
    assert len({output.sum().item() for output in outputs}) >= 6, "each seed draws its own augmentation"


def epoch_images(dataset, epoch: int, num_workers: int, skip: int = 0) -> dict[int, torch.Tensor]:
    """{sample index: augmented image} of one training epoch as build_loader delivers them, from sample `skip` of
    the epoch's order on (a resume)."""
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=num_workers, seed=3)
    loader.sampler.set_epoch(epoch, skip)
    indices = [index for index, _ in loader.sampler]
    return dict(zip(indices, torch.cat([images for images, _ in loader])))


def test_augmentations_through_the_workers_depend_only_on_seed_epoch_and_sample(mini_cub):
    cfg = DataConfig(root=str(mini_cub), resize=40, crop=32, val_fraction=0.0, auto_augment=RANDAUGMENT,
                     random_erasing=0.5)
    dataset = build_dataset(cfg, "trainval")
    first = epoch_images(dataset, epoch=0, num_workers=2)
    # Other workers draw each sample (one worker, and an epoch resumed after 2 batches): the same images.
    resumed = epoch_images(dataset, epoch=0, num_workers=1, skip=8)
    assert len(resumed) == len(first) - 8
    assert all(torch.equal(first[index], image) for index, image in resumed.items())
    next_epoch = epoch_images(dataset, epoch=1, num_workers=2)
    assert sum(not torch.equal(first[index], next_epoch[index]) for index in first) > len(first) * 0.9


def generator_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def same_states(a, b) -> bool:
    (python_a, numpy_a, torch_a), (python_b, numpy_b, torch_b) = a, b
    same_numpy = all(np.array_equal(x, y) for x, y in zip(numpy_a, numpy_b))
    return python_a == python_b and same_numpy and torch.equal(torch_a, torch_b)


@pytest.mark.parametrize("policy", [*POLICIES, "trivial"])
def test_an_item_is_a_function_of_its_seed_and_leaves_the_callers_generators_alone(mini_cub, policy):
    cfg = DataConfig(root=str(mini_cub), resize=40, crop=32, val_fraction=0.0, auto_augment=policy,
                     random_erasing=0.5)
    dataset = build_dataset(cfg, "trainval")
    seed_every_generator(1)
    before = generator_states()
    image = dataset[(0, 123)][0]
    assert same_states(generator_states(), before)
    seed_every_generator(2)  # another state in the caller: the same item
    assert torch.equal(dataset[(0, 123)][0], image)
    assert not torch.equal(dataset[(0, 124)][0], image)


def test_the_eval_transform_ignores_the_augmentation_keys():
    keyed = DataConfig(resize=40, crop=32, auto_augment=RANDAUGMENT, random_erasing=1.0)
    plain, augmented = build_transforms(DataConfig(resize=40, crop=32), False), build_transforms(keyed, False)
    assert [type(step).__name__ for step in augmented.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    image = textured_image(50)
    assert torch.equal(plain(image), augmented(image))


@pytest.mark.parametrize("policy, message", [
    ("rand-zz", r"data.auto_augment='rand-zz' has a section, 'zz', that timm would skip unread"),
    ("rand-m9x", r"timm cannot build data.auto_augment='rand-m9x' \(invalid literal"),
    ("rand-q5", r"timm cannot build data.auto_augment='rand-q5' \(Unknown RandAugment config section\)"),
    ("augmix-k3", r"timm cannot build data.auto_augment='augmix-k3' \(Unknown AugMix config section\)"),
    ("trivial-m9", r"data.auto_augment='trivial-m9' gives settings to trivial"),
])
def test_a_policy_timm_cannot_build_is_one_sentence_naming_the_key(policy, message):
    with pytest.raises(UserError, match=message) as refused:
        build_transforms(DataConfig(auto_augment=policy), train=True)
    assert str(refused.value).count("; write ") == 1 and str(refused.value).endswith(".")


def test_the_train_cli_refuses_a_policy_timm_cannot_build_in_one_line(mini_cub, tmp_path):
    result = run_in_process(train_cli.main, *small_run_args(mini_cub, tmp_path / "run", "--data.auto_augment=rand-zz"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: data.auto_augment='rand-zz'") and "Traceback" not in result.stderr


@pytest.mark.parametrize("key, value", [("auto_augment", RANDAUGMENT), ("random_erasing", 0.25)])
def test_without_timm_a_key_that_needs_it_says_how_to_install_it(monkeypatch, key, value):
    for module in ("timm", "timm.data", "timm.data.auto_augment", "timm.data.random_erasing"):
        monkeypatch.setitem(sys.modules, module, None)  # import then fails, as without timm
    with pytest.raises(UserError) as refused:
        build_transforms(DataConfig(**{key: value}), train=True)
    assert str(refused.value) == (f"data.{key} needs timm, an optional extra: pip install timm "
                                  "(or pip install -e \".[timm]\").")


@pytest.mark.parametrize("key, value", [("auto_augment", RANDAUGMENT), ("random_erasing", "0.25")])
def test_the_batched_gpu_decode_refuses_them_by_name_and_auto_decodes_on_the_cpu(key, value):
    with pytest.raises(UserError, match=rf"data.decode=gpu .* not data.{key}; set data.decode=cpu"):
        load_config(None, ["--data.decode=gpu", f"--data.{key}={value}"])
    cfg = load_config(None, [f"--data.{key}={value}"]).data
    assert not decode_on_device(DataConfig(**{**vars(cfg), "decode": "auto"}), "cuda")
    with pytest.raises(ValueError, match=f"does not do data.{key}"):
        DeviceDecodeLoader(None, cfg, 4, True, 1, 0, torch.device("cpu"))


# Mixup and CutMix on as well (bcnn/mixing.py, tests/test_mixing.py): one run checks that the whole of MAE's
# fine-tuning augmentation resumes bit for bit.
MIXING = ["--data.mixup=0.8", "--data.cutmix=1.0", "--train.label_smoothing=0.1"]


def test_a_ctrl_c_run_with_the_augmentations_and_mixing_resumes_bit_for_bit(cub_3x13, tmp_path, monkeypatch):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    options = [*AUGMENTED_RUN, *MIXING]
    mixed = []
    real_mix = BatchMixer.__call__
    with monkeypatch.context() as patch:
        patch.setattr(BatchMixer, "__call__", lambda self, *args: mixed.append(args[2:]) or real_mix(self, *args))
        train_cli.main(small_run_args(cub_3x13, whole, *options))
    # every micro-batch was mixed: 3 steps of one micro-batch in each of the 2 epochs, as (epoch, step, position)
    assert mixed == [(epoch, step, 0) for epoch in (1, 2) for step in range(3)]
    interrupt_after_first_last_pt(monkeypatch)
    with pytest.raises(Interrupted, match="stopped training"):
        train_cli.main(small_run_args(cub_3x13, stopped, *options))
    at_stop = load(stopped / "last.pt")
    assert (at_stop["epoch"], at_stop["step_in_epoch"]) == (0, 2)  # mid-epoch: the resume skips 2 batches
    train_cli.main(small_run_args(cub_3x13, stopped, *options))
    expected, resumed = load(whole / "last.pt"), load(stopped / "last.pt")
    assert expected["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(expected["model"][key], resumed["model"][key]) for key in expected["model"])
    assert torch.equal(expected["optimizer"]["state"][0]["momentum_buffer"],
                       resumed["optimizer"]["state"][0]["momentum_buffer"])
    assert rows_without_timing(stopped) == rows_without_timing(whole)
