"""Sites: stable dotted names for every tensor of an encoder (BERT, RoBERTa, DistilBERT) a recipe may quantize.

Activation sites, per layer ``i`` (13 per layer, in forward order)::

    layer.i.attn.query  .key  .value      outputs of the Q/K/V projections
    layer.i.attn.scores                   Q K^T (softmax input, before the 1/sqrt(d) scaling and the mask)
    layer.i.attn.probs                    softmax output
    layer.i.attn.context                  probabilities times values, heads concatenated
    layer.i.attn.output                   output projection of the attention block
    layer.i.attn.residual_sum             attention output + block input (LayerNorm input)
    layer.i.ffn.input                     attention LayerNorm output = FFN input
    layer.i.ffn.intermediate              first FFN linear after GELU
    layer.i.ffn.output                    second FFN linear
    layer.i.ffn.residual_sum              FFN output + FFN input (LayerNorm input)
    layer.i.ffn.norm                      FFN LayerNorm output = the layer's output

and ``embeddings.sum`` (word + position + token type), ``embeddings.output`` (after LayerNorm),
``pooler.output`` (the head's input vector: after BERT's pooler tanh, RoBERTa's head tanh, DistilBERT's
ReLU) and ``head.output`` (logits). Weight sites are the linear layers'
weights, named after the activation site they produce (``layer.i.ffn.output.weight``,
``pooler.output.weight``, ``head.output.weight``) and the embedding tables
(``embeddings.word.weight``, ``embeddings.position.weight``, ``embeddings.token_type.weight``).
Biases, LayerNorm parameters, softmax, GELU and LayerNorm arithmetic stay in floating point.

Which module computes each site is data: one table per architecture in :mod:`qbert.architectures`, read
here for naming and instrumentation. Hooks, for transformers 5.x: a site the table taps at a module's output
uses a forward hook, one tapped at its input (residual sums: the LayerNorm's input) a forward pre-hook;
attention scores, probabilities and context use an attention function registered as ``"qbert"`` in
``ALL_ATTENTION_FUNCTIONS``; weights use ``torch.nn.utils.parametrize``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from qbert.architectures import bind
from qbert.errors import QbertError
from qbert.quant import functional
from qbert.quant.quantizer import Quantizer
from qbert.quant.spec import QuantSpec, SiteOverride

LAYER_FAMILIES = (
    "attn.query", "attn.key", "attn.value", "attn.scores", "attn.probs", "attn.context", "attn.output",
    "attn.residual_sum", "ffn.input", "ffn.intermediate", "ffn.output", "ffn.residual_sum", "ffn.norm",
)
"""Activation sites of one encoder layer, in forward order."""

LAYER_WEIGHTS = ("attn.query", "attn.key", "attn.value", "attn.output", "ffn.intermediate", "ffn.output")
"""Linear layers of one encoder layer (weight sites are these names plus ``.weight``)."""

LINEAR_INPUTS = ("embeddings.output", "attn.context", "ffn.input", "ffn.intermediate", "ffn.norm", "pooler.output")
"""Activation families that are the input of a linear layer: the embeddings output and each layer's output (the
next Q/K/V projections, the pooler, a QA head), the attention context (output projection), the FFN input and
the GELU output, the pooled output (the classifier)."""

PLACEMENTS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "gemm": (*LINEAR_INPUTS, "attn.query", "attn.key", "attn.value", "attn.probs"),
    "linear": LINEAR_INPUTS,
}
"""Which activations a recipe quantizes, by family (None: every site). ``all``: every activation, as Bondarenko
et al. simulate (LayerNorm outputs, residual sums, GELU, softmax, the embeddings sum). ``gemm``: the inputs of
every matrix multiplication, as deployment runtimes quantize (linear layers, and both attention matmuls: Q and
K for the scores, the probabilities and V for the context); LayerNorm, GELU, softmax, the residual sums and the
embeddings sum stay in floating point. ``linear``: linear-layer inputs only (Q8BERT's placement); the attention
matmuls in floating point too."""

Layout = Literal["tokens", "attention", "vector", "weight"]


@dataclass(frozen=True)
class Site:
    """One quantizable tensor."""

    name: str
    kind: Literal["activation", "weight"]
    family: str
    """The name without its ``layer.i.`` prefix, e.g. ``ffn.residual_sum``."""
    layer: int | None
    channels: int | None
    """Size of the dimension per-channel / per-embedding-group granularity splits (None: none)."""
    layout: Layout


def enumerate_sites(model: nn.Module) -> list[Site]:
    """Every activation and weight site of ``model`` in forward order (works on the meta device); the model's
    architecture table (:mod:`qbert.architectures`) says where each one is."""
    bound = bind(model)
    hidden, inter = bound.sizes()
    sites: list[Site] = []

    def act(name: str, family: str, layer: int | None, channels: int | None, layout: Layout) -> None:
        sites.append(Site(name, "activation", family, layer, channels, layout))

    def weight(name: str, family: str, layer: int | None, rows: int) -> None:
        sites.append(Site(name, "weight", family, layer, rows, "weight"))

    emb = bound.embeddings
    for table, path in bound.arch.tables.items():
        weight(f"embeddings.{table}.weight", f"embeddings.{table}.weight", None, getattr(emb, path).num_embeddings)
    act("embeddings.sum", "embeddings.sum", None, hidden, "tokens")
    act("embeddings.output", "embeddings.output", None, hidden, "tokens")
    for i, _ in enumerate(bound.layers):
        for family in LAYER_WEIGHTS:
            rows = inter if family == "ffn.intermediate" else hidden
            weight(f"layer.{i}.{family}.weight", f"{family}.weight", i, rows)
        for family in LAYER_FAMILIES:
            channels = {"attn.scores": None, "attn.probs": None, "ffn.intermediate": inter}.get(family, hidden)
            layout: Layout = "attention" if family in ("attn.scores", "attn.probs") else "tokens"
            act(f"layer.{i}.{family}", family, i, channels, layout)
    pooler, head = bound.pooler(), bound.head_output()
    if pooler is not None:
        weight("pooler.output.weight", "pooler.output.weight", None, pooler.out_features)
        act("pooler.output", "pooler.output", None, pooler.out_features, "vector")
    if head is not None:
        weight("head.output.weight", "head.output.weight", None, head.out_features)
        act("head.output", "head.output", None, head.out_features, "vector")
    # weights are listed with the layer they belong to; keep activations in forward order
    return sites


# plans -----------------------------------------------------------------------------------------
def pattern_matches(pattern: str, site: Site) -> bool:
    """Glob match on the site name; a pattern without ``layer.i.`` also matches every layer's site."""
    return fnmatch.fnmatchcase(site.name, pattern) or (
        site.layer is not None and fnmatch.fnmatchcase(site.name, f"layer.*.{pattern}")
    )


class PlanError(QbertError):
    """A site rule that cannot be applied; ``key`` is the config key to point at."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message, key=key)


def matching_sites(sites: list[Site], pattern: str, key: str) -> list[Site]:
    """The sites a rule's pattern matches; a pattern that matches none is a PlanError at ``key``."""
    matched = [s for s in sites if pattern_matches(pattern, s)]
    if not matched:
        raise PlanError(f"{pattern!r} matches no site of this model; `qbert inspect sites CONFIG` lists them", key)
    return matched


@dataclass
class SitePlan:
    """The resolved plan: a spec (or None = floating point) per site."""

    sites: list[Site]
    specs: dict[str, QuantSpec | None]
    permutation_sources: dict[str, str] = field(default_factory=dict)
    """PEG sites sharing the permutation of another site (target -> source)."""

    def quantized(self, kind: str | None = None) -> list[Site]:
        return [s for s in self.sites if self.specs[s.name] is not None and (kind is None or s.kind == kind)]

    def totals(self) -> dict[str, Any]:
        """Counts per kind: quantized, floating point, and per bit width."""
        out: dict[str, Any] = {}
        for kind in ("activation", "weight"):
            sites = [s for s in self.sites if s.kind == kind]
            quantized = [s for s in sites if self.specs[s.name] is not None]
            by_bits: dict[int, int] = {}
            for s in quantized:
                bits = self.specs[s.name].bits  # type: ignore[union-attr]
                by_bits[bits] = by_bits.get(bits, 0) + 1
            out[kind] = {"sites": len(sites), "quantized": len(quantized), "fp": len(sites) - len(quantized),
                         "by_bits": dict(sorted(by_bits.items()))}
        return out


def resolve_plan(
    sites: list[Site], *, weights: QuantSpec | None, activations: QuantSpec | None,
    weight_base: QuantSpec, activation_base: QuantSpec,
    rules: Iterable[tuple[str, SiteOverride | None, str]] = (),
) -> SitePlan:
    """Start from the per-kind defaults, then apply ``(pattern, override or None, config key)`` rules
    in order; a later rule wins. ``*_base`` is what an override builds on for a site whose kind is
    off by default (e.g. a weight-only recipe that quantizes one activation)."""
    specs: dict[str, QuantSpec | None] = {s.name: weights if s.kind == "weight" else activations for s in sites}
    for pattern, override, key in rules:
        for s in matching_sites(sites, pattern, key):
            if override is None:
                specs[s.name] = None
                continue
            base = specs[s.name] or (weight_base if s.kind == "weight" else activation_base)
            try:
                specs[s.name] = override.apply(base)
            except ValueError as exc:
                raise PlanError(f"{s.name}: {_first_error(exc)}", key) from None
    for s in sites:
        spec = specs[s.name]
        if spec is None:
            continue
        if spec.granularity != "per_tensor" and s.channels is None:
            raise PlanError(f"{s.name} has no channel dimension for {spec.granularity}", "recipe")
        if spec.granularity == "per_channel" and s.kind != "weight":
            raise PlanError(f"{s.name}: per_channel is for weights; activations use per_embedding_group",
                            "recipe")
        if spec.granularity == "per_channel" and spec.groups and s.channels % spec.groups:  # type: ignore[operator]
            raise PlanError(f"{s.name}: {spec.groups} groups do not divide its {s.channels} output rows; pick a "
                            "divisor", "recipe.groups")
        if spec.granularity == "per_embedding_group":
            if s.kind != "activation":
                raise PlanError(f"{s.name}: per_embedding_group is for activations", "recipe")
            if spec.groups and s.channels % spec.groups:  # type: ignore[operator]
                raise PlanError(
                    f"{s.name}: {spec.groups} groups do not divide its {s.channels} dimensions", "recipe.groups"
                )
    return SitePlan(sites, specs)


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in errors())
    return str(exc)


