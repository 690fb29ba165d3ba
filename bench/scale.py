"""Issue 17's scale check: compile, insert and fold of a 7B-parameter decoder.

    python bench/scale.py --workdir /tmp/scale                 # generates the Llama-2-7B-shaped decoder there
    python bench/scale.py --model big/model.onnx --workdir W    # any model with external data
    python bench/scale.py --layers 4 --workdir W                # the same generator, 4 layers (a quick run)

Each command runs as a user runs it (`beats-compile ...`, verification on, as by
default), in a fresh process under a memory cap (bench/peers.py's ``run_capped``:
RSS of the process tree polled, peak from wait4); wall time and peak RSS are
measured from outside and set against ``time (cp DATA COPY && sync)`` of the
model's data file on the same disk and against the bound "2 GB plus the largest
tensor".  After ``fold`` the folded model's node list and every weight's bytes are
compared with the original's; each output is loaded by ONNX Runtime (graph
optimizations off: the session maps the weights, it does not copy them).  Outputs
are deleted as soon as they are checked (each is as large as the model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peers import run_capped  # noqa: E402

from beats_compiler.runner import largest_tensor  # noqa: E402
from beats_compiler.verify import compare_weights  # noqa: E402

CLI = [sys.executable, "-c", "from beats_compiler.cli import main; raise SystemExit(main())"]


def data_files(model: Path) -> list[Path]:
    m = onnx.load(str(model), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return [model.parent / loc for loc in sorted(locs)]


def cp_seconds(data: Path, workdir: Path) -> float:
    dst = workdir / "cp-copy.data"
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", str(data), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    dst.unlink()
    return wall


def ort_loads(model: Path) -> str:
    code = ("import sys, onnxruntime as ort; so = ort.SessionOptions(); so.log_severity_level = 3; "
            "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL; "
            "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider']); "
            "print(len(s.get_inputs()), len(s.get_outputs()))")
    p = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True)
    return "yes" if p.returncode == 0 else "NO: " + (p.stderr.strip().splitlines() or ["?"])[-1]


def node_list(m: onnx.ModelProto) -> list:
    return [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
            for n in m.graph.node]


def weight_bytes_equal(a: Path, b: Path) -> tuple[int, list[str]]:
    """Every initializer of ``a`` against ``b``'s of the same name, bytes read in
    64 MiB blocks (``verify.compare_weights``): (number in ``a``, names that
    differ or are missing in ``b``)."""
    ma, mb = (onnx.load(str(p), load_external_data=False) for p in (a, b))
    same = set(compare_weights(ma, a.parent, mb, b.parent)["same"])
    return len(ma.graph.initializer), [t.name for t in ma.graph.initializer if t.name not in same]


def run(name: str, cmd: list[str], cap: float, report: Path) -> dict:
    r = run_capped(cmd + ["--report", str(report), "-q"], timeout=7200, mem_cap=int(cap * 2**30))
    row = {"step": name, "rc": r["rc"], "wall": r["wall"], "peak": r["peak"], "killed": r["killed"],
           "err": (r["stderr"].strip().splitlines() or [""])[-1]}
    if report.exists():
        rep = json.loads(report.read_text())
        row["verified"] = rep.get("verified")
        row["method"] = rep.get("verify_method")
        row["max_abs_diff"] = rep.get("max_abs_diff")
        report.unlink()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model with external data (default: generate the 7B decoder in --workdir)")
    ap.add_argument("--workdir", required=True, help="where the generated model and the outputs go")
    ap.add_argument("--layers", type=int, default=None, help="generate this many layers (default 32)")
    ap.add_argument("--factorization", default="rank:8")
    ap.add_argument("--mem-cap", type=float, default=20, help="GiB of RSS per command (default 20)")
    ap.add_argument("--no-verify-too", action="store_true", help="also time each command with --no-verify")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model).resolve()
    else:
        from fixtures import large_decoder as ld

        model = work / "llama7b" / "model.onnx"
        if not model.exists():
            model.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            info = ld.build(model, ld.preset("llama2-7b", layers=args.layers, dtype="float16"))
            print(f"# generated {info.summary()} in {time.perf_counter() - t:.1f} s", flush=True)
    data = data_files(model)
    if len(data) != 1:
        ap.error(f"{model}: expected one external data file, found {len(data)}")
    size = data[0].stat().st_size
    big = largest_tensor(onnx.load(str(model), load_external_data=False))
    bound = 2 * 10**9 + big
    cp = cp_seconds(data[0], work)
    print(f"# {model}: data {size / 2**30:.2f} GiB, largest tensor {big / 2**20:.0f} MiB; "
          f"bound 2 GB + largest tensor = {bound / 2**30:.2f} GiB; cp + sync {cp:.1f} s", flush=True)
    rows = []
    variants = [[]] + ([["--no-verify"]] if args.no_verify_too else [])
    for extra in variants:
        tag = " ".join(extra)
        out_c = work / "compiled" / "model.onnx"
        out_i = work / "inserted" / "model.onnx"
        out_f = work / "folded" / "model.onnx"
        for d in (out_c, out_i, out_f):
            shutil.rmtree(d.parent, ignore_errors=True)
            d.parent.mkdir(parents=True)
        row = run(f"compile {tag}".strip(), CLI + [str(model), "-o", str(out_c), "--no-latency", *extra],
                  args.mem_cap, work / "r.json")
        row["ort_loads"] = ort_loads(out_c) if row["rc"] == 0 else "-"
        rows.append(row)
        shutil.rmtree(out_c.parent, ignore_errors=True)
        row = run(f"insert --factorization {args.factorization} {tag}".strip(),
                  CLI + ["insert", str(model), "-o", str(out_i), "--factorization", args.factorization, *extra],
                  args.mem_cap, work / "r.json")
        row["ort_loads"] = ort_loads(out_i) if row["rc"] == 0 else "-"
        rows.append(row)
        row = run(f"fold {tag}".strip(), CLI + ["fold", str(out_i), "-o", str(out_f), *extra], args.mem_cap,
                  work / "r.json")
        if row["rc"] == 0:
            row["ort_loads"] = ort_loads(out_f)
            same_nodes = node_list(onnx.load(str(model), load_external_data=False)) == node_list(
                onnx.load(str(out_f), load_external_data=False))
            n, bad = weight_bytes_equal(model, out_f)
            row["identical"] = f"nodes {'identical' if same_nodes else 'DIFFER'}; {n - len(bad)}/{n} weights byte-identical"
        rows.append(row)
        for d in (out_i, out_f):
            shutil.rmtree(d.parent, ignore_errors=True)
    print()
    print("| step | exit | wall s | x cp | peak RSS GiB | under 2 GB + largest | verification | checks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ver = ("skipped" if r.get("verified") is None else ("verified" if r["verified"] else "FAILED")
               + (f" ({r['method']})" if r.get("method") else "")) if r["rc"] == 0 else r["err"]
        checks = "; ".join(x for x in (f"ORT loads: {r.get('ort_loads', '-')}", r.get("identical")) if x)
        print(f"| {r['step']} | {r['rc']}{' ' + r['killed'] if r['killed'] else ''} | {r['wall']:.1f} | "
              f"{r['wall'] / cp:.2f} | {r['peak'] / 2**30:.2f} | {'yes' if r['peak'] < bound else 'NO'} | {ver} | "
              f"{checks} |")
    print(f"\ncp + sync of the {size / 2**30:.2f} GiB data file: {cp:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"cp": cp, "bound": bound, "data_bytes": size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
