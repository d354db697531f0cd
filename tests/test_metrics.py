"""Tests for mnistgen.metrics (fast, seeded)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import silhouette_samples

from mnistgen import metrics
from mnistgen.metrics import (
    class_coverage,
    fid,
    fid_from_stats,
    gaussian_stats,
    inception_score,
    kid,
    precision_recall,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _random_gaussian(dim, seed):
    """A random mean and a well-conditioned random covariance."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim)
    a = rng.normal(size=(dim, dim))
    cov = a @ a.T / dim + 0.5 * np.eye(dim)
    return mean, cov


def _sample(mean, cov, n, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.multivariate_normal(mean, cov, size=n))


def _closed_form_fid(m1, s1, m2, s2):
    root1 = scipy.linalg.sqrtm(s1)
    cross = scipy.linalg.sqrtm(root1 @ s2 @ root1)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * cross.real))


# ---------------------------------------------------------------- FID


def test_gaussian_stats_match_numpy():
    x = _randn(500, 5)
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu.numpy(), x.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False), atol=1e-12)


def test_fid_of_set_with_itself_is_zero():
    x = _randn(2000, 16) * 3 + 1
    scale = float(gaussian_stats(x)[1].trace())
    assert abs(fid(x, x)) < 1e-6 * scale


def test_fid_matches_closed_form_for_gaussians():
    dim, n = 6, 20000
    m1, s1 = _random_gaussian(dim, seed=1)
    m2, s2 = _random_gaussian(dim, seed=2)
    expected = _closed_form_fid(m1, s1, m2, s2)
    got = fid(_sample(m1, s1, n, seed=3), _sample(m2, s2, n, seed=4))
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=0.03, abs=0.05)


def test_fid_is_exact_on_known_stats():
    dim = 5
    m1, s1 = _random_gaussian(dim, seed=5)
    m2, s2 = _random_gaussian(dim, seed=6)
    got = fid_from_stats(*(torch.from_numpy(t) for t in (m1, s1, m2, s2)))
    assert got == pytest.approx(_closed_form_fid(m1, s1, m2, s2), rel=1e-9)


def test_fid_is_invariant_to_sample_order():
    a, b = _randn(1000, 8, seed=1), _randn(1000, 8, seed=2) + 0.5
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    assert fid(a[perm], b) == pytest.approx(fid(a, b), rel=1e-9, abs=1e-12)
    assert fid(a, b[perm.flip(0)]) == pytest.approx(fid(a, b), rel=1e-9, abs=1e-12)


