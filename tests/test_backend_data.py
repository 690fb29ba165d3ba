"""Tier: the ONNX backend test data (onnx 1.17 wheel), with its stored outputs as the oracle.

For every case (a ``model.onnx`` plus ``test_data_set_*``):

* the original runs on ONNX Runtime (CPU, graph optimizations off) with the
  stored inputs and is compared with the stored outputs; a case that ORT cannot
  load or run, or whose outputs disagree, is "not runnable in its original
  form";
* runnable: ``compile(path, verify=False)`` must succeed and the compiled model
  must reproduce the stored outputs within the same tolerance;
* not runnable: ``compile`` must still either produce a model that passes the
  ONNX checker, or refuse it with ``InputError`` -- never another exception;
  where ORT did run the original (deterministically) but disagrees with the
  stored outputs, the compiled model must also reproduce ORT's outputs.

Tolerance is onnx's backend-test default (rtol=1e-3, atol=1e-7), NaN equal to
NaN; integer, bool and string outputs must be equal; dtypes and shapes must
match exactly.  The counts land in ``backend_data_summary.json`` in pytest's
base temp dir and in the terminal summary.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import beats_compiler
from beats_compiler import InputError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".cache" / "onnx-backend-data" / "1.17.0"
# Cases per category in the onnx 1.17 wheel: a partial fetch fails loudly.
CATEGORIES = {"node": 1288, "simple": 23, "pytorch-converted": 82, "pytorch-operator": 35}
RTOL = 1e-3
ATOL = 1e-7


def _ensure_data() -> Path:
    """The data folder, fetched with the project's script when missing; a
    failure here is an error of the whole module, never a silent skip."""
    if not (DATA / ".complete").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_backend_data.py")], check=True)
    missing = [c for c in CATEGORIES if not (DATA / c).is_dir()]
    if missing:
        raise RuntimeError(f"backend test data incomplete under {DATA}: missing {', '.join(missing)}")
    return DATA


def _cases() -> list[tuple[str, str]]:
    data = _ensure_data()
    out = []
    for cat in CATEGORIES:
        for d in sorted((data / cat).iterdir()):
            if (d / "model.onnx").is_file():
                out.append((cat, d.name))
    found = Counter(c for c, _ in out)
    if found != Counter(CATEGORIES):
        raise RuntimeError(f"backend test data under {data}: found {dict(found)}, expected {CATEGORIES}")
    return out


CASES = _cases()


# ---------------------------------------------------------------- data loading

# Element types numpy has no native dtype for: ORT's Python binding can neither
# take them as numpy arrays nor return them, so they travel as raw OrtValues.
_RAW_TYPES = frozenset(
    getattr(onnx.TensorProto, n)
    for n in ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
              "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, n)
)


def _elem(type_proto: onnx.TypeProto) -> int:
    return type_proto.tensor_type.elem_type if type_proto.HasField("tensor_type") else 0


def _load_value(path: str, type_proto: onnx.TypeProto) -> Any:
    """A stored input/output, read by the type the model declares for it
    (what onnx.backend.test.runner does)."""
    raw = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(raw)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(raw)
        return numpy_helper.to_optional(opt)
    if type_proto.HasField("tensor_type"):
        t = onnx.TensorProto()
        t.ParseFromString(raw)
        a = numpy_helper.to_array(t)
        elem = _elem(type_proto)
        if elem in _RAW_TYPES and t.data_type != elem:
            # older onnx stored bfloat16 data as its uint16 bit pattern
            want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            if a.dtype.kind in "ui" and a.dtype.itemsize == want.itemsize:
                a = a.view(want)
        return a
    raise NotImplementedError(f"{os.path.basename(path)}: stored value of type {type_proto.WhichOneof('value')}")


def _data_sets(model: onnx.ModelProto, case_dir: Path) -> list[tuple[dict[str, Any], list[str], list[Any]]]:
    """(feeds by input name, output names, expected outputs) per test_data_set."""
    sets = []
    for ds in sorted(glob.glob(str(case_dir / "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
        feeds = {
            model.graph.input[i].name: _load_value(os.path.join(ds, f"input_{i}.pb"), model.graph.input[i].type)
            for i in range(n_in)
        }
        names = [model.graph.output[i].name for i in range(n_out)]
        expected = [_load_value(os.path.join(ds, f"output_{i}.pb"), model.graph.output[i].type) for i in range(n_out)]
        sets.append((feeds, names, expected))
    return sets


# ---------------------------------------------------------------- running and comparing


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _raw_ortvalue(a: np.ndarray, elem: int) -> ort.OrtValue:
    raw = numpy_helper.from_array(np.ascontiguousarray(a)).raw_data  # packs 4-bit types
    v = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), elem)
    if len(raw) != v.tensor_size_in_bytes():
        raise ValueError(f"{len(raw)} bytes for an OrtValue of {v.tensor_size_in_bytes()}")
    ctypes.memmove(v.data_ptr(), raw, len(raw))
    return v


def _from_ortvalue(v: ort.OrtValue, elem: int) -> np.ndarray:
    t = onnx.TensorProto(dims=v.shape(), data_type=elem)
    t.raw_data = ctypes.string_at(v.data_ptr(), v.tensor_size_in_bytes())
    return numpy_helper.to_array(t)


def _run(model: onnx.ModelProto | str, feeds: dict[str, Any], names: list[str], types: dict[str, int]) -> list[Any]:
    """Run on ORT; ``types`` is the declared element type of each input and output."""
    sess = _session(model)
    feeds = {k: _raw_ortvalue(v, types[k]) if types.get(k) in _RAW_TYPES and isinstance(v, np.ndarray) else v
             for k, v in feeds.items()}
    if not any(types.get(n) in _RAW_TYPES for n in names):
        return sess.run(names, feeds)
    feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.asarray(v))
             for k, v in feeds.items()}
    outs = sess.run_with_ort_values(names, feeds)
    return [_from_ortvalue(v, types[n]) if types.get(n) in _RAW_TYPES else v.numpy() for n, v in zip(names, outs)]


def _mismatch(got: Any, want: Any, where: str) -> str | None:
    """None when ``got`` matches ``want``, else a one-line reason."""
    if want is None or got is None:
        return None if want is None and got is None else f"{where}: {got!r:.40} vs expected {want!r:.40}"
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"{where}: sequence of {len(got) if isinstance(got, (list, tuple)) else type(got).__name__} vs {len(want)}"
        for k, (g, w) in enumerate(zip(got, want)):
            why = _mismatch(g, w, f"{where}[{k}]")
            if why:
                return why
        return None
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{where}: shape {got.shape} vs expected {want.shape}"
    if want.dtype == object or want.dtype.kind in "US":
        return None if np.array_equal(got.astype(object), want.astype(object)) else f"{where}: strings differ"
    if got.dtype != want.dtype:
        return f"{where}: dtype {got.dtype} vs expected {want.dtype}"
    if want.dtype.kind in "fc" or want.dtype.name in ("bfloat16",) or want.dtype.name.startswith("float8"):
        rtol = max(RTOL, 2**-6) if want.dtype.name == "bfloat16" else RTOL
        g, w = got.astype(np.float64), want.astype(np.float64)
        if not np.allclose(g, w, rtol=rtol, atol=ATOL, equal_nan=True):
            with np.errstate(invalid="ignore"):
                diff = np.nanmax(np.abs(g - w)) if g.size else 0.0
            return f"{where}: values differ (max abs diff {diff:.3g}, rtol={rtol}, atol={ATOL})"
        return None
    return None if np.array_equal(got, want) else f"{where}: values differ"


def _outputs(model: onnx.ModelProto | str, sets, types: dict[str, int]) -> list[list[Any]]:
    return [_run(model, feeds, names, types) for feeds, names, _ in sets]


def _compare(got_sets: list[list[Any]], sets, want_sets: list[list[Any]] | None = None) -> str | None:
    """First mismatch of ``got_sets`` against the stored outputs (or ``want_sets``)."""
    for k, (got, (_, names, expected)) in enumerate(zip(got_sets, sets)):
        want = expected if want_sets is None else want_sets[k]
        for name, g, w in zip(names, got, want):
            why = _mismatch(g, w, f"set {k} output {name!r}")
            if why:
                return why
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# ---------------------------------------------------------------- summary

_RESULTS: dict[str, dict] = {}


class _SummaryPlugin:
    def __init__(self, path: Path):
        self.path = path

    def pytest_terminal_summary(self, terminalreporter):
        summary = _summarize()
        self.path.write_text(json.dumps(summary, indent=2, sort_keys=True))
        tr = terminalreporter
        tr.write_sep("-", "ONNX backend test data tier")
        for cat, c in summary["per_category"].items():
            tr.write_line(
                f"{cat:18} total {c['total']:5}  runnable {c['runnable']:5} (changed by compile "
                f"{c['runnable_modified_by_compile']:4})  pass after compile {c['pass_after_compile']:5}  "
                f"fail {c['fail_after_compile']:3}  | not runnable: compiled {c['not_runnable_compiled']:3} "
                f"(vs ORT {c['not_runnable_checked_against_ort']:2}), InputError {c['not_runnable_input_error']:2}, "
                f"bad {c['not_runnable_bad_compile']:2}"
            )
        for f in summary["failures"]:
            tr.write_line(f"  FAIL {f['id']}: {f['cause']}")
        tr.write_line(f"summary JSON: {self.path}")


def _summarize() -> dict:
    per: dict[str, Counter] = {}
    failures = []
    for cid, r in sorted(_RESULTS.items()):
        c = per.setdefault(r["category"], Counter())
        c["total"] += 1
        c["runnable"] += r["runnable"]
        c[r["outcome"]] += 1
        c["runnable_modified_by_compile"] += bool(r["runnable"] and r["modified"])
        c["not_runnable_checked_against_ort"] += bool(r.get("checked_against_ort"))
        if r["outcome"] == "fail_after_compile" or r["outcome"] == "not_runnable_bad_compile":
            failures.append({"id": cid, "cause": r["cause"]})
    keys = ("total", "runnable", "pass_after_compile", "fail_after_compile", "runnable_modified_by_compile",
            "not_runnable_compiled", "not_runnable_input_error", "not_runnable_bad_compile",
            "not_runnable_checked_against_ort")
    per_cat = {cat: {k: int(c.get(k, 0)) for k in keys} for cat, c in per.items()}
    totals = {k: sum(v[k] for v in per_cat.values()) for k in keys}
    not_runnable = Counter(r["cause"].split(":")[0] for r in _RESULTS.values() if not r["runnable"])
    return {
        "data": str(DATA),
        "rtol": RTOL,
        "atol": ATOL,
        "totals": totals,
        "per_category": per_cat,
        "failures": failures,
        "not_runnable_causes": dict(not_runnable.most_common()),
        "not_runnable": {cid: r["cause"] for cid, r in sorted(_RESULTS.items()) if not r["runnable"]},
    }


@pytest.fixture(scope="module", autouse=True)
def _summary(request, tmp_path_factory):
    plugin = _SummaryPlugin(tmp_path_factory.getbasetemp() / "backend_data_summary.json")
    request.config.pluginmanager.register(plugin, "beats_backend_data_summary")
    yield


# ---------------------------------------------------------------- the test


@pytest.mark.parametrize(("category", "name"), CASES, ids=[f"{c}/{n}" for c, n in CASES])
def test_backend_case(category: str, name: str) -> None:
    case = DATA / category / name
    path = str(case / "model.onnx")
    record = {"category": category, "runnable": False, "outcome": "", "cause": "", "modified": None}
    _RESULTS[f"{category}/{name}"] = record

    # (a) the original, on ORT, against the stored outputs.
    cause = None
    ort_outputs = None
    try:
        original = onnx.load(path)
        sets = _data_sets(original, case)
        types = {vi.name: _elem(vi.type) for vi in [*original.graph.input, *original.graph.output]}
        ort_outputs = _outputs(path, sets, types)
        cause = _compare(ort_outputs, sets)
        if cause:
            cause = "original mismatch: " + cause
            # ORT runs it but disagrees with onnx's reference (a kernel
            # difference or a random op): ORT's own outputs are the oracle
            # for the compiled model only when ORT is deterministic on it.
            if _compare(_outputs(path, sets, types), sets, ort_outputs) is not None:
                ort_outputs = None
    except Exception as exc:  # noqa: BLE001 - any failure here means "not runnable as is"
        cause = "original not runnable: " + _first_line(exc)
        ort_outputs = None

    try:
        result = beats_compiler.compile(path, verify=False)
    except InputError as exc:
        if cause is None:
            record.update(runnable=True, outcome="fail_after_compile", cause=f"compile: InputError {exc}")
            raise
        record.update(outcome="not_runnable_input_error", cause=f"{cause} | compile: InputError {exc}")
        return
    except Exception as exc:
        record.update(runnable=cause is None, outcome="fail_after_compile" if cause is None else "not_runnable_bad_compile",
                      cause=f"{cause or ''} | compile raised {_first_line(exc)}")
        raise
    record["modified"] = any(p["modified"] for p in result.report.passes)

    if cause is not None:
        # (a') not runnable as is: the compiled model must still be valid ONNX
        # and, where ORT ran the original deterministically, agree with it.
        record["cause"] = cause
        record["outcome"] = "not_runnable_bad_compile"
        try:
            onnx.checker.check_model(result.model)
        except Exception as exc:
            record["cause"] += f" | compiled model fails the checker: {_first_line(exc)}"
            raise
        if ort_outputs is not None:
            try:
                why = _compare(_outputs(result.model, sets, types), sets, ort_outputs)
            except Exception as exc:
                why = f"compiled model does not run: {_first_line(exc)}"
            if why:
                record["cause"] += f" | compiled differs from the original on ORT: {why}"
                pytest.fail(record["cause"])
            record["checked_against_ort"] = True
        record["outcome"] = "not_runnable_compiled"
        return

    # (b) runnable: the compiled model must reproduce the stored outputs.
    record["runnable"] = True
    record["outcome"] = "fail_after_compile"
    try:
        onnx.checker.check_model(result.model)
        why = _compare(_outputs(result.model, sets, types), sets)
    except Exception as exc:
        record["cause"] = f"compiled model does not run: {_first_line(exc)}"
        raise
    if why:
        record["cause"] = "compiled mismatch: " + why
        pytest.fail(record["cause"])
    record["outcome"] = "pass_after_compile"
