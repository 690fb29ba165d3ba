"""The one place that reaches into onnx-graphsurgeon beyond its public API.

gs keeps a constant's values in the private ``Constant._values`` (a numpy
array, or a ``LazyValues`` that reads the ``TensorProto`` on first use); the
passes need to look at, and swap, that object without loading it (external
data, computed values, cheap export stand-ins).  Every such access goes
through these functions, so a gs upgrade that moves it is fixed here alone.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

__all__ = ["LazyValues", "SparseValues", "export_node", "lazy_values", "set_lazy_values"]


def lazy_values(t: gs.Tensor) -> Any:
    """What gs stores as ``t``'s values, unloaded: an ndarray, a ``LazyValues``
    (or subclass), a ``SparseValues``; None for a tensor that holds no values."""
    return getattr(t, "_values", None)


def set_lazy_values(t: gs.Constant, values: Any) -> None:
    """Make ``values`` (an ndarray or a ``LazyValues``) what gs stores for ``t``,
    without loading or converting it."""
    t._values = values


def export_node(node: gs.Node) -> onnx.NodeProto:
    """gs's export of one node (subgraph attributes included)."""
    return OnnxExporter.export_node(node)
