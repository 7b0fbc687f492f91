"""Pooled features of a frozen backbone, computed once and read back from disk (the authors' stage-1 protocol).

With the backbone frozen and a pooling head without trainable layers (bilinear, matrix_sqrt, compact, avg), the
vector model.embed gives a view of an image never changes, so stage 1 can train the Linear classifier from
stored vectors instead of running VGG16 every epoch:

    train_views = build_dataset(cfg.data, "train", train_transform=False,  # eval transform: no random crop
                                normalisation=input_normalisation(cfg.model.backbone))
    cache = build_feature_cache(model, train_views, ("center", "flip"), "cache/features", device, "bf16")
    loader = build_loader(cache, batch_size=64, train=True, num_workers=0, seed=0)
    for features, targets in loader:  # (B, output_dim) float32
        logits = classifier_logits(model, features.to(device))  # == model(that view), up to float16 storage

The datasets must carry the eval transform (Resize -> CenterCrop): a random augmentation would be frozen into
the cache. Views: "center" is that tensor; "flip" is the same tensor mirrored, torch.flip(x, dims=[3]), which is
what the live path (and `evaluate(tta="flip")`) computes. Mirroring the image before its centre crop would
differ by a pixel of crop offset when the resized width minus the crop is odd.

A cache lives in `<cache_root>/<key>/`, the key a digest of everything that determines the vectors (see
`cache_key`): `features.f16` (raw float16, memory-mapped, one row per image view, VIEW-MAJOR: row
`v * num_images + i` is view `views[v]` of image i), `labels.npy` (one label per image) and `meta.json`,
written last. A build goes into `<key>.tmp-<token>/` and is renamed to `<key>` when complete, so a folder
named after a key is always a finished cache; a later run with the same inputs opens it instead of computing.
Under DDP every rank computes its shard of the images into the same file, so cache_root must be a folder all
ranks see (a shared filesystem across nodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from bcnn.config import DataConfig
from bcnn.data import DeviceDecodeLoader, build_loader, decode_on_device
from bcnn.data.loader import worker_errors
from bcnn.sampling import ShardSampler, TrainSampler
from bcnn.distributed import barrier, unwrap
from bcnn.errors import UserError
from bcnn.precision import DTYPES, autocast

log = logging.getLogger("bcnn")

# Part of every key: bump it when the head's maths or the file layout changes, and old caches stop matching.
# 2: pooling heads; the signed square root of 0 is sqrt(eps), as the reference ports. 3: the authors' continuous
# signed square root wherever a head's values can be negative; matrix_sqrt's default of 5 steps.
FORMAT_VERSION = 3
VIEWS = ("center", "flip")
PRECISIONS = ("fp32", *DTYPES)  # the backbone's autocast, as bcnn.precision names it
FEATURES_FILE, LABELS_FILE, META_FILE = "features.f16", "labels.npy", "meta.json"
# Transform steps that draw random numbers: a cache would freeze one draw of them for every epoch.
_RANDOM_STEPS = ("Random", "ColorJitter")


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of a module's state dict (name, dtype, shape, bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes of any dtype, bf16 included
    return digest.hexdigest()


def _describe_dataset(dataset) -> dict:
    return {"type": type(dataset).__name__, "root": getattr(dataset, "root", ""),
            "split": getattr(dataset, "split", ""), "transform": repr(dataset.transform)}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1  # the build itself then fails with load_rgb's clear error


def cache_key(model, dataset, views: tuple[str, ...], precision: str, batched_decode: bool = False) -> str:
    """16 hex digits naming the cache of `views` of `dataset` under `model` at `precision`.

    Covers the backbones' architecture (the cut) and weights, the pooling head (its options and fixed random
    projections), the transform (resize, crop, normalisation), the samples in order (paths, labels and file sizes: a
    replaced image of another size invalidates; one of the very same size does not), bounding boxes when images are
    cropped to them, a banner cut off the bottom (FGVC-Aircraft), the class list, the views and the precision (bf16
    features differ from fp32 ones), and whether the images were decoded in batches on the device (data.decode:
    its rounding differs from PIL's). Another root, split or val hold-out changes the samples, hence the key.
    """
    model = unwrap(model)
    crop_to_bbox = bool(getattr(dataset, "crop_to_bbox", False))
    material = {
        "format": FORMAT_VERSION,
        "backbone": [repr(backbone) for backbone in model.backbones()],
        "weights": [state_fingerprint(backbone) for backbone in model.backbones()],
        "pooling": repr(model.pooling),
        "pooling_state": state_fingerprint(model.pooling),
        "transform": repr(dataset.transform),
        "samples": [[path, label, _file_size(path)] for path, label in dataset.samples],
        "bboxes": [list(box) for box in dataset.bboxes] if crop_to_bbox else None,
        "classes": list(dataset.classes),
        "views": list(views),
        "precision": precision,
    }
    if getattr(dataset, "bottom_crop", 0):  # only where set, so the keys of existing caches stay as they were
        material["bottom_crop"] = dataset.bottom_crop
    if batched_decode:  # likewise
        material["decode"] = "batched"
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache(Dataset):
    """A finished cache folder as a dataset of (feature (D,) float32, label), one item per image view.

    Items are view-major: item `v * num_images + i` is view `views[v]` of image i. An item may be an index or
    the (index, augment_seed) pair TrainSampler yields; the seed is ignored, as the views are fixed.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text(encoding="utf-8"))
        self.views = tuple(self.meta["views"])
        self.num_images, self.feature_dim = self.meta["num_images"], self.meta["feature_dim"]
        self.classes = list(self.meta["classes"])
        self.image_labels = np.load(self.folder / LABELS_FILE)  # (num_images,)
        self.targets = [int(label) for label in np.tile(self.image_labels, len(self.views))]
        self._features = None  # opened on first read, in whichever process (DataLoader worker) reads

    @property
    def features(self) -> np.memmap:
        if self._features is None:
            self._features = np.memmap(self.folder / FEATURES_FILE, dtype=np.float16, mode="r",
                                       shape=tuple(self.meta["shape"]))
        return self._features

    def __getstate__(self) -> dict:
        # A pickled memmap is a full in-memory copy; spawned workers reopen the file instead.
        return {**self.__dict__, "_features": None}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, item: int | tuple[int, int]):
        index = item[0] if isinstance(item, tuple) else item
        return torch.from_numpy(np.asarray(self.features[index], dtype=np.float32)), self.targets[index]


