"""Evaluation protocols over embeddings: vectors and labels in, numbers (percent) out. Nothing here knows of
datasets, heads or checkpoints; bcnn.eval extracts the vectors and calls these.

    knn_accuracy(queries, query_labels, gallery, gallery_labels)  # {"top1": {k: %}, "top5": {k: %}, "k_used", ...}
    retrieval_metrics(vectors, labels)                            # {"recall@1": %, ..., "map@r": %, ...}

Both compare L2-normalised vectors by cosine similarity, in float32 on the queries' device, a chunk of queries
against a chunk of the gallery at a time (the gallery may stay in host memory: each of its chunks is moved as it is
used): the peak memory is a few (chunk, gallery chunk) tables, never (queries, gallery) or (queries, gallery, dim).

Ties: neighbours with equal similarity rank by gallery index, lower first (a stable sort, not torch.topk, whose
order among equal values is unspecified); classes with equal k-NN votes rank by label, lower first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bcnn.errors import UserError

DINOV2_KS = (10, 20, 100, 200)  # facebookresearch/dinov2, dinov2/eval/knn.py: --nb_knn
DINOV2_TEMPERATURE = 0.07  # the same file's --temperature
RETRIEVAL_KS = (1, 2, 4, 8)  # Recall@K as reported on CUB-200-2011 since Song et al. (CVPR 2016)
DEFAULT_CHUNK = 1024
# Gallery rows compared at once: (chunk, gallery chunk) similarities, 1 GB of float32 with the defaults. CUB's and most
# fine-grained galleries are one chunk; iNaturalist 2021's 2.7 M train images are 11.
DEFAULT_GALLERY_CHUNK = 262_144


def knn_accuracy(queries, query_labels, gallery, gallery_labels, ks=DINOV2_KS, temperature=DINOV2_TEMPERATURE,
                 chunk=DEFAULT_CHUNK, gallery_chunk=DEFAULT_GALLERY_CHUNK) -> dict:
    """Weighted k-NN classification as DINOv2 evaluates it: each query's k most similar gallery items vote for
    their class with weight exp(similarity / temperature); the class with the most votes is the prediction.
    Returns top-1 and top-5 accuracy in percent for each k; a k larger than the gallery is cut to its size
    ("k_used" says to what). Top-5 takes min(5, classes) classes, and a class no neighbour voted for never counts
    as a hit (DINOv2 would count one that fills the five with score 0; only possible when k < 5)."""
    queries, query_labels = _checked_set(queries, query_labels, "query")
    gallery, gallery_labels = _checked_set(gallery, gallery_labels, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise UserError(f"query vectors have {queries.shape[1]} dimensions but gallery vectors "
                        f"{gallery.shape[1]}: embed both with the same model.")
    ks = _checked_ks(ks)
    _check_positive(temperature, "temperature")
    _check_chunk(chunk)
    k_used = {k: min(k, len(gallery)) for k in ks}
    # Dense class ids in label order, so that "lower class id" is "lower label".
    classes, class_ids = torch.unique(torch.cat([gallery_labels, query_labels.to(gallery_labels.device)]),
                                      return_inverse=True)
    class_ids = class_ids.to(queries.device)
    gallery_classes, query_classes = class_ids[:len(gallery)], class_ids[len(gallery):]
    top = min(5, len(classes))
    hits = {"top1": dict.fromkeys(ks, 0), "top5": dict.fromkeys(ks, 0)}
    _check_chunk(gallery_chunk, "gallery_chunk")
    query_units = _unit_rows(queries)
    gallery, units = _gallery_units(gallery, queries.device)
    depth = max(k_used.values())
    for start in range(0, len(queries), chunk):
        near_similarity, order = _nearest(query_units[start:start + chunk], gallery, depth, gallery_chunk,
                                          units=units)
        # exp((s - s_max) / T) is exp(s / T) over a constant per query: the same vote (DINOv2 takes a softmax)
        # without overflow at small temperatures.
        weights = torch.exp((near_similarity - near_similarity[:, :1]) / temperature)  # (chunk, depth)
        near_classes = gallery_classes[order]
        truth = query_classes[start:start + chunk, None]
        for k in ks:
            votes = torch.zeros(len(order), len(classes), device=queries.device)
            votes.scatter_add_(1, near_classes[:, :k_used[k]], weights[:, :k_used[k]])
            best = _ranked(votes)[:, :top]  # (chunk, top)
            voted = (near_classes[:, :k_used[k]] == truth).any(dim=1)
            hits["top1"][k] += int((best[:, 0] == truth[:, 0]).sum())
            hits["top5"][k] += int(((best == truth).any(dim=1) & voted).sum())
    return {"top1": {k: 100 * hits["top1"][k] / len(queries) for k in ks},
            "top5": {k: 100 * hits["top5"][k] / len(queries) for k in ks},
            "k_used": k_used, "top5_classes": top, "queries": len(queries), "gallery": len(gallery)}


def retrieval_metrics(vectors, labels, ks=RETRIEVAL_KS, chunk=DEFAULT_CHUNK, gallery_chunk=DEFAULT_GALLERY_CHUNK) -> dict:
    """Retrieval within one set, as Musgrave et al. (ECCV 2020) and pytorch-metric-learning's AccuracyCalculator
    define it: each item queries all the others (itself excluded). In percent:

    - recall@K: a query counts when one of its K nearest neighbours shares its class (K cut to the set size - 1);
    - precision@1: the nearest neighbour shares its class (equal to recall@1);
    - r_precision: the share of the query's class among its R nearest, R = the other items of its class;
    - map@r: the mean over ranks i <= R of precision@i at the ranks that hold its class, divided by R.

    A query whose class has no other item has nothing to retrieve: like AccuracyCalculator (its "lone" queries,
    not_lone_query_mask) every metric skips it; "skipped" counts them and "queries" counts the rest."""
    vectors, labels = _checked_set(vectors, labels, "retrieval")
    if len(vectors) < 2:
        raise UserError("retrieval needs at least 2 vectors, since each one queries the others; got 1.")
    ks = _checked_ks(ks)
    _check_chunk(chunk)
    _, class_ids, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    class_ids = class_ids.to(vectors.device)
    relevant_count = (class_sizes.to(vectors.device) - 1)[class_ids]  # R for each item
    counted = relevant_count > 0
    if not counted.any():
        raise UserError(f"none of the {len(labels):,} items shares its class with another, so no query can "
                        "retrieve anything: give at least two items of some class.")
    k_used = {k: min(k, len(vectors) - 1) for k in ks}
    depth = max(max(k_used.values()), int(relevant_count.max()))
    _check_chunk(gallery_chunk, "gallery_chunk")
    units = _unit_rows(vectors)
    hits = dict.fromkeys([f"recall@{k}" for k in ks] + ["precision@1"], 0)
    # Per-query fractions, summed once at the end: the same sum in the same order whatever the chunk size.
    fractions = {"r_precision": [], "map@r": []}
    ranks = torch.arange(1, depth + 1, device=vectors.device, dtype=torch.float64)
    for start in range(0, len(vectors), chunk):
        rows = torch.arange(start, min(start + chunk, len(vectors)), device=vectors.device)
        _, near = _nearest(units[rows], units, depth, gallery_chunk, exclude=rows, units=True)  # itself: never
        keep = counted[rows]
        same_class = (class_ids[near] == class_ids[rows, None])[keep]  # (kept, depth)
        r = relevant_count[rows][keep].to(torch.float64)
        for k in ks:
            hits[f"recall@{k}"] += int(same_class[:, :k_used[k]].any(dim=1).sum())
        hits["precision@1"] += int(same_class[:, 0].sum())
        within_r = same_class & (ranks[None, :] <= r[:, None])
        fractions["r_precision"].append(within_r.sum(dim=1) / r)
        precision_at_rank = within_r.cumsum(dim=1) / ranks
        fractions["map@r"].append((precision_at_rank * within_r).sum(dim=1) / r)
    queries = int(counted.sum())
    sums = {**hits, **{name: float(torch.cat(parts).sum()) for name, parts in fractions.items()}}
    return {**{name: 100 * total / queries for name, total in sums.items()},
            "k_used": k_used, "queries": queries, "skipped": len(vectors) - queries}


RETRIEVAL_SCORES = ("precision@1", "r_precision", "map@r")  # with recall@<K>: retrieval_metrics' percentages


def flat_scores(evaluation: dict) -> dict:
    """The k-NN and retrieval scores of an evaluation (bcnn.eval's result or its JSON) as flat keys, knn_top1@<k>,
    recall@<K>, precision@1, r_precision, map@r ({} when it has neither): for TensorBoard and bcnn.report."""
    scores = {}
    knn = evaluation.get("knn")
    if isinstance(knn, dict) and isinstance(knn.get("top1"), dict):
        scores.update({f"knn_top1@{k}": value for k, value in knn["top1"].items()})
    retrieval = evaluation.get("retrieval")
    if isinstance(retrieval, dict):
        scores.update({key: value for key, value in retrieval.items()
                       if key.startswith("recall@") or key in RETRIEVAL_SCORES})
    return scores


def _gallery_units(gallery: torch.Tensor, device) -> tuple[torch.Tensor, bool]:
    """The gallery normalised once when it is on the queries' device (as it is but for a gallery too large for it),
    else as it is, each chunk then normalised as it is moved: (rows, whether they are unit rows)."""
    return (_unit_rows(gallery), True) if gallery.device == torch.device(device) else (gallery, False)


def _nearest(query_units: torch.Tensor, gallery: torch.Tensor, depth: int, gallery_chunk: int,
             exclude: torch.Tensor | None = None, units: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, gallery indices) of each query's `depth` most similar gallery rows, highest first, equal ones
    by lower index: _ranked over the whole gallery, computed a gallery chunk at a time (each normalised and moved to
    the queries' device as it is used, so the gallery itself may stay in host memory). exclude: each query's own
    gallery index (retrieval within one set), which ranks last. units: the gallery's rows are unit rows already.
    Chunks come in index order and the running best precede each new chunk's candidates, so a stable sort of the two
    keeps equal similarities by lower index."""
    best_similarity = best_index = None
    for start in range(0, len(gallery), gallery_chunk):
        rows = gallery[start:start + gallery_chunk]
        rows = rows if units else _unit_rows(rows.to(query_units.device))
        similarity = query_units @ rows.T  # (queries, gallery chunk)
        if exclude is not None:
            own = (exclude >= start) & (exclude < start + len(rows))
            similarity[own.nonzero(as_tuple=True)[0], exclude[own] - start] = -torch.inf
        index = _top(similarity, min(depth, len(rows)))
        chunk_similarity, index = similarity.gather(1, index), index + start
        if best_similarity is not None:
            chunk_similarity = torch.cat([best_similarity, chunk_similarity], dim=1)
            index = torch.cat([best_index, index], dim=1)
            order = _ranked(chunk_similarity)[:, :depth]
            chunk_similarity, index = chunk_similarity.gather(1, order), index.gather(1, order)
        best_similarity, best_index = chunk_similarity, index
    return best_similarity, best_index


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Column indices of each row from highest score to lowest; equal scores keep index order (lower first)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _top(scores: torch.Tensor, depth: int) -> torch.Tensor:
    """_ranked(scores)[:, :depth], without sorting whole rows (a 5,994-wide sort per query was half of k-NN's time
    at CUB's size): the columns scoring at least each row's depth-th largest score (topk's value, whose ties topk
    orders arbitrarily) are laid out in index order, padded, and only they are sorted, stably."""
    rows, width = scores.shape
    if depth >= width // 4:  # the candidates would be most of the row anyway
        return _ranked(scores)[:, :depth]
    threshold = torch.topk(scores, depth, dim=1).values[:, -1:]
    chosen = scores >= threshold  # at least depth per row; more where scores tie at the threshold
    counts = chosen.sum(dim=1)
    row_of, column = chosen.nonzero(as_tuple=True)  # row-major: each row's columns in increasing order
    slot = torch.arange(len(row_of), device=scores.device) - (counts.cumsum(0) - counts)[row_of]
    padded = int(counts.max())
    candidates = torch.zeros(rows, padded, dtype=torch.long, device=scores.device)
    candidate_scores = torch.full((rows, padded), -torch.inf, dtype=scores.dtype, device=scores.device)
    candidates[row_of, slot] = column
    candidate_scores[row_of, slot] = scores[row_of, column]
    # a padding slot (-inf) comes after every real candidate of its row, which are finite or, at worst, -inf earlier
    return candidates.gather(1, _ranked(candidate_scores)[:, :depth])


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.float(), dim=1)  # a zero vector stays zero: similarity 0 to everything