# instrumentation --------------------------------------------------------------------------------
class _TokenMask:
    """The attention mask of the forward pass in flight, so statistics can skip padding."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.observe_padding = False
        """When set, statistics see every position, padding included (``calibrate.padding``)."""

    def tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.mask
        if mask is None or self.observe_padding or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        return mask

    def attention(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.mask
        if (mask is None or self.observe_padding or x.dim() != 4 or x.shape[0] != mask.shape[0]
                or x.shape[-1] != mask.shape[-1]):
            return None
        return mask[:, None, :, None] & mask[:, None, None, :]


@dataclass
class _AttentionQuantizers:
    scores: Quantizer | None
    probs: Quantizer | None
    context: Quantizer | None
    mask: _TokenMask


def qbert_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's eager attention with quantizers on scores, probabilities and context."""
    quant: _AttentionQuantizers | None = module.__dict__.get("_qbert_attention")
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3))
    if quant is not None and quant.scores is not None:
        scores = quant.scores(scores, quant.mask.attention(scores))
    scores = scores * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    if quant is not None and quant.probs is not None:
        probs = quant.probs(probs, quant.mask.attention(probs))
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(probs, value).transpose(1, 2).contiguous()
    if quant is not None and quant.context is not None:
        batch, length = context.shape[:2]
        flat = context.reshape(batch, length, -1)
        context = quant.context(flat, quant.mask.tokens(flat)).view_as(context)
    return context, probs


