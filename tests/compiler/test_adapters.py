"""Adapter bases and ``.onnx_adapter`` files (issue 16, ``beats_compiler.adapters``).

On hand-built MatMul/Gemm and Conv models inserted with ``rank:4`` (branch and
weight layouts) and ``full``, with random "trained" values:

- the base alone computes the original model on ONNX Runtime; its parameters are
  overridable initializers (graph input + default) listed in its metadata;
- one session on the base serves two adapters by switching RunOptions, each equal
  to ``reparam.fold`` of the inserted model with that adapter's values (<= 1e-4);
- an adapter of another base, of another rank, of the wrong dtype or missing a
  tensor is refused with one line naming the mismatch, and nothing is written;
- the CLI: exit codes 0 / 1 / 2, one-line errors, nothing written on failure,
  the inputs unchanged, the npu refusal line.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from beats_compiler import InputError
from beats_compiler import adapters
from beats_compiler import reparam as api
from beats_compiler.verify import quiet_session_options
from passes import reparam as rp
from tests.compiler.test_cli import assert_one_line_error, cli, listing
from tests.compiler.test_reparam_cli import ok, run_main
from tests.helpers import f32, make_model, vi

H = helper.make_node
FOLD_ATOL = 1e-4  # base + adapter vs the folded model (the bar)


# --------------------------------------------------------------------------- models and values


def mlp(hidden: int = 48, names=("w1", "w2")) -> onnx.ModelProto:
    """x [N, 32] -> MatMul -> Relu -> Gemm (transB, bias) -> y [N, 16]."""
    w1, w2 = names
    return make_model(
        [H("MatMul", ["x", w1], ["h"], name="mm"), H("Relu", ["h"], ["r"]),
         H("Gemm", ["r", w2, "b2"], ["y"], name="gemm", transB=1)],
        [vi("x", ["N", 32])], [vi("y", ["N", 16])],
        {w1: f32(32, hidden, seed=1), w2: f32(16, hidden, seed=2), "b2": f32(16, seed=3)})


def conv() -> onnx.ModelProto:
    return make_model(
        [H("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"), H("Relu", ["c"], ["y"])],
        [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 8, 8, 8])], {"cw": f32(8, 3, 3, 3, seed=1), "cb": f32(8, seed=2)})


def shared() -> onnx.ModelProto:
    """One weight read by two MatMuls: in the branch layout the cpu pipeline's CSE merges
    the two inserted Mul(B, D), and the base's records drop the merged node."""
    return make_model(
        [H("MatMul", ["x1", "w"], ["y1"], name="a"), H("MatMul", ["x2", "w"], ["y2"], name="b"),
         H("Add", ["y1", "y2"], ["y"])],
        [vi("x1", ["N", 32]), vi("x2", ["N", 32])], [vi("y", ["N", 48])], {"w": f32(32, 48, seed=1)})


def mlp16() -> onnx.ModelProto:
    return make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 32], TensorProto.FLOAT16)],
                      [vi("y", ["N", 48], TensorProto.FLOAT16)], {"w": f32(32, 48, seed=4).astype(np.float16)})


def insert(model, factorization="rank:4", layout="branch", rules=None) -> onnx.ModelProto:
    rules = rules or (rp.Rule(min_size=0, factorization=factorization, layout=layout),)
    return api.insert(model, rp.Policy(tuple(rules)), measure_latency=False).model


def trained(inserted: onnx.ModelProto, seed: int) -> api.Adapter:
    """Random values for every D/V (A/B): what `beats-compile train` would save."""
    rng = np.random.default_rng(seed)
    records = api.get_records(inserted)
    values = {}
    for r in records:
        shapes = rp.shapes_for(r.shape, r.axis, r.factorization, r.rank)
        for k in ("D", "V", "A", "B"):
            if getattr(r, k):
                v = 0.2 * rng.standard_normal(shapes[k]) + (1.0 if k == "D" else 0.0)
                values[getattr(r, k)] = v.astype(np.float32)
    return api.Adapter(records, values)


