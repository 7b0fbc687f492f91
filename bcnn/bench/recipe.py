"""The whole recipe's wall time at CUB's scale: `python -m bcnn.bench --recipe`. Prints figures, asserts nothing.

It writes a CUB-layout dataset of photo-like JPEGs (1/f-spectrum colour noise, about 500 x 375 px and 45-60 KB,
so that decoding costs what CUB's photos cost; the stripes of `bcnn.data synth` decode much faster), then times
on it, with random VGG16 weights (nothing is downloaded):

    stage1_live_epoch    one stage-1 epoch over the train images, loader included (workers start in it, as in a
                         real run's first epoch)
    cache_build          the stage-1 feature cache of the train images (center + flip) and of the val images
    stage1_cached_epoch  one epoch of the classifier on the cached train rows (its second: the first one pays for
                         nothing extra, but this keeps one-off costs out)
    stage2_epoch         one stage-2 epoch, everything trainable
    val_eval, test_eval  evaluate() over the val and the test images
and beside each epoch the step alone (bcnn.bench's stage1_step, stage2_step, eval on device-resident random
batches): an epoch's images/s over its step's is the share of the time the step is the limit (on a GPU: how busy
the loader keeps it). From the measured rates it projects the full recipe at CUB's size (5,394 train, 600 val,
5,794 test images): stage 1 (cache + 55 cached epochs, each with its val pass), stage 2 (25 epochs + val
passes) and the test evaluation.

    python -m bcnn.bench --recipe --device cuda                  # CUB's size, 448 px, batch 64
    python -m bcnn.bench --recipe --recipe-images 48             # a CPU: fewer images, the same projection
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bcnn.bench.probes import _sync, device_name
from bcnn.bench.settings import Settings
from bcnn.bench.steps import CACHE_VIEWS, measure_eval, measure_train_step, new_model, stage_config
from bcnn.config import DataConfig
from bcnn.data import build_dataset, build_image_loader, decode_on_device
from bcnn.engine import TrainingDiverged, evaluate, train_one_epoch
from bcnn.errors import UserError
from bcnn.feature_cache import build_feature_cache, feature_loader
from bcnn.models.backbones import vgg16_features
from bcnn.optim import build_optimizer
from bcnn.precision import configure_device, grad_scaler

CUB_IMAGES = {"train": 5394, "val": 600, "test": 5794}  # CUB-200-2011 with the recipe's 10% val hold-out
RECIPE_EPOCHS = {"stage1": 55, "stage2": 25}
PHOTO_SIZE = (500, 375)  # CUB's typical photo, landscape


def photo_like(seed: int, width: int = PHOTO_SIZE[0], height: int = PHOTO_SIZE[1]) -> Image.Image:
    """Colour noise with a natural image's 1/f^a amplitude spectrum (a drawn in 1.45..1.6): JPEG-compresses and
    decodes like a photo (45-60 KB at 500 x 375, quality 90)."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    amplitude = frequency ** -rng.uniform(1.45, 1.6)
    amplitude[0, 0] = 0.0

    def field() -> np.ndarray:
        phases = np.exp(2j * np.pi * rng.random(amplitude.shape))
        values = np.fft.irfft2(amplitude * phases, s=(height, width))
        return values / values.std()

    luminance = field()
    rgb = np.stack([luminance + 0.4 * field() for _ in range(3)], axis=-1)  # correlated channels, as in photos
    low, high = np.percentile(rgb, [1, 99])
    return Image.fromarray((np.clip((rgb - low) / (high - low), 0, 1) * 255).astype(np.uint8))


