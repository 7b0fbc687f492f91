"""data.decode=gpu's batched decode and augmentation (bcnn/data/gpu.py), run on CPU tensors: each JPEG decoder it
may use (TorchCodec's, torchvision's) and the same resize, crop, flip and normalisation code a GPU runs. Against the PIL path (the
reference: torchvision's transforms on PIL images): the same crops and flips from the sampler's seeds, and pixels
within one grey level (measured on these images: at most 1.00 of 255, mean 0.15). On a GPU, nvjpeg's decode may
round differently again; tests/test_gpu.py compares it there (make test-gpu)."""

import logging

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from bcnn import eval as eval_cli
from bcnn import train as train_cli
from bcnn.config import DataConfig, load_config
from bcnn.data import WRITERS, build_dataset, build_loader, build_transforms
from bcnn.data.gpu import DeviceDecodeLoader, train_draws
from bcnn.bench.decoders import jpeg_kinds, pil_decode
from bcnn.data.jpeg import bytes_tensor, decode_jpegs
from bcnn.errors import UserError
from helpers.runs import STAGE1

ONE_GREY_LEVEL = 1.0 + 1e-3  # PIL rounds its fixed-point resize to 8 bits, torch rounds its float one: 1 apart at most


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Generated CUB and Aircraft data at a size where resizing really filters (200 px -> 112)."""
    base = tmp_path_factory.mktemp("photos")
    return {name: WRITERS[name](base / name, classes=3, per_class=6, seed=5, image_size=200)
            for name in ("cub", "aircraft")}


def grey_levels(batch: torch.Tensor, normalisation) -> torch.Tensor:
    """A normalised batch back in 0..255 units."""
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in normalisation)
    return (batch * std + mean) * 255


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoder(request, monkeypatch):
    """Each JPEG decoder the batched path may use: TorchCodec's, and torchvision's (the fallback without it)."""
    if request.param == "torchcodec":
        pytest.importorskip("torchcodec.decoders")
    monkeypatch.setattr("bcnn.data.gpu.default_decoder", lambda: request.param)
    return request.param


@pytest.mark.parametrize("name, train, crop_to_bbox", [
    ("cub", True, False), ("cub", False, False), ("cub", True, True), ("aircraft", True, False)],
    ids=["cub-train", "cub-eval", "cub-boxes", "aircraft-train"])
def test_batches_match_the_pil_path(photos, name, train, crop_to_bbox, decoder):
    cfg = DataConfig(format=name, root=str(photos[name]), resize=112, crop=96, val_fraction=0.0, num_workers=1,
                     crop_to_bbox=crop_to_bbox)
    dataset = build_dataset(cfg, "trainval", train_transform=train)
    reference = build_loader(dataset, 5, train, num_workers=1, seed=3)
    batched = DeviceDecodeLoader(dataset, cfg, 5, train, num_workers=1, seed=3, device=torch.device("cpu"))
    assert batched.decoder == decoder
    assert len(batched) == len(reference) and batched.batch_size == 5
    for loader in (reference, batched):
        if train:
            loader.sampler.set_epoch(2)
    count = 0
    for (expected, labels), (images, batched_labels) in zip(reference, batched):
        assert torch.equal(labels, batched_labels)
        assert images.shape == expected.shape and images.is_contiguous(memory_format=torch.channels_last)
        # Another crop or flip would be tens of levels off on these stripes; rounding is one at most.
        difference = (grey_levels(images, dataset.normalisation) - grey_levels(expected, dataset.normalisation)).abs()
        assert difference.max() <= ONE_GREY_LEVEL
        count += len(images)
    assert count == len(dataset)


def test_the_crop_and_flip_are_those_torchvision_draws_from_the_seed(tmp_path):
    # Pixels that say where they are: red = row, green = column. The resize keeps this image's size (its shorter
    # side is already data.resize), so the crop's top-left pixel gives the crop, and the green order the flip.
    rows, cols = np.mgrid[0:40, 0:60]
    image = Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8))
    cfg = DataConfig(resize=40, crop=32)
    transform = build_transforms(cfg, train=True)
    flips = set()
    for seed in range(40):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = grey_levels(transform(image)[None], ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))[0].round()
        flip, top, left = train_draws(seed, 40, 60, 32, hflip=True)
        assert int(out[0, 0, 0]) == top
        first, last = int(out[1, 0, 0]), int(out[1, 0, -1])
        assert (first > last) == flip
        assert (59 - first if flip else first) == left
        flips.add(flip)
    assert flips == {True, False}


def test_files_the_decoder_refuses_are_decoded_by_pil_and_named_once(photos, tmp_path, caplog):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for k in range(2):
                # Every file its own colour: the reader refuses a test image that is also a train image.
                pixels = np.full((40, 50, 3), 60 * k + (100 if label == "b" else 0) + (20 if split == "test" else 0),
                                 dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{k}.png")  # PNG: decode_jpeg refuses it
    cfg = DataConfig(format="folder", root=str(root), resize=40, crop=32, val_fraction=0.0, num_workers=1)
    dataset = build_dataset(cfg, "test", train_transform=False)
    batched = DeviceDecodeLoader(dataset, cfg, 4, False, num_workers=1, seed=0, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="bcnn"):
        for _ in range(2):
            [(images, _)] = list(batched)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.allclose(images, expected, atol=1e-5)  # flat colours: the two resizes agree exactly
    named = [record.getMessage() for record in caplog.records if "decoded on the CPU" in record.getMessage()]
    assert len(named) == 4, "each refused file is named once, not once per epoch"


def test_torchvision_s_decoder_stands_in_when_torchcodec_cannot_decode(monkeypatch):
    import sys
    import types
    from bcnn.data import jpeg
    pytest.importorskip("torchcodec.decoders")
    jpeg.default_decoder.cache_clear()
    assert jpeg.default_decoder() == "torchcodec"  # installed with the dev extra, and it loads with this torch

    def cannot_load(*args, **kwargs):  # as a TorchCodec built for another torch fails at its first call
        raise RuntimeError("Could not load libtorchcodec.")

    monkeypatch.setitem(sys.modules, "torchcodec.decoders", types.SimpleNamespace(decode_jpeg=cannot_load))
    jpeg.default_decoder.cache_clear()
    try:
        assert jpeg.default_decoder() == "torchvision"
    finally:
        jpeg.default_decoder.cache_clear()


def test_without_any_batched_decoder_decode_gpu_is_one_sentence(photos, monkeypatch):
    monkeypatch.setattr("bcnn.data.gpu.default_decoder", lambda: None)  # no TorchCodec, a torchvision without one
    cfg = DataConfig(root=str(photos["cub"]), resize=112, crop=96, num_workers=1)
    with pytest.raises(UserError) as error:
        DeviceDecodeLoader(build_dataset(cfg, "test"), cfg, 4, False, num_workers=1, seed=0,
                           device=torch.device("cpu"))
    assert str(error.value) == ("data.decode=gpu needs a batched JPEG decoder: TorchCodec (pip install torchcodec, "
                                "the version made for your torch) or a torchvision that still has "
                                "torchvision.io.decode_jpeg; install one, or set data.decode=cpu.")


def test_each_decoder_gives_pil_s_pixels_of_every_kind_of_jpeg(decoder):
    # Baseline and progressive, each chroma subsampling, grayscale and CMYK, an odd size (the JPEGs bcnn.bench
    # --decoders compares): the decoders share libjpeg-turbo's integer IDCT with PIL (measured here: 0 apart on
    # all of them); the bound is the batched path's one grey level, for a CPU whose SIMD code rounds otherwise.
    for name, data in jpeg_kinds().items():
        expected = pil_decode(data)
        [decoded] = decode_jpegs([bytes_tensor(data)], torch.device("cpu"), decoder)
        assert decoded.shape == expected.shape == (3, 75, 101), name
        assert (decoded.int() - expected.int()).abs().max() <= 1, name


def test_a_jpeg_with_an_exif_orientation_is_decoded_as_stored_like_the_pil_path(tmp_path, caplog, decoder):
    # TorchCodec turns an image by its EXIF orientation; bcnn's PIL path and the datasets' boxes take the pixels
    # as stored, so such a file goes to PIL (named in the log) and both paths give the same batch.
    root = tmp_path / "folder"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "turn 90 degrees clockwise to view"
    for split in ("train", "test"):
        for k, label in enumerate(("a", "b")):
            (root / split / label).mkdir(parents=True)
            rows, cols = np.mgrid[0:40, 0:60]
            pixels = np.stack([rows * 6, cols * 4, np.full_like(rows, 90 * k + 40 * (split == "test"))], axis=-1)
            tags = {"exif": exif} if label == "a" else {}
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / "0.jpg", quality=95, **tags)
    turned = root / "test" / "a" / "0.jpg"
    if decoder == "torchcodec":  # what the test guards against: TorchCodec alone gives the turned image
        data = bytes_tensor(turned.read_bytes())
        assert decode_jpegs([data], torch.device("cpu"), decoder)[0].shape == (3, 60, 40)
    cfg = DataConfig(format="folder", root=str(root), resize=40, crop=32, val_fraction=0.0, num_workers=1)
    dataset = build_dataset(cfg, "test", train_transform=False)
    batched = DeviceDecodeLoader(dataset, cfg, 2, False, num_workers=1, seed=0, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="bcnn"):
        [(images, _)] = list(batched)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    difference = (grey_levels(images, dataset.normalisation) - grey_levels(expected, dataset.normalisation)).abs()
    assert difference.max() <= ONE_GREY_LEVEL
    named = [record.getMessage() for record in caplog.records if "decoded on the CPU" in record.getMessage()]
    assert named == [f"decoded on the CPU by PIL (not a JPEG, or one with an EXIF orientation, which TorchCodec "
                     f"would apply): {turned}"]


def test_decode_gpu_refuses_the_augmentations_it_does_not_do():
    with pytest.raises(UserError, match="data.decode=gpu does the recipe's resize, crop and flip only, not "
                                        "data.color_jitter"):
        load_config(STAGE1, ["--data.decode=gpu", "--data.color_jitter=0.2"])
    load_config(STAGE1, ["--data.decode=auto", "--data.color_jitter=0.2"])  # auto then decodes on the CPU


def test_training_on_batched_decode_follows_the_pil_path(cub_3x13, tmp_path):
    """Two epochs with each decode path from the same seed: the same crops, flips and order, inputs within a grey
    level, so the same run up to that rounding (measured: losses 1.6e-6 apart, relative; 1e-4 leaves room for
    other CPUs' rounding)."""
    results = {}
    for decode in ("cpu", "gpu"):
        results[decode] = train_cli.main([
            "--config", STAGE1, f"--data-root={cub_3x13}", f"--run-dir={tmp_path / decode}", "--device=cpu",
            "--data.resize=40", "--data.crop=32", "--data.val_fraction=0.34", "--data.num_workers=1",
            "--model.backbone_weights=none", "--train.batch_size=4", "--train.epochs=2", "--train.log_every=0",
            "--train.precision=fp32", f"--data.decode={decode}"])
    assert "images decoded and augmented in batches on cpu" in (tmp_path / "gpu" / "train.log").read_text()
    for key in ("train_loss", "val_loss"):
        assert results["gpu"][key] == pytest.approx(results["cpu"][key], rel=1e-4)
    # bcnn.eval of a checkpoint trained with data.decode=gpu: the same numbers with a worker as without
    in_workers, alone = (eval_cli.main(["--checkpoint", str(tmp_path / "gpu" / "best.pt"), "--split", "val",
                                        "--device", "cpu", "--no-figures", "--num-workers", workers,
                                        "--output", str(tmp_path / f"eval_{workers}_workers.json")])
                         for workers in ("1", "0"))
    assert in_workers["count"] == results["gpu"]["val_count"]
    assert [in_workers[key] for key in ("top1", "top5", "loss")] == [alone[key] for key in ("top1", "top5", "loss")]