def feeds_for(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    feeds = {}
    for v in model.graph.input:
        dims = [d.dim_value or batch for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        feeds[v.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def session(model_or_path) -> ort.InferenceSession:
    src = str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, quiet_session_options(), providers=["CPUExecutionProvider"])


def folded_outputs(inserted, adapter: api.Adapter, feeds) -> list[np.ndarray]:
    """``reparam.fold`` of the inserted model with the adapter's values, on ORT."""
    folded = api.fold(inserted, values=adapter.values, verify=False, measure_latency=False).model
    return session(folded).run(None, feeds)


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CASES = {
    "mlp-rank4-branch": (mlp, "rank:4", "branch"),
    "mlp-rank4-weight": (mlp, "rank:4", "weight"),
    "mlp-full": (mlp, "full", "weight"),
    "conv-rank4-weight": (conv, "rank:4", "weight"),
    "conv-vector": (conv, "vector", "weight"),
    "shared-rank4-branch": (shared, "rank:4", "branch"),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path):
    make, fact, layout = CASES[request.param]
    original = make()
    inserted = insert(original, fact, layout)
    base = adapters.make_base(inserted, measure_latency=False)
    path = tmp_path / "base.onnx"
    base.save(path)
    return original, inserted, base, path


# --------------------------------------------------------------------------- the base


def test_base_alone_is_the_original_and_lists_its_parameters(case):
    original, inserted, base, path = case
    assert base.report.verified is True and base.report.command == "adapter-base"
    feeds = feeds_for(original)
    assert max_diff(session(path).run(None, feeds), session(original).run(None, feeds)) <= 1e-5
    params = adapters.base_parameters(path)
    records = api.get_records(base.model)
    assert set(params) == {n for r in records for n in r.trainable}
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == [i.name for i in original.graph.input]
    assert {i.name for i in sess.get_overridable_initializers()} == set(params)
    inputs = {i.name: i for i in base.model.graph.input}
    inits = {t.name: t for t in base.model.graph.initializer}
    for r in records:
        for k in ("D", "V", "A", "B"):
            name = getattr(r, k)
            if not name:
                continue
            dtype, shape = params[name]
            assert dtype == "float32" and name in inits
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                    for d in inputs[name].type.tensor_type.shape.dim]
            assert dims == shape
            default = onnx.numpy_helper.to_array(inits[name])
            if k == "A":
                assert shape[1] == adapters.RANK_DIM and default.shape == (shape[0], 0)
            elif k == "B":
                assert shape[0] == adapters.RANK_DIM and default.shape == (0, shape[1])
            elif k == "V":
                assert not np.any(default)
    summary = base.report.reparam
    assert summary["adapter_parameters"] == len(params)
    assert summary["adapter_bytes"] == sum(v.nbytes for v in trained(inserted, 0).values.values())
    assert summary["ranks"] == sorted({r.rank for r in records if r.factorization == "rank"})


def test_one_session_serves_two_adapters_each_equal_to_its_folded_model(case, tmp_path):
    original, inserted, base, path = case
    feeds = feeds_for(original)
    sess = session(path)
    loras, expected = [], []
    for seed in (1, 2):
        adapter = trained(inserted, seed)
        out = tmp_path / f"a{seed}.onnx_adapter"
        rep = adapters.export_adapter(adapter, path, out, measure_latency=False)
        assert rep.verified is True and rep.output == str(out) and rep.max_abs_diff <= FOLD_ATOL, rep.to_dict()
        assert rep.parameters == len(adapter.values) and rep.file_bytes == out.stat().st_size
        lora = ort.LoraAdapter()
        lora.Load(str(out))
        ro = ort.RunOptions()
        ro.add_active_adapter(lora)
        loras.append((lora, ro))
        expected.append(folded_outputs(inserted, adapter, feeds))
    assert max_diff(*expected) > 1e-2, "the two fine-tunes should differ"
    plain = session(original).run(None, feeds)
    for i in (0, 1, 0, 1):  # switching back and forth on one session
        assert max_diff(sess.run(None, feeds, loras[i][1]), expected[i]) <= FOLD_ATOL
    assert max_diff(sess.run(None, feeds), plain) <= 1e-5  # no adapter: the original again


def test_records_of_different_ranks_get_their_own_rank_dims(tmp_path):
    inserted = insert(mlp(), rules=(rp.Rule(include=("w1",), min_size=0, factorization="rank:4", layout="branch"),
                                    rp.Rule(min_size=0, factorization="rank:8", layout="branch")))
    base = adapters.make_base(inserted, measure_latency=False)
    params = adapters.base_parameters(base.model)
    assert params["w1.beats_A"][1] == [32, "beats_rank_4"] and params["w2.beats_A"][1] == [48, "beats_rank_8"]
    path = tmp_path / "base.onnx"
    base.save(path)
    adapter = trained(inserted, 3)
    rep = adapters.export_adapter(adapter, path, tmp_path / "a.onnx_adapter", measure_latency=False)
    assert rep.verified and rep.ranks == [4, 8]


def test_fp16_model_base(tmp_path):
    """insert keeps float16 weights (W0 + D*V computed in float32, cast back) with float32
    D/V: the base's parameters, and so its adapters, are float32."""
    original = mlp16()
    inserted = insert(original, "rank:4", "weight")
    base = adapters.make_base(inserted, measure_latency=False)
    assert base.report.verified is True
    assert {d for d, _ in adapters.base_parameters(base.model).values()} == {"float32"}
    w = next(t for t in base.model.graph.initializer if t.name == "w")
    assert w.data_type == TensorProto.FLOAT16, "W0 stays float16 in the base"
    path = tmp_path / "base.onnx"
    base.save(path)
    feeds = feeds_for(original)
    assert max_diff(session(path).run(None, feeds), session(original).run(None, feeds)) == 0
    adapter = trained(inserted, 1)
    rep = adapters.export_adapter(adapter, path, tmp_path / "a.onnx_adapter", measure_latency=False)
    assert rep.verified is True, rep.to_dict()


def test_make_base_refusals():
    with pytest.raises(InputError, match="no D/V"):
        adapters.make_base(mlp(), verify=False)
    base = adapters.make_base(insert(mlp()), verify=False).model
    with pytest.raises(InputError, match="already an adapter base"):
        adapters.make_base(base, verify=False)
    with pytest.raises(InputError, match="target npu cannot take adapters: the QNN HTP needs static shapes"):
        adapters.make_base(insert(mlp()), target="npu")
    with pytest.raises(InputError, match="target gpu cannot take adapters"):
        adapters.make_base(insert(mlp()), target="gpu")


# --------------------------------------------------------------------------- fit


@pytest.fixture
def rank4(tmp_path):
    inserted = insert(mlp())
    base = adapters.make_base(inserted, measure_latency=False)
    path = tmp_path / "base.onnx"
    base.save(path)
    return inserted, path


def _without(adapter: api.Adapter, name: str) -> api.Adapter:
    return api.Adapter(adapter.records, {k: v for k, v in adapter.values.items() if k != name})


MISFITS = {
    "other base": (lambda ins: trained(insert(mlp(names=("u1", "u2"))), 1),
                   "adapter.npz does not fit base.onnx: weight 'w1' of the base is not in the adapter"),
    "other shapes": (lambda ins: trained(insert(mlp(hidden=40)), 1),
                     "adapter.npz does not fit base.onnx: weight 'w1' has shape [32, 40] in the adapter, [32, 48] in "
                     "the base"),
    "other rank": (lambda ins: trained(insert(mlp(), "rank:8"), 1),
                   "adapter.npz does not fit base.onnx: weight 'w1' has rank 8 in the adapter, 4 in the base"),
    "other layout": (lambda ins: trained(insert(mlp(), "rank:4", "weight"), 1),
                     "adapter.npz does not fit base.onnx: weight 'w1' has layout weight in the adapter, branch in "
                     "the base"),
    "wrong dtype": (lambda ins: api.Adapter(api.get_records(ins), {k: v.astype(np.float64) for k, v in
                                                                    trained(ins, 1).values.items()}),
                    "adapter.npz does not fit base.onnx: tensor 'w1.beats_D' is float64 in the adapter, float32 in "
                    "the base"),
    "missing tensor": (lambda ins: _without(trained(ins, 1), "w2.beats_B"),
                       "adapter.npz does not fit base.onnx: tensor 'w2.beats_B' (B of weight 'w2') is missing from "
                       "the adapter"),
}


@pytest.mark.parametrize("kind", sorted(MISFITS))
def test_a_misfit_is_one_line_and_writes_nothing(rank4, tmp_path, kind):
    inserted, base = rank4
    make, message = MISFITS[kind]
    npz = tmp_path / "adapter.npz"
    make(inserted).save(npz)
    before = listing(tmp_path)
    with pytest.raises(InputError) as exc:
        adapters.export_adapter(npz, base, tmp_path / "out.onnx_adapter")
    assert str(exc.value) == message
    assert "\n" not in str(exc.value)
    assert listing(tmp_path) == before, "nothing written, no temporary left"


def test_check_fit_takes_plain_values_and_ort_values(rank4):
    inserted, base = rank4
    good = trained(inserted, 1).values
    adapters.check_fit(good, base)
    adapters.check_fit({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in good.items()}, base)
    r8 = trained(insert(mlp(), "rank:8"), 1).values
    with pytest.raises(InputError, match=r"^a does not fit b: weight 'w1' has rank 8 in the adapter, 4 in the base$"):
        adapters.check_fit(r8, base, what="a", where="b")
    with pytest.raises(InputError, match="tensor 'extra' is not a parameter of the base"):
        adapters.check_fit({**good, "extra": np.zeros(1, np.float32)}, base)
    with pytest.raises(InputError, match="is not an adapter base"):
        adapters.check_fit(good, mlp())


def test_non_finite_values_and_unsafe_outputs_are_refused(rank4, tmp_path):
    inserted, base = rank4
    adapter = trained(inserted, 1)
    adapter.values["w1.beats_B"][0, 0] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        adapters.export_adapter(adapter, base, tmp_path / "a.onnx_adapter")
    with pytest.raises(InputError, match="refusing to overwrite the input file"):
        adapters.export_adapter(trained(inserted, 1), base, base)
    with pytest.raises(InputError, match="does not exist"):
        adapters.export_adapter(trained(inserted, 1), base, tmp_path / "nope" / "a.onnx_adapter")


def test_user_inputs_verify_and_may_not_name_parameters(rank4, tmp_path):
    inserted, base = rank4
    feeds = feeds_for(mlp(), batch=5)
    b = adapters.make_base(inserted, inputs=feeds, measure_latency=False)
    assert b.report.verified is True and b.report.verify_input_source == "user"
    rep = adapters.export_adapter(trained(inserted, 1), base, tmp_path / "a.onnx_adapter", inputs=feeds,
                                  measure_latency=False)
    assert rep.verified is True and rep.verify_input_source == "user" and rep.verify_inputs == {"x": [5, 32]}
    bad = {**feeds, "w1.beats_A": np.zeros((32, 4), np.float32)}
    with pytest.raises(InputError, match="unknown w1.beats_A"):
        adapters.export_adapter(trained(inserted, 1), base, tmp_path / "b.onnx_adapter", inputs=bad)
    assert not (tmp_path / "b.onnx_adapter").exists()


def test_a_failed_verification_writes_nothing(rank4, tmp_path, monkeypatch):
    inserted, base = rank4
    real = adapters._write_adapter

    def off(path, arrays):  # the file ORT reads is not the values folded
        real(path, {k: (v * 1.5 if k.endswith("beats_B") else v) for k, v in arrays.items()})

    monkeypatch.setattr(adapters, "_write_adapter", off)
    before = listing(tmp_path)
    rep = adapters.export_adapter(trained(inserted, 1), base, tmp_path / "a.onnx_adapter", measure_latency=False)
    assert rep.verified is False and rep.output is None and not rep.ok
    assert rep.failure_line().startswith("verification failed: base + adapter vs the folded model: max abs diff")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def files(tmp_path):
    """model.onnx, model.inserted.onnx (rank:4 branch) and two trained adapters."""
    model = tmp_path / "model.onnx"
    model.write_bytes(mlp().SerializeToString())
    inserted = tmp_path / "model.inserted.onnx"
    ins = insert(mlp())
    inserted.write_bytes(ins.SerializeToString())
    for seed in (1, 2):
        trained(ins, seed).save(tmp_path / f"task{seed}.npz")
    trained(insert(mlp(), "rank:8"), 1).save(tmp_path / "rank8.npz")
    return tmp_path


def test_cli_base_and_two_adapters(files, capsys):
    digests = {p.name: sha(p) for p in files.iterdir()}
    rep = files / "base.json"
    proc = ok(run_main(capsys, "adapter-base", files / "model.inserted.onnx", "--report", rep, "--no-latency"))
    base = files / "model.inserted.base.onnx"
    assert base.is_file() and f"wrote {base}" in proc.stdout.replace("\n", "")
    assert "adapter parameters: 6 graph inputs for 2 weight(s)" in " ".join(proc.stdout.split())
    report = json.loads(rep.read_text())
    assert report["command"] == "adapter-base" and report["verified"] is True
    assert report["reparam"]["adapter_parameters"] == 6 and report["reparam"]["ranks"] == [4]
    for seed in (1, 2):
        r = files / f"task{seed}.json"
        proc = ok(run_main(capsys, "export-adapter", files / f"task{seed}.npz", "--base", base, "--report", r))
        out = files / f"task{seed}.onnx_adapter"
        assert out.is_file() and "verified" in proc.stdout and "latency" in proc.stdout
        data = json.loads(r.read_text())
        assert data["verified"] is True and data["output"] == str(out) and data["max_abs_diff"] <= FOLD_ATOL
        assert data["latency_ms_folded"] > 0 and data["latency_ms_adapter"] > 0
    assert {n: sha(files / n) for n in digests} == digests, "an input changed"


def test_cli_refusals_are_one_line_exit_2_and_write_nothing(files, capsys):
    ok(run_main(capsys, "adapter-base", files / "model.inserted.onnx", "-o", files / "base.onnx", "--no-latency", "-q"))
    digests = {p.name: sha(p) for p in files.iterdir()}
    before = listing(files)
    proc = run_main(capsys, "export-adapter", files / "rank8.npz", "--base", files / "base.onnx")
    err = assert_one_line_error(proc, 2)
    assert err == "beats-compile: error: rank8.npz does not fit base.onnx: weight 'w1' has rank 8 in the adapter, " \
                  "4 in the base"
    assert_one_line_error(run_main(capsys, "export-adapter", files / "task1.npz", "--base", files / "model.onnx"), 2,
                          "model.onnx is not an adapter base")
    assert_one_line_error(run_main(capsys, "export-adapter", files / "missing.npz", "--base", files / "base.onnx"), 2,
                          "adapter file not found")
    assert_one_line_error(run_main(capsys, "adapter-base", files / "model.onnx", "-o", files / "b2.onnx"), 2,
                          "the model has no D/V")
    assert_one_line_error(run_main(capsys, "adapter-base", files / "base.onnx", "-o", files / "b3.onnx"), 2,
                          "already an adapter base")
    usage = run_main(capsys, "export-adapter", files / "task1.npz")  # argparse's own line
    assert usage.returncode == 2 and usage.stderr.strip().splitlines() == [
        "beats-compile export-adapter: error: the following arguments are required: --base (see --help)"]
    assert listing(files) == before
    assert {n: sha(files / n) for n in digests} == digests


def test_cli_failed_verification_exit_1(files, capsys, monkeypatch):
    ok(run_main(capsys, "adapter-base", files / "model.inserted.onnx", "-o", files / "base.onnx", "--no-latency", "-q"))
    real = adapters._write_adapter
    monkeypatch.setattr(adapters, "_write_adapter",
                        lambda path, arrays: real(path, {k: v * 1.5 for k, v in arrays.items()}))
    before = listing(files)
    proc = run_main(capsys, "export-adapter", files / "task1.npz", "--base", files / "base.onnx", "--no-latency")
    assert_one_line_error(proc, 1, "verification failed: base + adapter vs the folded model")
    assert "nothing written" in proc.stdout
    assert listing(files) == before


def test_cli_npu_refusal_line(files):
    before = listing(files)
    proc = cli("adapter-base", files / "model.inserted.onnx", "--target", "npu")
    err = assert_one_line_error(proc, 2)
    assert err == "beats-compile: error: " + adapters.refusal("npu")
    assert listing(files) == before
