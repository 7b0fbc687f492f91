"""Mixup and CutMix of training batches (data.mixup, data.cutmix), as DeiT and timm fine-tune: timm's own Mixup, in
its per-batch mode, with train.label_smoothing folded into the soft targets it returns.

    mixer = build_mixer(cfg, num_classes, rank)     # None when both are off
    images, soft_targets = mixer(images, targets, epoch, step, position)

What timm draws (whether a batch is mixed, mixup or CutMix, lambda, the box) comes from numpy's global generator;
here it is seeded for each micro-batch from (train.seed, epoch, optimizer step, micro-batch, rank) and put back
afterwards, so a run's mixing is a function of its seed alone, the same after a resume, and the caller's numpy
state is untouched. Each rank mixes its own shard with its own draws, as DeiT's processes do.
"""

from __future__ import annotations

import numpy as np
import torch

from bcnn.config import Config
from bcnn.errors import UserError


def build_mixer(cfg: Config, num_classes: int, rank: int = 0) -> "BatchMixer | None":
    data = cfg.data
    if not (data.mixup or data.cutmix):
        return None
    try:
        from timm.data import Mixup
    except ImportError:
        raise UserError("data.mixup and data.cutmix use timm's Mixup, an optional extra: pip install timm "
                        "(or pip install -e \".[timm]\").") from None
    mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
                  switch_prob=data.mixup_switch_prob, mode="batch", label_smoothing=cfg.train.label_smoothing,
                  num_classes=num_classes)
    return BatchMixer(mixup, cfg.train.seed, rank)


class BatchMixer:
    def __init__(self, mixup, seed: int, rank: int):
        self.mixup, self.seed, self.rank = mixup, seed, rank

    def draw_seed(self, epoch: int, step: int, position: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self.seed, epoch, step, position, self.rank])

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int,
                 position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images and (B,) labels -> the mixed images and (B, classes) soft targets summing to 1."""
        odd = len(images) % 2 == 1
        if odd:
            # timm pairs image i with image B-1-i and asks for an even batch (an epoch's last one may be odd): the
            # last image is repeated once and the copy dropped after mixing, so image 0 pairs with that copy.
            images, targets = torch.cat([images, images[-1:]]), torch.cat([targets, targets[-1:]])
        state = np.random.get_state()
        np.random.seed(self.draw_seed(epoch, step, position).generate_state(1)[0])
        try:
            mixed, soft = self.mixup(images, targets)
        finally:
            np.random.set_state(state)
        return (mixed[:-1], soft[:-1]) if odd else (mixed, soft)
