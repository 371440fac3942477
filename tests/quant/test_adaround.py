"""AdaRound against nearest rounding on a layer with correlated inputs (the case it exists for)."""

from __future__ import annotations

import pytest
import torch

from qbert.quant.adaround import AdaRoundSettings, adaround_layer, initial_logits, rectified_sigmoid


def test_initial_logits_reproduce_the_fractional_part() -> None:
    fraction = torch.linspace(0.0, 0.999, 101)
    torch.testing.assert_close(rectified_sigmoid(initial_logits(fraction)), fraction, atol=1e-5, rtol=0)


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out_features, in_features, tokens = 24, 48, 2048
    weight = torch.randn(out_features, in_features, generator=g) * 0.1
    bias = torch.randn(out_features, generator=g) * 0.01
    # correlated inputs: a low-rank mixture plus noise, so rounding errors interact across columns
    mixing = torch.randn(6, in_features, generator=g)
    x = torch.randn(tokens, 6, generator=g) @ mixing + 0.2 * torch.randn(tokens, in_features, generator=g)
    target = torch.nn.functional.linear(x, weight, bias)
    scale = weight.abs().max() / 7  # 4-bit symmetric grid [-8, 7]
    return weight, bias, scale, x, target


def test_adaround_moves_at_most_one_step_and_beats_nearest_rounding() -> None:
    weight, bias, scale, x, target = _layer()
    settings = AdaRoundSettings(iterations=400, batch_tokens=256, lr=1e-2)
    result = adaround_layer(weight, bias, scale, -8, 7, x, target, settings, torch.Generator().manual_seed(0))
    nearest = torch.clamp(torch.round(weight / scale), -8, 7)
    floor = torch.floor(weight / scale)
    assert torch.all((result.codes == floor) | (result.codes == floor + 1))  # only down or up
    assert (result.codes - nearest).abs().max() <= 1
    assert (result.codes * scale - weight).abs().max() <= scale * (1 + 1e-6)
    assert result.changed > 0  # it did change some roundings...

    def error(codes: torch.Tensor) -> float:  # independent reconstruction error on all tokens
        return float((x @ (codes * scale).T + bias - target).pow(2).sum(dim=1).mean())

    assert error(result.codes) < 0.8 * error(nearest)  # ...and the layer's output got closer
    assert result.adaround_error == pytest.approx(error(result.codes), rel=1e-4)
    assert result.nearest_error == pytest.approx(error(nearest), rel=1e-4)

