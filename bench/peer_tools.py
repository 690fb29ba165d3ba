"""One optimizer run, in its own process: ``python bench/peer_tools.py TOOL SRC DST``.

bench/peers.py starts this in a fresh process per (model, tool), with a time
and memory cap, and measures wall time and peak RSS from outside.  Every tool
is called the way its documentation shows; a model with external data (or one
over 2 GB) is written with external data where the tool can do that.
Exit 0 = DST written; anything else = the tool failed (last stderr line says why).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_2GB = 2**31 - 1


def _has_external(src: str) -> bool:
    """Whether SRC keeps its weights in external data: PEER_EXTERNAL_DATA=1/0 when
    bench/peers.py says so (it reads the model); else anything but .onnx files in its
    folder (the corpus gives every model a folder of its own)."""
    flag = os.environ.get("PEER_EXTERNAL_DATA")
    if flag in ("0", "1"):
        return flag == "1"
    return any(p.suffix != ".onnx" for p in Path(src).parent.iterdir())


def _save(model, dst: str, src: str) -> None:
    import onnx

    big = model.ByteSize() > _2GB if not _has_external(src) else True
    if big:
        onnx.save(model, dst, save_as_external_data=True, location=Path(dst).name + ".data")
    else:
        onnx.save(model, dst)


def _load(src: str):
    import onnx

    return onnx.load(src)


def beats(src, dst, *extra):
    """The CLI as a user runs it, verified on ORT; --no-latency: the summary's latency
    measurement (up to 2 s of timing runs) is reporting, not compiling.  Called in this
    process, as every other tool is (a second interpreter would add its start-up)."""
    sys.path.insert(0, str(ROOT))
    from beats_compiler.cli import main

    raise SystemExit(main([src, "-o", dst, "-q", "--no-latency", *extra]))


def beats_noverify(src, dst):
    beats(src, dst, "--no-verify")


def beats_fold1g(src, dst):
    """Folding without the default 4 MiB growth cap per fold (the light zoo's weights are
    ConstantOfShape nodes: folding them is what the peers' node counts come from)."""
    beats(src, dst, "--fold-size-limit", "1G")


def onnxsim(src, dst):
    import onnxsim as sim

    model, ok = sim.simplify(_load(src))
    if not ok:
        raise RuntimeError("onnxsim: check failed")
    _save(model, dst, src)


def onnxslim(src, dst):
    import onnxslim as slim

    slim.slim(src, dst)


def onnxoptimizer(src, dst):
    import onnxoptimizer as oo

    _save(oo.optimize(_load(src)), dst, src)


def graphsurgeon(src, dst):
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(_load(src))
    g.cleanup().toposort()
    g.fold_constants().cleanup()
    _save(gs.export_onnx(g), dst, src)


def onnxscript(src, dst):
    import onnx_ir as ir
    import onnxscript.optimizer as opt

    model = ir.load(src)
    opt.optimize_ir(model)
    ext = _has_external(src)
    ir.save(model, dst, external_data=(Path(dst).name + ".data") if ext else None)


def polygraphy(src, dst):
    exe = Path(sys.executable).parent / "polygraphy"
    cmd = [str(exe), "surgeon", "sanitize", src, "-o", dst, "--fold-constants", "-q"]
    if _has_external(src):
        cmd += ["--save-external-data", Path(dst).name + ".data"]
    raise SystemExit(subprocess.call(cmd))


def _ort(src, dst, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = dst
    so.intra_op_num_threads = 1
    if _has_external(src):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(dst).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_basic(src, dst):
    import onnxruntime as ort

    _ort(src, dst, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)


def ort_extended(src, dst):
    import onnxruntime as ort

    _ort(src, dst, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)


def ort_transformers(src, dst):
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    m = onnx.load(src, load_external_data=False)
    names = " ".join(n.name for n in m.graph.node).lower() + " " + " ".join(i.name for i in m.graph.input)
    mtype = "gpt2" if "gpt" in src or "transformer.h" in names else "bert"
    opt = optimize_model(src, model_type=mtype, num_heads=0, hidden_size=0, opt_level=0)
    opt.save_model_to_file(dst, use_external_data_format=_has_external(src))


TOOLS = {
    "beats": beats,
    "beats-noverify": beats_noverify,
    "beats-fold1G": beats_fold1g,
    "onnxsim": onnxsim,
    "onnxslim": onnxslim,
    "onnxoptimizer": onnxoptimizer,
    "graphsurgeon": graphsurgeon,
    "onnxscript": onnxscript,
    "polygraphy": polygraphy,
    "ort-basic": ort_basic,
    "ort-extended": ort_extended,
    "ort-transformers": ort_transformers,
}


def _write_peak(path: str) -> None:
    """Peak RSS of this process (VmHWM, reset at exec) and of its waited-for children:
    the coordinator's ru_maxrss from wait4 also counts the pages a forked child shares
    with the coordinator before exec, which is the coordinator's own size."""
    import resource

    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    Path(path).write_text(str(max(hwm, kids)))


if __name__ == "__main__":
    tool, src, dst = sys.argv[1:4]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        TOOLS[tool](src, dst)
    except SystemExit as e:
        _write_peak(dst + ".peak")
        raise SystemExit(e.code) from None
    _write_peak(dst + ".peak")