class ResidentFeatureLoader:
    """A cache's rows held in device memory (float16, as stored) and gathered into batches there: the same batches
    as a DataLoader over the FeatureCache with the same sampler, without reading the disk every epoch. A
    DataLoader's face: dataset, sampler (set_epoch as usual), batch_size, len, iter of (features, labels)."""

    def __init__(self, cache: FeatureCache, batch_size: int, train: bool, seed: int, device, rank: int = 0,
                 world_size: int = 1):
        self.dataset, self.batch_size, self.device = cache, batch_size, torch.device(device)
        self.sampler = (TrainSampler(cache, rank, world_size, seed) if train
                        else ShardSampler(len(cache), rank, world_size))
        # Copied in chunks of 4,096 rows (2 GB at 448 px): the whole file never sits in host memory twice.
        self.rows = torch.empty(cache.features.shape, dtype=torch.float16, device=self.device)
        for start in range(0, len(self.rows), 4096):
            self.rows[start:start + 4096] = torch.from_numpy(np.array(cache.features[start:start + 4096]))
        self.labels = torch.tensor(cache.targets, device=self.device)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = [item[0] if isinstance(item, tuple) else item for item in self.sampler]
        order = torch.tensor(order, dtype=torch.long, device=self.device)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.rows[batch].float(), self.labels[batch]


def feature_loader(cache: FeatureCache, batch_size: int, train: bool, seed: int, device, rank: int = 0,
                   world_size: int = 1):
    """The loader of a cache's rows: held in GPU memory when they fit in half of what is free (CUB's stage 1 at
    448 px: 5.6 GB), else memory-mapped and read in this process (a DataLoader without workers)."""
    device = torch.device(device)
    if device.type == "cuda" and cache.features.nbytes <= torch.cuda.mem_get_info(device)[0] // 2:
        log.info("feature cache: %.2f GB held in GPU memory", cache.features.nbytes / 1e9)
        return ResidentFeatureLoader(cache, batch_size, train, seed, device, rank, world_size)
    # Rows are memory-mapped: reading them in the main process beats shipping 0.5 MB vectors from workers.
    return build_loader(cache, batch_size, train=train, num_workers=0, seed=seed, rank=rank, world_size=world_size,
                        pin_memory=device.type == "cuda")


