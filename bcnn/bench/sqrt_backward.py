"""What the improved B-CNN's matrix square root costs, part by part, and whether a cheaper backward than autograd's
exists: the authors' iterative Lyapunov solver and an eigendecomposition's, measured against float64 references.

    python -m bcnn.bench.sqrt_backward                          # 448 px, 2 photo-like images, random VGG16
    python -m bcnn.bench.sqrt_backward --size 224 --json

On the relu5_3 maps of a random VGG16 (downloads nothing; bcnn.bench.sqrt_sweep makes the images) and the head's
default 5 steps, it prints
- the time of each part of the head, forward and backward, for a batch of --batch copies of the maps, beside the
  bilinear head's: the Gram product, the Newton-Schulz steps, their backward by autograd, the authors' Lyapunov
  backward (cvl-umass/bilinear-cnn, MatrixSquareRootFun.backward) for as many steps, the same steps' exact
  gradient from a float32 eigendecomposition (EigenBackwardRoot), and the signed sqrt + L2;
- the gradient dL/dA that each backward hands to the Gram matrix, for the gradient dL/dZ a random linear classifier
  on the head's vector sends back, against two references: the exact gradient of the function the forward computes
  (autograd of the same 5 steps in float64) and the gradient of the exact square root (float64 eigendecomposition,
  dL/dA = U [(Uᵀ G U) / (σ_i + σ_j)] Uᵀ, Lin & Maji 2017 eq. 5).
docs/pooling.md holds the figures the head's backward was chosen from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bcnn.config import ModelConfig
from bcnn.errors import UserError, exit_on_user_error
from bcnn.models import build_model
from bcnn.models.pooling import BilinearPooling, gram_matrix, newton_schulz_sqrt, signed_sqrt
from bcnn.bench.sqrt_sweep import photo_batch, relative


def lyapunov_backward(root: torch.Tensor, grad: torch.Tensor, iterations: int) -> torch.Tensor:
    """dL/dA for Z = A^1/2 from dL/dZ, by solving Z X + X Z = dL/dZ with the coupled iteration the authors' backward
    runs (the Newton-Schulz sign iteration on [[Z, -dL/dZ], [0, -Z]], Higham 2008 ch. 5): Z is taken as the exact
    root, so this is the exact root's gradient at the forward's Z, whatever the forward truncated. Z symmetric."""
    norm = torch.linalg.matrix_norm(root).view(-1, 1, 1)
    identity = torch.eye(root.shape[-1], dtype=root.dtype, device=root.device)
    a, q = root / norm, grad / norm
    for step in range(iterations):
        square = torch.bmm(a, a)
        q = 0.5 * (torch.bmm(q, 3.0 * identity - square) - torch.bmm(a, torch.bmm(a, q) - torch.bmm(q, a)))
        if step < iterations - 1:
            a = 0.5 * torch.bmm(a, 3.0 * identity - square)
    return 0.5 * q


def divided_differences(eigenvalues: torch.Tensor, iterations: int) -> torch.Tensor:
    """f[λ_i, λ_j] = (f(λ_i) - f(λ_j)) / (λ_i - λ_j) (f'(λ) where they meet) for f the K-step coupled Newton-Schulz
    iteration on scalars, (B, n) -> (B, n, n): the iteration run on each 2 x 2 matrix [[λ_i, 1], [0, λ_j]], whose
    corner holds the divided difference, with no cancellation (products of upper-triangular matrices:
    (XY)_12 = x_i y_12 + x_12 y_j)."""
    y_i, y_j = eigenvalues[:, :, None], eigenvalues[:, None, :]
    y_12 = torch.ones_like(y_i * y_j)
    z_i, z_j, z_12 = torch.ones_like(y_i), torch.ones_like(y_j), torch.zeros_like(y_12)
    for _ in range(iterations):
        t_i, t_j, t_12 = 0.5 * (3 - z_i * y_i), 0.5 * (3 - z_j * y_j), -0.5 * (z_i * y_12 + z_12 * y_j)
        y_i, y_j, y_12 = y_i * t_i, y_j * t_j, y_i * t_12 + y_12 * t_j
        z_i, z_j, z_12 = t_i * z_i, t_j * z_j, t_i * z_12 + t_12 * z_j
    return y_12


class EigenBackwardRoot(torch.autograd.Function):
    """The K-step Newton-Schulz root of a (already normalised), forward as the head computes it, backward from an
    eigendecomposition: the exact gradient of the same K steps, U [(Uᵀ G U) ∘ f[λ_i, λ_j]] Uᵀ (Daleckii-Krein), one
    eigh and 4 products in place of autograd's 24. A candidate, measured here, not the head's."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, iterations: int) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.iterations = iterations
        return newton_schulz_sqrt(a, torch.ones(len(a), dtype=a.dtype, device=a.device), iterations)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (a,) = ctx.saved_tensors
        eigenvalues, vectors = torch.linalg.eigh(a)
        inner = vectors.transpose(1, 2) @ grad @ vectors
        return vectors @ (inner * divided_differences(eigenvalues, ctx.iterations)) @ vectors.transpose(1, 2), None


def eigen_backward_root(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """newton_schulz_sqrt(a, ||a||_F, iterations) with EigenBackwardRoot's backward (the scale's part by autograd)."""
    scale = torch.linalg.matrix_norm(a).clamp_min(torch.finfo(a.dtype).eps).view(-1, 1, 1)
    return EigenBackwardRoot.apply(a / scale, iterations) * scale.sqrt()


def exact_root_gradient(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the exact square root at a (a float32 Gram matrix), from a float64 eigendecomposition:
    U [(Uᵀ sym(G) U) / (σ_i + σ_j)] Uᵀ. Eigenvalues under the Gram matrix's own float32 rounding (largest x C x
    2^-24) are its null space, σ = 0; there the root's derivative is unbounded, so pairs of two null directions are
    left out (0), as no finite gradient can match them."""
    eigenvalues, vectors = torch.linalg.eigh(a.double())
    floor = eigenvalues[:, -1:] * a.shape[-1] * 2.0**-24
    roots = torch.where(eigenvalues > floor, eigenvalues, 0).sqrt()
    symmetric = 0.5 * (grad + grad.transpose(1, 2)).double()
    sums = roots[:, :, None] + roots[:, None, :]
    inner = torch.where(sums > 0, vectors.transpose(1, 2) @ symmetric @ vectors / sums.clamp_min(1e-300), 0)
    return vectors @ inner @ vectors.transpose(1, 2)


def classifier_gradient(root: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dZ for L = Σ w · L2(signed_sqrt(Z)), w a fixed random classifier row: what the head's root receives."""
    root = root.detach().float().requires_grad_()
    weights = torch.randn(root[0].numel(), generator=torch.Generator().manual_seed(0))
    (F.normalize(signed_sqrt(root.flatten(1), eps), dim=1) @ weights).sum().backward()
    return root.grad


def gradient_errors(gram: torch.Tensor, iterations: int, eps: float) -> dict:
    """Each backward's dL/dA against the two references (module docstring), mean relative Frobenius distance over
    the images. Only the block of channels that fire somewhere in the image counts: a dead channel's Gram row is 0,
    the exact root's gradient there is 0 / 0, and what dL/dA holds in it never reaches the network (relu5_3 passes
    no gradient to a channel that is 0 everywhere)."""
    leaf = gram.detach().requires_grad_()
    root = newton_schulz_sqrt(leaf, torch.linalg.matrix_norm(leaf), iterations)
    grad = classifier_gradient(root, eps)
    root.backward(grad)
    truncated = gram.detach().double().requires_grad_()
    newton_schulz_sqrt(truncated, torch.linalg.matrix_norm(truncated), iterations).backward(grad.double())
    lyapunov = lyapunov_backward(root.detach(), grad, iterations)
    eigen_leaf = gram.detach().requires_grad_()
    eigen_backward_root(eigen_leaf, iterations).backward(grad)
    backwards = (("autograd", leaf.grad), ("lyapunov", lyapunov), ("eigen", eigen_leaf.grad))
    errors = {f"{name}_vs_{reference}": [] for name, _ in backwards
              for reference in ("forward_gradient", "exact_root_gradient")}
    for image in range(len(gram)):
        live = torch.nonzero(gram[image].diagonal() > 0).flatten()

        def block(matrix: torch.Tensor) -> torch.Tensor:
            return matrix[image][live][:, live][None]

        exact = exact_root_gradient(block(gram.detach()), block(grad))
        for backward, result in backwards:
            errors[f"{backward}_vs_forward_gradient"].append(relative(block(result), block(truncated.grad)))
            errors[f"{backward}_vs_exact_root_gradient"].append(relative(block(result), exact))
    return {name: statistics.mean(values) for name, values in errors.items()}


def median_ms(function, repeats: int) -> float:
    function()  # warm-up: allocations, oneDNN kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def part_times(maps: torch.Tensor, iterations: int, eps: float, repeats: int) -> dict:
    """Milliseconds of each part of the matrix_sqrt head (forward and backward) and of the whole bilinear head."""
    maps = maps.detach()
    gram = gram_matrix(maps, maps).detach().requires_grad_()
    scale = torch.linalg.matrix_norm(gram)
    root = newton_schulz_sqrt(gram, scale, iterations)
    eigen_root = eigen_backward_root(gram, iterations)
    grad = classifier_gradient(root, eps)
    vector_input = root.detach().flatten(1).requires_grad_()
    vector = F.normalize(signed_sqrt(vector_input, eps), dim=1)

    def bilinear_head():
        leaf = maps.clone().requires_grad_()
        output = BilinearPooling(maps.shape[1], nonnegative_maps=True)(leaf)
        output.backward(torch.ones_like(output))

    def gram_backward():
        leaf = maps.clone().requires_grad_()
        gram_matrix(leaf, leaf).backward(torch.ones_like(gram))

    return {
        "bilinear_head_forward_backward": median_ms(bilinear_head, repeats),
        "gram_forward": median_ms(lambda: gram_matrix(maps, maps), repeats),
        "gram_forward_backward": median_ms(gram_backward, repeats),
        "newton_schulz_forward": median_ms(lambda: newton_schulz_sqrt(gram.detach(), scale.detach(), iterations),
                                           repeats),
        "newton_schulz_backward_autograd": median_ms(lambda: torch.autograd.grad(root, gram, grad, retain_graph=True),
                                                     repeats),
        "lyapunov_backward": median_ms(lambda: lyapunov_backward(root.detach(), grad, iterations), repeats),
        "eigen_backward": median_ms(lambda: torch.autograd.grad(eigen_root, gram, grad, retain_graph=True), repeats),
        "signed_sqrt_l2_forward_backward": median_ms(
            lambda: torch.autograd.grad(vector, vector_input, torch.ones_like(vector), retain_graph=True), repeats),
    }


def measure(size: int, images: int, batch: int, iterations: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone_weights="none")
    model = build_model(cfg, num_classes=2, input_size=size).eval()
    with torch.no_grad():
        maps = model.backbone(photo_batch(size, images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    copies = maps.repeat((batch + images - 1) // images, 1, 1, 1)[:batch]  # the step's batch, for the times
    gram = gram_matrix(maps, maps)
    return {"size": size, "map": list(maps.shape[1:]), "images": images, "batch": batch, "iterations": iterations,
            "threads": torch.get_num_threads(), "ms": part_times(copies, iterations, cfg.sqrt_eps, repeats),
            "gradient_error": gradient_errors(gram, iterations, cfg.sqrt_eps)}


def format_result(result: dict) -> str:
    lines = [f"{result['size']} px ({'x'.join(map(str, result['map']))} maps), batch {result['batch']}, "
             f"{result['iterations']} steps, {result['threads']} threads: median ms"]
    lines += [f"  {name:34s} {ms:8.1f}" for name, ms in result["ms"].items()]
    lines.append(f"dL/dA against the references, mean over {result['images']} images (relative Frobenius)")
    lines += [f"  {name:34s} {error:8.2e}" for name, error in result["gradient_error"].items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bcnn.bench.sqrt_backward", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=448, help="input side in pixels (default: 448, the recipe's)")
    parser.add_argument("--images", type=int, default=2, help="photo-like images (default: 2)")
    parser.add_argument("--batch", type=int, default=4, help="maps per timed call (default: 4, the CPU bench's)")
    parser.add_argument("--iterations", type=int, default=ModelConfig().matrix_sqrt_iterations,
                        help="Newton-Schulz steps, and Lyapunov steps (default: the head's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per part, after one warm-up")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.size < 32 or min(args.images, args.batch, args.iterations, args.repeats) < 1:
        raise UserError("--size must be at least 32 (VGG16's relu5_3 is then 2 x 2) and --images, --batch, "
                        "--iterations and --repeats at least 1.")
    result = measure(args.size, args.images, args.batch, args.iterations, args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()
