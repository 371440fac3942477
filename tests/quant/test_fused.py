"""The fused training kernels against the eager ones and the textbook autograd computation: the output bit for bit,
the input's gradient bit for bit against the eager kernel (the textbook's passes through 1/s and s), the learned
scale's and zero point's gradients up to the order of their sums; the fallback when compiling fails."""

from __future__ import annotations

import warnings

import pytest
import torch

from qbert.quant import fused
from qbert.quant.functional import fake_quantize, fake_quantize_autograd


@pytest.fixture
def kernels():
    """The fused kernels on (the suite runs the eager ones); conftest restores the switch."""
    fused.set_enabled(True)


def _case(layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    if layout == "per_tensor":  # an activation: [batch, tokens, hidden]
        x = torch.randn(4, 33, 96, generator=gen) * 3
        scale, zero = torch.tensor([0.05]), torch.tensor([128.0])
    elif layout == "per_dimension":  # per-embedding-group scales, broadcast over the hidden dimension
        x = torch.randn(4, 33, 96, generator=gen) * 3
        scale = torch.rand(96, generator=gen) * 0.05 + 0.01
        zero = torch.randint(0, 256, (96,), generator=gen).float()
    else:  # per output channel of a weight
        x = torch.randn(96, 40, generator=gen) * 0.1
        scale, zero = torch.rand(96, 1, generator=gen) * 0.002 + 0.0005, torch.zeros(96, 1)
    return x.to(dtype), scale, zero


def _run(x, scale, zero, clipped_ste, learn_scale, learn_zero, path):
    xs = x.clone().requires_grad_(True)
    ss, zs = scale.clone().requires_grad_(learn_scale), zero.clone().requires_grad_(learn_zero)
    if path == "textbook":
        out = fake_quantize_autograd(xs.to(ss.dtype), ss, zs, 0, 255, clipped_ste).to(x.dtype)
    else:
        fused.set_enabled(path == "fused")
        out = fake_quantize(xs, ss, zs, 0, 255, clipped_ste)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), xs.grad, ss.grad, zs.grad


CASES = [  # layout, dtype, clipped STE, learned scale, learned zero point
    ("per_tensor", torch.float32, True, False, False),
    ("per_tensor", torch.float32, False, False, False),
    ("per_tensor", torch.float32, True, True, True),
    ("per_tensor", torch.bfloat16, True, True, True),
    ("per_tensor", torch.bfloat16, True, False, False),
    ("per_dimension", torch.float32, True, True, True),
    ("per_channel", torch.float32, True, True, False),
]


@pytest.mark.parametrize(("layout", "dtype", "clipped_ste", "learn_scale", "learn_zero"), CASES)
def test_fused_kernels_compute_what_the_eager_and_textbook_paths_do(kernels, layout, dtype, clipped_ste, learn_scale,
                                                                   learn_zero):
    x, scale, zero = _case(layout, dtype)
    fused._state["kernels"].clear()
    fast, eager, textbook = (_run(x, scale, zero, clipped_ste, learn_scale, learn_zero, path)
                             for path in ("fused", "eager", "textbook"))
    # the passes ran compiled (the plain straight-through backward is no kernel)
    passes = [0, 1] if clipped_ste or learn_scale or learn_zero else [0]
    assert sorted(key[0] for key in fused._state["kernels"]) == passes
    for other in (eager, textbook):
        assert fast[0].dtype == x.dtype and torch.equal(fast[0], other[0])  # the output
    assert torch.equal(fast[1], eager[1])  # the input's gradient
    # autograd of the textbook ops scales the gradient by 1/s and back by s: float32 rounding of that product
    torch.testing.assert_close(fast[1], textbook[1], rtol=2 ** -22, atol=0)
    if clipped_ste:  # the case is one where the clamp cuts somewhere, and not everywhere
        assert 0 < int((fast[1] == 0).sum()) < x.numel()
    for index, learned in ((2, learn_scale), (3, learn_zero)):
        if not learned:
            assert fast[index] is None
            continue
        # sums of the same float32 terms in another order: within float32 rounding of the sum of magnitudes
        for other in (eager, textbook):
            tolerance = 1e-5 * float(other[index].abs().max()) + 1e-6
            assert float((fast[index] - other[index]).abs().max()) <= tolerance


