"""Numbers from a confusion matrix (counts, [true, predicted]): the most confused class pairs and one row per
class, printed and written by bcnn.eval.

    most_confused_pairs(confusion, class_names, k=5)   # [{"true", "predicted", "count", "share"}, ...]
    per_class_rows(confusion, class_names)             # [{"index", "class", "images", "correct", "accuracy"}, ...]

The accuracies themselves come from bcnn.engine.evaluate; the pointing game, which needs heatmaps, from
bcnn.explain.
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def most_confused_pairs(confusion, class_names: list[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells as {true, predicted, count, share}: share is count over the true class's
    images. Ordered by count, then share, then names, so equal counts come out the same way every run."""
    counts = _numpy(confusion).astype(np.int64)
    images = counts.sum(axis=1)
    pairs = [
        {"true": class_names[true], "predicted": class_names[predicted], "count": int(counts[true, predicted]),
         "share": float(counts[true, predicted] / images[true])}
        for true, predicted in zip(*np.nonzero(counts))
        if true != predicted
    ]
    pairs.sort(key=lambda pair: (-pair["count"], -pair["share"], pair["true"], pair["predicted"]))
    return pairs[:k]


def per_class_rows(confusion, class_names: list[str]) -> list[dict]:
    """One row per class: index (the model's label), class, images, correct, accuracy in percent (None for a
    class without images)."""
    counts = _numpy(confusion).astype(np.int64)
    rows = []
    for index, name in enumerate(class_names):
        images, correct = int(counts[index].sum()), int(counts[index, index])
        rows.append({"index": index, "class": name, "images": images, "correct": correct,
                     "accuracy": 100 * correct / images if images else None})
    return rows
