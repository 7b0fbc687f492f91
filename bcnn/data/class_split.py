"""data.class_split=retrieval: the class-disjoint protocol of deep metric learning (Oh Song et al., CVPR 2016;
Musgrave et al., "A Metric Learning Reality Check", ECCV 2020): the first half of a dataset's classes, in its own
order, is trained on, and the second half is the test set, every image of a class in one half whatever its
official split (a format's own val split included: val is held out of the first half). CUB-200-2011: classes 1-100 (5,864 images) / 101-200 (5,924); Stanford Cars: 1-98 / 99-196. An odd
number of classes leaves the extra one to the test half.

    train, val, trainval: the first half's images (official train and test alike), val a stratified seeded hold-out
                          of them (data.val_fraction, data.split_seed), labels 0 .. C/2 - 1
    test:                 the second half's images, labels 0 .. C - C/2 - 1 and its own class names

A classifier trained this way has no output for a test class, so bcnn.eval scores the test split by retrieval alone
(--retrieval) and refuses top-1 and k-NN there; val, being images of the trained classes, is scored as usual.
"""

from __future__ import annotations

import copy

from bcnn.data.dataset import SPLITS, _ImageDataset, stratified_holdout
from bcnn.errors import UserError

CLASS_SPLITS = ("all", "retrieval")
# Per-image lists a reader's dataset may hold beside `samples`, kept in step with it.
PER_IMAGE = ("samples", "targets", "bboxes", "box_sources")


def trained_classes(num_classes: int) -> int:
    """How many of the classes (the first ones) the retrieval protocol trains on: half, rounded down."""
    return num_classes // 2


def class_disjoint_split(read_split, split: str, val_fraction: float, split_seed: int) -> _ImageDataset:
    """The `split` of the class-disjoint protocol. read_split(official): the reader's dataset of an official split
    ("trainval": every image outside the official test split; "test"), with the eval or train transform wanted."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; fix data.val_fraction.")
    official_trainval, official_test = read_split("trainval"), read_split("test")
    classes = list(official_trainval.classes)
    half = trained_classes(len(classes))
    if half < 1:
        raise UserError(f"data.class_split=retrieval trains on half of the classes and tests on the other half, and "
                        f"{official_trainval.root} has {len(classes)} class; use data.class_split=all.")
    images = [(dataset, index) for dataset in (official_trainval, official_test) for index in range(len(dataset))]
    if split == "test":
        chosen = [(dataset, index) for dataset, index in images if dataset.targets[index] >= half]
        names, offset = classes[half:], half
    else:
        chosen = [(dataset, index) for dataset, index in images if dataset.targets[index] < half]
        names, offset = classes[:half], 0
        if split == "val" and val_fraction == 0:
            raise UserError("there is no val split with val_fraction 0; set data.val_fraction > 0 (e.g. 0.1).")
        if split in ("train", "val") and val_fraction > 0:
            keep, holdout = stratified_holdout([dataset.targets[index] for dataset, index in chosen], val_fraction,
                                               split_seed)
            chosen = [chosen[i] for i in (holdout if split == "val" else keep)]
    result = copy.copy(official_test if split == "test" else official_trainval)  # the reader's class and transform
    for name in PER_IMAGE:
        if hasattr(result, name):
            setattr(result, name, [getattr(dataset, name)[index] for dataset, index in chosen])
    result.samples = [(path, label - offset) for path, label in result.samples]
    result.targets = [label for _, label in result.samples]
    result.classes, result.split = names, split
    result.class_to_idx = {name: label for label, name in enumerate(names)}
    if not result.samples:
        raise UserError(f"the {split} split of {result.root} under data.class_split=retrieval has no images; check "
                        "the dataset.")
    return result
