"""The training path of fake quantization as fused kernels (inductor: one vectorized C++ loop on CPU, a Triton
kernel on GPU): QAT pays one pass over an activation forward and one backward instead of about ten.

The forward pass keeps nothing but its inputs: the backward kernel recomputes the grid codes from ``x`` (cheaper
than writing and reading back an in-grid mask and a float32 copy of the output).

Against the eager operations of :class:`~qbert.quant.functional._FakeQuantize`: the output and the input's
gradient are the same bit for bit (every operation is elementwise in the scale's dtype, inductor keeps IEEE
division and compiles without unsafe math, the in-grid mask is exactly 0 or 1 so its products are exact). The
learned scale's and zero point's gradients are sums, and the kernel sums in its own order (vector lanes, then
threads): they differ from the eager sums in the last bits (float32 rounding, about 1e-7 relative), so runs that
learn ranges move in the last digits; fixed-range QAT and evaluation do not.

Each kernel is traced with symbolic sizes and compiled once per rank, pattern of sizes 1, dtypes, grid and
gradient pattern (a dozen or two in a run), then called directly: a QAT step makes about 250 of these calls on
small tensors, and dynamo's guards and wrappers (``torch.compile``) cost 90 us each against 20. Compiling takes
about 15 s on 2 cores with a warm inductor cache, 40 s without, then a few seconds per new kernel; if compiling
fails (no C++ compiler, no Triton) one warning says so and the eager operations carry on. ``QBERT_COMPILE=0``
turns them off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

EPS = 1e-8
"""Smallest scale: a range of width zero still gives a valid (if useless) grid (here, the lowest module that uses it;
:mod:`qbert.quant.functional` re-exports it)."""

_state: dict[str, Any] = {"enabled": os.environ.get("QBERT_COMPILE", "1") != "0", "kernels": {}}


def enabled() -> bool:
    """Whether the fused kernels are in use (not switched off, not failed)."""
    return bool(_state["enabled"])


def set_enabled(on: bool) -> None:
    """Switch the fused kernels on or off for this process (the tests compare both)."""
    _state["enabled"] = on


def _codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(x / s) + z`` and its clamped value, in the scale's dtype."""
    q = torch.round(x.to(scale.dtype) / scale) + zero_point
    return q, torch.clamp(q, qmin, qmax)