def _write_photo(task: tuple[int, str, int]) -> int:
    seed, path, side = task
    width, height = (PHOTO_SIZE if side == 0 else (side * 4 // 3, side))
    photo_like(seed, width, height).save(path, quality=90)
    return os.path.getsize(path)


def write_photo_cub(root: Path, trainval: int, test: int, classes: int = 200, side: int = 0,
                    workers: int = 1) -> tuple[Path, float]:
    """A CUB_200_2011 folder of photo-like JPEGs (trainval + test images, classes in turn); side 0: 500 x 375,
    else side x 4/3 side. Returns the folder and the mean file size in KB."""
    root = Path(root)
    classes = max(2, min(classes, trainval // 10))  # CUB has about 30 per class; 10 keep a val image in each
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    tasks = []
    for image_id in range(1, trainval + test + 1):
        label = (image_id - 1) % classes + 1
        folder = f"{label:03d}.Photo_{label}"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        rel_path = f"{folder}/photo_{image_id:05d}.jpg"
        tasks.append((image_id, str(root / "images" / rel_path), side))
        lines["images.txt"].append(f"{image_id} {rel_path}")
        lines["image_class_labels.txt"].append(f"{image_id} {label}")
        lines["train_test_split.txt"].append(f"{image_id} {int(image_id <= trainval)}")
        lines["bounding_boxes.txt"].append(f"{image_id} 0 0 10 10")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            sizes = pool.map(_write_photo, tasks, chunksize=16)
    else:
        sizes = [_write_photo(task) for task in tasks]
    lines["classes.txt"] = [f"{k} {k:03d}.Photo_{k}" for k in range(1, classes + 1)]
    for name, content in lines.items():
        (root / name).write_text("".join(f"{line}\n" for line in content))
    return root, statistics.mean(sizes) / 1e3


def _timed(device: torch.device, function):
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return time.perf_counter() - start, result


def _case(name: str, images: int, seconds: float, step_rate: float | None, what: str) -> dict:
    rate = images / seconds
    return {"case": name, "images": images, "seconds": seconds, "images_per_sec": rate,
            "step_images_per_sec": step_rate, "share_of_step": rate / step_rate if step_rate else None, "what": what}


def project(cases: dict, images: dict = CUB_IMAGES, epochs: dict = RECIPE_EPOCHS) -> dict:
    """Seconds of the full recipe at `images` counts from the measured images/s (cached rows: both views)."""
    rate = {name: case["images_per_sec"] for name, case in cases.items()}
    cache = (images["train"] + images["val"]) / rate["cache_build"]
    cached_epoch = (len(CACHE_VIEWS) * images["train"] + images["val"]) / rate["stage1_cached_epoch"]
    val_pass = images["val"] / rate["val_eval"]
    stage1 = cache + epochs["stage1"] * cached_epoch
    stage1_live = epochs["stage1"] * (images["train"] / rate["stage1_live_epoch"] + val_pass)
    stage2 = epochs["stage2"] * (images["train"] / rate["stage2_epoch"] + val_pass)
    test = images["test"] / rate["test_eval"]
    return {"stage1_cached_seconds": stage1, "stage1_live_seconds": stage1_live, "stage2_seconds": stage2,
            "test_eval_seconds": test, "total_seconds": stage1 + stage2 + test, "images": dict(images),
            "epochs": dict(epochs)}


def run_recipe(settings: Settings, train_images: int, decode: str, photo_side: int) -> dict:
    """Generate the data, time each part of the recipe, project it (see the module docstring)."""
    device, precision, batch = settings.device, settings.precision, settings.batch_size
    configure_device(device)
    backbone = vgg16_features("relu5_3", "none")
    steps = {name: measure_train_step(settings, backbone, name, freeze, precision, True, name)
             for name, freeze in (("stage2_step", False), ("stage1_step", True))}
    steps["eval"] = measure_eval(settings, backbone)
    step_rate = {name: record["images_per_sec"] for name, record in steps.items()}
    # The recipe's proportions: val is 10% of trainval, test about as large as trainval.
    trainval = math.ceil(train_images / 0.9)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cases = {}
    with tempfile.TemporaryDirectory(prefix="bcnn-recipe-") as work:
        start = time.perf_counter()
        root, mean_kb = write_photo_cub(Path(work) / "CUB_200_2011", trainval, trainval, settings.classes,
                                        side=photo_side, workers=cores)
        generation = time.perf_counter() - start
        cfg = DataConfig(root=str(root), resize=settings.image_size, crop=settings.image_size, val_fraction=0.1,
                         num_workers=settings.num_workers, decode=decode)
        train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val", train_transform=False)
        test_set = build_dataset(cfg, "test", train_transform=False)

        def loader(dataset, train):
            return build_image_loader(cfg, dataset, batch, train, seed=0, device=device)

        model = new_model(settings, backbone, freeze_backbone=True, channels_last=True)
        optimizer = build_optimizer(stage_config(freeze_backbone=True), model)
        scaler = grad_scaler(precision, device)

        def epoch_of(step_model, data, step_optimizer, step_precision, channels_last):
            data.sampler.set_epoch(1)
            with contextlib.suppress(TrainingDiverged):  # random weights at a real lr may diverge: speed stays
                train_one_epoch(step_model, data, step_optimizer, device, 1, scaler=scaler, log_every=0,
                                precision=step_precision, channels_last=channels_last)

        train_loader = loader(train_set, True)
        seconds, _ = _timed(device, lambda: epoch_of(model, train_loader, optimizer, precision, True))
        cases["stage1_live_epoch"] = _case("stage1_live_epoch", len(train_set), seconds, step_rate["stage1_step"],
                                           "frozen backbone, the train images through the loader")
        train_loader = None  # shuts its workers down

        views = {split: build_dataset(cfg, split, train_transform=False) for split in ("train", "val")}
        seconds, caches = _timed(device, lambda: {
            split: build_feature_cache(model, views[split], CACHE_VIEWS if split == "train" else ("center",),
                                       Path(work) / "cache", device, precision, batch_size=batch,
                                       num_workers=settings.num_workers, data_cfg=cfg) for split in views})
        cases["cache_build"] = _case("cache_build", len(train_set) + len(val_set), seconds, None,
                                     "the train (center + flip: two forwards) and val (one) features")
        rows = feature_loader(caches["train"], batch, True, seed=0, device=device)
        classifier_optimizer = build_optimizer(stage_config(freeze_backbone=True), model)
        for _ in range(2):
            seconds, _ = _timed(device, lambda: epoch_of(model.classifier, rows, classifier_optimizer, "fp32",
                                                         False))
        cases["stage1_cached_epoch"] = _case("stage1_cached_epoch", len(caches["train"]), seconds, None,
                                             "the classifier on the cached train rows (both views)")

        model = new_model(settings, backbone, freeze_backbone=False, channels_last=True)
        optimizer = build_optimizer(stage_config(freeze_backbone=False), model)
        train_loader = loader(train_set, True)
        seconds, _ = _timed(device, lambda: epoch_of(model, train_loader, optimizer, precision, True))
        cases["stage2_epoch"] = _case("stage2_epoch", len(train_set), seconds, step_rate["stage2_step"],
                                      "everything trains, the train images through the loader")
        train_loader = None  # shuts its workers down
        for name, dataset in (("val_eval", val_set), ("test_eval", test_set)):
            data = loader(dataset, False)
            seconds, _ = _timed(device, lambda: evaluate(model, data, device, settings.classes, precision=precision,
                                                         channels_last=True))
            cases[name] = _case(name, len(dataset), seconds, step_rate["eval"], f"evaluate() over the {name[:-5]} "
                                "images")
    return {
        "command": (f"{settings.command(step_bench=False)} --recipe --recipe-images {train_images} --decode {decode} "
                    f"--photo-side {photo_side}"),
        "device": {"type": device.type, "name": device_name(device)},
        "torch": torch.__version__,
        "image_size": settings.image_size,
        "batch_size": batch,
        "precision": precision,
        "num_workers": settings.num_workers,
        "decode": "batched on " + device.type if decode_on_device(cfg, device) else "PIL in the workers",
        "data": {"train": len(train_set), "val": len(val_set), "test": len(test_set), "mean_jpeg_kb": mean_kb,
                 "generation_seconds": generation},
        "steps": {name: record["images_per_sec"] for name, record in steps.items()},
        "cases": cases,
        "projection": project(cases),
    }


def check_recipe_arguments(train_images: int, photo_side: int) -> None:
    if train_images < 4:
        raise UserError(f"--recipe-images must be at least 4 (one val image per class needs two), got {train_images}.")
    if photo_side and photo_side < 32:
        raise UserError(f"--photo-side must be 0 (500 x 375) or at least 32, got {photo_side}.")
