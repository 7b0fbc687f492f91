"""bcnn.protocols against a brute-force NumPy float64 reference written here (the whole similarity matrix, a
stable argsort: the same tie rule, lower index first), against answers worked out by hand, and against
pytorch-metric-learning's AccuracyCalculator where it is installed."""

import math

import numpy as np
import pytest
import torch

from bcnn.errors import UserError
from bcnn.protocols import knn_accuracy, retrieval_metrics

# The function and the reference rank the same neighbours (float32 vs float64 similarities of random vectors are
# never near-tied at this size and seed), so their metrics are the same sums of 0/1 hits and of fractions m/R;
# these differ only by float64 rounding of a few hundred terms (~1e-13 of 100).
METRIC_ATOL = 1e-9


def clustered(count, classes, dim=16, seed=0):
    """Vectors around one random centre per class, overlapping enough that accuracy is neither 0 nor 100."""
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(classes, dim))
    labels = generator.integers(0, classes, size=count)
    vectors = centres[labels] + 1.2 * generator.normal(size=(count, dim))
    return vectors.astype(np.float32), labels


def unit(vectors):
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def reference_knn(queries, query_labels, gallery, gallery_labels, ks, temperature):
    similarity = unit(queries) @ unit(gallery).T
    classes = np.unique(np.concatenate([gallery_labels, query_labels]))
    top = min(5, len(classes))
    top1, top5 = {}, {}
    for k in ks:
        k = min(k, len(gallery))
        hits1 = hits5 = 0
        for row, truth in zip(similarity, query_labels):
            near = np.argsort(-row, kind="stable")[:k]
            votes = np.array([np.exp(row[near][gallery_labels[near] == c] / temperature).sum() for c in classes])
            best = classes[np.argsort(-votes, kind="stable")[:top]]
            hits1 += best[0] == truth
            hits5 += truth in best and truth in gallery_labels[near]
        top1[k], top5[k] = 100 * hits1 / len(queries), 100 * hits5 / len(queries)
    return top1, top5


def reference_retrieval(vectors, labels, ks):
    similarity = unit(vectors) @ unit(vectors).T
    sums = {**{f"recall@{k}": 0.0 for k in ks}, "precision@1": 0.0, "r_precision": 0.0, "map@r": 0.0}
    queries = 0
    for i in range(len(vectors)):
        others = np.delete(np.arange(len(vectors)), i)
        ranked_labels = labels[others[np.argsort(-similarity[i, others], kind="stable")]]
        relevant = ranked_labels == labels[i]
        r = int(relevant.sum())
        if r == 0:
            continue
        queries += 1
        for k in ks:
            sums[f"recall@{k}"] += relevant[:k].any()
        sums["precision@1"] += relevant[0]
        sums["r_precision"] += relevant[:r].sum() / r
        sums["map@r"] += sum(relevant[:i + 1].sum() / (i + 1) for i in range(r) if relevant[i]) / r
    return {name: 100 * total / queries for name, total in sums.items()}, queries


@pytest.mark.parametrize("chunk", [1, 37, 300, 4096])
def test_knn_matches_numpy_reference(chunk):
    queries, query_labels = clustered(300, classes=8, seed=1)
    gallery, gallery_labels = clustered(250, classes=8, seed=2)
    ks, temperature = (1, 10, 20, 100, 200, 300), 0.07  # 300 > the gallery: cut to 250
    result = knn_accuracy(torch.from_numpy(queries), torch.from_numpy(query_labels), torch.from_numpy(gallery),
                          torch.from_numpy(gallery_labels), ks=ks, temperature=temperature, chunk=chunk)
    top1, top5 = reference_knn(queries, query_labels, gallery, gallery_labels, ks, temperature)
    assert result["k_used"] == {1: 1, 10: 10, 20: 20, 100: 100, 200: 200, 300: 250}
    for k in ks:
        assert result["top1"][k] == pytest.approx(top1[min(k, 250)], abs=METRIC_ATOL)
        assert result["top5"][k] == pytest.approx(top5[min(k, 250)], abs=METRIC_ATOL)
    assert 100 / 8 < result["top1"][10] < 100  # above chance, not trivial: the comparison means something


