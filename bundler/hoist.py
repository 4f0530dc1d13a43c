"""Moves weights out of Constant nodes and subgraphs (If/Loop/Scan bodies) into main-graph initializers.

Only main-graph initializers go to the weight store, so every weight worth storing must become one. Outer-scope
names are visible inside subgraphs, so a moved tensor keeps working where it was used; where its name is not unique
in the model (sibling branches reuse names, a subgraph may shadow an outer name) it moves under a fresh name and the
references in its own scope follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx
from onnx import TensorProto, helper


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first, in node and attribute order."""
    yield graph
    for node in graph.node:
        for g in _subgraphs(node):
            yield from graphs(g)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _defines(g: onnx.GraphProto) -> list[str]:
    """The names graph ``g`` itself defines (inputs, initializers, node outputs); they shadow outer ones."""
    return [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a Constant node makes, or None for kinds left in place (sparse_value, strings)."""
    if len(node.attribute) != 1 or len(node.output) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.t.data_type != TensorProto.STRING:
        t = TensorProto()
        t.CopyFrom(attr.t)
    elif attr.name == "value_float":
        t = helper.make_tensor("", TensorProto.FLOAT, [], [attr.f])
    elif attr.name == "value_floats":
        t = helper.make_tensor("", TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
    elif attr.name == "value_int":
        t = helper.make_tensor("", TensorProto.INT64, [], [attr.i])
    elif attr.name == "value_ints":
        t = helper.make_tensor("", TensorProto.INT64, [len(attr.ints)], list(attr.ints))
    else:
        return None
    t.name = node.output[0]
    return t


def _add_initializers(model: onnx.ModelProto, tensors: list[TensorProto]) -> None:
    model.graph.initializer.extend(tensors)
    if model.ir_version < 4:  # before IR 4 every initializer had to be listed as a graph input too
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors)


def hoist_constants(model: onnx.ModelProto) -> int:
    """Turn weight-carrying Constant nodes (in the graph and its subgraphs) into main-graph initializers.

    A Constant is left in place when its output name is defined more than once in the model (sibling subgraphs
    may reuse names) or is some graph's output (a graph output that is an outer-scope initializer is not
    accepted everywhere); ``hoist_subgraph_weights`` moves the large ones of those. Outer-scope names are visible
    in subgraphs, so the consumers need no change.
    """
    defined: dict[str, int] = {}
    graph_outputs: set[str] = set()
    for g in graphs(model.graph):
        for name in _defines(g):
            defined[name] = defined.get(name, 0) + 1
        graph_outputs.update(o.name for o in g.output)
    hoisted: list[TensorProto] = []
    removals: list[tuple[onnx.GraphProto, list[int]]] = []
    for g in graphs(model.graph):
        drop = []
        for i, node in enumerate(g.node):
            t = constant_tensor(node) if _is_constant(node) else None
            if t is not None and t.name and defined.get(t.name) == 1 and t.name not in graph_outputs:
                hoisted.append(t)
                drop.append(i)
        removals.append((g, drop))
    # Deepest graphs first, by index: rebuilding a parent's node list would copy (and detach) its subgraphs.
    for g, drop in reversed(removals):
        for i in reversed(drop):
            del g.node[i]
    _add_initializers(model, hoisted)
    return len(hoisted)


def hoist_subgraph_weights(model: onnx.ModelProto, size_of: Callable[[TensorProto], int | None], min_bytes: int) -> int:
    """Move every subgraph initializer (and Constant left in a subgraph) of more than ``min_bytes`` to the main graph.

    ``size_of`` gives a tensor's byte size, or None for a type the store cannot hold (those stay). A subgraph
    initializer that is also one of its graph's inputs (a default value) stays. Returns how many tensors moved.
    """
    main = model.graph
    if model.ir_version >= 4:  # before IR 4 a subgraph initializer also had to be a subgraph input
        _constants_to_initializers(main, size_of, min_bytes)
    used: set[str] = set()
    defined: dict[str, int] = {}
    for g in graphs(main):
        for name in _defines(g):
            defined[name] = defined.get(name, 0) + 1
        used.update(_defines(g), (o.name for o in g.output), (v.name for v in g.value_info))
        used.update(i for n in g.node for i in n.input)
    moved: list[TensorProto] = []
    identities: list[tuple[onnx.GraphProto, str, str]] = []  # (graph, outer name, output name): added last
    for g in list(graphs(main))[1:]:
        inputs = {i.name for i in g.input}
        keep: list[TensorProto] = []
        for t in g.initializer:
            size = size_of(t)
            if size is None or size <= min_bytes or t.name in inputs or not t.name:
                keep.append(t)
                continue
            old = t.name
            new = old
            if defined[old] != 1 or old in {o.name for o in g.output}:
                new = _fresh(old, used)
                _rename_in_scope(g, old, new, identities)
            moved_t = TensorProto()
            moved_t.CopyFrom(t)
            moved_t.name = new
            moved.append(moved_t)
        if len(keep) != len(g.initializer):
            kept = [TensorProto() for _ in keep]
            for copy, t in zip(kept, keep):
                copy.CopyFrom(t)
            del g.initializer[:]
            g.initializer.extend(kept)
    for g, outer, name in identities:
        g.node.append(helper.make_node("Identity", [outer], [name], name=f"{name}_from_{outer}"))
    _add_initializers(model, moved)
    return len(moved)


def _constants_to_initializers(
    main: onnx.GraphProto, size_of: Callable[[TensorProto], int | None], min_bytes: int
) -> None:
    """Large Constant nodes left in subgraphs become initializers of their own subgraph (same name, same scope)."""
    work: list[tuple[onnx.GraphProto, list[int], list[TensorProto]]] = []
    for g in list(graphs(main))[1:]:
        drop, tensors = [], []
        for i, node in enumerate(g.node):
            t = constant_tensor(node) if _is_constant(node) else None
            if t is not None and t.name and (size_of(t) or 0) > min_bytes:
                drop.append(i)
                tensors.append(t)
        work.append((g, drop, tensors))
    for g, drop, tensors in reversed(work):  # deepest first, by index, as in hoist_constants
        for i in reversed(drop):
            del g.node[i]
        g.initializer.extend(tensors)


def _fresh(name: str, used: set[str]) -> str:
    k = 1
    while f"{name}__{k}" in used:
        k += 1
    used.add(f"{name}__{k}")
    return f"{name}__{k}"


def _rename_in_scope(
    g: onnx.GraphProto, old: str, new: str, identities: list[tuple[onnx.GraphProto, str, str]]
) -> None:
    """Point every use of ``old`` in ``g`` and the subgraphs that do not shadow it at ``new``.

    A graph output named ``old`` keeps its name (If/Loop/Scan outputs are positional, but the name is the graph's
    own interface): an Identity node makes it from ``new``.
    """
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in _subgraphs(node):
            if old not in _defines(sub):
                _rename_in_scope(sub, old, new, identities)
    if old in {o.name for o in g.output}:
        identities.append((g, new, old))
    else:
        kept = [v for v in g.value_info if v.name != old]
        if len(kept) != len(g.value_info):
            copies = [onnx.ValueInfoProto() for _ in kept]
            for copy, v in zip(copies, kept):
                copy.CopyFrom(v)
            del g.value_info[:]
            g.value_info.extend(copies)