_REGISTERED = False


def _register_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("qbert", qbert_attention)
    AttentionMaskInterface.register("qbert", eager_mask)
    _REGISTERED = True


@dataclass
class Instrumented:
    """A model with quantizers in place: the plan, the quantizers by site, and the hook handles."""

    model: nn.Module
    plan: SitePlan
    quantizers: dict[str, Quantizer]
    handles: list[Any] = field(default_factory=list)
    weight_tensors: dict[str, nn.Parameter] = field(default_factory=dict)
    """The floating-point weight behind each weight quantizer."""
    integer_biases: dict[str, str] = field(default_factory=dict)
    """Linear layers whose bias was rounded to int32 (weight site -> its input's activation site)."""
    token_mask: _TokenMask = field(default_factory=_TokenMask)
    """The attention mask of the forward pass in flight, which statistics use to skip padding."""

    def activations(self) -> dict[str, Quantizer]:
        return {n: q for n, q in self.quantizers.items() if not n.endswith(".weight")}

    def weights(self) -> dict[str, Quantizer]:
        return {n: q for n, q in self.quantizers.items() if n.endswith(".weight")}

    def set_state(self, state: str, kind: str | None = None) -> None:
        chosen = self.quantizers if kind is None else (self.weights() if kind == "weight" else self.activations())
        for q in chosen.values():
            q.set_state(state)  # type: ignore[arg-type]


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The module holding each weight site's ``weight`` (embedding tables, linears, pooler, head)."""
    return bind(model).weight_modules()


def linear_inputs(model: nn.Module) -> dict[str, str]:
    """For each linear layer's weight site, the activation site that is its input: ``{weight site:
    input site}`` (Q8BERT quantizes the inputs of the fully connected layers; bias scales follow them)."""
    return bind(model).linear_inputs()


