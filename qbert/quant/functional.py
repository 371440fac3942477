"""The uniform affine quantizer as plain functions (Jacob et al. 2018; Bondarenko et al. 2021 eq. 1-2).

``x_int = clip(round(x / s) + z, qmin, qmax)`` and ``x_hat = s * (x_int - z)``. Rounding is
round-half-to-even (``torch.round``, as integer hardware and numpy do). Asymmetric grids are
unsigned ``[0, 2^b - 1]`` with an integer zero point; symmetric grids are signed
``[-2^(b-1), 2^(b-1) - 1]`` with ``z = 0`` and ``s = max|x| / (2^(b-1) - 1)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from qbert.quant import fused
from qbert.quant.fused import EPS


def grid_limits(bits: int, symmetric: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit grid; ``narrow`` drops a symmetric grid's
    most negative code (``[-127, 127]`` at 8 bits, as Q8BERT)."""
    if symmetric:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
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


def learned_grid(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned scale and zero point as the grid uses them: the scale at least :data:`EPS`, the zero point rounded
    (straight-through) and clamped to the grid. Gradients: clamp's (zero where the clamp cut), round's identity."""
    return fused.learned_grid(scale, zero_point, qmin, qmax, rounding=round_ste)


class _FakeQuantize(torch.autograd.Function):
    """``fake_quantize`` with its gradients written out: the forward pass reuses one buffer and the
    backward pass needs only the output and the in-grid mask (about 2x faster than autograd through
    the elementwise ops, 3.5x without range gradients; identical values)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int, clipped_ste: bool) -> torch.Tensor:
        q = torch.round(x / scale).add_(zero_point)
        _, needs_scale, needs_zero_point = ctx.needs_input_grad[:3]
        clamped = q.clamp(qmin, qmax)
        # the in-grid mask only where a gradient uses it (x's under the clipped STE, the range's): where clamping
        # left the code as it was; float, since bool x float products are slow on CPU
        inside = clamped.eq(q).to(x.dtype) if clipped_ste or needs_scale or needs_zero_point else None
        out = clamped.sub_(zero_point).mul_(scale)
        if needs_scale:
            ctx.save_for_backward(x, out, inside, scale)
        else:  # neither x nor the output is needed without the scale's gradient
            ctx.save_for_backward(inside, scale)
        ctx.clipped_ste = clipped_ste
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.needs_input_grad[1]:
            x, out, inside, scale = ctx.saved_tensors
        else:
            inside, scale = ctx.saved_tensors
        inside_grad = grad * inside if inside is not None else grad
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = inside_grad if ctx.clipped_ste else grad
        grad_scale = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            # d out / d s = (q - z) - x / s inside the grid, (q - z) where clipped; (q - z) = out / s
            # (the same operations as grad * (out - x * inside), on one buffer: -t + out is out - t exactly)
            grad_scale = (x * inside).neg_().add_(out).mul_(grad).sum_to_size(scale.shape) / scale
        if ctx.needs_input_grad[2]:
            # d out / d z = 0 inside the grid (round's STE), -s where clipped
            grad_zero_point = (inside_grad - grad).sum_to_size(scale.shape) * scale
        return grad_x, grad_scale, grad_zero_point, None, None, None


