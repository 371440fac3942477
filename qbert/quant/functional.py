"""The uniform affine quantizer as plain functions (Jacob et al. 2018; Bondarenko et al. 2021 eq. 1-2).

``x_int = clip(round(x / s) + z, qmin, qmax)`` and ``x_hat = s * (x_int - z)``. Rounding is
round-half-to-even (``torch.round``, as integer hardware and numpy do). Asymmetric grids are
unsigned ``[0, 2^b - 1]`` with an integer zero point; symmetric grids are signed
``[-2^(b-1), 2^(b-1) - 1]`` with ``z = 0`` and ``s = max|x| / (2^(b-1) - 1)``.
"""

from __future__ import annotations

import torch

EPS = 1e-8
"""Smallest scale: a range of width zero still gives a valid (if useless) grid."""


def grid_limits(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[lo, hi]`` (widened to include 0, so 0 is exact)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = grid_limits(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        return scale.clamp_min(EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with the straight-through gradient (identity)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize and de-quantize ``x`` (scale and zero point broadcast against it).

    Gradients: identity for ``x`` inside the grid, zero where it is clipped; ``scale`` and
    ``zero_point`` receive the LSQ-style gradients when they require grad.
    """
    x_int = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (x_int - zero_point) * scale


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The integer codes of ``x`` (no gradient), as exported to integer kernels."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
