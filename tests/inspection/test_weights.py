"""Weight inspection against independent computations: scipy's Gaussian log-density for the outliers, and
qbert.quant.gobo's sorted-prefix-sum clustering for the direct Lloyd loop's error traces."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from qbert.inspection.weights import clustering_errors, matrix_stats, save, select
from qbert.quant.gobo import quantize_matrix


def heavy_tailed(seed: int, shape=(96, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(0.01, 0.05, size=shape).astype(np.float32)
    w.reshape(-1)[rng.choice(w.size, 40, replace=False)] = rng.normal(0, 0.5, size=40)  # outliers
    return w


def test_outliers_are_the_weights_whose_gaussian_log_density_is_at_most_minus_four():
    w = heavy_tailed(0)
    (stats,) = matrix_stats({"layer.0.ffn.output.weight": w})
    x = w.reshape(-1).astype(np.float64)
    expected = norm.logpdf(x, loc=x.mean(), scale=np.sqrt(x.var() + 1e-6)) <= -4.0
    assert stats.outliers == int(expected.sum()) and 15 <= stats.outliers <= 40
    assert stats.std == pytest.approx(np.sqrt(x.var() + 1e-6), rel=1e-9)


@pytest.mark.parametrize("bits", [2, 3])
def test_gobo_and_kmeans_traces_match_the_sorted_implementation(bits):
    w = heavy_tailed(bits)
    traces = clustering_errors(w, bits)
    _, gobo = quantize_matrix(w, bits, "gobo")
    inliers = w.size - gobo.outliers
    # quantize_matrix traces the L1 sum of the group after the start and each accepted round
    np.testing.assert_allclose(np.array(traces["gobo"]["l1"]) * inliers, gobo.l1_trace, rtol=1e-6)
    assert len(traces["gobo"]["l1"]) == gobo.iterations + 1
    _, kmeans = quantize_matrix(w, bits, "kmeans")
    assert len(traces["kmeans"]["l1"]) == kmeans.iterations + 1 and traces["kmeans"]["converged"] == kmeans.converged
    assert traces["kmeans"]["l1"][-1] * inliers == pytest.approx(kmeans.l1_trace[-1], rel=1e-6)
    l2 = traces["kmeans"]["l2"]
    assert all(b <= a + 1e-15 for a, b in zip(l2, l2[1:], strict=False))  # Lloyd never raises the L2 error


def test_select_and_files(tmp_path):
    pytest.importorskip("matplotlib", reason="the viz extra (make setup installs it)")
    sites = ["embeddings.word.weight", "layer.0.attn.query.weight", "layer.1.ffn.output.weight"]
    assert select(sites, ["layer.{last}.ffn.*", "embeddings.word.weight"], 1) == [sites[0], sites[2]]
    matrices = {site: heavy_tailed(i) for i, site in enumerate(sites)}
    stats = matrix_stats(matrices)
    files = save(matrices, stats, sites[1:], clustering_errors(matrices[sites[1]], 3), sites[1], tmp_path, "t")
    assert {"outliers.png", "clustering_error.png", "histogram_layer_0_attn_query.png", "weights.csv"} <= set(files)
    assert files["outliers.png"].read_bytes()[:4] == b"\x89PNG"
    lines = files["weights.csv"].read_text().splitlines()
    assert lines[0].startswith("site,shape,numel") and lines[2].startswith("layer.0.attn.query.weight,96x64,6144,")
