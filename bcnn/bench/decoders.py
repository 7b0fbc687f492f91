"""--decoders: the JPEG decoders the batched path may use (bcnn.data.jpeg: TorchCodec's, torchvision's), side by
side with PIL, the CPU path's decoder and the reference.

Speed: a batch of photo-like JPEGs at CUB's typical 500 x 375 (recipe.photo_like, quality 90), decoded by each
decoder in turn within every round (the order rotating from round to round), so that a drift of the machine's
speed falls on all alike; the figures are each decoder's median over the rounds and the median of the per-round
ratios TorchCodec / torchvision. The batched decoders run on the bench's device (nvJPEG on a GPU), PIL on the CPU.

Pixels: one small JPEG of each kind the datasets hold (baseline and progressive at 4:4:4, 4:2:2 and 4:2:0,
grayscale, CMYK), each decoder's RGB output against PIL's convert("RGB"): the largest difference in grey levels.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from bcnn.bench.probes import _sync, device_name
from bcnn.bench.recipe import photo_like
from bcnn.bench.settings import Settings
from bcnn.data.jpeg import bytes_tensor, decode_jpegs, default_decoder


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def jpeg_kinds() -> dict[str, bytes]:
    """One 101 x 75 JPEG of each kind, from one smooth colour image."""
    rows, cols = np.mgrid[0:75, 0:101]
    rgb = Image.fromarray(np.stack([rows * 3, cols * 2, (rows * cols) % 256], axis=-1).astype(np.uint8))
    kinds = {}
    for subsampling, name in ((0, "4:4:4"), (1, "4:2:2"), (2, "4:2:0")):
        for progressive in (False, True):
            kinds[f"{'progressive' if progressive else 'baseline'} {name}"] = _jpeg(
                rgb, quality=85, subsampling=subsampling, progressive=progressive)
    kinds["grayscale"] = _jpeg(rgb.convert("L"), quality=85)
    kinds["CMYK"] = _jpeg(rgb.convert("CMYK"), quality=85)
    return kinds


def pil_decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def run_decoders(settings: Settings) -> dict:
    device = settings.device
    decoders = ["torchcodec", "torchvision"] if default_decoder() == "torchcodec" else ["torchvision"]
    files = [_jpeg(photo_like(seed), quality=90) for seed in range(settings.batch_size)]
    tensors = [bytes_tensor(data) for data in files]

    def decode(name: str) -> None:
        if name == "PIL":
            [pil_decode(data) for data in files]
        else:
            decode_jpegs(tensors, device, name)

    names = [*decoders, "PIL"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(settings.warmup + settings.steps):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            _sync(device)
            start = time.perf_counter()
            decode(name)
            _sync(device)
            if round_ >= settings.warmup:
                times[name].append(time.perf_counter() - start)

    pixels = {}
    for kind, data in jpeg_kinds().items():
        expected = pil_decode(data).int()
        pixels[kind] = {name: int((decode_jpegs([bytes_tensor(data)], device, name)[0].cpu().int() - expected)
                                  .abs().max()) for name in decoders}
    speeds = {name: {"median_seconds": statistics.median(seconds), "images_per_sec":
                     settings.batch_size / statistics.median(seconds)} for name, seconds in times.items()}
    ratio = (statistics.median(a / b for a, b in zip(times["torchcodec"], times["torchvision"]))
             if "torchcodec" in decoders else None)
    return {
        "device": {"type": device.type, "name": device_name(device)},
        "torch": torch.__version__,
        "default_decoder": default_decoder(),
        "images": settings.batch_size,
        "mean_jpeg_kb": sum(map(len, files)) / len(files) / 1024,
        "rounds": settings.steps,
        "speed": speeds,
        "torchcodec_over_torchvision": ratio,
        "max_grey_levels_from_pil": pixels,
        "command": (f"python -m bcnn.bench --decoders --device {device.type} --batch-size {settings.batch_size} "
                    f"--steps {settings.steps} --warmup {settings.warmup}"),
    }
