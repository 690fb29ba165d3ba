"""Record what the command line does on a set of models, to compare two
versions of the tool (a refactor must not change any of it).

For each model and command (compile on cpu, gpu, npu --calib random; insert;
fold of the insert) the CLI runs in-process and this records: the exit code,
the stderr line, the JSON report without its timings (seconds, latencies, file
paths), and the output model's nodes (op, name, domain, inputs, outputs,
attributes) and initializers (name, dtype, dims, sha1 of the bytes).

    .venv/bin/python scripts/behaviour_snapshot.py record OUT.json MODEL.onnx ... [--commands cpu,gpu,...]
    .venv/bin/python scripts/behaviour_snapshot.py compare A.json B.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import numpy_helper

COMMANDS = {
    "cpu": lambda m, d: [m, "-o", f"{d}/out.onnx", "--report", f"{d}/r.json"],
    "gpu": lambda m, d: [m, "-o", f"{d}/out.onnx", "--report", f"{d}/r.json", "--no-latency", "--target", "gpu"],
    "npu": lambda m, d: [m, "-o", f"{d}/out.onnx", "--report", f"{d}/r.json", "--target", "npu", "--calib", "random"],
    "insert": lambda m, d: ["insert", m, "-o", f"{d}/out.onnx", "--report", f"{d}/r.json"],
}
TIMING = {"seconds", "latency_ms_before", "latency_ms_after", "input", "output", "wall_s", "compile_s",
          "build_seconds", "session_s"}
NUM_S = re.compile(r"\d+(\.\d+)?\s*(ms|s)\b")
DECIMAL = re.compile(r"\b\d+\.\d{3}\b")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"/tmp/[^ '\"]*", "<TMP>", obj)
    return obj


def model_digest(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)

    def nodes(g):
        out = []
        for n in g.node:
            attrs = []
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    attrs.append((a.name, nodes(a.g)))
                else:
                    attrs.append((a.name, hashlib.sha1(a.SerializeToString()).hexdigest()[:12]))
            out.append([n.op_type, n.domain, n.name, list(n.input), list(n.output), attrs])
        return out

    inits = []
    for t in m.graph.initializer:
        try:
            data = numpy_helper.to_array(t).tobytes()
        except Exception:  # noqa: BLE001 - external data: its location
            data = t.SerializeToString()
        inits.append([t.name, t.data_type, list(t.dims), hashlib.sha1(data).hexdigest()[:16]])
    return {"nodes": nodes(m.graph), "initializers": inits,
            "inputs": [i.SerializeToString().hex()[:80] for i in m.graph.input],
            "outputs": [o.SerializeToString().hex()[:80] for o in m.graph.output]}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from beats_compiler import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def record_one(model: Path, command: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        argv = COMMANDS[command](str(model), d)
        code, out, err = run_cli(argv)
        entry = {"code": code, "stderr": _strip(err.strip().splitlines()[-1:] if err.strip() else []),
                 "stdout": [NUM_S.sub("<T>", _strip(line)) for line in out.splitlines()]}
        rp = Path(d, "r.json")
        entry["report"] = _strip(json.loads(rp.read_text())) if rp.exists() else None
        op = Path(d, "out.onnx")
        entry["model"] = model_digest(op) if op.exists() else None
        if command == "insert" and op.exists():
            code2, _o, err2 = run_cli(["fold", str(op), "-o", f"{d}/fold.onnx", "--report", f"{d}/f.json"
                                       ])
            fp = Path(d, "fold.onnx")
            entry["fold"] = {"code": code2, "stderr": _strip(err2.strip().splitlines()[-1:]),
                             "report": _strip(json.loads(Path(d, "f.json").read_text()))
                             if Path(d, "f.json").exists() else None,
                             "model": model_digest(fp) if fp.exists() else None}
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("models", nargs="+")
    r.add_argument("--commands", default=",".join(COMMANDS))
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--ignore-pass", action="append", default=[],
                   help="drop pass records of this name from B's reports before comparing")
    args = ap.parse_args(argv)
    if args.cmd == "record":
        results = {}
        for m in args.models:
            for cmd in args.commands.split(","):
                key = f"{Path(m).name} {cmd}"
                results[key] = record_one(Path(m), cmd)
                print(key, results[key]["code"], flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
        return 0
    a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())
    bad = 0
    for key in sorted(set(a) | set(b)):
        ea, eb = a.get(key), b.get(key)
        if ea is None or eb is None:
            print(f"{key}: only in {'B' if ea is None else 'A'}")
            bad += 1
            continue
        for e in (ea, eb):  # the pass table's seconds column
            e["stdout"] = [DECIMAL.sub("<N>", line) for line in e.get("stdout", [])]
        for e in (eb, eb.get("fold") or {}):
            rep = e.get("report")
            if rep and args.ignore_pass:
                rep["passes"] = [p for p in rep.get("passes", []) if p.get("name") not in args.ignore_pass]
        diffs = [k for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)]
        if diffs:
            bad += 1
            detail = []
            for k in diffs:
                if k == "report" and ea.get(k) and eb.get(k):
                    detail += [f"report.{f}" for f in sorted(set(ea[k]) | set(eb[k])) if ea[k].get(f) != eb[k].get(f)]
                else:
                    detail.append(k)
            print(f"{key}: differs in {', '.join(detail)}")
    print(f"{len(set(a) | set(b))} runs compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
