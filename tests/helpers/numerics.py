"""The suite's tolerances for comparing two float32 computations, each with where it comes from.

Two runs of the same maths on different CPUs, thread counts, batch splits or process counts add the same
numbers in other orders (oneDNN picks its convolution algorithm by CPU, batch size and threads), so they agree
to rounding and no closer. What rounding can do:

- One operation rounds with a relative error of at most u = 2^-24 (float32's unit roundoff, half its epsilon).
- A float32 sum of n terms is off by at most about n*u of the sum of the terms' magnitudes (Higham's gamma_n),
  typically sqrt(n)*u: this bounds one forward or backward pass.
- Training is different: a ReLU whose input rounds to the other side of 0, or a step that the rounding
  of the weight itself swallows (an update 1e-4 of the weight keeps only ~13 of its 24 bits), is not
  smooth in the weights, so differences grow over steps and no a-priori bound holds. Two training runs are
  therefore compared in units of how far training moved each tensor (training_difference).
"""

from __future__ import annotations

import torch

FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def summation_rtol(terms: int) -> float:
    """Worst-case relative error of a float32 sum of `terms` terms of one sign (n * u, Higham's gamma_n)."""
    return terms * FLOAT32_UNIT_ROUNDOFF


# Two float32 forward passes of the same VGG16 on the same images in other summation orders (another batch
# split, channels_last vs NCHW, another CPU's convolution algorithm): each layer's sums have up to
# n = 3 * 3 * 512 = 4,608 terms and round by about sqrt(n) * u = 4e-6 relative; the 13 layers' errors add up to
# about sqrt(13) times that, 1.5e-5. Allowed: 1e-4, relative (L2 over a batch's logits, or a mean loss).
FORWARD_RTOL = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# Two training runs of the same recipe that differ only in float32 rounding (one process vs two, a split
# batch vs one, eager vs compiled, another CPU's convolution algorithm) must end within 1% of how far training
# moved each tensor, norm-wise. Where that line sits, measured on helpers.runs.small_run_args (6 steps of a
# random VGG16, classifier lr 1e-2, backbone 1e-3) on a 2-core AMD EPYC at 1, 2 and 4 threads and with
# oneDNN held to SSE4.1 and AVX (ONEDNN_MAX_CPU_ISA, the code paths of other x86 CPUs):
#   - rounding: one process vs two ranks differed by 2.3e-4 of the movement, at most 2.4e-3 (AVX, 1 thread);
#   - a 1% larger classifier lr already moves the weights 1e-2 of the movement away, and the DDP bugs this
#     guards against (gradients summed instead of averaged, a rank's shard duplicated or dropped, another
#     augmentation on one rank) change a step's gradient by a quarter or more.
# At the recipe's 10x larger learning rates the same runs drift 5e-3 apart on SSE4.1: chaotic growth of
# rounding, not a bug, which is why the compared runs use the demo's stage-2 learning rates.
TRAINING_RTOL = 1e-2


def training_difference(reference: dict, other: dict, initial: dict, ulps: float = 0) -> dict[str, float]:
    """For each tensor, ||other - reference|| / ||reference - initial||: how far apart two runs ended, in units
    of how far training moved that tensor. A tensor that training did not move maps to 0 when the runs agree
    exactly and to inf when they do not (a frozen tensor must stay bit for bit). ulps > 0: that many float32
    steps of each value are first forgiven (for tensors that training moves by a few steps only)."""
    differences = {}
    for key, start in initial.items():
        if not torch.is_floating_point(start):
            continue
        moved = (reference[key].double() - start.double()).norm().item()
        apart = (reference[key].double() - other[key].double()).norm().item()
        if ulps:
            steps = (start.double().abs() * torch.finfo(torch.float32).eps).norm().item()
            apart = max(0.0, apart - ulps * steps)
        differences[key] = apart / moved if moved > 0 else (0.0 if apart == 0 else float("inf"))
    return differences


def assert_same_training(reference: dict, other: dict, initial: dict, rtol: float = TRAINING_RTOL,
                         ulps: float = 0) -> None:
    """Two state dicts trained from `initial` by the same recipe agree to rounding (see TRAINING_RTOL)."""
    assert reference.keys() == other.keys()
    differences = training_difference(reference, other, initial, ulps)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= rtol, (
        f"{worst}: the runs ended {differences[worst]:.2e} of training's movement apart (allowed {rtol:.0e}); "
        f"largest five: {sorted(differences.items(), key=lambda item: -item[1])[:5]}")
