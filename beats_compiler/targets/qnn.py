"""The QNN HTP backend for the npu target: calibration data, QDQ quantization for Qualcomm's QNN HTP, QNN
sessions (node placement and the provider's reasons), EPContext precompile,
and accuracy against fp32 (cosine similarity, top-1 agreement).

Quantization uses onnxruntime's own tools (``qnn_preprocess_model``,
``get_qnn_qdq_config``, ``quantize``); the HTP backend is the one
``onnxruntime-qnn`` ships (a plugin execution provider, simulated on x86-64).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import InputError, TargetError, short_message
from ..verify import load_inputs

EP_NAME = "QNNExecutionProvider"
_registered = False

ACTIVATION_TYPES = ("uint8", "uint16")
WEIGHT_TYPES = ("uint8", "int8")
FLOAT16 = "float16"  # no quantization: the HTP runs the float model in fp16
# QNN's SoC model number, which the HTP's fp16 mode requires (the provider refuses
# enable_htp_fp16_precision without it); 60 is taken by the x86-64 HTP backend.
DEFAULT_SOC_MODEL = 60


def htp_options(fp16: bool = False, soc_model: int | None = None) -> dict[str, str]:
    """Provider options of the QNN HTP sessions for a QDQ model, or for a float
    model run in fp16 on the HTP (which needs the SoC model)."""
    opts = {"backend_type": "htp", "soc_model": str(DEFAULT_SOC_MODEL if soc_model is None else int(soc_model))}
    if fp16:
        opts["enable_htp_fp16_precision"] = "1"
    return opts


class QnnUnavailable(InputError):
    """onnxruntime-qnn is missing or cannot start its HTP backend here."""


class QnnSessionError(TargetError):
    """The QNN HTP backend refuses a (valid) model when it builds its graph."""

    @property
    def capacity(self) -> bool:
        """Finalizing the HTP graph failed (memory or resource limits): a node too big for it."""
        text = str(self)
        return "finalize" in text.lower() or "MEM_ALLOC" in text


def qnn_available() -> tuple[bool, str]:
    """(True, "") when a QNN HTP session can be made here, else (False, why)."""
    try:
        _devices()
        return True, ""
    except QnnUnavailable as exc:
        return False, str(exc)


def _devices():
    global _registered
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError:
        raise QnnUnavailable("the npu target needs onnxruntime-qnn (pip install 'beats-compile[npu]')") from None
    if not _registered:
        try:
            with _capture_fd2():
                ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # already registered by someone else in this process is fine
            if "already" not in str(exc).lower():
                raise QnnUnavailable(f"cannot load the QNN execution provider: {short_message(exc)}") from None
        _registered = True
    devs = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devs:
        raise QnnUnavailable("the QNN execution provider has no device here")
    return devs



# --------------------------------------------------------------------------- calibration data


@dataclass
class CalibData:
    """Samples per input (each of the input's static shape), split in two:
    ``calib`` feeds the quantizer, ``held_out`` (never seen by it) the accuracy check."""

    calib: list[dict[str, np.ndarray]]
    held_out: list[dict[str, np.ndarray]]
    source: str  # "file" | "arrays" | "random"
    warnings: list[str] = field(default_factory=list)


def _type_of(vi: onnx.ValueInfoProto) -> tuple[np.dtype, list]:
    tt = vi.type.tensor_type
    dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else None
    return dt, dims


def graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list | None]]:
    inits = {t.name for t in model.graph.initializer}
    return {vi.name: _type_of(vi) for vi in model.graph.input if vi.name not in inits}


def load_calib(path: str | os.PathLike) -> dict[str, np.ndarray]:
    return load_inputs(path, "calibration")


def split_samples(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray],
                  shapes: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, np.ndarray]]:
    """``arrays[name]`` stacks samples on a new first axis: shape (N, *input shape).
    Returns the N feeds (each input cast to its declared type)."""
    ins = graph_inputs(model)
    missing = [n for n in ins if n not in arrays]
    extra = [n for n in arrays if n not in ins]
    if missing or extra:
        raise InputError("calibration data does not match the model: "
                         + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                     + ([f"unknown {', '.join(extra)}"] if extra else []))
                         + f" (model inputs: {', '.join(ins)})")
    counts = set()
    for name, (dt, dims) in ins.items():
        a = np.asarray(arrays[name])
        want = list(shapes[name]) if shapes and name in shapes else dims
        if want is not None and a.ndim != len(want) + 1:
            raise InputError(f"calibration data {name!r}: shape {list(a.shape)}; expected (samples, "
                             f"{', '.join('?' if d is None else str(d) for d in want)})")
        if want is not None:
            for i, (have, w) in enumerate(zip(a.shape[1:], want)):
                if w is not None and have != w:
                    raise InputError(f"calibration data {name!r}: dim {i} of each sample is {have}, the model needs {w}")
        if a.dtype.kind != dt.kind and not (a.dtype.kind in "iu" and dt.kind in "iu"):
            raise InputError(f"calibration data {name!r}: dtype {a.dtype}, the model input is {dt}")
        counts.add(a.shape[0])
    if len(counts) != 1:
        raise InputError(f"calibration data: inputs have different sample counts {sorted(counts)}")
    n = counts.pop()
    if n < 1:
        raise InputError("calibration data holds no samples")
    return [{k: np.ascontiguousarray(np.asarray(arrays[k])[i]).astype(ins[k][0]) for k in ins} for i in range(n)]


def random_samples(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], count: int, seed: int,
                   int_high: int = 4) -> list[dict[str, np.ndarray]]:
    """``--calib random``: values as verification generates them (``inputs.random_samples``:
    masks 0/1, indices inside their tables, floats N(0, 1)); ``int_high`` is unused."""
    from ..inputs import random_samples as generated

    return generated(model, shapes, count, seed, {name: dt for name, (dt, _dims) in graph_inputs(model).items()})


def make_calib(samples: list[dict[str, np.ndarray]], source: str) -> CalibData:
    """Hold out the last quarter (at least one sample) for the accuracy check."""
    warn = []
    if len(samples) < 2:
        warn.append("only one calibration sample: accuracy is measured on the calibration input itself")
        return CalibData(samples, samples, source, warn)
    k = max(1, len(samples) // 4)
    return CalibData(samples[:-k], samples[-k:], source, warn)


# --------------------------------------------------------------------------- quantization


@contextlib.contextmanager
def _quiet_python():
    """The quantization tools log and warn through Python's logging/warnings."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


def matmul_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Constant 2-D weights of MatMul/Gemm -> their output-channel axis."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            trans_b = any(a.name == "transB" and a.i for a in n.attribute) if n.op_type == "Gemm" else False
            out[n.input[1]] = 0 if trans_b else 1
    return out


@dataclass
class Quantized:
    model: onnx.ModelProto
    preprocessed: bool
    activation_type: str
    weight_type: str
    per_channel: bool
    calib_samples: int


# Quantized-model ops the QNN HTP does not take: dynamic quantization and the
# operator-oriented (QLinear*) format; static QDQ models it takes as they are.
_INTEGER_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul",
                          "QLinearAdd", "QLinearMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                          "QAttention", "DynamicQuantizeLSTM"})


def quantized_form(model: onnx.ModelProto) -> tuple[str, onnx.NodeProto | None]:
    """("float", None), ("qdq", None) for a model that quantizes activations with
    QuantizeLinear/DequantizeLinear pairs already, or ("integer", first node) for
    dynamic or QLinear quantization."""
    has_q = False
    for n in model.graph.node:
        if n.op_type in _INTEGER_OPS:
            return "integer", n
        has_q = has_q or n.op_type == "QuantizeLinear"
    return ("qdq" if has_q else "float"), None


def quantize_qdq(model: onnx.ModelProto, calib: list[dict[str, np.ndarray]], *, activation_type: str = "uint8",
                 weight_type: str = "uint8", per_channel: bool = False) -> Quantized:
    """QNN preprocessing, then static QDQ quantization with a QNN config."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import (
        get_qnn_qdq_config,
        qnn_preprocess_model,
    )

    if activation_type not in ACTIVATION_TYPES:
        raise InputError(f"activation type {activation_type!r}: choose {', '.join(ACTIVATION_TYPES)}")
    if weight_type not in WEIGHT_TYPES:
        raise InputError(f"weight type {weight_type!r}: choose {', '.join(WEIGHT_TYPES)}")
    qt = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16, "int8": QuantType.QInt8}
    tmp = tempfile.mkdtemp(prefix="beats-npu-")
    try:
        with _quiet_python():
            src = Path(tmp) / "fp32.onnx"
            # onnxruntime's QNN preprocessing fails on any metadata_props ("cannot convert
            # dictionary update sequence element #0"): quantize without, put them back after
            props = list(model.metadata_props)
            del model.metadata_props[:]
            try:
                onnx.save_model(model, src)
            finally:  # the caller's model keeps its metadata
                model.metadata_props.extend(props)
            pre = Path(tmp) / "pre.onnx"
            changed = qnn_preprocess_model(str(src), str(pre))
            use = pre if changed else src
            overrides = None
            if per_channel:  # MatMul/Gemm weights per output channel (int8 symmetric, as the HTP wants)
                overrides = {t: [{"quant_type": QuantType.QInt8, "axis": axis, "symmetric": True}]
                             for t, axis in matmul_weights(onnx.load_model(use, load_external_data=False)).items()}
            cfg = get_qnn_qdq_config(str(use), _Reader(calib), activation_type=qt[activation_type],
                                     weight_type=qt[weight_type], per_channel=per_channel, init_overrides=overrides)
            out = Path(tmp) / "qdq.onnx"
            quantize(str(use), str(out), cfg)
        q = onnx.load_model(out)
        del q.metadata_props[:]
        q.metadata_props.extend(model.metadata_props)
    except InputError:
        raise
    except Exception as exc:
        raise TargetError(f"onnxruntime's quantizer failed: {short_message(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Quantized(q, bool(changed), activation_type, weight_type, per_channel, len(calib))


# --------------------------------------------------------------------------- QNN sessions


@dataclass
class Placement:
    """Where a QNN session put each node of the model it was given."""

    nodes: dict[str, str]  # model node name -> provider
    op_types: dict[str, str]  # model node name -> op type
    inserted: dict[str, str]  # nodes ORT added (layout transform) -> provider
    reasons: dict[str, str]  # model node name -> QNN's reason for refusing it
    notes: list[str]


_TOKEN = re.compile(r"_token_\d+$")
_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit \((?P<unit>[^)]*)\) :\s*\n(?P<body>(?:[ \t]+.*\n?)+)")
_NODE_LINE = re.compile(r"Operator type: (?P<op>\S+) Node name: (?P<name>.*?) Node index: \d+")
_REASON = re.compile(r"REASON : (?P<why>.*)")


def parse_reasons(log: str) -> dict[str, str]:
    """The QNN provider's per-node validation failures (its verbose log)."""
    out: dict[str, str] = {}
    for m in _FAILED.finditer(log):
        body = m.group("body")
        names = [n.group("name").strip() for n in _NODE_LINE.finditer(body)]
        why = _REASON.search(body)
        reason = why.group("why").strip() if why else f"QNN rejected the {m.group('unit')} node unit"
        for n in names:
            out.setdefault(n, reason)
    return out


@contextlib.contextmanager
def _capture_fd2():
    """ORT's C++ logger writes to file descriptor 2 and the QNN libraries print
    to 1: both go to a temp file while native code runs; the text is kept."""
    import sys

    box = [""]
    with tempfile.TemporaryFile(prefix="beats-qnn-log-") as f, tempfile.TemporaryFile(prefix="beats-qnn-out-") as o:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        saved2, saved1 = os.dup(2), os.dup(1)
        os.dup2(f.fileno(), 2)
        os.dup2(o.fileno(), 1)
        try:
            yield box
        finally:
            os.dup2(saved2, 2)
            os.dup2(saved1, 1)
            os.close(saved2)
            os.close(saved1)
            f.seek(0)
            box[0] = f.read().decode("utf-8", errors="replace")


def _session_options(extra: Mapping[str, str] = (), verbose: bool = False, provider: Mapping[str, str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 0 if verbose else 3
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for k, v in dict(extra).items():
        so.add_session_config_entry(k, v)
    so.add_provider_for_devices(_devices(), dict(provider) if provider else htp_options())
    return so


def qnn_session(model: onnx.ModelProto | str | os.PathLike, *, config: Mapping[str, str] = (),
                want_log: bool = False, provider: Mapping[str, str] | None = None):
    """An HTP session; returns (session, captured log or "")."""
    import onnxruntime as ort

    so = _session_options(config, verbose=want_log, provider=provider)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    with _capture_fd2() as log:
        try:
            sess = ort.InferenceSession(src, so)
        except Exception as exc:
            err = exc
        else:
            err = None
    if err is not None:
        raise QnnSessionError(f"QNN HTP session failed: {short_message(err)}")
    return sess, log[0]


class QuietSession:
    """A session made with verbose logging (to read placement reasons): its
    runs' log lines go to a discarded temp file, not the user's terminal."""

    def __init__(self, sess):
        import onnxruntime as ort

        self.sess = sess
        self._ro = ort.RunOptions()
        self._ro.log_severity_level = 3

    def run(self, names, feed):
        with _capture_fd2():
            return self.sess.run(names, feed, self._ro)

    def get_outputs(self):
        return self.sess.get_outputs()


# Made in a child process first: the QNN backend can abort or crash the process on a
# graph it cannot build (an assertion, a segfault), which no Python code could report.
_PROBE = """
import json, sys
from beats_compiler.targets import qnn as npu
try:
    npu.qnn_session(sys.argv[1], provider=json.loads(sys.argv[2]))
except npu.QnnSessionError as exc:
    print(str(exc)); sys.exit(3)
except Exception as exc:
    print(type(exc).__name__); sys.exit(4)
"""


class QnnCrash(TargetError):
    """The QNN backend killed the process that built the HTP graph."""


def _probe(path: Path, provider: Mapping[str, str] | None) -> int:
    """The exit status of a child process that builds the HTP session for ``path``
    (negative: killed by that signal)."""
    import json
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])  # the folder that holds beats_compiler/
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), json.dumps(dict(provider or htp_options()))],
                              capture_output=True, text=True, env=env, timeout=_PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return 0  # no crash seen: the session is built in this process next
    return proc.returncode


