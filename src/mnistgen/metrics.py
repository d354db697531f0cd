"""Sample-quality metrics for generative models, as pure torch functions.

All functions take torch tensors on any device and return Python floats or
small dicts of floats. Features are [N, D] tensors (e.g. embeddings from a
pretrained classifier); probabilities are [N, C] tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DISTANCE_BATCH = 1000


# --------------------------------------------------------------------------
# Frechet distance (FID)
# --------------------------------------------------------------------------


def gaussian_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    x = feats.reshape(len(feats), -1).to(torch.float64)
    if len(x) < 2:
        raise ValueError("need at least 2 samples to estimate a covariance")
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / (len(x) - 1)
    return mu, sigma


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix; negative eigenvalues clamped to 0."""
    eigvals, eigvecs = torch.linalg.eigh(_symmetrize(matrix))
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def _symmetrize(matrix: Tensor) -> Tensor:
    return (matrix + matrix.T) / 2


def _trace_sqrt_product(s1: Tensor, s2: Tensor) -> Tensor:
    """Tr((S1 S2)^{1/2}) = sum of sqrt eigenvalues of S1^{1/2} S2 S1^{1/2}."""
    root1 = _psd_sqrt(s1)
    eigvals = torch.linalg.eigvalsh(_symmetrize(root1 @ s2 @ root1))
    return eigvals.clamp(min=0).sqrt().sum()


def fid_from_stats(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    """Frechet distance between the Gaussians N(mu1, s1) and N(mu2, s2).

    ||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1^{1/2} s2 s1^{1/2})^{1/2}).
    Lower is better; 0 means identical first and second moments.
    """
    mu1, s1, mu2, s2 = (t.to(torch.float64) for t in (mu1, s1, mu2, s2))
    mu2, s2 = mu2.to(mu1.device), s2.to(mu1.device)
    mean_term = (mu1 - mu2).square().sum()
    cov_term = s1.trace() + s2.trace() - 2 * _trace_sqrt_product(s1, s2)
    return float(mean_term + cov_term)


def fid(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet Inception Distance between Gaussian fits of two feature sets."""
    return fid_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# --------------------------------------------------------------------------
# Kernel distance (KID)
# --------------------------------------------------------------------------


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """Cubic polynomial kernel k(x, y) = (x.y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased estimate of MMD^2 between two equal-size samples."""
    m = len(x)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum())
    return within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kid(
    feats_a: Tensor,
    feats_b: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel.

    Averaged over `subsets` random subsets of `subset_size` samples from each
    set (Binkowski et al. 2018). Unbiased, so about 0 (possibly negative) for
    samples of one distribution; larger means more different.
    """
    a = feats_a.reshape(len(feats_a), -1).to(torch.float64)
    b = feats_b.reshape(len(feats_b), -1).to(device=a.device, dtype=torch.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        idx_a = torch.randperm(len(a), generator=gen)[:m].to(a.device)
        idx_b = torch.randperm(len(b), generator=gen)[:m].to(a.device)
        values.append(_mmd2_unbiased(a[idx_a], b[idx_b]))
    values = torch.stack(values)
    return {"mean": float(values.mean()), "std": float(values.std(unbiased=False))}


# --------------------------------------------------------------------------
# Inception score (IS)
# --------------------------------------------------------------------------


def inception_score(probs: Tensor, splits: int = 10) -> dict[str, float]:
    """Inception Score: exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

    High when each sample is confidently classified (sharp p(y|x)) and the
    classes are diverse (flat p(y)). Ranges from 1 to the number of classes.
    """
    p = probs.to(torch.float64)
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(dim=1)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return {"mean": float(scores.mean()), "std": float(scores.std(unbiased=False))}


# --------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019)
# --------------------------------------------------------------------------


def _knn_radii(feats: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set."""
    radii = []
    for rows in feats.split(_DISTANCE_BATCH):
        dists = torch.cdist(rows, feats)
        # The (k+1)-th smallest distance: the smallest is the point itself.
        radii.append(dists.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(manifold: Tensor, radii: Tensor, queries: Tensor) -> float:
    """Fraction of queries that lie within at least one manifold ball."""
    inside = [
        (torch.cdist(rows, manifold) <= radii).any(dim=1)
        for rows in queries.split(_DISTANCE_BATCH)
    ]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall of generated samples.

    Each point's ball has radius = distance to its k-th nearest neighbour in
    its own set. Precision: fraction of fake points inside some real ball
    (fidelity). Recall: fraction of real points inside some fake ball
    (coverage/diversity).
    """
    real = real_feats.reshape(len(real_feats), -1).float()
    fake = fake_feats.reshape(len(fake_feats), -1).float().to(real.device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    precision = _fraction_inside(real, _knn_radii(real, k), fake)
    recall = _fraction_inside(fake, _knn_radii(fake, k), real)
    return {"precision": precision, "recall": recall}


# --------------------------------------------------------------------------
# Class coverage
# --------------------------------------------------------------------------


def class_coverage(pred_labels: Tensor, num_classes: int = 10) -> dict:
    """How generated samples spread over classes (e.g. to detect mode collapse).

    Returns the predicted-label histogram, the number of classes present and
    the total variation distance of the label distribution from uniform
    (0 = perfectly balanced, 1 - 1/C = all samples in one class).
    """
    labels = pred_labels.reshape(-1).long().cpu()
    if len(labels) == 0:
        raise ValueError("no labels given")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    hist = torch.bincount(labels, minlength=num_classes)
    freqs = hist.to(torch.float64) / len(labels)
    tv = 0.5 * (freqs - 1 / num_classes).abs().sum()
    return {
        "histogram": hist.tolist(),
        "classes_present": int((hist > 0).sum()),
        "tv_to_uniform": float(tv),
    }


# --------------------------------------------------------------------------
# Conditional models and latent structure
# --------------------------------------------------------------------------


def label_fidelity(probs: Tensor, requested: Tensor) -> float:
    """Fraction of samples the evaluator classifies as the digit they were asked for."""
    return float((probs.argmax(1).cpu() == requested.reshape(-1).long().cpu()).to(torch.float64).mean())


def silhouette_samples(points: Tensor, labels: Tensor) -> Tensor:
    """Silhouette of each point by its label (Rousseeuw 1987), Euclidean distance, in float64.

    s = (b - a) / max(a, b), a = mean distance to the other points of its class, b = the smallest
    mean distance to another class's points; 1 = tight separate clusters, about 0 = no clustering.
    """
    x = points.reshape(len(points), -1).to(torch.float64).cpu()
    labels = labels.reshape(-1).long().cpu()
    classes = labels.unique()
    if len(classes) < 2:
        raise ValueError("the silhouette needs at least two classes")
    dist = torch.cdist(x, x)
    onehot = (labels[:, None] == classes[None, :]).to(torch.float64)  # [N, C]
    sums = dist @ onehot  # [N, C]: summed distance of each point to each class
    sizes = onehot.sum(0)
    own = onehot.bool()
    own_size = sizes[torch.searchsorted(classes, labels)]
    a = sums[own] / (own_size - 1).clamp_min(1)  # the point's distance to itself (0) is in the sum, not the count
    b = (sums / sizes).masked_fill(own, float("inf")).min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    return s.masked_fill(own_size == 1, 0.0)  # a point alone in its class scores 0 by convention
