"""The quantizer against the textbook formula (numpy, written out independently)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbert.quant.estimators import CurrentMinMax
from qbert.quant.functional import fake_quantize, params_from_range
from qbert.quant.quantizer import Quantizer
from qbert.quant.spec import QuantSpec


def textbook(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> np.ndarray:
    """Jacob et al. 2018 / Bondarenko eq. (1)-(2), in float64 numpy."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = max(-lo, hi) / qmax
        q = np.clip(np.round(x / s), -(2 ** (bits - 1)), qmax)
        return s * q
    s = (hi - lo) / (2**bits - 1)
    z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
    q = np.clip(np.round(x / s) + z, 0, 2**bits - 1)
    return s * (q - z)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_matches_textbook(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(bits)
    x = rng.normal(0, 2, size=1000)
    lo, hi = -1.7, 3.1  # narrower than the data: clipping on both sides
    f64 = torch.float64
    scale, zp = params_from_range(torch.tensor(lo, dtype=f64), torch.tensor(hi, dtype=f64), bits, symmetric)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    ours = fake_quantize(torch.tensor(x, dtype=torch.float64), scale.double(), zp.double(), qmin, qmax)
    np.testing.assert_allclose(ours.numpy(), textbook(x, lo, hi, bits, symmetric), rtol=0, atol=1e-6)


def test_halves_round_to_even_and_zero_point_is_integer() -> None:
    # scale 1, zero point 10: x = 0.5, 1.5, 2.5, -0.5 -> 0, 2, 2, -0 (half to even)
    scale, zp = params_from_range(torch.tensor(-10.0), torch.tensor(245.0), 8, False)
    assert float(scale) == pytest.approx(1.0) and float(zp) == 10.0
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 300.0, -20.0])
    out = fake_quantize(x, scale, zp, 0, 255)
    assert out.tolist() == [0.0, 2.0, 2.0, 0.0, 245.0, -10.0]  # last two clipped to the grid ends


def test_zero_is_exact_and_range_widened_to_include_it() -> None:
    scale, zp = params_from_range(torch.tensor(0.3), torch.tensor(0.9), 8, False)
    assert float(zp) == 0.0  # lo widened to 0
    assert float(fake_quantize(torch.tensor(0.0), scale, zp, 0, 255)) == 0.0
    scale, zp = params_from_range(torch.tensor(-0.37), torch.tensor(1.11), 8, False)
    assert float(zp) == round(0.37 / float(scale)) and float(fake_quantize(torch.tensor(0.0), scale, zp, 0, 255)) == 0


def test_straight_through_gradient_is_identity_inside_and_zero_when_clipped() -> None:
    scale, zp = params_from_range(torch.tensor(-1.0), torch.tensor(1.0), 8, False)
    x = torch.tensor([-3.0, -0.4, 0.123, 0.9, 5.0], requires_grad=True)
    fake_quantize(x, scale, zp, 0, 255).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_per_channel_weights_use_one_range_per_row() -> None:
    w = torch.tensor([[0.1, -0.2, 0.05], [10.0, -3.0, 1.0]])
    q = Quantizer(QuantSpec(bits=4, symmetric=True, granularity="per_channel"), CurrentMinMax(), channels=2,
                  channel_dim=0)
    q.observe(w)
    q.freeze()
    out = q(w)
    for row in range(2):
        expected = textbook(w[row].double().numpy(), float(w[row].min()), float(w[row].max()), 4, True)
        np.testing.assert_allclose(out[row].numpy(), expected, atol=1e-6)


