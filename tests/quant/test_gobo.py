"""GOBO clustering against independent computations: scikit-learn's GaussianMixture for the fit and
the outliers, and the paper's procedure written out literally (``qbert.quant.gobo_literal``: argmin
reassignment and per-bin means) for the centroids, iterations and L1 trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from qbert.quant.gobo import POLICIES, fit_gaussian, log_density, quantize_matrix
from qbert.quant.gobo_literal import literal_gobo


def heavy_tailed(shape: tuple[int, ...], seed: int = 0, std: float = 0.04) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * std
    flat = w.reshape(-1)
    flat[rng.choice(flat.size, max(1, flat.size // 500), replace=False)] *= 6  # 0.2% heavy tail
    return w.astype(np.float32)


def literal(weights: np.ndarray, bits: int, threshold: float = -4.0, policy: str = "gobo"):
    result = literal_gobo(weights, bits, threshold, policy)
    return result.outliers, result.centroids, result.l1_trace


def test_gaussian_fit_matches_scikit_learn():
    w = heavy_tailed((384, 1536), seed=1)
    gm = GaussianMixture(n_components=1).fit(w.reshape(-1, 1).astype(np.float64))
    mean, var = fit_gaussian(w)
    assert mean == pytest.approx(float(gm.means_[0, 0]), rel=1e-9, abs=1e-12)
    assert var == pytest.approx(float(gm.covariances_[0, 0, 0]), rel=1e-9)
    x = w.reshape(-1)[:1000]
    assert np.allclose(log_density(x, mean, var), gm.score_samples(x[:, None].astype(np.float64)), rtol=1e-9)


@pytest.mark.parametrize("threshold", [-4.0, -2.0])
def test_outliers_match_scikit_learn(threshold):
    w = heavy_tailed((768, 768), seed=2)
    gm = GaussianMixture(n_components=1).fit(w.reshape(-1, 1).astype(np.float64))
    expected = np.flatnonzero(gm.score_samples(w.reshape(-1, 1).astype(np.float64)) <= threshold)
    code, stats = quantize_matrix(w, 3, threshold=threshold)
    assert expected.size > 0
    np.testing.assert_array_equal(code.outlier_positions, expected)
    np.testing.assert_array_equal(code.outlier_values, w.reshape(-1)[expected])
    assert stats.outliers == expected.size


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_centroids_and_iterations_match_the_literal_procedure(bits):
    w = heavy_tailed((256, 512), seed=3)
    code, stats = quantize_matrix(w, bits)
    _, centroids, trace = literal(w, bits)
    assert stats.iterations == len(trace) - 1
    np.testing.assert_allclose(code.codebook, centroids, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.l1_trace, trace, rtol=1e-5)


def test_kmeans_policy_matches_lloyd_to_convergence():
    w = heavy_tailed((128, 256), seed=4)
    code, stats = quantize_matrix(w, 3, policy="kmeans")
    _, centroids, trace = literal(w, 3, policy="kmeans")
    assert stats.converged and stats.iterations == len(trace) - 1
    np.testing.assert_allclose(code.codebook, centroids, rtol=0, atol=1e-6)


def test_gaussian_data_converges_within_ten_rounds_and_l1_never_increases():
    rng = np.random.default_rng(5)
    for seed in range(5):
        w = (rng.standard_normal((768, 768)) * 0.05).astype(np.float32)
        code, stats = quantize_matrix(w, 3)
        assert stats.converged and stats.iterations <= 10, (seed, stats.iterations)
        assert all(b < a for a, b in zip(stats.l1_trace, stats.l1_trace[1:], strict=False))
        assert stats.l1 <= stats.l1_trace[-1] * (1 + 1e-12)
        # the reported L1 is the L1 of the decoded matrix
        assert stats.l1 == pytest.approx(float(np.abs(code.decode().astype(np.float64) - w).sum()), rel=1e-9)


def test_gobo_beats_its_equal_population_start_and_kmeans_runs_longer():
    w = heavy_tailed((768, 768), seed=6)
    _, gobo = quantize_matrix(w, 3, policy="gobo")
    _, kmeans = quantize_matrix(w, 3, policy="kmeans")
    assert gobo.l1 < gobo.l1_trace[0]
    assert kmeans.iterations > gobo.iterations


def test_linear_policy_is_equal_width_bins_with_centre_values():
    w = heavy_tailed((64, 64), seed=7)
    code, stats = quantize_matrix(w, 2, policy="linear")
    keep = np.ones(w.size, dtype=bool)
    keep[code.outlier_positions] = False
    g = w.reshape(-1)[keep].astype(np.float64)
    lo, hi = g.min(), g.max()
    step = (hi - lo) / 4
    np.testing.assert_allclose(code.codebook, lo + step * (np.arange(4) + 0.5), rtol=1e-6)
    expected = np.clip(np.ceil((g - lo) / step) - 1, 0, 3)  # bin i holds (lo + i step, lo + (i+1) step]
    inner = np.abs((g - lo) / step - np.round((g - lo) / step)) > 1e-5  # away from edges (float rounding)
    np.testing.assert_array_equal(code.indices[inner], expected[inner])
    assert stats.iterations == 0


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_decode_uses_only_codebook_values_and_exact_outliers(policy, bits):
    w = heavy_tailed((100, 37), seed=8)
    code, _ = quantize_matrix(w, bits, policy=policy)
    decoded = code.decode()
    assert decoded.shape == w.shape and decoded.dtype == np.float32
    keep = np.ones(w.size, dtype=bool)
    keep[code.outlier_positions] = False
    assert np.isin(decoded.reshape(-1)[keep], code.codebook).all()
    assert np.all(np.diff(code.codebook) >= 0) and code.codebook.size == 2**bits
    assert int(code.indices.max()) < 2**bits
    # every Gaussian-group weight sits at its nearest centroid
    dist = np.abs(w.reshape(-1)[keep][:, None].astype(np.float64) - code.codebook[None, :].astype(np.float64))
    chosen = dist[np.arange(dist.shape[0]), code.indices]
    assert np.all(chosen <= dist.min(axis=1) + 1e-7)


def test_tiny_matrices_with_fewer_weights_than_bins():
    w = np.array([[0.1, -0.2, 0.05]], dtype=np.float32)
    code, stats = quantize_matrix(w, 3)
    assert code.codebook.size == 8 and np.all(np.diff(code.codebook) >= 0)
    np.testing.assert_array_equal(code.decode(), w)  # three weights, eight centroids: exact
    assert stats.l1 == 0.0


def test_outlier_threshold_follows_the_density_not_a_fixed_sigma():
    """The threshold is on the log-density, so a narrower matrix (higher peak density) keeps more
    sigmas inside the Gaussian group than a wider one."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal((512, 512))
    radius = []
    for std in (0.02, 0.08):
        w = (base * std).astype(np.float32)
        code, stats = quantize_matrix(w, 3)
        inner = np.delete(w.reshape(-1), code.outlier_positions)
        radius.append(np.abs(inner).max() / stats.std)
        expected = math.sqrt(-2 * (-4.0) - math.log(2 * math.pi * (stats.std**2 + 1e-6)))
        assert radius[-1] == pytest.approx(expected, rel=0.05)
    assert radius[0] > radius[1]


def test_a_threshold_above_the_peak_density_keeps_every_weight_exact():
    w = heavy_tailed((16, 16), seed=10)
    code, stats = quantize_matrix(w, 3, threshold=50.0)
    assert stats.outliers == w.size and code.indices.size == 0 and stats.l1 == 0.0
    np.testing.assert_array_equal(code.decode(), w)
