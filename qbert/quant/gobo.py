"""GOBO (Zadeh et al. 2020): outlier-aware clustering of one weight matrix, no data, no retraining.

Per matrix:

1. Fit one Gaussian to all its weights. The paper uses scikit-learn's one-component
   ``GaussianMixture``; for one component its fit is closed form: the mean, and the (biased)
   variance plus ``reg_covar`` (scikit-learn's default 1e-6, kept so the outliers are the paper's).
2. Weights whose log-density under that Gaussian is at or below ``threshold`` (-4) are outliers and
   stay exact (FP32). The log-density falls with the distance to the mean, so the outliers are the
   two tails ``|w - mean| >= r`` of the sorted weights and the rest, the "Gaussian group", is one
   contiguous slice of them.
3. The Gaussian group goes into ``2**bits`` bins, each represented by one FP32 centroid:

   - ``gobo``: equal-population bins of the sorted weights, centroid = bin mean; then repeat
     "reassign every weight to its nearest centroid, recompute the means" while the total L1 error
     falls, and keep the last state that lowered it;
   - ``kmeans``: the same start and the same update (Lloyd's algorithm), run until the assignment
     stops changing (the paper's K-Means baseline);
   - ``linear``: equal-width bins over the group's range, centroid = bin centre (linear
     quantization, the paper's other baseline).

   The stored assignment is always "nearest centroid of the final codebook".

In one dimension nearest-centroid bins are contiguous in sorted order, so after one sort every
iteration is a handful of binary searches into the sorted weights and their float64 prefix sums:
``O(K log n)`` per iteration, no pass over the weights and no Python loop over them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

POLICIES: tuple[str, ...] = ("gobo", "kmeans", "linear")
DEFAULT_THRESHOLD = -4.0
"""GOBO's outlier threshold on the log-density of the matrix's Gaussian (the paper's value)."""
REG_COVAR = 1e-6
"""Added to the variance, as scikit-learn's ``GaussianMixture(reg_covar=1e-6)`` does."""
MAX_ITERATIONS = 10_000
"""Safety cap on reassignment rounds (GOBO stops after about 7 at 3 bits; k-means at 6 bits can take
over 1,500 on a real matrix). A run that hits it reports ``converged: false``."""


@dataclass
class GoboCode:
    """One compressed matrix: a ``bits``-bit codebook index per Gaussian-group weight (flat, row-major
    order, outliers skipped), the codebook, and the outliers' flat positions and exact values."""

    shape: tuple[int, ...]
    bits: int
    indices: np.ndarray
    """uint8, one per non-outlier weight."""
    codebook: np.ndarray
    """float32, ``2**bits`` centroids in ascending order."""
    outlier_positions: np.ndarray
    """int64 flat positions, ascending."""
    outlier_values: np.ndarray
    """float32, the outliers as they were."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def outliers(self) -> int:
        return int(self.outlier_positions.size)

    def decode(self, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 matrix this code stands for (written into ``out`` when given)."""
        flat = np.empty(self.numel, dtype=np.float32) if out is None else out.reshape(-1)
        if self.outliers:
            keep = np.ones(self.numel, dtype=bool)
            keep[self.outlier_positions] = False
            flat[keep] = self.codebook[self.indices]
            flat[self.outlier_positions] = self.outlier_values
        else:
            np.take(self.codebook, self.indices, out=flat)
        return flat.reshape(self.shape)


@dataclass
class GoboStats:
    """What clustering one matrix did."""

    policy: str
    bits: int
    numel: int
    outliers: int
    mean: float
    std: float
    iterations: int
    """Accepted reassignment rounds (0 for ``linear``)."""
    converged: bool
    """gobo: the L1 error stopped falling; kmeans: the assignment stopped changing; linear: always."""
    l1: float
    """Sum of |w - decoded w| over the matrix (outliers are exact and add nothing)."""
    l1_trace: list[float] = field(default_factory=list)
    """L1 error of the Gaussian group after the start and after each accepted round."""
    seconds: float = 0.0

    @property
    def outlier_fraction(self) -> float:
        return self.outliers / self.numel if self.numel else 0.0


def fit_gaussian(weights: np.ndarray) -> tuple[float, float]:
    """Mean and variance (plus :data:`REG_COVAR`) of all weights, accumulated in float64."""
    mean = float(np.mean(weights, dtype=np.float64))
    var = float(np.var(weights, dtype=np.float64)) + REG_COVAR
    return mean, var


def log_density(weights: np.ndarray, mean: float, var: float) -> np.ndarray:
    """Log of the Gaussian density at each weight (float64), as ``score_samples`` returns it."""
    x = np.asarray(weights, dtype=np.float64)
    return -0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def outlier_bounds(mean: float, var: float, threshold: float) -> tuple[np.float32, np.float32]:
    """float32 ``(lo, hi)`` with: a float32 weight is an outlier iff ``w <= lo`` or ``w >= hi``.

    ``log_density(w) <= threshold``  <=>  ``(w - mean)^2 >= var * (-2 threshold - log(2 pi var))``.
    """
    r2 = var * (-2.0 * threshold - math.log(2 * math.pi * var))
    if r2 <= 0:  # the density is below the threshold everywhere: every weight is an outlier
        return np.float32(np.inf), np.float32(-np.inf)
    r = math.sqrt(r2)
    bounds = np.array([mean - r, mean + r])
    return _float32_below(bounds[:1])[0], _float32_above(bounds[1:])[0]


def _float32_below(values: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 value: for float32 ``x``, ``x <= v`` iff ``x <= result``."""
    out = values.astype(np.float32)
    over = out.astype(np.float64) > values
    out[over] = np.nextafter(out[over], np.float32(-np.inf))
    return out


def _float32_above(values: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 value: for float32 ``x``, ``x < v`` iff ``x < result``."""
    out = values.astype(np.float32)
    under = out.astype(np.float64) < values
    out[under] = np.nextafter(out[under], np.float32(np.inf))
    return out


def midpoints(codebook: np.ndarray) -> np.ndarray:
    """float32 decision thresholds between adjacent centroids, exact for float32 weights: a weight
    goes to the lower of two centroids iff it is at or below their midpoint."""
    c = codebook.astype(np.float64)
    return _float32_below((c[:-1] + c[1:]) / 2)


_BLOCK = 64


class _SortedGroup:
    """The sorted Gaussian group with float64 prefix sums per block of 64 weights: the sum of any
    prefix is one block prefix plus at most 63 weights, so bin sums and L1 errors cost
    ``O(K (log n + 64))`` per round and no n-sized float64 array is ever built."""

    def __init__(self, values: np.ndarray) -> None:
        self.x = values
        self.n = values.size
        full = self.n // _BLOCK
        block_sums = values[: full * _BLOCK].reshape(full, _BLOCK).sum(axis=1, dtype=np.float64)
        self.block_prefix = np.concatenate(([0.0], np.cumsum(block_sums)))
        self._columns = np.arange(_BLOCK)

    def prefix(self, positions: np.ndarray) -> np.ndarray:
        """``sum(x[:p])`` in float64 for every ``p`` in ``positions``."""
        p = np.asarray(positions, dtype=np.int64)
        block = p // _BLOCK
        start = block * _BLOCK
        take = self._columns[None, :] < (p - start)[:, None]
        rows = np.minimum(start[:, None] + self._columns[None, :], max(self.n - 1, 0))
        partial = np.where(take, self.x[rows] if self.n else 0.0, 0.0).sum(axis=1, dtype=np.float64)
        return self.block_prefix[block] + partial

    def equal_population(self, k: int) -> np.ndarray:
        """Bin bounds of ``k`` equal-population bins, the first ``n % k`` one weight larger (``np.array_split``)."""
        q, r = divmod(self.n, k)
        sizes = np.full(k, q, dtype=np.int64)
        sizes[:r] += 1
        return np.concatenate(([0], np.cumsum(sizes)))

    def nearest(self, codebook: np.ndarray) -> np.ndarray:
        inner = np.searchsorted(self.x, midpoints(codebook), side="right")
        return np.concatenate(([0], inner, [self.n])).astype(np.int64)

    def means(self, bounds: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        counts = np.diff(bounds)
        sums = np.diff(self.prefix(bounds))
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / counts
        empty = counts == 0
        if empty.any():  # an empty bin keeps its centroid (still between its neighbours)
            if previous is not None:
                means[empty] = previous[empty]
            else:  # the start with fewer weights than bins: the value at the bin's boundary
                means[empty] = self.x[np.minimum(bounds[:-1][empty], max(self.n - 1, 0))] if self.n else 0.0
        return means

    def l1(self, bounds: np.ndarray, codebook: np.ndarray) -> float:
        c = codebook.astype(np.float64)
        lo, hi = bounds[:-1], bounds[1:]
        split = np.clip(np.searchsorted(self.x, _float32_above(c), side="left"), lo, hi)  # first x >= c
        at_bounds, at_split = np.split(self.prefix(np.concatenate((bounds, split))), [bounds.size])
        below = c * (split - lo) - (at_split - at_bounds[:-1])
        above = (at_bounds[1:] - at_split) - c * (hi - split)
        return float(np.sum(below + above))


def _cluster(group: _SortedGroup, k: int, policy: str) -> tuple[np.ndarray, int, bool, list[float]]:
    """float64 centroids, accepted rounds, whether the policy's stopping rule was met, and the L1
    trace (gobo: after the start and every round; kmeans, which does not look at L1: start and end)."""
    if policy == "linear":
        lo, hi = (float(group.x[0]), float(group.x[-1])) if group.n else (0.0, 0.0)
        codebook = lo + (np.arange(k) + 0.5) * ((hi - lo) / k)
        return codebook, 0, True, [group.l1(group.nearest(codebook), codebook)]
    bounds = group.equal_population(k)
    codebook = group.means(bounds, None)
    l1 = group.l1(bounds, codebook)
    trace, iterations, converged = [l1], 0, False
    while iterations < MAX_ITERATIONS:
        new_bounds = group.nearest(codebook)
        if policy == "kmeans" and np.array_equal(new_bounds, bounds):
            converged = True
            break
        new_codebook = group.means(new_bounds, codebook)
        if policy == "gobo":
            new_l1 = group.l1(new_bounds, new_codebook)
            if not new_l1 < l1:
                converged = True
                break
            l1 = new_l1
            trace.append(l1)
        bounds, codebook = new_bounds, new_codebook
        iterations += 1
    if policy == "kmeans":
        trace.append(group.l1(bounds, codebook))
    return codebook, iterations, converged, trace


def assign(weights: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """uint8 index of each weight's nearest centroid (the lower one at a tie)."""
    mids = midpoints(codebook)
    if mids.size > 31:
        return np.searchsorted(mids, weights, side="left").astype(np.uint8)
    indices = np.zeros(weights.shape, dtype=np.uint8)
    for mid in mids:  # counting the thresholds below each weight: K-1 cheap passes beat a binary search
        indices += weights > mid
    return indices


def quantize_matrix(
    weights: np.ndarray, bits: int, policy: str = "gobo", threshold: float = DEFAULT_THRESHOLD
) -> tuple[GoboCode, GoboStats]:
    """GOBO-compress one weight matrix (any shape; float32). Returns the code and what it took."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    start = time.perf_counter()
    w = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
    mean, var = fit_gaussian(w)
    lo, hi = outlier_bounds(mean, var, threshold)
    is_outlier = (w <= lo) | (w >= hi)
    positions = np.flatnonzero(is_outlier)
    inliers = w[~is_outlier] if positions.size else w
    group = _SortedGroup(np.sort(inliers))
    centroids, iterations, converged, trace = _cluster(group, 2**bits, policy)
    codebook = centroids.astype(np.float32)  # what is stored; the final assignment is nearest in it
    indices = assign(inliers, codebook)
    l1 = group.l1(group.nearest(codebook), codebook)
    code = GoboCode(tuple(weights.shape), bits, indices, codebook, positions.astype(np.int64), w[positions].copy())
    stats = GoboStats(
        policy=policy, bits=bits, numel=w.size, outliers=int(positions.size), mean=mean,
        std=math.sqrt(var - REG_COVAR), iterations=iterations, converged=converged, l1=l1, l1_trace=trace,
        seconds=time.perf_counter() - start,
    )
    return code, stats


class MatrixSpec(Protocol):
    """How to cluster one matrix (``recipes.gobo.GoboSpec`` is one)."""

    bits: int
    policy: str
    threshold: float


@dataclass
class ModelCodes:
    """The result of :func:`quantize_model`: codes by parameter name, stats by site, wall time."""

    codes: dict[str, GoboCode]
    stats: dict[str, GoboStats]
    parameter_names: dict[str, str]
    """site -> parameter name."""
    seconds: float
    threads: int


def quantize_model(model: Any, specs: dict[str, MatrixSpec], threads: int = 1,
                   on_matrix: Callable[[str], None] | None = None) -> ModelCodes:
    """Cluster the weight of every site in ``specs`` (weight site names, see ``qbert.quant.sites``) and
    write the decoded weights into ``model`` in place. Matrices run on ``threads`` threads (numpy's
    sort and scans release the GIL); ``seconds`` covers everything, writing the weights back included.
    ``on_matrix(site)`` is called as each matrix is done (progress)."""
    import torch

    from qbert.quant.sites import weight_modules

    modules = weight_modules(model)
    unknown = sorted(set(specs) - set(modules))
    if unknown:
        raise ValueError(f"not weight sites of this model: {', '.join(unknown)}")
    names = {id(m): n for n, m in model.named_modules()}
    # largest first, so the big embedding table does not start last on a busy thread
    jobs = sorted(specs.items(), key=lambda item: -modules[item[0]].weight.numel())

    def cluster(job: tuple[str, MatrixSpec]) -> tuple[GoboCode, GoboStats]:
        site, spec = job
        weight = modules[site].weight
        on_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
        array = weight.detach().numpy() if on_cpu else weight.detach().float().cpu().numpy()
        code, stats = quantize_matrix(array, spec.bits, spec.policy, spec.threshold)
        if on_cpu:  # decode straight into the parameter's memory (its values are no longer needed)
            code.decode(out=array)
        else:
            with torch.no_grad():
                weight.copy_(torch.from_numpy(code.decode()).to(weight.device, weight.dtype))
        return code, stats

    start = time.perf_counter()
    with torch.no_grad(), ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = {}
        for (site, _), result in zip(jobs, pool.map(cluster, jobs), strict=True):
            results[site] = result
            if on_matrix is not None:
                on_matrix(site)
    out = ModelCodes({}, {}, {}, time.perf_counter() - start, max(1, threads))
    for site in specs:  # reported in the caller's (forward) order
        code, stats = results[site]
        name = f"{names[id(modules[site])]}.weight"
        out.codes[name], out.stats[site], out.parameter_names[site] = code, stats, name
    return out
