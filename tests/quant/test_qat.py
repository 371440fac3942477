"""QAT machinery against independent computations: learned-range gradients (hand formula and finite
differences), frozen ranges at evaluation, Q8BERT's EMA and quantization delay, 2-bit embeddings,
bias rounding, model size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qbert.recipes import get_recipe

from qbert.config import parse_config
from qbert.models import load_model, resolve_model
from qbert.pipeline.context import StageContext
from qbert.quant.estimators import RunningAbsMax
from qbert.quant.functional import fake_quantize, fake_quantize_autograd
from qbert.quant.quantizer import Quantizer
from qbert.quant.size import model_size
from qbert.quant.spec import QuantSpec


def _grid(symmetric: bool, bits: int = 4) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_learned_range_gradient_matches_hand_formula_and_finite_differences(symmetric: bool) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1.5, size=400)  # wide enough that both grid ends clip
    w = rng.normal(size=400)  # loss = sum(w * fake_quantize(x))
    qmin, qmax = _grid(symmetric)
    s0, z0 = 0.21, (0.0 if symmetric else 7.0)

    xt = torch.tensor(x, requires_grad=True)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=not symmetric)
    (torch.tensor(w) * fake_quantize(xt, s, z, qmin, qmax)).sum().backward()

    # hand formula (LSQ, Esser et al. 2019), numpy float64
    v = np.round(x / s0) + z0
    inside = (v >= qmin) & (v <= qmax)
    q = np.clip(v, qmin, qmax)
    ds = np.where(inside, (q - z0) - x / s0, q - z0)
    dz = np.where(inside, 0.0, -s0)
    np.testing.assert_allclose(s.grad.item(), (w * ds).sum(), rtol=1e-9)
    np.testing.assert_allclose(xt.grad.numpy(), w * inside, rtol=0, atol=0)
    if not symmetric:
        np.testing.assert_allclose(z.grad.item(), (w * dz).sum(), rtol=1e-9)

    # finite differences of the surrogate the STE differentiates: rounding residuals and the
    # clipping pattern held at their values at s0
    residual = np.round(x / s0) - x / s0

    def surrogate(scale: float, zero: float) -> float:
        v = x / scale + residual + zero
        return float((w * (np.where(inside, v, np.clip(np.round(x / s0) + z0, qmin, qmax)) - zero) * scale).sum())

    h = 1e-6
    numeric_s = (surrogate(s0 + h, z0) - surrogate(s0 - h, z0)) / (2 * h)
    np.testing.assert_allclose(s.grad.item(), numeric_s, rtol=1e-6)
    if not symmetric:
        numeric_z = (surrogate(s0, z0 + h) - surrogate(s0, z0 - h)) / (2 * h)
        np.testing.assert_allclose(z.grad.item(), numeric_z, rtol=1e-6, atol=1e-8)


def test_hand_written_backward_equals_autograd_of_the_elementwise_ops() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 7, 12) * 2
    scale = torch.rand(12) * 0.1 + 0.05  # per embedding dimension: reduced over the other dims
    zero = torch.full((12,), 9.0)
    grads = []
    for fn in (fake_quantize, fake_quantize_autograd):
        xs, ss, zs = (t.clone().requires_grad_(True) for t in (x, scale, zero))
        out = fn(xs, ss, zs, 0, 15)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), xs.grad, ss.grad, zs.grad))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(resolve_model("tiny-random"), "classification", 2)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _config(recipe: dict, **extra) -> object:
    return parse_config({"model": "tiny-random", "task": "mrpc", "recipe": recipe, **extra})


def _instrumented(recipe: dict) -> tuple[object, torch.nn.Module]:
    """A recipe's quantizers on the tiny model, ranged from one batch (no pipeline, no data files)."""
    from qbert.quant.sites import enumerate_sites, instrument
    from qbert.quant.static import quantizer_factory, range_weights

    config = _config(recipe)
    r = get_recipe(recipe["name"])(config.recipe, config)
    model = _tiny_model()
    inst = instrument(model, r.plan(enumerate_sites(model)), quantizer_factory(config.estimator))
    range_weights(inst)
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in _batch().items() if k != "labels"})
    for q in inst.activations().values():
        q.freeze()
    return inst, model


