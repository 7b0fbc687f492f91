"""The second-order pooling heads against references computed another way: matrix square roots from a float64
eigendecomposition, covariances and tensor sketches written out in NumPy, the sketch's expectation by averaging
over 2,000 hash draws. Numbers quoted in comments were measured on a 2-core x86 CPU with torch 2.14.
"""

import contextlib

import numpy as np
import pytest
import torch
from helpers.numerics import relative_error

from bcnn.config import ModelConfig
from bcnn.models.pooling import (
    CompactBilinearPooling,
    ISqrtCovPooling,
    MatrixSqrtPooling,
    build_pooling,
    newton_schulz_sqrt,
)

SQRT_EPS = ModelConfig().sqrt_eps


def relu_features(batch: int, channels: int, positions: int, seed: int) -> np.ndarray:
    """(B, C, M) float64, non-negative and sparse like a ReLU layer's output."""
    return np.maximum(np.random.default_rng(seed).standard_normal((batch, channels, positions)), 0.0)


def relu_grams(batch: int, channels: int, positions: int, seed: int) -> np.ndarray:
    """Gram matrices X Xᵀ / M of ReLU features: one dominant eigenvalue (the features' mean) and, with M < C, a
    null space, as VGG16's at 224 pixels has (14 x 14 positions, 512 channels)."""
    x = relu_features(batch, channels, positions, seed)
    return x @ x.transpose(0, 2, 1) / positions


def spread_spectra(batch: int, channels: int, condition: float, seed: int) -> np.ndarray:
    """SPD matrices whose eigenvalues fall log-evenly from 1 to 1 / condition, in random eigenvectors."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((batch, channels, channels)))
    eigenvalues = np.logspace(0, -np.log10(condition), channels)
    return (q * eigenvalues) @ q.transpose(0, 2, 1)


def eigh_sqrt(a: np.ndarray) -> np.ndarray:
    """The principal square root from a float64 eigendecomposition; rounding's negative eigenvalues taken as 0."""
    eigenvalues, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))[:, None, :]) @ vectors.transpose(0, 2, 1)


def frobenius(a: np.ndarray) -> np.ndarray:
    return np.sqrt((a**2).sum(axis=(1, 2)))


def sqrt_error(a: np.ndarray, iterations: int, dtype: torch.dtype, scale=frobenius) -> float:
    """The largest relative Frobenius error over the batch of newton_schulz_sqrt against eigh_sqrt."""
    root = newton_schulz_sqrt(torch.from_numpy(a).to(dtype), torch.from_numpy(scale(a)).to(dtype), iterations)
    reference = eigh_sqrt(a)
    return (frobenius(root.double().numpy() - reference) / frobenius(reference)).max()


def trace(a: np.ndarray) -> np.ndarray:
    return np.trace(a, axis1=1, axis2=2)


