"""``beats-compile insert|fold|unfold`` as a user runs them (issue 3): exit
codes, the files written (model, <out>.trainable.json, report, adapter), one-line
errors, and the input left untouched.

The main flows run the installed console script in a child process; the
matrix of bad requests calls the same ``main()`` in-process (``run_main``)
to keep this tier fast, with one child-process error per command as well."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from beats_compiler import reparam as api
from beats_compiler.cli import main
from tests.compiler.test_cli import assert_one_line_error, cli, listing
from tests.helpers import assert_same_on_ort
from tests.compiler.test_reparam import mlp, node_bytes, records, trained_values, weight_bytes, weights, with_values

FEEDS = mlp().feeds
FP32 = dict(rtol=1e-4, atol=1e-5)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Proc:
    """What ``main()`` did in-process, shaped like a CompletedProcess."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(capsys, *args) -> Proc:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return Proc(code, out, err)


def ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.onnx"
    p.write_bytes(mlp().model.SerializeToString())
    return p


@pytest.fixture
def inserted_file(base, tmp_path, capsys):
    """The base model inserted with rank:4 (weight layout), then "trained"."""
    out = tmp_path / "ins" / "model.onnx"
    out.parent.mkdir()
    ok(run_main(capsys, "insert", base, "-o", out, "--factorization", "rank:4", "-q"))
    m = onnx.load(out)
    trained = tmp_path / "trained.onnx"
    trained.write_bytes(with_values(m, trained_values(m)).SerializeToString())
    return out, trained


def test_insert_writes_model_manifest_and_report(base, tmp_path):
    digest = sha(base)
    out, rep = tmp_path / "out" / "m.onnx", tmp_path / "r.json"
    out.parent.mkdir()
    proc = ok(cli("insert", base, "-o", out, "--report", rep, "--factorization", "vector"))
    assert sha(base) == digest, "the input changed"
    assert listing(out.parent) == ["m.onnx", "m.trainable.json"]
    assert "trainable parameters: 4,712" in proc.stdout and "verified" in proc.stdout
    model = onnx.load(out)
    assert_same_on_ort(onnx.load(base), model, FEEDS, rtol=0, atol=1e-6)
    manifest = json.loads((out.parent / "m.trainable.json").read_text())
    inits = [t.name for t in model.graph.initializer]
    assert sorted(manifest["trainable"] + manifest["frozen"]) == sorted(inits)
    assert not set(manifest["trainable"]) & set(manifest["frozen"])
    assert set(manifest["trainable"]) == {"l1.weight.beats_D", "l1.weight.beats_V", "head.weight.beats_D",
                                          "head.weight.beats_V"}
    assert {"l1.weight", "head.weight", "l1.bias"} <= set(manifest["frozen"])
    assert [(w["weight"], w["factorization"]) for w in manifest["weights"]] == [("l1.weight", "vector"),
                                                                                ("head.weight", "vector")]
    report = json.loads(rep.read_text())
    assert report["command"] == "insert" and report["verified"] is True and report["max_abs_diff"] == 0
    r = report["reparam"]
    assert r["trainable_params"] == r["trainable_params_total"] == (32 * 64 + 64) + (64 * 40 + 40)
    assert [(w["weight"], w["trainable_params"]) for w in r["inserted"]] == [("l1.weight", 2112), ("head.weight", 2600)]
    assert r["model_params"] == 32 * 64 + 64 + 64 * 40 + r["trainable_params"]


def test_insert_default_output_and_selection_flags(base, tmp_path, capsys):
    ok(cli("insert", base, "--factorization", "rank:4", "--layout", "branch", "--include", "head.*", "-q"))
    assert listing(tmp_path) == ["base.inserted.onnx", "base.inserted.trainable.json", "base.onnx"]
    model = onnx.load(tmp_path / "base.inserted.onnx")
    assert [(r.weight, r.factorization, r.rank, r.layout) for r in records(model)] == [("head.weight", "rank", 4, "branch")]
    # exclude and min-size
    out = tmp_path / "x.onnx"
    ok(run_main(capsys, "insert", base, "-o", out, "--exclude", "head.*", "--min-size", "100", "-q"))
    assert [r.weight for r in records(onnx.load(out))] == ["l1.weight"]
    # embeddings and ops
    ok(run_main(capsys, "insert", base, "-o", out, "--ops", "MatMul", "--embeddings", "--seed", "3", "--d-scale", "0.5",
                "-q"))
    d = weights(onnx.load(out))["l1.weight.beats_D"]
    assert 0.3 < float(np.std(d - 1)) < 0.7


