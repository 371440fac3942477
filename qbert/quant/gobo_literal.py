"""GOBO exactly as the paper describes it, for tests and ``bench/gobo.py``: slow by design.

scikit-learn's one-component ``GaussianMixture`` fit and ``score_samples`` for the outliers; the
sorted Gaussian group split into equal-population bins (``np.array_split``) with their means as
centroids; then, per round, every weight reassigned by ``argmin`` over its distances to all
centroids, each centroid recomputed as its bin's mean, and the total L1 error checked. ``gobo`` stops
when the L1 error no longer falls (keeping the last state that lowered it), ``kmeans`` when the
assignment no longer changes. Nothing here is shared with :mod:`qbert.quant.gobo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LiteralResult:
    outliers: np.ndarray
    """Boolean mask over the flattened matrix."""
    centroids: np.ndarray
    """float64, in bin order."""
    l1_trace: list[float]

    @property
    def iterations(self) -> int:
        return len(self.l1_trace) - 1


def literal_gobo(weights: np.ndarray, bits: int, threshold: float = -4.0, policy: str = "gobo",
                 max_iterations: int = 10_000) -> LiteralResult:
    from sklearn.mixture import GaussianMixture

    flat = np.asarray(weights, dtype=np.float64).reshape(-1, 1)
    mixture = GaussianMixture(n_components=1, random_state=0).fit(flat)
    outliers = mixture.score_samples(flat) <= threshold
    group = np.sort(flat[~outliers, 0])
    k = 2**bits
    bins = np.array_split(group, k)
    centroids = np.array([b.mean() if b.size else 0.0 for b in bins])
    assign = np.concatenate([np.full(b.size, i) for i, b in enumerate(bins)])
    l1 = float(np.abs(group - centroids[assign]).sum())
    trace = [l1]
    for _ in range(max_iterations):
        new_assign = np.argmin(np.abs(group[:, None] - centroids[None, :]), axis=1)
        if policy == "kmeans" and np.array_equal(new_assign, assign):
            break
        new_centroids = centroids.copy()
        for i in range(k):
            members = group[new_assign == i]
            if members.size:
                new_centroids[i] = members.mean()
        new_l1 = float(np.abs(group - new_centroids[new_assign]).sum())
        if policy == "gobo" and new_l1 >= l1:
            break
        assign, centroids, l1 = new_assign, new_centroids, new_l1
        trace.append(l1)
    return LiteralResult(outliers, centroids, trace)
