"""Architectures as data: where every quantization site of an encoder lives, one table per architecture.

Site names are the same for every architecture (``layer.3.ffn.residual_sum``, ``pooler.output``, see
:mod:`qbert.quant.sites`); a table says which module of a transformers model computes each of them. Site
naming, instrumentation, integer conversion, ONNX export, the outlier inspection and the tiny test models all
read these tables, so adding an architecture is one table here (and nothing else) when its encoder layer is
a post-LayerNorm BERT block that calls transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``):

1. the embedding tables and the embeddings' LayerNorm (whose input is ``embeddings.sum``);
2. the module list of encoder layers, and in each layer the six linear layers, the module that calls the
   attention function (scores, probabilities and context are quantized there), and a :class:`Tap` per
   activation site (a module's output, or its first input: a residual sum is the input of its LayerNorm);
3. per task-model class, the head: the optional pooler linear and where its output is tapped, and the output
   linear;
4. the model inputs the architecture takes, and a tiny config for the ``tiny-random-<name>`` alias.

:func:`bind` checks a model against its table: an unknown ``model_type``, a task-model class the table has
no head for, a path that is missing or not the module kind the table says, and any linear layer or
embedding table no site covers are :class:`UnsupportedModel` errors naming what was found, never fewer
sites. Nothing here imports torch at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from qbert.errors import QbertError

LAYER_INPUT = "<layer input>"
"""In :attr:`Architecture.linear_inputs`: the encoder layer's input (the previous layer's ``ffn.norm``, or
``embeddings.output`` for layer 0)."""


@dataclass(frozen=True)
class Tap:
    """Where an activation site is observed: the output of ``module`` or its first input (a dotted path)."""

    module: str
    at: Literal["output", "input"] = "output"


def out(module: str) -> Tap:
    """The output of ``module``."""
    return Tap(module, "output")


def into(module: str) -> Tap:
    """The first input of ``module`` (a residual sum is the input of the LayerNorm after it)."""
    return Tap(module, "input")


@dataclass(frozen=True)
class Head:
    """A task head, as paths from the task model: ``pooler`` (a linear on the first token, or None),
    ``pooler_output`` (where the ``pooler.output`` site is tapped: after its activation, which is the input
    of ``output``), and ``output`` (the linear producing the logits: ``head.output``)."""

    output: str
    pooler: str | None = None
    pooler_output: Tap | None = None


@dataclass(frozen=True)
class Architecture:
    """Where a post-LayerNorm encoder computes qbert's sites (paths are dotted attribute names)."""

    name: str
    model_types: tuple[str, ...]
    """``config.model_type`` values this table describes."""
    embeddings: str
    """Path of the embeddings module from the base model."""
    tables: dict[str, str]
    """Embedding tables by site name (``word`` -> ``embeddings.word.weight``), paths from ``embeddings``."""
    embeddings_norm: str
    """The embeddings' LayerNorm, from ``embeddings``: its input is ``embeddings.sum``, its output
    ``embeddings.output``."""
    layers: str
    """Path of the ``ModuleList`` of encoder layers from the base model."""
    linears: dict[str, str]
    """The six linear layers of an encoder layer by family, paths from the layer, in forward order."""
    attention: str
    """The module (from the layer) that calls the attention function with query, key and value."""
    taps: dict[str, Tap]
    """Every activation site of a layer except the attention function's (scores, probs, context)."""
    heads: dict[str, Head]
    """Task-model class name -> its head."""
    inputs: tuple[str, ...]
    """The tokenizer outputs the model takes."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """A 2-layer config (``<model_type>Config`` keyword arguments) for the ``tiny-random-<name>`` alias."""
    checkpoints: tuple[str, ...] = ()
    """Real checkpoints a user would point ``model:`` at (hub ids)."""
    linear_inputs: dict[str, str] = field(default_factory=lambda: dict(POST_LN_LINEAR_INPUTS))
    """Per linear family, the activation site (family) that is its input."""


POST_LN_LINEAR_INPUTS = {
    "attn.query": LAYER_INPUT, "attn.key": LAYER_INPUT, "attn.value": LAYER_INPUT,
    "attn.output": "attn.context", "ffn.intermediate": "ffn.input", "ffn.output": "ffn.intermediate",
}
"""A post-LayerNorm (BERT) block's dataflow: which quantized activation each linear layer reads."""

_BERT_LAYER_TAPS = {
    "attn.query": out("attention.self.query"),
    "attn.key": out("attention.self.key"),
    "attn.value": out("attention.self.value"),
    "attn.output": out("attention.output.dense"),
    "attn.residual_sum": into("attention.output.LayerNorm"),
    "ffn.input": out("attention.output.LayerNorm"),
    "ffn.intermediate": out("intermediate"),  # dense + GELU: quantized after the activation
    "ffn.output": out("output.dense"),
    "ffn.residual_sum": into("output.LayerNorm"),
    "ffn.norm": out("output.LayerNorm"),
}
_BERT_LINEARS = {
    "attn.query": "attention.self.query", "attn.key": "attention.self.key", "attn.value": "attention.self.value",
    "attn.output": "attention.output.dense", "ffn.intermediate": "intermediate.dense", "ffn.output": "output.dense",
}
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