def test_insert_config(base, tmp_path, capsys):
    cfg = tmp_path / "policy.json"
    cfg.write_text(json.dumps({"seed": 1, "rules": [
        {"include": ["head.*"], "factorization": "rank:2", "layout": "branch", "min_size": 0},
        {"ops": ["MatMul"], "min_size": 0, "factorization": "full"}]}))
    out = tmp_path / "c.onnx"
    ok(cli("insert", base, "-o", out, "--config", cfg, "-q"))
    assert [(r.weight, r.factorization, r.layout) for r in records(onnx.load(out))] == [
        ("l1.weight", "full", "weight"), ("head.weight", "rank", "branch")]
    # --config replaces the selection flags
    assert_one_line_error(run_main(capsys, "insert", base, "-o", out, "--config", cfg, "--factorization", "full"), 2,
                          "--config replaces the selection flags")
    bad = tmp_path / "bad.json"
    for text, needle in (('{"rulez": []}', "unknown config keys: rulez"),
                         ('{"rules": [{"min_size": "x"}]}', "min_size must be an integer"),
                         ('{"rules": [', "not a JSON policy"),
                         ('{"rules": [{"factorization": "rank:99"}]}', "at most 32")):
        bad.write_text(text)
        assert_one_line_error(run_main(capsys, "insert", base, "-o", out, "--config", bad), 2, needle)
    assert_one_line_error(run_main(capsys, "insert", base, "-o", out, "--config", tmp_path / "none.json"), 2,
                          "config file not found")


@pytest.mark.parametrize("args,needle", [
    (["--include", "nothing*"], "the selection matches no weight"),
    (["--min-size", "100000"], "the selection matches no weight"),
    (["--factorization", "rank:33"], "rank 33 is larger than weight 'l1.weight' of shape [32, 64] allows (at most 32)"),
    (["--factorization", "lowrank"], "unknown factorization"),
    (["--layout", "branch"], "the branch layout needs a low-rank factorization"),
    (["--ops", "Relu"], "cannot select weights of Relu"),
    (["--min-size", "-1"], "min_size must be >= 0"),
    (["--seed", "-1"], "seed must be >= 0"),
])
def test_insert_bad_requests(base, tmp_path, capsys, args, needle):
    digest = sha(base)
    out = tmp_path / "o.onnx"
    assert_one_line_error(run_main(capsys, "insert", base, "-o", out, *args), 2, needle)
    assert listing(tmp_path) == ["base.onnx"] and sha(base) == digest


def test_insert_bad_request_in_a_child_process(base, tmp_path):
    assert_one_line_error(cli("insert", base, "-o", tmp_path / "o.onnx", "--factorization", "rank:33"), 2, "at most 32")
    assert listing(tmp_path) == ["base.onnx"]


def test_insert_again_is_a_noop(inserted_file, tmp_path):
    first, _ = inserted_file
    out = tmp_path / "again.onnx"
    proc = ok(cli("insert", first, "-o", out, "--factorization", "rank:4"))
    assert "no-op" in proc.stdout
    a, b = onnx.load(first), onnx.load(out)
    assert node_bytes(a) == node_bytes(b) and weight_bytes(a) == weight_bytes(b) and records(a) == records(b)


def test_fold_of_insert_is_the_original(base, inserted_file, tmp_path):
    first, _ = inserted_file
    digest = sha(first)
    out, rep = tmp_path / "f.onnx", tmp_path / "f.json"
    ok(cli("fold", first, "-o", out, "--report", rep, "-q"))
    assert sha(first) == digest
    a, b = onnx.load(base), onnx.load(out)
    assert node_bytes(a) == node_bytes(b) and weight_bytes(a) == weight_bytes(b)
    assert list(b.metadata_props) == list(a.metadata_props)
    report = json.loads(rep.read_text())
    assert report["command"] == "fold" and report["verified"] is True
    assert [f["weight"] for f in report["reparam"]["folded"]] == ["l1.weight", "head.weight"]


def test_values_adapter_on_the_base_model_and_unfold(base, inserted_file, tmp_path, capsys):
    first, trained = inserted_file
    trained_m = onnx.load(trained)
    vals = {n: numpy_helper.to_array(t) for t in trained_m.graph.initializer for n in [t.name]
            if n in {x for r in records(trained_m) for x in r.trainable}}
    np.savez(tmp_path / "vals.npz", **vals)

    # fold the untrained inserted model with trained values from a file, saving them as an adapter
    folded, adapter = tmp_path / "folded.onnx", tmp_path / "adapter.npz"
    ok(cli("fold", first, "-o", folded, "--values", tmp_path / "vals.npz", "--save-adapter", adapter, "-q"))
    folded_m = onnx.load(folded)
    want = api.fold(trained_m, verify=False).model
    assert node_bytes(folded_m) == node_bytes(onnx.load(base))
    assert weight_bytes(folded_m) == weight_bytes(want)
    assert_same_on_ort(trained_m, folded_m, FEEDS, **FP32)
    saved = api.Adapter.load(adapter)
    assert sorted(saved.values) == sorted(vals) and all(np.array_equal(saved.values[k], vals[k]) for k in vals)

    # the adapter applied to the BASE model gives the same folded model
    applied, rep = tmp_path / "applied.onnx", tmp_path / "applied.json"
    ok(cli("fold", base, "-o", applied, "--adapter", adapter, "--report", rep, "-q"))
    applied_m = onnx.load(applied)
    assert node_bytes(applied_m) == node_bytes(folded_m) and weight_bytes(applied_m) == weight_bytes(folded_m)
    assert json.loads(rep.read_text())["verified"] is True

    # an adapter given to fold is what --save-adapter saves (not the model's own untrained D/V)
    again, adapter2 = tmp_path / "again.onnx", tmp_path / "adapter2.npz"
    ok(run_main(capsys, "fold", first, "-o", again, "--adapter", adapter, "--save-adapter", adapter2, "-q"))
    assert weight_bytes(onnx.load(again)) == weight_bytes(folded_m)
    resaved = api.Adapter.load(adapter2)
    assert all(np.array_equal(resaved.values[k], vals[k]) for k in vals)

    # unfold: back to the trained inserted model, and folding that again gives the same weights
    unfolded = tmp_path / "unfolded.onnx"
    ok(cli("unfold", folded, "-o", unfolded, "--adapter", adapter, "-q"))
    un = onnx.load(unfolded)
    assert node_bytes(un) == node_bytes(trained_m)
    assert_same_on_ort(trained_m, un, FEEDS, **FP32)
    refolded = tmp_path / "refolded.onnx"
    ok(cli("fold", unfolded, "-o", refolded, "-q"))
    a, b = weights(onnx.load(refolded)), weights(folded_m)
    for n in b:
        np.testing.assert_array_max_ulp(a[n], b[n], maxulp=1)


