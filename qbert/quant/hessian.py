"""The Hessian spectrum of the loss per block of parameters (Q-BERT, Shen et al. 2020, sec. 3.1; as HAWQ).

For each block ``i`` (an encoder layer's parameters), the top eigenvalue ``lambda_i`` of the Hessian of the
training loss with respect to that block, by power iteration on Hessian-vector products (Pearlmutter's trick:
the gradient of ``g . v``, so the Hessian itself is never formed)::

    v <- H v / ||H v||,   lambda = v . H v   (until lambda changes by less than ``tol``, relatively)

computed on several training batches; Q-BERT's sensitivity of the block is ``Omega_i = |mean(lambda_i)| +
std(lambda_i)`` over the batches (a block with a large but noisy top eigenvalue counts as sensitive).
Power iteration finds the eigenvalue of largest magnitude; at a fine-tuned minimum that is the top one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def hessian_vector_product(loss: torch.Tensor, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor],
                           grads: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``H v`` for the Hessian of ``loss`` with respect to ``params`` (``grads``: ``d loss / d params`` made
    with ``create_graph=True``, reused across products)."""
    if grads is None:
        grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    return list(torch.autograd.grad(dot, params, retain_graph=True))


def top_eigenvalue(loss: torch.Tensor, params: Sequence[torch.Tensor], iterations: int = 20, tol: float = 1e-3,
                   generator: torch.Generator | None = None) -> tuple[float, int]:
    """The eigenvalue of largest magnitude of the Hessian of ``loss`` with respect to ``params``, by power
    iteration from a random unit vector (``generator``); returns it and the iterations used."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    eigenvalue = 0.0
    for step in range(1, iterations + 1):
        norm = math.sqrt(sum(float((v * v).sum()) for v in vector))
        vector = [v / norm for v in vector]
        product = hessian_vector_product(loss, params, vector, grads)
        previous, eigenvalue = eigenvalue, float(sum((h * v).sum() for h, v in zip(product, vector, strict=True)))
        vector = [h.detach() for h in product]
        if step > 1 and abs(eigenvalue - previous) <= tol * (abs(previous) + 1e-12):
            return eigenvalue, step
    return eigenvalue, iterations


@dataclass
class BlockSpectrum:
    """One block's top Hessian eigenvalue on each batch, and Q-BERT's sensitivity from them."""

    name: str
    parameters: int
    eigenvalues: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.eigenvalues) / len(self.eigenvalues)

    @property
    def std(self) -> float:
        """Population standard deviation over the batches (0 for one batch)."""
        mean = self.mean
        return math.sqrt(sum((e - mean) ** 2 for e in self.eigenvalues) / len(self.eigenvalues))

    @property
    def omega(self) -> float:
        """Q-BERT's sensitivity ``|mean| + std``."""
        return abs(self.mean) + self.std

    def as_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "eigenvalues": [round(e, 6) for e in self.eigenvalues],
                "mean": round(self.mean, 6), "std": round(self.std, 6), "omega": round(self.omega, 6),
                "iterations": self.iterations}


def block_spectra(loss_fn: Callable[[Any], torch.Tensor], batches: Iterable[Any],
                  blocks: dict[str, Sequence[torch.nn.Parameter]], iterations: int = 20, tol: float = 1e-3,
                  seed: int = 0) -> dict[str, BlockSpectrum]:
    """Every block's top Hessian eigenvalue on every batch (``loss_fn(batch)``: the training loss, recomputed
    per block so each product differentiates one graph); the starting vectors are drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    spectra = {name: BlockSpectrum(name, sum(p.numel() for p in params)) for name, params in blocks.items()}
    for batch in batches:
        for name, params in blocks.items():
            eigenvalue, used = top_eigenvalue(loss_fn(batch), list(params), iterations, tol, generator)
            spectra[name].eigenvalues.append(eigenvalue)
            spectra[name].iterations.append(used)
    return spectra