@pytest.mark.parametrize("chunk", [1, 37, 301, 4096])
def test_retrieval_matches_numpy_reference(chunk):
    vectors, labels = clustered(301, classes=6, seed=3)
    labels[0] = 99  # a class of one item: a query with nothing to retrieve, skipped
    result = retrieval_metrics(torch.from_numpy(vectors), torch.from_numpy(labels), chunk=chunk)
    expected, queries = reference_retrieval(vectors, labels, (1, 2, 4, 8))
    assert (result["queries"], result["skipped"]) == (queries, 1) == (300, 1)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=METRIC_ATOL), name
    assert result["precision@1"] == result["recall@1"]
    assert 0 < result["map@r"] < result["r_precision"] < result["recall@8"] < 100


def test_chunking_changes_nothing():
    """Peak memory is a few (chunk, gallery) tables; chunks must give bit-identical numbers, not close ones."""
    vectors, labels = clustered(203, classes=5, seed=4)
    vectors, labels = torch.from_numpy(vectors), torch.from_numpy(labels)
    knn = [knn_accuracy(vectors[:90], labels[:90], vectors[90:], labels[90:], chunk=chunk) for chunk in (1, 7, 90)]
    retrieval = [retrieval_metrics(vectors, labels, chunk=chunk) for chunk in (1, 7, 203)]
    assert knn[0] == knn[1] == knn[2]
    assert retrieval[0] == retrieval[1] == retrieval[2]


def on_circle(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_knn_on_a_circle_by_hand():
    # Gallery A at 0 and 20 degrees, B at 50 and 110. The query at 40 (A) has B at 10 degrees first, then A at 20
    # and 40: with T = 0.07, B's exp(cos 10/T) beats A's exp(cos 20/T) + exp(cos 40/T) (ratio 1 : 0.57); with
    # T = 1, A's e^0.940 + e^0.766 = 4.71 beats B's e^0.985 = 2.68 (k = 3) or + e^0.342 = 4.08 (k = 4). The query
    # at 100 (B) has B at 10 and 50 degrees first: right for every k and T.
    gallery, gallery_labels = on_circle([0, 20, 50, 110]), torch.tensor([0, 0, 1, 1])
    queries, query_labels = on_circle([40, 100]), torch.tensor([0, 1])
    sharp = knn_accuracy(queries, query_labels, gallery, gallery_labels, ks=(1, 3, 10))
    flat = knn_accuracy(queries, query_labels, gallery, gallery_labels, ks=(1, 3, 10), temperature=1.0)
    assert sharp["top1"] == {1: 50.0, 3: 50.0, 10: 50.0}
    assert flat["top1"] == {1: 50.0, 3: 100.0, 10: 100.0}
    assert sharp["k_used"] == {1: 1, 3: 3, 10: 4}
    assert sharp["top5"] == {1: 50.0, 3: 100.0, 10: 100.0}  # top-2 of 2 classes: a hit once the class has a vote


def test_retrieval_on_a_circle_by_hand():
    # Items at 0, 20, 50, 110, 175, 255 degrees, classes A B B A A C. Nearest first (angular distance), classes:
    #   0 (A, R=2): 20 B, 50 B, 255 C, 110 A, 175 A    -> hits at 4, 5: recall@4; RP 0;   MAP@R 0
    #   1 (B, R=1): 0 A, 50 B, 110 A, 255 C, 175 A     -> hit at 2: recall@2;      RP 0;   MAP@R 0
    #   2 (B, R=1): 20 B, ...                          -> hit at 1: recall@1;      RP 1;   MAP@R 1
    #   3 (A, R=2): 50 B, 175 A, 20 B, 0 A, 255 C      -> hits at 2, 4: recall@2;  RP 1/2; MAP@R (1/2)/2
    #   4 (A, R=2): 110 A, 255 C, 50 B, 20 B, 0 A      -> hits at 1, 5: recall@1;  RP 1/2; MAP@R 1/2
    #   5 (C): no other C, skipped.
    result = retrieval_metrics(on_circle([0, 20, 50, 110, 175, 255]), torch.tensor([0, 1, 1, 0, 0, 2]))
    assert (result["queries"], result["skipped"]) == (5, 1)
    assert result["k_used"] == {1: 1, 2: 2, 4: 4, 8: 5}
    expected = {"recall@1": 40.0, "recall@2": 80.0, "recall@4": 100.0, "recall@8": 100.0, "precision@1": 40.0,
                "r_precision": 100 * 2 / 5, "map@r": 100 * 1.75 / 5}
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=METRIC_ATOL), name


