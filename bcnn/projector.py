"""The val set in TensorBoard's embedding projector: each image's model.embed vector (the pooled, normalised vector
the classifier reads), its class and a thumbnail, so a researcher sees which classes the head pulls together.

    vectors, labels, thumbnails = embed_split(model, loader, normalisation, device)
    board.projector(projector_vectors(vectors), [classes[i] for i in labels], thumbnails, step)

A second-order head's vector is large (262,144-d for VGG16's bilinear head: a 500-image val set would be a
gigabyte of the projector's text files), so above MAX_DIM dimensions the projector gets the vectors' first
COMPONENTS principal components (centred, from their SVD): the projector itself shows PCA, t-SNE or UMAP of
what it is given, and those are what the first components keep. The avg and compact heads' vectors go in whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bcnn.figures import denormalize

MAX_DIM, COMPONENTS, THUMBNAIL = 16384, 256, 32


@torch.no_grad()
def embed_split(model, loader, normalisation, device, limit: int | None = None):
    """(N, D) float32 model.embed vectors, (N,) labels and (N, 3, 32, 32) thumbnails in [0, 1] of a loader's images,
    in its order; at most `limit` images."""
    model.eval()
    vectors, labels, thumbnails, seen = [], [], [], 0
    for images, targets in loader:
        take = len(images) if limit is None else min(len(images), limit - seen)
        if take <= 0:
            break
        images, targets = images[:take], targets[:take]
        vectors.append(model.embed(images.to(device).float()).float().cpu())
        labels.append(targets.cpu())
        small = F.interpolate(images.float().cpu(), size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True,
                              align_corners=False)
        thumbnails.append(denormalize(small, normalisation).clamp(0, 1))
        seen += len(images)
    return torch.cat(vectors), torch.cat(labels), torch.cat(thumbnails)


def projector_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """The vectors themselves up to MAX_DIM dimensions; above it their scores on the first COMPONENTS principal
    components, from the N x N Gram matrix of the centred vectors (N images: small, where D is not): its
    eigenvectors u_k with eigenvalues l_k give the scores u_k sqrt(l_k), exactly as an SVD of the N x D matrix would."""
    if vectors.shape[1] <= MAX_DIM:
        return vectors
    centred = vectors - vectors.mean(0, keepdim=True)
    values, directions = torch.linalg.eigh((centred @ centred.T).double())  # ascending
    keep = min(COMPONENTS, len(values))
    values, directions = values.flip(0)[:keep].clamp_min(0), directions.flip(1)[:, :keep]
    return (directions * values.sqrt()).float()