def assert_finite_gradient_flow(pooling, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward through pooling; returns the output after checking it and x's gradient are finite."""
    x = x.clone().requires_grad_(True)
    out = pooling(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    return out


# ---- the Newton-Schulz square root shared by matrix_sqrt and isqrt_cov ----


def test_newton_schulz_acts_on_each_eigenvalue_as_the_scalar_iteration():
    # The iteration's matrices are polynomials in A, so they share A's eigenvectors and each eigenvalue e of
    # A / scale follows the scalar recursion t = (3 - z y) / 2, y <- y t, z <- t z from y = e, z = 1: the
    # truncated iteration, not only its limit, can be checked against an eigendecomposition.
    a = spread_spectra(4, 32, 1e4, seed=0)
    eigenvalues, vectors = np.linalg.eigh(a)
    scale = frobenius(a)[:, None]
    for iterations in (1, 5, 10):
        y, z = eigenvalues / scale, np.ones_like(eigenvalues)
        for _ in range(iterations):
            t = (3 - z * y) / 2
            y, z = y * t, t * z
        expected = (vectors * (y * np.sqrt(scale))[:, None, :]) @ vectors.transpose(0, 2, 1)
        for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            root = newton_schulz_sqrt(torch.from_numpy(a).to(dtype), torch.from_numpy(frobenius(a)).to(dtype),
                                      iterations)
            assert root.dtype == dtype
            # float32: 3 products of 32 terms a step, each rounding by about sqrt(32) u = 3e-7 relative, over 10
            # steps: measured 1.3e-7, 4.5e-7, 1.2e-6 after 1, 5, 10 (float64: 4e-15).
            assert relative_error(root, torch.from_numpy(expected)) < rtol, (iterations, dtype)


# ---- matrix_sqrt: improved B-CNN ----


@pytest.mark.parametrize("make_matrices, measured, bound", [
    # 16 Gram matrices of ReLU features, C = 64 channels at 7 x 7 positions: rank 49, so 15 zero eigenvalues.
    pytest.param(lambda: relu_grams(16, 64, 49, seed=0), 1.7e-3, 3e-3, id="relu-gram"),
    pytest.param(lambda: spread_spectra(4, 64, 1e3, seed=1), 2.6e-3, 4e-3, id="spread-1e3"),
    pytest.param(lambda: spread_spectra(4, 64, 1e4, seed=2), 9.0e-3, 1.5e-2, id="spread-1e4"),
])
def test_matrix_sqrt_after_ten_iterations_is_close_to_the_eigendecomposition(make_matrices, measured,
                                                                                     bound):
    # After 10 steps the error is truncation, not rounding: float32 and float64 agree to 2e-7 on 1.7e-3, 2.6e-3
    # and 9.0e-3 (the largest over each batch). An eigenvalue e of A / ||A||_F needs about log(1/e) / log(9/4)
    # steps, so the eigenvalues under 2.25^-10 = 3e-4 of ||A||_F are still short of their roots: the more of the
    # spectrum lies there (1e4), the larger the error. The bound is the measured error with room for other draws
    # (ReLU Grams of seeds 1-5: 1.7e-3 to 2.1e-3), not a rounding tolerance. The authors' code truncates alike.
    matrices = make_matrices()
    iterations = 10  # the default is the authors' 5: test_the_matrix_sqrt_head_is_the_authors_improved_bcnn
    error32 = sqrt_error(matrices, iterations, torch.float32)
    error64 = sqrt_error(matrices, iterations, torch.float64)
    assert error32 < bound and error64 < bound, (error32, error64, measured)
    assert abs(error32 - error64) < 1e-5, (error32, error64)  # truncation dominates float32's rounding


def test_matrix_sqrt_converges_with_more_iterations():
    # In float64 (in float32 the error stalls at rounding, 2e-6): 8.6e-2, 9.0e-3, 6.9e-7, 6.9e-15 after
    # 5, 10, 15, 20 steps: quadratic once every eigenvalue has been reached.
    matrices = spread_spectra(4, 64, 1e4, seed=2)
    errors = [sqrt_error(matrices, iterations, torch.float64) for iterations in (5, 10, 15, 20)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-12, errors


@pytest.mark.parametrize("dtype, iterations, rtol", [
    # 10 steps: the root's truncation error, 1.0e-3 on these features, grows to 1.8e-3 (measured, float32 and
    # float64 alike) under the element-wise square root, which magnifies the error of the small entries.
    (torch.float32, 10, 3e-3),
    # Converged: what is left is the float64 reference's own rounding, magnified alike (measured 1.4e-8).
    (torch.float64, 20, 1e-6),
])
def test_matrix_sqrt_head_equals_signed_sqrt_of_the_eigh_root_l2_normalised(dtype, iterations, rtol):
    features = relu_features(4, 64, 49, seed=3)  # (B, C, HW)
    head = build_pooling(ModelConfig(pooling="matrix_sqrt", matrix_sqrt_iterations=iterations), channels=64)
    out = head(torch.from_numpy(features).to(dtype).reshape(4, 64, 7, 7))

    root = eigh_sqrt(features @ features.transpose(0, 2, 1) / 49).reshape(4, -1)
    expected = authors_signed_sqrt(root)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert out.shape == (4, 64 * 64) and out.dtype == dtype
    assert relative_error(out, torch.from_numpy(expected)) < rtol


def authors_signed_sqrt(z: np.ndarray) -> np.ndarray:
    """cvl-umass/bilinear-cnn BCNN.py's normalisation, in NumPy: sqrt(relu(z) + 1e-5) - sqrt(relu(-z) + 1e-5)."""
    return np.sqrt(np.maximum(z, 0) + SQRT_EPS) - np.sqrt(np.maximum(-z, 0) + SQRT_EPS)


def authors_improved_bcnn(features: np.ndarray, iterations: int) -> np.ndarray:
    """The authors' improved B-CNN head (cvl-umass/bilinear-cnn: TensorProduct, MatrixSquareRootFun.forward, then
    BCNNModule's signed sqrt and L2), written here in float64 NumPy from their forward pass: (B, C, M) -> (B, C*C)."""
    gram = features @ features.transpose(0, 2, 1) / features.shape[2]
    norm = np.sqrt((gram**2).sum(axis=(1, 2), keepdims=True))
    y, identity = gram / norm, np.eye(gram.shape[1])
    z = np.broadcast_to(identity, gram.shape)
    for _ in range(iterations):
        t = 0.5 * (3.0 * identity - z @ y)
        y, z = y @ t, t @ z
    vector = authors_signed_sqrt((y * np.sqrt(norm)).reshape(len(features), -1))
    return vector / np.linalg.norm(vector, axis=1, keepdims=True)


def test_the_matrix_sqrt_head_is_the_authors_improved_bcnn():
    # The default is the authors' 5 steps (their README trains and tests with --matrix_sqrt_iter 5), truncation and
    # all. float32 against their arithmetic in float64: 5 products of 64 x 64 matrices, each entry a sum of 64
    # terms (summation_rtol(64) = 3.8e-6 each), then an L2 norm of 4096 entries: 1e-4 leaves room for the element-
    # wise square root's magnification of small entries (measured: 6e-7).
    features = relu_features(4, 64, 49, seed=3)  # (B, C, HW)
    head = build_pooling(ModelConfig(pooling="matrix_sqrt"), channels=64)
    assert head.iterations == 5
    out = head(torch.from_numpy(features).float().reshape(4, 64, 7, 7))
    assert relative_error(out, torch.from_numpy(authors_improved_bcnn(features, 5))) < 1e-4


def test_matrix_sqrt_head_gradients_match_finite_differences():
    head = MatrixSqrtPooling(channels=4)  # the default 5 iterations, differentiated by autograd
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(head, (x,))


# ---- isqrt_cov: iSQRT-COV ----


def covariance(features: np.ndarray) -> np.ndarray:
    """(B, C, M) -> (B, C, C): the features' covariance over the M positions, divided by M."""
    centred = features - features.mean(axis=2, keepdims=True)
    return centred @ centred.transpose(0, 2, 1) / features.shape[2]


def upper_triangle(a: np.ndarray) -> np.ndarray:
    """Row by row, with the diagonal: (B, C, C) -> (B, C(C+1)/2)."""
    rows, cols = np.triu_indices(a.shape[1])
    return a[:, rows, cols]


def test_isqrt_cov_converges_to_the_covariance_square_root():
    # 16 channels at 7 x 7 positions: a full-rank covariance. Pre-normalising by the trace and post-compensating
    # by its square root leave the plain matrix square root once the iteration has converged: 1.1e-15 after 20
    # float64 steps (measured).
    features = relu_features(3, 16, 49, seed=4)
    head = ISqrtCovPooling(channels=16, reduce_dim=0, iterations=20)
    out = head(torch.from_numpy(features).reshape(3, 16, 7, 7))
    assert out.shape == (3, 16 * 17 // 2)
    assert relative_error(out, torch.from_numpy(upper_triangle(eigh_sqrt(covariance(features))))) < 1e-12


def test_isqrt_cov_after_the_default_iterations():
    # Five steps from A = Σ / tr Σ are far from converged: every eigenvalue of A is at most 1 / rank, and the
    # iteration reaches e only after about log(1/e) / log(9/4) steps. The root is off by 5.1e-2 here (measured,
    # float32 and float64 alike; 6.0e-2 and 6.2e-2 on two other draws, 1.8e-1 for 64 channels at 49 positions,
    # 4.2e-1 for 256 at 196): iSQRT-COV's representation is this truncated root, and the network trains with it.
    # The head computes exactly that truncated iteration: against the scalar recursion on the eigenvalues it is
    # off by float32 rounding (measured 1.9e-7).
    features = relu_features(3, 16, 49, seed=4)
    iterations = ModelConfig().isqrt_iterations
    head = build_pooling(ModelConfig(pooling="isqrt_cov", isqrt_reduce_dim=0), channels=16)
    out = head(torch.from_numpy(features).float().reshape(3, 16, 7, 7))
    assert out.dtype == torch.float32

    sigma = covariance(features)
    exact = upper_triangle(eigh_sqrt(sigma))
    error = relative_error(out, torch.from_numpy(exact))
    assert 3e-2 < error < 1e-1, error

    eigenvalues, vectors = np.linalg.eigh(sigma)
    scale = trace(sigma)[:, None]
    y, z = eigenvalues / scale, np.ones_like(eigenvalues)
    for _ in range(iterations):
        t = (3 - z * y) / 2
        y, z = y * t, t * z
    truncated = (vectors * (y * np.sqrt(scale))[:, None, :]) @ vectors.transpose(0, 2, 1)
    assert relative_error(out, torch.from_numpy(upper_triangle(truncated))) < 1e-5


def test_isqrt_cov_reduction_gives_the_paper_size_and_trains():
    head = build_pooling(ModelConfig(pooling="isqrt_cov"), channels=512)  # reduce to 256 channels, as for VGG16
    out = head(torch.rand(2, 512, 7, 7, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 32_896) and head.output_dim == 32_896  # 256 * 257 / 2
    assert not head.cacheable  # the 1x1 conv and batch norm train

    plain = build_pooling(ModelConfig(pooling="isqrt_cov", isqrt_reduce_dim=0), channels=512)
    assert plain.cacheable and plain.output_dim == 512 * 513 // 2


@pytest.mark.parametrize("reduce_dim", [0, 3])
def test_isqrt_cov_gradients_match_finite_differences(reduce_dim):
    head = ISqrtCovPooling(channels=4, reduce_dim=reduce_dim).double()  # the default 5 iterations
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(head, (x,))


# ---- compact: tensor sketch ----


def numpy_tensor_sketch(features: np.ndarray, hashes: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """(B, C, M) -> (B, D): per position, two count sketches and their circular convolution, summed."""
    batch, channels, positions = features.shape
    out = np.zeros((batch, dim))
    for b in range(batch):
        for p in range(positions):
            sketches = np.zeros((2, dim))
            for k in range(2):
                np.add.at(sketches[k], hashes[k], signs[k] * features[b, :, p])
            for j in range(dim):
                out[b, j] += sum(sketches[0][i] * sketches[1][(j - i) % dim] for i in range(dim))
    return out


def test_sketch_is_the_summed_circular_convolution_of_two_count_sketches():
    head = CompactBilinearPooling(channels=8, dim=16, seed=3)
    features = np.random.default_rng(5).standard_normal((2, 8, 6))
    sketch = head.sketch(torch.from_numpy(features).float().reshape(2, 8, 2, 3))
    expected = numpy_tensor_sketch(features, head.hashes.numpy(), head.signs.numpy(), dim=16)
    assert sketch.shape == (2, 16) and sketch.dtype == torch.float32
    assert relative_error(sketch, torch.from_numpy(expected)) < 1e-5  # float32 FFTs of 16 points: measured 1e-7


def fft_tensor_sketch(x: torch.Tensor, hashes: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    """The sketch as bcnn computed it up to issue 22, kept as a reference: per position, each count sketch as a
    product with its dense (C, D) ±1 matrix, then FFTs of length D, multiplied, summed over positions, inverted."""
    batch, channels, height, width = x.shape
    features = x.reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
    spectra = []
    for hash_k, sign_k in zip(hashes, signs):
        projection = x.new_zeros(channels, dim)
        projection[torch.arange(channels), hash_k] = sign_k.to(x.dtype)
        spectra.append(torch.fft.rfft(features @ projection, dim=2))
    return torch.fft.irfft((spectra[0] * spectra[1]).sum(dim=1), n=dim, dim=1)


@pytest.mark.parametrize("channels, dim, side", [(512, 8192, 28), (512, 8192, 14), (64, 1024, 7)])
def test_sketch_equals_the_fft_formulation_it_replaced(channels, dim, side):
    # Same hashes, same maths, other summation orders: the Gram route sums each bucket's pairs directly, the FFT
    # route rounds in log2(D) = 13 butterfly stages (about 13 u = 8e-7 relative) after sums of C terms. Measured
    # 2.3e-7 in float32 at VGG16's 448-px map (512 x 28 x 28) and 4e-16 in float64: allowed 2e-6 and 1e-13.
    head = CompactBilinearPooling(channels=channels, dim=dim)
    x = torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(side))
    x = torch.where(x > 0.5, x, 0)  # sparse and non-negative, as relu5_3
    reference = fft_tensor_sketch(x, head.hashes, head.signs, dim)
    assert relative_error(head.sketch(x), reference) < 2e-6
    reference64 = fft_tensor_sketch(x.double(), head.hashes, head.signs, dim)
    assert relative_error(head.double().sketch(x.double()), reference64) < 1e-13


def test_each_channel_pair_lands_once_in_its_bucket():
    head = CompactBilinearPooling(channels=40, dim=64, seed=2)
    table = head.bucket_pairs.view(head.output_dim, -1).numpy()  # (D, load)
    h1, h2 = head.hashes.numpy()
    pairs = 40 * 40
    for bucket, row in enumerate(table):
        listed = sorted(index for index in row if index < pairs)
        expected = [c * 40 + d for c in range(40) for d in range(40) if (h1[c] + h2[d]) % 64 == bucket]
        assert listed == expected  # and in row-major order: each bucket sums its pairs in one fixed order
    assert sorted(table.flatten().tolist()) == list(range(table.size))  # a permutation: padding slots distinct


def test_compact_head_is_deterministic_forward_and_backward():
    # The same input gives the same bits, run after run, forward and backward: every bucket and every gradient
    # entry is a sum in one fixed order (no scatter-add). With PyTorch's deterministic mode on, nothing refuses.
    # tests/test_gpu.py runs the same on CUDA, where an index_add_ with colliding indices would not be.
    head = CompactBilinearPooling(channels=64, dim=512)
    x = torch.rand(3, 64, 9, 9, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    runs = []
    with deterministic_algorithms():
        for _ in range(3):
            leaf = x.clone().requires_grad_()
            out = head(leaf)
            (out * weights).sum().backward()
            runs.append((out.detach(), leaf.grad))
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@contextlib.contextmanager
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def sketch_inner_products(x: torch.Tensor, y: torch.Tensor, dim: int, seeds: range) -> np.ndarray:
    """<TS(x), TS(y)> for single-position maps x, y (C,), one head (one draw of the hashes) per seed."""
    pair = torch.stack([x, y]).reshape(2, -1, 1, 1)
    products = []
    for seed in seeds:
        sketches = CompactBilinearPooling(channels=x.shape[0], dim=dim, seed=seed).sketch(pair)  # (2, D)
        products.append((sketches[0] @ sketches[1]).item())
    return np.array(products)


@pytest.fixture
def one_thread():
    """For thousands of tiny matmuls: with two BLAS threads on a busy 2-core machine each waits out the other's
    time slice (the 2,500 heads below: 0.7 s on an idle machine, 20 s beside another test run; on one thread,
    0.7 s beside it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sketch_inner_product_is_an_unbiased_estimate_of_the_bilinear_one(one_thread):
    # Tensor Sketch (Pham & Pagh 2013) with independent hashes: E <TS(x), TS(y)> = <x ⊗ x, y ⊗ y> = <x, y>².
    # Over 2,000 draws the mean is 537.5 against 531.0, 1.7 standard errors of 3.9 away (measured); the draws
    # are seeded, so the test gives the same numbers every run.
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    y = y + x  # correlated, so that <x, y>² is well away from 0
    estimates = sketch_inner_products(x, y, dim=64, seeds=range(2000))
    target = (x.double() @ y.double()).item() ** 2
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - target) < 3 * standard_error, (estimates.mean(), target, standard_error)

    # Its variance falls about as 1 / D: 8 times the dimension, 7.8 times less variance (measured, 500 draws).
    wide = sketch_inner_products(x, y, dim=512, seeds=range(500))
    assert wide.var() < estimates.var() / 4


def test_compact_head_default_size_and_round_trip_through_a_checkpoint(tmp_path):
    head = build_pooling(ModelConfig(pooling="compact"), channels=512)
    x = torch.rand(2, 512, 7, 7, generator=torch.Generator().manual_seed(0))
    out = head(x)
    assert out.shape == (2, 8192) and out.dtype == torch.float32 and head.cacheable

    # The hashes and signs are the state: 2 x 512 int64 + 2 x 512 float32 = 12,288 bytes, where the dense (C, D)
    # projections would be 32 MiB.
    state = head.state_dict()
    assert set(state) == {"hashes", "signs"}
    assert sum(t.numel() * t.element_size() for t in state.values()) == 12_288

    other = CompactBilinearPooling(channels=512, dim=8192, seed=1)
    assert not torch.equal(other(x), out)
    torch.save(state, tmp_path / "pooling.pt")
    other.load_state_dict(torch.load(tmp_path / "pooling.pt", weights_only=True))
    assert torch.equal(other(x), out)


def test_building_a_compact_head_leaves_the_global_rng_alone():
    # The hashes come from the head's own generator: building a model must not shift a seeded run's draws.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    CompactBilinearPooling(channels=512, dim=8192)
    assert torch.equal(torch.rand(3), expected)


def test_compact_sketch_gradients_match_finite_differences():
    # The sketch, the head's own arithmetic: the signed sqrt and the L2 normalisation after it are autograd's own.
    head = CompactBilinearPooling(channels=4, dim=16).double()
    x = torch.rand(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    assert torch.autograd.gradcheck(head.sketch, (x,))


# ---- all three ----


@pytest.mark.parametrize("options, output_dim", [
    ({"pooling": "matrix_sqrt"}, 8 * 8),
    ({"pooling": "isqrt_cov", "isqrt_reduce_dim": 6}, 6 * 7 // 2),
    ({"pooling": "isqrt_cov", "isqrt_reduce_dim": 0}, 8 * 9 // 2),
    ({"pooling": "compact", "compact_dim": 32}, 32),
])
def test_heads_are_finite_on_zero_maps_and_dead_channels(options, output_dim):
    head = build_pooling(ModelConfig(**options), channels=8)
    assert head.output_dim == output_dim
    zeros = torch.zeros(2, 8, 4, 4)
    dead = torch.rand(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    dead[:, ::2] = 0  # every other channel never fires
    for x in (zeros, dead):
        out = assert_finite_gradient_flow(head, x)
        assert out.shape == (2, output_dim) and out.dtype == torch.float32


def test_the_sqrt_sweep_measures_truncation_against_the_eigendecomposition(capsys):
    # python -m bcnn.bench.sqrt_sweep, as docs/pooling.md runs it, at a size a test affords (4 x 4 maps).
    from bcnn.bench.sqrt_sweep import main

    (row,) = main(["--sizes", "64", "--images", "2"])
    errors = [row["root_error"][k] for k in (5, 10, 15, 20)]
    # The coupled iteration converges to the float64 eigendecomposition's root: by 10 steps on a 4 x 4 map (a Gram
    # of rank 16, whose float32 roots then stall near 5e-4, measured), against 8% after 5.
    assert errors[0] > 10 * max(errors[1:]) and max(errors[1:]) < 1e-2, errors
    assert all(0 < row["form_change"][k] < 0.5 for k in row["form_change"])  # the two forms differ, not wildly
    assert "root@5" in capsys.readouterr().out


# ---- the matrix square root's backward: python -m bcnn.bench.sqrt_backward ----


def test_the_exact_root_gradient_and_the_lyapunov_solver_agree_where_both_converge():
    # On well-conditioned SPD matrices (eigenvalues 1 to 1e-2) 30 float64 Newton-Schulz steps are the exact root, so
    # autograd through them is the exact root's gradient; the eigendecomposition formula must give it, and the
    # authors' Lyapunov iteration, run to convergence from that root, too. Measured: 3e-15 and 2e-15.
    from bcnn.bench.sqrt_backward import exact_root_gradient, lyapunov_backward

    a = torch.from_numpy(spread_spectra(3, 16, 1e2, seed=7)).requires_grad_()
    root = newton_schulz_sqrt(a, torch.linalg.matrix_norm(a), 30)
    grad = torch.randn(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grad = grad + grad.transpose(1, 2)
    root.backward(grad)
    assert relative_error(exact_root_gradient(a.detach(), grad), a.grad) < 1e-10
    assert relative_error(lyapunov_backward(root.detach(), grad, 30), a.grad) < 1e-10


def test_sqrt_backward_times_the_parts_and_measures_both_backwards(capsys):
    # python -m bcnn.bench.sqrt_backward, as docs/pooling.md runs it, at a size a test affords (2 x 2 maps).
    from bcnn.bench.sqrt_backward import main

    result = main(["--size", "64", "--images", "2", "--batch", "2", "--repeats", "1"])
    assert all(ms > 0 for ms in result["ms"].values())
    errors = result["gradient_error"]
    # Autograd is the forward's own gradient: float32 against float64 of the same 5 steps, rounding only.
    assert errors["autograd_vs_forward_gradient"] < 1e-4, errors
    # The Lyapunov backward is the exact root's gradient at a truncated root: another function's gradient. The
    # eigendecomposition's is the same steps' gradient, in float32: rounding too (measured 9e-6 at 448 px).
    assert errors["lyapunov_vs_forward_gradient"] > 100 * errors["autograd_vs_forward_gradient"], errors
    assert errors["eigen_vs_forward_gradient"] < 1e-4, errors
    assert "newton_schulz_backward_autograd" in capsys.readouterr().out


def test_the_eigendecomposition_backward_is_the_gradient_of_the_same_steps():
    # Divided differences of the scalar iteration, run on 2 x 2 triangular matrices, then Daleckii-Krein: the
    # gradient of the 5 truncated steps, checked by finite differences in float64 on a matrix with a repeated
    # eigenvalue (where the divided difference becomes the derivative).
    from bcnn.bench.sqrt_backward import eigen_backward_root

    q, _ = np.linalg.qr(np.random.default_rng(8).standard_normal((6, 6)))
    a = torch.from_numpy((q * np.array([1.0, 0.5, 0.5, 0.1, 0.02, 0.0])) @ q.T)[None].requires_grad_()
    assert torch.autograd.gradcheck(lambda m: eigen_backward_root(0.5 * (m + m.transpose(1, 2)), 5), (a,))


def test_a_compact_head_given_other_hashes_by_a_state_dict_sketches_with_them():
    # The bucket table is built from the hashes: loading another head's state (a checkpoint of another seed) must
    # rebuild it, or the sketch would sum the new hashes' pairs into the old buckets.
    other, head = CompactBilinearPooling(channels=40, dim=64, seed=5), CompactBilinearPooling(channels=40, dim=64)
    x = torch.rand(2, 40, 5, 5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(head.sketch(x), other.sketch(x))
    head.load_state_dict(other.state_dict())
    assert torch.equal(head.sketch(x), other.sketch(x))
    assert "bucket_pairs" not in head.state_dict()  # the hashes are saved; the table follows from them
