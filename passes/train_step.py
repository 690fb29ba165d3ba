"""One train-step graph: forward, loss, backward (the gradient pass) and the
optimizer update, as plain ONNX that any current onnxruntime runs.

Inputs of the train step: the model's inputs, the label, ``lr`` and ``step``
(float scalars; ``step`` counts from 1), each trainable parameter and its
optimizer state.  Outputs: ``loss``, then every parameter's and state's next
value (``<name>.next``).  The eval graph is the forward plus the loss, with
the trainables as inputs; it returns the loss and the chosen output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .gradient import GradContext, GradientError, build_gradient
from .shapes import infer_types

LOSSES = ("ce", "mse", "bce", "l1")
OPTIMIZERS = ("adamw", "sgd")
LOSS, LR, STEP = "loss", "lr", "step"
NEXT = ".next"


@dataclass(frozen=True)
class LossSpec:
    kind: str  # ce | mse | bce | l1
    output: str  # the model output the loss reads
    label: str  # the label input's name
    ignore_index: int = -100  # ce: label value that does not count (token-level padding)


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str = "adamw"  # adamw | sgd
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd

    def state_names(self, param: str) -> list[str]:
        if self.kind == "adamw":
            return [f"{param}.adam_m", f"{param}.adam_v"]
        return [f"{param}.momentum"] if self.momentum else []


@dataclass
class TrainStep:
    train: gs.Graph
    eval: gs.Graph
    params: list[str]
    state: dict[str, list[str]]  # param -> its optimizer state inputs
    label_dtype: np.dtype
    label_shape: tuple
    backward_nodes: int = 0
    optimizer_nodes: int = 0
    unreached: list[str] = field(default_factory=list)


def _as_inputs(graph: gs.Graph, names: Sequence[str]) -> None:
    """Trainable initializers become graph inputs (fed by the runner)."""
    tensors = graph.tensors()
    for n in names:
        t = tensors.get(n)
        if t is None:
            raise GradientError(f"no tensor named {n!r} in the model")
        if isinstance(t, gs.Constant):
            arr = t.values
            t.to_variable(dtype=arr.dtype, shape=list(arr.shape))
            t.type = "tensor_type"  # to_variable leaves the attribute a fresh Variable has unset
        if t not in graph.inputs:
            graph.inputs.append(t)


def _loss(g: GradContext, graph: gs.Graph, spec: LossSpec) -> tuple[gs.Variable, np.dtype, tuple]:
    """Append the loss of ``spec.output`` against a new label input; return it."""
    tensors = graph.tensors()
    if spec.output not in tensors:
        raise GradientError(f"no output named {spec.output!r}")
    y = tensors[spec.output]
    ydt = g.dtype(y)
    if ydt.kind != "f":
        raise GradientError(f"output {spec.output!r} is {ydt}: the loss needs a float output")
    shape = g.shape(y)
    if spec.label in tensors:
        raise GradientError(f"the label name {spec.label!r} is already a tensor of the model")
    if spec.kind == "ce":
        if shape is None or len(shape) < 2:
            raise GradientError(f"ce needs logits of rank >= 2 (classes last); {spec.output!r} has "
                                f"{'unknown rank' if shape is None else f'rank {len(shape)}'}")
        lshape, ldt = tuple(shape[:-1]), np.dtype(np.int64)
    else:
        lshape, ldt = tuple(shape) if shape is not None else None, ydt
    label = gs.Variable(spec.label, dtype=ldt, shape=list(lshape) if lshape is not None else None)
    graph.inputs.append(label)
    if spec.kind == "ce":
        # mean over counted positions of -log softmax(y)[label]
        logp = g.op("LogSoftmax", [y], {"axis": -1})
        keep = g.op("Not", [g.op("Equal", [label, g.const(np.int64(spec.ignore_index))])])
        safe = g.op("Where", [keep, label, g.const(np.int64(0))])
        picked = g.squeeze(g.op("GatherElements", [logp, g.unsqueeze(safe, [-1])], {"axis": -1}), [-1])
        mask = g.op("Cast", [keep], {"to": _onnx_type(ydt)})
        total = g.op("ReduceSum", [g.mul(picked, mask)], {"keepdims": 0})
        count = g.op("Max", [g.op("ReduceSum", [mask], {"keepdims": 0}), g.const(np.asarray(1, ydt))])
        out = g.neg(g.div(total, count))
    else:
        d = g.sub(y, label)
        if spec.kind == "mse":
            per = g.mul(d, d)
        elif spec.kind == "l1":
            per = g.op("Abs", [d])
        elif spec.kind == "bce":
            # log(1 + exp(-|y|)) + max(y, 0) - y * t: stable for any y
            per = g.add(g.sub(g.op("Relu", [y]), g.mul(y, label)), g.op("Softplus", [g.neg(g.op("Abs", [y]))]))
        else:
            raise GradientError(f"unknown loss {spec.kind!r}: use one of {', '.join(LOSSES)}")
        n = g.op("Cast", [g.op("Size", [per])], {"to": _onnx_type(ydt)})
        out = g.div(g.op("ReduceSum", [per], {"keepdims": 0}), n)
    named = g.op("Identity", [out])
    named.name, named.dtype, named.shape = LOSS, ydt, []
    return named, ldt, lshape


def _onnx_type(dt: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


def _check_names(graph: gs.Graph, names: Sequence[str]) -> None:
    taken = set(graph.tensors())
    clash = [n for n in names if n in taken]
    if clash:
        raise GradientError(f"the model already has tensors named {', '.join(clash[:3])}: rename them")


def build_eval(graph: gs.Graph, trainables: Sequence[str], loss: LossSpec) -> tuple[gs.Graph, np.dtype, tuple]:
    """Forward + loss; trainables as inputs; outputs the loss and ``loss.output``."""
    ev = graph.copy()
    _as_inputs(ev, trainables)
    _check_names(ev, [LOSS, loss.label])
    g = GradContext(ev, infer_types(ev), int(ev.opset), prefix="loss")
    lt, ldt, lshape = _loss(g, ev, loss)
    out = ev.tensors()[loss.output]
    ev.outputs = [lt, out]
    ev.cleanup(remove_unused_graph_inputs=False)
    return ev, ldt, lshape


def build_train_step(graph: gs.Graph, trainables: Sequence[str], loss: LossSpec,
                     optimizer: OptimizerSpec = OptimizerSpec()) -> TrainStep:
    """The train-step and eval graphs for ``graph`` (left unchanged)."""
    if optimizer.kind not in OPTIMIZERS:
        raise GradientError(f"unknown optimizer {optimizer.kind!r}: use adamw or sgd")
    ev, ldt, lshape = build_eval(graph, trainables, loss)
    tr = graph.copy()
    _as_inputs(tr, trainables)
    state = {p: optimizer.state_names(p) for p in trainables}
    _check_names(tr, [LOSS, loss.label, LR, STEP, *(p + NEXT for p in trainables),
                      *(s for ss in state.values() for s in ss), *(s + NEXT for ss in state.values() for s in ss)])
    types = infer_types(tr)
    g = GradContext(tr, types, int(tr.opset), prefix="loss")
    lt, _, _ = _loss(g, tr, loss)
    types = infer_types(tr)  # the loss's tensors, for the gradient pass
    res = build_gradient(tr, LOSS, list(trainables), types=types)
    tensors = tr.tensors()
    o = GradContext(tr, types, int(tr.opset), prefix="opt")
    n0 = len(tr.nodes)
    lr = gs.Variable(LR, dtype=np.float32, shape=[])
    step = gs.Variable(STEP, dtype=np.float32, shape=[])
    tr.inputs += [lr, step]
    outputs = [lt]
    state_inputs = []
    for p in trainables:
        w = tensors[p]
        dt = o.dtype(w)
        gw = res.grads[p]
        lr_p = lr if dt == np.float32 else o.op("Cast", [lr], {"to": _onnx_type(dt)})
        new_state = []
        svars = [gs.Variable(s, dtype=dt, shape=list(w.shape)) for s in state[p]]
        state_inputs += svars
        if optimizer.kind == "adamw":
            b1, b2 = optimizer.betas
            m, v = svars
            step_p = step if dt == np.float32 else o.op("Cast", [step], {"to": _onnx_type(dt)})
            bc1 = o.sub(o.scalar(1.0, w), o.op("Pow", [o.scalar(b1, w), step_p]))
            bc2 = o.sub(o.scalar(1.0, w), o.op("Pow", [o.scalar(b2, w), step_p]))
            m2 = o.add(o.mul(m, o.scalar(b1, w)), o.mul(gw, o.scalar(1 - b1, w)))
            v2 = o.add(o.mul(v, o.scalar(b2, w)), o.mul(o.mul(gw, gw), o.scalar(1 - b2, w)))
            denom = o.add(o.div(o.op("Sqrt", [v2]), o.op("Sqrt", [bc2])), o.scalar(optimizer.eps, w))
            upd = o.mul(o.div(m2, denom), o.div(lr_p, bc1))
            base = w
            if optimizer.weight_decay:
                base = o.mul(w, o.sub(o.scalar(1.0, w), o.mul(lr_p, o.scalar(optimizer.weight_decay, w))))
            p2 = o.sub(base, upd)
            new_state = [m2, v2]
        else:
            d = gw
            if optimizer.weight_decay:
                d = o.add(d, o.mul(w, o.scalar(optimizer.weight_decay, w)))
            if optimizer.momentum:
                (buf,) = svars
                d = o.add(o.mul(buf, o.scalar(optimizer.momentum, w)), d)
                new_state = [d]
            p2 = o.sub(w, o.mul(d, lr_p))
        for t, name in [(p2, p + NEXT)] + [(s, n + NEXT) for s, n in zip(new_state, state[p])]:
            out = o.op("Identity", [t])
            out.name, out.dtype, out.shape = name, dt, list(w.shape)
            outputs.append(out)
    n_opt = len(tr.nodes) - n0
    tr.inputs += state_inputs
    tr.outputs = outputs
    tr.cleanup(remove_unused_graph_inputs=False)
    return TrainStep(tr, ev, list(trainables), state, ldt, lshape, res.nodes_added, n_opt, res.unreached)


__all__ = ["LOSSES", "LOSS", "LR", "NEXT", "OPTIMIZERS", "STEP", "LossSpec", "OptimizerSpec", "TrainStep",
           "build_eval", "build_train_step"]
