"""Quant-Noise (Fan et al. 2020): a random share of blocks quantized while training, everything at evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from qbert.recipes import get_recipe

import qbert
from qbert.config import parse_config
from qbert.errors import QbertError
from qbert.quant.estimators import CurrentMinMax
from qbert.quant.quantizer import Quantizer
from qbert.quant.spec import QuantSpec
from tests.conftest import PAIRS, tiny_model
from tests.quant.test_qat import _batch, _instrumented


def _quantizer(noise: tuple[float, int] | None, bits: int = 4, lo: float = -2.1, hi: float = 1.9) -> Quantizer:
    q = Quantizer(QuantSpec(bits=bits, symmetric=False, ste="clipped"), CurrentMinMax(), site="x")
    q.set_range(torch.tensor([lo]), torch.tensor([hi]))
    q.set_state("fixed")
    q.noise = noise
    return q


def _grid(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Asymmetric fake quantization in numpy (the quantizer's grid, computed independently)."""
    scale = (hi - lo) / (2**bits - 1)
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def test_each_block_is_quantized_or_left_alone_with_probability_p():
    torch.manual_seed(0)
    x = torch.randn(64, 32, 48) * 1.5
    q = _quantizer((0.3, 8))
    q.train()
    out = q(x).numpy()
    full = _grid(x.double().numpy(), -2.1, 1.9, 4)
    quantized = out != x.numpy()  # randn is never on the grid: quantizing moves every entry
    np.testing.assert_allclose(out[quantized], full[quantized], rtol=0, atol=1e-5)
    blocks = quantized.reshape(64, 32, 6, 8)
    # whole blocks: every entry of a block quantized, or none
    assert np.all(blocks.all(axis=-1) | ~blocks.any(axis=-1))
    share = blocks.all(axis=-1).mean()
    assert abs(share - 0.3) < 0.02, share  # 12288 blocks: the standard error is 0.004
    again = q(x).numpy()
    assert not np.array_equal(out, again), "the blocks are drawn anew at every call"


def test_evaluation_and_no_grad_quantize_everything():
    torch.manual_seed(1)
    x = torch.randn(8, 40)
    full = _grid(x.double().numpy(), -2.1, 1.9, 4)
    q = _quantizer((0.2, 1))
    q.eval()
    np.testing.assert_allclose(q(x).numpy(), full, atol=1e-5)
    q.train()
    with torch.no_grad():
        np.testing.assert_allclose(q(x).numpy(), full, atol=1e-5)
    assert not np.allclose(q(x).numpy(), full, atol=1e-5)


def test_a_last_block_shorter_than_block_size_is_one_block():
    torch.manual_seed(2)
    x = torch.randn(2000, 10)
    q = _quantizer((0.5, 4))
    q.train()
    quantized = q(x).numpy() != x.numpy()
    for block in (slice(0, 4), slice(4, 8), slice(8, 10)):
        part = quantized[:, block]
        assert np.all(part.all(axis=1) | ~part.any(axis=1))
    assert 0.45 < quantized[:, 8:].all(axis=1).mean() < 0.55


def test_gradient_is_the_quantizers_on_quantized_blocks_and_the_identity_elsewhere():
    torch.manual_seed(3)
    x = (torch.randn(500, 16) * 2).requires_grad_()
    q = _quantizer((0.5, 1), lo=-1.1, hi=0.9)
    q.train()
    out = q(x)
    out.sum().backward()
    grad, xs, o = x.grad.numpy(), x.detach().numpy(), out.detach().numpy()
    untouched = o == xs
    (lo,), (hi,) = (t.numpy() for t in q.quant_range())
    step = (hi - lo) / 15
    outside, inside = (xs < lo - step) | (xs > hi + step), (xs > lo + step) & (xs < hi - step)
    assert np.all(grad[untouched] == 1)
    assert np.all(grad[~untouched & outside] == 0)  # clipped straight-through
    assert np.all(grad[~untouched & inside] == 1)
    assert (~untouched & outside).sum() > 100


def test_quant_noise_parameters():
    config = parse_config({"model": "tiny-random", "task": "mrpc", "recipe": {"name": "w8a8_qat",
                                                                              "quant_noise": 0.25}})
    assert config.recipe.quant_noise.p == 0.25 and config.recipe.quant_noise.block_size == 1
    plain = parse_config({"model": "tiny-random", "task": "mrpc", "recipe": {"name": "w8a8_qat"}})
    assert config.config_hash() != plain.config_hash()
    for bad in (0, 1.5, {"p": 0.5, "block_size": 0}, {"p": 0.5, "size": 8}):
        with pytest.raises(QbertError, match="recipe.quant_noise"):
            parse_config({"model": "tiny-random", "task": "mrpc", "recipe": {"name": "q8bert", "quant_noise": bad}})


@pytest.mark.parametrize("activations", [True, False])
def test_the_recipe_puts_noise_on_its_quantizers(activations):
    recipe = {"name": "w4a8_qat", "quant_noise": {"p": 0.4, "block_size": 8, "activations": activations}}
    inst, model = _instrumented(recipe)
    config = parse_config({"model": "tiny-random", "task": "mrpc", "recipe": recipe})
    q = get_recipe("w4a8_qat")(config.recipe, config).quantized(model, SimpleNamespace(tokenizer=None), "simulated",
                                                                  instrumented=inst)
    noisy = {name for name, quantizer in inst.quantizers.items() if quantizer.noise == (0.4, 8)}
    assert noisy == set(inst.quantizers if activations else inst.weights())
    assert q.report["quant_noise"]["quantizers"] == len(noisy)


def test_learned_range_prepare_reports_quant_noise_once():
    """w8a8_qat initialises its ranges with a PTQ pass through the same recipe: the noise is reported on the
    QAT value, not again inside its initialisation report."""
    model, tokenizer = tiny_model()
    q = qbert.prepare(model, {"name": "w8a8_qat", "quant_noise": 0.5}, calibration=PAIRS[:4], tokenizer=tokenizer,
                      calibrate={"batches": 1, "batch_size": 4}, max_seq_len=32)
    assert q.report["quant_noise"]["p"] == 0.5
    assert q.report["quant_noise"]["quantizers"] == len(q.instrumented.quantizers)
    assert "quant_noise" not in q.report["initialisation"]
    assert all(quantizer.noise == (0.5, 1) for quantizer in q.instrumented.quantizers.values())


def _train(noise: tuple[float, int] | None) -> torch.Tensor:
    inst, model = _instrumented({"name": "w8a8_qat"})
    for quantizer in inst.quantizers.values():
        quantizer.noise = noise
    inst.set_state("learn")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(5)
    for _ in range(2):
        model(**_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in _batch().items() if k != "labels"}).logits


def test_p_one_is_plain_qat_and_a_smaller_p_trains_differently():
    plain = _train(None)
    assert torch.equal(_train((1.0, 1)), plain)
    assert not torch.allclose(_train((0.5, 1)), plain)