def test_fid_from_stats_agrees_with_fid():
    a, b = _randn(800, 10, seed=1), _randn(900, 10, seed=2) * 1.5
    assert fid_from_stats(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(fid(a, b))


def test_fid_accepts_float32():
    a, b = _randn(500, 4, seed=1), _randn(500, 4, seed=2) + 1
    assert fid(a.float(), b.float()) == pytest.approx(fid(a, b), rel=1e-5)


# ---------------------------------------------------------------- KID


def test_kid_near_zero_for_same_distribution():
    a, b = _randn(1000, 16, seed=1), _randn(1000, 16, seed=2)
    result = kid(a, b, subsets=10, subset_size=400)
    # Sampling noise at this size is ~3e-3; different distributions give ~1.
    assert abs(result["mean"]) < 0.01
    assert 1e-4 < result["std"] < 0.01  # the spread of the 10 subset estimates: sampling noise, neither 0 nor ~1


def test_kid_positive_for_different_distributions():
    a, b = _randn(1000, 16, seed=1), _randn(1000, 16, seed=2) + 0.5
    same = kid(a, _randn(1000, 16, seed=3), subsets=10, subset_size=400)
    diff = kid(a, b, subsets=10, subset_size=400)
    assert diff["mean"] > 0.5
    assert diff["mean"] > 10 * abs(same["mean"])


def test_kid_is_seeded_and_clips_subset_size():
    a, b = _randn(300, 8, seed=1), _randn(200, 8, seed=2) + 0.3
    first = kid(a, b, subsets=5, subset_size=1000, seed=7)
    assert first == kid(a, b, subsets=5, subset_size=1000, seed=7)
    assert first != kid(a, b, subsets=5, subset_size=1000, seed=8)
    assert first == kid(a, b, subsets=5, subset_size=200, seed=7)  # clipped to len(b)


def test_kid_matches_direct_formula_on_full_sets():
    """With one subset covering both whole sets, KID is the plain unbiased MMD^2."""
    a, b = _randn(300, 8, seed=1).numpy(), (_randn(300, 8, seed=2) * 1.2).numpy()
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3
    m = len(a)
    off_diag = lambda g: (g.sum() - np.trace(g)) / (m * (m - 1))
    expected = off_diag(k(a, a)) + off_diag(k(b, b)) - 2 * k(a, b).mean()
    result = kid(torch.from_numpy(a), torch.from_numpy(b), subsets=3, subset_size=m)
    assert result["mean"] == pytest.approx(expected, rel=1e-10)
    assert result["std"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_identical_sets():
    x = _randn(1500, 32)
    assert precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_far_apart_sets():
    real = _randn(1500, 32, seed=1)
    fake = _randn(1500, 32, seed=2) + 100
    result = precision_recall(real, fake, k=3)
    assert result["precision"] == pytest.approx(0.0, abs=1e-9)
    assert result["recall"] == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_detects_mode_dropping():
    """Fake covering half the real support: high precision, recall about half."""
    real = _randn(2000, 2, seed=1)
    fake = _randn(4000, 2, seed=2)
    fake = fake[fake[:, 0] > 0][:2000]
    result = precision_recall(real, fake, k=3)
    assert result["precision"] > 0.9
    assert 0.35 < result["recall"] < 0.75


# ---------------------------------------------------------------- inception score


def test_inception_score_is_one_for_constant_predictions():
    probs = torch.zeros(1000, 10)
    probs[:, 3] = 1
    result = inception_score(probs, splits=10)
    assert result["mean"] == pytest.approx(1.0, abs=1e-12)
    assert result["std"] == pytest.approx(0.0, abs=1e-12)


def test_inception_score_is_num_classes_for_confident_balanced_predictions():
    probs = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).float()
    result = inception_score(probs, splits=10)
    assert result["mean"] == pytest.approx(10.0, rel=1e-12)
    assert result["std"] == pytest.approx(0.0, abs=1e-9)


def test_inception_score_is_one_for_uniform_predictions():
    probs = torch.full((500, 10), 0.1)
    assert inception_score(probs, splits=5)["mean"] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_intermediate_value():
    # Two equally likely classes, each prediction one-hot: IS = 2.
    probs = torch.nn.functional.one_hot(torch.arange(400) % 2, 10).double()
    assert inception_score(probs, splits=4)["mean"] == pytest.approx(2.0)
    assert inception_score(probs, splits=4)["std"] == pytest.approx(0.0, abs=1e-9)  # every split scores exactly 2


# ---------------------------------------------------------------- class coverage


def test_class_coverage_known_labels():
    result = class_coverage(torch.tensor([0, 0, 1, 3, 3, 3]), num_classes=4)
    assert result["histogram"] == [2, 1, 0, 3]
    assert result["classes_present"] == 3
    # p = [1/3, 1/6, 0, 1/2]; |p - 1/4| = [1/12, 1/12, 1/4, 1/4]
    assert result["tv_to_uniform"] == pytest.approx(1 / 3)


def test_class_coverage_balanced_and_collapsed():
    assert class_coverage(torch.arange(100) % 10)["tv_to_uniform"] == pytest.approx(0.0)
    collapsed = class_coverage(torch.full((50,), 7))
    assert collapsed["classes_present"] == 1
    assert collapsed["tv_to_uniform"] == pytest.approx(0.9)


def test_class_coverage_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        class_coverage(torch.tensor([0, 10]), num_classes=10)


# ---------------------------------------------------------------- noise bands

from mnistgen.metrics import (
    band,
    bootstrap_counts,
    fid_replicates,
    fraction_replicates,
    inside_flags,
    kid_with_replicates,
    sharpness,
)


def _fid_band(n, seed=0):
    real, fake = _randn(4000, 6, seed=1), _randn(n, 6, seed=2 + seed) * 1.2 + 0.3
    mu, sigma = gaussian_stats(real)
    point = fid_from_stats(*gaussian_stats(fake), mu, sigma)
    return point, band(point, fid_replicates(fake, mu, sigma, bootstrap_counts(n, 200, seed)))


def test_bootstrap_counts_resample_n_of_n_and_whole_blocks():
    counts = bootstrap_counts(12, 5, seed=0)
    assert counts.shape == (5, 12) and torch.all(counts.sum(1) == 12)
    assert torch.equal(counts, bootstrap_counts(12, 5, seed=0)) and not torch.equal(counts, bootstrap_counts(12, 5, seed=1))
    blocks = bootstrap_counts(12, 5, seed=0, groups=3)
    assert torch.all(blocks.view(5, 4, 3) == blocks.view(5, 4, 3)[:, :, :1])  # the 3 points of a block share a count


def test_fid_band_contains_the_estimate_and_shrinks_with_more_samples():
    small_point, (small_lo, small_hi) = _fid_band(400)
    big_point, (big_lo, big_hi) = _fid_band(6400)
    assert small_lo <= small_point <= small_hi and big_lo <= big_point <= big_hi
    assert big_hi - big_lo < 0.5 * (small_hi - small_lo)  # 16x the samples: about 1/4 the width


def test_fid_replicates_with_unit_counts_give_the_plain_fid():
    real, fake = _randn(500, 5, seed=1), _randn(300, 5, seed=2) + 0.5
    mu, sigma = gaussian_stats(real)
    ones = torch.ones(1, 300, dtype=torch.float64)
    # rel 1e-6: all rounds' second moments come from one float32 product (of centred features)
    assert fid_replicates(fake, mu, sigma, ones)[0] == pytest.approx(fid_from_stats(*gaussian_stats(fake), mu, sigma), rel=1e-6)


def test_kid_with_replicates_keeps_kid_and_its_band_holds_it():
    a, b = _randn(600, 8, seed=1) + 0.3, _randn(600, 8, seed=2)
    plain = kid(a, b, subsets=5, subset_size=200, seed=3)
    result = kid_with_replicates(a, b, 5, 200, 3, bootstrap_counts(600, 100, 0))
    assert result["mean"] == pytest.approx(plain["mean"], rel=1e-12)
    lo, hi = band(result["mean"], result["replicates"])
    assert lo <= result["mean"] <= hi and hi - lo > 0
    unit = kid_with_replicates(a, b, 5, 200, 3, torch.ones(1, 600, dtype=torch.float64))
    assert unit["replicates"][0] == pytest.approx(plain["mean"], rel=1e-6)  # weight 1 everywhere: the estimate itself


def test_precision_recall_bands_from_the_per_sample_flags():
    real = _randn(1500, 4, seed=1)
    fake = _randn(3000, 4, seed=2)
    fake = fake[fake[:, 0] > 0][:1400]
    fake_inside, real_inside = inside_flags(real, fake, k=3)
    assert float(fake_inside.mean()) == precision_recall(real, fake, k=3)["precision"]
    assert float(real_inside.mean()) == precision_recall(real, fake, k=3)["recall"]
    point = float(real_inside.mean())
    lo, hi = band(point, fraction_replicates(real_inside, bootstrap_counts(len(real), 200, 0)))
    assert lo <= point <= hi and 0.005 < hi - lo < 0.1  # a fraction of 1,500: about +-2.5 %


# ---------------------------------------------------------------- sharpness


def _digit_like(n=64, seed=0):
    """Sharp binary strokes: random rectangles of ink on a black background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        r, c = torch.randint(4, 16, (2,), generator=g).tolist()
        images[i, 0, r : r + 8, c : c + 3] = 1
        images[i, 0, r : r + 3, c : c + 9] = 1
    return images


def test_a_blurred_image_is_less_sharp_than_the_sharp_one():
    sharp = _digit_like()
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2, count_include_pad=False)
    s, b = sharpness(sharp), sharpness(blurred)
    assert b["grad_mag"] < 0.7 * s["grad_mag"] and b["laplacian_var"] < 0.5 * s["laplacian_var"]
    assert s["grey_fraction"] == 0.0 and b["grey_fraction"] > 0.05
    assert s["grad_mag_stderr"] > 0


def test_sharpness_of_a_flat_image_is_zero_and_a_unit_ramp_has_gradient_one():
    assert sharpness(torch.full((4, 1, 28, 28), 0.5))["grad_mag"] == pytest.approx(0.0, abs=1e-7)
    ramp = torch.arange(28.0).repeat(28, 1)[None, None] / 100  # rises 0.01 per pixel
    assert sharpness(ramp)["grad_mag"] == pytest.approx(0.01, rel=1e-4)


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    """Each point's radius is its k-th nearest neighbour's distance, itself not counted; across the row batches."""
    from mnistgen import metrics

    x = torch.randn(2_500, 6, generator=torch.Generator().manual_seed(0))  # more rows than one distance batch
    for k in (1, 3, 5):
        expected = torch.cdist(x, x).sort(dim=1).values[:, k]
        assert torch.equal(metrics._knn_radii(x, k), expected), k


@pytest.mark.parametrize(("n", "clusters"), [(400, 10), (60, 3)])
def test_silhouette_is_sklearns(n, clusters):
    gen = torch.Generator().manual_seed(n)
    labels = torch.randint(clusters, (n,), generator=gen) * 7 + 2  # any label values, not 0..C-1
    points = torch.randn(n, 5, generator=gen) + labels[:, None].float() / 7
    labels[0] = 99  # a point alone in its cluster scores 0
    expected = torch.as_tensor(silhouette_samples(points.double().numpy(), labels.numpy()))
    assert torch.allclose(metrics.silhouette(points, labels), expected, atol=1e-9)
    assert metrics.silhouette(points, labels)[0] == 0


def test_silhouette_is_one_for_tight_far_clusters_and_negative_for_swapped_labels():
    points = torch.tensor([[0.0], [0.01], [10.0], [10.01]])
    assert torch.allclose(metrics.silhouette(points, torch.tensor([0, 0, 1, 1])), torch.ones(4, dtype=torch.float64), atol=2e-3)
    assert (metrics.silhouette(points, torch.tensor([0, 1, 0, 1])) < 0).all()