def classifier_logits(model, features: torch.Tensor) -> torch.Tensor:
    """The logits of cached features: the model's Linear classifier in float32, as BilinearCNN runs it.

    Under DDP, wrap model.classifier in DistributedDataParallel and call that instead: calling the classifier
    through the raw model bypasses DDP's gradient all-reduce.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        return model.classifier(features.float())  # (B, num_classes)


def _check_arguments(dataset, views: tuple[str, ...], precision: str) -> None:
    unknown = [view for view in views if view not in VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise UserError(f"feature cache views must be distinct names among {', '.join(VIEWS)}, got {list(views)}.")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    steps = getattr(dataset.transform, "transforms", [dataset.transform])
    random_steps = [type(step).__name__ for step in steps if type(step).__name__.startswith(_RANDOM_STEPS)]
    if random_steps:
        # The caller's mistake, not the user's: caches are built from eval-transform datasets.
        raise ValueError(f"feature caches need the eval transform, but the dataset's has {random_steps}")


def _check_cache_root(root: Path) -> None:
    """Every rank, before any work: the cache folder (or the nearest part of it that exists) must be a folder."""
    existing = next((path for path in (root, *root.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == root else f"lies under {existing}, which is a file"
        raise UserError(f"train.cache_dir {root} {where}; give a folder for the feature cache (the default is "
                        "cache/features).")


def _is_complete(folder: Path, key: str, shape: tuple[int, int]) -> bool:
    """A folder named after the key holds a finished cache of the expected shape (not a hand-edited one)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        size = (folder / FEATURES_FILE).stat().st_size
    except (OSError, ValueError):
        return False
    return meta.get("key") == key and tuple(meta.get("shape", ())) == shape and size == shape[0] * shape[1] * 2


def _from_rank0(value, world_size: int):
    """Rank 0's value on every rank (a collective under DDP; the value itself in one process)."""
    if world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _barrier(world_size: int) -> None:
    # By the world_size passed, not the process group's: rank 0 may build a cache alone under DDP.
    if world_size > 1:
        barrier()


def _plan(final: Path, key: str, shape: tuple[int, int]) -> dict:
    """Rank 0 decides whether to reuse, where to build, or why it cannot; every rank then follows."""
    if _is_complete(final, key, shape):
        return {"reuse": True}
    if final.exists():
        return {"error": f"{final} is not a complete feature cache of the expected shape (edited by hand or "
                         f"damaged); delete that folder and run again."}
    need = shape[0] * shape[1] * 2
    free = shutil.disk_usage(final.parent).free
    log.info("feature cache: %d rows of %d float16 values need %.2f GB in %s (%.1f GB free)",
             shape[0], shape[1], need / 1e9, final.parent, free / 1e9)
    if free < need:
        return {"error": f"the feature cache needs {need / 1e9:.2f} GB but {final.parent} has only "
                         f"{free / 1e9:.2f} GB free; set the cache folder to a disk with room, or turn the "
                         f"feature cache off."}
    stale = sorted(str(path) for path in final.parent.glob(f"{key}.tmp-*"))
    if stale:
        log.warning("feature cache: %s left by an interrupted build; delete them unless a run is building them now",
                    ", ".join(stale))
    return {"reuse": False, "tmp": str(final.parent / f"{key}.tmp-{secrets.token_hex(4)}")}


