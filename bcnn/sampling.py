"""Samplers that make the data order and every augmentation a pure function of (seed, epoch, sample index).

Whatever the number of processes (DDP ranks), DataLoader workers, or the point in an epoch a run resumed from,
sample i of epoch e is drawn in the same place of the global order and augmented the same way.

    sampler = TrainSampler(train_set, rank, world_size, seed)   # yields (index, augment_seed) pairs
    sampler.set_epoch(epoch, skip=samples_already_seen)         # skip: resume mid-epoch, a multiple of world_size
    ShardSampler(len(val_set), rank, world_size)                # eval: every image on exactly one rank
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DistributedSampler, Sampler


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The seed that augments sample `index` in `epoch` of a run seeded with `seed` (all >= 0): a 63-bit int.

    SeedSequence hashes the three numbers together, so neighbouring indices or epochs get unrelated seeds.
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


class TrainSampler(DistributedSampler):
    """Shuffled training order split across ranks; yields (index, augment_seed) for the dataset to use.

    torch's DistributedSampler shuffles by seed + epoch, pads the order with repeats to a multiple of world_size
    and gives rank r the entries r, r + W, r + 2W...: so the k-th batches of all ranks together are the k-th
    batch of one process with a W times larger batch. num_replicas and rank are passed explicitly, so it also
    works without a process group. Call set_epoch before each epoch, or every epoch repeats epoch 0.
    """

    def __init__(self, dataset, rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw epoch `epoch`'s order; `skip` entries of its padded global order were consumed before a resume."""
        if skip % self.num_replicas or not 0 <= skip <= self.total_size:
            raise ValueError(f"skip must be a multiple of world_size {self.num_replicas} in [0, {self.total_size}], "
                             f"got {skip}")
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip // self.num_replicas:]
        return iter([(index, augment_seed(self.seed, self.epoch, index)) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip // self.num_replicas


class ShardSampler(Sampler):
    """Indices rank, rank + W, rank + 2W... of range(size), without padding: under DDP evaluation every image
    is counted exactly once (DistributedSampler's repeats would count some twice)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
