"""Fix every graph input to a static shape (NPU compilers need them).

``FixInputShapes(shapes)`` sets each named input's shape; a dim the model
already fixed must agree.  Intermediate shapes the exporter recorded (often
symbolic) are dropped so that inference recomputes them from the new inputs,
and the graph outputs take the static shapes inference proves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .shapes import infer_types

__all__ = ["FixInputShapes", "ShapeError", "dynamic_dims"]


class ShapeError(ValueError):
    """The given shapes do not fit the model."""


def dynamic_dims(graph: gs.Graph) -> dict[str, list[int]]:
    """Per graph input, the positions of its dims that are not fixed."""
    out: dict[str, list[int]] = {}
    for t in graph.inputs:
        if t.shape is None:
            out[t.name] = [-1]
            continue
        dyn = [i for i, d in enumerate(t.shape) if not (isinstance(d, int) and d >= 0)]
        if dyn:
            out[t.name] = dyn
    return out


class FixInputShapes(Pass):
    name = "fix_input_shapes"

    def __init__(self, shapes: Mapping[str, Sequence[int]]):
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}

    def call(self, graph: gs.Graph) -> PassResult:
        names = {t.name for t in graph.inputs}
        unknown = sorted(set(self.shapes) - names)
        if unknown:
            raise ShapeError(f"no graph input named {', '.join(unknown)} (inputs: {', '.join(sorted(names))})")
        fixed = 0
        for t in graph.inputs:
            want = self.shapes.get(t.name)
            if want is None:
                continue
            if any(d < 1 for d in want):
                raise ShapeError(f"input {t.name}: shape {list(want)} has a dim below 1")
            if t.shape is not None:
                if len(t.shape) != len(want):
                    raise ShapeError(f"input {t.name}: rank {len(t.shape)} but {len(want)} dims given")
                for i, (have, w) in enumerate(zip(t.shape, want)):
                    if isinstance(have, int) and have >= 0 and have != w:
                        raise ShapeError(f"input {t.name}: dim {i} is fixed at {have}, not {w}")
                if tuple(t.shape) == want:
                    continue
            t.shape = list(want)
            fixed += 1
        missing = dynamic_dims(graph)
        if missing:
            desc = "; ".join(f"{n} dims {d}" for n, d in sorted(missing.items()))
            raise ShapeError(f"dynamic dims left without a size: {desc}")
        if not fixed:
            return PassResult(False, {})
        declared = {id(t): t.shape for t in graph.outputs}
        for g_node in graph.nodes:  # stale symbolic shapes: recomputed below
            for out in g_node.outputs:
                if out.shape is not None and not all(isinstance(d, int) and d >= 0 for d in out.shape):
                    out.shape = None
        tm = infer_types(graph)
        outs = 0
        for t in graph.outputs:
            s = tm.static_shape(t)
            if s is not None and (t.shape is None or tuple(t.shape) != s):
                t.shape = list(s)
                outs += 1
            elif s is None and t.shape is None:
                t.shape = declared[id(t)]  # not proved static here: keep what the model declared
        return PassResult(True, {"inputs_fixed": fixed, "outputs_fixed": outs})