def test_fold_and_unfold_bad_requests(base, inserted_file, tmp_path, capsys):
    first, trained = inserted_file
    out = tmp_path / "o.onnx"
    assert_one_line_error(cli("fold", base, "-o", out), 2, "no D/V to fold")  # a child process
    here = lambda *a: run_main(capsys, *a)  # noqa: E731  the rest in-process
    np.savez(tmp_path / "bad_name.npz", **{"l1.weight.beats_Q": np.zeros(3, np.float32)})
    assert_one_line_error(here("fold", first, "-o", out, "--values", tmp_path / "bad_name.npz"), 2,
                          "values for unknown tensors: l1.weight.beats_Q")
    np.savez(tmp_path / "bad_shape.npz", **{"l1.weight.beats_A": np.zeros((32, 3), np.float32)})
    assert_one_line_error(here("fold", first, "-o", out, "--values", tmp_path / "bad_shape.npz"), 2,
                          "'l1.weight.beats_A' has shape [32, 3], expected [32, 4]")
    assert_one_line_error(here("fold", first, "-o", out, "--values", tmp_path / "none.npz"), 2, "not found")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert_one_line_error(here("fold", base, "-o", out, "--adapter", tmp_path / "junk.npz"), 2, "not a readable adapter")
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    assert_one_line_error(here("fold", base, "-o", out, "--adapter", tmp_path / "plain.npz"), 2, "not a beats adapter")
    assert_one_line_error(here("fold", base, "-o", out, "--save-adapter", tmp_path / "a.npz"), 2, "no D/V")
    usage = here("unfold", base, "-o", out)  # argparse: one line, exit 2
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    assert "required: --adapter" in usage.stderr and usage.stderr.startswith("beats-compile unfold: error:")
    api.Adapter.from_model(onnx.load(trained)).save(tmp_path / "a.npz")
    assert_one_line_error(here("unfold", trained, "-o", out, "--adapter", tmp_path / "a.npz"), 2, "already carries D/V")
    assert_one_line_error(here("fold", first, "-o", first), 2, "refusing to overwrite the input")
    assert not out.exists()


def test_subcommand_help(capsys):
    assert "beats-compile insert" in ok(cli("insert", "--help")).stdout
    for cmd, flag in (("insert", "--factorization"), ("fold", "--save-adapter"), ("unfold", "--adapter")):
        proc = ok(run_main(capsys, cmd, "--help"))
        assert f"beats-compile {cmd}" in proc.stdout and flag in proc.stdout


def test_two_inserts_into_one_folder_keep_their_own_manifests(base, tmp_path):
    """Each insert writes <OUT stem>.trainable.json: a second output in the folder
    never overwrites the first one's manifest."""
    ok(cli("insert", base, "-o", tmp_path / "a.onnx", "--factorization", "vector", "-q"))
    ok(cli("insert", base, "-o", tmp_path / "b.onnx", "--factorization", "rank:4", "-q"))
    a = json.loads((tmp_path / "a.trainable.json").read_text())
    b = json.loads((tmp_path / "b.trainable.json").read_text())
    assert {w["factorization"] for w in a["weights"]} == {"vector"}
    assert {w["factorization"] for w in b["weights"]} == {"rank"}


def test_insert_on_a_quantized_model_says_why_nothing_is_selected(tmp_path, capsys):
    """A dynamic-int8 model (onnxruntime's quantize_dynamic): its MatMul weights are
    MatMulInteger int8 operands; the message says so instead of only "no weight"."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from beats_compiler.cli import main

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    assert main(["insert", str(tmp_path / "q.onnx"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights are quantized (MatMulInteger)" in err and "insert into the float model" in err
    assert len(err) <= 200
    assert main(["insert", str(tmp_path / "f.onnx"), "--min-size", "4096", "-q", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "1 weight(s) of MatMul are under --min-size 4096" in capsys.readouterr().err
