"""Weight distributions of a fine-tuned BERT, as GOBO (Zadeh et al. 2020) draws them.

Per weight matrix: the Gaussian GOBO fits and its outliers (log-density at or below -4; Figure 1, Figure 3);
for one matrix, the L1 and L2 clustering error per iteration of GOBO's rule against K-means (Figure 2).
The iteration here is a direct Lloyd loop over the weights (nearest centroid, then bin means), written
apart from :mod:`qbert.quant.gobo`'s sorted-prefix-sum version, so each checks the other.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbert.quant.gobo import DEFAULT_THRESHOLD, fit_gaussian, outlier_bounds


@dataclass
class MatrixStats:
    """One weight matrix: its Gaussian fit and outliers."""

    site: str
    shape: tuple[int, ...]
    mean: float
    std: float
    outliers: int
    numel: int

    @property
    def outlier_fraction(self) -> float:
        return self.outliers / self.numel


def weight_matrices(model: Any) -> dict[str, np.ndarray]:
    """Every weight site's matrix (embedding tables, linear layers, pooler, head) as float32, forward order."""
    from qbert.quant.sites import weight_modules

    return {site: module.weight.detach().float().cpu().numpy() for site, module in weight_modules(model).items()}


def outlier_mask(weights: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> tuple[np.ndarray, float, float]:
    """GOBO's outliers of one matrix (log-density of its Gaussian at or below ``threshold``), its mean and std."""
    w = weights.reshape(-1)
    mean, var = fit_gaussian(w)
    lo, hi = outlier_bounds(mean, var, threshold)
    return (w <= lo) | (w >= hi), mean, float(np.sqrt(var))


def matrix_stats(matrices: dict[str, np.ndarray], threshold: float = DEFAULT_THRESHOLD) -> list[MatrixStats]:
    """The Gaussian fit and outlier count of every matrix."""
    found = []
    for site, weights in matrices.items():
        mask, mean, std = outlier_mask(weights, threshold)
        found.append(MatrixStats(site, tuple(weights.shape), mean, std, int(mask.sum()), int(weights.size)))
    return found


def clustering_errors(weights: np.ndarray, bits: int, threshold: float = DEFAULT_THRESHOLD,
                      max_iterations: int = 1000) -> dict[str, dict[str, Any]]:
    """Mean L1 and L2 error per weight of the Gaussian group after the equal-population start and after each
    Lloyd round (reassign to the nearest centroid, recompute bin means): ``kmeans`` runs until the assignment
    stops changing (``converged``; at most ``max_iterations`` rounds), ``gobo`` is the same sequence cut where
    the L1 error stops falling (GOBO's rule)."""
    mask, _, _ = outlier_mask(weights, threshold)
    x = np.sort(weights.reshape(-1)[~mask].astype(np.float64))
    k = 2**bits
    assignment = np.concatenate([np.full(len(part), i) for i, part in enumerate(np.array_split(x, k))])

    def centroids(labels: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        sums = np.bincount(labels, weights=x, minlength=k)
        counts = np.bincount(labels, minlength=k)
        means = np.divide(sums, counts, out=np.zeros(k), where=counts > 0)
        if previous is not None:
            means[counts == 0] = previous[counts == 0]
        return means

    def errors(labels: np.ndarray, codebook: np.ndarray) -> tuple[float, float]:
        diff = x - codebook[labels]
        return float(np.abs(diff).mean()), float((diff**2).mean())

    codebook = centroids(assignment, None)
    l1, l2 = errors(assignment, codebook)
    trace_l1, trace_l2 = [l1], [l2]
    converged = False
    for _ in range(max_iterations):
        mids = (codebook[1:] + codebook[:-1]) / 2
        labels = np.searchsorted(mids, x, side="left")  # nearest centroid, the lower one at a tie
        if np.array_equal(labels, assignment):
            converged = True
            break
        assignment = labels
        codebook = centroids(assignment, codebook)
        l1, l2 = errors(assignment, codebook)
        trace_l1.append(l1)
        trace_l2.append(l2)
    stop = next((i for i in range(1, len(trace_l1)) if not trace_l1[i] < trace_l1[i - 1]), len(trace_l1))
    return {"gobo": {"l1": trace_l1[:stop], "l2": trace_l2[:stop], "converged": stop < len(trace_l1) or converged},
            "kmeans": {"l1": trace_l1, "l2": trace_l2, "converged": converged}}


def select(sites: list[str], patterns: list[str], last_layer: int) -> list[str]:
    """Sites matching any glob of ``patterns`` (``{last}`` is the last layer's index), in model order."""
    expanded = [p.format(last=last_layer) for p in patterns]
    return [s for s in sites if any(fnmatch.fnmatchcase(s, p) for p in expanded)]


def save(matrices: dict[str, np.ndarray], stats: list[MatrixStats], histograms: list[str],
         errors: dict[str, dict[str, list[float]]] | None, error_site: str | None, folder: Path, title: str,
         figures: bool = True, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Path]:
    """Write ``weights.csv``, ``weights.json`` (and the error traces), and the figures into ``folder``."""
    from qbert.inspection import csv_text, plots
    from qbert.runs import atomic_write_json, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    rows = [[s.site, "x".join(map(str, s.shape)), s.numel, round(s.mean, 8), round(s.std, 8), s.outliers,
             round(s.outlier_fraction, 6)] for s in stats]
    atomic_write_text(folder / "weights.csv", csv_text(
        ["site", "shape", "numel", "mean", "std", "outliers", "outlier_fraction"], rows))
    linear = [s for s in stats if s.site.startswith("layer.")]
    atomic_write_json(folder / "weights.json", {
        "threshold": threshold,
        "outlier_fraction": {
            "all": round(sum(s.outliers for s in stats) / sum(s.numel for s in stats), 6),
            "encoder_linear": round(sum(s.outliers for s in linear) / max(1, sum(s.numel for s in linear)), 6),
        },
        "matrices": {s.site: {"shape": list(s.shape), "mean": s.mean, "std": s.std, "outliers": s.outliers,
                              "outlier_fraction": round(s.outlier_fraction, 6)} for s in stats},
        "clustering_errors": {"site": error_site, **(errors or {})} if errors else None,
    })
    files = {"weights.csv": folder / "weights.csv", "weights.json": folder / "weights.json"}
    if not figures:
        return files
    by_site = {s.site: s for s in stats}
    for site in histograms:
        mask, mean, std = outlier_mask(matrices[site], threshold)
        values = matrices[site].reshape(-1)
        name = f"histogram_{site.removesuffix('.weight').replace('.', '_')}.png"
        files[name] = plots.weight_histogram(values, mean, std, values[mask], folder / name,
                                             f"{title}: {site} ({by_site[site].numel} weights, GOBO Fig. 1)")
    files["outliers.png"] = plots.outlier_shares(
        [s.site.removesuffix(".weight") for s in linear], [s.outlier_fraction for s in linear],
        folder / "outliers.png", f"{title}: GOBO outliers per encoder FC layer (GOBO Fig. 3)")
    if errors:
        files["clustering_error.png"] = plots.error_per_iteration(
            errors, folder / "clustering_error.png", f"{title}: {error_site}, error per iteration (GOBO Fig. 2)")
    return files