_PROBE_TIMEOUT_S = 1800


def crash_probe(model: onnx.ModelProto, provider: Mapping[str, str] | None = None) -> None:
    """Raise ``QnnCrash`` naming the node when building the HTP graph of ``model``
    kills the process: ``_breaking_node`` with each prefix built in a child process."""
    import signal

    tmp = tempfile.mkdtemp(prefix="beats-qnn-probe-")
    try:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path)
        code = _probe(path, provider)
        if code >= 0:
            return

        def crashes(prefix: onnx.ModelProto) -> bool:
            onnx.save_model(prefix, path)
            return _probe(path, provider) < 0

        node = _breaking_node(model, crashes)
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        raise QnnCrash(f"the QNN HTP backend crashes ({sig}) building its graph at node '{node.name[:60]}' "
                       f"({node.op_type}); try --activation-type float16, or keep that op off the npu model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compute_node(nodes: list[onnx.NodeProto], node: onnx.NodeProto) -> onnx.NodeProto:
    """A Q or DQ node mapped to the compute node it quantizes."""
    if node.op_type == "QuantizeLinear":  # the output Q of the node that failed
        return next((n for n in nodes if node.input[0] in n.output), node)
    if node.op_type == "DequantizeLinear":
        return next((n for n in nodes if node.output[0] in n.input), node)
    return node


def placement(model: onnx.ModelProto, provider: Mapping[str, str] | None = None) -> tuple[QuietSession, Placement]:
    """Open an HTP session on ``model`` and read back where each node went."""
    crash_probe(model, provider)
    sess, log = qnn_session(model, want_log=True, provider=provider)
    names = {n.name: n.op_type for n in model.graph.node}
    nodes: dict[str, str] = {}
    inserted: dict[str, str] = {}
    for sub in sess.get_provider_graph_assignment_info():
        ep = "QNNExecutionProvider" if sub.ep_name in (EP_NAME, "QNN") else sub.ep_name
        for n in sub.get_nodes():
            base = n.name if n.name in names else _TOKEN.sub("", n.name)
            if base in names:
                # a node split by the layout transform counts once, on HTP if any part is
                if nodes.get(base) != "QNNExecutionProvider":
                    nodes[base] = ep
            else:
                inserted[n.name] = ep
    reasons = parse_reasons(log)
    notes = []
    if "does not support a single Quantize/Dequantize node in a partition" in log:
        notes.append("QNN EP does not take a lone Quantize/Dequantize node as a partition")
    missing = [n for n in names if n not in nodes]
    for n in missing:  # removed by ORT's own graph optimizations before assignment
        nodes[n] = "removed by ONNX Runtime graph optimization"
    return QuietSession(sess), Placement(nodes, names, inserted, reasons, notes)


def _prefix(model: onnx.ModelProto, k: int, types: Mapping[str, int]) -> onnx.ModelProto:
    """The first ``k`` nodes of ``model`` (topologically sorted), every tensor
    they hand on to later nodes or to the graph's outputs made an output."""
    g = model.graph
    nodes = list(g.node[:k])
    later = {i for n in g.node[k:] for i in n.input} | {o.name for o in g.output}
    outs = [o for n in nodes for o in n.output if o in later] or [o for o in nodes[-1].output if o]
    graph = onnx.helper.make_graph(
        nodes, "prefix", list(g.input),
        [onnx.helper.make_tensor_value_info(o, types.get(o, onnx.TensorProto.FLOAT), None) for o in outs],
        list(g.initializer))
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _breaking_node(model: onnx.ModelProto, breaks: Callable[[onnx.ModelProto], bool]) -> onnx.NodeProto:
    """The node whose addition makes ``breaks`` true, for a ``model`` it breaks:
    binary search over topological prefixes (``_prefix``); a Q or DQ node found
    is mapped to the compute node it quantizes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    nodes = list(model.graph.node)
    lo, hi = 0, len(nodes)  # prefix(lo) builds, prefix(hi) breaks
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if breaks(_prefix(model, mid, types)):
            hi = mid
        else:
            lo = mid
    return _compute_node(nodes, nodes[hi - 1])


def capacity_culprit(model: onnx.ModelProto, provider: Mapping[str, str] | None = None) -> onnx.NodeProto | None:
    """The node whose addition makes the HTP graph fail to finalize (``_breaking_node``),
    or None when the whole model builds."""

    def fails(m: onnx.ModelProto) -> bool:
        try:
            qnn_session(m, provider=provider)
        except QnnSessionError as exc:
            return exc.capacity
        except Exception:
            return False
        return False

    if not model.graph.node or not fails(model):
        return None
    return _breaking_node(model, fails)


def precompile(model: onnx.ModelProto, provider: Mapping[str, str] | None = None) -> bytes:
    """An EPContext model embedding the compiled QNN HTP context binary."""
    tmp = tempfile.mkdtemp(prefix="beats-ctx-")
    try:
        src = Path(tmp) / "model.onnx"
        onnx.save_model(model, src)
        ctx = Path(tmp) / "model_ctx.onnx"
        qnn_session(src, config={"ep.context_enable": "1", "ep.context_file_path": str(ctx),
                                 "ep.context_embed_mode": "1"}, provider=provider)
        if not ctx.is_file():
            raise QnnUnavailable("QNN did not write an EPContext model")
        return ctx.read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_context_model(data: bytes, feeds: Mapping[str, np.ndarray],
                      provider: Mapping[str, str] | None = None) -> list[np.ndarray]:
    """Load an EPContext model on the HTP backend and run it once."""
    tmp = tempfile.mkdtemp(prefix="beats-ctx-")
    try:
        path = Path(tmp) / "model_ctx.onnx"
        path.write_bytes(data)
        sess, _ = qnn_session(path, provider=provider)
        return sess.run(None, dict(feeds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- accuracy


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64 = np.asarray(a, dtype=np.float64).ravel()
    b64 = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0 or not np.isfinite(na) or not np.isfinite(nb):
        return 0.0
    return float(np.dot(a64, b64) / (na * nb))


# A reference this small (largest |value|) has no direction worth a cosine (random-init
# outputs of ~1e-14): it is compared by absolute difference instead.
NEAR_ZERO = 1e-6
NEAR_ZERO_ATOL = 1e-3


def similarity(ref: np.ndarray, got: np.ndarray) -> tuple[float, str]:
    """Cosine of ``got`` to ``ref``; for a near-zero reference 1.0 when every value is
    within NEAR_ZERO_ATOL of it (else 0.0), with a note saying so."""
    r64 = np.asarray(ref, dtype=np.float64)
    if r64.size and np.isfinite(r64).all() and np.abs(r64).max() <= NEAR_ZERO:
        diff = float(np.abs(np.asarray(got, dtype=np.float64) - r64).max())
        ok = diff <= NEAR_ZERO_ATOL
        return (1.0 if ok else 0.0), (f"reference ~0 (max |x| <= {NEAR_ZERO:g}): compared by absolute difference "
                                      f"{diff:.3g} {'<=' if ok else '>'} {NEAR_ZERO_ATOL:g}")
    return cosine(ref, got), ""


def accuracy(ref_sess, out_names: list[str], qdq_sess, held_out: list[dict[str, np.ndarray]]) -> dict:
    """Per output: worst and mean cosine over held-out samples; top-1 agreement
    along the last axis for outputs shaped like class scores ([N, C], C > 1)."""
    per: dict[str, dict] = {n: {"cosines": [], "top1_same": 0, "top1_total": 0} for n in out_names}
    for feed in held_out:
        ref = ref_sess.run(out_names, feed)
        got = qdq_sess.run(out_names, feed)
        for name, r, g in zip(out_names, ref, got):
            r, g = np.asarray(r), np.asarray(g)
            row = per[name]
            if r.shape != g.shape:
                row["cosines"].append(0.0)
                row["detail"] = f"shape {list(r.shape)} became {list(g.shape)}"
                continue
            score, note = similarity(r, g)
            row["cosines"].append(score)
            if note:
                row["detail"] = note
            if r.ndim == 2 and r.shape[-1] > 1 and r.dtype.kind == "f":  # class scores [N, C]
                ra = r.reshape(-1, r.shape[-1]).argmax(-1)
                ga = g.reshape(-1, g.shape[-1]).argmax(-1)
                row["top1_same"] += int((ra == ga).sum())
                row["top1_total"] += int(ra.size)
    outs = []
    for name, row in per.items():
        c = row["cosines"]
        outs.append({
            "name": name,
            "cosine_min": float(min(c)) if c else None,
            "cosine_mean": float(np.mean(c)) if c else None,
            "top1_agreement": (row["top1_same"] / row["top1_total"]) if row["top1_total"] else None,
            "top1_rows": row["top1_total"],
            "detail": row.get("detail", ""),
        })
    return {"samples": len(held_out), "outputs": outs}
