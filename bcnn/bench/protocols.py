"""--protocols: the time of bcnn.eval's k-NN and retrieval (bcnn.protocols) at CUB's size, on random unit vectors
(the protocols' cost depends on the sizes alone, not on the values): 5,794 test queries against 5,994 train
images at 8,192 dimensions (a compact head's vector), 200 classes. Target on a 2-core CPU: k-NN under 10 s.

    python -m bcnn.bench --protocols                                  # CUB's sizes
    python -m bcnn.bench --protocols --protocol-sizes 1000 1000 512   # queries, gallery, dimensions
"""

from __future__ import annotations

import time

import torch

from bcnn.bench.settings import Settings
from bcnn.protocols import knn_accuracy, retrieval_metrics

CUB_SIZES = (5794, 5994, 8192)  # CUB-200-2011's test and train images; compact bilinear pooling's 8,192-d vector
KNN_TARGET_SECONDS = 10.0


def timed(function, *args, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def run_protocols(settings: Settings, sizes: tuple[int, int, int] = CUB_SIZES) -> dict:
    queries, gallery, dim = sizes
    generator = torch.Generator().manual_seed(0)
    query_vectors = torch.randn(queries, dim, generator=generator).to(settings.device)
    gallery_vectors = torch.randn(gallery, dim, generator=generator).to(settings.device)
    query_labels = torch.randint(settings.classes, (queries,), generator=generator).to(settings.device)
    gallery_labels = torch.randint(settings.classes, (gallery,), generator=generator).to(settings.device)
    knn_accuracy(query_vectors[:8], query_labels[:8], gallery_vectors, gallery_labels)  # warm-up: first-call costs
    _, knn_seconds = timed(knn_accuracy, query_vectors, query_labels, gallery_vectors, gallery_labels)
    _, retrieval_seconds = timed(retrieval_metrics, query_vectors, query_labels)
    return {
        "device": settings.device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "queries": queries, "gallery": gallery, "dim": dim, "classes": settings.classes,
        "knn_seconds": knn_seconds,
        "retrieval_seconds": retrieval_seconds,
        "knn_target_seconds": KNN_TARGET_SECONDS,
        "command": (f"python -m bcnn.bench --protocols --device {settings.device.type} --protocol-sizes {queries} "
                    f"{gallery} {dim} --classes {settings.classes}"),
    }


def format_protocols(result: dict) -> str:
    met = "under" if result["knn_seconds"] < result["knn_target_seconds"] else "OVER"
    return "\n".join([
        f"bcnn.bench --protocols ({result['device']}, {result['threads']} threads); torch {result['torch']}",
        f"k-NN (k = 10, 20, 100, 200): {result['queries']:,} queries x {result['gallery']:,} gallery x "
        f"{result['dim']:,}-d, {result['classes']} classes: {result['knn_seconds']:.2f} s ({met} the "
        f"{result['knn_target_seconds']:.0f}-s target at CUB's size)",
        f"retrieval (Recall@1-8, precision@1, R-precision, MAP@R) within the {result['queries']:,} queries: "
        f"{result['retrieval_seconds']:.2f} s",
        "random unit vectors: the time depends on the sizes, not the values; embedding the images is not included",
        f"reproduce: {result['command']}",
    ])
