"""AdaRound (Nagel et al. 2020): learn whether each weight rounds down or up, layer by layer, so the
layer's output on calibration data stays close to the floating-point layer's.

Per linear layer with weight ``W``, fixed scale ``s`` and grid ``[qmin, qmax]``::

    W_soft = s * clip(floor(W / s) + h(V), qmin, qmax),   h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
    loss   = mean_tokens || W_soft x_q + b - (W x + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

with ``zeta = 1.1``, ``gamma = -0.1``; ``V`` starts where ``h(V)`` equals the fractional part of
``W / s`` (so the soft weight starts at ``W``); the regulariser is off for the first ``warmup``
fraction of the iterations, then ``beta`` decays linearly from 20 to 2, pushing every ``h`` to 0
or 1. ``x`` is the layer's input in the floating-point model, ``x_q`` in the model whose earlier
layers are already rounded (the paper's asymmetric reconstruction). The result rounds each weight
to ``floor(W / s)`` or that plus one, so it never moves more than one step from nearest rounding.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V)``: a sigmoid stretched to ``(gamma, zeta)`` and clipped to ``[0, 1]``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_logits(fraction: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = fraction`` (the fractional part of ``W / s``, in ``[0, 1)``)."""
    p = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


@dataclass
class AdaRoundSettings:
    iterations: int = 1000
    batch_tokens: int = 256
    lr: float = 1e-3
    weight: float = 0.01
    """lambda, the regulariser's weight."""
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)


@dataclass
class AdaRoundResult:
    codes: torch.Tensor
    """The integer grid values of the rounded weight."""
    nearest_error: float
    adaround_error: float
    """Mean squared output error on the calibration tokens, nearest rounding vs learned rounding."""
    rounded_up: float
    """Fraction of weights rounded up."""
    changed: float
    """Fraction of weights whose rounding differs from nearest."""
    seconds: float


def output_error(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, x_q: torch.Tensor,
                 target: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over tokens of ``|| (s codes) x_q + b - target ||^2``."""
    weight = codes * scale
    total = 0.0
    for start in range(0, len(x_q), chunk):
        out = torch.nn.functional.linear(x_q[start:start + chunk], weight, bias)
        total += float((out - target[start:start + chunk]).pow(2).sum())
    return total / max(1, len(x_q))


def adaround_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, qmin: int, qmax: int,
    x_q: torch.Tensor, target: torch.Tensor, settings: AdaRoundSettings, generator: torch.Generator,
) -> AdaRoundResult:
    """Learn the rounding of one linear layer's ``weight`` (``[out, in]``; ``scale`` broadcasts
    against it) from inputs ``x_q`` (``[tokens, in]``) and float targets (``[tokens, out]``)."""
    start = time.perf_counter()
    weight, scale = weight.detach().float(), scale.detach().float()
    bias = None if bias is None else bias.detach().float()
    scaled = weight / scale
    floor = torch.floor(scaled)
    nearest = torch.clamp(torch.round(scaled), qmin, qmax)
    logits = initial_logits(scaled - floor).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=settings.lr)
    warm = int(settings.warmup * settings.iterations)
    beta_start, beta_end = settings.beta
    tokens = len(x_q)
    for it in range(settings.iterations):
        index = torch.randint(tokens, (min(settings.batch_tokens, tokens),), generator=generator)
        soft = scale * torch.clamp(floor + rectified_sigmoid(logits), qmin, qmax)
        out = torch.nn.functional.linear(x_q[index], soft, bias)
        loss = (out - target[index]).pow(2).sum(dim=-1).mean()
        if it >= warm:
            progress = (it - warm) / max(1, settings.iterations - warm)
            beta = beta_end + (beta_start - beta_end) * (1 - progress)
            h = rectified_sigmoid(logits)
            loss = loss + settings.weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        codes = torch.clamp(floor + (logits >= 0).float(), qmin, qmax)
        return AdaRoundResult(
            codes=codes,
            nearest_error=output_error(nearest, scale, bias, x_q, target),
            adaround_error=output_error(codes, scale, bias, x_q, target),
            rounded_up=float((codes > torch.clamp(floor, qmin, qmax)).float().mean()),
            changed=float((codes != nearest).float().mean()),
            seconds=time.perf_counter() - start,
        )


class _Captured(Exception):
    """Stops a forward pass once the layer of interest has seen its input."""


def _valid_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token rows of ``x`` (``[batch, length, d]`` -> valid tokens; ``[batch, d]`` as is)."""
    if x.dim() == 3:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def capture(model: torch.nn.Module, module: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
            with_output: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and outputs) of ``module`` over ``batches``, valid tokens only, stopping each forward
    pass at the module."""
    inputs, outputs = [], []
    current: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(_valid_rows(args[0], current["mask"]).float())
        if with_output:
            outputs.append(_valid_rows(out, current["mask"]).float())
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            with contextlib.suppress(_Captured):  # the hook stops the forward pass once it has the layer's input
                model(**batch)
    finally:
        handle.remove()
    return torch.cat(inputs), (torch.cat(outputs) if with_output else None)


def adaround_model(inst: Any, float_model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                   settings: AdaRoundSettings, generator: torch.Generator, log: Any,
                   on_layer: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Learned rounding of every linear layer of ``inst`` (an instrumented model with frozen weight
    grids), in forward order: each layer's input comes from the model whose earlier layers are already
    rounded, its target from ``float_model``. The rounded weights replace the originals in place;
    embedding tables keep nearest rounding. Returns the per-layer report."""
    from qbert.quant.sites import weight_modules

    quantized_modules, float_modules = weight_modules(inst.model), weight_modules(float_model)
    inst.model.eval()
    start = time.perf_counter()
    layers: dict[str, Any] = {}
    for site, q in inst.weights().items():
        module = quantized_modules[site]
        if not isinstance(module, torch.nn.Linear):
            continue  # embedding tables: nearest rounding
        log.info("adaround %s", site)
        _, target = capture(float_model, float_modules[site], batches, with_output=True)
        x_q, _ = capture(inst.model, module, batches, with_output=False)
        original = inst.weight_tensors[site]
        result = adaround_layer(original, module.bias, q.scale.view(-1, 1), q.qmin, q.qmax, x_q, target,
                                settings, generator)
        with torch.no_grad():
            original.copy_(result.codes * q.scale.view(-1, 1))
        layers[site] = {
            "tokens": len(x_q), "nearest_mse": result.nearest_error, "adaround_mse": result.adaround_error,
            "changed": round(result.changed, 4), "rounded_up": round(result.rounded_up, 4),
            "seconds": round(result.seconds, 2),
        }
        if on_layer is not None:
            on_layer(site)
    improved = sum(v["adaround_mse"] < v["nearest_mse"] for v in layers.values())
    return {"layers_improved": f"{improved}/{len(layers)}", "seconds": round(time.perf_counter() - start, 2),
            "layers": layers}
