"""bcnn.sampling: the training order and augmentation seeds are the same for any number of ranks or resume point.

The samplers only need len(dataset), so a range stands in for a dataset here.
"""

from collections import Counter

import pytest

from bcnn.sampling import ShardSampler, TrainSampler, augment_seed


def epoch_of(size: int, rank: int = 0, world_size: int = 1, seed: int = 7, epoch: int = 3, skip: int = 0) -> list:
    sampler = TrainSampler(range(size), rank, world_size, seed)
    sampler.set_epoch(epoch, skip)
    items = list(sampler)
    assert len(items) == len(sampler)
    return items


def batches(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def test_augment_seed_is_a_fixed_63_bit_function_of_seed_epoch_and_index():
    seeds = {augment_seed(seed, epoch, index) for seed in range(3) for epoch in range(3) for index in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)
    assert augment_seed(1, 2, 3) == augment_seed(1, 2, 3)
    assert max(seeds) > 2**62  # the high bits are used too


def test_the_sampler_yields_each_index_once_with_its_augment_seed():
    items = epoch_of(25, seed=7, epoch=3)
    assert sorted(index for index, _ in items) == list(range(25))
    assert all(seed == augment_seed(7, 3, index) for index, seed in items)
    assert items == epoch_of(25, seed=7, epoch=3)
    assert items != epoch_of(25, seed=7, epoch=4) and items != epoch_of(25, seed=8, epoch=3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ranks_kth_batches_together_are_the_kth_batch_of_one_process(world_size):
    size, batch = 24, 3  # 24 is a multiple of both world sizes, so nothing is padded
    single = batches(epoch_of(size), batch * world_size)
    per_rank = [batches(epoch_of(size, rank, world_size), batch) for rank in range(world_size)]
    assert all(len(rank_batches) == len(single) for rank_batches in per_rank)
    for k, expected in enumerate(single):
        assert Counter(item for rank_batches in per_rank for item in rank_batches[k]) == Counter(expected)


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_size_not_divisible_by_the_ranks_is_padded_with_repeats_of_the_first_entries(world_size):
    size = 25
    single = epoch_of(size)
    ranks = [epoch_of(size, rank, world_size) for rank in range(world_size)]
    assert len({len(items) for items in ranks}) == 1  # every rank takes as many steps
    padding = len(ranks[0]) * world_size - size
    assert 0 < padding < world_size
    # Read back in global order (entry j of rank r is global entry j * W + r): one process's order, then repeats.
    interleaved = [items[step] for step in range(len(ranks[0])) for items in ranks]
    assert interleaved == single + single[:padding]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_skip_resumes_exactly_where_the_epoch_would_have_continued(world_size):
    size = 25
    for rank in range(world_size):
        whole = epoch_of(size, rank, world_size)
        for skip in range(0, len(whole) * world_size + 1, world_size):
            assert epoch_of(size, rank, world_size, skip=skip) == whole[skip // world_size:]


def test_skip_is_for_one_epoch_only_and_must_be_a_multiple_of_the_world_size():
    sampler = TrainSampler(range(25), rank=1, world_size=3, seed=0)
    sampler.set_epoch(2, skip=6)
    assert len(sampler) == 9 - 2
    sampler.set_epoch(3)
    assert len(sampler) == len(list(sampler)) == 9
    for skip in (1, 4, -3, 30):  # not a multiple of 3, negative, past the padded 27 entries
        with pytest.raises(ValueError, match="skip must be a multiple of world_size 3"):
            sampler.set_epoch(2, skip)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_count_every_index_exactly_once(world_size):
    size = 10
    shards = [ShardSampler(size, rank, world_size) for rank in range(world_size)]
    indices = [index for shard in shards for index in shard]
    assert sorted(indices) == list(range(size))
    assert [len(shard) for shard in shards] == [len(list(shard)) for shard in shards]
    assert list(shards[0]) == list(range(0, size, world_size))
