"""insert/fold of a model with external data, streamed (issue 7, target 4):
each folded weight (and insert's full-size D/V) is computed block by block
into the output's data file, never held whole.  The bytes must equal the
in-memory transformation's, and the output must stay atomic."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from beats_compiler import reparam as api
from beats_compiler.errors import InputError
from beats_compiler.io import DataFolder, load_model, save_model
from passes import reparam as rp
from passes.graph import is_computed_ref
from tests.compiler.test_io import Crash, crash_writes_under, listing
from tests.compiler.test_reparam_cli import ok, run_main, sha
from tests.compiler.test_reparam import mlp, trained_values, weight_bytes, with_values

WEIGHTS = {"l1.weight", "head.weight"}


def save_external(model: onnx.ModelProto, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def trained_inserted(tmp_path, fact: str):
    """The mlp inserted with ``fact``, trained (nonzero D/V), saved with external data."""
    res = api.insert(mlp().model, rp.Policy((rp.Rule(factorization=fact, min_size=1000),)), verify=False)
    path = tmp_path / "in" / "inserted.onnx"
    save_external(with_values(res.model, trained_values(res.model)), path)
    return path


def folder_bytes(folder) -> dict:
    return {n: (folder / n).read_bytes() for n in listing(folder)}


@pytest.fixture
def small_blocks(monkeypatch):
    # several row blocks per weight, the last one partial
    monkeypatch.setattr(rp, "_BLOCK_BYTES", 5000)
    monkeypatch.setattr(rp, "_STREAM_BYTES", 1024)


@pytest.mark.parametrize("fact", ["full", "vector", "rank:4"])
def test_streamed_fold_equals_in_memory_fold(tmp_path, small_blocks, fact):
    src = trained_inserted(tmp_path, fact)
    before = folder_bytes(src.parent)
    res = api.fold(load_model(src, lazy=True), verify=False)
    assert isinstance(res.base_dir, DataFolder) and set(res.base_dir.computed) == WEIGHTS
    placeholders = {t.name for t in res.model.graph.initializer if is_computed_ref(t)}
    assert placeholders == WEIGHTS  # not computed yet: nothing held in memory
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    res.save(out, external_data=True)
    assert listing(out.parent) == ["folded.onnx", "folded.onnx.data"]  # no temporary left
    assert folder_bytes(src.parent) == before  # the input is untouched
    eager = api.fold(load_model(src), verify=False)  # weights read into memory, folded there
    assert weight_bytes(load_model(out).model) == weight_bytes(eager.model)
    assert res.report.reparam == eager.report.reparam  # same max |delta| per weight
    assert all(f["max_abs_delta"] > 0 for f in res.report.reparam["folded"])


def test_streamed_fold_cli_verifies_and_writes_the_same_bytes(tmp_path, small_blocks, capsys):
    src = trained_inserted(tmp_path, "rank:4")
    digest = sha(src.with_name(src.name + ".data"))
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    ok(run_main(capsys, "fold", src, "-o", out, "-q"))  # default: verified on ORT
    assert listing(out.parent) == ["folded.onnx", "folded.onnx.data"]
    assert sha(src.with_name(src.name + ".data")) == digest
    eager = api.fold(load_model(src), verify=False)
    assert weight_bytes(load_model(out).model) == weight_bytes(eager.model)


@pytest.mark.parametrize("fact", ["full", "vector"])
def test_streamed_insert_equals_in_memory_insert_and_folds_back(tmp_path, small_blocks, fact):
    base = tmp_path / "in" / "base.onnx"
    save_external(mlp().model, base)
    policy = rp.Policy((rp.Rule(factorization=fact, min_size=1000),), seed=7)
    res = api.insert(load_model(base, lazy=True), policy)
    assert res.report.verified is True
    want = {f"{w}.beats_V" for w in WEIGHTS} | ({f"{w}.beats_D" for w in WEIGHTS} if fact == "full" else set())
    assert set(res.base_dir.computed) == want
    ins = tmp_path / "ins" / "inserted.onnx"
    ins.parent.mkdir()
    res.save(ins)
    eager = api.insert(load_model(base), policy, verify=False)
    assert weight_bytes(load_model(ins).model) == weight_bytes(eager.model)
    folded = api.fold(load_model(ins, lazy=True), verify=False)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    folded.save(out)
    assert weight_bytes(load_model(out).model) == weight_bytes(mlp().model)  # fold(insert(m)) == m, bit for bit


@pytest.mark.parametrize("failure", ["write", "input_changed"])
def test_streamed_fold_output_is_atomic(tmp_path, small_blocks, monkeypatch, failure):
    src = trained_inserted(tmp_path, "vector")
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    api.fold(load_model(src, lazy=True), verify=False).save(out)  # an earlier output pair
    before = folder_bytes(out.parent)
    res = api.fold(load_model(src, lazy=True), values=None, verify=False)
    if failure == "write":  # the disk fills while a folded weight is written
        crash_writes_under(out.parent, monkeypatch)
        with pytest.raises(Crash):
            res.save(out)
        monkeypatch.undo()
    else:  # the input's data file shrinks between fold and save: W0 cannot be read
        data = src.with_name(src.name + ".data")
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
        with pytest.raises(InputError, match="external data"):
            res.save(out)
    assert folder_bytes(out.parent) == before  # the old pair, whole; no temporary left


def test_computed_tensors_need_their_data_folder(tmp_path):
    src = trained_inserted(tmp_path, "rank:4")
    res = api.fold(load_model(src, lazy=True), verify=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="computed as the model is written"):
        save_model(res.model, tmp_path / "out" / "x.onnx", base_dir=src.parent)
    assert listing(tmp_path / "out") == []
    np.testing.assert_array_equal(  # load() computes the whole weight, as writing does
        res.base_dir.computed["l1.weight"].load(),
        onnx.numpy_helper.to_array(next(t for t in api.fold(load_model(src), verify=False).model.graph.initializer
                                        if t.name == "l1.weight")))


@pytest.mark.skipif(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16).itemsize != 2,
                    reason="onnx < 1.18 sizes bfloat16 as float32: external bf16 data is refused on load")
def test_streamed_fold_bf16_weight(tmp_path, small_blocks):
    from tests.compiler.test_reparam_bf16 import _bf16_model

    res = api.insert(_bf16_model(), rp.Policy((rp.Rule(factorization="rank:4", min_size=16),)), verify=False)
    src = tmp_path / "in" / "bf16.onnx"
    save_external(with_values(res.model, trained_values(res.model)), src)
    streamed = api.fold(load_model(src, lazy=True), verify=False)
    assert set(streamed.base_dir.computed) == {"W"}
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    streamed.save(out)
    eager = api.fold(load_model(src), verify=False)

    def w_bits(m, base):
        (t,) = [t for t in m.graph.initializer if t.name == "W"]
        assert t.data_type == onnx.TensorProto.BFLOAT16
        return onnx.numpy_helper.to_array(t, base_dir=str(base)).tobytes() if t.data_location else t.raw_data

    got = onnx.load(str(out), load_external_data=False)
    assert w_bits(got, out.parent) == w_bits(eager.model, tmp_path)