def test_exact_ties_rank_the_lower_index_first():
    # Copies of one axis vector: their dot products are exactly 1, so the tie is exact in any summation order.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    # Retrieval: 0 (class 0) sees 1 and 2 (class 1) tied: 1 first. 1 sees 0 (class 0) then 2 (class 1). 2 sees 0
    # first. 3 (class 0, orthogonal to all) sees 0, 1, 2 tied at 0: 0 first, a hit. The reverse rule would give
    # precision@1 50 (queries 0 and 1 would see item 2 first).
    result = retrieval_metrics(torch.tensor([e1, e1, e1, e2]), torch.tensor([0, 1, 1, 0]))
    assert result["precision@1"] == 25.0
    assert result["recall@2"] == 75.0
    # k-NN: the gallery holds e1 twice, class 1 then class 0. k = 1 takes gallery item 0 (class 1, wrong); k = 2
    # ties the two classes' votes, and the lower label (0, right) wins.
    knn = knn_accuracy(torch.tensor([e1]), torch.tensor([0]), torch.tensor([e1, e1]), torch.tensor([1, 0]),
                       ks=(1, 2))
    assert knn["top1"] == {1: 0.0, 2: 100.0}


def test_labels_need_not_be_dense():
    vectors, labels = clustered(120, classes=4, seed=5)
    vectors = torch.from_numpy(vectors)
    dense, sparse = torch.from_numpy(labels), torch.from_numpy(labels * 1000 - 7)
    assert retrieval_metrics(vectors, dense) == retrieval_metrics(vectors, sparse)
    assert (knn_accuracy(vectors[:50], dense[:50], vectors[50:], dense[50:])
            == knn_accuracy(vectors[:50], sparse[:50], vectors[50:], sparse[50:]))


def test_agrees_with_pytorch_metric_learning():
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    vectors, labels = clustered(301, classes=6, seed=3)
    labels[0] = 99  # one of their "lone" queries
    calculator = accuracy_calculator.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()))  # cosine, like ours; their default needs faiss
    theirs = calculator.get_accuracy(torch.from_numpy(vectors), torch.from_numpy(labels))  # each item vs the rest
    ours = retrieval_metrics(torch.from_numpy(vectors), torch.from_numpy(labels))
    # Both rank the same neighbours; their float32 averages round to ~1e-7 relative (of ~100 in percent).
    assert ours["precision@1"] == pytest.approx(100 * theirs["precision_at_1"], abs=1e-4)
    assert ours["r_precision"] == pytest.approx(100 * theirs["r_precision"], abs=1e-4)
    assert ours["map@r"] == pytest.approx(100 * theirs["mean_average_precision_at_r"], abs=1e-4)


def test_knn_and_retrieval_on_the_vectors_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vectors, labels = clustered(150, classes=5, seed=6)
    vectors, labels = torch.from_numpy(vectors), torch.from_numpy(labels)
    on_cpu = retrieval_metrics(vectors, labels)
    on_gpu = retrieval_metrics(vectors.cuda(), labels.cuda())
    for name in ("recall@1", "recall@8", "map@r"):
        assert on_gpu[name] == pytest.approx(on_cpu[name], abs=METRIC_ATOL)


