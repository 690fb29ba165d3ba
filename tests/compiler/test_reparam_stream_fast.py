"""insert and fold at disk speed (issue 17): an untrained insert folds back by
copying W0's bytes (no arithmetic), zero initial D/V are holes in the data
file, tensors already on disk are copied in the kernel (with a read/write
fallback), and a trained fold computes each delta once (the largest |delta|
is known once the weight is written).  Bytes equal the in-memory path's."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnx
import pytest

from beats_compiler import reparam as api
from beats_compiler.errors import InputError
from beats_compiler.io import load_model
from passes import reparam as rp
from tests.compiler.test_fold_stream import WEIGHTS, folder_bytes, save_external, trained_inserted
from tests.compiler.test_io import listing
from tests.compiler.test_reparam import mlp, weight_bytes


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(rp, "_BLOCK_BYTES", 5000)
    monkeypatch.setattr(rp, "_STREAM_BYTES", 1024)


def inserted(tmp_path, fact: str):
    """mlp with external data, inserted (untrained: V or B zero) streamed, saved."""
    base = tmp_path / "in" / "base.onnx"
    save_external(mlp().model, base)
    res = api.insert(load_model(base, lazy=True), rp.Policy((rp.Rule(factorization=fact, min_size=1000),)),
                     verify=False)
    ins = tmp_path / "ins" / "inserted.onnx"
    ins.parent.mkdir()
    res.save(ins)
    return base, ins, res


def sparse_files_supported(folder) -> bool:
    probe = folder / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 20)
    sparse = os.stat(probe).st_blocks * 512 < (1 << 20)
    probe.unlink()
    return sparse


@pytest.mark.parametrize("fact", ["full", "vector", "rank:4"])
def test_untrained_streamed_fold_copies_w0(tmp_path, small_blocks, fact):
    base, ins, _ = inserted(tmp_path, fact)
    res = api.fold(load_model(ins, lazy=True), verify=False)
    assert not set(res.base_dir.computed) & WEIGHTS  # nothing computed: W0 kept as it is on disk
    assert [f["max_abs_delta"] for f in res.report.reparam["folded"]] == [0.0, 0.0]
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    res.save(out)
    assert weight_bytes(load_model(out).model) == weight_bytes(mlp().model)
    got = onnx.load(str(out), load_external_data=False)
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in mlp().model.graph.node]
    eager = api.fold(load_model(ins), verify=False)  # in memory: the arithmetic path, same bytes
    assert weight_bytes(load_model(out).model) == weight_bytes(eager.model)


@pytest.mark.parametrize("fact", ["full", "vector"])
def test_zero_initial_v_is_a_hole(tmp_path, small_blocks, fact):
    if not sparse_files_supported(tmp_path):
        pytest.skip("this file system does not keep holes")
    _, ins, res = inserted(tmp_path, fact)
    v_bytes = sum(int(np.prod(t.dims)) * 4 for t in res.model.graph.initializer if t.name.endswith(".beats_V"))
    assert v_bytes >= 2 * 32 * 40 * 4
    data = ins.with_name(ins.name + ".data")
    st = os.stat(data)
    assert st.st_blocks * 512 <= st.st_size - v_bytes + 2 * 4096  # V takes no disk space
    for t in load_model(ins).model.graph.initializer:  # and reads back as +0.0
        if t.name.endswith(".beats_V"):
            v = onnx.numpy_helper.to_array(t)
            assert v.dtype == np.float32 and not np.signbit(v).any() and not v.any()


def test_trained_max_abs_delta_is_set_when_the_weight_is_written(tmp_path, small_blocks):
    src = trained_inserted(tmp_path, "rank:4")
    res = api.fold(load_model(src, lazy=True), verify=False)
    assert set(res.base_dir.computed) == WEIGHTS
    assert [f["max_abs_delta"] for f in res.report.reparam["folded"]] == [None, None]  # not computed yet
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    res.save(out)
    eager = api.fold(load_model(src), verify=False)
    assert res.report.reparam == eager.report.reparam
    assert all(f["max_abs_delta"] > 0 for f in res.report.reparam["folded"])
    assert weight_bytes(load_model(out).model) == weight_bytes(eager.model)


@pytest.mark.parametrize("how", ["refused", "short_calls", "copies_nothing"])
def test_kernel_copy_fallbacks_write_the_same_bytes(tmp_path, monkeypatch, how):
    base, ins, _ = inserted(tmp_path, "rank:4")
    want = folder_bytes(ins.parent)
    real = os.copy_file_range
    calls = []

    def refused(*a, **k):
        calls.append(a)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def short_calls(fd_in, fd_out, count, offset_src=None, offset_dst=None):  # 1000 bytes at most per call
        calls.append(count)
        return real(fd_in, fd_out, min(count, 1000), offset_src, offset_dst)

    def copies_nothing(*a, **k):  # a file system where the call copies 0 bytes: not the end of the file
        calls.append(a)
        return 0

    monkeypatch.setattr(os, "copy_file_range", {"refused": refused, "short_calls": short_calls,
                                                "copies_nothing": copies_nothing}[how])
    again = tmp_path / "again" / "inserted.onnx"
    again.parent.mkdir()
    api.insert(load_model(base, lazy=True), rp.Policy((rp.Rule(factorization="rank:4", min_size=1000),)),
               verify=False).save(again)
    assert calls and (len(calls) > 2 if how == "short_calls" else len(calls) == 1)  # else once, then read/write
    got = folder_bytes(again.parent)
    assert got["inserted.onnx.data"] == want["inserted.onnx.data"]


@pytest.mark.parametrize("kernel", [True, False])
def test_a_file_that_ends_early_while_copied_is_refused(tmp_path, monkeypatch, kernel):
    """The data file ends before the bytes the reference asks for (it shrank
    after it was opened and checked): one line, nothing written."""
    import beats_compiler.io as bio

    base, _, _ = inserted(tmp_path, "rank:4")
    res = api.insert(load_model(base, lazy=True), rp.Policy((rp.Rule(factorization="rank:4", min_size=1000),)),
                     verify=False)
    real = bio.open_external

    def longer(t, base_dir):
        g, offset, length = real(t, base_dir)
        return g, offset, length + 3 * 4096  # the last tensor runs past the end of the file

    monkeypatch.setattr(bio, "open_external", longer)
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range")
    out = tmp_path / "short" / "x.onnx"
    out.parent.mkdir()
    with pytest.raises(InputError, match="external data ends early"):
        res.save(out)
    assert listing(out.parent) == []


def test_a_full_disk_during_the_kernel_copy_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch):
    base, ins, _ = inserted(tmp_path, "rank:4")
    before = folder_bytes(ins.parent)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    res = api.insert(load_model(base, lazy=True), rp.Policy((rp.Rule(factorization="rank:4", min_size=1000),)),
                     verify=False)
    with pytest.raises(InputError, match="No space left"):
        res.save(ins)
    assert folder_bytes(ins.parent) == before  # the earlier output, whole; no temporary left
    assert listing(ins.parent) == ["inserted.onnx", "inserted.onnx.data"]