def test_per_embedding_group_with_permutation_equals_per_tensor_on_permuted_slices() -> None:
    torch.manual_seed(0)
    d, k = 12, 3
    x = torch.randn(2, 5, d) * torch.linspace(0.1, 20, d)[torch.randperm(d)]
    spec = QuantSpec(bits=8, granularity="per_embedding_group", groups=k, permute=True)
    q = Quantizer(spec, CurrentMinMax(), channels=d)
    q.track_dimensions = True
    q(x)
    perm = q.range_permutation()
    q.estimator.reset()
    q.set_permutation(perm)
    q(x)
    q.freeze()
    out = q(x)
    # independent computation: gather the dims of each group, quantize them per tensor, scatter back
    expected = torch.empty_like(x)
    for g in range(k):
        dims = perm[g * d // k : (g + 1) * d // k]
        part = x[..., dims].double().numpy()
        expected[..., dims] = torch.tensor(textbook(part, part.min(), part.max(), 8, False), dtype=x.dtype)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the widest dimensions share the last group
    widths = x.reshape(-1, d).amax(0) - x.reshape(-1, d).amin(0)
    assert set(perm[-d // k :].tolist()) == set(torch.argsort(widths)[-d // k :].tolist())


def test_one_group_is_per_tensor_and_d_groups_is_per_embedding() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 4, 8) * torch.arange(1, 9)
    results = {}
    for name, spec in {
        "tensor": QuantSpec(bits=8),
        "k1": QuantSpec(bits=8, granularity="per_embedding_group", groups=1),
        "kd": QuantSpec(bits=8, granularity="per_embedding_group"),
    }.items():
        q = Quantizer(spec, CurrentMinMax(), channels=8)
        q(x)
        q.freeze()
        results[name] = q(x)
    torch.testing.assert_close(results["tensor"], results["k1"])
    for j in range(8):
        col = x[..., j].double().numpy()
        np.testing.assert_allclose(results["kd"][..., j].numpy(), textbook(col, col.min(), col.max(), 8, False),
                                   atol=1e-5)


def test_padding_positions_are_excluded_from_statistics() -> None:
    x = torch.tensor([[[1.0, -2.0], [100.0, -100.0]]])  # second token is padding
    valid = torch.tensor([[True, False]])
    q = Quantizer(QuantSpec(bits=8), CurrentMinMax())
    q(x, valid)
    lo, hi = q.estimator.range()
    assert float(lo) == -2.0 and float(hi) == 1.0


def test_sixteen_bits_is_closer_to_fp32_than_eight() -> None:
    torch.manual_seed(2)
    x = torch.randn(10_000)
    errors = {}
    for bits in (8, 16):
        q = Quantizer(QuantSpec(bits=bits), CurrentMinMax())
        q(x)
        q.freeze()
        errors[bits] = float((q(x) - x).abs().max())
    assert errors[16] < errors[8] / 100


def test_states_estimate_passes_through_and_fixed_quantizes() -> None:
    x = torch.linspace(-1, 1, 101)
    q = Quantizer(QuantSpec(bits=2), CurrentMinMax())
    assert torch.equal(q(x), x)
    q.freeze()
    assert q.state == "fixed" and len(torch.unique(q(x))) <= 4
    with pytest.raises(ValueError, match="unknown quantizer state"):
        q.set_state("sleeping")  # type: ignore[arg-type]


def test_estimate_train_updates_while_training_and_freezes_in_eval() -> None:
    from qbert.quant.estimators import RunningMinMax

    q = Quantizer(QuantSpec(bits=8), RunningMinMax(momentum=0.5))
    q.set_state("estimate_train")
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-3.0, 3.0]))
    lo, hi = q.quant_range()
    assert float(hi) == pytest.approx(2.0, rel=0.01) and float(lo) == pytest.approx(-2.0, rel=0.01)
    q.eval()
    q(torch.tensor([-100.0, 100.0]))
    assert float(q.quant_range()[1]) == pytest.approx(2.0, rel=0.01)


def test_learn_state_gives_scale_and_offset_gradients() -> None:
    q = Quantizer(QuantSpec(bits=4), CurrentMinMax())
    q(torch.tensor([-1.0, 2.0]))
    q.freeze()
    q.set_state("learn")
    assert q.scale.requires_grad and q.zero_point.requires_grad
    x = torch.linspace(-3, 3, 50)
    ((q(x) - x) ** 2).sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad.abs()) > 0
    q.set_state("fixed")
    assert not q.scale.requires_grad


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_integer_codes_are_the_grid_the_fake_quantizer_dequantizes(granularity: str) -> None:
    """Codes by numpy's textbook formula (half to even), and de-quantized they are the fake-quantized weight."""
    rng = np.random.default_rng(3)
    w = torch.tensor(rng.normal(0, 0.05, size=(6, 10)), dtype=torch.float32)
    q = Quantizer(QuantSpec(bits=4, symmetric=True, granularity=granularity), CurrentMinMax(), channels=6,
                  channel_dim=0)
    q.observe(w)
    q.freeze()
    codes = q.integer_codes(w)
    scale = q.scale.numpy().reshape(-1, 1) if granularity == "per_channel" else q.scale.numpy()
    expected = np.clip(np.round(w.numpy() / scale), -8, 7)
    np.testing.assert_array_equal(codes.numpy(), expected)
    assert torch.equal(codes * q.scale.view(-1, 1) if granularity == "per_channel" else codes * q.scale, q(w))


def test_bias_codes_are_int32_on_the_accumulator_grid() -> None:
    from qbert.quant.functional import INT32_LIMITS, bias_codes

    scale = torch.tensor([0.25])
    bias = torch.tensor([0.375, -0.625, 2.5, 1e12, -1e12])  # 1.5 and -2.5 round half to even
    codes = bias_codes(bias, scale)
    assert codes.tolist() == [2, -2, 10, INT32_LIMITS[1], INT32_LIMITS[0]]
    assert codes.to(torch.int64).numpy().astype(np.int32).tolist() == [2, -2, 10, 2**31 - 1, -(2**31)]


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_gradient_free_path_computes_what_the_autograd_path_does(symmetric: bool) -> None:
    """Evaluation and calibration skip autograd (one buffer, no in-grid mask): the values must be the training
    path's, bit for bit, ties and clipped values included."""
    torch.manual_seed(0)
    scale, zp = params_from_range(torch.tensor([-3.0]), torch.tensor([5.0]), 8, symmetric)
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale  # x / s lands on a half (or next to it)
    x = torch.cat([torch.randn(100_000) * 4, ties])
    with torch.no_grad():
        plain = fake_quantize(x, scale, zp, qmin, qmax)
    trained = fake_quantize(x.clone().requires_grad_(True), scale, zp, qmin, qmax)
    assert torch.equal(plain, trained.detach())
    assert torch.equal(plain, fake_quantize(x, scale, zp, qmin, qmax))  # nothing requires grad: the same path
