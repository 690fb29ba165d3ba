"""The serving API (beats_compiler.serving, issue 16): one adapter base, many
``.onnx_adapter`` files, one activated per call on ONNX Runtime.

- the base alone computes the original model; with an adapter active, the
  folded model for that adapter (max abs diff <= 1e-4), and no adapter equals
  the base; two adapters on one session, switched per call;
- every trap ORT does not catch is guarded, each test failing without its
  guard (and, where cheap, showing that raw ORT does fall into it): a partial
  adapter, an adapter of another base (names, shapes, dtypes, ranks), two
  adapters in one RunOptions, feeds naming adapter parameters, a LoraAdapter
  collected while a RunOptions refers to it, run_with_iobinding;
- the adapter table under concurrent load / run / unload.

The bases here are built by hand, exactly as the spec's ``make_base`` writes
them (overridable initializers + ``beats.adapter_base`` metadata; the last
test checks that against ``make_base``); the end-to-end test goes through
``beats_compiler.adapters``.
"""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from beats_compiler import InputError
from beats_compiler import adapters
from beats_compiler import reparam as api
from beats_compiler.serving import AdapterSession
from passes import reparam as rp
from tests.helpers import f32, make_model, vi

H = helper.make_node
ATOL = 1e-4  # base + adapter vs the folded model (the bar)


# --------------------------------------------------------------------------- models and files


def original() -> onnx.ModelProto:
    return make_model([H("MatMul", ["x", "w1"], ["h"], name="mm1"), H("Relu", ["h"], ["r"]),
                       H("MatMul", ["r", "w2"], ["y"], name="mm2")],
                      [vi("x", ["N", 32])], [vi("y", ["N", 40])],
                      {"w1": 0.2 * f32(32, 48, seed=1), "w2": 0.2 * f32(48, 40, seed=2)})


def inserted(fact: str, layout: str) -> onnx.ModelProto:
    policy = rp.Policy((rp.Rule(min_size=256, factorization=fact, layout=layout),))
    return api.insert(original(), policy, verify=False).model


def hand_base(model: onnx.ModelProto) -> onnx.ModelProto:
    """The spec's adapter base: every D/V/A/B a graph input with a default that
    makes the delta zero (V = 0; A [in, 0], B [0, out] under a symbolic rank)."""
    base = onnx.ModelProto()
    base.CopyFrom(model)
    inits = {t.name: t for t in base.graph.initializer}
    params = {}
    for r in api.get_records(base):
        shapes = rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)
        for key in ("D", "V", "A", "B"):
            name = getattr(r, key)
            if not name:
                continue
            arr, shape = numpy_helper.to_array(inits[name]), list(shapes[key])
            if key == "V":
                arr = np.zeros_like(arr)
            elif key == "A":
                arr, shape = np.zeros((shape[0], 0), arr.dtype), [shape[0], "beats_rank"]
            elif key == "B":
                arr, shape = np.zeros((0, shape[1]), arr.dtype), ["beats_rank", shape[1]]
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
            base.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(arr.dtype), shape))
            params[name] = {"dtype": str(arr.dtype), "shape": shape}
    base.metadata_props.append(onnx.StringStringEntryProto(
        key=adapters.BASE_KEY, value=json.dumps({"version": 1, "parameters": params})))
    return base