def learned_grid(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 rounding: Callable[[torch.Tensor], torch.Tensor] = torch.round,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned scale and zero point as the grid uses them: the scale at least :data:`EPS`, the zero point rounded
    (``rounding``: plain here, where :func:`backward` writes the gradients out; straight-through in
    :func:`~qbert.quant.functional.learned_grid`) and clamped to the grid."""
    return scale.clamp(min=EPS), torch.clamp(rounding(zero_point), qmin, qmax)


def forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
            out_dtype: torch.dtype | None = None, learned: bool = False) -> torch.Tensor:
    """``fake_quantize(x)`` in ``out_dtype`` (default: ``x``'s), computed in the scale's; ``learned``: of the scale
    and zero point as :func:`~qbert.quant.functional.learned_grid` makes them."""
    if learned:
        scale, zero_point = learned_grid(scale, zero_point, qmin, qmax)
    _, clamped = _codes(x, scale, zero_point, qmin, qmax)
    return ((clamped - zero_point) * scale).to(out_dtype or x.dtype)


def backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int, clipped_ste: bool, learned: bool, need_x: bool, need_scale: bool, need_zero_point: bool,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``fake_quantize`` for ``x`` (in its dtype), the scale and the zero point (in theirs,
    summed to their shapes): the formulas of ``_FakeQuantize.backward``, then, ``learned``, those of
    ``learned_grid``'s clamps (``torch.clamp``'s: zero where the clamp cut) and round (identity)."""
    raw_scale, raw_zero_point = scale, zero_point
    if learned:
        scale, zero_point = learned_grid(scale, zero_point, qmin, qmax)
    q, clamped = _codes(x, scale, zero_point, qmin, qmax)
    inside = (clamped == q).to(scale.dtype)
    wide = grad.to(scale.dtype)
    inside_grad = wide * inside
    grad_x = (inside_grad if clipped_ste else wide).to(x.dtype) if need_x else None
    grad_scale = grad_zero_point = None
    if need_scale:
        out = (clamped - zero_point) * scale
        grad_scale = ((out - x.to(scale.dtype) * inside) * wide).sum_to_size(scale.shape) / scale
        if learned:
            grad_scale = torch.where(raw_scale >= scale, grad_scale, 0.0)  # raw >= max(raw, EPS): raw >= EPS
    if need_zero_point:
        grad_zero_point = (inside_grad - wide).sum_to_size(scale.shape) * scale
        if learned:
            rounded = torch.round(raw_zero_point)
            grad_zero_point = torch.where((rounded >= qmin) & (rounded <= qmax), grad_zero_point, 0.0)
    return grad_x, grad_scale, grad_zero_point


PRIMES = (5, 7, 11, 13, 17, 19, 23, 29)


def _example(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A tracing stand-in for ``t`` (``x``, its gradient, a scale or a zero point, which broadcast against ``x``):
    ``x``'s sizes of 1 stay 1, the others become distinct primes, so that every free size is a symbol of its own
    and a scale's size that must equal ``x``'s is the same symbol."""
    full = [1 if n == 1 else PRIMES[i] for i, n in enumerate(x.shape)]
    shape = (1,) * (x.dim() - t.dim()) + tuple(t.shape)
    sizes = [1 if n == 1 else full[i] for i, n in enumerate(shape)][x.dim() - t.dim():]
    return torch.zeros(sizes, dtype=t.dtype, device=t.device)


def _compile(which: int, tensors: tuple[torch.Tensor, ...], options: tuple, x: torch.Tensor) -> Callable[..., Any]:
    """Kernel ``which`` for these ranks, sizes of 1, dtypes, grid and gradient pattern, every other size symbolic:
    traced (``make_fx``) and compiled by inductor once (``standalone_compile``), then called directly, without
    dynamo's guards and wrappers (about 20 us a call instead of 90). Loops are split between threads whatever
    the traced sizes (``cpp.min_chunk_size`` 1: the stand-ins are tiny, the tensors are not)."""
    import torch._inductor.config
    from torch.fx.experimental.proxy_tensor import make_fx

    examples = [_example(t, x) for t in tensors]

    def kernel(*inputs: torch.Tensor) -> list[torch.Tensor]:
        out = (forward, backward)[which](*inputs, *options)
        return [out] if which == 0 else [t for t in out if t is not None]

    with torch.autocast(x.device.type, enabled=False), torch._inductor.config.patch({"cpp.min_chunk_size": 1}):
        graph = make_fx(kernel, tracing_mode="symbolic")(*examples)
        return torch._inductor.standalone_compile(graph, examples, dynamic_shapes="from_graph")


def _run(which: int, args: tuple) -> Any:
    count = 3 if which == 0 else 4
    tensors, options = tuple(t.contiguous() for t in args[:count]), args[count:]
    x = tensors[0] if which == 0 else tensors[1]
    if x.numel() == 0:
        return (forward, backward)[which](*args)
    # every tensor's dtype and rank with where its sizes are 1 (x's among them): what the traced graph fixed
    key = (which, x.device.type, options, *((t.dtype, tuple(n == 1 for n in t.shape)) for t in tensors))
    kernel = _state["kernels"].get(key)
    if kernel is None:
        kernel = _state["kernels"][key] = _compile(which, tensors, options, x)
    outputs = iter(kernel(*tensors))
    if which == 0:
        return next(outputs)
    return tuple(next(outputs) if need else None for need in options[4:])


def call(which: int, *args: Any) -> Any:
    """Kernel ``which`` (0 :func:`forward`, 1 :func:`backward`), compiled for the arguments' ranks and dtypes
    on first use; where compiling fails, one warning, the kernels switch off for the process and the eager
    definition runs."""
    eager = (forward, backward)[which]
    if not _state["enabled"]:
        return eager(*args)
    try:
        return _run(which, args)
    except Exception as error:  # noqa: BLE001 -- whatever the compiler raises: the same numbers, eagerly
        _state["enabled"] = False
        reason = (str(error).strip().splitlines() or [""])[0]
        warnings.warn("fused fake-quantize kernels unavailable, QAT runs the eager kernels (slower, same numbers): "
                      f"{type(error).__name__}: {reason}", stacklevel=3)
        return eager(*args)
