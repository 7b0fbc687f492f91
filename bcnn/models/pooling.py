"""Pooling heads: a backbone's feature map (or two, for the asymmetric B-CNN) -> one normalised vector per image.

    pooling = build_pooling(cfg.model, channels=512)
    vectors = pooling(feature_map)      # (B, C, H, W) -> (B, pooling.output_dim), float32

Every head states its output size (the classifier's input) and whether it can be cached: one without trainable
parameters turns a frozen backbone's features into fixed vectors, which stage 1 can compute once (bcnn.feature_cache).
Heads run in float32: BilinearCNN.embed turns autocast off around them, since outer products, square roots and
long normalisations lose too much in half precision.

    bilinear     B-CNN (Lin et al., ICCV 2015): X Xᵀ / (H W) -> signed sqrt -> L2; two maps for the asymmetric B-CNN
                 (on ReLU maps the ports' sqrt(x + eps), elsewhere the authors' continuous signed sqrt)
    matrix_sqrt  improved B-CNN (Lin & Maji, BMVC 2017): X Xᵀ / (H W) -> matrix square root (Newton-Schulz, 5
                 steps as the authors train) -> the authors' signed sqrt -> L2
    isqrt_cov    iSQRT-COV (Li et al., CVPR 2018): [1x1 conv + BN + ReLU to d channels] -> covariance -> matrix
                 square root (Newton-Schulz, trace-normalised) -> upper triangle, d(d+1)/2; trains when d > 0
    compact      compact bilinear pooling (Gao et al., CVPR 2016): tensor sketch of x ⊗ x to D dimensions, summed
                 over positions (computed from the Gram matrix: the bilinear head's cost) -> signed sqrt -> L2; its
                 random hashes are buffers of the state dict
    avg          global average pooling: the plain fine-tuning baseline a second-order head has to beat

Only the bilinear head reads a second map (the config allows a second backbone with it alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bcnn.errors import UserError

# The largest pooled vector a model may have: 1,024 channels' bilinear vector (DenseNet-121, ConvNeXt-Base), whose
# classifier for CUB is already 210M parameters; 2,048 channels (a ResNet's layer4) would be 4.2M-d and 840M.
MAX_POOLED_DIM = 1024 * 1024
# The largest classifier (vector size x classes): 1,000M parameters are 4 GB of float32 weights, 16 GB with their
# gradient and Adam's two moments, beside the backbone. CUB on VGG16's bilinear vector is 52M; iNaturalist 2021's
# 10,000 classes on it would be 2,621M (42 GB before any activation), which the compact or reduced heads avoid.
MAX_CLASSIFIER_PARAMS = 1_000_000_000


def signed_sqrt(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """sqrt(relu(x) + eps) - sqrt(relu(-x) + eps): the signed square root as Lin & Maji's own PyTorch code takes it
    (cvl-umass/bilinear-cnn, BCNN.py), for heads whose values can be negative (a matrix square root's off-diagonal
    entries, a tensor sketch, a bilinear pooling of maps that can be negative). Odd and continuous: 0 at 0, where
    sign(x) sqrt(|x| + eps) would jump by 2 sqrt(eps). The eps keeps the gradient at 0 finite (0 * inf = NaN
    without it)."""
    return torch.sqrt(F.relu(x) + eps) - torch.sqrt(F.relu(-x) + eps)


def ported_sqrt(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """sqrt(x + eps) on non-negative x, as the public B-CNN ports compute it (HaoMood/bilinear-cnn) on a bilinear
    pooling of ReLU maps, so their checkpoints give their logits bit for bit. Only for input that is never negative:
    for safety a negative entry keeps its sign, -sqrt(|x| + eps), but signed_sqrt is the form for such heads."""
    root = torch.sqrt(torch.abs(x) + eps)
    return torch.where(x < 0, -root, root)


def gram_matrix(x: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """X_a X_bᵀ / (H W): two maps of one spatial size, (B, C, H, W) and (B, C_b, H, W) -> (B, C, C_b)."""
    batch, channels, height, width = x.shape
    a = x.reshape(batch, channels, height * width)  # (B, C, HW)
    b = x_b.reshape(batch, x_b.shape[1], height * width)  # (B, C_b, HW)
    return torch.bmm(a, b.transpose(1, 2)) / (height * width)


def newton_schulz_sqrt(a: torch.Tensor, scale: torch.Tensor, iterations: int) -> torch.Tensor:
    """The square root of each positive semi-definite matrix of a (B, n, n), by the coupled Newton-Schulz iteration
    (Higham, Functions of Matrices, 2008, ch. 6; Lin & Maji 2017; Li et al. 2018):

        Y_0 = a / scale, Z_0 = I;  T_k = (3I - Z_k Y_k) / 2,  Y_k+1 = Y_k T_k -> (a / scale)^1/2,  Z_k+1 = T_k Z_k

    then Y_K * sqrt(scale). scale (B,) must bound a's largest eigenvalue (||a||_F for Lin & Maji, tr a for Li et al.):
    the iteration converges when the spectrum lies in [0, 2), and post-compensation undoes the pre-normalisation.
    Only matrix products, so it runs fast on a GPU and autograd differentiates it, unlike an eigendecomposition,
    whose gradient is unstable at close eigenvalues.

    An eigenvalue e of a / scale needs about log(1/e) / log(9/4) steps (Z Y grows by 9/4 a step while small): the
    smallest stay short of their roots. The same growth acts on the slightly negative eigenvalues that rounding
    leaves in the null space of a rank-deficient a (H W < C): float32 roots degrade after about 20 steps and
    overflow by about 26 (measured, C = 64 at 7 x 7 and C = 512 at 14 x 14); the defaults, 10 and 5, are far off."""
    # A zero matrix (an all-zero map) has scale 0: any positive floor leaves the result exact (0) and, unlike the
    # smallest positive float, keeps the gradient's 1 / scale finite.
    scale = scale.clamp_min(torch.finfo(a.dtype).eps).view(-1, 1, 1)  # (B, 1, 1)
    identity = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    y, z = a / scale, None  # Z_0 = I: its products are skipped, not computed (they are exact, so nothing changes)
    for step in range(iterations):
        t = 0.5 * (3.0 * identity - (y if z is None else torch.bmm(z, y)))
        y = torch.bmm(y, t)
        if step < iterations - 1:  # the last Z_K is never read (as fast-MPN-COV unrolls it)
            z = t if z is None else torch.bmm(t, z)
    return y * scale.sqrt()


class Pooling(nn.Module):
    """The contract of a pooling head, all that the rest of bcnn asks of one (docs/heads.md adds one, step by step):

    forward(x[, x_b]) -> (B, output_dim)   x: the backbone's (B, C, H, W) map in float32 (x_b: the second
                                          backbone's, for a head with two_maps)
    output_dim                             the vector's size: the classifier's input
    cacheable                              no trainable parameters: stage 1 can cache its vectors
    from_config(cfg, channels, ...)        the head that cfg (bcnn.config.ModelConfig) describes
    option_ranges, check_config(cfg)       its options' ranges and its refusals, which bcnn.config.validate asks
    too_large(cfg, channels, size)         what to change when its vector is too large to classify (bilinear_cnn)
    """

    output_dim: int
    two_maps = False  # reads a second backbone's map (the asymmetric B-CNN's model.backbone_b)
    # Its config options' values as intervals ("[" includes the end, "(" excludes it), checked for every config
    option_ranges: dict[str, str] = {}

    @property
    def cacheable(self) -> bool:
        """No trainable parameters: on a frozen backbone, its output per image is fixed."""
        return not any(True for _ in self.parameters())

    @classmethod
    def from_config(cls, cfg, channels: int, channels_b: int | None = None,
                    nonnegative_maps: bool = False) -> "Pooling":
        """The head for cfg (bcnn.config.ModelConfig) on a map of `channels` channels (channels_b: the second
        backbone's; nonnegative_maps: the backbones end in a ReLU)."""
        return cls(channels)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, in one sentence (a UserError), a config this head cannot run; asked when cfg.model.pooling names
        it, after every value is in its range."""
        if cfg.model.backbone_b and not cls.two_maps:
            raise UserError(f"model.backbone_b (the asymmetric B-CNN) needs model.pooling=bilinear, got "
                            f"{cfg.model.pooling}; set model.backbone_b= (empty) or model.pooling=bilinear.")

    @classmethod
    def too_large(cls, cfg, channels: int, size: str) -> str | None:
        """The way out when this head's vector makes `size` (a sentence's middle); None: the general advice."""
        return None


# The heads by their model.pooling name, in the order the config's error messages list them.
HEADS: dict[str, type[Pooling]] = {}


def register_head(name: str):
    """Class decorator: the head becomes model.pooling=<name> everywhere (config, train, eval, bench, docs' table)."""
    def register(cls: type[Pooling]) -> type[Pooling]:
        if name in HEADS:
            raise ValueError(f"a pooling head named {name!r} is registered already ({HEADS[name].__name__})")
        HEADS[name] = cls
        return cls
    return register


@register_head("bilinear")
class BilinearPooling(Pooling):
    """X Xᵀ / (H W) -> signed sqrt -> L2 normalisation: the B-CNN's (B, C*C) vector.

    With a second map (the asymmetric B-CNN), X_a X_bᵀ / (H W), the smaller map bilinearly resized to the larger;
    with the same map twice it is the symmetric head. nonnegative_maps: the backbones' maps are never negative
    (ReLU maps: VGG, ResNet, DenseNet), so neither is the Gram matrix, and the square root is the ports'
    sqrt(x + eps) (ported_sqrt, bit for bit with their checkpoints); otherwise the authors' continuous signed_sqrt."""

    def __init__(self, channels: int, channels_b: int | None = None, sqrt_eps: float = 1e-5,
                 nonnegative_maps: bool = False):
        super().__init__()
        self.channels, self.channels_b, self.sqrt_eps = channels, channels_b or channels, sqrt_eps
        self.nonnegative_maps = nonnegative_maps
        self.output_dim = self.channels * self.channels_b

    two_maps = True
    option_ranges = {"model.sqrt_eps": "(0, inf)"}  # at 0 the signed square root's gradient at 0 is NaN

    @classmethod
    def from_config(cls, cfg, channels, channels_b=None, nonnegative_maps=False):
        return cls(channels, channels_b, cfg.sqrt_eps, nonnegative_maps)

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        x_b = x if x_b is None else match_size(x_b, x)
        x = match_size(x, x_b)
        gram = gram_matrix(x, x_b).flatten(1)  # (B, C * C_b)
        root = ported_sqrt(gram, self.sqrt_eps) if self.nonnegative_maps else signed_sqrt(gram, self.sqrt_eps)
        return F.normalize(root, dim=1)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, channels_b={self.channels_b}, sqrt_eps={self.sqrt_eps}, "
                f"nonnegative_maps={self.nonnegative_maps}")


