"""The training path of fake quantization as fused kernels (``torch.compile``: one vectorized C++ loop on CPU, a
Triton kernel on GPU): QAT pays one pass over an activation forward and one backward instead of about ten.

The forward pass keeps nothing but its inputs: the backward kernel recomputes the grid codes from ``x`` (cheaper
than writing and reading back an in-grid mask and a float32 copy of the output).

Against the eager operations of :class:`~qbert.quant.functional._FakeQuantize`: the output and the input's
gradient are the same bit for bit (every operation is elementwise in the scale's dtype, inductor keeps IEEE
division and compiles without unsafe math, the in-grid mask is exactly 0 or 1 so its products are exact). The
learned scale's and zero point's gradients are sums, and the kernel sums in its own order (vector lanes, then
threads): they differ from the eager sums in the last bits (float32 rounding, about 1e-7 relative), so runs that
learn ranges move in the last digits; fixed-range QAT and evaluation do not.

The kernels are used when ``torch.compile`` works here. The first call compiles (about 15 s on 2 cores with a warm
inductor cache, 40 s without; each further dtype or layout a few seconds); if compiling fails (no C++ compiler,
no Triton) one warning says so and the eager operations carry on. ``QBERT_COMPILE=0`` turns them off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

_state: dict[str, Any] = {"enabled": os.environ.get("QBERT_COMPILE", "1") != "0", "compiled": None}


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


def forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fake_quantize(x)`` in ``out_dtype`` (default: ``x``'s), computed in the scale's."""
    _, clamped = _codes(x, scale, zero_point, qmin, qmax)
    return ((clamped - zero_point) * scale).to(out_dtype or x.dtype)


def backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
             qmax: int, clipped_ste: bool, need_x: bool, need_scale: bool, need_zero_point: bool,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``fake_quantize`` for ``x`` (in its dtype), the scale and the zero point (in theirs,
    summed to their shapes): the formulas of ``_FakeQuantize.backward``."""
    q, clamped = _codes(x, scale, zero_point, qmin, qmax)
    inside = (clamped == q).to(scale.dtype)
    wide = grad.to(scale.dtype)
    inside_grad = wide * inside
    grad_x = (inside_grad if clipped_ste else wide).to(x.dtype) if need_x else None
    grad_scale = grad_zero_point = None
    if need_scale:
        out = (clamped - zero_point) * scale
        grad_scale = ((out - x.to(scale.dtype) * inside) * wide).sum_to_size(scale.shape) / scale
    if need_zero_point:
        grad_zero_point = (inside_grad - wide).sum_to_size(scale.shape) * scale
    return grad_x, grad_scale, grad_zero_point


def _compiled() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    if not _state["enabled"]:
        return None
    if _state["compiled"] is None:
        import torch._dynamo

        # one graph per dtype, broadcast layout and gradient pattern (sizes are symbolic): a dozen in a run
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _state["compiled"] = tuple(torch.compile(fn, dynamic=True, fullgraph=True) for fn in (forward, backward))
    return _state["compiled"]


def call(which: int, *args: Any) -> Any:
    """Kernel ``which`` (0 :func:`forward`, 1 :func:`backward`) compiled; where compiling fails, one warning, the
    kernels switch off for the process and the eager definition runs."""
    compiled = _compiled()
    eager = (forward, backward)[which]
    if compiled is None:
        return eager(*args)
    device = args[0].device.type
    try:
        if not torch.is_autocast_enabled(device):  # the backward pass: no context to leave (a hot path)
            return compiled[which](*args)
        with torch.autocast(device, enabled=False):
            return compiled[which](*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        _state["enabled"] = False
        cause = getattr(error, "inner_exception", error)
        reason = (str(cause).strip().splitlines() or [""])[0]
        warnings.warn("fused fake-quantize kernels unavailable, QAT runs the eager kernels (slower, same numbers): "
                      f"{type(cause).__name__}: {reason}", stacklevel=3)
        return eager(*args)