@worker_errors()
@torch.no_grad()
def _compute_rows(model, dataset, views, features: np.memmap, device, precision, batch_size, num_workers, rank,
                  world_size, batched_cfg: DataConfig | None = None) -> None:
    """Write the rows of this rank's shard of the images: every view of images rank, rank + W, ...
    batched_cfg: decode them in batches on the device (bcnn/data/gpu.py) as it says; else by PIL in workers."""
    if batched_cfg is not None:
        loader = DeviceDecodeLoader(dataset, batched_cfg, batch_size, False, num_workers, 0, torch.device(device),
                                    rank, world_size)
    else:
        loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers, seed=0, rank=rank,
                              world_size=world_size, pin_memory=torch.device(device).type == "cuda")
    shard, num_images = list(loader.sampler), len(dataset)
    report_every = max(1, len(shard) // 10)
    start, done, next_report = time.perf_counter(), 0, report_every
    for images, _ in loader:
        indices = np.asarray(shard[done:done + len(images)])
        images = images.to(device, non_blocking=True)
        for view_index, view in enumerate(views):
            x = torch.flip(images, dims=[3]) if view == "flip" else images
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast(precision, device):
                vectors = model.embed(x)  # (B, output_dim) float32: embed runs the pooling without autocast
            if not torch.isfinite(vectors).all():
                raise UserError(f"the backbone gave non-finite features at precision {precision} (fp16 "
                                f"overflow?); use precision bf16 or fp32.")
            features[view_index * num_images + indices] = vectors.to(torch.float16).cpu().numpy()
        done += len(images)
        if rank == 0 and (done >= next_report or done == len(shard)):
            log.info("feature cache: %d%% (%d/%d images%s), %.1f images/s", 100 * done // len(shard), done,
                     len(shard), " on rank 0" if world_size > 1 else "", done / max(time.perf_counter() - start, 1e-9))
            next_report += report_every
    features.flush()


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _finish(tmp: Path, final: Path, key: str, dataset, views, precision: str, shape: tuple[int, int]) -> None:
    """Rank 0: labels, then meta.json (last: it marks the folder complete), then the rename that publishes it."""
    _write_file(tmp / LABELS_FILE, lambda f: np.save(f, np.asarray(dataset.targets, dtype=np.int64)))
    meta = {"key": key, "format": FORMAT_VERSION, "shape": list(shape), "dtype": "float16", "order": "view-major",
            "views": list(views), "num_images": len(dataset), "feature_dim": shape[1], "precision": precision,
            "classes": list(dataset.classes), "dataset": _describe_dataset(dataset),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_file(tmp / META_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final, key, shape):  # not just another run finishing the same cache first
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_feature_cache(model, dataset, views: tuple[str, ...], cache_root: str | Path, device: torch.device,
                        precision: str = "fp32", batch_size: int = 32, num_workers: int = 0, rank: int = 0,
                        world_size: int = 1, data_cfg: DataConfig | None = None) -> FeatureCache:
    """Open the cache of `views` of `dataset` under `model`, computing it first unless a run already did.

    Every rank calls this with the same arguments (the model already on `device`, unwrapped or not); each
    computes the images of its shard (ShardSampler), and all return the same FeatureCache. `precision` is the
    backbone's autocast (fp32, bf16, fp16); the head runs in float32 regardless. data_cfg: its data.decode
    decides where the images are decoded (bcnn.data.build_image_loader); without it, by PIL in the workers.
    """
    views = tuple(views)
    batched = data_cfg is not None and decode_on_device(data_cfg, device)
    _check_arguments(dataset, views, precision)
    _check_cache_root(Path(cache_root))
    model = unwrap(model)
    if not (model.backbone_frozen and model.pooling.cacheable):
        raise UserError("the feature cache needs a frozen backbone and a pooling head without trainable layers; "
                        "set train.cache_features=false.")
    key = cache_key(model, dataset, views, precision, batched)
    final = Path(cache_root) / key
    shape = (len(views) * len(dataset), model.classifier.in_features)  # (rows, output_dim)
    if rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
    plan = _from_rank0(_plan(final, key, shape) if rank == 0 else None, world_size)
    if "error" in plan:
        raise UserError(plan["error"])
    if plan["reuse"]:
        log.info("feature cache: reusing %s (%d images x %s)", final, len(dataset), "+".join(views))
        return FeatureCache(final)
    tmp = Path(plan["tmp"])
    log.info("feature cache: computing %s (%d images x %s, precision %s)", final, len(dataset), "+".join(views),
             precision)
    try:
        if rank == 0:
            tmp.mkdir()
            np.memmap(tmp / FEATURES_FILE, dtype=np.float16, mode="w+", shape=shape).flush()
        _barrier(world_size)
        if not tmp.is_dir():
            raise UserError(f"rank {rank} cannot see {tmp}, which rank 0 created; under DDP the feature cache "
                            f"folder must be on a filesystem all ranks share.")
        features = np.memmap(tmp / FEATURES_FILE, dtype=np.float16, mode="r+", shape=shape)
        was_training = model.training
        model.eval()
        try:
            _compute_rows(model, dataset, views, features, device, precision, batch_size, num_workers, rank,
                          world_size, data_cfg if batched else None)
        finally:
            model.train(was_training)
            del features
        _barrier(world_size)
        if rank == 0:
            _finish(tmp, final, key, dataset, views, precision, shape)
        _barrier(world_size)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind (a killed one may)
        raise
    return FeatureCache(final)