@pytest.mark.parametrize("call, message", [
    (lambda: knn_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.ones(3, 4),
                          torch.zeros(3, dtype=torch.long)), "the query set is empty"),
    (lambda: knn_accuracy(torch.ones(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(0, 4),
                          torch.zeros(0, dtype=torch.long)), "the gallery set is empty"),
    (lambda: retrieval_metrics(torch.ones(5, 4), torch.zeros(4, dtype=torch.long)),
     "has 5 vectors but labels of shape (4,)"),
    (lambda: retrieval_metrics(torch.tensor([[1.0, 0], [float("nan"), 1], [0, float("inf")], [1, 1]]),
                               torch.zeros(4, dtype=torch.long)), "2 of the 4 retrieval vectors hold NaN or inf"),
    (lambda: knn_accuracy(torch.ones(2, 4), torch.zeros(2, dtype=torch.long), torch.ones(3, 5),
                          torch.zeros(3, dtype=torch.long)), "4 dimensions but gallery vectors 5"),
    (lambda: retrieval_metrics(torch.eye(3), torch.tensor([0, 1, 2])), "none of the 3 items shares its class"),
    (lambda: retrieval_metrics(torch.eye(3), torch.tensor([0.0, 0.0, 1.0])), "give integer class labels"),
    (lambda: retrieval_metrics(torch.eye(3), torch.tensor([0, 0, 1]), chunk=0), "chunk must be a positive"),
    (lambda: retrieval_metrics(torch.eye(3), torch.tensor([0, 0, 1]), ks=(0,)), "ks must be positive"),
    (lambda: knn_accuracy(torch.eye(3), torch.tensor([0, 0, 1]), torch.eye(3), torch.tensor([0, 0, 1]),
                          temperature=0), "temperature must be a positive number"),
])
def test_bad_input_is_refused_in_one_sentence(call, message):
    with pytest.raises(UserError) as refusal:
        call()
    assert message in str(refusal.value)
    assert str(refusal.value).count(". ") == 0 and str(refusal.value).endswith(".")


def test_the_partial_ranking_equals_the_full_stable_sort_ties_included():
    # Scores with many ties (5 values) and -inf (retrieval's own item): the first `depth` of a full stable sort, the
    # reference, against _top, which sorts only the candidates at or above each row's depth-th largest score.
    from bcnn.protocols import _ranked, _top

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (64, 400), generator=generator).float()
    scores[torch.arange(64), torch.arange(64)] = -torch.inf
    for depth in (1, 7, 60, 99):
        assert torch.equal(_top(scores, depth), _ranked(scores)[:, :depth]), depth
    distinct = torch.randn(32, 1000, generator=generator)
    assert torch.equal(_top(distinct, 200), torch.argsort(-distinct, dim=1)[:, :200])


@pytest.mark.parametrize("gallery_chunk", [1, 3, 7, 40])
def test_a_gallery_compared_in_chunks_gives_the_same_numbers_ties_included(gallery_chunk):
    # Vectors on a coarse grid, so that many similarities tie exactly: the merge of each chunk's nearest must keep
    # the whole gallery's order (equal similarities by lower index), as one chunk does.
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randint(-1, 2, (60, 4), generator=generator).float()
    vectors[vectors.abs().sum(1) == 0, 0] = 1.0  # no zero vector
    labels = torch.randint(0, 5, (60,), generator=generator)
    queries, gallery = vectors[:25], vectors[25:]
    whole = knn_accuracy(queries, labels[:25], gallery, labels[25:], ks=(1, 3, 10, 200))
    chunked = knn_accuracy(queries, labels[:25], gallery, labels[25:], ks=(1, 3, 10, 200), chunk=4,
                           gallery_chunk=gallery_chunk)
    assert chunked == whole
    assert retrieval_metrics(vectors, labels, chunk=9, gallery_chunk=gallery_chunk) == retrieval_metrics(vectors, labels)
