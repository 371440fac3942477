"""Range estimators: small objects with ``update``, ``range`` and ``reset`` (no nn.Module state).

Every estimator sees a ``[groups, samples]`` matrix: one row per quantization group (1 for
per-tensor, K for per-embedding-group, the output rows for per-channel weights), with padding
tokens already removed by the caller. ``range()`` returns per-row ``(lo, hi)``.

- ``minmax``: current min-max, the range of the last batch seen (weights: of the tensor).
- ``running_minmax``: exponential moving average of per-batch min and max (Krishnamoorthi 2018),
  ``r <- momentum * r + (1 - momentum) * r_batch``, initialised by the first batch.
- ``running_absmax``: exponential moving average of the per-batch largest magnitude ``max |x|``,
  range ``[-r, r]`` (Q8BERT's activation thresholds), same update rule as ``running_minmax``.
- ``mse``: the clipping range ``alpha * [lo, hi]`` minimising the mean squared quantization error
  (Banner et al. 2019, Choukroun et al. 2019), by grid search or golden-section search over alpha.
- ``percentile``: the ``p`` and ``100 - p`` percentiles of everything observed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from qbert.quant.functional import fake_quantize, grid_limits, params_from_range

MAX_SAMPLES = 1 << 22
"""Values kept per estimator by ``mse`` and ``percentile`` (evenly thinned beyond that)."""


class RangeEstimator:
    """Base: subclasses implement ``update`` and ``range``."""

    name: str = ""

    def __init__(self) -> None:
        self.batches = 0

    def update(self, values: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    @property
    def observed(self) -> bool:
        return self.batches > 0

    def _require_observed(self) -> None:
        if not self.batches:
            raise RuntimeError(f"{self.name} estimator has seen no data (calibration ran no batch through it)")


def _rowwise_minmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.detach().float()
    return values.amin(dim=1), values.amax(dim=1)


class CurrentMinMax(RangeEstimator):
    """The full range of the most recent batch."""

    name = "minmax"

    def __init__(self) -> None:
        super().__init__()
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        if values.shape[1] == 0:
            return
        self.lo, self.hi = _rowwise_minmax(values)
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_observed()
        return self.lo, self.hi  # type: ignore[return-value]


class RunningMinMax(RangeEstimator):
    """Exponential moving average of per-batch minima and maxima."""

    name = "running_minmax"

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__(self.momentum)

    def update(self, values: torch.Tensor) -> None:
        if values.shape[1] == 0:
            return
        lo, hi = _rowwise_minmax(values)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_observed()
        return self.lo, self.hi  # type: ignore[return-value]


class RunningAbsMax(RangeEstimator):
    """Exponential moving average of the per-batch largest magnitude; a symmetric range."""

    name = "running_absmax"

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.absmax: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__(self.momentum)

    def update(self, values: torch.Tensor) -> None:
        if values.shape[1] == 0:
            return
        current = values.detach().float().abs().amax(dim=1)
        if self.absmax is None:
            self.absmax = current
        else:
            self.absmax = self.momentum * self.absmax + (1 - self.momentum) * current
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_observed()
        return -self.absmax, self.absmax  # type: ignore[operator,return-value]


class _Pooled(RangeEstimator):
    """Keeps (a thinned copy of) every value seen, plus the exact extremes."""

    def __init__(self, max_samples: int = MAX_SAMPLES) -> None:
        super().__init__()
        self.max_samples = max_samples
        self.chunks: list[torch.Tensor] = []
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        if values.shape[1] == 0:
            return
        values = values.detach().float()
        lo, hi = _rowwise_minmax(values)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.chunks.append(values)
        if sum(c.numel() for c in self.chunks) > self.max_samples:
            self.chunks = [self._thinned(self.max_samples // 2)]
        self.batches += 1

    def _thinned(self, limit: int) -> torch.Tensor:
        pooled = torch.cat(self.chunks, dim=1)
        per_row = max(1, limit // pooled.shape[0])
        if pooled.shape[1] <= per_row:
            return pooled
        # float32 positions: past 2^24 values (a BERT-base word-embedding table) the last one can round
        # up to one past the end; clamped, so smaller tensors keep exactly the samples they had
        index = torch.linspace(0, pooled.shape[1] - 1, per_row).round().long().clamp_(max=pooled.shape[1] - 1)
        return pooled[:, index]

    def samples(self) -> torch.Tensor:
        self._require_observed()
        return self._thinned(self.max_samples)


class MSE(_Pooled):
    """Clipping range minimising the quantization MSE over ``alpha * [lo, hi]``, alpha in (0, 1]."""

    name = "mse"

    def __init__(
        self, bits: int, symmetric: bool, search: Literal["grid", "golden"] = "grid", candidates: int = 100,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        super().__init__(max_samples)
        self.bits, self.symmetric, self.search, self.candidates = bits, symmetric, search, candidates

    def reset(self) -> None:
        self.__init__(self.bits, self.symmetric, self.search, self.candidates, self.max_samples)

    def error(self, samples: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Per-row mean squared error of quantizing ``samples`` with range ``alpha * [lo, hi]``."""
        qmin, qmax = grid_limits(self.bits, self.symmetric)
        scale, zero_point = params_from_range(alpha * self.lo, alpha * self.hi, self.bits, self.symmetric)
        quantized = fake_quantize(samples, scale[:, None], zero_point[:, None], qmin, qmax)
        return (quantized - samples).pow(2).mean(dim=1)

    def best_alpha(self) -> torch.Tensor:
        """Per-row scaling of the observed range with the smallest error."""
        samples = self.samples()
        rows = samples.shape[0]
        if self.search == "grid":
            best_err = torch.full((rows,), math.inf)
            best = torch.ones(rows)
            for k in range(1, self.candidates + 1):
                alpha = torch.full((rows,), k / self.candidates)
                err = self.error(samples, alpha)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, alpha, best)
            return best
        # golden-section search on [1/candidates, 1], every row at once (assumes a unimodal error)
        ratio = (math.sqrt(5) - 1) / 2
        a, b = torch.full((rows,), 1 / self.candidates), torch.ones(rows)
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        fc, fd = self.error(samples, c), self.error(samples, d)
        for _ in range(40):
            left = fc < fd
            b = torch.where(left, d, b)
            a = torch.where(left, a, c)
            # rows move independently, so both interior points are evaluated afresh
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            fc, fd = self.error(samples, c), self.error(samples, d)
            if float((b - a).max()) < 1e-4:
                break
        alpha = (a + b) / 2
        # never worse than the full range
        full = torch.ones(rows)
        return torch.where(self.error(samples, alpha) <= self.error(samples, full), alpha, full)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.best_alpha()
        return alpha * self.lo, alpha * self.hi  # type: ignore[operator]


