"""ONNX Runtime CPU latency of a model before and after the Beats round trip.

For each model: insert D/V (``--factorization``, ``--layout``), give them
random nonzero "trained" values, fold, and time the original against the
folded model in one process, alternating the two run by run (and which goes
first) so that drift, turbo and cache effects hit both alike.  The unfolded
(trained, not folded) model is timed too, to show what folding saves.

    python bench/reparam_latency.py                      # MiniLM and the torch CNN, exported offline
    python bench/reparam_latency.py model.onnx --runs 200 --factorization full

Needs the ``exporters`` extra for the default models.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from beats_compiler import reparam  # noqa: E402
from beats_compiler.inputs import generate_inputs  # noqa: E402
from passes import reparam as rp  # noqa: E402


def default_models() -> list[tuple[str, onnx.ModelProto, dict[str, np.ndarray]]]:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from fixtures.real_models import export_minilm, export_torchscript_cnn

    minilm, extra = export_minilm()
    rng = np.random.default_rng(0)
    batch, seq = 1, 128
    tokens = {"input_ids": rng.integers(1000, extra["vocab_size"], (batch, seq)).astype(np.int64),
              "attention_mask": np.ones((batch, seq), np.int64)}
    buf = io.BytesIO()
    export_torchscript_cnn(buf)
    cnn = onnx.load_from_string(buf.getvalue())
    images = {"x": rng.standard_normal((32, 3, 16, 16)).astype(np.float32)}
    return [(f"all-MiniLM-L6-v2 [{batch}x{seq} tokens]", minilm, tokens), ("torch CNN [32x3x16x16]", cnn, images)]


def trained(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The inserted model with random nonzero D, V (or A, B), as after training."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for r in reparam.get_records(out):
        scale = float(np.std(numpy_helper.to_array(inits[r.weight]).astype(np.float64))) or 1.0
        for name, v in ((r.D, None), (r.V, 0.05 * scale), (r.A, 1.0), (r.B, 0.05 * scale)):
            if not name:
                continue
            shape = tuple(inits[name].dims)
            value = 1 + 0.1 * rng.standard_normal(shape) if v is None else v * rng.standard_normal(shape)
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, feeds) -> float:
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return (time.perf_counter() - t0) * 1e3


def bench(name: str, model: onnx.ModelProto, feeds, args) -> dict:
    policy = rp.Policy((rp.Rule(min_size=args.min_size, factorization=args.factorization, layout=args.layout),))
    inserted = reparam.insert(model, policy, verify=False).model
    unfolded = trained(inserted)
    folded = reparam.fold(unfolded, verify=False).model
    assert [n.SerializeToString() for n in folded.graph.node] == [n.SerializeToString() for n in model.graph.node]
    sessions = {"original": session(model, args.threads), "folded": session(folded, args.threads),
                "unfolded": session(unfolded, args.threads)}
    if feeds is None:
        feeds = generate_inputs(sessions["original"], (args.dim,) * 4)
    want = sessions["unfolded"].run(None, feeds)
    got = sessions["folded"].run(None, feeds)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(want, got))
    for s in sessions.values():
        for _ in range(args.warmup):
            s.run(None, feeds)
    times = {k: [] for k in sessions}
    pair = ["original", "folded"]
    for i in range(args.runs):
        for k in (pair if i % 2 == 0 else pair[::-1]):  # alternate, and alternate who goes first
            times[k].append(timed(sessions[k], feeds))
    for _ in range(max(args.runs // 4, 5)):  # the unfolded model, for reference only
        times["unfolded"].append(timed(sessions["unfolded"], feeds))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "weights": len(reparam.get_records(inserted)), "original": med["original"],
            "folded": med["folded"], "ratio": med["folded"] / med["original"], "unfolded": med["unfolded"],
            "diff": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help=".onnx files (default: MiniLM and the torch CNN, exported offline)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model, alternating (default 50)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--factorization", default="rank:8")
    p.add_argument("--layout", default="weight")
    p.add_argument("--min-size", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--dim", type=int, default=8, help="size of each dynamic dim of generated inputs (model files)")
    args = p.parse_args(argv)
    models = [(path, onnx.load(path), None) for path in args.models] if args.models else default_models()
    print(f"onnxruntime {ort.__version__}, CPU, {args.runs} alternating runs each, median; "
          f"factorization {args.factorization}, layout {args.layout}")
    rows = []
    for name, model, feeds in models:
        try:
            rows.append(bench(name, model, feeds, args))
        except rp.ReparamError as exc:  # e.g. rank too large for a tiny weight: say so, go on
            print(f"{name}: skipped ({exc})")
        except reparam.InputError as exc:
            print(f"{name}: skipped ({exc})")
    head = f"{'model':<36} {'weights':>7} {'original ms':>12} {'folded ms':>10} {'folded/orig':>11} " \
           f"{'unfolded ms':>12} {'max|folded-unfolded|':>21}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<36} {r['weights']:>7} {r['original']:>12.3f} {r['folded']:>10.3f} {r['ratio']:>11.3f} "
              f"{r['unfolded']:>12.3f} {r['diff']:>21.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