def test_qat_model_in_eval_mode_equals_the_model_with_fixed_ranges() -> None:
    inst, model = _instrumented({"name": "w8a8_qat"})
    inst.set_state("learn")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    zero_points = [float(q.zero_point.detach()[0]) for q in inst.activations().values()]
    assert any(z != round(z) for z in zero_points), "zero points should have moved off the integers"
    model.eval()
    inputs = {k: v for k, v in _batch().items() if k != "labels"}
    with torch.no_grad():
        learned = model(**inputs).logits
        inst.set_state("fixed")
        fixed = model(**inputs).logits
        again = model(**inputs).logits
    assert torch.equal(learned, fixed) and torch.equal(fixed, again)
    assert all(float(q.zero_point[0]).is_integer() for q in inst.activations().values())
    assert all(float(q.scale.min()) > 0 for q in inst.quantizers.values())


def test_running_absmax_follows_the_ema_formula() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1 + i, size=(1, 50)) for i in range(6)]
    est = RunningAbsMax(momentum=0.9)
    expected = None
    for b in batches:
        est.update(torch.tensor(b))
        current = np.abs(b).max()
        expected = current if expected is None else 0.9 * expected + 0.1 * current
    lo, hi = est.range()
    assert float(hi) == pytest.approx(expected, rel=1e-6) and float(lo) == pytest.approx(-expected, rel=1e-6)


def test_q8bert_quantization_delay_and_ema_ranges() -> None:
    delay, decay = 2, 0.5
    config = _config({"name": "q8bert", "start_step": delay, "ema_decay": decay})
    recipe = get_recipe("q8bert")(config.recipe, config)
    model = _tiny_model()
    reference = _tiny_model()  # same weights, never quantized
    ctx = StageContext(config, 0, tokenizer=None, device=torch.device("cpu"), load_train=lambda: [{}] * 64)
    q = recipe.prepare(model, ctx)
    before_step = recipe.training(q, config.finetune).before_step
    inst = q.instrumented
    site = inst.quantizers["layer.0.ffn.input"]
    seen: list[float] = []
    model.base_model.encoder.layer[0].attention.output.LayerNorm.register_forward_hook(
        lambda _m, _a, out: seen.append(float(out.detach()[_batch()["attention_mask"].bool()].abs().max())),
        prepend=True,  # before the quantizer's hook: the unquantized LayerNorm output
    )
    model.train(), reference.train()
    for step in range(delay + 3):
        before_step(step)
        torch.manual_seed(step)
        out = model(**_batch()).logits
        torch.manual_seed(step)
        ref = reference(**_batch()).logits
        if step < delay:  # quantization off: the FP32 model, and no statistics
            assert torch.equal(out, ref) and not site.estimator.observed
        else:
            assert not torch.equal(out, ref)
    # EMA over the quantized steps only, initialised by the first of them
    expected = seen[delay]
    for value in seen[delay + 1:]:
        expected = decay * expected + (1 - decay) * value
    assert float(site.quant_range()[1]) == pytest.approx(expected, rel=1e-6)
    # frozen at evaluation: eval-mode passes leave the range alone
    model.eval()
    before = site.scale.clone()
    with torch.no_grad():
        model(**_batch())
    assert torch.equal(site.scale, before)
    # Q8BERT's sites: symmetric 8-bit, only the inputs of fully connected layers
    assert {q.spec.symmetric for q in inst.quantizers.values()} == {True}
    assert "layer.0.attn.scores" not in inst.quantizers and "layer.0.ffn.residual_sum" not in inst.quantizers
    assert {"embeddings.word.weight", "layer.0.attn.context", "pooler.output"} <= set(inst.quantizers)
    assert {(q.qmin, q.qmax, q.spec.ste) for q in inst.quantizers.values()} == {(-127, 127, "identity")}


def test_q8bert_grid_and_identity_ste_follow_the_post() -> None:
    """Quantize(x, scale, bits) = clip(round(x * scale), -(2^(b-1) - 1), 2^(b-1) - 1) with
    scale = 127 / threshold (the Q8BERT post), and NLP Architect's straight-through gradient: the
    identity, also for the inputs clipped by a threshold below their max."""
    rng = np.random.default_rng(3)
    x_np = rng.normal(size=(4, 50)).astype(np.float32)
    x_np[0, 0] = -5.0  # well outside the threshold below: clipped at -127, not -128
    threshold = np.float32(2.5)
    scale_np = np.float32(127) / threshold
    expected = np.clip(np.round(x_np * scale_np), -127, 127) / scale_np
    q = Quantizer(QuantSpec(bits=8, symmetric=True, narrow=True, ste="identity", estimator="minmax"), RunningAbsMax())
    q.set_range(torch.tensor(-threshold), torch.tensor(threshold))
    q.set_state("fixed")
    x = torch.from_numpy(x_np).requires_grad_(True)
    out = q(x)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-6)
    assert float(out.detach().min()) == pytest.approx(-float(threshold), rel=1e-6)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    # the Bondarenko quantizers' STE zeroes the clipped inputs' gradient
    clipped = Quantizer(QuantSpec(bits=8, symmetric=True, estimator="minmax"), RunningAbsMax())
    clipped.set_range(torch.tensor(-threshold), torch.tensor(threshold))
    clipped.set_state("fixed")
    x2 = torch.from_numpy(x_np).requires_grad_(True)
    clipped(x2).sum().backward()
    codes = np.round(x_np / (threshold / np.float32(127)))
    outside = (codes < -128) | (codes > 127)
    assert outside[0, 0] and outside.sum() > 1
    np.testing.assert_array_equal(x2.grad.numpy(), (~outside).astype(np.float32))