def _lookup_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    quantizer = self.__dict__["_qbert_rows"]
    if (torch.is_grad_enabled() and quantizer.state in ("fixed", "learn") and self.max_norm is None
            and not functional.REFERENCE["on"]):
        rows = nn.functional.embedding(input, self.parametrizations.weight.original, self.padding_idx, None,
                                       self.norm_type, self.scale_grad_by_freq, self.sparse)
        return quantizer(rows)
    return nn.Embedding.forward(self, input)


def _quantize_looked_up_rows(module: nn.Embedding, quantizer: Quantizer) -> None:
    """Training with a fixed or learned per-tensor grid: fake-quantize only the rows a batch looks up, not the
    whole table (30522 x 768 for BERT-base) at every step. Elementwise with one scale, so the rows are the same
    numbers and the table's gradient the same; the learned scale's gradient sums the same terms, without the
    table's zeros (in another order). Estimating states, evaluation and calibration (no gradient) go through
    the parametrized table as before."""
    module.__dict__["_qbert_rows"] = quantizer
    # parametrize gave this module a class of its own (Parametrized<...>, rolled back when the parametrization is
    # removed): the lookup goes there, so removing the parametrization also removes it
    type(module).forward = _lookup_forward


def instrument(
    model: nn.Module, plan: SitePlan, make_quantizer: Callable[[Site, QuantSpec], Quantizer]
) -> Instrumented:
    """Put a quantizer on every site of ``plan`` that has a spec; returns the handle.

    Activation quantizers are registered under ``model.qbert_quantizers`` (state-dict keys use ``/``
    for the site's dots); weight quantizers live in the weights' parametrizations.
    """
    bound = bind(model)
    _register_attention()
    mask = _TokenMask()
    quantizers: dict[str, Quantizer] = {}
    for site in plan.sites:
        spec = plan.specs[site.name]
        if spec is not None:
            quantizers[site.name] = make_quantizer(site, spec)
    container = nn.Module()
    for name, q in quantizers.items():
        if not name.endswith(".weight"):
            container.add_module(name.replace(".", "/"), q)
    model.qbert_quantizers = container
    inst = Instrumented(model, plan, quantizers, token_mask=mask)

    def capture_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        attention_mask = kwargs.get("attention_mask")
        mask.mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None

    inst.handles.append(model.register_forward_pre_hook(capture_mask, with_kwargs=True))

    def on_output(module: nn.Module, site: str) -> None:
        q = quantizers.get(site)
        if q is not None:
            inst.handles.append(module.register_forward_hook(lambda _m, _a, out: q(out, mask.tokens(out))))

    def on_input(module: nn.Module, site: str) -> None:
        q = quantizers.get(site)
        if q is not None:
            inst.handles.append(module.register_forward_pre_hook(
                lambda _m, args: (q(args[0], mask.tokens(args[0])), *args[1:])
            ))

    for site, module in bound.weight_modules().items():
        q = quantizers.get(site)
        if q is not None:
            parametrize.register_parametrization(module, "weight", q, unsafe=True)
            inst.weight_tensors[site] = module.parametrizations.weight.original
            q.autocast_output = isinstance(module, nn.Linear)
            if isinstance(module, nn.Embedding) and q.spec.granularity == "per_tensor":
                _quantize_looked_up_rows(module, q)

    norm = bound.embeddings_norm()
    on_input(norm, "embeddings.sum")
    on_output(norm, "embeddings.output")
    for i, _ in enumerate(bound.layers):
        for family in bound.arch.taps:
            module, at = bound.tap(i, family)
            (on_output if at == "output" else on_input)(module, f"layer.{i}.{family}")
        bound.layer_module(i, bound.arch.attention).__dict__["_qbert_attention"] = _AttentionQuantizers(
            quantizers.get(f"layer.{i}.attn.scores"), quantizers.get(f"layer.{i}.attn.probs"),
            quantizers.get(f"layer.{i}.attn.context"), mask,
        )
    head = bound.head
    if head is not None and head.pooler_output is not None:
        tap = head.pooler_output
        (on_output if tap.at == "output" else on_input)(bound.module(tap.module), "pooler.output")
    if head is not None:
        on_output(bound.head_output(), "head.output")
    _set_attention_implementation(model, "qbert")
    return inst


def _set_attention_implementation(model: nn.Module, name: str) -> None:
    config = model.config
    config._attn_implementation = name
    for sub in model.modules():
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and sub_config is not config:
            sub_config._attn_implementation = name