class Percentile(_Pooled):
    """The ``100 - p`` and ``p`` percentiles (linear interpolation) of every value observed."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, max_samples: int = MAX_SAMPLES) -> None:
        super().__init__(max_samples)
        self.percentile = percentile

    def reset(self) -> None:
        self.__init__(self.percentile, self.max_samples)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        samples = self.samples()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = _sorted_quantiles(samples, q)
        return lo, hi


def _sorted_quantiles(samples: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row quantiles with linear interpolation (numpy's default), via one sort."""
    ordered, _ = samples.sort(dim=1)
    n = ordered.shape[1]
    out = []
    for quantile in q.tolist():
        pos = quantile * (n - 1)
        below, frac = int(math.floor(pos)), pos - math.floor(pos)
        above = min(below + 1, n - 1)
        out.append(ordered[:, below] * (1 - frac) + ordered[:, above] * frac)
    return tuple(out)


def make_estimator(
    name: str, *, bits: int, symmetric: bool, momentum: float = 0.9, mse_search: str = "grid",
    mse_candidates: int = 100, percentile: float = 99.99,
) -> RangeEstimator:
    """The estimator called ``name`` with the settings from the config's ``estimator`` section."""
    if name == "minmax":
        return CurrentMinMax()
    if name == "running_minmax":
        return RunningMinMax(momentum)
    if name == "running_absmax":
        return RunningAbsMax(momentum)
    if name == "mse":
        return MSE(bits, symmetric, mse_search, mse_candidates)  # type: ignore[arg-type]
    if name == "percentile":
        return Percentile(percentile)
    raise ValueError(f"unknown range estimator {name!r}")