def test_two_bit_embeddings_use_four_levels() -> None:
    inst, model = _instrumented({"name": "w4a8_qat", "embedding_bits": 2})
    word = model.base_model.embeddings.word_embeddings.weight
    levels = torch.unique(word.detach())
    assert len(levels) == 4
    scale = float(inst.quantizers["embeddings.word.weight"].scale)
    assert sorted(levels.tolist()) == pytest.approx([-2 * scale, -scale, 0.0, scale])
    other = torch.unique(model.base_model.encoder.layer[0].output.dense.weight.detach())
    assert 8 < len(other) <= 16  # 4-bit grid everywhere else


def test_biases_become_int32_multiples_of_input_times_weight_scale() -> None:
    from qbert.quant.integer import quantize_biases
    from qbert.quant.sites import linear_inputs, weight_modules

    inst, model = _instrumented({"name": "q8bert"})
    inputs = linear_inputs(model)
    report = quantize_biases(inst, inputs)
    assert report["biases"] == 2 * 6 + 2
    for site, module in weight_modules(model).items():
        if site in inputs:
            step = float(inst.quantizers[site].scale) * float(inst.quantizers[inputs[site]].scale)
            codes = module.bias.detach().double() / step
            np.testing.assert_allclose(codes.numpy(), np.round(codes.numpy()), atol=1e-3)


def test_model_size_counts_bits_per_quantized_weight() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5, bias=False))
    size = model_size(model, {"0.weight": 4, "1.weight": 2})
    bits = 200 * 4 + 100 * 2 + 20 * 32
    assert size["mb"] == pytest.approx(bits / 8 / 1e6, abs=1e-3)
    assert size["compression"] == pytest.approx(320 * 32 / bits, rel=1e-3)
    q = Quantizer(QuantSpec(bits=4, symmetric=True), RunningAbsMax())
    model.add_module("q", q)  # quantizer parameters are metadata, not model weights: a symmetric grid stores its scale
    assert model_size(model, {"0.weight": 4, "1.weight": 2})["quantizer_metadata_bytes"] == 4
    model.add_module("a", Quantizer(QuantSpec(bits=8, symmetric=False), RunningAbsMax()))  # scale and zero point
    assert model_size(model, {"0.weight": 4, "1.weight": 2})["quantizer_metadata_bytes"] == 4 + 2 * 4
    # group-wise: one scale per group of rows while the rows share it, else one per row
    grouped = Quantizer(QuantSpec(bits=4, symmetric=True, granularity="per_channel", groups=4), RunningAbsMax(),
                        channels=20, channel_dim=0)
    grouped.set_range(-torch.arange(1.0, 5.0), torch.arange(1.0, 5.0))
    model.add_module("g", grouped)
    assert model_size(model, {"0.weight": 4, "1.weight": 2})["quantizer_metadata_bytes"] == 4 + 8 + 4 * 4
    with torch.no_grad():
        grouped.scale[1] *= 2  # a learned per-row scale: the rows no longer share their group's
    assert model_size(model, {"0.weight": 4, "1.weight": 2})["quantizer_metadata_bytes"] == 4 + 8 + 20 * 4


