"""The quantizer module: fake-quantizes a tensor with per-tensor, per-channel or per-embedding-group
parameters, in one of four states.

States (Bondarenko et al. 2021 sec. 2; Q8BERT):

- ``estimate``: the range estimator observes the input, which passes through unchanged
  (calibration runs the floating-point network).
- ``estimate_quantized``: the estimator observes the input, which leaves quantized with the range
  estimated so far, this input included (the reference code's calibration: every site downstream
  sees the quantization of the sites before it).
- ``fixed``: scale and zero point are frozen buffers (PTQ, evaluation).
- ``learn``: scale and zero point are trained with the network (QAT with learned ranges, LSQ-style
  gradients through :func:`~qbert.quant.functional.fake_quantize`).
- ``estimate_train``: while the module is training, the estimator (an EMA) updates on every batch and
  the input is quantized with the current range; in eval mode the last range is used (Q8BERT).
- ``disabled``: the input passes through untouched and unobserved (a quantization delay).
- ``dynamic``: every input is quantized with its own range, taken from the input itself at each call (its valid
  positions; Q8BERT's dynamic post-training quantization, NLP Architect's ``DYNAMIC`` mode); the stored scale and
  zero point are not used.

Fake quantization is computed in float32 whatever the input's dtype (under bf16 autocast a bf16
``x / s`` would misround near the grid's ends and a bf16 scale would move the grid), and the result
is cast back.

Per-embedding-group (PEG) quantization splits the last dimension into K equal groups that share a
scale and zero point. With ``permute`` the dimensions are first sorted by their calibrated range
(``permutation``, stored as a buffer so exports can apply it), so the outlier dimensions share a group.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from qbert.quant.estimators import RangeEstimator
from qbert.quant.functional import EPS, fake_quantize, grid_limits, integer_codes, params_from_range
from qbert.quant.spec import QuantSpec

QuantState = Literal["estimate", "estimate_quantized", "fixed", "learn", "estimate_train", "disabled", "dynamic"]
STATES = ("estimate", "estimate_quantized", "fixed", "learn", "estimate_train", "disabled", "dynamic")


class Quantizer(nn.Module):
    """Fake quantization of one site (an activation or a weight).

    ``channels`` is the size of the quantized dimension (the last one for activations, the first for
    weights); it is needed by per-channel and per-embedding-group granularity.
    """

    def __init__(
        self, spec: QuantSpec, estimator: RangeEstimator, *, channels: int | None = None,
        channel_dim: Literal[0, -1] = -1, site: str = "",
    ) -> None:
        super().__init__()
        self.spec, self.estimator, self.channels, self.channel_dim, self.site = (
            spec, estimator, channels, channel_dim, site,
        )
        self.qmin, self.qmax = grid_limits(spec.bits, spec.symmetric, spec.narrow)
        if spec.granularity == "per_tensor":
            groups = 1
        else:
            if channels is None:
                raise ValueError(f"{site}: {spec.granularity} needs a channel dimension")
            if spec.granularity == "per_channel":
                groups = channels  # a scale per row; with spec.groups, equal within each group of rows
                if channels % (spec.groups or channels):
                    raise ValueError(f"{site}: {spec.groups} groups do not divide {channels} output channels")
            else:
                groups = spec.groups or channels
                if channels % groups:
                    raise ValueError(f"{site}: {groups} groups do not divide {channels} embedding dimensions")
        self.groups = groups
        self.range_groups = spec.groups if spec.granularity == "per_channel" and spec.groups else groups
        """How many ranges the estimator computes: ``groups``, but for group-wise weights one per group of rows
        (each row's scale is then its group's)."""
        # a linear layer's weight under autocast: returned in the autocast dtype, the cast F.linear would make
        # (same values; one pass over the weight instead of two, each way)
        self.autocast_output = False
        self.scale = nn.Parameter(torch.ones(groups), requires_grad=False)
        self.zero_point = nn.Parameter(torch.zeros(groups), requires_grad=False)
        if spec.granularity == "per_embedding_group":
            self.register_buffer("permutation", torch.arange(channels))
            self.register_buffer("dim_to_group", torch.arange(channels) * groups // channels)
        else:
            self.permutation = None
            self.dim_to_group = None
        self.state: QuantState = "estimate"
        self.track_dimensions = False
        """When set, ``observe`` also keeps per-dimension extremes (for permutations and reports)."""
        self.dim_lo: torch.Tensor | None = None
        self.dim_hi: torch.Tensor | None = None
        self.dimension_ranges: tuple[Literal["all", "ema", "last"], float] = ("all", 0.9)
        """How :meth:`range_permutation` ranks dimensions: by their range over every observed batch
        (``all``), an EMA of the per-batch ranges with this momentum (``ema``), or the last batch's."""
        self.dim_width: torch.Tensor | None = None
        self.noise: tuple[float, int] | None = None
        """Quant-Noise (Fan et al. 2020) as ``(p, block_size)``: while training (with gradients), each block of
        ``block_size`` consecutive entries along the last dimension is fake-quantized with probability ``p`` and
        passes in floating point otherwise; in eval mode everything is quantized. None: every entry, always."""

    # states -----------------------------------------------------------------------------------
    def set_state(self, state: QuantState) -> None:
        """Switch state; ``learn`` makes scale and zero point trainable, the others freeze them."""
        if state not in STATES:
            raise ValueError(f"unknown quantizer state {state!r}; one of {', '.join(STATES)}")
        if self.state == "learn" and state != "learn":
            self._settle()
        self.state = state
        trainable = state == "learn"
        self.scale.requires_grad_(trainable)
        self.zero_point.requires_grad_(trainable and not self.spec.symmetric)

    def training_state(self) -> dict[str, Any]:
        """What training changes outside the state dict (the state, the estimator's running statistics, the
        per-dimension extremes), saved with an interrupted training so that it resumes exactly."""
        return {"state": self.state, "estimator": dict(vars(self.estimator)),
                "dimensions": [self.dim_lo, self.dim_hi, self.dim_width]}

    def load_training_state(self, saved: dict[str, Any]) -> None:
        """Back to what :meth:`training_state` saved (the scale and zero point come with the state dict)."""
        self.set_state(saved["state"])
        vars(self.estimator).update(saved["estimator"])
        self.dim_lo, self.dim_hi, self.dim_width = saved["dimensions"]

    @torch.no_grad()
    def _settle(self) -> None:
        """Leaving ``learn``: the zero point becomes the integer the forward pass was using and the
        scale stays positive, so the frozen quantizer computes exactly what training last did."""
        self.scale.clamp_(min=EPS)
        self.zero_point.copy_(torch.clamp(torch.round(self.zero_point), self.qmin, self.qmax))

    def freeze(self) -> None:
        """Set scale and zero point from the estimator's range and switch to ``fixed``."""
        self.set_range(*self.estimator.range())
        self.set_state("fixed")

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Scale and zero point covering per-group ``[lo, hi]``."""
        scale, zero_point = params_from_range(
            lo.to(self.scale.device).reshape(-1).float(), hi.to(self.scale.device).reshape(-1).float(),
            self.spec.bits, self.spec.symmetric,
        )
        repeats = self.groups // scale.numel()  # one range for all groups, or per group of rows: to every row
        self.scale.copy_(scale.repeat_interleave(repeats))
        self.zero_point.copy_(zero_point.repeat_interleave(repeats))

    def quant_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The representable per-group range ``[s (qmin - z), s (qmax - z)]``."""
        s, z = self.scale.detach(), self.zero_point.detach()
        return s * (self.qmin - z), s * (self.qmax - z)

    @torch.no_grad()
    def stored_grid(self) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """What a file has to store of the grid: the scales, the zero points (None for a symmetric grid, whose
        zero point is 0) and, for group-wise weights whose rows share their group's scale and zero point, the
        number of row groups (the scales are then one per group; None: one per entry of ``scale``)."""
        scale, zero = self.scale.detach(), self.zero_point.detach()
        row_groups = None
        if self.range_groups < self.groups:
            blocks = (scale.reshape(self.range_groups, -1), zero.reshape(self.range_groups, -1))
            if all(bool((b == b[:, :1]).all()) for b in blocks):
                scale, zero, row_groups = blocks[0][:, 0], blocks[1][:, 0], self.range_groups
        return scale, None if self.spec.symmetric else zero, row_groups

    @torch.no_grad()
    def set_permutation(self, permutation: torch.Tensor) -> None:
        """Range-based permutation: ``permutation[j]`` is the dimension placed at position ``j``."""
        if self.permutation is None:
            raise ValueError(f"{self.site}: only per-embedding-group quantizers take a permutation")
        permutation = permutation.to(self.permutation.device).long()
        self.permutation.copy_(permutation)
        position = torch.empty_like(permutation)
        position[permutation] = torch.arange(len(permutation), device=permutation.device)
        self.dim_to_group.copy_(position * self.groups // self.channels)

    # data -------------------------------------------------------------------------------------
    def grouped(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` as a ``[groups, samples]`` matrix for the estimator, without positions masked out.

        ``valid`` is a boolean mask over ``x``'s leading dimensions (tokens) or over all of them.
        """
        x = _valid_positions(x.detach(), valid)
        if self.spec.granularity == "per_tensor":
            return x.reshape(1, -1)
        if self.spec.granularity == "per_channel":  # consecutive rows (channels) in range_groups groups
            if self.channel_dim == 0:
                return x.reshape(self.range_groups, -1)
            return x.reshape(-1, self.channels).t().reshape(self.range_groups, -1)
        rows = x.reshape(-1, self.channels)[:, self.permutation]
        return rows.reshape(rows.shape[0], self.groups, -1).transpose(0, 1).reshape(self.groups, -1)

    def observe(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Feed ``x`` (valid positions only) to the range estimator."""
        self.estimator.update(self.grouped(x, valid))
        if self.track_dimensions and self.channels is not None and self.channel_dim == -1:
            rows = _valid_positions(x.detach(), valid).reshape(-1, self.channels).float()
            if rows.shape[0]:
                lo, hi = rows.amin(dim=0), rows.amax(dim=0)
                self.dim_lo = lo if self.dim_lo is None else torch.minimum(self.dim_lo, lo)
                self.dim_hi = hi if self.dim_hi is None else torch.maximum(self.dim_hi, hi)
                statistic, momentum = self.dimension_ranges
                if statistic == "all":
                    self.dim_width = self.dim_hi - self.dim_lo
                elif statistic == "last" or self.dim_width is None:
                    self.dim_width = hi - lo
                else:
                    self.dim_width = momentum * self.dim_width + (1 - momentum) * (hi - lo)

    def restart_estimation(self) -> None:
        """Forget the estimator's statistics and the per-dimension extremes (after a permutation pass)."""
        self.estimator.reset()
        self.track_dimensions = False
        self.dim_lo = self.dim_hi = self.dim_width = None

    def range_permutation(self) -> torch.Tensor:
        """Dimensions sorted by their observed range ``max - min`` (ascending, stable; the range as
        :attr:`dimension_ranges` says): the permutation of Bondarenko et al. sec. 4, which puts the
        outlier dimensions in the last group."""
        if self.dim_width is None:
            raise RuntimeError(f"{self.site}: no per-dimension ranges were observed")
        return torch.argsort(self.dim_width, stable=True)

    def _broadcast(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.spec.granularity == "per_tensor":
            return values
        if self.spec.granularity == "per_embedding_group":
            return values[self.dim_to_group]
        if self.channel_dim == 0:
            return values.view(-1, *([1] * (x.dim() - 1)))
        return values

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the current scale and zero point (in float32, cast back).
        While ``torch.onnx.export`` traces, the same grid as ONNX QuantizeLinear -> DequantizeLinear."""
        if torch.onnx.is_in_onnx_export():
            return self._onnx_quantize(x)
        # learned: the scale clamped to EPS, the zero point rounded (straight-through) and clamped to the grid
        return fake_quantize(x, self._broadcast(self.scale, x).float(), self._broadcast(self.zero_point, x).float(),
                             self.qmin, self.qmax, clipped_ste=self.spec.ste == "clipped", out_dtype=self._out_dtype(x),
                             learned=self.state == "learn")

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype a fake-quantized ``x`` leaves in: the autocast dtype for a linear layer's weight under
        autocast (see ``autocast_output``), else ``x``'s own (None)."""
        device = x.device.type
        return torch.get_autocast_dtype(device) if self.autocast_output and torch.is_autocast_enabled(device) else None

    def permutes(self) -> bool:
        """Whether the permutation moves any dimension (False without one, or for the identity)."""
        if self.permutation is None:
            return False
        return not torch.equal(self.permutation, torch.arange(len(self.permutation), device=self.permutation.device))

    def onnx_ready(self) -> None:
        """Facts the ONNX trace needs as Python values (it cannot branch on tensor data)."""
        self.__dict__["_identity_permutation"] = not self.permutes()

    def _onnx_quantize(self, x: torch.Tensor) -> torch.Tensor:
        from qbert.quant.onnx_ops import gather_last, quantize_dequantize

        scale, zero_point, axis = self.scale, self.zero_point, None
        if self.spec.granularity == "per_embedding_group" and self.groups <= 64:
            # K per-tensor QDQs on the groups' slices (in the permuted order), concatenated: the grid of one
            # per-axis QDQ, which onnxruntime runs ~90x slower than a per-tensor one (a [32, 128, 384] input)
            identity = self.__dict__.get("_identity_permutation", False)  # set before tracing: onnx_ready
            grouped = x if identity else gather_last(x, self.permutation)
            size = self.channels // self.groups
            parts = [quantize_dequantize(grouped[..., g * size:(g + 1) * size], scale[g], zero_point[g], self.qmin,
                                         self.qmax) for g in range(self.groups)]
            out = torch.cat(parts, dim=-1)
            return (out if identity else gather_last(out, torch.argsort(self.permutation))).to(x.dtype)
        if self.spec.granularity == "per_embedding_group":
            scale, zero_point, axis = scale[self.dim_to_group], zero_point[self.dim_to_group], x.dim() - 1
        elif self.spec.granularity == "per_channel":
            axis = 0 if self.channel_dim == 0 else x.dim() - 1
        return quantize_dequantize(x, scale, zero_point, self.qmin, self.qmax, axis).to(x.dtype)

    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer grid values of ``x`` under the current scale and zero point (float tensor of
        whole numbers in ``[qmin, qmax]``): what :meth:`quantize` de-quantizes."""
        return integer_codes(x.detach().float(), self._broadcast(self.scale.detach(), x).float(),
                             self._broadcast(self.zero_point.detach(), x).float(), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.state == "disabled":
            return x
        if self.state == "estimate":
            self.observe(x, valid)
            return x
        if self.state == "dynamic":
            return self.quantize_dynamic(x, valid)
        if self.state == "estimate_quantized" or (self.state == "estimate_train" and self.training):
            self.observe(x, valid)
            self.set_range(*self.estimator.range())
        out = self.quantize(x)
        if self.noise is not None and self.training and torch.is_grad_enabled():
            out = self._quant_noise(x, out)
        return out

    def _quant_noise(self, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """``quantized`` on a random ``p`` share of the blocks of ``x`` (drawn anew at every call), ``x`` elsewhere;
        the gradient of a quantized block is the quantizer's (straight-through), of the others the identity."""
        p, block = self.noise  # type: ignore[misc]
        if p >= 1:
            return quantized
        width = x.shape[-1]
        chosen = torch.rand((*x.shape[:-1], -(-width // block)), device=x.device) < p
        if block > 1:
            chosen = chosen.repeat_interleave(block, dim=-1)[..., :width]
        return torch.where(chosen, quantized, x.to(quantized.dtype))

    def quantize_dynamic(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` on the grid of its own per-group range (``valid`` positions; on a symmetric grid the
        scale is ``max |x| / qmax``), as dynamic quantization does at run time."""
        rows = self.grouped(x, valid).float()
        if rows.shape[1] == 0:  # nothing valid to range: the whole input
            rows = self.grouped(x).float()
        scale, zero_point = params_from_range(rows.amin(dim=1), rows.amax(dim=1), self.spec.bits, self.spec.symmetric)
        if self.range_groups != self.groups:  # group-wise rows: each row takes its group's range
            scale, zero_point = (t.repeat_interleave(self.groups // self.range_groups) for t in (scale, zero_point))
        return fake_quantize(x, self._broadcast(scale, x), self._broadcast(zero_point, x), self.qmin, self.qmax,
                             clipped_ste=self.spec.ste == "clipped", out_dtype=self._out_dtype(x))

    def extra_repr(self) -> str:
        lo, hi = self.quant_range()
        span = {"estimate": "unset", "dynamic": "per input"}.get(self.state,
                                                                  f"[{lo.min().item():.4g}, {hi.max().item():.4g}]")
        return (
            f"site={self.site!r}, {self.spec.describe()}, estimator={self.estimator.name}, "
            f"state={self.state}, range={span}"
        )


def _valid_positions(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The entries of ``x`` at valid positions: ``[n, channels]`` for a mask over the leading
    (token) dimensions, flat for a mask over every dimension, ``x`` itself without a mask."""
    if valid is None:
        return x
    if valid.dim() == x.dim():
        return x[valid.expand_as(x)]
    return x[valid.expand(x.shape[:-1])]