def _checked_set(vectors, labels, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    vectors, labels = torch.as_tensor(vectors), torch.as_tensor(labels)
    if vectors.ndim != 2:
        raise UserError(f"the {name} vectors must be a (count, dimensions) table, not of shape "
                        f"{tuple(vectors.shape)}.")
    if len(vectors) == 0:
        raise UserError(f"the {name} set is empty: give it at least one vector.")
    if labels.ndim != 1 or len(labels) != len(vectors):
        raise UserError(f"the {name} set has {len(vectors):,} vectors but labels of shape {tuple(labels.shape)}: "
                        "give one label per vector.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"the {name} labels are {labels.dtype}: give integer class labels.")
    if not vectors.is_floating_point():
        raise UserError(f"the {name} vectors are {vectors.dtype}: give floating-point vectors.")
    broken = int((~torch.isfinite(vectors)).any(dim=1).sum())
    if broken:
        raise UserError(f"{broken:,} of the {len(vectors):,} {name} vectors hold NaN or infinity: fix or drop "
                        "them before evaluating.")
    return vectors, labels


def _checked_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise UserError(f"ks must be positive whole numbers of neighbours, got {ks}.")
    return ks


def _check_positive(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
        raise UserError(f"{name} must be a positive number, got {value!r}.")


def _check_chunk(chunk, name: str = "chunk") -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"{name} must be a positive whole number of vectors, got {chunk!r}.")
