"""bcnn.feature_cache on a generated mini-CUB at 32 px with a random VGG16: cached features give the live
path's logits, caches are reused and keyed on what determines them, a failed build leaves nothing, and the
cache feeds build_loader like an image dataset.

Tolerance, from float16 storage: rounding to nearest float16 changes each stored value f_i by at most a factor
(1 ± 2^-11), so a logit w·f + b read from the cache is off by at most 2^-11 · Σ_i |w_i f_i|, and each stored
feature by at most 2^-11 |f_i| (+ 1e-7 absolute for float16's subnormals below 6e-5). That is about 1e-3
relative; the float32 backbone's own differences (the cache runs it channels-last, in other batches) are ~1e-6
relative and fit inside it.
"""

import copy
import json
import logging
import os
import pickle
from collections import namedtuple

import pytest
import torch

from bcnn.config import DataConfig, ModelConfig
from bcnn.data import build_dataset, build_loader, write_synthetic_cub
from bcnn.errors import UserError
from bcnn.feature_cache import FeatureCache, build_feature_cache, cache_key, classifier_logits
from bcnn.models import build_model

CPU = torch.device("cpu")
FLOAT16_ROUNDING = 2.0**-11  # largest relative error of rounding to the nearest float16 (unit roundoff)
FLOAT16_SUBNORMAL = 1e-7


def data_config(root, **overrides) -> DataConfig:
    return DataConfig(**{"root": str(root), "resize": 40, "crop": 32, "val_fraction": 0.2, **overrides})


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_synthetic_cub(tmp_path_factory.mktemp("fc") / "cub", classes=3, per_class=6, seed=0)


@pytest.fixture(scope="module")
def train_set(cub):
    return build_dataset(data_config(cub), "train", train_transform=False)


def random_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone_weights="none"), 3, input_size=32)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def cache(model, train_set, tmp_path_factory):
    """Both views of the train split, fp32, built in batches of 4 (a partial last batch) read by a loader worker:
    shared, read-only."""
    return build_feature_cache(model, train_set, ("center", "flip"), tmp_path_factory.mktemp("cache"), CPU,
                               batch_size=4, num_workers=1)


def eval_images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, 32, 32), the eval transform


def rows(cache, view: str) -> torch.Tensor:
    """The cached features of one view, in image order: rows are view-major."""
    start = cache.views.index(view) * cache.num_images
    return torch.stack([cache[row][0] for row in range(start, start + cache.num_images)])


def assert_storage_close(cache, view, live_features, live_logits, model):
    cached = rows(cache, view)
    torch.testing.assert_close(cached, live_features, rtol=FLOAT16_ROUNDING, atol=FLOAT16_SUBNORMAL)
    with torch.no_grad():
        cached_logits = classifier_logits(model, cached)
        # (N, classes): the worst case of every feature rounded by 2^-11 the same way as its weight's sign
        bound = FLOAT16_ROUNDING * live_features.abs() @ model.classifier.weight.abs().T + FLOAT16_SUBNORMAL
    assert cached_logits.dtype == torch.float32
    assert ((cached_logits - live_logits).abs() <= bound).all()
    return cached_logits, bound


@torch.no_grad()
def live_features_and_logits(model, images, flip: bool, precision: str = "fp32"):
    """model(x) of the view, and the classifier's input on the way (one forward)."""
    images = torch.flip(images, dims=[3]) if flip else images
    if precision == "bf16":
        # The cache runs the backbone channels-last; in bf16 the CPU's NCHW kernels round differently.
        images = images.contiguous(memory_format=torch.channels_last)
    seen = []
    hook = model.classifier.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
    finally:
        hook.remove()
    return seen[0], logits


def test_cached_features_give_the_live_logits_of_each_view(model, train_set, cache):
    assert len(cache) == 2 * len(train_set) and cache.feature_dim == 512 * 512
    assert cache.targets == train_set.targets * 2 and cache.classes == train_set.classes
    images = eval_images(train_set)
    center = live_features_and_logits(model, images, flip=False)
    flip = live_features_and_logits(model, images, flip=True)
    center_logits, bound = assert_storage_close(cache, "center", *center, model)
    assert_storage_close(cache, "flip", *flip, model)
    assert not ((center_logits - flip[1]).abs() <= bound).all()  # the tolerance does tell the views apart


def test_bf16_cache_matches_the_live_bf16_path(model, train_set, tmp_path):
    cache = build_feature_cache(model, train_set, ("center", "flip"), tmp_path, CPU, precision="bf16", batch_size=4)
    images = eval_images(train_set)
    for view in ("center", "flip"):
        assert_storage_close(cache, view, *live_features_and_logits(model, images, view == "flip", "bf16"), model)


