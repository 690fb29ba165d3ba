"""Compile time against ONNX Runtime's offline optimization (issue 17, acceptance 3).

    python bench/compile_time.py --corpus W/models          # every W/models/NAME/model.onnx
    python bench/compile_time.py --model a.onnx --model b.onnx --repeat 5

W is a ``bench/peers.py --workdir W`` folder (it builds the corpus there).  Each
tool runs in a fresh process (``bench/peer_tools.py``, the same invocation the peer
table uses), ``--repeat`` times, the tools taking turns so that the machine's load
falls on all of them alike; the table gives each tool's median wall time.  ORT
offline = the faster of ORT's basic and extended levels (``optimized_model_filepath``).

Two more rows per run say where the floor is: ``python -c "import onnx"`` (what any
tool built on the onnx package pays before reading a byte) and ``python -c "import
onnxruntime"``.  A model whose ORT offline time is under the first cannot be compiled
faster than ORT by a Python program that imports onnx.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("ort-basic", "ort-extended", "beats-noverify", "beats")
FLOORS = {"import onnx": "import onnx", "import onnxruntime": "import onnxruntime"}


def _wall(cmd: list[str], env: dict) -> tuple[float, int]:
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.stderr.write(f"# {' '.join(cmd[-3:])}: exit {p.returncode}: "
                         f"{p.stderr.decode(errors='replace').strip().splitlines()[-1:]}\n")
    return wall, p.returncode


def measure(model: Path, out: Path, repeat: int) -> dict[str, float | None]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times: dict[str, list[float]] = {k: [] for k in (*TOOLS, *FLOORS)}
    failed: set[str] = set()
    for r in range(repeat):
        order = list(TOOLS) if r % 2 == 0 else list(reversed(TOOLS))
        for tool in order:
            dst = out / f"{tool}.onnx"
            wall, rc = _wall([sys.executable, str(ROOT / "bench" / "peer_tools.py"), tool, str(model), str(dst)], env)
            if rc:
                failed.add(tool)
            times[tool].append(wall)
            for f in out.iterdir():
                f.unlink()
        for name, code in FLOORS.items():
            times[name].append(_wall([sys.executable, "-c", code], env)[0])
    return {k: (None if k in failed else statistics.median(v)) for k, v in times.items()}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="a folder of NAME/model.onnx (bench/peers.py --workdir W: W/models)")
    ap.add_argument("--model", action="append", default=[], help="a model file (repeatable)")
    ap.add_argument("-k", help="only models whose name contains one of these (comma-separated)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and model (default 3; the median is shown)")
    args = ap.parse_args(argv)
    models = [(Path(m).parent.name if Path(m).name == "model.onnx" else Path(m).stem, Path(m)) for m in args.model]
    if args.corpus:
        models += [(d.name, d / "model.onnx") for d in sorted(Path(args.corpus).iterdir()) if (d / "model.onnx").is_file()]
    if args.k:
        keys = args.k.split(",")
        models = [(n, m) for n, m in models if any(k in n for k in keys)]
    if not models:
        ap.error("no models: give --corpus or --model")
    print(f"# {os.cpu_count()} cores, Python {sys.version.split()[0]}, median of {args.repeat} runs per tool, "
          "each in a fresh process; x = beats / ORT offline")
    print("| model | import onnx s | import onnxruntime s | ORT basic s | ORT extended s | ORT offline s "
          "| beats --no-verify s | x | beats verified s | x | no-verify <= ORT | verified <= 2.5x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ok_nv = ok_v = 0
    with tempfile.TemporaryDirectory(prefix="beats-ctime-") as tmp:
        for name, model in models:
            t = measure(model, Path(tmp), args.repeat)
            orts = [x for x in (t["ort-basic"], t["ort-extended"]) if x is not None]
            ort = min(orts) if orts else None
            nv, v = t["beats-noverify"], t["beats"]
            rn = nv / ort if nv is not None and ort else None
            rv = v / ort if v is not None and ort else None
            yes_nv, yes_v = rn is not None and rn <= 1.0, rv is not None and rv <= 2.5
            ok_nv += yes_nv
            ok_v += yes_v
            print(f"| {name} | {_f(t['import onnx'])} | {_f(t['import onnxruntime'])} | {_f(t['ort-basic'])} "
                  f"| {_f(t['ort-extended'])} | {_f(ort)} | {_f(nv)} | {_f(rn)} | {_f(v)} | {_f(rv)} "
                  f"| {'yes' if yes_nv else 'no'} | {'yes' if yes_v else 'no'} |", flush=True)
    print(f"\n{ok_nv}/{len(models)} models: no-verify <= ORT offline; {ok_v}/{len(models)}: verified <= 2.5x ORT offline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