def test_integer_file_holds_grid_codes_and_int32_biases(tmp_path) -> None:
    from safetensors.numpy import load_file

    from qbert.quant.integer import quantize_biases, read_integer, write_integer
    from qbert.quant.sites import linear_inputs

    inst, model = _instrumented({"name": "q8bert"})
    quantize_biases(inst, linear_inputs(model))
    path = tmp_path / "model.safetensors"
    write_integer(path, inst)
    raw = load_file(str(path))
    params, entries = read_integer(path)
    name = "bert.encoder.layer.0.output.dense"
    assert raw[f"{name}.bias"].dtype == np.int32 and entries[f"{name}.bias"]["kind"] == "bias_int32"
    assert raw[f"{name}.weight"].dtype == np.uint8 and raw[f"{name}.weight"].size == 64 * 128  # 8 bits each
    # independent de-quantization of the stored codes: (u + qmin) * scale, qmin = -127 (Q8BERT's grid)
    weight = (raw[f"{name}.weight"].astype(np.float32) - 127) * raw[f"{name}.weight.scale"]
    assert raw[f"{name}.weight"].max() <= 254
    np.testing.assert_array_equal(weight.reshape(64, 128), params[f"{name}.weight"])
    effective = model.base_model.encoder.layer[0].output.dense.weight.detach().numpy()
    np.testing.assert_array_equal(params[f"{name}.weight"], effective)
    bias = raw[f"{name}.bias"].astype(np.float64) * raw[f"{name}.bias.scale"].astype(np.float64)
    np.testing.assert_allclose(bias, model.base_model.encoder.layer[0].output.dense.bias.detach().numpy(), rtol=1e-6)


def test_dynamic_quantizer_ranges_each_input_by_its_own_max_as_nlp_architect() -> None:
    """NLP Architect's DYNAMIC mode: scale = 127 / max|x| of the input at hand, codes clip(round(x * scale),
    -127, 127), de-quantized by / scale; here over the valid (non-padding) positions only."""
    rng = np.random.default_rng(5)
    x_np = rng.normal(size=(2, 6, 8)).astype(np.float32)
    valid = np.ones((2, 6), dtype=bool)
    valid[1, 4:] = False
    x_np[1, 4:] = 40.0  # padding far outside the real tokens' range: left out of the max, then clipped

    def nlp_architect(values: np.ndarray, threshold: np.float32) -> np.ndarray:
        scale = np.float32(127) / threshold
        return np.clip(np.round(values * scale), -127, 127) / scale

    q = Quantizer(QuantSpec(bits=8, symmetric=True, narrow=True, ste="identity", estimator="minmax"), RunningAbsMax())
    q.set_state("dynamic")
    out = q(torch.from_numpy(x_np), torch.from_numpy(valid)).numpy()
    threshold = np.abs(x_np[valid]).max()
    np.testing.assert_allclose(out, nlp_architect(x_np, threshold), rtol=0, atol=1e-6)
    assert np.all(out[1, 4:] == pytest.approx(threshold, rel=1e-6))
    # every call its own range: the first sequence alone is quantized more finely than in the batch
    alone = q(torch.from_numpy(x_np[:1])).numpy()
    np.testing.assert_allclose(alone, nlp_architect(x_np[:1], np.abs(x_np[0]).max()), rtol=0, atol=1e-6)
    assert not np.array_equal(alone, out[:1])
    assert float(q.scale) == 1.0  # the stored range is not used nor changed


def test_q8bert_ptq_is_q8bert_sites_with_each_batch_quantized_by_its_own_ranges() -> None:
    """The dynamic model on one batch equals the same sites calibrated on that batch alone (max |x| of each site
    with the sites before it quantized: ``estimate_quantized``, another path through the quantizers)."""
    from qbert.quant.sites import enumerate_sites, instrument
    from qbert.quant.static import quantizer_factory, range_weights

    dynamic_config, q8bert_config = _config({"name": "q8bert_ptq"}), _config({"name": "q8bert"})
    dynamic = get_recipe("q8bert_ptq")(dynamic_config.recipe, dynamic_config)
    q8bert = get_recipe("q8bert")(q8bert_config.recipe, q8bert_config)
    sites = enumerate_sites(_tiny_model())
    assert dynamic.plan(sites).totals() == q8bert.plan(sites).totals()

    batch = {k: v for k, v in _batch().items() if k != "labels"}
    outputs = []
    for state in ("dynamic", "estimate_quantized"):
        model = _tiny_model().eval()
        inst = instrument(model, dynamic.plan(enumerate_sites(model)), quantizer_factory(dynamic_config.estimator))
        range_weights(inst)
        inst.set_state(state, kind="activation")
        with torch.no_grad():
            outputs.append(model(**batch).logits)
    assert torch.equal(outputs[0], outputs[1])
    with torch.no_grad():
        float_logits = _tiny_model().eval()(**batch).logits
    assert not torch.equal(outputs[0], float_logits)
