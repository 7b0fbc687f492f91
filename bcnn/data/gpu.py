"""Batched decoding and augmentation on the training device (data.decode=gpu).

Loader workers only read each file's bytes and send a batch's files as one tensor (collate_encoded). The main
process decodes a whole batch at once on the device (TorchCodec's decode_jpeg, or torchvision's without it:
bcnn.data.jpeg; nvJPEG on a GPU), then resizes, cuts, flips and normalises every image there, and hands the step
a channels_last batch; on a GPU the next batch is prepared on a side stream while the step runs. Files the
decoder refuses (PNGs, damaged JPEGs) and JPEGs with an EXIF orientation (which TorchCodec would apply) are
decoded with PIL on the CPU, as the CPU path does, and named once in the log.

The crop and flip are drawn exactly as the CPU path's torchvision transforms draw them, from a generator seeded
with the sampler's per-image seed, so for a given (seed, epoch, image) both paths choose the same crop and flip:
DDP, resume and their equivalence tests hold on either path. The pixels differ only by decode and resize rounding
(PIL's fixed-point antialiased resize against torch's); tests/test_gpu_decode.py runs this code on CPU tensors
against the PIL path and bounds the difference.

    loader = DeviceDecodeLoader(dataset, cfg.data, batch_size=64, train=True, num_workers=8, seed=0,
                                device=torch.device("cuda"))
    loader.sampler.set_epoch(epoch)                 # as for a DataLoader
    for images, labels in loader: ...               # on the device, normalised, channels_last
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from bcnn.config import CPU_ONLY_AUGMENTATIONS, DataConfig
from bcnn.data.dataset import _ImageDataset, check_image_file, load_rgb
from bcnn.data.jpeg import bytes_tensor, decode_jpegs, default_decoder, exif_turned
from bcnn.data.loader import build_loader
from bcnn.errors import UserError

log = logging.getLogger("bcnn")
JPEG_START = (0xFF, 0xD8)  # every JPEG file's first two bytes (SOI)


class EncodedFiles(Dataset):
    """A dataset's image files as raw bytes: items (uint8 1-d tensor, label, index, augment seed or -1, whether
    the file is a JPEG the batched decoder takes: not one whose EXIF orientation it would apply)."""

    def __init__(self, dataset: _ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, -1)
        path, label = self.dataset.samples[index]
        check_image_file(path)  # a folder or a named pipe (whose read would wait forever) is named for what it is
        try:
            raw = Path(path).read_bytes()
        except OSError:  # missing or unreadable: PIL's reading gives the one-sentence error
            load_rgb(path)
            raise
        batched = raw[:2] == bytes(JPEG_START) and not exif_turned(raw)
        return bytes_tensor(raw), label, index, seed, batched


def collate_encoded(items):
    """A batch of files of different lengths: their bytes end to end in one uint8 tensor, then each file's length,
    the labels, indices and seeds, all tensors.

    One tensor per batch, not one per file: a worker sends every tensor of a batch through a shared-memory file
    descriptor of its own, and tensors over memory torch did not allocate could not be sent at all (torchvision's
    read_file's: the worker's feeder thread failed with EBADF and the main process waited for ever). The worker
    pays for it with one copy of compressed bytes (torch.cat; 64 files of 95 KB, 6 MB: 1 to 3 ms on this
    project's 2-core CPU), besides the copy into shared memory that sending any tensor costs; the main process,
    the one that feeds the device, maps the batch's shared memory and cuts views from it, copying nothing."""
    data, labels, indices, seeds, batched = zip(*items)
    return (torch.cat(data), torch.tensor([len(raw) for raw in data]), torch.tensor(labels), torch.tensor(indices),
            torch.tensor(seeds, dtype=torch.int64), torch.tensor(batched))


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The (height, width) torchvision's Resize(shorter) gives: the shorter side to `shorter`, the longer scaled
    and truncated to an int, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shorter * long / short)
    return (new_long, shorter) if width <= height else (shorter, new_long)


def train_draws(seed: int, height: int, width: int, crop: int, hflip: bool) -> tuple[bool, int, int]:
    """(flip, top, left) as the CPU path draws them after Resize: RandomHorizontalFlip's torch.rand(1) < 0.5, then
    RandomCrop's randint(0, height - crop + 1) for top and randint(0, width - crop + 1) for left, all from torch's
    CPU generator seeded with the sampler's seed."""
    generator = torch.Generator().manual_seed(seed)
    flip = bool(torch.rand(1, generator=generator) < 0.5) if hflip else False
    top = int(torch.randint(0, height - crop + 1, size=(1,), generator=generator))
    left = int(torch.randint(0, width - crop + 1, size=(1,), generator=generator))
    return flip, top, left