class _FusedFakeQuantize(torch.autograd.Function):
    """``fake_quantize`` on the fused kernels of :mod:`qbert.quant.fused` (``x`` in its own dtype, computed in
    the scale's; the backward pass recomputes the grid from ``x``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int, clipped_ste: bool, out_dtype: torch.dtype, learned: bool) -> torch.Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.grid = qmin, qmax, clipped_ste, learned
        return fused.call(0, x, scale, zero_point, qmin, qmax, out_dtype, learned)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needs_x, needs_scale, needs_zero_point = ctx.needs_input_grad[:3]
        qmin, qmax, clipped_ste, learned = ctx.grid
        if needs_x and not clipped_ste and not (needs_scale or needs_zero_point):
            return grad.to(ctx.saved_tensors[0].dtype), None, None, None, None, None, None, None  # the plain STE
        grads = fused.call(1, grad, *ctx.saved_tensors, qmin, qmax, clipped_ste, learned, needs_x, needs_scale,
                           needs_zero_point)
        return (*grads, None, None, None, None, None)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    clipped_ste: bool = True, out_dtype: torch.dtype | None = None, learned: bool = False,
) -> torch.Tensor:
    """Quantize and de-quantize ``x`` (scale and zero point broadcast against it), computed in the scale's dtype
    and returned in ``out_dtype``, by default ``x``'s (bf16 activations are quantized in float32 and cast back).
    ``learned``: the scale and zero point are trained parameters, used through :func:`learned_grid` (in the fused
    kernels, the same operations inside them).

    ``(clip(round(x / s) + z, qmin, qmax) - z) * s``. Gradients: identity for ``x`` inside the
    grid, zero where it is clipped (straight-through estimator; ``clipped_ste=False`` passes the
    gradient everywhere, as Q8BERT's NLP Architect code); ``scale`` and ``zero_point`` receive the
    LSQ gradients (Esser et al. 2019) when they require grad.

    Without any gradient to compute (evaluation, calibration) it is the same arithmetic in place on one buffer,
    outside autograd: identical values, about a third of the memory passes. With gradients it runs on the fused
    kernels of :mod:`qbert.quant.fused` where they compile, else on :class:`_FakeQuantize`.
    """
    out_dtype = out_dtype or x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)
    if needs_grad and fused.enabled() and not REFERENCE["on"]:  # the kernels apply a learned grid themselves
        return _FusedFakeQuantize.apply(x, scale, zero_point, qmin, qmax, clipped_ste, out_dtype, learned)
    if learned:
        scale, zero_point = learned_grid(scale, zero_point, qmin, qmax)
    if REFERENCE["on"]:
        return fake_quantize_autograd(x.to(scale.dtype), scale, zero_point, qmin, qmax, clipped_ste).to(out_dtype)
    if not needs_grad:
        wide = torch.round(x.to(scale.dtype) / scale).add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
        return wide.to(out_dtype)
    return _FakeQuantize.apply(x.to(scale.dtype), scale, zero_point, qmin, qmax, clipped_ste).to(out_dtype)


def fake_quantize_autograd(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, clipped_ste: bool = True,
) -> torch.Tensor:
    """The same function through autograd of its elementwise ops (the reference for tests)."""
    q = round_ste(x / scale) + zero_point
    x_int = torch.clamp(q, qmin, qmax)
    out = (x_int - zero_point) * scale
    if clipped_ste:
        return out
    # x's gradient also passes where the clamp cut (adds 0 to the value: x - x is exactly 0)
    return out + (x - x.detach()) * (x_int != q).to(x.dtype)


REFERENCE = {"on": False}
"""While on (:func:`reference_arithmetic`), every fake quantization goes through :func:`fake_quantize_autograd`
and the word table is quantized whole: the textbook computation the fast paths are tested against."""


@contextlib.contextmanager
def reference_arithmetic() -> Iterator[None]:
    """Within: the textbook computation instead of the fast paths (in-place, fused, looked-up rows)."""
    before = REFERENCE["on"]
    REFERENCE["on"] = True
    try:
        yield
    finally:
        REFERENCE["on"] = before


INT32_LIMITS = (-(2**31), 2**31 - 1)


def integer_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The integer grid values ``clip(round(x / s) + z, qmin, qmax)`` of ``x`` (no gradient; scale and
    zero point broadcast against ``x``), as integer kernels consume them. The one place integer codes
    of weights and activations are computed (the integer export, the tests)."""
    with torch.no_grad():
        return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def bias_codes(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A bias as int32 codes on the accumulator's grid ``scale = s_input * s_weight``:
    ``clip(round(b / scale), -2^31, 2^31 - 1)`` (what integer inference adds to the int32 accumulator), as
    float64 whole numbers."""
    with torch.no_grad():
        # divided and rounded in the bias' dtype; clamped in float64, where 2^31 - 1 is exact (in float32
        # it rounds to 2^31, which overflows int32)
        return torch.round(bias / scale).double().clamp(*INT32_LIMITS)