def test_fused_kernels_match_a_float64_hand_formula(kernels):
    x = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 1.5
    w = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xs, s, z = x.clone().requires_grad_(True), torch.tensor([0.21], dtype=torch.float64, requires_grad=True), \
        torch.tensor([7.0], dtype=torch.float64, requires_grad=True)
    (w * fake_quantize(xs, s, z, 0, 15)).sum().backward()
    v = torch.round(x / 0.21) + 7.0
    inside = (v >= 0) & (v <= 15)
    q = v.clamp(0, 15)
    torch.testing.assert_close(xs.grad, w * inside, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, (w * torch.where(inside, (q - 7.0) - x / 0.21, q - 7.0)).sum().reshape(1))
    torch.testing.assert_close(z.grad, (w * torch.where(inside, 0.0, -0.21)).sum().reshape(1))


def test_a_failed_compile_warns_once_and_runs_the_eager_kernels(kernels, monkeypatch):
    def broken(*args):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(fused, "_compile", broken)
    monkeypatch.setitem(fused._state, "kernels", {})
    x, scale, zero = _case("per_tensor", torch.float32)
    with pytest.warns(UserWarning, match="kernels unavailable.*RuntimeError: no working C.. compiler"):
        out = _run(x, scale, zero, True, True, True, "fused")
    assert not fused.enabled()
    reference = _run(x, scale, zero, True, True, True, "eager")
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])


@pytest.mark.parametrize("fused_on", [True, False])
def test_linear_weights_come_out_in_the_autocast_dtype_with_the_same_step(fused_on):
    """Under bf16 autocast a linear layer's quantized weight is returned in bf16 (the cast F.linear makes anyway):
    with fixed ranges the training step's loss and every gradient are those of the fp32 weight cast by autocast,
    bit for bit; embedding tables stay fp32 (a lookup is no autocast op)."""
    from qbert.config import EstimatorConfig
    from qbert.quant.sites import enumerate_sites, instrument, resolve_plan
    from qbert.quant.spec import QuantSpec
    from qbert.quant.static import quantizer_factory, range_weights
    from tests.conftest import tiny_model

    fused.set_enabled(fused_on)
    model, tokenizer = tiny_model()
    batch = dict(tokenizer(["the cat sat on the mat", "one two three"], ["a dog ran", "four five six"],
                           padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1])
    spec = QuantSpec(bits=8, symmetric=True)
    inst = instrument(model, resolve_plan(enumerate_sites(model), weights=spec, activations=QuantSpec(bits=8),
                                          weight_base=spec, activation_base=QuantSpec(bits=8)),
                      quantizer_factory(EstimatorConfig()))
    range_weights(inst)
    for q in inst.activations().values():
        q.set_range(torch.tensor([-4.0]), torch.tensor([4.0]))
    inst.set_state("fixed")
    linear = {site for site, q in inst.weights().items() if q.autocast_output}
    assert linear and "embeddings.word" not in linear and len(linear) < len(inst.weights())

    def step() -> tuple[float, list[torch.Tensor], dict[str, torch.dtype]]:
        model.zero_grad(set_to_none=True)
        dtypes = {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for site, q in inst.weights().items():
                dtypes[site] = q(inst.weight_tensors[site]).dtype
            loss = model(**batch).loss
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None], dtypes

    cast = step()
    for q in inst.weights().values():
        q.autocast_output = False
    plain = step()
    assert {site for site, dtype in cast[2].items() if dtype == torch.bfloat16} == linear
    assert set(plain[2].values()) == {torch.float32}
    assert cast[0] == plain[0] and len(cast[1]) == len(plain[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(cast[1], plain[1], strict=True))


def test_one_compiled_kernel_serves_every_size_of_its_rank(kernels):
    """The kernels are compiled once per rank and pattern of sizes 1, every other size symbolic and called without
    guards: sizes that were equal at the first call may differ later, sizes of 1 get kernels of their own."""
    gen = torch.Generator().manual_seed(4)
    fused._state["kernels"].clear()
    shapes = [(96, 96), (96, 40), (40, 96), (1, 96), (96, 1), (3, 1, 7), (3, 5, 7), (1, 1, 1)]
    warnings.simplefilter("error", UserWarning)  # a fallback to the eager kernels warns: here it fails
    for shape in shapes:
        for per_channel in (False, True):
            x = torch.randn(shape, generator=gen) * 3
            scale = torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen) * 0.05 + 0.01 if per_channel \
                else torch.tensor([0.05])
            fast = _run(x, scale, torch.zeros_like(scale), True, True, False, "fused")
            eager = _run(x, scale, torch.zeros_like(scale), True, True, False, "eager")
            assert torch.equal(fast[0], eager[0]) and torch.equal(fast[1], eager[1]), (shape, per_channel)
            torch.testing.assert_close(fast[2], eager[2], rtol=1e-5, atol=1e-6)
    # forward and backward for each rank and pattern of sizes 1 (per tensor and per channel), not one per shape
    assert 0 < len(fused._state["kernels"]) < 4 * len(shapes)


