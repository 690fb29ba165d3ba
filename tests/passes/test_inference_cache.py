"""Shape inference reused across the passes of one PassManager run, while no
pass has modified the graph; recomputed after any modification."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import PassManager, PassResult, get_pass, infer_types, shapes, to_graph
from passes.base import Pass, PassError
from tests.helpers import make_model, vi

H = helper.make_node


def graph():
    # x -> Cast(float) -> t -> Cast(float) -> y; the first Cast's `to` decides t's type
    g, _ = to_graph(make_model([H("Cast", ["x"], ["t"], to=TensorProto.FLOAT),
                                H("Cast", ["t"], ["y"], to=TensorProto.FLOAT)],
                               [vi("x", [2])], [vi("y", [2])]))
    return g


def t_of(g):
    return next(n for n in g.nodes if n.outputs[0].name == "t").outputs[0]


class Probe(Pass):
    """Records the dtype inference gives ``t``; never modifies."""

    name = "probe"

    def __init__(self, seen):
        self.seen = seen

    def call(self, graph):
        self.seen.append(infer_types(graph).dtype(t_of(graph)))
        return PassResult(False, {})


class ToDouble(Pass):
    """Makes ``t`` a double once (asking for inference before and after the edit)."""

    name = "to_double"

    def __init__(self, seen):
        self.seen = seen

    def call(self, graph):
        node = t_of(graph).inputs[0]
        if node.attrs["to"] == TensorProto.DOUBLE:
            return PassResult(False, {})
        self.seen.append(infer_types(graph).dtype(t_of(graph)))
        node.attrs["to"] = TensorProto.DOUBLE
        self.seen.append(infer_types(graph).dtype(t_of(graph)))
        return PassResult(True, {})


def counting(monkeypatch):
    calls = []
    real = shapes._infer_types

    def count(g):
        calls.append(1)
        return real(g)

    monkeypatch.setattr(shapes, "_infer_types", count)
    return calls


def test_unchanged_graph_is_inferred_once(monkeypatch):
    calls, seen = counting(monkeypatch), []
    rep = PassManager([Probe(seen), Probe(seen), Probe(seen)]).run(graph())
    assert rep.converged and seen == [np.float32] * 3 and len(calls) == 1


def test_modification_invalidates_and_a_second_request_in_a_pass_recomputes(monkeypatch):
    calls, seen = counting(monkeypatch), []
    PassManager([Probe(seen), ToDouble(seen), Probe(seen)]).run(graph())
    # round 1: probe (computed), to_double before (reused) and after its edit
    # (recomputed), probe (recomputed after the modification); round 2: the first
    # probe reused; the last probe is not run again (nothing changed since its run)
    assert seen == [np.float32, np.float32, np.float64, np.float64, np.float64]
    assert len(calls) == 3


def test_outside_a_manager_every_call_computes_and_callers_get_copies(monkeypatch):
    calls, g = counting(monkeypatch), graph()
    a = infer_types(g)
    a.elem.clear()
    assert infer_types(g).dtype(t_of(g)) == np.float32 and len(calls) == 2
    calls.clear()
    seen = []

    class Spoil(Pass):
        name = "spoil"

        def call(self, graph):
            infer_types(graph).elem.clear()  # a caller's edits stay in its copy
            return PassResult(False, {})

    PassManager([Spoil(), Probe(seen)]).run(g)
    assert seen == [np.float32] and len(calls) == 1


def test_data_prop_bound_of_a_mul_chain_saturates():
    # A reparameterized weight (Reshape by a shape constant) feeding 80 x * x: the
    # over-estimate of the values must saturate, not square a Python int per node
    # (without the cap this never returns: EfficientNet-B0's artifacts hung).
    nodes = [H("Reshape", ["w", "s"], ["t0"])] + [H("Mul", [f"t{i}", f"t{i}"], [f"t{i + 1}"]) for i in range(80)]
    nodes.append(H("Add", ["x", "t80"], ["y"]))
    g, _ = to_graph(make_model(nodes, [vi("x", [1000])], [vi("y", [1000])],
                               {"w": np.zeros((10, 100), np.float32), "s": np.array([1000], np.int64)}))
    assert infer_types(g).static_shape(g.outputs[0]) == (1000,)


def test_merge_of_identical_constants_keeps_the_inference_minus_removed_names(monkeypatch):
    from passes.dedupe_initializers import DedupeInitializers

    calls, seen = counting(monkeypatch), []
    w = np.arange(4, dtype=np.float32)
    g, _ = to_graph(make_model([H("Add", ["x", "a"], ["s"]), H("Mul", ["s", "b"], ["y"])],
                               [vi("x", [4])], [vi("y", [4])], {"a": w, "b": w.copy()}))

    class Names(Pass):
        name = "names"

        def call(self, graph):
            tm = infer_types(graph)
            seen.append(({"a", "b", "s", "x", "y"} & set(tm.elem), tm.static_shape(graph.outputs[0])))
            return PassResult(False, {})

    rep = PassManager([Names(), DedupeInitializers(), Names()]).run(g)
    assert [r.modified for r in rep.records][:3] == [False, True, False]
    # one inference: reused after the merge, without the merged-away name
    assert len(calls) == 1
    assert seen[0] == ({"a", "b", "s", "x", "y"}, (4,))
    assert seen[1] in (({"a", "s", "x", "y"}, (4,)), ({"b", "s", "x", "y"}, (4,)))
    # the same as inference computed afresh on the merged graph
    fresh = shapes._infer_types(g)
    assert set(fresh.elem) & {"a", "b", "s", "x", "y"} == seen[1][0]


def test_skeleton_reuses_a_node_export_only_while_the_node_is_the_same():
    from passes.convert import export_skeleton

    g, _ = to_graph(make_model([H("LeakyRelu", ["x"], ["y"], alpha=0.0)], [vi("x", [2])], [vi("y", [2])]))
    node = g.nodes[0]

    def alpha():
        return export_skeleton(g, 1024).graph.node[0].attribute[0]

    first = alpha()
    assert first.f == 0.0 and str(first.f) == "0.0"
    node.attrs["alpha"] = -0.0  # equal as a float, other bits: exported anew
    assert str(alpha().f) == "-0.0"
    node.attrs["alpha"] = 0.5
    assert alpha().f == 0.5
    node.outputs[0].name = "z"
    assert export_skeleton(g, 1024).graph.node[0].output == ["z"]


def _reshape_chain_model():
    """x [2, 3] -> Cast(to float) -> c -> Reshape(to [3, 2]) -> r -> Relu -> y."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, 2])
    return make_model([H("Cast", ["x"], ["c"], to=TensorProto.FLOAT), H("Reshape", ["c", "shape"], ["r"]),
                       H("Relu", ["r"], ["y"])], [vi("x", [2, 3])], [vi("y", ["a", "b"])], [shape])


