"""``passes.train_step``: the eval graph's losses and the train step's
optimizer update, on ONNX Runtime, against numpy references.

Tiny hand-built linear models (logits = x @ W + b) so that the gradient is
known in closed form: d loss / d logits = G (per loss), dW = x^T G, db = sum G.
A classifier [N, C] with a dynamic batch, and a token classifier [B, S, C]
with int64 labels [B, S] and ``ignore_index`` positions.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.convert import to_graph, to_model
from passes.gradient import GradientError
from passes.train_step import LossSpec, OptimizerSpec, build_eval, build_train_step

F, C = 5, 4
IGNORE = -100
PARAMS = ("W", "b")


# --------------------------------------------------------------------------- models


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"W": (r.standard_normal((F, C)) * 0.5).astype(np.float32),
            "b": (r.standard_normal(C) * 0.1).astype(np.float32)}


def linear_model(x_shape=("N", F), out_shape=("N", C), extra_nodes=(), extra_inputs=(), extra_outputs=(),
                 names=("x", "h", "logits")) -> onnx.ModelProto:
    """logits = x @ W + b, W and b initializers; ``names``: x, the MatMul output, the logits."""
    x, h, y = names
    nodes = [helper.make_node("MatMul", [x, "W"], [h]), helper.make_node("Add", [h, "b"], [y]), *extra_nodes]
    inits = [numpy_helper.from_array(v, k) for k, v in _weights().items()]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(x_shape)),
                                            *extra_inputs],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, list(out_shape)), *extra_outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def token_model() -> onnx.ModelProto:
    return linear_model(("B", "S", F), ("B", "S", C))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def eval_session(model: onnx.ModelProto, loss: str, label: str = "labels") -> ort.InferenceSession:
    graph, env = to_graph(model)
    ev, _, _ = build_eval(graph, list(PARAMS), LossSpec(loss, "logits", label, IGNORE))
    return _session(to_model(ev, env))


def train_session(model: onnx.ModelProto, loss: str, opt: OptimizerSpec, label: str = "labels"):
    graph, env = to_graph(model)
    ts = build_train_step(graph, list(PARAMS), LossSpec(loss, "logits", label, IGNORE), opt)
    return _session(to_model(ts.train, env)), ts


# --------------------------------------------------------------------------- numpy references (float64)


def _softmax(y):
    e = np.exp(y - y.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_loss_and_grad(kind: str, y: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    """The loss of logits ``y`` against label ``t``, and d loss / d y."""
    y = y.astype(np.float64)
    if kind == "ce":
        keep = t != IGNORE
        safe = np.where(keep, t, 0)
        p = _softmax(y)
        logp = np.log(p)
        picked = np.take_along_axis(logp, safe[..., None], -1)[..., 0]
        count = max(int(keep.sum()), 1)
        onehot = np.eye(y.shape[-1])[safe]
        return float(-(picked * keep).sum() / count), (p - onehot) * keep[..., None] / count
    t = t.astype(np.float64)
    n = y.size
    if kind == "mse":
        return float(((y - t) ** 2).mean()), 2 * (y - t) / n
    if kind == "l1":
        return float(np.abs(y - t).mean()), np.sign(y - t) / n
    if kind == "bce":  # the textbook form (the graph uses the stable one)
        s = 1 / (1 + np.exp(-y))
        return float(-(t * np.log(s) + (1 - t) * np.log(1 - s)).mean()), (s - t) / n
    raise AssertionError(kind)


def ref_forward(x, w):
    return x.astype(np.float64) @ w["W"].astype(np.float64) + w["b"].astype(np.float64)


def ref_param_grads(x, G) -> dict[str, np.ndarray]:
    x2 = x.reshape(-1, F).astype(np.float64)
    G2 = G.reshape(-1, C)
    return {"W": x2.T @ G2, "b": G2.sum(0)}


def ref_adamw(w, g, m, v, lr, step, b1, b2, eps, wd):
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    w2 = w * (1 - lr * wd) - lr / bc1 * m2 / (np.sqrt(v2) / np.sqrt(bc2) + eps)
    return w2, m2, v2


def ref_sgd(w, g, buf, lr, momentum, wd):
    d = g + wd * w
    if momentum:
        d = momentum * buf + d
    return w - lr * d, d


def _labels(kind: str, shape_y, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    if kind == "ce":
        return r.integers(0, C, shape_y[:-1]).astype(np.int64)
    if kind == "bce":
        return (r.random(shape_y) > 0.5).astype(np.float32)
    t = r.standard_normal(shape_y).astype(np.float32)
    return t


def _x(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- the eval graph: each loss


@pytest.mark.parametrize("kind", ["ce", "mse", "bce", "l1"])
def test_eval_loss_matches_numpy(kind):
    label = "labels" if kind == "ce" else "target"
    sess = eval_session(linear_model(), kind, label)
    assert [o.name for o in sess.get_outputs()] == ["loss", "logits"]
    w = _weights()
    for n, seed in ((6, 1), (3, 2)):  # two batch sizes on one session
        x = _x((n, F), seed)
        t = _labels(kind, (n, C), seed)
        loss, logits = sess.run(None, {"x": x, label: t, **w})
        assert loss.shape == () and logits.shape == (n, C)
        y = ref_forward(x, w)
        np.testing.assert_allclose(logits, y, rtol=1e-5, atol=1e-6)
        want, _ = ref_loss_and_grad(kind, y, t)
        assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_eval_label_input_types():
    graph, _ = to_graph(token_model())
    _, ldt, lshape = build_eval(graph, list(PARAMS), LossSpec("ce", "logits", "labels"))
    assert ldt == np.int64 and len(lshape) == 2  # [B, S]: the logits' shape without the classes
    graph, _ = to_graph(linear_model())
    _, ldt, lshape = build_eval(graph, list(PARAMS), LossSpec("mse", "logits", "target"))
    assert ldt == np.float32 and len(lshape) == 2


def test_token_level_ce_with_ignore_index():
    sess = eval_session(token_model(), "ce")
    w = _weights()
    x = _x((3, 7, F), 4)
    t = _labels("ce", (3, 7, C), 4)
    t[0, 5:] = IGNORE  # padding at the end of sequences
    t[2, :] = IGNORE
    t[1, 0] = IGNORE
    assert 0 < (t != IGNORE).sum() < t.size
    loss, logits = sess.run(None, {"x": x, "labels": t, **w})
    assert logits.shape == (3, 7, C)
    want, _ = ref_loss_and_grad("ce", ref_forward(x, w), t)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    # The mean is over the counted positions only: the ignored ones' logits do not matter.
    x2 = x.copy()
    x2[t == IGNORE] = 100.0
    loss2, _ = sess.run(None, {"x": x2, "labels": t, **w})
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6, abs=1e-7)
    # A sequence length other than the first: dims stay dynamic.
    x3, t3 = _x((2, 3, F), 5), _labels("ce", (2, 3, C), 5)
    loss3, _ = sess.run(None, {"x": x3, "labels": t3, **w})
    assert float(loss3) == pytest.approx(ref_loss_and_grad("ce", ref_forward(x3, w), t3)[0], rel=1e-5, abs=1e-6)


def test_all_ignored_batch_is_zero_loss_without_nan():
    w = _weights()
    x = _x((2, 4, F), 6)
    t = np.full((2, 4), IGNORE, np.int64)
    loss, _ = eval_session(token_model(), "ce").run(None, {"x": x, "labels": t, **w})
    assert np.isfinite(loss) and float(loss) == 0.0
    # The train step too: a zero gradient, so AdamW (zero state) and SGD leave the weights as they are.
    for opt in (OptimizerSpec("adamw"), OptimizerSpec("sgd", momentum=0.9)):
        sess, ts = train_session(token_model(), "ce", opt)
        feeds = {"x": x, "labels": t, "lr": np.asarray(0.1, np.float32), "step": np.asarray(1, np.float32), **w}
        feeds.update({s: np.zeros_like(w[p]) for p in PARAMS for s in ts.state[p]})
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        assert float(outs["loss"]) == 0.0
        for name, v in outs.items():
            assert np.all(np.isfinite(v)), (opt.kind, name)
        for p in PARAMS:
            np.testing.assert_array_equal(outs[p + ".next"], w[p])
            for s in ts.state[p]:
                np.testing.assert_array_equal(outs[s + ".next"], 0)


# --------------------------------------------------------------------------- the train step: optimizers


def _run_step(sess, ts, x, t, label, w, state, lr, step) -> dict[str, np.ndarray]:
    feeds = {"x": x, label: t, "lr": np.asarray(lr, np.float32), "step": np.asarray(step, np.float32), **w, **state}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _check_next(got: np.ndarray, want: np.ndarray, before: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=what)
    # and the update itself (so a small error in a small step is not hidden by the weight)
    np.testing.assert_allclose(got.astype(np.float64) - before, want - before, rtol=2e-3, atol=2e-6, err_msg=what)


ADAM_CASES = [  # weight decay, step, given state
    (0.0, 1, False),
    (0.05, 1, False),
    (0.0, 5, True),
    (0.05, 5, True),
]


@pytest.mark.parametrize("wd,step,with_state", ADAM_CASES)
def test_adamw_step_matches_numpy(wd, step, with_state):
    b1, b2, eps, lr = 0.8, 0.95, 1e-6, 0.05
    opt = OptimizerSpec("adamw", (b1, b2), eps, wd)
    sess, ts = train_session(linear_model(), "ce", opt)
    assert ts.state == {p: [f"{p}.adam_m", f"{p}.adam_v"] for p in PARAMS}
    names = [o.name for o in sess.get_outputs()]
    assert names == ["loss", "W.next", "W.adam_m.next", "W.adam_v.next", "b.next", "b.adam_m.next", "b.adam_v.next"]
    w = _weights()
    r = np.random.default_rng(10 + step)
    state = {}
    for p in PARAMS:
        m = (r.standard_normal(w[p].shape) * 0.1) if with_state else np.zeros(w[p].shape)
        v = r.uniform(0.01, 0.1, w[p].shape) if with_state else np.zeros(w[p].shape)
        state[f"{p}.adam_m"], state[f"{p}.adam_v"] = m.astype(np.float32), v.astype(np.float32)
    for n in (6, 3):  # the dynamic batch is kept
        x, t = _x((n, F), n), _labels("ce", (n, C), n)
        outs = _run_step(sess, ts, x, t, "labels", w, state, lr, step)
        y = ref_forward(x, w)
        loss, G = ref_loss_and_grad("ce", y, t)
        assert float(outs["loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
        grads = ref_param_grads(x, G)
        for p in PARAMS:
            m, v = (state[f"{p}.adam_m"].astype(np.float64), state[f"{p}.adam_v"].astype(np.float64))
            w2, m2, v2 = ref_adamw(w[p].astype(np.float64), grads[p], m, v, lr, step, b1, b2, eps, wd)
            assert outs[p + ".next"].dtype == np.float32 and outs[p + ".next"].shape == w[p].shape
            _check_next(outs[p + ".next"], w2, w[p], f"{p} (batch {n})")
            np.testing.assert_allclose(outs[p + ".adam_m.next"], m2, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(outs[p + ".adam_v.next"], v2, rtol=1e-5, atol=1e-9)


def test_adamw_bias_correction_counts_steps_from_one():
    # At step 1 with zero state, AdamW moves every weight by lr * g/|g| (plus eps): the
    # bias corrections undo the (1 - beta) factors exactly.
    lr = 0.01
    sess, ts = train_session(linear_model(), "mse", OptimizerSpec("adamw", eps=1e-12), label="target")
    w = _weights()
    x, t = _x((4, F), 3), _labels("mse", (4, C), 3)
    zeros = {s: np.zeros_like(w[p]) for p in PARAMS for s in ts.state[p]}
    outs = _run_step(sess, ts, x, t, "target", w, zeros, lr, 1)
    _, G = ref_loss_and_grad("mse", ref_forward(x, w), t)
    grads = ref_param_grads(x, G)
    for p in PARAMS:
        np.testing.assert_allclose(w[p] - outs[p + ".next"], lr * np.sign(grads[p]), rtol=1e-3, atol=1e-7)


SGD_CASES = [  # momentum, weight decay
    (0.0, 0.0),
    (0.9, 0.0),
    (0.0, 0.1),
    (0.9, 0.1),
]


@pytest.mark.parametrize("momentum,wd", SGD_CASES)
@pytest.mark.parametrize("kind", ["mse", "bce", "l1"])
def test_sgd_step_matches_numpy(kind, momentum, wd):
    lr = 0.3
    sess, ts = train_session(linear_model(), kind, OptimizerSpec("sgd", weight_decay=wd, momentum=momentum),
                             label="target")
    assert ts.state == {p: ([f"{p}.momentum"] if momentum else []) for p in PARAMS}
    w = _weights()
    r = np.random.default_rng(7)
    state = {f"{p}.momentum": (r.standard_normal(w[p].shape) * 0.1).astype(np.float32)
             for p in PARAMS} if momentum else {}
    for n in (5, 2):
        x, t = _x((n, F), 20 + n), _labels(kind, (n, C), 20 + n)
        outs = _run_step(sess, ts, x, t, "target", w, state, lr, 3)
        y = ref_forward(x, w)
        loss, G = ref_loss_and_grad(kind, y, t)
        assert float(outs["loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
        grads = ref_param_grads(x, G)
        for p in PARAMS:
            buf = state[f"{p}.momentum"].astype(np.float64) if momentum else None
            w2, d = ref_sgd(w[p].astype(np.float64), grads[p], buf, lr, momentum, wd)
            _check_next(outs[p + ".next"], w2, w[p], f"{kind} {p} (batch {n})")
            if momentum:
                np.testing.assert_allclose(outs[p + ".momentum.next"], d, rtol=1e-5, atol=1e-7)
            else:
                assert f"{p}.momentum.next" not in outs


def test_token_ce_train_step_ignores_padding():
    lr = 0.5
    sess, ts = train_session(token_model(), "ce", OptimizerSpec("sgd", momentum=0.5))
    w = _weights()
    state = {f"{p}.momentum": np.zeros_like(w[p]) for p in PARAMS}
    for b, s in ((2, 5), (3, 2)):  # batch and sequence length both dynamic
        x, t = _x((b, s, F), b * s), _labels("ce", (b, s, C), b * s)
        t[0, -1] = IGNORE
        t[-1, 0] = IGNORE
        outs = _run_step(sess, ts, x, t, "labels", w, state, lr, 1)
        loss, G = ref_loss_and_grad("ce", ref_forward(x, w), t)
        assert float(outs["loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
        grads = ref_param_grads(x, G)
        for p in PARAMS:
            w2, d = ref_sgd(w[p].astype(np.float64), grads[p], np.zeros(w[p].shape), lr, 0.5, 0.0)
            _check_next(outs[p + ".next"], w2, w[p], f"{p} ({b}x{s})")
            np.testing.assert_allclose(outs[p + ".momentum.next"], d, rtol=1e-5, atol=1e-7)
        # ignored positions carry no gradient: changing their inputs changes nothing
        x2 = x.copy()
        x2[t == IGNORE] = 9.0
        outs2 = _run_step(sess, ts, x2, t, "labels", w, state, lr, 1)
        for p in PARAMS:
            np.testing.assert_allclose(outs2[p + ".next"], outs[p + ".next"], rtol=1e-6, atol=1e-7)


def test_train_step_interface():
    graph, env = to_graph(linear_model())
    before = to_model(graph, env).SerializeToString()
    n_nodes, in_names = len(graph.nodes), [t.name for t in graph.inputs]
    ts = build_train_step(graph, list(PARAMS), LossSpec("ce", "logits", "labels"), OptimizerSpec("adamw"))
    # the graph given is left as it was
    assert len(graph.nodes) == n_nodes and [t.name for t in graph.inputs] == in_names
    assert to_model(graph, env).SerializeToString() == before
    assert ts.params == list(PARAMS) and ts.backward_nodes > 0 and ts.optimizer_nodes > 0 and ts.unreached == []
    sess = _session(to_model(ts.train, env))
    ins = {i.name: i for i in sess.get_inputs()}
    assert set(ins) == {"x", "labels", "lr", "step", "W", "b", "W.adam_m", "W.adam_v", "b.adam_m", "b.adam_v"}
    assert ins["lr"].shape == [] and ins["step"].shape == [] and ins["lr"].type == "tensor(float)"
    assert ins["labels"].type == "tensor(int64)" and isinstance(ins["labels"].shape[0], str)  # the batch stays dynamic
    assert isinstance(ins["x"].shape[0], str)
    ev = _session(to_model(ts.eval, env))
    assert {i.name for i in ev.get_inputs()} == {"x", "labels", "W", "b"}


# --------------------------------------------------------------------------- name clashes


def _relu_named(name: str) -> onnx.ModelProto:
    """The linear model with an extra output ``name`` = Relu(logits)."""
    return linear_model(extra_nodes=[helper.make_node("Relu", ["logits"], [name])],
                        extra_outputs=[helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", C])])


def _build(model, label="labels", opt=OptimizerSpec()):
    graph, _ = to_graph(model)
    return build_train_step(graph, list(PARAMS), LossSpec("ce", "logits", label), opt)


def test_a_model_tensor_named_loss_is_refused():
    with pytest.raises(GradientError, match="'?loss'?"):
        _build(_relu_named("loss"))
    graph, _ = to_graph(_relu_named("loss"))
    with pytest.raises(GradientError, match="loss"):
        build_eval(graph, list(PARAMS), LossSpec("ce", "logits", "labels"))
    # the intermediate MatMul output called loss: the same
    with pytest.raises(GradientError, match="loss"):
        _build(linear_model(names=("x", "loss", "logits")))


def test_a_model_input_named_lr_or_step_is_refused():
    for name in ("lr", "step"):
        model = linear_model(names=(name, "h", "logits"))
        with pytest.raises(GradientError, match=name):
            _build(model)
        graph, _ = to_graph(model)
        build_eval(graph, list(PARAMS), LossSpec("ce", "logits", "labels"))  # the eval graph has no lr/step: fine


def test_other_clashes_are_refused():
    with pytest.raises(GradientError, match="labels"):  # the label
        _build(_relu_named("labels"))
    with pytest.raises(GradientError, match=r"W\.next"):  # an output of the step
        _build(_relu_named("W.next"))
    with pytest.raises(GradientError, match=r"b\.adam_m"):  # optimizer state
        _build(_relu_named("b.adam_m"))
    with pytest.raises(GradientError, match=r"W\.momentum"):
        _build(_relu_named("W.momentum"), opt=OptimizerSpec("sgd", momentum=0.9))
    _build(_relu_named("W.momentum"), opt=OptimizerSpec("sgd"))  # no momentum: no such state, no clash


def test_bad_specs_are_gradient_errors():
    with pytest.raises(GradientError, match="optimizer"):
        _build(linear_model(), opt=OptimizerSpec("lamb"))
    graph, _ = to_graph(linear_model())
    with pytest.raises(GradientError, match="nope"):
        build_train_step(graph, list(PARAMS), LossSpec("ce", "nope", "labels"))
    with pytest.raises(GradientError, match="hinge"):
        build_train_step(graph, list(PARAMS), LossSpec("hinge", "logits", "target"))
    with pytest.raises(GradientError, match="rank"):  # ce on a rank-1 output
        m = linear_model(extra_nodes=[helper.make_node("ReduceSum", ["logits"], ["s"], keepdims=0)],
                         extra_outputs=[helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
        g2, _ = to_graph(m)
        build_train_step(g2, list(PARAMS), LossSpec("ce", "s", "labels"))