BERT = Architecture(
    name="bert",
    model_types=("bert",),
    embeddings="embeddings",
    tables={"word": "word_embeddings", "position": "position_embeddings", "token_type": "token_type_embeddings"},
    embeddings_norm="LayerNorm",
    layers="encoder.layer",
    linears=_BERT_LINEARS,
    attention="attention.self",
    taps=_BERT_LAYER_TAPS,
    heads={
        # pooler: dense + tanh on [CLS]; the site is the pooler's output (after tanh)
        "BertForSequenceClassification": Head("classifier", "bert.pooler.dense", out("bert.pooler")),
        "BertForQuestionAnswering": Head("qa_outputs"),
    },
    inputs=("input_ids", "token_type_ids", "attention_mask"),
    tiny=dict(_TINY, max_position_embeddings=512, type_vocab_size=2),
    checkpoints=("bert-base-uncased", "bert-large-uncased", "minilm-l6 (all-MiniLM-L6-v2)"),
)

ROBERTA = replace(
    BERT,  # BERT's embeddings and encoder layers; another head, no token types
    name="roberta",
    model_types=("roberta",),
    heads={
        # RobertaClassificationHead: dense + tanh on <s>, then out_proj; the site is out_proj's input (after tanh)
        "RobertaForSequenceClassification": Head("classifier.out_proj", "classifier.dense",
                                                 into("classifier.out_proj")),
        "RobertaForQuestionAnswering": Head("qa_outputs"),
    },
    inputs=("input_ids", "attention_mask"),  # one token type: RoBERTa's tokenizers return no token_type_ids
    # position ids start after the padding index: two more positions than tokens
    tiny=dict(_TINY, max_position_embeddings=514, type_vocab_size=1, pad_token_id=0),
    checkpoints=("roberta-base", "roberta-large", "distilroberta-base"),
)

DISTILBERT = Architecture(
    name="distilbert",
    model_types=("distilbert",),
    embeddings="embeddings",
    tables={"word": "word_embeddings", "position": "position_embeddings"},
    embeddings_norm="LayerNorm",
    layers="transformer.layer",
    linears={
        "attn.query": "attention.q_lin", "attn.key": "attention.k_lin", "attn.value": "attention.v_lin",
        "attn.output": "attention.out_lin", "ffn.intermediate": "ffn.lin1", "ffn.output": "ffn.lin2",
    },
    attention="attention",
    taps={
        "attn.query": out("attention.q_lin"),
        "attn.key": out("attention.k_lin"),
        "attn.value": out("attention.v_lin"),
        "attn.output": out("attention.out_lin"),
        "attn.residual_sum": into("sa_layer_norm"),
        "ffn.input": out("sa_layer_norm"),
        "ffn.intermediate": out("ffn.activation"),  # lin1's output after GELU
        "ffn.output": out("ffn.lin2"),
        "ffn.residual_sum": into("output_layer_norm"),
        "ffn.norm": out("output_layer_norm"),
    },
    heads={
        # pre_classifier + ReLU on [CLS], then classifier; the site is classifier's input (after ReLU)
        "DistilBertForSequenceClassification": Head("classifier", "pre_classifier", into("classifier")),
        "DistilBertForQuestionAnswering": Head("qa_outputs"),
    },
    inputs=("input_ids", "attention_mask"),  # no token types
    tiny=dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=512, pad_token_id=0),
    checkpoints=("distilbert-base-uncased", "distilbert-base-uncased-finetuned-sst-2-english"),
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (BERT, ROBERTA, DISTILBERT)}
"""Every table, by name."""


class UnsupportedModel(QbertError):
    """The model is not an encoder whose layout a table of :mod:`qbert.architectures` describes."""

    def __init__(self, message: str) -> None:
        super().__init__(message, key="model")


