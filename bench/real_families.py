"""Try the command line on every model of the real-exporter corpus
(fixtures/real_families.py), exactly as a new user would: one subprocess of
``.venv/bin/beats-compile`` per command, and record what happened.

Per model (all outputs under ``--out``, default ``.cache/real-families-run``):

  cpu      beats-compile M.onnx -o OUT/M/M.beats.onnx --report OUT/M/cpu.json
  gpu      ... --target gpu
  npu      ... --target npu --calib random                 (not with --skip-npu); when that is refused
           for dynamic dims (exit 2, "needs static shapes"), the same again with --input-shape
           NAME=... for each dynamic input (the realistic inputs' shapes at batch 1), as the message says
  real     ... --inputs OUT/M/real.npz  (cpu, with the spec's realistic inputs; only where it has them)
  insfold  beats-compile insert M.onnx -o OUT/M/M.ins.onnx, then
           beats-compile fold OUT/M/M.ins.onnx -o OUT/M/M.fold.onnx; the fold
           result must have M's nodes (op_type, inputs, outputs, in order) and
           M's initializers (names, dtypes, dims, bytes)

For each command: exit code, wall time, nodes before/after, verified, max abs
diff (npu: worst cosine; gpu/npu: fraction of compute nodes on the target),
the first error line and the stderr problems: a line that is not the tool's
own one-line message (``beats-compile: ...``), a line over 200 characters, a
C++ source path (``.cc:``, ``.h:``, ``onnxruntime/core``).  Prints a table
(cells: exit code, verified ok/FAIL, max abs diff or npu worst cosine) and
writes ``results.json`` in ``--out``.

    .venv/bin/python bench/real_families.py [--only NAME...] [--jobs 2] [--out DIR] [--skip-npu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures import real_families as rf  # noqa: E402

DEFAULT_OUT = ROOT / ".cache" / "real-families-run"
OWN_LINE = re.compile(r"^beats-compile: ")
CPP_PATH = re.compile(r"\.(cc|cpp|cxx|h|hpp):|onnxruntime/core")
LONG = 200
COMMANDS = ("cpu", "gpu", "npu", "real", "insfold")


def tool_argv() -> list[str]:
    """The console script setup.sh installs (pyproject: beats-compile = beats_compiler.cli:main)."""
    script = ROOT / ".venv" / "bin" / "beats-compile"
    if script.exists():
        return [str(script)]
    exe = shutil.which("beats-compile")
    return [exe] if exe else [sys.executable, "-m", "beats_compiler.cli"]


def stderr_problems(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        tags = []
        if not OWN_LINE.match(line):
            tags.append("foreign")
        if len(line) > LONG:
            tags.append(f"long({len(line)})")
        if CPP_PATH.search(line):
            tags.append("c++path")
        if tags:
            out.append(f"[{','.join(tags)}] {line[:300]}")
    return out


def first_error(stderr: str, report: dict | None, rc=None) -> str | None:
    if isinstance(rc, int) and rc < 0:
        import signal

        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = str(-rc)
        tail = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        return f"killed by {sig}" + (f"; stderr: {tail[0]}" if tail else "")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    own = [ln for ln in lines if OWN_LINE.match(ln)]
    if own:
        return own[0]
    if lines:
        return lines[0]
    if report and report.get("error"):
        return report["error"]
    return None


def run_cli(args: list[str], report: Path, timeout: float) -> dict:
    report.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(tool_argv() + args + ["--report", str(report)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(ROOT))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - t0
    rep = None
    if report.exists():
        try:
            rep = json.loads(report.read_text())
        except ValueError:
            rep = None
    rec = {
        "argv": " ".join(["beats-compile", *args]),
        "rc": rc, "seconds": round(seconds, 2),
        "nodes_before": (rep or {}).get("nodes_before"), "nodes_after": (rep or {}).get("nodes_after"),
        "verified": (rep or {}).get("verified"), "max_abs_diff": (rep or {}).get("max_abs_diff"),
        "warnings": len((rep or {}).get("warnings") or []),
        "first_error": None if rc == 0 else first_error(err, rep, rc),
        "stderr_lines": len([ln for ln in err.splitlines() if ln.strip()]),
        "stderr_problems": stderr_problems(err),
        "stdout_tail": out.splitlines()[-6:],
    }
    if rep:
        leg = rep.get("legality") or {}
        if leg:
            rec["on_target"] = leg.get("compute_fraction_on_target")
        acc = (rep.get("target_details") or {}).get("accuracy")
        if acc:
            cos = [o["cosine_min"] for o in acc.get("outputs", []) if o.get("cosine_min") is not None]
            rec["cosine_min"] = min(cos) if cos else None
        if rep.get("warnings"):
            rec["warning_lines"] = [w[:300] for w in rep["warnings"][:5]]
        rp = rep.get("reparam") or {}
        if rp:
            rec["reparam"] = {k: (len(v) if isinstance(v, list) else v) for k, v in rp.items()
                              if k in ("inserted", "skipped", "folded", "trainable_params_total", "model_params")}
    return rec


# ------------------------------------------------------------------ insert/fold round trip

def _nodes(m: onnx.ModelProto):
    return [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]


def _inits(m: onnx.ModelProto):
    out = {}
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        out[t.name] = (a.dtype.str, tuple(a.shape), a.tobytes())
    return out


def compare_round_trip(original: Path, folded: Path) -> str:
    """'same', or the first difference between the original's and the fold's
    node lists and initializers."""
    a, b = onnx.load(str(original)), onnx.load(str(folded))
    na, nb = _nodes(a), _nodes(b)
    if na != nb and sorted(map(repr, na)) == sorted(map(repr, nb)):
        first = next(i for i, (x, y) in enumerate(zip(na, nb)) if x != y)
        return f"same nodes in another order (first moved: #{first} {na[first][0]} -> {nb[first][0]})"
    if na != nb:
        if len(na) != len(nb):
            why = f"node count {len(na)} -> {len(nb)}"
        else:
            why = ""
        for i, (x, y) in enumerate(zip(na, nb)):
            if x != y:
                return f"nodes differ{' (' + why + ')' if why else ''} at #{i}: {x[0]}{x[1]}->{x[2]} vs {y[0]}{y[1]}->{y[2]}"[:300]
        return f"nodes differ: {why}"
    ia, ib = _inits(a), _inits(b)
    if set(ia) != set(ib):
        return f"initializer names differ: only in original {sorted(set(ia) - set(ib))[:3]}, only in fold " \
               f"{sorted(set(ib) - set(ia))[:3]}"[:300]
    for k in ia:
        if ia[k][:2] != ib[k][:2]:
            return f"initializer {k}: {ia[k][:2]} -> {ib[k][:2]}"
        if ia[k][2] != ib[k][2]:
            x = np.frombuffer(ia[k][2], np.uint8)
            y = np.frombuffer(ib[k][2], np.uint8)
            return f"initializer {k}: bytes differ ({int((x != y).sum())} of {x.size} bytes)"
    io_a = ([i.name for i in a.graph.input], [o.name for o in a.graph.output])
    io_b = ([i.name for i in b.graph.input], [o.name for o in b.graph.output])
    if io_a != io_b:
        return f"graph inputs/outputs differ: {io_a} vs {io_b}"[:300]
    return "same"


# ------------------------------------------------------------------ one model

def static_shapes(src: Path, real: dict | None) -> list[str]:
    """``--input-shape`` arguments for every input with a dynamic dim: the
    realistic inputs' shapes at batch 1 where there are some, else 1 for each
    dynamic dim."""
    m = onnx.load(str(src), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    args = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            continue
        if real and i.name in real:
            shape = [1, *real[i.name].shape[1:]]
        else:
            shape = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        args += ["--input-shape", f"{i.name}={','.join(map(str, shape))}"]
    return args


def jobs_for(name: str, src: Path, out: Path, real: Path | None, skip_npu: bool, timeout: float):
    d = out / name
    m = str(src)

    def cpu():
        return run_cli([m, "-o", str(d / f"{name}.beats.onnx")], d / "cpu.json", timeout)

    def gpu():
        return run_cli([m, "-o", str(d / f"{name}.gpu.onnx"), "--target", "gpu"], d / "gpu.json", timeout)

    def npu():
        rec = run_cli([m, "-o", str(d / f"{name}.npu.onnx"), "--target", "npu", "--calib", "random"],
                      d / "npu.json", timeout)
        if rec["rc"] == 2 and "static shapes" in (rec["first_error"] or ""):
            # what the message says to do: the same command with --input-shape for each dynamic input
            feeds = dict(np.load(real)) if real is not None else None
            rec["shaped"] = run_cli([m, "-o", str(d / f"{name}.npu.onnx"), "--target", "npu", "--calib", "random",
                                     *static_shapes(src, feeds)], d / "npu-shaped.json", timeout)
        return rec

    def cpu_real():
        return run_cli([m, "-o", str(d / f"{name}.real.beats.onnx"), "--inputs", str(real)], d / "real.json",
                       timeout)

    def insfold():
        ins, fold = d / f"{name}.ins.onnx", d / f"{name}.fold.onnx"
        for p in (ins, fold):
            p.unlink(missing_ok=True)
        r_ins = run_cli(["insert", m, "-o", str(ins)], d / "insert.json", timeout)
        rec = {"insert": r_ins}
        if r_ins["rc"] == 0 and ins.exists():
            r_fold = run_cli(["fold", str(ins), "-o", str(fold)], d / "fold.json", timeout)
            rec["fold"] = r_fold
            rec["round_trip"] = compare_round_trip(src, fold) if r_fold["rc"] == 0 and fold.exists() else None
        else:
            rec["fold"] = None
            rec["round_trip"] = None
        return rec

    out_jobs = [("cpu", cpu), ("gpu", gpu)]
    if not skip_npu:
        out_jobs.append(("npu", npu))
    if real is not None:
        out_jobs.append(("real", cpu_real))
    out_jobs.append(("insfold", insfold))
    return out_jobs


# ------------------------------------------------------------------ table

def _num(x, fmt="{:.1e}"):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return fmt.format(x)


def cell(key: str, rec: dict | None) -> str:
    if rec is None:
        return "-"
    if key == "insfold":
        ins, fold = rec["insert"], rec.get("fold")
        s = f"ins {ins['rc']}"
        if fold is not None:
            s += f" fold {fold['rc']}"
        if rec.get("round_trip") is not None:
            s += " same" if rec["round_trip"] == "same" else " DIFF"
        return s
    if key == "npu" and rec.get("shaped") is not None:
        return f"{cell('npu1', rec)} / shaped {cell('npu1', rec['shaped'])}"
    rc = rec["rc"]
    v = {True: "ok", False: "FAIL", None: ""}[rec.get("verified")]
    if key in ("npu", "npu1") and rec.get("cosine_min") is not None:
        return f"{rc} {v} cos {rec['cosine_min']:.4f}".strip()
    if rc == 0 or rec.get("verified") is False:
        return f"{rc} {v} {_num(rec.get('max_abs_diff'))}".strip()
    return f"{rc}"


def flat_records(res: dict):
    """(command label, record) pairs of one model, insert and fold apart."""
    for key in COMMANDS:
        rec = res.get(key)
        if rec is None:
            continue
        if key == "insfold":
            yield "insert", rec["insert"]
            if rec.get("fold"):
                yield "fold", rec["fold"]
        else:
            yield key, rec
            if rec.get("shaped"):
                yield key + "+input-shape", rec["shaped"]


def print_table(corpus: dict, results: dict, skip_npu: bool) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        Console = None
    cols = ["model", "export s", "nodes", "cpu", "gpu"] + ([] if skip_npu else ["npu"]) + ["real", "insert/fold"]
    rows = []
    for name, c in corpus.items():
        if c["error"]:
            rows.append([name, f"{c['seconds']:.1f}", "-", "export failed: " + c["error"][:90]] + [""] * (len(cols) - 4))
            continue
        r = results.get(name, {})
        cpu = r.get("cpu") or {}
        nodes = f"{cpu.get('nodes_before', '-')}->{cpu.get('nodes_after', '-')}"
        row = [name, f"{c['seconds']:.1f}", nodes, cell("cpu", r.get("cpu")), cell("gpu", r.get("gpu"))]
        if not skip_npu:
            row.append(cell("npu", r.get("npu")))
        row += [cell("real", r.get("real")), cell("insfold", r.get("insfold"))]
        rows.append(row)
    if Console is not None:
        t = Table(*cols, title="beats-compile on the real-family corpus (rc, verified, max abs diff / cosine)")
        for row in rows:
            t.add_row(*row)
        Console(width=200).print(t)
    else:
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(row))
    print("\nerrors and stderr problems:")
    for name, r in results.items():
        for label, rec in flat_records(r):
            if rec["rc"] != 0 or rec["stderr_problems"]:
                print(f"  {name} {label}: rc={rec['rc']} {rec['first_error'] or ''}"[:400])
                for p in rec["stderr_problems"][:3]:
                    print(f"      stderr {p[:250]}")
                if len(rec["stderr_problems"]) > 3:
                    print(f"      ... {len(rec['stderr_problems']) - 3} more stderr problem lines")
        rt = (r.get("insfold") or {}).get("round_trip")
        if rt not in (None, "same"):
            print(f"  {name} round trip: {rt}")


# ------------------------------------------------------------------ main

def tree_state() -> dict:
    """The commit and the locally modified files the run measured (read-only git)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(ROOT), timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": git("rev-parse", "HEAD").strip(),
            "modified": [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"spec names (of {len(rf.FAMILIES)})")
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once (default 2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--skip-npu", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=None, help="export cache (default .cache/real-families)")
    ap.add_argument("--timeout", type=float, default=600, help="per command, seconds (default 600)")
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    tree_start = tree_state()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = rf.select(a.only)

    print(f"exporting {len(specs)} models (cache: {a.cache_dir or rf.CACHE_DIR})", flush=True)
    corpus = {}

    def progress(b):
        src = "cached" if b.cached else "built"
        print(f"  {b.name:22s} {b.seconds:6.2f}s {src}{'  FAILED: ' + b.error if b.error else ''}", flush=True)

    built = rf.build_all([s.name for s in specs], a.cache_dir, progress=progress)
    t_export = time.perf_counter() - t_start
    reals = {}
    for spec in specs:
        b = built[spec.name]
        entry = {"family": spec.family, "exporter": spec.exporter, "note": spec.note, "error": b.error,
                 "checker": b.checker, "seconds": round(b.seconds, 2), "cached": b.cached,
                 "path": str(b.path) if b.path else None}
        if b.path:
            m = onnx.load(str(b.path), load_external_data=False)
            entry["nodes"] = len(m.graph.node)
            entry["bytes"] = b.path.stat().st_size
            (out / spec.name).mkdir(exist_ok=True)
            if spec.real_inputs is not None:
                real = out / spec.name / "real.npz"
                np.savez(real, **spec.real_inputs())
                reals[spec.name] = real
        corpus[spec.name] = entry

    tasks = []
    for spec in specs:
        b = built[spec.name]
        if b.path is None:
            continue
        for key, fn in jobs_for(spec.name, b.path, out, reals.get(spec.name), a.skip_npu, a.timeout):
            tasks.append((spec.name, key, fn))
    print(f"running {len(tasks)} command groups with {a.jobs} at once", flush=True)
    results: dict[str, dict] = {s.name: {} for s in specs if built[s.name].path is not None}
    t_run = time.perf_counter()

    def one(task):
        name, key, fn = task
        rec = fn()
        results[name][key] = rec
        short = cell(key, rec)
        print(f"  {name:22s} {key:8s} {short}", flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        list(pool.map(one, tasks))
    total = time.perf_counter() - t_start
    ordered = {s.name: {k: results[s.name][k] for k in COMMANDS if k in results[s.name]}
               for s in specs if s.name in results}
    doc = {"tool": " ".join(tool_argv()), "tree_start": tree_start, "tree_end": tree_state(), "jobs": a.jobs, "skip_npu": a.skip_npu,
           "seconds_total": round(total, 1), "seconds_export": round(t_export, 1),
           "seconds_commands": round(time.perf_counter() - t_run, 1), "corpus": corpus, "results": ordered}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print()
    print_table(corpus, ordered, a.skip_npu)
    print(f"\ntotal {total:.0f} s (exports {t_export:.0f} s, commands {doc['seconds_commands']:.0f} s); "
          f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