def match_size(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x resized (bilinearly) to other's spatial size when x is the smaller of the two; else x itself."""
    if x.shape[-2:] == other.shape[-2:] or x.shape[-2] * x.shape[-1] >= other.shape[-2] * other.shape[-1]:
        return x
    return F.interpolate(x, size=other.shape[-2:], mode="bilinear", align_corners=False)


@register_head("avg")
class AveragePooling(Pooling):
    """The mean feature over all positions, (B, C): first-order, no normalisation, the fine-tuning baseline."""

    def __init__(self, channels: int):
        super().__init__()
        self.output_dim = channels

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@register_head("matrix_sqrt")
class MatrixSqrtPooling(Pooling):
    """Improved B-CNN (Lin & Maji, BMVC 2017): the matrix square root of X Xᵀ / (H W), then the authors' element-wise
    signed_sqrt and L2 normalisation: (B, C*C). The square root by newton_schulz_sqrt on the Frobenius-normalised
    matrix, as the authors' PyTorch code (cvl-umass/bilinear-cnn, matrixSquareRoot.py) runs it; gradients by autograd.

    iterations: the authors train and test with 5 (their README's command). That is a truncated root: on relu5_3 maps
    of a random VGG16 at 448 px it is 21% (relative Frobenius) from the float64 eigendecomposition's root, 6.6% after
    10 steps, 0.6% after 15 and 0.03% after 20 (docs/pooling.md has the sweep and the script).

    The backward is autograd's, the exact gradient of those 5 steps. The authors' Lyapunov backward (the exact root's
    gradient, solved iteratively at the truncated root) was measured against it and not taken: at 448 px it costs
    more (29 matrix products for 5 steps against autograd's 24) and is no closer to the float64 eigendecomposition's
    gradient (docs/pooling.md; python -m bcnn.bench.sqrt_backward)."""

    def __init__(self, channels: int, iterations: int = 5, sqrt_eps: float = 1e-5):
        super().__init__()
        self.channels, self.iterations, self.sqrt_eps = channels, iterations, sqrt_eps
        self.output_dim = channels * channels

    # Newton-Schulz: converged by 20 steps (float64), while float32 rounding in a rank-deficient Gram matrix
    # (H W < C) grows 9/4 a step past that and overflows by about 26 (newton_schulz_sqrt).
    option_ranges = {"model.matrix_sqrt_iterations": "[1, 20]", "model.sqrt_eps": "(0, inf)"}

    @classmethod
    def from_config(cls, cfg, channels, channels_b=None, nonnegative_maps=False):
        return cls(channels, cfg.matrix_sqrt_iterations, cfg.sqrt_eps)

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        gram = gram_matrix(x, x)  # (B, C, C)
        root = newton_schulz_sqrt(gram, torch.linalg.matrix_norm(gram), self.iterations)
        return F.normalize(signed_sqrt(root.flatten(1), self.sqrt_eps), dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, iterations={self.iterations}, sqrt_eps={self.sqrt_eps}"


@register_head("isqrt_cov")
class ISqrtCovPooling(Pooling):
    """iSQRT-COV (Li, Xie, Wang, Gao, CVPR 2018), as fast-MPN-COV (src/representation/MPNCOV.py) computes it: an
    optional 1x1 conv + BN + ReLU to reduce_dim channels d, the covariance Σ = X Î Xᵀ with Î = (I - 1 1ᵀ / M) / M
    (M = H W), its square root by newton_schulz_sqrt on Σ / tr Σ, and the upper triangle with the diagonal, row by
    row: (B, d(d+1)/2). The post-compensated root is the representation: no signed sqrt, no L2 after it. With
    reduce_dim 0 the C input channels are used as they are, and the head has no parameters."""

    def __init__(self, channels: int, reduce_dim: int = 256, iterations: int = 5):
        super().__init__()
        self.channels, self.reduce_dim, self.iterations = channels, reduce_dim, iterations
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, reduce_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(reduce_dim),
            nn.ReLU(inplace=True),
        ) if reduce_dim else nn.Identity()
        dim = reduce_dim or channels
        self.output_dim = dim * (dim + 1) // 2

    option_ranges = {"model.isqrt_iterations": "[1, 20]", "model.isqrt_reduce_dim": "[0, inf)"}

    @classmethod
    def from_config(cls, cfg, channels, channels_b=None, nonnegative_maps=False):
        return cls(channels, cfg.isqrt_reduce_dim, cfg.isqrt_iterations)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.train.cache_features and cfg.model.isqrt_reduce_dim:
            raise UserError("train.cache_features needs a pooling head without trainable layers, and isqrt_cov's 1x1 "
                            f"reduction to model.isqrt_reduce_dim={cfg.model.isqrt_reduce_dim} channels trains; set "
                            "train.cache_features=false, or model.isqrt_reduce_dim=0.")

    @classmethod
    def too_large(cls, cfg, channels, size):
        return (f"model.isqrt_reduce_dim={cfg.isqrt_reduce_dim} leaves model.backbone={cfg.backbone}'s {channels} "
                f"channels unreduced: {size}; set model.isqrt_reduce_dim=256, as iSQRT-COV does.")

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        x = self.reduce(x)  # (B, d, H, W)
        # X Î Xᵀ is the covariance of the centred features, divided by M (not M - 1): computed without the M x M Î.
        centred = x - x.mean(dim=(2, 3), keepdim=True)
        covariance = gram_matrix(centred, centred)  # (B, d, d)
        trace = covariance.diagonal(dim1=1, dim2=2).sum(dim=1)  # (B,)
        root = newton_schulz_sqrt(covariance, trace, self.iterations)
        rows, cols = torch.triu_indices(root.shape[1], root.shape[2], device=root.device)
        return root[:, rows, cols]  # (B, d(d+1)/2): the symmetric root, each entry once

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduce_dim={self.reduce_dim}, iterations={self.iterations}"


@register_head("compact")
class CompactBilinearPooling(Pooling):
    """Compact bilinear pooling (Gao, Beijbom, Zhang, Darrell, CVPR 2016), its Tensor Sketch variant (after Pham &
    Pagh 2013): each position's x ⊗ x sketched to D dimensions, summed over the positions, then signed sqrt and L2
    normalisation: (B, D). The inner product of two images' sketches is an unbiased estimate of that of their
    summed bilinear vectors, Σ_p,q <x_p, y_q>², without a C x C classifier.

    The two count sketches' hashes h_k: [C] -> [D] and signs s_k: [C] -> {±1} are drawn once, from their own
    generator seeded with seed (the global RNG, which seeds training, is left alone), and kept as buffers: a
    checkpoint restores them, and the feature cache's key, a hash of the state dict, sees them."""

    def __init__(self, channels: int, dim: int = 8192, sqrt_eps: float = 1e-5, seed: int = 0):
        super().__init__()
        self.channels, self.sqrt_eps, self.seed = channels, sqrt_eps, seed
        self.output_dim = dim
        generator = torch.Generator().manual_seed(seed)  # on the CPU, whatever the default device (meta builds too)
        hashes = torch.randint(dim, (2, channels), generator=generator, device="cpu")  # (2, C) int64
        self.register_buffer("hashes", hashes)
        self.register_buffer("signs", torch.randint(2, (2, channels), generator=generator, device="cpu").float() * 2
                             - 1)  # (2, C)
        # The pairs of each bucket, from the hashes: buffers (moved with the model, read by torch.export as
        # constants), not saved (the hashes are), rebuilt when a state dict brings other hashes.
        self._set_bucket_table(BucketTable.build(hashes, dim))
        self.register_load_state_dict_post_hook(lambda module, keys: module._set_bucket_table(
            BucketTable.build(module.hashes.cpu(), module.output_dim)))

    option_ranges = {"model.compact_dim": "[1, inf)", "model.sqrt_eps": "(0, inf)"}

    @classmethod
    def from_config(cls, cfg, channels, channels_b=None, nonnegative_maps=False):
        return cls(channels, cfg.compact_dim, cfg.sqrt_eps)

    @classmethod
    def too_large(cls, cfg, channels, size):
        return (f"model.compact_dim={cfg.compact_dim:,} would make {size}; set model.compact_dim to at most "
                f"{MAX_POOLED_DIM:,} (8192 is the paper's).")

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): Σ_p TS(x_p), TS(x) = CS_1(x) ⊛ CS_2(x), the circular convolution of the two count
        sketches CS_k(x)[h_k(c)] += s_k(c) x_c.

        Computed as what it equals: entry d sums s_1(c) s_2(c') G[c, c'] over the channel pairs with
        h_1(c) + h_2(c') = d (mod D), G = Σ_p x_p x_pᵀ the un-normalised Gram matrix (Pham & Pagh's identity, summed
        over positions). So the head costs the bilinear head's Gram product plus a gather of its C² entries, rather
        than two dense (H W, C) x (C, D) products and FFTs of length D at every position. Each bucket sums its
        pairs in one fixed order, forward and backward (BucketTable), so the result is the same run after run, on
        a GPU too, where a scatter-add with colliding indices is not."""
        batch, channels, height, width = x.shape
        features = x.reshape(batch, channels, height * width)  # (B, C, HW)
        gram = torch.bmm(features, features.transpose(1, 2))  # (B, C, C), summed over positions
        signed = gram * (self.signs[0][:, None] * self.signs[1][None, :]).to(x.dtype)
        padded = F.pad(signed.flatten(1), (0, self.bucket_pairs.numel() - channels * channels))  # (B, D * load)
        if padded.requires_grad:
            by_bucket = _Permute.apply(padded, self.bucket_pairs, self.bucket_inverse)  # (B, D * load)
        else:  # the same gather, as a plain operation an exported graph holds
            by_bucket = padded.index_select(1, self.bucket_pairs)
        return by_bucket.view(batch, self.output_dim, -1).sum(dim=2)

    def _set_bucket_table(self, table: "BucketTable") -> None:
        device = self.hashes.device if self.hashes.device.type != "meta" else torch.device("cpu")
        self.register_buffer("bucket_pairs", table.table.flatten().to(device), persistent=False)  # (D * load,)
        self.register_buffer("bucket_inverse", table.inverse.to(device), persistent=False)

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(signed_sqrt(self.sketch(x), self.sqrt_eps), dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.output_dim}, sqrt_eps={self.sqrt_eps}, seed={self.seed}"


class BucketTable:
    """Where each of the C² channel pairs (c, c') of a tensor sketch goes: a (D, load) table of indices into the
    row-major pairs, row d listing the pairs with h_1(c) + h_2(c') = d (mod D) in row-major order, padded to the
    fullest bucket's load with indices past the last pair (distinct ones, each pointing at its own zero). Every
    index from 0 to D * load - 1 appears once: the table is a permutation, so its gradient is the inverse
    permutation (a gather, no scatter-add)."""

    def __init__(self, table: torch.Tensor, inverse: torch.Tensor):
        self.table, self.inverse = table, inverse  # (D, load) and (D * load,) int64

    @classmethod
    def build(cls, hashes: torch.Tensor, dim: int) -> "BucketTable":
        channels = hashes.shape[1]
        bucket = ((hashes[0][:, None] + hashes[1][None, :]) % dim).flatten()  # (C²,): each pair's bucket
        order = torch.argsort(bucket, stable=True)  # pairs grouped by bucket, row-major within each
        counts = torch.bincount(bucket, minlength=dim)  # (D,)
        load = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        on = {"device": hashes.device}  # the hashes' (the CPU), whatever the default device (a meta build's)
        slot = torch.arange(channels * channels, **on) - starts[bucket[order]]  # each pair's place in its bucket
        table = torch.full((dim, load), -1, dtype=torch.int64, **on)
        table[bucket[order], slot] = order
        empty = table < 0
        table[empty] = channels * channels + torch.arange(int(empty.sum()), **on)
        inverse = torch.empty(dim * load, dtype=torch.int64, **on)
        inverse[table.flatten()] = torch.arange(dim * load, **on)
        return cls(table, inverse)


class _Permute(torch.autograd.Function):
    """x[:, permutation] whose backward gathers by the inverse permutation: index_select's own backward is an
    index_add_, which on CUDA uses atomics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, permutation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def build_pooling(cfg, channels: int, channels_b: int | None = None, nonnegative_maps: bool = False) -> Pooling:
    """The head `cfg.pooling` names (cfg: bcnn.config.ModelConfig), with its options from the config;
    nonnegative_maps: the backbone(s) end in a ReLU (Backbone.nonnegative)."""
    return HEADS[cfg.pooling].from_config(cfg, channels, channels_b, nonnegative_maps)
