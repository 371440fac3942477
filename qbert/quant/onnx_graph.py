"""Graph passes that turn the traced ONNX export into the file a runtime deploys, without changing a
quantized value.

``torch.onnx.export`` writes what the model computes while it traces: integer weight codes cast and
offset at every run, float embedding tables quantized after each lookup, a second ``Q -> DQ`` of the same
grid in front of every integer GEMM whose input site already quantized (the site's quantizer, then the
GEMM's own), per-node stack traces. :func:`deployable` rewrites that into:

- every weight stored once, as its integer codes (uint8/int8 initializers behind a ``DequantizeLinear``),
  embedding tables included (the lookup gathers codes), linear weights already transposed;
- one ``QuantizeLinear`` per activation grid: a ``Q -> DQ`` whose input is already on that same grid is
  dropped (re-quantizing a value on its own grid returns it), identical ones reading the same tensor merged;
- the float parts fused as onnxruntime's transformer optimizer fuses BERT (LayerNorm and SkipLayerNorm,
  bias + Gelu, Attention / EmbedLayerNorm where their inputs stay float): which fusions apply depends on the
  placement (``all`` quantizes the residual sums and LayerNorm outputs, so little fuses there).

The integer GEMMs themselves (``DQ -> MatMul`` with a quantized input) are fused by onnxruntime when it
loads the file, for the CPU it runs on; a file stays portable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ELEMENTWISE_BOUNDS = ("Min", "Max", "Clip")
_NO_FOLD = ("QuantizeLinear", "DequantizeLinear", "ConstantOfShape", "Expand", "Tile", "Range", "RandomNormal",
            "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial")
_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


def deployable(proto: Any, *, num_heads: int, hidden_size: int, fuse: bool = True) -> dict[str, Any]:
    """Rewrite ``proto`` (an exported model) in place as described in the module docstring. Returns what
    each pass did (counts, and the operators the fusion wrote)."""
    for node in proto.graph.node:
        del node.metadata_props[:]  # the exporter's stack traces: kilobytes per node, no runtime meaning
    facts: dict[str, Any] = {"constants_folded": fold_constants(proto)}
    facts["weights_folded"] = fold_weight_quantization(proto)
    facts["tables_folded"] = fold_gathered_weights(proto)
    facts["transposes_folded"] = fold_weight_transposes(proto)
    facts["requantizations_dropped"] = drop_requantization(proto)
    prune(proto)
    own_zero_points(proto)
    if fuse:
        facts["fused"] = fuse_transformer(proto, num_heads=num_heads, hidden_size=hidden_size)
    return facts


# -- small helpers ------------------------------------------------------------------------------------------

def _initializers(graph: Any) -> dict[str, Any]:
    return {i.name: i for i in graph.initializer}


def _readers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                found.setdefault(name, []).append(node)
    return found


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _array(inits: dict[str, Any], name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name])


def _set_initializer(graph: Any, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            graph.initializer.remove(init)
            break
    graph.initializer.append(numpy_helper.from_array(value, name))


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _rename_input(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:  # a graph output keeps its name: feed it through an Identity
            from onnx import helper

            graph.node.append(helper.make_node("Identity", [new], [old]))


def prune(proto: Any) -> None:
    """Remove nodes whose outputs nobody reads and initializers no node reads."""
    graph = proto.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(n for n in node.input if n)
    kept = {id(n) for n in keep}
    for node in list(graph.node):
        if id(node) not in kept:
            graph.node.remove(node)
    for init in list(graph.initializer):
        if init.name not in needed:
            graph.initializer.remove(init)


# -- the passes ---------------------------------------------------------------------------------------------

def fold_constants(proto: Any) -> int:
    """Evaluate every node whose inputs are all initializers (onnx's reference evaluator) into initializers,
    except quantize/dequantize nodes (the passes below fold those as qbert computes them) and nodes that
    only expand a shape. Returns how many."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    inits = _initializers(graph)
    folded = 0
    for node in list(graph.node):
        if node.op_type in _NO_FOLD or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        if not all(name == "" or name in inits for name in node.input):
            continue
        feeds = {name: _array(inits, name) for name in node.input if name}
        outputs = ReferenceEvaluator(node).run(None, feeds)
        for name, value in zip(node.output, outputs, strict=True):
            _set_initializer(graph, name, np.asarray(value))
            inits[name] = graph.initializer[-1]
        graph.node.remove(node)
        folded += 1
    prune(proto)
    return folded


def _codes(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """What ``QuantizeLinear(x, scale, zero_point, axis)`` returns, computed as qbert computes it."""
    import torch

    from qbert.quant.functional import integer_codes

    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    codes = integer_codes(tensor(x), tensor(scale), tensor(zero_point), int(info.min), int(info.max))
    return codes.numpy().astype(zero_point.dtype)


def _dequantized(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """What ``DequantizeLinear(codes, scale, zero_point, axis)`` returns (float32)."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    diff = codes.astype(np.float32) - zero_point.astype(np.float32)
    return (diff * scale.astype(np.float32)).astype(np.float32)


def fold_weight_quantization(proto: Any) -> int:
    """Fold every ``QuantizeLinear`` of a constant (a weight) offline, computed as qbert computes it
    (:func:`qbert.quant.functional.integer_codes`). Returns how many.

    A weight read by a Gather (an embedding table) becomes its integer codes behind the
    ``DequantizeLinear``. A weight multiplied with a floating-point input (a weight-only quantized GEMM)
    becomes its de-quantized float values, which are exactly on its grid: onnxruntime fuses
    ``DequantizeLinear(int8) -> MatMul`` into MatMulNBits, which at its default accuracy level quantizes
    the input to int8 on the fly, a different model from the one evaluated."""
    graph = proto.graph
    inits = _initializers(graph)
    readers = _readers(graph)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not all(n in inits for n in node.input[:3]):
            continue
        x, scale, zp = (_array(inits, n) for n in node.input[:3])
        axis = _attribute(node, "axis", 1)
        codes = _codes(x, scale, zp, axis)
        dequantizers = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
        consumers = _compute_readers([d.output[0] for d in dequantizers], readers)
        if dequantizers and consumers and all(c.op_type in ("MatMul", "Gemm") for c in consumers):
            values = _dequantized(codes, scale, zp, axis)  # what the DequantizeLinear computes
            for d in dequantizers:
                _set_initializer(graph, d.output[0], values)
                graph.node.remove(d)
        else:
            _set_initializer(graph, node.output[0], codes)
        graph.node.remove(node)
        folded += 1
    prune(proto)
    return folded


def _compute_readers(names: list[str], readers: dict[str, list[Any]]) -> list[Any]:
    """The nodes that compute with the tensors ``names``, looking through layout-only nodes."""
    found, todo = [], list(names)
    while todo:
        for node in readers.get(todo.pop(), []):
            if node.op_type in _LAYOUT_OPS:
                todo.append(node.output[0])
            else:
                found.append(node)
    return found


def _bounds_chain(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> tuple[str, list[Any]]:
    """Walk back from ``name`` through Min / Max / Clip nodes whose bounds are constants: (the tensor they
    clamp, the nodes from input to output)."""
    chain: list[Any] = []
    node = producers.get(name)
    while node is not None and node.op_type in _ELEMENTWISE_BOUNDS and all(n in inits for n in node.input[1:] if n):
        chain.insert(0, node)
        name = node.input[0]
        node = producers.get(name)
    return name, chain


def _apply_bounds(x: np.ndarray, chain: list[Any], inits: dict[str, Any]) -> np.ndarray:
    for node in chain:
        bounds = [_array(inits, n) if n else None for n in node.input[1:]]
        if node.op_type == "Min":
            x = np.minimum(x, bounds[0])
        elif node.op_type == "Max":
            x = np.maximum(x, bounds[0])
        else:
            lo = bounds[0] if bounds and bounds[0] is not None else -np.inf
            hi = bounds[1] if len(bounds) > 1 and bounds[1] is not None else np.inf
            x = np.clip(x, lo, hi)
    return x.astype(np.float32)


def fold_gathered_weights(proto: Any) -> int:
    """``Gather(table, ids) -> [clamp] -> QuantizeLinear`` (a quantized embedding lookup, per tensor or per
    embedding dimension) becomes ``Gather(codes, ids)``: the table stored as its integer codes, the lookup
    and the ``DequantizeLinear`` after it unchanged. Exact: quantization is elementwise, so it commutes with
    the row lookup. Returns how many tables."""
    graph = proto.graph
    inits, producers, readers = _initializers(graph), _producers(graph), _readers(graph)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or not all(n in inits for n in node.input[1:3]):
            continue
        source, chain = _bounds_chain(node.input[0], producers, inits)
        gather = producers.get(source)
        if gather is None or gather.op_type != "Gather" or gather.input[0] not in inits:
            continue
        if _attribute(gather, "axis", 0) != 0 or len(readers.get(source, [])) != 1:
            continue
        table = _array(inits, gather.input[0])
        scale, zp = _array(inits, node.input[1]), _array(inits, node.input[2])
        axis = _attribute(node, "axis", 1)
        if scale.size > 1:  # per axis: the lookup adds the ids' dimensions in front of the table's others
            rank_out = table.ndim - 1 + _rank_of_ids(gather, graph)
            axis = axis % rank_out - (rank_out - table.ndim)
            if axis < 1:
                continue  # along the gathered axis: not a property of the table
        if any(len(readers.get(n.output[0], [])) != 1 for n in chain):
            continue
        codes = _codes(_apply_bounds(table, chain, inits), scale, zp, axis)
        name = gather.input[0] + "_codes"
        _set_initializer(graph, name, codes)
        gather.input[0] = name
        gather.output[0] = node.output[0]
        graph.node.remove(node)
        for n in chain:
            graph.node.remove(n)
        producers, readers = _producers(graph), _readers(graph)
        folded += 1
    prune(proto)
    return folded


def _rank_of_ids(gather: Any, graph: Any) -> int:
    for value in list(graph.input) + list(graph.value_info):
        if value.name == gather.input[1]:
            return len(value.type.tensor_type.shape.dim)
    return 2  # token ids: [batch, sequence]


def fold_weight_transposes(proto: Any) -> int:
    """``DequantizeLinear(codes) -> Transpose`` of a 2-D weight becomes ``DequantizeLinear(codes transposed)``
    (the per-row scale's axis moved with it), the layout the GEMM fusions read. Returns how many."""
    graph = proto.graph
    inits, producers, readers = _initializers(graph), _producers(graph), _readers(graph)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose":
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(n in inits for n in dq.input[:3]):
            continue
        codes = _array(inits, dq.input[0])
        if codes.ndim != 2 or list(_attribute(node, "perm", [1, 0])) != [1, 0] or len(readers[dq.output[0]]) != 1:
            continue
        name = dq.input[0] + "_t"
        _set_initializer(graph, name, np.ascontiguousarray(codes.T))
        dq.input[0] = name
        if _array(inits, dq.input[1]).size > 1:
            axis = _attribute(dq, "axis", 1) % 2
            for attr in dq.attribute:
                if attr.name == "axis":
                    dq.attribute.remove(attr)
            from onnx import helper

            dq.attribute.append(helper.make_attribute("axis", 1 - axis))
        dq.output[0] = node.output[0]
        graph.node.remove(node)
        producers, readers = _producers(graph), _readers(graph)
        folded += 1
    prune(proto)
    return folded


def _grid(node: Any, inits: dict[str, Any]) -> tuple[Any, ...] | None:
    """A quantize/dequantize node's grid as a comparable key (scale and zero point values, type, axis)."""
    if len(node.input) < 3 or not all(n in inits for n in node.input[1:3]):
        return None
    scale, zp = _array(inits, node.input[1]), _array(inits, node.input[2])
    axis = _attribute(node, "axis", 1) if scale.size > 1 else None
    return scale.tobytes(), scale.shape, zp.tobytes(), zp.dtype.str, axis


def _chain_key(chain: list[Any], inits: dict[str, Any]) -> tuple[Any, ...]:
    return tuple((n.op_type, tuple(_array(inits, i).tobytes() if i else b"" for i in n.input[1:])) for n in chain)


def _sink_dequantization(graph: Any, inits: dict[str, Any]) -> bool:
    """Swap one per-tensor ``DequantizeLinear -> layout op -> QuantizeLinear`` into ``layout op ->
    DequantizeLinear -> QuantizeLinear`` (a reshape of codes, then the same arithmetic on the same values),
    so the re-quantization behind a reshape is seen. Returns whether it swapped one."""
    producers, readers = _producers(graph), _readers(graph)
    for node in graph.node:
        if node.op_type not in _LAYOUT_OPS or node.op_type == "Identity":
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(readers.get(dq.output[0], [])) != 1:
            continue
        if _grid(dq, inits) is None or _array(inits, dq.input[1]).size != 1:
            continue
        after = readers.get(node.output[0], [])
        while len(after) == 1 and after[0].op_type in _LAYOUT_OPS:
            after = readers.get(after[0].output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        codes, values = dq.input[0], dq.output[0]
        node.input[0], dq.input[0] = codes, values + "_codes"
        out = node.output[0]
        node.output[0] = values + "_codes"
        dq.output[0] = out
        graph.node.remove(dq)
        index = list(graph.node).index(node)
        graph.node.insert(index + 1, dq)
        return True
    return False


def drop_requantization(proto: Any) -> int:
    """Drop every ``[clamp] -> QuantizeLinear`` whose input is the ``DequantizeLinear`` of the same grid
    (same scale, zero point, type, axis, and the same clamp in front of both): its codes are the codes that
    ``DequantizeLinear`` read, since ``round((q - z) s / s) + z = q`` for every code ``q``. Its readers read
    those codes; identical ``QuantizeLinear`` nodes of one tensor are merged the same way. Returns how many
    quantize nodes went."""
    graph = proto.graph
    dropped = 0
    changed = True
    inits = _initializers(graph)
    while _sink_dequantization(graph, inits):
        pass
    while changed:
        changed = False
        inits, producers = _initializers(graph), _producers(graph)
        seen: dict[tuple[Any, ...], str] = {}
        for node in list(graph.node):
            if node.op_type != "QuantizeLinear":
                continue
            grid = _grid(node, inits)
            if grid is None:
                continue
            source, chain = _bounds_chain(node.input[0], producers, inits)
            key = (source, _chain_key(chain, inits), grid)
            replacement = seen.get(key)
            if replacement is None:
                dq = producers.get(source)
                if dq is not None and dq.op_type == "DequantizeLinear" and _grid(dq, inits) == grid:
                    q = producers.get(dq.input[0])
                    while q is not None and q.op_type in _LAYOUT_OPS:  # codes reshaped after quantizing
                        q = producers.get(q.input[0])
                    if q is not None and q.op_type == "QuantizeLinear":
                        before = _chain_key(_bounds_chain(q.input[0], producers, inits)[1], inits)
                        if not chain or _chain_key(chain, inits) == before:
                            replacement = dq.input[0]
                    elif dq.input[0] in inits and not chain:
                        replacement = dq.input[0]
            if replacement is None:
                seen[key] = node.output[0]
                continue
            _rename_input(graph, node.output[0], replacement)
            graph.node.remove(node)
            dropped += 1
            changed = True
            break
    prune(proto)
    return dropped


def own_zero_points(proto: Any) -> None:
    """Give each weight's ``DequantizeLinear`` a zero-point initializer of its own (the exporter shares one
    constant among all): onnxruntime's ``session.x64quantprecision`` rewrite (int8 weights to uint8 at
    load) rewrites each node's zero point in place and fails on a shared one."""
    graph = proto.graph
    inits, readers = _initializers(graph), _readers(graph)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        if node.input[2] in inits and len(readers.get(node.input[2], [])) > 1:
            name = node.output[0] + "_zero_point"
            _set_initializer(graph, name, _array(inits, node.input[2]))
            node.input[2] = name
    prune(proto)


def fuse_transformer(proto: Any, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime's BERT fusions (its Python optimizer, no onnxruntime session: the file stays portable).
    Returns the count of each fused operator it wrote."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_qordered_matmul = False  # a CUDA-only operator for Q -> MatMul -> Q chains (seen on DistilBERT)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(proto, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   optimization_options=options, opt_level=0)
    finally:
        quiet.setLevel(level)
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    result = optimized.model
    if result is not proto:
        proto.CopyFrom(result)
    domains = {node.domain for node in proto.graph.node} - {"", "ai.onnx"}
    known = {entry.domain for entry in proto.opset_import}
    for domain in sorted(domains - known):
        entry = proto.opset_import.add()
        entry.domain, entry.version = domain, 1
    return fused
