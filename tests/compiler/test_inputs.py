"""Generated verification inputs (beats_compiler/inputs.py): values and dims follow
how the graph uses each input (issue 14)."""

import io
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import beats_compiler
from beats_compiler import InputError
from beats_compiler.inputs import Analysis, InputGenerator, integer_bounds, random_samples, summary_line
from beats_compiler.verify import pick_generated, verify

H = helper.make_node
F, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(0)


def vi(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def model(nodes, inputs, outputs, inits=None):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def session(m):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def generated(m):
    """The candidate verification picks, the generator and the original's outputs."""
    s = session(m)
    gen = InputGenerator(s.get_inputs(), m)
    cand, out = pick_generated(s, gen)
    return cand, gen, out


def attention(mask_nodes, mask_out, mask_input, inits):
    """scores [B, 2, S, S] = q q^T; + the mask's contribution (``mask_out`` [B, 1, 1, S]);
    softmax; the float output is NaN where a row is fully masked."""
    nodes = [H("Transpose", ["q"], ["qt"], perm=[0, 1, 3, 2]), H("MatMul", ["q", "qt"], ["scores"]), *mask_nodes,
             H("Add", ["scores", mask_out], ["masked"]), H("Softmax", ["masked"], ["y"], axis=-1)]
    return model(nodes, [vi("q", F, ["B", 2, "S", 4]), mask_input], [vi("y", F, ["B", 2, "S", "S"])], inits)


# --- integer ranges -----------------------------------------------------------


def test_gather_table_bounds_indices_and_covers_the_table():
    m = model([H("Gather", ["emb", "ids"], ["y"])], [vi("ids", I64, ["B", "S"])], [vi("y", F, ["B", "S", 4])],
              {"emb": RNG.standard_normal((30, 4)).astype(np.float32)})
    cand, gen, _ = generated(m)
    ids = cand.feeds["ids"]
    assert ids.min() >= 0 and ids.max() < 30 and ids.max() >= 4  # the whole table, not just 0..3
    assert gen.describe(cand)["ids"] == "int64 [2,3] in 0..29 (Gather table of 30 rows)"
    assert integer_bounds(m) == {"ids": 30}


def test_gather_through_add_of_a_constant_keeps_the_offset_inside_the_table():
    m = model([H("Add", ["pos", "two"], ["p2"]), H("Gather", ["emb", "p2"], ["y"])],
              [vi("pos", I64, [3, 5])], [vi("y", F, [3, 5, 4])],
              {"emb": RNG.standard_normal((8, 4)).astype(np.float32), "two": np.array(2, np.int64)})
    assert integer_bounds(m) == {"pos": 6}
    r = beats_compiler.compile(m, measure_latency=False)
    assert r.report.verified


def test_onehot_depth_bounds_indices():
    m = model([H("OneHot", ["idx", "depth", "vals"], ["y"], axis=-1)], [vi("idx", I64, ["N"])], [vi("y", F, ["N", 3])],
              {"depth": np.array(3, np.int64), "vals": np.array([0, 1], np.float32)})
    plan = Analysis(m).plans["idx"]
    assert (plan.kind, plan.low, plan.high) == ("ints", 0, 3) and "OneHot depth 3" in plan.why
    cand, _, out = generated(m)
    assert cand.feeds["idx"].max() < 3 and np.all(out[0].sum(-1) == 1)  # every index hit a column


def test_range_operands_stay_small_and_the_delta_positive():
    m = model([H("Range", ["start", "limit", "delta"], ["y"])],
              [vi("start", I64, []), vi("limit", I64, []), vi("delta", I64, [])], [vi("y", I64, ["K"])])
    plans = Analysis(m).plans
    assert (plans["start"].low, plans["start"].high) == (0, 4)
    assert (plans["delta"].low, plans["delta"].high) == (1, 4)  # 0 would be an error
    assert beats_compiler.compile(m, measure_latency=False).report.verified


# --- masks --------------------------------------------------------------------


def _check_mask(a):
    assert set(np.unique(a).tolist()) <= {0, 1}
    rows = a.reshape(-1, a.shape[-1])
    assert np.all(rows[:, 0] == 1) and (rows == 0).any() and rows.mean() > 0.5


def test_mask_cast_to_bool_gets_0_1_mostly_1():
    """Where(bool(mask), scores, -inf): random 0..3 masks give fully masked rows (NaN)."""
    neg = np.array(-np.inf, np.float32)
    m = attention([H("Unsqueeze", ["mask", "axes"], ["m4"]), H("Cast", ["m4"], ["mb"], to=TensorProto.BOOL),
                   H("Where", ["mb", "zero", "neg"], ["madd"])], "madd", vi("mask", I64, ["B", "S"]),
                  {"axes": np.array([1, 2], np.int64), "zero": np.array(0, np.float32), "neg": neg})
    cand, gen, out = generated(m)
    _check_mask(cand.feeds["mask"])
    assert np.isfinite(out[0]).all() and not cand.rejected
    assert gen.describe(cand)["mask"] == "int64 [2,3] mask 0/1, mostly 1 (Cast to bool)"


def test_extended_attention_mask_pattern_is_a_float_mask():
    """BERT's (1 - mask) * -10000 on a float mask: 0.0/1.0."""
    m = attention([H("Unsqueeze", ["mask", "axes"], ["m4"]), H("Sub", ["one", "m4"], ["inv"]),
                   H("Mul", ["inv", "big"], ["madd"])], "madd", vi("mask", F, ["B", "S"]),
                  {"axes": np.array([1, 2], np.int64), "one": np.array(1, np.float32),
                   "big": np.array(-10000, np.float32)})
    cand, gen, _ = generated(m)
    assert cand.feeds["mask"].dtype == np.float32
    _check_mask(cand.feeds["mask"])
    assert "mask 0.0/1.0" in gen.describe(cand)["mask"] and "(1 - mask) * large" in gen.describe(cand)["mask"]
    # a float input that is merely compared is data, not a mask
    m2 = model([H("Greater", ["x", "zero"], ["c"]), H("Where", ["c", "x", "zero"], ["y"])],
               [vi("x", F, [4, 5])], [vi("y", F, [4, 5])], {"zero": np.array(0, np.float32)})
    cand2, _, _ = generated(m2)
    assert (cand2.feeds["x"] < 0).any() and Analysis(m2).plans["x"].kind == "normal"


def test_an_index_that_is_also_compared_stays_an_index():
    m = model([H("Gather", ["emb", "ids"], ["e"]), H("Equal", ["ids", "pad"], ["isp"]),
               H("Cast", ["isp"], ["f"], to=F), H("Unsqueeze", ["f", "ax"], ["f3"]), H("Mul", ["e", "f3"], ["y"])],
              [vi("ids", I64, [2, 6])], [vi("y", F, [2, 6, 4])],
              {"emb": RNG.standard_normal((50, 4)).astype(np.float32), "pad": np.array(0, np.int64),
               "ax": np.array([2], np.int64)})
    plan = Analysis(m).plans["ids"]
    assert (plan.kind, plan.high) == ("ints", 50)


# --- symbolic dims: KV cache --------------------------------------------------


def kv_model(unknown_new: bool = False, offset_on_empty: bool = False):
    """past [B, 2, P, 4] ++ new [B, 2, S, 4] along axis 2 -> k [B, 2, P+S, 4];
    scores [B, 2, S, P+S] + (1 - mask[B, T]) * -1e4 reshaped to [B, 1, 1, T]:
    T must be P + S.  The present's dim is left unnamed (nothing declares T = P + S).
    ``unknown_new``: the new keys come from a Reshape, so shape inference loses S.
    ``offset_on_empty``: add 1 to the output when P == 0 (a result that is wrong
    only on an empty cache)."""
    nodes = []
    if unknown_new:
        nodes.append(H("Reshape", ["x", "shape4"], ["new"]))
    else:
        nodes.append(H("Relu", ["x"], ["new"]))
    nodes += [H("Concat", ["past", "new"], ["k"], axis=2), H("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              H("MatMul", ["x", "kt"], ["scores"]),
              H("Unsqueeze", ["mask", "axes"], ["m4"]), H("Cast", ["m4"], ["mf"], to=F),
              H("Sub", ["one", "mf"], ["inv"]), H("Mul", ["inv", "big"], ["madd"]),
              H("Add", ["scores", "madd"], ["masked"]), H("Softmax", ["masked"], ["probs"], axis=-1),
              H("MatMul", ["probs", "k"], ["y0"])]
    inits = {"axes": np.array([1, 2], np.int64), "one": np.array(1, np.float32),
             "big": np.array(-1e4, np.float32), "shape4": np.array([0, 2, -1, 4], np.int64)}
    if offset_on_empty:
        nodes += [H("Shape", ["past"], ["ps"]), H("Gather", ["ps", "two"], ["p"]), H("Equal", ["p", "zero"], ["empty"]),
                  H("Cast", ["empty"], ["ef"], to=F), H("Add", ["y0", "ef"], ["y"])]
        inits.update(two=np.array(2, np.int64), zero=np.array(0, np.int64))
    else:
        nodes.append(H("Identity", ["y0"], ["y"]))
    return model(nodes, [vi("x", F, ["B", 2, "S", 4]), vi("past", F, ["B", 2, "P", 4]), vi("mask", I64, ["B", "T"])],
                 [vi("y", F, ["B", 2, "S", 4]), vi("k", F, ["B", 2, None, 4])], inits)


@pytest.mark.parametrize("unknown_new", [False, True], ids=["inferred", "reshaped"])
def test_kv_cache_concat_relates_total_to_past_plus_new(unknown_new):
    m = kv_model(unknown_new)
    cand, gen, out = generated(m)
    x, past, mask = cand.feeds["x"], cand.feeds["past"], cand.feeds["mask"]
    assert mask.shape[1] == past.shape[2] + x.shape[2]
    assert past.shape[2] != x.shape[2] and past.shape[2] > 0  # each free dim its own size
    assert not cand.rejected and np.isfinite(out[0]).all()
    dims = gen.describe(cand)["<dims>"]
    assert "T = P + S (Concat)" in dims, dims
    assert gen.kv_symbols == ["P"]
    r = beats_compiler.compile(m, measure_latency=False)
    assert r.report.verified and "T = P + S" in r.report.verify_inputs_generated["<dims>"]


def test_zero_length_past_is_verified_too():
    m = kv_model()
    cand, gen, _ = generated(m)
    zero = gen.zero_past(cand)
    assert zero.feeds["past"].shape[2] == 0 and zero.feeds["mask"].shape[1] == zero.feeds["x"].shape[2]
    session(m).run(None, zero.feeds)  # the empty cache is a valid input
    ver = verify(m, m, measure_latency=False)
    assert ver.verified and "P = 0 also verified" in ver.generated["<dims>"]
    # a result that is wrong only on an empty cache fails verification
    bad = verify(kv_model(offset_on_empty=False), kv_model(offset_on_empty=True), measure_latency=False)
    assert not bad.verified
    assert any("P = 0" in o.detail for o in bad.outputs if not o.ok), [o.detail for o in bad.outputs]


def test_concat_of_two_inputs_relates_dims_but_is_no_kv_cache():
    """a [N, 4] ++ b [M, 4] added to c [K, 4]: K = N + M; plain inputs joined are not
    a cache, so no empty-past run."""
    m = model([H("Concat", ["a", "b"], ["ab"], axis=0), H("Add", ["ab", "c"], ["y"])],
              [vi("a", F, ["N", 4]), vi("b", F, ["M", 4]), vi("c", F, ["K", 4])], [vi("y", F, [None, 4])])
    cand, gen, _ = generated(m)
    assert cand.feeds["c"].shape[0] == cand.feeds["a"].shape[0] + cand.feeds["b"].shape[0] and not cand.rejected
    assert gen.kv_symbols == [] and gen.zero_past(cand) is None


def test_without_a_relation_dims_stay_distinct_as_before():
    m = model([H("Add", ["a", "b"], ["y"])], [vi("a", F, ["N", "M"]), vi("b", F, ["N", "M"])], [vi("y", F, ["N", "M"])])
    cand, gen, _ = generated(m)
    assert cand.feeds["a"].shape == (2, 3) and gen.describe(cand)["<dims>"] == "N=2, M=3"


def test_deterministic():
    m = kv_model(True)
    a, _, _ = generated(m)
    b, _, _ = generated(m)
    assert a.symbols == b.symbols and all(np.array_equal(a.feeds[k], b.feeds[k]) for k in a.feeds)


# --- no safe input -------------------------------------------------------------


def test_no_safe_input_is_one_line_naming_the_input():
    """The original needs b of length 5: no generated binding has it."""
    m = model([H("Reshape", ["b", "five"], ["r"], name="reshape_b"), H("Add", ["r", "c"], ["y"]),
               H("Identity", ["a"], ["a2"])],
              [vi("a", F, ["N"]), vi("b", F, ["M"]), vi("c", F, [5])], [vi("y", F, [5]), vi("a2", F, ["N"])],
              {"five": np.array([5], np.int64)})
    with pytest.raises(InputError) as exc:
        verify(m, m, measure_latency=False)
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 200, msg
    assert "'b'" in msg and "--inputs" in msg and "Reshape" in msg, msg


# --- report, CLI, npu ----------------------------------------------------------


def test_report_and_cli_say_how_inputs_were_made(tmp_path):
    m = kv_model()
    r = beats_compiler.compile(m, measure_latency=False)
    gen = r.report.verify_inputs_generated
    assert gen["mask"].startswith("int64 [2,7] mask 0/1") and gen["past"] == "float32 [2,2,4,4] normal(0,1)"
    assert json.loads(r.report.to_json())["verify_inputs_generated"] == gen
    user = beats_compiler.compile(m, inputs={k: np.asarray(v) for k, v in
                                             generated(m)[0].feeds.items()}, measure_latency=False)
    assert user.report.verify_input_source == "user" and user.report.verify_inputs_generated == {}
    line = summary_line(gen)
    assert line.startswith("generated inputs: ") and "\n" not in line and "T = P + S" in line
    src = tmp_path / "kv.onnx"
    onnx.save(m, src)
    proc = subprocess.run([sys.executable, "-m", "beats_compiler.cli", str(src), "-o", str(tmp_path / "o.onnx"),
                           "--no-latency"], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("generated inputs:")]
    assert len(lines) == 1 and "mask 0/1" in lines[0], proc.stdout


def test_npu_random_calibration_uses_the_generator():
    from beats_compiler.targets import qnn as npu

    m = kv_model()
    samples = npu.random_samples(m, {"x": [1, 2, 3, 4], "past": [1, 2, 2, 4], "mask": [2, 5]}, 3, seed=0)
    assert len(samples) == 3
    for s in samples:
        _check_mask(s["mask"])
        assert s["x"].dtype == np.float32 and s["mask"].dtype == np.int64
    direct = random_samples(m, {"x": [1, 2, 3, 4], "past": [1, 2, 2, 4], "mask": [2, 5]}, 3, 0,
                            {"x": np.float32, "past": np.float32, "mask": np.int64})
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(samples, direct))


# --- real models (slow) --------------------------------------------------------


def _gpt2_with_past():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.cache_utils import DynamicCache

    from fixtures.exporters import torchscript_export

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, *flat):
            legacy = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2))
            cache = (DynamicCache.from_legacy_cache(legacy) if hasattr(DynamicCache, "from_legacy_cache")
                     else DynamicCache(legacy))
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            pk = out.past_key_values
            kv = pk.to_legacy_cache() if hasattr(pk, "to_legacy_cache") else [(lay.keys, lay.values) for lay in pk.layers]
            return (out.logits,) + tuple(t for pair in kv for t in pair)

    b, p, s = 2, 3, 4
    past = [torch.randn(b, 2, p, 16) for _ in range(4)]
    names_in = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
           "logits": {0: "batch", 1: "seq"}}
    dyn.update({n: {0: "batch", 2: "past_seq"} for n in names_in[2:]})
    dyn.update({n: {0: "batch", 2: "total_seq"} for n in names_out[1:]})
    buf = io.BytesIO()
    torchscript_export(WithPast(), (torch.randint(0, 100, (b, s)), torch.ones(b, p + s, dtype=torch.int64), *past),
                       buf, names_in, names_out, dyn)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.slow
def test_gpt2_with_past_key_values_verifies_without_inputs():
    m = _gpt2_with_past()
    r = beats_compiler.compile(m, measure_latency=False)
    gen = r.report.verify_inputs_generated
    assert r.report.verified, (r.report.outputs, gen)
    assert "total_seq = past_seq + seq (Concat)" in gen["<dims>"] and "past_seq = 0 also verified" in gen["<dims>"]
    assert "mask 0/1" in gen["attention_mask"] and "Gather table of 100 rows" in gen["input_ids"]


@pytest.mark.slow
def test_bert_with_attention_mask_verifies_with_finite_outputs():
    from fixtures.real_models import export_tiny_bert

    m = export_tiny_bert()
    r = beats_compiler.compile(m, measure_latency=False)
    assert r.report.verified and np.isfinite(r.report.max_abs_diff)
    cand, gen, out = generated(m)
    assert all(np.isfinite(o).all() for o in out) and not cand.rejected
    _check_mask(cand.feeds["attention_mask"])
    assert "mask 0/1" in r.report.verify_inputs_generated["attention_mask"]