def test_the_same_inputs_reuse_the_folder_without_computing(model, train_set, cache, monkeypatch, caplog):
    first, cache_root = cache, cache.folder.parent
    written = os.stat(first.folder / "features.f16").st_mtime_ns

    def no_forward(x):
        raise AssertionError("the backbone ran although the cache exists")

    monkeypatch.setattr(model.backbone, "forward", no_forward)
    with caplog.at_level(logging.INFO, logger="bcnn"):
        again = build_feature_cache(model, copy.copy(train_set), ("center", "flip"), cache_root, CPU)
    assert again.folder == first.folder and "reusing" in caplog.text
    assert os.stat(again.folder / "features.f16").st_mtime_ns == written
    assert [path.name for path in cache_root.iterdir()] == [first.folder.name]
    meta = json.loads((first.folder / "meta.json").read_text())
    assert meta["key"] == first.folder.name and meta["shape"] == [len(first), 512 * 512]
    assert meta["views"] == ["center", "flip"] and meta["dtype"] == "float16" and meta["order"] == "view-major"


def test_the_key_changes_with_everything_that_changes_the_features(model, train_set, cub):
    base = cache_key(model, train_set, ("center", "flip"), "fp32")
    assert cache_key(random_model(), build_dataset(data_config(cub), "train", False), ("center", "flip"),
                     "fp32") == base  # rebuilt the same way: the same key
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.backbone[0].weight[0, 0, 0, 0] += 1e-3
    eps = copy.deepcopy(model)
    eps.pooling.sqrt_eps = 1e-4
    average = build_model(ModelConfig(backbone_weights="none", pooling="avg"), 3, input_size=32)
    average.backbone.load_state_dict(model.backbone.state_dict())
    pool5 = build_model(ModelConfig(backbone_weights="none", cut="pool5"), 3, input_size=32)
    pool5.backbone.load_state_dict(model.backbone.state_dict())
    others = {
        "views": cache_key(model, train_set, ("center",), "fp32"),
        "view order": cache_key(model, train_set, ("flip", "center"), "fp32"),
        "precision": cache_key(model, train_set, ("center", "flip"), "bf16"),
        "weights": cache_key(moved, train_set, ("center", "flip"), "fp32"),
        "sqrt eps": cache_key(eps, train_set, ("center", "flip"), "fp32"),
        "pooling": cache_key(average, train_set, ("center", "flip"), "fp32"),
        "cut": cache_key(pool5, train_set, ("center", "flip"), "fp32"),
        "crop": cache_key(model, build_dataset(data_config(cub, crop=24), "train", False), ("center", "flip"), "fp32"),
        "split": cache_key(model, build_dataset(data_config(cub), "val", False), ("center", "flip"), "fp32"),
        "hold-out": cache_key(model, build_dataset(data_config(cub, val_fraction=0.5), "train", False),
                              ("center", "flip"), "fp32"),
        "bbox crop": cache_key(model, build_dataset(data_config(cub, crop_to_bbox=True), "train", False),
                               ("center", "flip"), "fp32"),
    }
    assert len({base, *others.values()}) == len(others) + 1, others
    assert len(base) == 16 and int(base, 16) >= 0


