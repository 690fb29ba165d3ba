"""What a gradient rule sees: the forward graph's facts and a node emitter.

A rule is a small function ``rule(g, node, gys) -> gxs``: ``gys`` holds the
gradient of each of ``node``'s outputs (``None`` where no gradient flows),
``gxs`` one entry per input (``None`` for no gradient).  It builds the backward
nodes through ``g`` only, so every emitted node is legal at the model's opset
(>= 13) and names never collide.  Broadcasting is undone in one place,
``GradContext.sum_to``; dims that are symbolic stay symbolic (shapes are read
from ``Shape`` at run time, never baked in).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameScope, const_value, is_const
from ..shapes import Dim, TypeMap

__all__ = ["GradContext", "GradientError", "Tensor"]

Tensor = gs.Tensor


class GradientError(ValueError):
    """The gradient of this graph cannot be built (names the node and why)."""


class GradContext:
    """Emits backward nodes into ``graph`` and answers questions about tensors."""

    def __init__(self, graph: gs.Graph, types: TypeMap, opset: int, prefix: str = "grad"):
        self.graph, self.types, self.opset, self.prefix = graph, types, opset, prefix
        self.names = NameScope(graph)
        self.nodes: list[gs.Node] = []  # emitted, in order
        self._shape_cache: dict[int, gs.Variable] = {}
        self._const_cache: dict[tuple, gs.Constant] = {}
        self.node: gs.Node | None = None  # the forward node whose rule runs
        self.needed: Sequence[bool] = ()

    # ------------------------------------------------------------------ facts
    def shape(self, t: Tensor) -> tuple[Dim, ...] | None:
        return self.types.shape(t)

    def rank(self, t: Tensor) -> int | None:
        return self.types.rank(t)

    def static_shape(self, t: Tensor) -> tuple[int, ...] | None:
        return self.types.static_shape(t)

    def dtype(self, t: Tensor) -> np.dtype:
        dt = self.types.dtype(t)
        if dt is None:
            raise GradientError(f"the element type of {t.name!r} is unknown")
        return dt

    def needs(self, i: int) -> bool:
        """Whether input ``i`` of the node being differentiated wants a gradient."""
        return i < len(self.needed) and bool(self.needed[i])

    def value(self, t: Tensor | None) -> np.ndarray | None:
        """The constant value of ``t`` (an initializer or a Constant node's output), else None."""
        if t is None:
            return None
        if is_const(t):
            return const_value(t)
        if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
            v = t.inputs[0].attrs["value"]
            return const_value(v) if isinstance(v, gs.Constant) else np.asarray(v)
        return None

    def ints_of(self, t: Tensor | None, what: str) -> list[int]:
        v = self.value(t)
        if v is None:
            raise GradientError(f"{self._where()}: {what} must be a constant")
        return [int(x) for x in np.asarray(v).reshape(-1)]

    def axis(self, node: gs.Node, name: str = "axis", default: int = 0, of: Tensor | None = None) -> int:
        """A non-negative axis attribute (read against ``of``'s rank, default the first input)."""
        a = int(node.attrs.get(name, default))
        if a < 0:
            r = self.rank(of if of is not None else node.inputs[0])
            if r is None:
                raise GradientError(f"{self._where()}: negative {name} on an input of unknown rank")
            a += r
        return a

    def _where(self) -> str:
        n = self.node
        return f"{n.op} node {n.name!r}" if n is not None else "gradient"

    # ------------------------------------------------------------------ emit
    def fresh(self, hint: str) -> str:
        return self.names.fresh(f"{self.prefix}/{hint}")

    def op(self, op: str, inputs: Sequence[Tensor | None], attrs: dict | None = None, *, n_out: int = 1,
           domain: str = "") -> gs.Variable | list[gs.Variable]:
        """Append ``op`` and return its output (a list when ``n_out`` > 1).
        ``None`` inputs become empty optional inputs."""
        outs = [gs.Variable(self.fresh(f"{op}_out")) for _ in range(n_out)]
        ins = [t if t is not None else gs.Variable.empty() for t in inputs]
        node = gs.Node(op=op, name=self.fresh(op), attrs=dict(attrs or {}), inputs=ins, outputs=outs, domain=domain or None)
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None, hint: str = "const") -> gs.Constant:
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        c = self._const_cache.get(key)
        if c is None:
            c = gs.Constant(self.fresh(hint), a)
            self._const_cache[key] = c
        return c

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64), hint="ints")

    def scalar(self, value: float, like: Tensor) -> gs.Constant:
        """A rank-0 constant of ``like``'s element type."""
        return self.const(np.asarray(value, dtype=self.dtype(like)), hint="scalar")

    def shape_of(self, t: Tensor) -> Tensor:
        """``t``'s shape as a 1-D int64 tensor (a constant when it is static)."""
        st = self.static_shape(t)
        if st is not None:
            return self.ints(st)
        s = self._shape_cache.get(id(t))
        if s is None:
            s = self.op("Shape", [t])
            self._shape_cache[id(t)] = s
        return s

    def dim_of(self, t: Tensor, axis: int) -> Tensor:
        """Dim ``axis`` of ``t`` as a 1-element int64 tensor."""
        s = self.shape(t)
        if s is not None and isinstance(s[axis], int):
            return self.ints([s[axis]])
        return self.op("Slice", [self.shape_of(t), self.ints([axis]), self.ints([axis + 1])])

    # common one-liners
    def add(self, a, b):
        return self.op("Add", [a, b])

    def sub(self, a, b):
        return self.op("Sub", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def div(self, a, b):
        return self.op("Div", [a, b])

    def neg(self, a):
        return self.op("Neg", [a])

    def cast_like(self, a, like):
        """``a`` cast to the forward tensor ``like``'s element type (CastLike exists from opset 15)."""
        if self.opset >= 15:
            return self.op("CastLike", [a, like])
        from onnx import helper

        return self.op("Cast", [a], {"to": int(helper.np_dtype_to_tensor_dtype(self.dtype(like)))})

    def transpose(self, a, perm: Sequence[int]):
        return self.op("Transpose", [a], {"perm": [int(p) for p in perm]})

    def reshape(self, a, shape: Tensor):
        return self.op("Reshape", [a, shape])

    def reduce_sum(self, a, axes: Sequence[int] | Tensor, keepdims: bool = True):
        ax = axes if isinstance(axes, gs.Tensor) else self.ints(axes)
        return self.op("ReduceSum", [a, ax], {"keepdims": int(keepdims)})

    def unsqueeze(self, a, axes: Sequence[int]):
        return self.op("Unsqueeze", [a, self.ints(axes)])

    def squeeze(self, a, axes: Sequence[int]):
        return self.op("Squeeze", [a, self.ints(axes)])

    def zeros_like(self, t: Tensor) -> Tensor:
        """Zeros of ``t``'s shape and type."""
        zero = np.zeros((1,), dtype=self.dtype(t))
        return self.op("ConstantOfShape", [self.shape_of(t)], {"value": gs.Constant(self.fresh("zero"), zero)})

    def ones_like(self, t: Tensor) -> Tensor:
        if self.rank(t) == 0:
            return self.scalar(1.0, t)
        one = np.ones((1,), dtype=self.dtype(t))
        return self.op("ConstantOfShape", [self.shape_of(t)], {"value": gs.Constant(self.fresh("one"), one)})

    # ------------------------------------------------------------------ broadcasting
    def sum_to(self, grad: Tensor | None, like: Tensor, src: Tensor | None = None,
               shape: tuple[Dim, ...] | None = None) -> Tensor | None:
        """Sum ``grad`` (the gradient of a broadcast result, shaped like the
        forward tensor ``src``: default the node's first output; or give its
        ``shape`` when no forward tensor has it) back to ``like``'s shape.

        Axes known to be broadcast (rank difference, a static 1 against anything
        else) are reduced statically; an axis whose dims are not provably equal
        (symbolic and different names, or unknown) is compared at run time
        (``Shape`` -> ``Equal`` -> ``NonZero``), so symbolic dims stay symbolic."""
        if grad is None:
            return None
        if shape is None:
            src = src if src is not None else self.node.outputs[0]
        sx, sy = self.shape(like), (shape if shape is not None else self.shape(src))
        if sx is None or sy is None:
            raise GradientError(f"{self._where()}: the rank of {like.name!r} or of its gradient is unknown; "
                                "broadcasting cannot be undone")
        lead = len(sy) - len(sx)
        if lead < 0:
            raise GradientError(f"{self._where()}: gradient of rank {len(sy)} for {like.name!r} of rank {len(sx)}")
        static = list(range(lead))
        dynamic = []
        for i, dx in enumerate(sx):
            dy = sy[lead + i]
            if dx == 1 and dy != 1:
                static.append(lead + i)
            elif dx == dy and dx is not None:
                continue
            elif isinstance(dx, int) and dx != 1:
                continue  # a fixed size != 1 cannot broadcast
            elif isinstance(dy, int) and dy == 1:
                continue
            else:
                dynamic.append(i)
        if not static and not dynamic:
            return grad
        if dynamic:
            gshape = self.shape_of(src) if shape is None else self.op("Shape", [grad])
            tail = self.op("Slice", [gshape, self.ints([lead]), self.ints([len(sy)])]) if lead else gshape
            xs = self.shape_of(like)
            pick = self.ints(dynamic)
            differ = self.op("Not", [self.op("Equal", [self.op("Gather", [xs, pick]), self.op("Gather", [tail, pick])])])
            found = self.op("Gather", [pick, self.reshape(self.op("NonZero", [differ]), self.ints([-1]))])
            if lead:
                found = self.add(found, self.ints([lead]))
            axes = self.op("Concat", [self.ints(static), found], {"axis": 0}) if static else found
            red = self.op("ReduceSum", [grad, axes], {"keepdims": 1, "noop_with_empty_axes": 1})
        else:
            red = self.reduce_sum(grad, static, keepdims=True)
        if lead:
            red = self.reshape(red, self.shape_of(like))
        return red
