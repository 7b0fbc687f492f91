"""The step bench (`python -m bcnn.bench` without --recipe): its cases, their ratios and the targets they meet.

Random weights (nothing is downloaded), random device-resident input batches for the steps, and a generated
mini-CUB in a temporary folder for the loader and the epochs. The cases:

    bare                    VGG16 features to relu5_3, forward + backward of the output's sum: the limit
    stage2_step             train_one_epoch's step, everything trainable (forward under autocast, the head in
                            float32, cross-entropy, backward, SGD with momentum, zero_grad), channels_last
    stage1_step             the same with the backbone frozen (only the classifier trains)
    eval                    forward only, model.eval() under torch.no_grad, as evaluate() runs it
    stage2_step_fp32_nchw   stage2_step in float32 with the NCHW layout: what precision + layout buy
    stage2_step_<head>      stage2_step with each other registered pooling head (timed_heads: avg, matrix_sqrt,
                            isqrt_cov, compact and any you add), against the bilinear head's: what a head costs
    heads_<head>            every head's stage2_step (bilinear too) at --heads-image-size (default 448, the
                            recipe's) and --heads-batch-size, their steps taken in turn, one head after another,
                            so that a drift of the machine's speed falls on all alike: the heads at the size
                            users train at, where a CPU's default 224 px weighs them differently
    loader                  build_loader alone over the mini-CUB, train transform, --num-workers workers
    cache_build             bcnn.feature_cache: the one-off computation of the stage-1 feature cache
    live_stage1_epoch       one stage-1 epoch over the mini-CUB's train images (the loader included)
    cached_stage1_epoch     one epoch of training model.classifier from that cache (center + flip views), as
                            train.py runs it with train.cache_features=true

A step's time is the median over --steps steps after --warmup steps (CUDA synchronised before every clock
read); images/s = batch / median. The loader and the epochs are timed whole (see the notes the report prints).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from bcnn.bench.probes import CpuShare, MemoryProbe, _sync, device_name, memory_method
from bcnn.bench.settings import Settings
from bcnn.config import Config, DataConfig, ModelConfig
from bcnn.data import build_dataset, build_loader, write_synthetic_cub
from bcnn.data.loader import worker_errors
from bcnn.engine import TrainingDiverged, train_one_epoch
from bcnn.models import BilinearCNN
from bcnn.models.backbones import vgg16_features
from bcnn.models.pooling import HEADS, build_pooling
from bcnn.precision import autocast, configure_device, cpu_supports_bf16, grad_scaler
from bcnn.optim import build_optimizer


def timed_heads() -> tuple[str, ...]:
    """The heads timed against the bilinear one: every head registered in bcnn.models.pooling.HEADS (a new one is
    timed as soon as it is registered, docs/heads.md) but the bilinear head itself and those reading a second map."""
    return tuple(name for name, head in HEADS.items() if name != "bilinear" and not head.two_maps)


def case_names() -> tuple[str, ...]:
    """Every case run() measures, in the order it reports them."""
    heads = timed_heads()
    return ("bare", "stage2_step", "stage1_step", "eval", "stage2_step_fp32_nchw",
            *(f"stage2_step_{head}" for head in heads), *(f"heads_{head}" for head in ("bilinear", *heads)),
            "loader", "cache_build", "live_stage1_epoch", "cached_stage1_epoch")


CACHE_CASES = ("cache_build", "live_stage1_epoch", "cached_stage1_epoch")
CACHE_VIEWS = ("center", "flip")  # what stage 1 caches per training image (bcnn.feature_cache)
NOT_MEASURED = "not measured (bcnn.feature_cache missing)"
# (ratio, comparison, target, what it says); the ratios are defined in compute_ratios.
TARGETS = (
    ("stage2_step_time_vs_bare", "<=", 1.15, "stage2_step time / bare time"),
    ("speedup_vs_fp32_nchw", ">=", 2.5, "stage2_step speedup over fp32 + NCHW"),
    ("loader_vs_stage2_step", ">", 1.0, "loader images/s / stage2_step images/s"),
    ("cached_vs_live_epoch", ">=", 20.0, "live / cached stage-1 epoch time"),
    # The heads side by side at the recipe's size (issue 22: a CPU at batch 4, a GPU at batch 64); matrix_sqrt's
    # 1.16 is its 36 float32 products at this CPU's peak, decided in issue 28 (docs/pooling.md).
    ("heads_matrix_sqrt_vs_bilinear", "<=", 1.16, "heads: matrix_sqrt step time / bilinear's"),
    ("heads_compact_vs_bilinear", "<=", 1.05, "heads: compact step time / bilinear's"),
)
LOADER_BATCHES = 4  # batches of generated train images (the epoch cases'); the loader's epoch reads at least this
MINI_CUB_CLASSES = 4  # of the generated mini-CUBs (mini_cub_classes: fewer for a smaller --classes)


def _record(case: str, precision: str, layout: str, step_times: list[float], images_per_step: int,
            probe: MemoryProbe, what: str) -> dict:
    """A case timed step by step: the median step, and images/s = images per step / that median."""
    median = statistics.median(step_times)
    return {"case": case, "precision": precision, "layout": layout, "images_per_sec": images_per_step / median,
            "ms_per_step": 1000 * median, "peak_memory_mib": probe.peak_mib(), "images_per_step": images_per_step,
            "timed_steps": len(step_times), "what": what}


def _epoch_record(case: str, precision: str, layout: str, seconds: float, images: int, steps: int,
                  probe: MemoryProbe, what: str) -> dict:
    """A case timed whole (an epoch, a cache build): images/s over all of it, ms per optimizer step or batch."""
    return {"case": case, "precision": precision, "layout": layout, "images_per_sec": images / seconds,
            "ms_per_step": 1000 * seconds / steps, "peak_memory_mib": probe.peak_mib(), "epoch_seconds": seconds,
            "images_per_epoch": images, "steps_per_epoch": steps, "what": what}


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of step() after `warmup` untimed ones."""
    times = []
    for index in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def random_batch(settings: Settings, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = settings.image_size
    images = torch.randn(settings.batch_size, 3, size, size, generator=generator)
    targets = torch.randint(0, settings.classes, (settings.batch_size,), generator=generator)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(settings.device, memory_format=layout), targets.to(settings.device)


def _layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "NCHW"


def stage_config(freeze_backbone: bool) -> Config:
    """The recipe's optimizer for a stage (SGD, momentum 0.9, its weight decay); the backbone lr is the demo's
    1e-3, which a random VGG16 survives for a few steps (the values do not change the speed)."""
    cfg = Config()
    cfg.model.backbone_weights, cfg.model.freeze_backbone = "none", freeze_backbone
    if not freeze_backbone:
        cfg.optim.lr, cfg.optim.backbone_lr, cfg.optim.weight_decay = 1e-2, 1e-3, 1e-5
    return cfg


def new_model(settings: Settings, backbone: nn.Sequential, freeze_backbone: bool, channels_last: bool,
              pooling: str = "bilinear"):
    """A BilinearCNN on a copy of one VGG16 built once: build_model would build (and randomly initialise) the
    whole torchvision VGG16 again for every case, seconds each, to the same effect."""
    model = BilinearCNN(copy.deepcopy(backbone), build_pooling(ModelConfig(pooling=pooling), channels=512),
                        settings.classes)
    if freeze_backbone:
        model.freeze_backbone()
    return model.to(settings.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def measure_bare(settings: Settings, backbone: nn.Sequential) -> dict:
    device, precision = settings.device, settings.precision
    probe = MemoryProbe(device).begin()
    features = copy.deepcopy(backbone).to(device, memory_format=torch.channels_last)
    images, _ = random_batch(settings, channels_last=True)
    probe.ready()

    def step():
        features.zero_grad(set_to_none=True)
        with autocast(precision, device):
            output = features(images)
        output.float().sum().backward()

    times = time_steps(step, device, settings.warmup, settings.steps)
    return _record("bare", precision, "channels_last", times, settings.batch_size, probe,
                   "VGG16 features to relu5_3: forward + backward")


class _SameBatch:
    """Stands in for a DataLoader in train_one_epoch: one device-resident batch, `count` times, so that the step
    is timed without the data pipeline; the clock is read as the first batch is handed out."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, count: int, stamp):
        self.images, self.targets, self.count, self.stamp = images, targets, count, stamp
        self.batch_size = len(images)
        self.sampler = range(self.batch_size * count)  # train_one_epoch plans its steps from len(sampler)

    def __iter__(self):
        for index in range(self.count):
            if index == 0:
                self.stamp()
            yield self.images, self.targets


def measure_train_step(settings: Settings, backbone: nn.Sequential, case: str, freeze_backbone: bool,
                       precision: str, channels_last: bool, what: str, pooling: str = "bilinear") -> dict:
    """Steps of bcnn.engine.train_one_epoch itself, timed between its after_step calls."""
    device = settings.device
    probe = MemoryProbe(device).begin()
    model = new_model(settings, backbone, freeze_backbone, channels_last, pooling)
    optimizer = build_optimizer(stage_config(freeze_backbone), model)
    images, targets = random_batch(settings, channels_last)
    probe.ready()
    stamps = []

    def stamp(*_):
        _sync(device)
        stamps.append(time.perf_counter())

    batches = _SameBatch(images, targets, settings.warmup + settings.steps, stamp)
    with contextlib.suppress(TrainingDiverged):  # random weights may diverge; the times stand all the same
        train_one_epoch(model, batches, optimizer, device, epoch=1, scaler=grad_scaler(precision, device),
                        after_step=stamp, log_every=0, precision=precision, channels_last=channels_last)
    times = [end - start for start, end in zip(stamps, stamps[1:])][settings.warmup:]
    # configure_device lets float32 matmuls and convolutions use TF32 on GPUs, as train.precision=fp32 does.
    shown = "fp32/tf32" if precision == "fp32" and device.type == "cuda" else precision
    return _record(case, shown, _layout_name(channels_last), times, settings.batch_size, probe, what)


class _NoMemoryProbe:
    """Steps of several models in turn share one process's peak: no case's own figure."""

    @staticmethod
    def peak_mib() -> None:
        return None


def timed_step(model, optimizer, images: torch.Tensor, targets: torch.Tensor, settings: Settings) -> float | None:
    """Seconds of one train_one_epoch step, from the batch handed out to after the optimizer step (None if the step
    stopped before it: a loss that random weights made infinite)."""
    device, stamps = settings.device, []

    def stamp(*_):
        _sync(device)
        stamps.append(time.perf_counter())

    with contextlib.suppress(TrainingDiverged):  # random weights may diverge; the time stands all the same
        train_one_epoch(model, _SameBatch(images, targets, 1, stamp), optimizer, device, epoch=1,
                        scaler=grad_scaler(settings.precision, device), after_step=stamp, log_every=0,
                        precision=settings.precision, channels_last=True)
    return stamps[1] - stamps[0] if len(stamps) == 2 else None


def measure_heads_side_by_side(settings: Settings, backbone: nn.Sequential) -> dict:
    """Every head's stage2_step at the heads' size and batch, one step of each head in turn, warmup + steps rounds:
    the ratios between heads then hold even while the machine's speed drifts (clock boost, a neighbour's load)."""
    sized = dataclasses.replace(settings, image_size=settings.heads_image_size, batch_size=settings.heads_batch_size)
    images, targets = random_batch(sized, channels_last=True)
    runs = []
    for head in ("bilinear", *timed_heads()):
        model = new_model(sized, backbone, False, True, head)
        runs.append((head, model, build_optimizer(stage_config(False), model), []))
    for index in range(settings.warmup + settings.steps):
        for head, model, optimizer, times in runs:
            seconds = timed_step(model, optimizer, images, targets, settings)
            if index >= settings.warmup and seconds is not None:
                times.append(seconds)
    records = {}
    for head, _, _, times in runs:
        records[f"heads_{head}"] = _record(f"heads_{head}", settings.precision, "channels_last", times,
                                           sized.batch_size, _NoMemoryProbe(),
                                           f"stage2_step with the {head} head at {sized.image_size} px, in turn "
                                           "with the other heads")
        records[f"heads_{head}"]["step_seconds"] = times  # round by round, for the ratios (compute_ratios)
    return records


def measure_eval(settings: Settings, backbone: nn.Sequential) -> dict:
    device, precision = settings.device, settings.precision
    probe = MemoryProbe(device).begin()
    model = new_model(settings, backbone, freeze_backbone=True, channels_last=True).eval()
    images, _ = random_batch(settings, channels_last=True)
    probe.ready()

    @torch.no_grad()
    def step():
        with autocast(precision, device):
            model(images)

    times = time_steps(step, device, settings.warmup, settings.steps)
    return _record("eval", precision, "channels_last", times, settings.batch_size, probe,
                   "forward only, torch.no_grad")


def mini_cub_config(settings: Settings, root: Path) -> DataConfig:
    """The recipe's transform at this size: Resize(1.15 x size) -> flip -> RandomCrop(size) for training."""
    return DataConfig(format="cub", root=str(root), val_fraction=0.0, resize=int(settings.image_size * 1.15),
                      crop=settings.image_size, num_workers=settings.num_workers)


def mini_cub_classes(settings: Settings) -> int:
    """The generated mini-CUBs' classes: 4, or fewer when the classifier has fewer outputs (their labels must be
    among its outputs)."""
    return min(MINI_CUB_CLASSES, settings.classes)


def write_mini_cub(settings: Settings, folder: Path) -> Path:
    """LOADER_BATCHES batches of train images (and as many test images, unread), a bit larger than the input."""
    classes = mini_cub_classes(settings)
    per_class_train = math.ceil(LOADER_BATCHES * settings.batch_size / classes)
    # write_synthetic_cub puts half of each class in the train split (at least 2, at most all but one).
    return write_synthetic_cub(folder / "CUB_200_2011", classes=classes, per_class=2 * max(per_class_train, 2),
                               seed=0, image_size=int(settings.image_size * 1.3))


def write_cache_cub(settings: Settings, folder: Path) -> Path:
    """One batch of train images (mini_cub_classes classes), a bit larger than the input: the live epoch is one
    step."""
    classes = mini_cub_classes(settings)
    per_class_train = max(2, math.ceil(settings.batch_size / classes))
    return write_synthetic_cub(folder / "CUB_200_2011", classes=classes, per_class=2 * per_class_train, seed=0,
                               image_size=int(settings.image_size * 1.3))


def _time_epochs(loader, run_epoch, device: torch.device, warmup: int, timed: int) -> list[float]:
    """Seconds of `timed` whole epochs, run_epoch(loader, epoch), after `warmup` ones (the workers, persistent,
    start in the first)."""
    times = []
    for epoch in range(1, warmup + timed + 1):
        loader.sampler.set_epoch(epoch)
        _sync(device)
        start = time.perf_counter()
        run_epoch(loader, epoch)
        _sync(device)
        if epoch > warmup:
            times.append(time.perf_counter() - start)
    return times


class _Repeated(Dataset):
    """A dataset's items over and over, `length` in all: a loader epoch long enough to keep every worker busy,
    without generating more images. Items are indices or TrainSampler's (index, augment_seed) pairs."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        index %= len(self.dataset)
        return self.dataset[index if seed is None else (index, seed)]


def measure_loader(settings: Settings, data_root: Path) -> dict:
    probe = MemoryProbe(settings.device).begin()
    train_set = build_dataset(mini_cub_config(settings, data_root), "train")
    # Two batches per worker at least: an epoch of fewer batches than workers would leave some of them idle.
    batches = max(LOADER_BATCHES, 2 * settings.num_workers)
    epoch_set = _Repeated(train_set, batches * settings.batch_size)
    loader = build_loader(epoch_set, settings.batch_size, train=True, num_workers=settings.num_workers, seed=0,
                          pin_memory=settings.device.type == "cuda")
    probe.ready()

    @worker_errors()
    def read_epoch(loader, _epoch):
        for images, _targets in loader:
            images.to(settings.device, non_blocking=True)

    times = _time_epochs(loader, read_epoch, settings.device, settings.warmup, settings.steps)
    return _epoch_record("loader", "-", "-", statistics.median(times), len(epoch_set), len(loader), probe,
                         f"build_loader, train transform, {settings.num_workers} workers, median of "
                         f"{len(times)} epochs of {len(epoch_set)} images")


def feature_cache_module():
    """bcnn.feature_cache, or None where it is missing."""
    try:
        module = importlib.import_module("bcnn.feature_cache")
    except ImportError:
        return None
    return module if hasattr(module, "build_feature_cache") else None


def measure_feature_cache(settings: Settings, backbone: nn.Sequential, data_root: Path, work_dir: Path) -> dict:
    """cache_build, live_stage1_epoch and cached_stage1_epoch on the mini-CUB's train split; {} without
    bcnn.feature_cache."""
    module = feature_cache_module()
    if module is None:
        return {}
    device, precision, batch = settings.device, settings.precision, settings.batch_size
    cfg = mini_cub_config(settings, data_root)
    warmup = min(settings.warmup, 1)
    cases = {}

    share, probe = CpuShare(), MemoryProbe(device).begin()
    model = new_model(settings, backbone, freeze_backbone=True, channels_last=True)
    train_set = build_dataset(cfg, "train")
    loader = build_loader(train_set, batch, train=True, num_workers=settings.num_workers, seed=0,
                          pin_memory=device.type == "cuda")
    optimizer = build_optimizer(stage_config(freeze_backbone=True), model)
    scaler = grad_scaler(precision, device)
    probe.ready()

    def live_epoch(loader, epoch):
        with contextlib.suppress(TrainingDiverged):
            train_one_epoch(model, loader, optimizer, device, epoch, scaler=scaler, log_every=0,
                            precision=precision, channels_last=True)

    times = _time_epochs(loader, live_epoch, device, warmup, 1)
    cases["live_stage1_epoch"] = _epoch_record(
        "live_stage1_epoch", precision, "channels_last", times[0], len(train_set), len(loader), probe,
        "frozen backbone, the train images through the loader")
    del loader  # shuts the workers down, so that their CPU time counts as this process's
    cases["live_stage1_epoch"]["others_cpu_share"] = share.others()

    share, probe = CpuShare(), MemoryProbe(device).begin()
    eval_set = build_dataset(cfg, "train", train_transform=False)
    probe.ready()
    _sync(device)
    start = time.perf_counter()
    cache = module.build_feature_cache(model, eval_set, CACHE_VIEWS, work_dir / "feature_cache", device,
                                       precision=precision, batch_size=batch, num_workers=settings.num_workers)
    _sync(device)
    seconds = time.perf_counter() - start
    cases["cache_build"] = _epoch_record(
        "cache_build", precision, "channels_last", seconds, len(eval_set), math.ceil(len(eval_set) / batch), probe,
        f"one-off: the train images x {'+'.join(CACHE_VIEWS)}, eval transform")
    cases["cache_build"]["others_cpu_share"] = share.others()

    # As train.py runs a cached stage 1: the Linear classifier alone steps, in float32, on 2-d vectors that the
    # main process reads from the memory-mapped cache (no workers).
    share, probe = CpuShare(), MemoryProbe(device).begin()
    loader = build_loader(cache, batch, train=True, num_workers=0, seed=0, pin_memory=device.type == "cuda")
    optimizer = build_optimizer(stage_config(freeze_backbone=True), model)
    probe.ready()

    def cached_epoch(loader, epoch):
        with contextlib.suppress(TrainingDiverged):
            train_one_epoch(model.classifier, loader, optimizer, device, epoch, scaler=grad_scaler("fp32", device),
                            log_every=0, precision="fp32", channels_last=False)

    times = _time_epochs(loader, cached_epoch, device, warmup, 1)
    cases["cached_stage1_epoch"] = _epoch_record(
        "cached_stage1_epoch", "fp32", "-", times[0], len(cache), len(loader), probe,
        f"model.classifier from the cache: one vector per image view ({'+'.join(CACHE_VIEWS)}), no workers")
    del loader
    cases["cached_stage1_epoch"]["others_cpu_share"] = share.others()
    return cases


def compute_ratios(cases: dict) -> dict:
    """Each ratio from the images/s (or epoch seconds) of the cases it compares; None where one is missing."""
    def ips(name):
        return cases.get(name, {}).get("images_per_sec")

    def ratio(numerator, denominator):
        return numerator / denominator if numerator is not None and denominator else None

    def epoch_seconds(name):
        return cases.get(name, {}).get("epoch_seconds")

    return {
        # Step time over bare's = bare images/s over the case's (the batch is the same).
        "stage2_step_time_vs_bare": ratio(ips("bare"), ips("stage2_step")),
        "stage1_step_time_vs_bare": ratio(ips("bare"), ips("stage1_step")),
        "eval_time_vs_bare": ratio(ips("bare"), ips("eval")),
        "speedup_vs_fp32_nchw": ratio(ips("stage2_step"), ips("stage2_step_fp32_nchw")),
        "loader_vs_stage2_step": ratio(ips("loader"), ips("stage2_step")),
        "loader_vs_stage1_step": ratio(ips("loader"), ips("stage1_step")),
        "cached_vs_live_epoch": ratio(epoch_seconds("live_stage1_epoch"), epoch_seconds("cached_stage1_epoch")),
        # A head's step time over the bilinear head's, both everything-trains steps at the same batch.
        **{f"{head}_step_time_vs_bilinear": ratio(ips("stage2_step"), ips(f"stage2_step_{head}"))
           for head in timed_heads()},
        # The same at the heads' size: the median over the rounds of each round's ratio, the two steps taken
        # seconds apart, so that a drift of the machine's speed between rounds cancels.
        **{f"heads_{head}_vs_bilinear": round_ratio(cases.get(f"heads_{head}"), cases.get("heads_bilinear"))
           for head in timed_heads()},
    }


def round_ratio(case: dict | None, reference: dict | None) -> float | None:
    """The median over rounds of case's step time over reference's in the same round (measure_heads_side_by_side)."""
    if not case or not reference or not case.get("step_seconds") or not reference.get("step_seconds"):
        return None
    return statistics.median(mine / theirs for mine, theirs in zip(case["step_seconds"], reference["step_seconds"]))


def check_targets(ratios: dict) -> list[dict]:
    checks = []
    for name, comparison, target, label in TARGETS:
        value = ratios.get(name)
        passed = None if value is None else (value <= target if comparison == "<=" else
                                             value >= target if comparison == ">=" else value > target)
        checks.append({"ratio": name, "label": label, "comparison": comparison, "target": target, "value": value,
                       "status": "n/a" if passed is None else "PASS" if passed else "MISS"})
    return checks


def run(settings: Settings) -> dict:
    configure_device(settings.device)
    backbone = vgg16_features("relu5_3", "none")
    whole_run, cases = CpuShare(), {}

    def measure(function, *args):
        share = CpuShare()
        record = function(*args)
        record["others_cpu_share"] = share.others()
        cases[record["case"]] = record

    measure(measure_bare, settings, backbone)
    for case, freeze, precision, channels_last, what in (
            ("stage2_step", False, settings.precision, True, "everything trains: train_one_epoch's step"),
            ("stage1_step", True, settings.precision, True, "frozen backbone, the classifier trains"),
            ("stage2_step_fp32_nchw", False, "fp32", False, "stage2_step in float32, NCHW")):
        measure(measure_train_step, settings, backbone, case, freeze, precision, channels_last, what)
        if case == "stage1_step":
            measure(measure_eval, settings, backbone)
    for head in timed_heads():
        measure(measure_train_step, settings, backbone, f"stage2_step_{head}", False, settings.precision, True,
                f"stage2_step with the {head} head", head)
    share = CpuShare()
    heads = measure_heads_side_by_side(settings, backbone)
    others = share.others()
    for record in heads.values():
        record["others_cpu_share"] = others
    cases.update(heads)
    with tempfile.TemporaryDirectory(prefix="bcnn-bench-") as work_dir:
        data_root = write_mini_cub(settings, Path(work_dir))
        measure(measure_loader, settings, data_root)
        # The epoch comparison at the recipe's size and batch: the classifier's per-step cost is fixed (a pass
        # over its 52M weights) while the backbone's grows with pixels and images, so small settings hide the gain.
        cache_settings = dataclasses.replace(settings, image_size=settings.cache_image_size,
                                             batch_size=settings.cache_batch_size)
        cache_root = write_cache_cub(cache_settings, Path(work_dir) / "cache_data")
        cases.update(measure_feature_cache(cache_settings, backbone, cache_root, Path(work_dir)))
    others = whole_run.others()
    cases = {name: cases[name] for name in case_names() if name in cases}
    ratios = compute_ratios(cases)
    return {
        "command": settings.command(),
        "device": {"type": settings.device.type, "name": device_name(settings.device),
                   "native_bf16": (torch.cuda.is_bf16_supported() if settings.device.type == "cuda"
                                   else cpu_supports_bf16())},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_size": settings.image_size,
        "batch_size": settings.batch_size,
        "precision": settings.precision,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "classes": settings.classes,
        "num_workers": settings.num_workers,
        "heads_image_size": settings.heads_image_size,
        "heads_batch_size": settings.heads_batch_size,
        "memory_method": memory_method(settings.device),
        "others_cpu_share": others,
        "feature_cache": "measured" if "cached_stage1_epoch" in cases else NOT_MEASURED,
        "cases": cases,
        "ratios": ratios,
        "targets": check_targets(ratios),
    }