@dataclass
class BatchTransform:
    """The recipe's transforms on decoded uint8 (3, H, W) tensors, on whatever device they are: train Resize ->
    flip -> RandomCrop, eval Resize -> CenterCrop, then /255 and normalisation with the backbone's mean and std."""

    resize: int
    crop: int
    hflip: bool
    train: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    _scales: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def one(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        height, width = resized_size(image.shape[1], image.shape[2], self.resize)
        # Antialiased bilinear, as PIL resizes; rounded to whole values, as PIL's 8-bit output is.
        resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                                antialias=True).round_().clamp_(0, 255)[0]
        if self.train:
            flip, top, left = train_draws(seed, height, width, self.crop, self.hflip)
            if flip:
                resized = resized.flip(-1)
        else:  # CenterCrop's rounding
            top, left = int(round((height - self.crop) / 2.0)), int(round((width - self.crop) / 2.0))
        return resized[:, top:top + self.crop, left:left + self.crop]

    def __call__(self, images: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
        batch = torch.stack([self.one(image, seed) for image, seed in zip(images, seeds)])
        mean, std = self._scale(batch.device)
        return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)

    def _scale(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std in 0..255 units as (1, 3, 1, 1) tensors on device: made once, not copied every batch."""
        if device not in self._scales:
            self._scales[device] = tuple(torch.tensor(values, device=device).view(1, 3, 1, 1) * 255
                                         for values in (self.mean, self.std))
        return self._scales[device]


class DeviceDecodeLoader:
    """A DataLoader's face (dataset, sampler, batch_size, len, iter) over batches decoded and augmented on
    `device`; yields (images, labels), both already on the device."""

    def __init__(self, dataset: _ImageDataset, cfg: DataConfig, batch_size: int, train: bool, num_workers: int,
                 seed: int, device: torch.device, rank: int = 0, world_size: int = 1):
        unsupported = [name for name in CPU_ONLY_AUGMENTATIONS if getattr(cfg, name)]
        if unsupported and train:
            raise ValueError(f"data.decode=gpu does not do data.{unsupported[0]}")  # the config refuses it first
        self.dataset, self.device, self.batch_size = dataset, torch.device(device), batch_size
        self.loader = build_loader(EncodedFiles(dataset), batch_size, train, num_workers, seed, rank, world_size,
                                   collate_fn=collate_encoded)
        self.sampler = self.loader.sampler
        self.transform = BatchTransform(cfg.resize, cfg.crop, cfg.hflip, train, *dataset.normalisation)
        self._named: set[str] = set()  # files already logged as decoded on the CPU
        self.decoder = default_decoder()  # "torchcodec", or "torchvision" where it is missing (bcnn.data.jpeg)
        if self.decoder is None:
            raise UserError("data.decode=gpu needs a batched JPEG decoder: TorchCodec (pip install torchcodec, the "
                            "version made for your torch) or a torchvision that still has torchvision.io.decode_jpeg; "
                            "install one, or set data.decode=cpu.")

    def __len__(self) -> int:
        return len(self.loader)

    def decode(self, data: list[torch.Tensor], indices: list[int], batched: list[bool]) -> list[torch.Tensor]:
        """uint8 (3, H, W) images on the device, each cut to its dataset region (banner, box). batched: the file
        is a JPEG for the batched decoder (EncodedFiles); the others, and any it refuses, are decoded by PIL."""
        images: list[torch.Tensor | None] = [None] * len(data)
        jpegs = [i for i in range(len(data)) if batched[i]]
        try:
            decoded = decode_jpegs([data[i] for i in jpegs], self.device, self.decoder) if jpegs else []
            for i, image in zip(jpegs, decoded):
                images[i] = image
        except RuntimeError:  # one refused file (or a damaged one: PIL then says so in a sentence) fails the batch
            for i in jpegs:
                try:
                    images[i] = decode_jpegs([data[i]], self.device, self.decoder)[0]
                except RuntimeError:
                    pass
        for i, image in enumerate(images):
            if image is None:
                path = self.dataset.samples[indices[i]][0]
                if path not in self._named:
                    self._named.add(path)
                    why = (f"the {self.device.type} decoder refused it" if batched[i] else
                           "not a JPEG, or one with an EXIF orientation, which TorchCodec would apply")
                    log.info("decoded on the CPU by PIL (%s): %s", why, path)
                images[i] = pil_to_tensor(load_rgb(path)).to(self.device)
        cut = []
        for image, index in zip(images, indices):
            left, top, right, bottom = self.dataset.region(index, image.shape[2], image.shape[1])
            cut.append(image[:, top:bottom, left:right])
        return cut

    def prepare(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        data, lengths, labels, indices, seeds, batched = batch
        files = list(data.split(lengths.tolist()))  # views into the batch's one tensor (collate_encoded)
        images = self.decode(files, indices.tolist(), batched.tolist())
        return self.transform(images, seeds.tolist()), labels.to(self.device, non_blocking=True)

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self.prepare(batch)
            return
        # One batch ahead on a side stream: its decode and transforms overlap the step on the current stream.
        side, current = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        ready = None
        for batch in self.loader:
            with torch.cuda.stream(side):
                upcoming = self.prepare(batch)
            if ready is not None:
                yield ready
            current.wait_stream(side)
            for tensor in upcoming:
                tensor.record_stream(current)
            ready = upcoming
        if ready is not None:
            yield ready