def test_an_interrupted_build_leaves_no_cache_and_the_next_build_succeeds(model, train_set, cache, tmp_path,
                                                                          monkeypatch):
    real_forward, calls = model.backbone.forward, []

    def fail_in_second_batch(x):  # one view: the second call is the second batch
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_forward(x)

    monkeypatch.setattr(model.backbone, "forward", fail_in_second_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_feature_cache(model, train_set, ("flip",), tmp_path, CPU, batch_size=3)
    assert list(tmp_path.iterdir()) == []  # neither <key> nor <key>.tmp-*
    monkeypatch.undo()
    rebuilt = build_feature_cache(model, train_set, ("flip",), tmp_path, CPU, batch_size=3)
    assert rebuilt.folder.name == cache_key(model, train_set, ("flip",), "fp32")
    assert rows(rebuilt, "flip").equal(rows(cache, "flip"))


def test_a_killed_builds_leftover_is_neither_reused_nor_in_the_way(model, train_set, tmp_path, caplog):
    key = cache_key(model, train_set, ("center",), "fp32")
    leftover = tmp_path / f"{key}.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "features.f16").write_bytes(b"\0" * 64)
    with caplog.at_level(logging.WARNING, logger="bcnn"):
        cache = build_feature_cache(model, train_set, ("center",), tmp_path, CPU)
    assert cache.folder == tmp_path / key and "interrupted build" in caplog.text


def test_a_damaged_cache_folder_is_an_error_not_a_cache(model, train_set, tmp_path):
    key = cache_key(model, train_set, ("center",), "fp32")
    (tmp_path / key).mkdir()
    (tmp_path / key / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="delete that folder"):
        build_feature_cache(model, train_set, ("center",), tmp_path, CPU)


def test_too_little_disk_space_says_how_much_is_needed(model, train_set, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("bcnn.feature_cache.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    need_gb = 2 * len(train_set) * 512 * 512 * 2 / 1e9
    with pytest.raises(UserError, match=rf"needs {need_gb:.2f} GB .* cache folder .* off"):
        build_feature_cache(model, train_set, ("center", "flip"), tmp_path, CPU)
    assert list(tmp_path.iterdir()) == []


def test_bad_views_precision_or_a_random_transform_are_refused(model, train_set, cub, tmp_path):
    with pytest.raises(UserError, match="views"):
        build_feature_cache(model, train_set, ("center", "crop"), tmp_path, CPU)
    with pytest.raises(UserError, match="precision"):
        build_feature_cache(model, train_set, ("center",), tmp_path, CPU, precision="int8")
    augmented = build_dataset(data_config(cub), "train", train_transform=True)
    with pytest.raises(ValueError, match="eval transform"):
        build_feature_cache(model, augmented, ("center",), tmp_path, CPU)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_cache_feeds_build_loader_like_an_image_dataset(cache, num_workers):
    assert cache[(3, 12345)][0].equal(cache[3][0])  # TrainSampler's (index, augment_seed): the seed is ignored
    assert len(pickle.dumps(cache)) < 100_000  # workers reopen the memmap rather than receive a copy
    loader = build_loader(cache, batch_size=5, train=True, num_workers=num_workers, seed=0)
    loader.sampler.set_epoch(1)
    order = [index for index, _ in loader.sampler]
    batches = list(loader)
    features = torch.cat([batch for batch, _ in batches])
    targets = torch.cat([target for _, target in batches])
    assert sorted(order) == list(range(len(cache))) and [len(b) for b, _ in batches] == [5, 5, 2]
    assert features.dtype == torch.float32 and features.shape == (len(cache), 512 * 512)
    assert features.equal(torch.stack([cache[i][0] for i in order]))
    assert targets.tolist() == [cache.targets[i] for i in order]


def test_a_cache_folder_opens_by_itself(cache, train_set):
    opened = FeatureCache(cache.folder)
    assert len(opened) == 2 * len(train_set) and opened.views == ("center", "flip")
    assert opened.num_images == len(train_set) and opened.classes == train_set.classes
    assert opened[len(opened) - 1][0].equal(cache[len(cache) - 1][0])


def test_rows_held_in_device_memory_give_the_data_loaders_batches(cache):
    """ResidentFeatureLoader (the GPU's loader when the rows fit) against a DataLoader over the cache, on the CPU:
    the same sampler, so the same batches, bit for bit."""
    from bcnn.feature_cache import ResidentFeatureLoader
    for train in (True, False):
        resident = ResidentFeatureLoader(cache, 4, train, seed=2, device=CPU)
        reference = build_loader(cache, 4, train, num_workers=0, seed=2)
        if train:
            resident.sampler.set_epoch(3)
            reference.sampler.set_epoch(3)
        pairs = list(zip(resident, reference))
        assert len(resident) == len(reference) == len(pairs)
        for (features, labels), (expected, expected_labels) in pairs:
            assert torch.equal(features, expected) and torch.equal(labels, expected_labels)


def test_a_cache_built_from_batched_decoding_has_its_own_key_and_close_rows(model, train_set, cache, cub, tmp_path):
    batched = build_feature_cache(model, train_set, ("center", "flip"), tmp_path, CPU, num_workers=1,
                                  data_cfg=data_config(cub, decode="gpu"))
    assert batched.folder.name != cache.folder.name  # PIL's rounding and torch's: another key
    # Inputs within one grey level of each other (tests/test_gpu_decode.py): the unit-norm rows (elements up to
    # about 1e-2 here) differ by at most 1.5e-4 as measured on these images; 1e-3 leaves room for other CPUs'
    # rounding, while another crop or flip would move elements by their own size.
    for view in ("center", "flip"):
        assert torch.allclose(rows(batched, view), rows(cache, view), rtol=0, atol=1e-3)
