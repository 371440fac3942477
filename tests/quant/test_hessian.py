"""The Hessian spectrum by power iteration against explicit Hessians (numpy's eigvalsh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from qbert.quant.hessian import block_spectra, hessian_vector_product, top_eigenvalue


def test_power_iteration_finds_the_largest_magnitude_eigenvalue_of_a_quadratic() -> None:
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eigenvalues = np.array([-7.0, 3.0, 2.5, 1.0, 0.5, 0.1])  # the largest magnitude is negative
    a = basis @ np.diag(eigenvalues) @ basis.T
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x @ torch.from_numpy(a) @ x + x.sum()
    value, used = top_eigenvalue(loss, [x], iterations=500, tol=1e-12, generator=torch.Generator().manual_seed(1))
    assert value == pytest.approx(-7.0, rel=1e-6) and used < 500
    v = [torch.ones(6, dtype=torch.float64)]
    np.testing.assert_allclose(hessian_vector_product(loss, [x], v)[0].numpy(), a @ np.ones(6), rtol=1e-12)


def _mlp() -> tuple[torch.nn.Module, dict[str, list[torch.nn.Parameter]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    return model, {"first": list(model[0].parameters()), "second": list(model[2].parameters())}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(3)]


def _explicit_top(model: torch.nn.Module, names: list[str], batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest-magnitude eigenvalue of the Hessian formed entry by entry (torch.autograd.functional)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks, start = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            chunks[n] = theta[start:start + size].reshape(shape)
            start += size
        x, y = batch
        return torch.nn.functional.cross_entropy(functional_call(model, {**params, **chunks}, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss, flat).numpy()
    values = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    return float(values[np.argmax(np.abs(values))])


def test_block_spectra_match_explicit_hessians_and_qbert_sensitivity() -> None:
    model, blocks = _mlp()
    batches = _batches()

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    spectra = block_spectra(loss_fn, batches, blocks, iterations=1000, tol=1e-12, seed=3)
    names = {"first": ["0.weight", "0.bias"], "second": ["2.weight", "2.bias"]}
    for block, spectrum in spectra.items():
        expected = [_explicit_top(model, names[block], batch) for batch in batches]
        np.testing.assert_allclose(spectrum.eigenvalues, expected, rtol=1e-5)
        assert spectrum.parameters == sum(p.numel() for p in blocks[block])
        assert spectrum.omega == pytest.approx(abs(np.mean(expected)) + np.std(expected), rel=1e-5)
    assert len({round(s.omega, 6) for s in spectra.values()}) == 2