def for_model_type(model_type: str | None) -> Architecture:
    """The table of a transformers ``config.model_type``; an :class:`UnsupportedModel` error if none."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise UnsupportedModel(f"model type {model_type!r} has no table in qbert/architectures.py (known: {known}); "
                           "README 'Adding an architecture' says how to add one")


def head_prefixes() -> tuple[str, ...]:
    """Parameter-name prefixes of every table's task heads (initialised on purpose when a pre-trained encoder
    gets a head)."""
    prefixes = {path.split(".")[0] + "." for a in ARCHITECTURES.values() for h in a.heads.values()
                for path in (h.output, h.pooler) if path and not path.startswith(a.name)}
    return tuple(sorted(prefixes))


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Bound:
    """An architecture table bound to one model's modules (see :func:`bind`)."""

    arch: Architecture
    model: Any
    base: Any
    layers: list[Any]
    head: Head | None

    def module(self, path: str, root: Any = None) -> Any:
        """The module at ``path`` from ``root`` (the task model by default)."""
        return _get(self.model if root is None else root, path)

    @property
    def embeddings(self) -> Any:
        return _get(self.base, self.arch.embeddings)

    def embeddings_norm(self) -> Any:
        return _get(self.embeddings, self.arch.embeddings_norm)

    def layer_module(self, i: int, path: str) -> Any:
        return _get(self.layers[i], path)

    def tap(self, i: int, family: str) -> tuple[Any, str]:
        """``(module, "output" | "input")`` of activation site ``family`` in layer ``i``."""
        tap = self.arch.taps[family]
        return self.layer_module(i, tap.module), tap.at

    def pooler(self) -> Any:
        return self.module(self.head.pooler) if self.head and self.head.pooler else None

    def head_output(self) -> Any:
        return self.module(self.head.output) if self.head else None

    def sizes(self) -> tuple[int, int]:
        """``(hidden, intermediate)`` from the first layer's linear layers."""
        first = self.layers[0]
        return (_get(first, self.arch.linears["attn.output"]).out_features,
                _get(first, self.arch.linears["ffn.intermediate"]).out_features)

    def weight_modules(self) -> dict[str, Any]:
        """The module holding each weight site's ``weight``, in forward order."""
        emb = self.embeddings
        modules = {f"embeddings.{name}.weight": _get(emb, path) for name, path in self.arch.tables.items()}
        for i, layer in enumerate(self.layers):
            modules.update({f"layer.{i}.{family}.weight": _get(layer, path)
                            for family, path in self.arch.linears.items()})
        if self.pooler() is not None:
            modules["pooler.output.weight"] = self.pooler()
        if self.head_output() is not None:
            modules["head.output.weight"] = self.head_output()
        return modules

    def linear_inputs(self) -> dict[str, str]:
        """For each linear layer's weight site, the activation site that is its input."""
        inputs: dict[str, str] = {}
        previous = "embeddings.output"
        for i, _ in enumerate(self.layers):
            for family, source in self.arch.linear_inputs.items():
                inputs[f"layer.{i}.{family}.weight"] = previous if source == LAYER_INPUT else f"layer.{i}.{source}"
            previous = f"layer.{i}.ffn.norm"
        if self.pooler() is not None:
            inputs["pooler.output.weight"] = previous
            previous = "pooler.output"
        if self.head_output() is not None:
            inputs["head.output.weight"] = previous
        return inputs


def bind(model: Any) -> Bound:
    """Check ``model`` against its architecture's table and return the bound table; every mismatch is an
    :class:`UnsupportedModel` error naming what was found."""
    from torch import nn

    cls = type(model).__name__
    config = getattr(model, "config", None)
    arch = for_model_type(getattr(config, "model_type", None))
    base = getattr(model, "base_model", model)
    problems: list[str] = []

    def need(root: Any, path: str, kind: type | tuple[type, ...], where: str) -> Any:
        found = _get(root, path)
        if not isinstance(found, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            what = "nothing" if found is None else type(found).__name__
            problems.append(f"{where}{path} is {what}, the {arch.name} table expects {names}")
        return found

    embeddings = need(base, arch.embeddings, nn.Module, "")
    layers = need(base, arch.layers, nn.ModuleList, "")
    if embeddings is not None:
        for path in arch.tables.values():
            need(embeddings, path, nn.Embedding, f"{arch.embeddings}.")
        need(embeddings, arch.embeddings_norm, nn.LayerNorm, f"{arch.embeddings}.")
    head = None if model is base else arch.heads.get(cls)  # a bare encoder has no head
    if head is None and model is not base:
        raise UnsupportedModel(f"{cls} is a {arch.name} model whose head qbert/architectures.py does not describe "
                               f"(known heads: {', '.join(arch.heads)})")
    if problems:
        raise UnsupportedModel(f"{cls} does not have the {arch.name} layout: " + "; ".join(problems))
    if isinstance(layers, nn.ModuleList) and len(layers) == 0:
        raise UnsupportedModel(f"{cls} has no encoder layers ({arch.layers} is empty)")
    for i, layer in enumerate(layers or []):
        if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False):
            problems.append(f"layer {i} is a decoder layer (cross-attention)")
        for path in arch.linears.values():
            need(layer, path, nn.Linear, f"{arch.layers}.{i}.")
        need(layer, arch.attention, nn.Module, f"{arch.layers}.{i}.")
        for tap in arch.taps.values():
            need(layer, tap.module, nn.Module, f"{arch.layers}.{i}.")
    if head is not None:
        need(model, head.output, nn.Linear, "")
        if head.pooler:
            need(model, head.pooler, nn.Linear, "")
            need(model, head.pooler_output.module, nn.Module, "")  # type: ignore[union-attr]
    if problems:
        raise UnsupportedModel(f"{cls} does not have the {arch.name} layout: " + "; ".join(problems[:4])
                               + (f" and {len(problems) - 4} more" if len(problems) > 4 else ""))
    bound = Bound(arch, model, base, list(layers), head)
    covered = {id(m) for m in bound.weight_modules().values()}
    uncovered = [name for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in covered]
    if uncovered:
        raise UnsupportedModel(
            f"{cls}: {len(uncovered)} linear/embedding layer(s) are not in the {arch.name} table, so they would go "
            f"unquantized without a word: {', '.join(uncovered[:4])}{' ...' if len(uncovered) > 4 else ''}; "
            "describe them in qbert/architectures.py")
    return bound