class LyingPass(Pass):
    """Rewires Relu to read the Cast's output ([2, 3], not [3, 2]) and claims that
    every tensor kept its type: a later reuse of the inference is then wrong about y."""

    name = "lying_types_kept"
    idempotent = False

    def call(self, graph):
        relu = next(n for n in graph.nodes if n.op == "Relu")
        relu.inputs[0] = next(n for n in graph.nodes if n.op == "Cast").outputs[0]
        return PassResult(True, {"rewired": 1}, types_kept=True)


class AskTypes(Pass):
    name = "ask_types"
    idempotent = False

    def call(self, graph):
        infer_types(graph)
        return PassResult(False, {})


def test_a_pass_that_wrongly_declares_types_kept_is_caught_when_each_pass_is_checked():
    g, _ = to_graph(_reshape_chain_model())
    PassManager([AskTypes(), LyingPass(), AskTypes()], max_rounds=1).run(g)  # trusted: no recomputation
    g, _ = to_graph(_reshape_chain_model())
    with pytest.raises(PassError, match="lying_types_kept declared that it kept every tensor's type, but 'y'"):
        PassManager([AskTypes(), LyingPass(), AskTypes()], max_rounds=1, check_idempotent=True).run(g)


def test_the_passes_that_declare_types_kept_keep_them():
    """A nop Cast, x + 0, an Unsqueeze chain and Unsqueeze(Squeeze): each pass that removes
    them declares types kept; with every pass checked, each reused inference is recomputed."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    a0 = helper.make_tensor("a0", TensorProto.INT64, [1], [0])
    a1 = helper.make_tensor("a1", TensorProto.INT64, [1], [1])
    model = make_model([H("Cast", ["x"], ["c"], to=TensorProto.FLOAT), H("Add", ["c", "zero"], ["s"]),
                        H("Unsqueeze", ["s", "a0"], ["u1"]), H("Unsqueeze", ["u1", "a1"], ["u2"]),
                        H("Squeeze", ["u2", "a1"], ["q"]), H("Unsqueeze", ["q", "a1"], ["u3"]),
                        H("Relu", ["u3"], ["y"])],
                       [vi("x", [2, 3])], [vi("y", ["a", "b", "c", "d"])], [zero, a0, a1])
    g, _ = to_graph(model)
    names = ["eliminate_nop_ops", "eliminate_neutral_elementwise", "merge_unsqueeze"]
    report = PassManager([AskTypes(), *(get_pass(n)() for n in names), AskTypes()], max_rounds=2,
                         check_idempotent=True).run(g)
    done = {r.name: r.stats for r in report.records if r.modified}
    assert set(done) == set(names), done
