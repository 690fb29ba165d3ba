"""Property tests over random small valid graphs (hypothesis, fixed seed budget):
compiling preserves every output on ONNX Runtime, every pass declared
idempotent is idempotent on its own, and compiling a compiled model changes nothing.  Random mutations of
those graphs (dropped, swapped, rewired or duplicated nodes, wrong dims, raw
data, attributes, versions, flipped or truncated bytes) must end, through the
CLI, in success or a one-line error with exit code 2, leaving the input as it
was and no partial output.  CI checks 100 + 200 + 150 random graphs."""

from __future__ import annotations

import os

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import compile
from passes import get_pass, pass_names, to_graph, to_model
from tests.helpers import assert_same_on_ort

H = helper.make_node
FLOAT = TensorProto.FLOAT
I64_MAX = np.iinfo(np.int64).max
RTOL, ATOL = 1e-4, 1e-5  # fusions (Gemm, folded constants) may change the last bits

# BEATS_HUNT_EXAMPLES=N: an unseeded run of N examples per property (bug
# hunting, by hand); CI runs the fixed, derandomized budget.
_HUNT = int(os.environ.get("BEATS_HUNT_EXAMPLES", "0") or 0)

PROPERTY_SETTINGS = settings(
    max_examples=_HUNT or 200,
    derandomize=not _HUNT,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Builder:
    """A random DAG of float tensors shaped (rows, cols); rows is 2 or the symbol N."""

    def __init__(self, draw):
        self.draw = draw
        self.rows = draw(st.sampled_from([2, "N"]))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.pool: list[tuple[str, int]] = []  # (name, cols)
        self.k = 0
        for _ in range(draw(st.integers(1, 2))):
            name = self.fresh("x")
            cols = draw(st.sampled_from([3, 4]))
            self.inputs.append(helper.make_tensor_value_info(name, FLOAT, [self.rows, cols]))
            self.pool.append((name, cols))

    def fresh(self, base="t"):
        self.k += 1
        return f"{base}{self.k}"

    def const(self, value, base="c"):
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def floats(self, *shape, lo=-1.0, hi=1.0):
        seed = self.draw(st.integers(0, 2**16))
        return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)

    def node(self, op, inputs, **attrs):
        out = self.fresh()
        self.nodes.append(H(op, inputs, [out], **attrs))
        return out

    def pick(self, cols=None):
        cands = [v for v in self.pool if cols is None or v[1] == cols]
        return self.draw(st.sampled_from(cands)) if cands else None

    def add(self, name, cols):
        self.pool.append((name, cols))

    # --- steps: each reads values from the pool and adds one -------------

    def unary(self):
        v, c = self.pick()
        op = self.draw(st.sampled_from(["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Sin", "Softsign"]))
        self.add(self.node(op, [v]), c)

    def binary(self):
        v, c = self.pick()
        w, _ = self.pick(c)
        op = self.draw(st.sampled_from(["Add", "Sub", "Mul", "Max", "Min"]))
        self.add(self.node(op, [v, w]), c)

    def with_constant(self):
        v, c = self.pick()
        shape = self.draw(st.sampled_from([(c,), (1, c), ()]))
        op = self.draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
        value = self.floats(*shape, lo=0.5, hi=2.0) if op == "Div" else self.floats(*shape)
        ins = [v, self.const(value)]
        if op in ("Add", "Mul") and self.draw(st.booleans()):
            ins.reverse()
        self.add(self.node(op, ins), c)

    def identity(self):
        v, c = self.pick()
        self.add(self.node(self.draw(st.sampled_from(["Identity", "Dropout"])), [v]), c)

    def cast(self):
        v, c = self.pick()
        if self.draw(st.booleans()):
            self.add(self.node("Cast", [v], to=FLOAT), c)
        else:  # through double and back (ORT without optimizations cannot feed a
            # bare Cast(double)->Cast(float) pair to an If body, hence the Negs)
            d = self.node("Neg", [self.node("Cast", [v], to=TensorProto.DOUBLE)])
            self.add(self.node("Neg", [self.node("Cast", [d], to=FLOAT)]), c)

    def transpose(self):
        v, c = self.pick()
        if self.draw(st.booleans()):
            self.add(self.node("Transpose", [v], perm=[0, 1]), c)
        else:
            t = self.node("Transpose", [v], perm=[1, 0])
            t = self.node(self.draw(st.sampled_from(["Relu", "Neg", "Identity"])), [t])
            self.add(self.node("Transpose", [t], perm=[1, 0]), c)

    def reshape(self):
        v, c = self.pick()
        choices = [[0, c], [-1, c], [0, -1]] + ([[self.rows, c]] if isinstance(self.rows, int) else [])
        if self.draw(st.booleans()):
            target = self.draw(st.sampled_from(choices))
            self.add(self.node("Reshape", [v, self.const(np.array(target, np.int64), "s")]), c)
        else:
            flat = self.node("Reshape", [v, self.const(np.array([-1], np.int64), "s")])
            self.add(self.node("Reshape", [flat, self.const(np.array([-1, c], np.int64), "s")]), c)

    def matmul(self):
        v, c = self.pick()
        m = self.draw(st.sampled_from([3, 4]))
        if self.draw(st.booleans()):
            w = self.const(self.floats(c, m) * 0.5, "w")
        else:  # the weight is a constant subgraph: Transpose of a stored (m, c)
            w = self.node("Transpose", [self.const(self.floats(m, c) * 0.5, "w")], perm=[1, 0])
        y = self.node("MatMul", [v, w])
        bias = self.draw(st.sampled_from(["none", "n", "1n", "scalar"]))
        if bias != "none":
            shape = {"n": (m,), "1n": (1, m), "scalar": ()}[bias]
            b = self.const(self.floats(*shape), "b")
            y = self.node("Add", [y, b] if self.draw(st.booleans()) else [b, y])
        self.add(y, m)

    def concat(self):
        v, c = self.pick()
        if self.draw(st.booleans()):
            self.add(self.node("Concat", [v], axis=1), c)
            return
        w, c2 = self.pick()
        if c + c2 <= 8:
            self.add(self.node("Concat", [v, w], axis=self.draw(st.sampled_from([1, -1]))), c + c2)

    def slice(self):
        v, c = self.pick()
        end = self.draw(st.sampled_from([I64_MAX, c, c + 5, max(c - 1, 1)]))
        axis = self.draw(st.sampled_from([1, -1]))
        ins = [v, self.const(np.array([0], np.int64), "s"), self.const(np.array([end], np.int64), "s"),
               self.const(np.array([axis], np.int64), "s")]
        self.add(self.node("Slice", ins), min(end, c))

    def constant_chain(self):
        v, c = self.pick()
        a = self.node("Constant", [], value=numpy_helper.from_array(self.floats(c), self.fresh("cv")))
        for _ in range(self.draw(st.integers(1, 3))):
            op = self.draw(st.sampled_from(["Neg", "Abs", "Add", "Mul", "Sqrt"]))
            if op in ("Add", "Mul"):
                a = self.node(op, [a, self.const(self.floats(c), "k")])
            elif op == "Sqrt":
                a = self.node("Sqrt", [self.node("Abs", [a])])
            else:
                a = self.node(op, [a])
        if self.draw(st.booleans()):
            a = self.node("Unsqueeze", [a, self.const(np.array([0], np.int64), "ax")])
        self.add(self.node("Add", [v, a]), c)

    def shape_arith(self):
        v, c = self.pick()
        s = self.node("Shape", [v])
        idx = self.draw(st.sampled_from([0, 1, -1]))
        d = self.node("Gather", [s, self.const(np.array(idx, np.int64), "i")], axis=0)
        f = self.node("Cast", [d], to=FLOAT)
        self.add(self.node("Div", [v, f]), c)

    def duplicate(self):
        v, c = self.pick()
        op = self.draw(st.sampled_from(["Relu", "Tanh", "Neg"]))
        a = self.node(op, [v])
        b = self.node(op, [v])
        self.add(self.node("Add", [a, b]), c)

    def unsqueeze_squeeze(self):
        v, c = self.pick()
        ax = self.draw(st.sampled_from([0, 2, -1]))
        u = self.node("Unsqueeze", [v, self.const(np.array([ax], np.int64), "ax")])
        self.add(self.node("Squeeze", [u, self.const(np.array([ax], np.int64), "ax")]), c)

    def expand_pad(self):
        v, c = self.pick()
        if self.draw(st.booleans()):
            self.add(self.node("Expand", [v, self.const(np.array([1, c], np.int64), "s")]), c)
        else:
            pads = self.draw(st.sampled_from([[0, 0, 0, 0], [0, 1, 0, 0]]))
            out = self.node("Pad", [v, self.const(np.array(pads, np.int64), "p")])
            self.add(self.node("Slice", [out, self.const(np.array([0], np.int64), "s"),
                                         self.const(np.array([c], np.int64), "s"),
                                         self.const(np.array([1], np.int64), "s")]), c)

    def conv_bn(self):
        # (rows, c) -> (rows, c, 1) -> Conv1d -> BatchNormalization -> (rows, m)
        v, c = self.pick()
        m = self.draw(st.sampled_from([2, 3]))
        ax = self.const(np.array([2], np.int64), "ax")
        u = self.node("Unsqueeze", [v, ax])
        ins = [u, self.const(self.floats(m, c, 1) * 0.5, "w")]
        if self.draw(st.booleans()):
            ins.append(self.const(self.floats(m), "b"))
        y = self.node("Conv", ins)
        bn = [self.const(self.floats(m, lo=0.5, hi=2.0), "sc"), self.const(self.floats(m), "be"),
              self.const(self.floats(m), "mu"), self.const(self.floats(m, lo=0.5, hi=2.0), "va")]
        y = self.node("BatchNormalization", [y, *bn], epsilon=self.draw(st.sampled_from([1e-5, 1e-3])))
        self.add(self.node("Squeeze", [y, ax]), m)

    def constant_value(self):
        # A value computed from constants only (static rows): folded whole,
        # possibly into a graph output.
        if not isinstance(self.rows, int):
            return
        c = self.draw(st.sampled_from([3, 4]))
        a = self.node("Constant", [], value=numpy_helper.from_array(self.floats(self.rows, c), self.fresh("cv")))
        a = self.node(self.draw(st.sampled_from(["Neg", "Relu", "Identity", "Tanh"])), [a])
        if self.draw(st.booleans()):
            a = self.node("Add", [a, self.const(self.floats(c), "k")])
        self.add(a, c)

    def loop(self):
        # Two iterations of a body holding foldable and removable things.
        v, c = self.pick()
        i, ci, vi_, co, k, t, u, vo = (self.fresh(n) for n in ("i", "ci", "lv", "co", "lk", "lt", "lu", "lo"))
        body_nodes = [
            H("Identity", [ci], [co]),
            H("Constant", [], [k], value=numpy_helper.from_array(self.floats(c) * 0.5, self.fresh("v"))),
            H("Mul", [vi_, k], [t]),
            H(self.draw(st.sampled_from(["Identity", "Tanh"])), [t], [u]),
            H("Cast", [u], [vo], to=FLOAT),
        ]
        shape = [self.rows, c]
        body = helper.make_graph(
            body_nodes, self.fresh("body"),
            [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(ci, TensorProto.BOOL, []),
             helper.make_tensor_value_info(vi_, FLOAT, shape)],
            [helper.make_tensor_value_info(co, TensorProto.BOOL, []), helper.make_tensor_value_info(vo, FLOAT, shape)])
        trips = self.const(np.array(2, np.int64), "n")
        self.add(self.node("Loop", [trips, "", v], body=body), c)

    def dead(self):
        v, _ = self.pick()
        self.node(self.draw(st.sampled_from(["Exp", "Relu"])), [v])

    def constant_if(self):
        v, c = self.pick()
        then_out, else_out = self.fresh("then"), self.fresh("else")
        tg = helper.make_graph([H("Relu", [v], [then_out])], self.fresh("g"), [],
                               [helper.make_tensor_value_info(then_out, FLOAT, [self.rows, c])])
        eg = helper.make_graph([H("Neg", [v], [else_out])], self.fresh("g"), [],
                               [helper.make_tensor_value_info(else_out, FLOAT, [self.rows, c])])
        cond = self.const(np.array(self.draw(st.booleans())), "cond")
        self.add(self.node("If", [cond], then_branch=tg, else_branch=eg), c)

    def dynamic_if(self):
        # The condition depends on the data; the branches hold foldable and
        # removable things.
        v, c = self.pick()
        r = self.node("ReduceSum", [v], keepdims=0)
        cond = self.node("Greater", [r, self.const(np.array(0, np.float32), "z")])
        t_c, t_k, t_s, t_o, e_i, e_o = (self.fresh(n) for n in ("tc", "tk", "ts", "to", "ei", "eo"))
        tg = helper.make_graph(
            [H("Constant", [], [t_c], value=numpy_helper.from_array(self.floats(c), self.fresh("v"))),
             H("Neg", [t_c], [t_k]), H("Add", [v, t_k], [t_s]), H("Identity", [t_s], [t_o])],
            self.fresh("g"), [], [helper.make_tensor_value_info(t_o, FLOAT, [self.rows, c])])
        eg = helper.make_graph([H("Transpose", [v], [e_i], perm=[0, 1]), H("Relu", [e_i], [e_o])],
                               self.fresh("g"), [], [helper.make_tensor_value_info(e_o, FLOAT, [self.rows, c])])
        self.add(self.node("If", [cond], then_branch=tg, else_branch=eg), c)

    STEPS = ["unary", "binary", "with_constant", "identity", "cast", "transpose", "reshape", "matmul", "concat",
             "slice", "constant_chain", "shape_arith", "duplicate", "unsqueeze_squeeze", "expand_pad", "conv_bn", "constant_value", "loop", "dead",
             "constant_if", "dynamic_if"]

    def model(self) -> onnx.ModelProto:
        for _ in range(self.draw(st.integers(1, 10))):
            getattr(self, self.draw(st.sampled_from(self.STEPS)))()
        last = self.pool[-1]
        computed = [v for v in self.pool if v[0] not in {i.name for i in self.inputs}]
        outs = [last] if last in computed else []
        extra = [v for v in computed if v not in outs]
        if extra:
            outs += self.draw(st.lists(st.sampled_from(extra), max_size=2, unique=True))
        if self.draw(st.integers(0, 4)) == 0:  # an output that is a copy of another output
            src, c = outs[0] if outs else last
            outs.append((self.node("Identity", [src]), c))
        if not outs:  # nothing computed: the model is one op on the input
            outs = [(self.node("Relu", [last[0]]), last[1])]
        outputs = [helper.make_tensor_value_info(n, FLOAT, [self.rows, c]) for n, c in outs]
        g = helper.make_graph(self.nodes, "random", self.inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(m)
        return m


@st.composite
def random_models(draw):
    return Builder(draw).model()


def feeds_for(model, rows):
    out = {}
    for k, i in enumerate(model.graph.input):
        cols = i.type.tensor_type.shape.dim[1].dim_value
        out[i.name] = np.random.default_rng(k).standard_normal((rows, cols)).astype(np.float32)
    return out


def serialized(model):
    return model.SerializeToString(deterministic=True)


# Three compiles and two to four ORT runs per graph (~1 s each): a smaller
# fixed budget than the per-pass property below, to keep CI's suite in time.
@settings(PROPERTY_SETTINGS, max_examples=_HUNT or 100)
@given(random_models())
def test_compile_preserves_outputs_and_is_idempotent(model):
    before = serialized(model)
    res = compile(model, verify=False)
    assert serialized(model) == before, "compile changed its input"
    out = res.model
    assert res.report.converged
    assert_same_on_ort(model, out, rtol=RTOL, atol=ATOL)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims[0].dim_param:  # a dynamic batch: try another size too
        assert_same_on_ort(model, out, feeds_for(model, 5), rtol=RTOL, atol=ATOL)
    again = compile(out, verify=False)
    changed = [(p["name"], p["stats"]) for p in again.report.passes if p["modified"]]
    assert not changed, f"compiling the compiled model changed it: {changed}"
    assert serialized(again.model) == serialized(out)
    assert serialized(compile(model, verify=False).model) == serialized(out), "compile is not deterministic"


@PROPERTY_SETTINGS
@given(random_models())
def test_every_pass_is_idempotent_and_preserves_outputs(model):
    for name in pass_names():
        if name == "fix_input_shapes":  # needs the user's --input-shape sizes (npu); tested on its own
            continue
        cls = get_pass(name)
        graph, env = to_graph(model)
        first = cls()(graph)
        once = to_model(graph, env)
        second = cls()(graph)
        if cls.idempotent:
            assert not second.modified, f"{name} not idempotent: {first.stats} then {second.stats}"
        if first.modified:
            assert_same_on_ort(model, once, rtol=RTOL, atol=ATOL)


# --- mutated models: every one ends in success or a one-line InputError -------

MUTATION_OPS = ["Relu", "Add", "MatMul", "Reshape", "Concat", "Gather", "If", "Loop", "Transpose", "Slice",
                "ConstantOfShape", "Expand", "Tile", "Range", "Cast", "FooBar", "Squeeze", "Split"]


def mutate(model: onnx.ModelProto, draw) -> bytes:
    """One or two random edits of ``model`` that a hostile or broken exporter
    might produce; the result need not be valid."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["drop_node", "swap_nodes", "rewire", "op_type", "dims", "attr", "raw_data",
                                     "output", "opset", "ir", "bytes", "truncate", "duplicate_node"]))
        nodes = list(g.node)
        names = [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in nodes for o in n.output]
        if kind == "drop_node" and nodes:
            del g.node[draw(st.integers(0, len(nodes) - 1))]
        elif kind == "swap_nodes" and len(nodes) > 1:
            i, j = draw(st.integers(0, len(nodes) - 1)), draw(st.integers(0, len(nodes) - 1))
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(g.node[i])
            b.CopyFrom(g.node[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)
        elif kind == "rewire" and nodes:
            n = g.node[draw(st.integers(0, len(nodes) - 1))]
            if n.input:
                k = draw(st.integers(0, len(n.input) - 1))
                n.input[k] = draw(st.sampled_from(names + ["ghost", ""]))
        elif kind == "op_type" and nodes:
            g.node[draw(st.integers(0, len(nodes) - 1))].op_type = draw(st.sampled_from(MUTATION_OPS))
        elif kind == "dims" and len(g.initializer):
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if t.dims:
                t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from([0, 1, -1, 7, 1 << 40]))
        elif kind == "attr" and nodes:
            n = g.node[draw(st.integers(0, len(nodes) - 1))]
            if n.attribute:
                a = n.attribute[draw(st.integers(0, len(n.attribute) - 1))]
                if a.type == onnx.AttributeProto.INT:
                    a.i = draw(st.sampled_from([-3, -1, 0, 2, 99, 1 << 40]))
                elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                    a.ints[0] = draw(st.sampled_from([-3, 0, 5, 1 << 40]))
                else:
                    n.attribute.remove(a)
        elif kind == "raw_data" and len(g.initializer):
            t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
            if t.HasField("raw_data"):
                t.raw_data = t.raw_data[: draw(st.integers(0, len(t.raw_data)))]
        elif kind == "output" and len(g.output):
            g.output[0].name = draw(st.sampled_from(names + ["ghost"]))
        elif kind == "opset":
            m.opset_import[0].version = draw(st.sampled_from([1, 6, 11, 13, 18, 21, 30]))
        elif kind == "ir":
            m.ir_version = draw(st.sampled_from([1, 3, 4, 7, 11, 15]))
        elif kind == "duplicate_node" and nodes:
            g.node.add().CopyFrom(g.node[draw(st.integers(0, len(nodes) - 1))])
    data = bytearray(m.SerializeToString())
    if draw(st.integers(0, 4)) == 0 and data:  # flip a few bytes
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def mutated_models(draw):
    return mutate(Builder(draw).model(), draw)


MUTATION_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=_HUNT or 150)


@MUTATION_SETTINGS
@given(mutated_models())
def test_mutated_models_end_in_success_or_one_line_error(data):
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    from beats_compiler import cli

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "m.onnx"
        src.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(src), "-q", "-o", str(Path(d) / "o.onnx")])
        assert src.read_bytes() == data, "the input changed"
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert "Traceback" not in err.getvalue()
        assert code in (0, 2), f"exit {code}: {err.getvalue()}"
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("beats-compile: error: "), lines
            assert sorted(p.name for p in Path(d).iterdir()) == ["m.onnx"]
        else:
            assert not lines
            assert sorted(p.name for p in Path(d).iterdir()) == ["m.onnx", "o.onnx"]
