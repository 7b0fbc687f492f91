"""--augment: what each training augmentation costs, and whether the loader still keeps up with the step.

On photo-like JPEGs at CUB's typical 500 x 375 (recipe.photo_like), for each augmentation set of the config:
    ms_per_image       the train transform alone (resize, crops, flip, policy, ToTensor, Normalize, erasing) on
                       decoded images, in this process on one thread: the CPU time a loader worker spends on it
    loader_images_per_sec  images/s of the training loader (decode + transform + collate) with the bench's workers
and beside them the stage-2 step's images/s (everything trains, at the same size and batch): a loader rate below
the step's makes the loader the bottleneck. Mixup / CutMix run on each batch on the device (bcnn/mixing.py): their
ms per batch is timed apart. Random VGG16 weights, nothing downloaded; figures only, nothing asserted.

    python -m bcnn.bench --augment --device cuda --image-size 448 --batch-size 64
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from bcnn.bench.probes import _sync, device_name
from bcnn.bench.recipe import write_photo_cub
from bcnn.bench.settings import Settings
from bcnn.bench.steps import measure_train_step
from bcnn.config import Config, DataConfig
from bcnn.data import build_dataset, build_image_loader, build_transforms
from bcnn.mixing import build_mixer
from bcnn.models.backbones import vgg16_features

# Each set: its DataConfig values over the recipe's own (resize, random crop, flip). MAE's is the fine-tuning
# recipes' (experiments/cub_*_stage2.yaml for the transformers).
AUGMENTATION_SETS = {
    "recipe": {},
    "random_resized_crop": {"random_resized_crop": True, "rrc_min_scale": 0.08},
    "rand_augment": {"auto_augment": "rand-m9-mstd0.5-inc1"},
    "trivial_augment": {"auto_augment": "trivial"},
    "random_erasing": {"random_erasing": 0.25},
    "mae_finetune": {"random_resized_crop": True, "rrc_min_scale": 0.08, "auto_augment": "rand-m9-mstd0.5-inc1",
                     "random_erasing": 0.25},
}
IMAGES_PER_SET = 4  # batches through the loader per set, after one untimed batch (the workers' start)


def data_config(root: Path, size: int, workers: int, **values) -> DataConfig:
    return dataclasses.replace(DataConfig(), root=str(root), val_fraction=0.0, resize=size, crop=size,
                               num_workers=workers, **values)


def transform_ms(cfg: DataConfig, images: list[Image.Image]) -> float:
    """Median ms per image of the train transform on decoded images, one thread (a loader worker's share)."""
    transform = build_transforms(cfg, train=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for image in images:
            start = time.perf_counter()
            transform(image)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def loader_rate(cfg: DataConfig, settings: Settings) -> float:
    """Images/s of the training loader over IMAGES_PER_SET batches, after its first (workers starting)."""
    dataset = build_dataset(cfg, "trainval")
    loader = build_image_loader(cfg, dataset, settings.batch_size, train=True, seed=0, device=settings.device)
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(IMAGES_PER_SET):
        next(batches)
    return IMAGES_PER_SET * settings.batch_size / (time.perf_counter() - start)


def mixing_ms(settings: Settings) -> float:
    """Median ms per batch of mixup / CutMix (DeiT's alphas) on a batch on the device."""
    cfg = Config()
    cfg.data.mixup, cfg.data.cutmix = 0.8, 1.0
    mixer = build_mixer(cfg, settings.classes)
    images = torch.randn(settings.batch_size, 3, settings.image_size, settings.image_size, device=settings.device)
    targets = torch.randint(0, settings.classes, (settings.batch_size,), device=settings.device)
    times = []
    for step in range(settings.warmup + settings.steps):
        _sync(settings.device)
        start = time.perf_counter()
        mixer(images.clone(), targets, 1, step, 0)
        _sync(settings.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[settings.warmup:])


def run_augment(settings: Settings) -> dict:
    images_needed = settings.batch_size * (IMAGES_PER_SET + 1)
    with tempfile.TemporaryDirectory(prefix="bcnn_augment_bench_") as folder:
        root, _ = write_photo_cub(Path(folder) / "cub", trainval=images_needed, test=2, classes=10)
        photos = [Image.open(path).convert("RGB") for path, *_ in build_dataset(
            data_config(root, settings.image_size, 0), "trainval").samples[:16]]
        sets = []
        for name, values in AUGMENTATION_SETS.items():
            cfg = data_config(root, settings.image_size, settings.num_workers, **values)
            sets.append({"augmentations": name, "config": values, "ms_per_image": transform_ms(cfg, photos),
                         "loader_images_per_sec": loader_rate(cfg, settings)})
    step = measure_train_step(settings, vgg16_features("relu5_3", "none"), "stage2_step", False, settings.precision,
                              True, "everything trains")
    for row in sets:
        row["loader_over_step"] = row["loader_images_per_sec"] / step["images_per_sec"]
    return {"device": {"name": device_name(settings.device), "type": settings.device.type},
            "image_size": settings.image_size,
            "batch_size": settings.batch_size, "num_workers": settings.num_workers,
            "step_images_per_sec": step["images_per_sec"], "mixup_cutmix_ms_per_batch": mixing_ms(settings),
            "sets": sets, "command": f"{settings.command(step_bench=False)} --augment"}
