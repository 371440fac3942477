"""Safe YAML: duplicate keys rejected, alias expansion and nesting bounded (configs, sweeps, table specs, saved
run configs). Below :mod:`qbert.config` and :mod:`qbert.runs`, importing neither."""

from __future__ import annotations

from typing import Any

import yaml

from qbert.errors import QbertError


class _UniqueKeySafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser: 10x faster
    """Safe loader that rejects a key given twice in one mapping."""


def _construct_unique_mapping(loader: _UniqueKeySafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeySafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


MAX_YAML_BYTES = 1 << 20
"""The largest config, sweep or table file read (1 MiB; the largest shipped is a few KiB)."""

MAX_YAML_NODES = 100_000
"""The most YAML nodes a document may hold once its aliases are expanded: a few hundred bytes of nested
aliases (a "billion laughs" document) otherwise expand to gigabytes before any key is checked."""


MAX_YAML_DEPTH = 64
"""The deepest nesting of mappings and lists accepted (the config schema needs 5)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], depth: int = 0) -> int:
    """Nodes in ``node`` with every alias expanded, counted without expanding (aliases share node objects)."""
    if depth > MAX_YAML_DEPTH:
        raise QbertError(f"the YAML nests deeper than {MAX_YAML_DEPTH} levels; flatten it")
    key = id(node)
    if key not in sizes:
        sizes[key] = 0  # a recursive alias counts once, then the sum below stops at the limit
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += _expanded_size(child, sizes, depth + 1)
            if total > MAX_YAML_NODES:
                break
        sizes[key] = total
    return sizes[key]


def load_yaml_text(text: str) -> Any:
    """Parse YAML safely (duplicate keys rejected) after checking that its aliases expand to a bounded size."""
    loader = _UniqueKeySafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise QbertError(
                f"the YAML expands to more than {MAX_YAML_NODES:,} values through its aliases (&name / *name); "
                "write the values out or use fewer nested aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_error_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"invalid YAML: {where}{problem}"