def test_learned_ranges_clamp_and_round_inside_the_kernels_as_the_eager_ops_do(kernels):
    """In the ``learn`` state the kernels take the raw parameters and apply ``learned_grid`` themselves: the scale
    clamped to EPS, the zero point rounded (ties to even) and clamped to the grid, with clamp's gradients (zero where
    it cut) and round's identity. Against the same operations run eagerly before the eager kernel and the textbook
    autograd: output and input gradient bit for bit, parameter gradients up to sum order and exactly zero where a
    clamp cut."""
    from qbert.quant.functional import EPS, learned_grid, reference_arithmetic

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 33, 8, generator=gen) * 3
    scale = torch.tensor([0.05, -0.01, 0.02, 0.5 * EPS, 0.03, 0.04, 0.01, 0.05])  # two below EPS
    zero = torch.tensor([127.6, 3.5, -2.3, 100.0, 260.2, 2.5, 0.49, 255.4])  # ties, below and above the grid
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def run(path):
        xs, ss, zs = x.clone().requires_grad_(True), scale.clone().requires_grad_(True), \
            zero.clone().requires_grad_(True)
        fused.set_enabled(path == "fused")
        if path == "textbook":
            with reference_arithmetic():
                out = fake_quantize(xs, ss, zs, 0, 255, learned=True)
        elif path == "eager":
            out = fake_quantize(xs, *learned_grid(ss, zs, 0, 255), 0, 255)
        else:
            out = fake_quantize(xs, ss, zs, 0, 255, learned=True)
        (out * weights).sum().backward()
        return out.detach(), xs.grad, ss.grad, zs.grad

    fused._state["kernels"].clear()
    fast, eager, textbook = run("fused"), run("eager"), run("textbook")
    assert sorted(key[0] for key in fused._state["kernels"] if key[2][3] is True) == [0, 1]  # learned kernels ran
    assert torch.equal(fast[0], eager[0]) and torch.equal(fast[0], textbook[0])
    assert torch.equal(fast[1], eager[1])
    cut_scale = scale < EPS
    cut_zero = (torch.round(zero) < 0) | (torch.round(zero) > 255)
    assert cut_scale.sum() == 2 and cut_zero.sum() == 2  # -2.3 and 260.2 (255.4 rounds to 255, inside)
    for index, cut in ((2, cut_scale), (3, cut_zero)):
        for other in (eager, textbook):
            assert torch.equal(fast[index][cut], torch.zeros(int(cut.sum())))
            assert torch.equal(other[index][cut], torch.zeros(int(cut.sum())))
            tolerance = 1e-5 * float(other[index].abs().max()) + 1e-6
            assert float((fast[index] - other[index]).abs().max()) <= tolerance
    assert bool((fast[2][~cut_scale] != 0).all())  # the cases are ones where the other entries learn
