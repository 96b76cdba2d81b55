"""Small helpers over an `onnx_ir` graph, shared by the ONNX passes (fusion, precision, conversion): find a
value's producer or constant, emit nodes and initializers in order, rewire uses, declare opsets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"


def producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node that computes `value` if it is an `op_type` node, else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.op_type != op_type or node.domain != domain:
        return None
    return node


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind `value` (initializer or Constant node) as numpy, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def only_used_by(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses())


def int_attr(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def ints_attr(node: ir.Node, name: str) -> tuple[int, ...] | None:
    attr = node.attributes.get(name)
    return None if attr is None else tuple(attr.as_ints())


class Emitter:
    """Collects new nodes and initializers; `insert_before(anchor)` puts the nodes into the graph in order."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.nodes: list[ir.Node] = []

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        *,
        domain: str = "",
        num_outputs: int = 1,
        name: str | None = None,
        dtype: ir.DataType | None = None,
    ) -> Sequence[ir.Value]:
        """New node; `dtype` types its first output (later passes read types, e.g. the float16 conversion)."""
        attrs = ir.convenience.convert_attributes(attributes or {})
        node = ir.Node(domain, op_type, inputs, attributes=attrs, num_outputs=num_outputs, name=name)
        if dtype is not None:
            node.outputs[0].type = ir.TensorType(dtype)
        self.nodes.append(node)
        return node.outputs

    def op1(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict[str, Any] | None = None,
        **kw: Any,
    ) -> ir.Value:
        return self.op(op_type, inputs, attributes, **kw)[0]

    def const(self, array: np.ndarray | ir.TensorProtocol, name: str) -> ir.Value:
        """A new initializer (name made unique)."""
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.asarray(array))
        return add_initializer(self.graph, tensor, name)

    def insert_before(self, anchor: ir.Node) -> None:
        self.graph.insert_before(anchor, self.nodes)
        self.nodes = []

    def insert_after(self, anchor: ir.Node) -> None:
        self.graph.insert_after(anchor, self.nodes)
        self.nodes = []


def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol, name: str) -> ir.Value:
    base, n = name, 1
    while name in graph.initializers:
        name = f"{base}_{n}"
        n += 1
    value = ir.Value(
        name=name, shape=ir.Shape(tensor.shape.dims), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every use of `old` at `new`; a graph output keeps its name, now carried by `new`."""
    if old.is_graph_output():
        name, shape, typ = old.name, old.shape, old.type
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name = name
        new.shape = shape if new.shape is None else new.shape
        new.type = typ if new.type is None else new.type
    else:
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
        old.replace_all_uses_with(new)


def remove_dead_nodes(model: ir.Model) -> None:
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.RemoveUnusedOpsetsPass()(model)


def use_opset(model: ir.Model, domain: str, version: int) -> None:
    model.opset_imports.setdefault(domain, version)
    model.graph.opset_imports.setdefault(domain, version)