def trained(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Random nonzero D, V, A, B for every record, as if trained."""
    rng = np.random.default_rng(seed)
    ws = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    vals = {}
    for r in api.get_records(model):
        vals[r.D] = (1 + 0.3 * rng.standard_normal(ws[r.D].shape)).astype(np.float32)
        for n in (r.V, r.A, r.B):
            if n:
                vals[n] = (0.3 * rng.standard_normal(ws[n].shape)).astype(np.float32)
    return vals


def write_adapter(path: Path, values: dict[str, np.ndarray]) -> Path:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()})
    fmt.export_adapter(str(path))
    return path


def run_model(model: onnx.ModelProto, feeds) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


class Setup:
    def __init__(self, tmp: Path, fact: str = "rank:4", layout: str = "branch"):
        self.inserted = inserted(fact, layout)
        self.base_path = tmp / "m.base.onnx"
        onnx.save(hand_base(self.inserted), self.base_path)
        self.values = {name: trained(self.inserted, seed) for name, seed in (("a", 1), ("b", 2))}
        self.files = {name: write_adapter(tmp / f"{name}.onnx_adapter", v) for name, v in self.values.items()}
        rng = np.random.default_rng(7)
        self.feeds = {"x": rng.standard_normal((5, 32)).astype(np.float32)}
        self.original = run_model(original(), self.feeds)
        self.folded = {name: run_model(api.fold(self.inserted, v, verify=False, measure_latency=False).model,
                                       self.feeds) for name, v in self.values.items()}

    def session(self, *names) -> AdapterSession:
        s = AdapterSession(self.base_path)
        for n in names:
            s.load_adapter(n, self.files[n])
        return s


@pytest.fixture(scope="module")
def rank(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("rank"))


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Setup:
    return Setup(tmp_path_factory.mktemp("full"), "full", "weight")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------- what it computes


@pytest.mark.parametrize("which", ["rank", "full"])
def test_base_alone_and_each_adapter(which, request):
    st: Setup = request.getfixturevalue(which)
    s = st.session("a", "b")
    assert s.adapters == ["a", "b"]
    assert set(s.parameters) == {n for r in api.get_records(st.inserted) for n in r.trainable}
    assert diff(s.run(None, st.feeds)[0], st.original) <= 1e-5
    gc.collect()  # the session keeps the LoraAdapters
    for _ in range(2):  # switch back and forth on one session
        for name in ("a", "b"):
            y = s.run(None, st.feeds, adapter=name)[0]
            assert diff(y, st.folded[name]) <= ATOL
            assert diff(y, st.original) > 0.1  # an adapter changes the function
            # the plain ORT way: the session and a RunOptions
            assert diff(s.session.run(None, st.feeds, s.run_options(name))[0], st.folded[name]) <= ATOL
    assert diff(st.folded["a"], st.folded["b"]) > 0.1
    ov = s.run_with_ort_values(None, {"x": ort.OrtValue.ortvalue_from_numpy(st.feeds["x"])}, adapter="b")
    assert diff(ov[0].numpy(), st.folded["b"]) <= ATOL


def test_parameters_as_declared(rank):
    s = AdapterSession(rank.base_path)
    rec = api.get_records(rank.inserted)[0]
    assert s.parameters[rec.A] == ("float32", [32, "beats_rank"])
    assert s.parameters[rec.B] == ("float32", ["beats_rank", 48])
    assert s.parameters[rec.D] == ("float32", [48])
    assert s.adapters == []
    assert isinstance(s.session, ort.InferenceSession)


def test_not_an_adapter_base(tmp_path):
    p = tmp_path / "plain.onnx"
    onnx.save(original(), p)
    with pytest.raises(InputError) as e:
        AdapterSession(p)
    assert "not an adapter base" in one_line(e)
    with pytest.raises(InputError) as e:
        AdapterSession(tmp_path / "none.onnx")
    assert "not found" in one_line(e)


def test_a_base_whose_parameter_is_no_input_is_refused(tmp_path, rank):
    base = onnx.load(rank.base_path)
    rec = api.get_records(base)[0]
    keep = [i for i in base.graph.input if i.name != rec.A]
    del base.graph.input[:]
    base.graph.input.extend(keep)  # A became a plain initializer: adapters could not set it
    onnx.save(base, tmp_path / "broken.onnx")
    with pytest.raises(InputError) as e:
        AdapterSession(tmp_path / "broken.onnx")
    assert rec.A in one_line(e) and "overridable" in one_line(e)


# --------------------------------------------------------------------------- adapters that do not fit


def _load_refused(st: Setup, tmp_path: Path, values) -> str:
    s = AdapterSession(st.base_path)
    path = write_adapter(tmp_path / "bad.onnx_adapter", values)
    with pytest.raises(InputError) as e:
        s.load_adapter("bad", path)
    assert s.adapters == []
    return one_line(e)


@pytest.mark.parametrize("which,drop", [("rank", "B"), ("rank", "D"), ("full", "D"), ("full", "V")])
def test_partial_adapter_refused(which, drop, request, tmp_path):
    st: Setup = request.getfixturevalue(which)
    rec = api.get_records(st.inserted)[0]
    missing = getattr(rec, drop)
    partial = {k: v for k, v in st.values["a"].items() if k != missing}
    msg = _load_refused(st, tmp_path, partial)
    assert msg.startswith("bad.onnx_adapter does not fit m.base.onnx: ")
    assert f"tensor '{missing}' ({drop} of weight 'w1') is missing from the adapter" in msg


def test_raw_ort_runs_a_partial_adapter_silently(rank, tmp_path):
    """The trap: without D, ORT uses the base's D and computes something else."""
    rec = api.get_records(rank.inserted)[0]
    path = write_adapter(tmp_path / "p.onnx_adapter", {k: v for k, v in rank.values["a"].items() if k != rec.D})
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    y = ort.InferenceSession(str(rank.base_path)).run(None, rank.feeds, ro)[0]
    assert diff(y, rank.folded["a"]) > 1e-3


def _another_base(st: Setup, how: str) -> dict[str, np.ndarray]:
    vals = dict(st.values["a"])
    rec = api.get_records(st.inserted)[0]
    if how == "names":
        vals = {k.replace("w1", "enc.w1"): v for k, v in vals.items()}
    elif how == "extra":
        vals["w3.beats_D"] = np.ones(4, np.float32)
    elif how == "shape":
        vals[rec.D] = np.ones(47, np.float32)
    elif how == "ndim":
        vals[rec.D] = np.ones((48, 1), np.float32)
    elif how == "dtype":
        vals = {k: v.astype(np.float16) for k, v in vals.items()}
    elif how == "rank":
        vals[rec.A] = np.ones((32, 8), np.float32)  # B stays [4, 48]
    return vals


@pytest.mark.parametrize("how,expect", [
    ("names", "tensor 'w1.beats_D' (D of weight 'w1') is missing"),
    ("extra", "tensor 'w3.beats_D' is not a parameter of the base"),
    ("shape", "tensor 'w1.beats_D' has shape [47] in the adapter, [48] in the base"),
    ("ndim", "tensor 'w1.beats_D' has shape [48, 1] in the adapter, [48] in the base"),
    ("dtype", "tensor 'w1.beats_D' is float16 in the adapter, float32 in the base"),
    ("rank", "weight 'w1' has rank 8 in the adapter, 4 in the base"),
])
def test_adapter_of_another_base_refused(rank, tmp_path, how, expect):
    msg = _load_refused(rank, tmp_path, _another_base(rank, how))
    assert expect in msg, msg


def test_another_rank_for_the_whole_adapter_refused(rank, tmp_path):
    """The rank is a symbolic dim of the base, so ORT would run a rank-8 adapter on a
    rank-4 base; it is refused all the same, as export-adapter refuses it."""
    vals = dict(rank.values["a"])
    for r in api.get_records(rank.inserted):
        vals[r.A] = np.ones((r.shape[0], 8), np.float32)
        vals[r.B] = np.ones((8, r.shape[1]), np.float32)
    assert "weight 'w1' has rank 8 in the adapter, 4 in the base" in _load_refused(rank, tmp_path, vals)


def test_unreadable_or_missing_adapter_file(rank, tmp_path):
    s = AdapterSession(rank.base_path)
    (tmp_path / "junk.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(InputError) as e:
        s.load_adapter("j", tmp_path / "junk.onnx_adapter")
    assert "not a readable .onnx_adapter" in one_line(e)
    with pytest.raises(InputError) as e:
        s.load_adapter("j", tmp_path / "none.onnx_adapter")
    assert "not found" in one_line(e)
    s.load_adapter("a", rank.files["a"])
    with pytest.raises(InputError) as e:
        s.load_adapter("a", rank.files["b"])
    assert "already loaded" in one_line(e)


# --------------------------------------------------------------------------- one adapter per RunOptions


def test_one_adapter_per_run_options(rank):
    s = rank.session("a", "b")
    ro = s.run_options("a")
    with pytest.raises(InputError) as e:
        s.run_options("b", ro)
    assert "already have adapter 'a' active" in one_line(e)
    with pytest.raises(InputError):
        s.run(None, rank.feeds, adapter="b", run_options=ro)
    assert s.run_options("a", ro) is ro  # the same adapter again: unchanged
    assert diff(s.session.run(None, rank.feeds, ro)[0], rank.folded["a"]) <= ATOL
    # a RunOptions of the caller's gets the adapter and keeps its own settings
    mine = ort.RunOptions()
    mine.logid = "req-17"
    mine.add_run_config_entry("my.key", "1")
    assert s.run_options("b", mine) is mine
    assert mine.logid == "req-17" and mine.get_run_config_entry("my.key") == "1"
    assert diff(s.session.run(None, rank.feeds, mine)[0], rank.folded["b"]) <= ATOL
    with pytest.raises(InputError) as e:
        s.run_options("b", object())
    assert "must be an onnxruntime.RunOptions" in one_line(e)
    with pytest.raises(InputError) as e:
        s.run_options("c")
    assert "no adapter 'c' is loaded (loaded: a, b)" in one_line(e)


def test_raw_ort_applies_one_of_two_active_adapters_silently(rank):
    """The trap: ORT accepts two adapters over the same names and uses one."""
    s = rank.session("a", "b")
    ro = s.run_options("a")
    lora = ort.LoraAdapter()
    lora.Load(str(rank.files["b"]))
    ro.add_active_adapter(lora)  # behind run_options' back: cannot be detected
    y = s.session.run(None, rank.feeds, ro)[0]
    assert min(diff(y, rank.folded["a"]), diff(y, rank.folded["b"])) <= ATOL
    del ro


# --------------------------------------------------------------------------- feeds


def test_feeds_naming_adapter_parameters_refused(rank):
    s = rank.session("a")
    rec = api.get_records(rank.inserted)[0]
    feeds = {**rank.feeds, rec.B: np.zeros((4, 48), np.float32)}
    for adapter in ("a", None):
        with pytest.raises(InputError) as e:
            s.run(None, feeds, adapter=adapter)
        assert f"adapter parameter '{rec.B}'" in one_line(e) and "override" in one_line(e)
    with pytest.raises(InputError):
        s.run_with_ort_values(None, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}, adapter="a")
    # the trap: raw ORT lets the adapter win over the explicit feed
    y = s.session.run(None, feeds, s.run_options("a"))[0]
    assert diff(y, rank.folded["a"]) <= ATOL


# --------------------------------------------------------------------------- lifetimes


def test_run_options_keeps_the_adapter_alive_past_the_session(rank):
    s = rank.session("a")
    sess, ro = s.session, s.run_options("a")
    del s
    gc.collect()
    junk = [np.full(4096, 7.0, np.float32) for _ in range(256)]  # reuse what a freed adapter held
    assert diff(sess.run(None, rank.feeds, ro)[0], rank.folded["a"]) <= ATOL
    del junk


def test_raw_ort_reads_a_collected_adapter(rank):
    """The trap the previous test guards: ORT's RunOptions does not keep its adapter."""
    sess = ort.InferenceSession(str(rank.base_path))
    lora = ort.LoraAdapter()
    lora.Load(str(rank.files["a"]))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    assert diff(sess.run(None, rank.feeds, ro)[0], rank.folded["a"]) <= ATOL
    del lora
    gc.collect()
    junk = [np.full(4096, 7.0, np.float32) for _ in range(256)]
    assert diff(sess.run(None, rank.feeds, ro)[0], rank.folded["a"]) > ATOL
    del junk


def test_unload_refused_while_run_options_live(rank):
    s = rank.session("a", "b")
    s.run(None, rank.feeds, adapter="a")  # run()'s own RunOptions never blocks an unload
    ro = s.run_options("a")
    with pytest.raises(InputError) as e:
        s.unload_adapter("a")
    assert "still active in 1 RunOptions" in one_line(e)
    assert s.adapters == ["a", "b"]
    del ro
    s.unload_adapter("a")
    assert s.adapters == ["b"]
    with pytest.raises(InputError) as e:
        s.run(None, rank.feeds, adapter="a")
    assert "no adapter 'a' is loaded (loaded: b)" in one_line(e)
    with pytest.raises(InputError):
        s.unload_adapter("a")
    s.load_adapter("a", rank.files["b"])  # the name is free again
    assert diff(s.run(None, rank.feeds, adapter="a")[0], rank.folded["b"]) <= ATOL


# --------------------------------------------------------------------------- iobinding, threads


def test_run_with_iobinding_refused(rank):
    s = rank.session("a")
    binding = s.session.io_binding()
    binding.bind_cpu_input("x", rank.feeds["x"])
    binding.bind_output("y")
    with pytest.raises(InputError) as e:
        s.run_with_iobinding(binding, s.run_options("a"))
    assert "ignores adapters" in one_line(e)
    # the trap: raw ORT runs the base and only logs a warning
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    s.run_options("a", quiet)
    s.session.run_with_iobinding(binding, quiet)
    assert diff(binding.copy_outputs_to_cpu()[0], rank.original) <= 1e-5


def test_concurrent_load_run_unload(rank):
    s = rank.session("a")
    errors: list[BaseException] = []

    def serve():
        try:
            for _ in range(30):
                assert diff(s.run(None, rank.feeds, adapter="a")[0], rank.folded["a"]) <= ATOL
                assert diff(s.session.run(None, rank.feeds, s.run_options("a"))[0], rank.folded["a"]) <= ATOL
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def churn(k):
        try:
            for i in range(10):
                name = f"b{k}-{i}"
                s.load_adapter(name, rank.files["b"])
                assert diff(s.run(None, rank.feeds, adapter=name)[0], rank.folded["b"]) <= ATOL
                s.unload_adapter(name)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(3)] + [threading.Thread(target=churn, args=(k,))
                                                                    for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert s.adapters == ["a"]


# --------------------------------------------------------------------------- end to end


def test_insert_make_base_export_adapter_serve(tmp_path, rank):
    """insert -> adapters.make_base -> adapters.export_adapter -> AdapterSession."""
    res = adapters.make_base(rank.inserted, measure_latency=False)
    assert res.report.verified
    base = tmp_path / "m.base.onnx"
    res.save(base)
    # the hand-built bases of the tests above are what make_base declares
    assert adapters.base_parameters(base) == adapters.base_parameters(hand_base(rank.inserted))
    records = api.get_records(rank.inserted)
    api.Adapter(records, rank.values["b"]).save(tmp_path / "b.npz")
    reports = {"a": adapters.export_adapter(api.Adapter(records, rank.values["a"]), base,
                                            tmp_path / "a.onnx_adapter", measure_latency=False),
               "b": adapters.export_adapter(tmp_path / "b.npz", base, tmp_path / "b.onnx_adapter",
                                            measure_latency=False)}
    assert all(r.verified for r in reports.values())
    s = AdapterSession(base)
    for name in ("a", "b"):
        s.load_adapter(name, tmp_path / f"{name}.onnx_adapter")
    assert diff(s.run(None, rank.feeds)[0], rank.original) <= 1e-5
    for name in ("b", "a", "b"):
        y = s.run(None, rank.feeds, adapter=name)[0]
        assert diff(y, rank.folded[name]) <= ATOL and diff(y, rank.original) > 0.1
    assert diff(s.session.run(None, rank.feeds, s.run_options("a"))[0], rank.folded["a"]) <= ATOL
    with pytest.raises(InputError) as e:  # an adapter of the hand-built full base
        s.load_adapter("full", write_adapter(tmp_path / "full.onnx_adapter", trained(inserted("full", "weight"), 1)))
    assert one_line(e).startswith("full.onnx_adapter does not fit m.base.onnx: ")
