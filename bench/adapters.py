"""One base + many ``.onnx_adapter`` fine-tunes vs one folded model per fine-tune (issue 16).

On the MiniLM classifier of the training flow (``fixtures/training_sets.py``:
all-MiniLM-L6-v2, real weights, a fresh ``Linear(384, 4)`` head), inserted with
the flow's policy (every encoder MatMul ``rank:R`` in the branch layout, the head
``full``), this script builds, under ``--out`` only:

    model.onnx            the export (the "original")
    inserted.onnx         after ``insert``
    base.onnx             ``adapters.make_base`` (cpu pipeline, verified against the export)
    ft<i>.npz             N random "trained" D/V/A/B sets (latency does not depend on the values)
    ft<i>.onnx_adapter    ``adapters.export_adapter`` of each (the first one verified)
    folded<i>.onnx        ``reparam.fold`` of each: one full model per fine-tune
    folded0.cpu.onnx      the first folded model compiled for the cpu target (as the base is)
    results.json          every number printed

and measures, on ONNX Runtime's CPU provider:

- latency at batch 1 and 16 (``--seq`` tokens): base + adapter (active through
  ``RunOptions``), the folded model, the folded model compiled for cpu, the
  original, and the base with no adapter; the models take turns run by run
  (each round in a new random order) so that drift hits all alike; medians;
  ORT's intra-op threads do not spin (``--spin`` to let them);
- session start: ``InferenceSession`` creation of each model (median of
  ``--session-repeats``, alternating), ``LoraAdapter.Load`` and
  ``AdapterSession.load_adapter`` of one adapter;
- memory: the resident set (VmRSS, and the peak VmHWM) of a fresh subprocess that
  imports onnxruntime and beats_compiler, then holds one base + N adapters
  (``serving.AdapterSession``) or N folded sessions, each having run once at batch 1
  (N = ``--n``), less the same process's RSS before it made any session, both read
  after ``malloc_trim(0)`` (the heap glibc keeps after loading would otherwise add
  0 or 27 MiB from run to run; the untrimmed figure is in results.json);
- file sizes: adapter vs folded model vs base.

It prints a table and the issue's two targets (overhead at batch 16 <= 10% over
the folded model; memory for 16 fine-tunes < 1.2x one model) with whether they
hold; it asserts nothing.

    .venv/bin/python bench/adapters.py --out /tmp/adapters-bench
    .venv/bin/python bench/adapters.py --out /tmp/ab --runs 50 --seq 128 --n 1,4,16 --threads 2

Needs the ``exporters`` extra (torch, transformers) for the export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from beats_compiler import adapters, reparam  # noqa: E402
from beats_compiler.serving import AdapterSession  # noqa: E402
from passes import reparam as rp  # noqa: E402

MODELS = ("adapter", "folded", "folded_cpu", "original", "base")
LABELS = {"adapter": "base + adapter", "folded": "folded", "folded_cpu": "folded, cpu-compiled",
          "original": "original export", "base": "base, no adapter"}


# --------------------------------------------------------------------------- building the files


def random_values(inserted: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """Random nonzero values for every trainable tensor, as after training: D near 1,
    A ~ N(0, 1), B and V ~ 0.05 std(W) N(0, 1)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in inserted.graph.initializer}
    values = {}
    for r in reparam.get_records(inserted):
        w = numpy_helper.to_array(inits[r.weight]).astype(np.float64)
        scale = float(np.std(w)) or 1.0
        for name, sd in ((r.D, None), (r.V, 0.05 * scale), (r.A, 1.0), (r.B, 0.05 * scale)):
            if not name:
                continue
            shape = tuple(inits[name].dims)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)
            v = 1 + 0.1 * rng.standard_normal(shape) if sd is None else sd * rng.standard_normal(shape)
            values[name] = v.astype(dtype)
    return values


def build(out: Path, args, say) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from beats_compiler.api import compile as beats_compile
    from fixtures import training_sets as ts

    out.mkdir(parents=True, exist_ok=True)
    n_max = max(args.n)
    t = time.perf_counter()
    ts.export_minilm_classifier(out / "model.onnx")
    say(f"exported MiniLM classifier ({time.perf_counter() - t:.1f} s)")
    policy = rp.Policy.from_dict(ts.minilm_policy(args.rank, "branch"))
    reparam.insert(str(out / "model.onnx"), policy, verify=False).save(out / "inserted.onnx")
    inserted = onnx.load(str(out / "inserted.onnx"))
    records = reparam.get_records(inserted)
    t = time.perf_counter()
    base = adapters.make_base(str(out / "inserted.onnx"), target="cpu", measure_latency=False)
    base.save(out / "base.onnx")
    info = {"records": len(records), "make_base_s": time.perf_counter() - t,
            "base_verified": base.report.verified,
            "parameters": len(adapters.base_parameters(onnx.load(str(out / "base.onnx"))))}
    say(f"base: {info['records']} records, {info['parameters']} adapter inputs, verified {info['base_verified']} "
        f"({info['make_base_s']:.1f} s)")
    t = time.perf_counter()
    for i in range(n_max):
        values = random_values(inserted, seed=i)
        adapter = reparam.Adapter(records, values)
        adapter.save(out / f"ft{i}.npz")
        rep = adapters.export_adapter(adapter, str(out / "base.onnx"), out / f"ft{i}.onnx_adapter", verify=i == 0,
                                       measure_latency=False)
        if i == 0:
            info["export_adapter_max_abs_diff"] = rep.max_abs_diff
        reparam.fold(str(out / "inserted.onnx"), values=values, verify=False,
                     measure_latency=False).save(out / f"folded{i}.onnx")
    say(f"{n_max} adapters and {n_max} folded models written ({time.perf_counter() - t:.1f} s)")
    beats_compile(str(out / "folded0.onnx"), "cpu", verify=False, measure_latency=False).save(
        out / "folded0.cpu.onnx")
    return info


# --------------------------------------------------------------------------- measuring


def session_options(threads: int, spin: bool = False) -> ort.SessionOptions:
    """Without spinning: each session has its own intra-op thread pool, whose threads
    otherwise spin for a while after a run and slow down the next session's run on a
    small machine (a run right after the same session's looked 30% faster)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def feeds_for(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, 30000, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64)}


def latency(out: Path, args) -> dict:
    so = session_options(args.threads, args.spin)
    cpu = ["CPUExecutionProvider"]
    serving = AdapterSession(out / "base.onnx", sess_options=so, providers=cpu)
    serving.load_adapter("ft0", out / "ft0.onnx_adapter")
    ro = serving.run_options("ft0")
    sessions = {"folded": ort.InferenceSession(str(out / "folded0.onnx"), so, providers=cpu),
                "folded_cpu": ort.InferenceSession(str(out / "folded0.cpu.onnx"), so, providers=cpu),
                "original": ort.InferenceSession(str(out / "model.onnx"), so, providers=cpu)}
    calls = {"adapter": lambda f: serving.session.run(None, f, ro),
             "base": lambda f: serving.session.run(None, f),
             **{k: (lambda f, s=s: s.run(None, f)) for k, s in sessions.items()}}
    result = {}
    for batch in args.batches:
        feeds = feeds_for(batch, args.seq)
        outs = {k: np.asarray(calls[k](feeds)[0], np.float64) for k in MODELS}
        diffs = {"adapter_vs_folded": float(np.abs(outs["adapter"] - outs["folded"]).max()),
                 "base_vs_original": float(np.abs(outs["base"] - outs["original"]).max()),
                 "adapter_vs_base": float(np.abs(outs["adapter"] - outs["base"]).max())}
        for k in MODELS:
            for _ in range(args.warmup):
                calls[k](feeds)
        times = {k: [] for k in MODELS}
        rng = np.random.default_rng(batch)
        for _ in range(args.runs):
            for k in rng.permutation(MODELS):  # each round in a new order: no fixed predecessor
                t0 = time.perf_counter()
                calls[k](feeds)
                times[k].append((time.perf_counter() - t0) * 1e3)
        # Paired: the ratio within each round (runs seconds apart), then the median of those,
        # which a load that comes and goes over minutes disturbs less than a ratio of medians.
        paired = {k: statistics.median(a / b for a, b in zip(times["adapter"], times[k]))
                  for k in MODELS if k != "adapter"}
        result[batch] = {"median_ms": {k: statistics.median(v) for k, v in times.items()},
                         "iqr_ms": {k: float(np.subtract(*np.percentile(v, [75, 25]))) for k, v in times.items()},
                         "paired_ratio": paired, "times_ms": times, "diff": diffs}
    return result


def session_start(out: Path, args) -> dict:
    so = session_options(args.threads, args.spin)
    cpu = ["CPUExecutionProvider"]
    paths = {"original": out / "model.onnx", "folded": out / "folded0.onnx", "base": out / "base.onnx"}
    times = {k: [] for k in paths}
    for i in range(args.session_repeats):
        keys = list(paths) if i % 2 == 0 else list(paths)[::-1]
        for k in keys:
            t0 = time.perf_counter()
            ort.InferenceSession(str(paths[k]), so, providers=cpu)
            times[k].append((time.perf_counter() - t0) * 1e3)
    load, api = [], []
    serving = AdapterSession(out / "base.onnx", sess_options=so, providers=cpu)
    for i in range(max(args.session_repeats, 10)):
        t0 = time.perf_counter()
        a = ort.LoraAdapter()
        a.Load(str(out / "ft0.onnx_adapter"))
        load.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        serving.load_adapter(f"a{i}", out / "ft0.onnx_adapter")
        api.append((time.perf_counter() - t0) * 1e3)
        serving.unload_adapter(f"a{i}")
    res = {k: statistics.median(v) for k, v in times.items()}
    res["lora_adapter_load"] = statistics.median(load)
    res["adapter_session_load_adapter"] = statistics.median(api)
    return res


def _rss_kib() -> dict[str, int]:
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                got[line.split(":")[0]] = int(line.split()[1])
    return got


def _malloc_trim() -> None:
    """Give freed heap back to the system (glibc), so that RSS counts what is held,
    not what the allocator happens to keep after loading (otherwise one model reads
    175 or 200 MiB from run to run)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(spec: dict) -> None:
    """A fresh process: hold the sessions of ``spec``, print its memory as JSON."""
    out, n, kind = Path(spec["out"]), spec["n"], spec["kind"]
    so = session_options(spec["threads"], spec["spin"])
    cpu = ["CPUExecutionProvider"]
    feeds = feeds_for(1, spec["seq"])
    _malloc_trim()
    before = _rss_kib()
    keep = []
    if kind == "adapters":
        serving = AdapterSession(out / "base.onnx", sess_options=so, providers=cpu)
        for i in range(n):
            serving.load_adapter(f"ft{i}", out / f"ft{i}.onnx_adapter")
        for i in range(n):
            serving.session.run(None, feeds, serving.run_options(f"ft{i}"))
        keep.append(serving)
    else:
        name = {"folded": "folded{i}.onnx", "original": "model.onnx"}[kind]
        for i in range(n):
            s = ort.InferenceSession(str(out / name.format(i=i)), so, providers=cpu)
            s.run(None, feeds)
            keep.append(s)
    untrimmed = _rss_kib()
    _malloc_trim()
    after = _rss_kib()
    print(json.dumps({"before_rss_kib": before["VmRSS"], "rss_kib": after["VmRSS"], "hwm_kib": after["VmHWM"],
                      "untrimmed_rss_kib": untrimmed["VmRSS"], "file_kib": after["RssFile"] - before["RssFile"],
                      "anon_kib": after["RssAnon"] - before["RssAnon"]}))


def memory(out: Path, args, say) -> dict:
    res = {}
    configs = [("original", 1)] + [(k, n) for n in args.n for k in ("adapters", "folded")]
    for kind, n in configs:
        spec = {"out": str(out), "n": n, "kind": kind, "threads": args.threads, "seq": args.seq, "spin": args.spin}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            say(f"memory {kind} x{n}: the subprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        m["net_mib"] = (m["rss_kib"] - m["before_rss_kib"]) / 1024
        m["net_peak_mib"] = (m["hwm_kib"] - m["before_rss_kib"]) / 1024
        m["net_untrimmed_mib"] = (m["untrimmed_rss_kib"] - m["before_rss_kib"]) / 1024
        res[f"{kind}:{n}"] = m
        say(f"memory {kind} x{n}: {m['net_mib']:.0f} MiB over the interpreter's {m['before_rss_kib'] / 1024:.0f} "
            f"(file-backed {m['file_kib'] / 1024:.0f}, anonymous {m['anon_kib'] / 1024:.0f})")
    return res


# --------------------------------------------------------------------------- report


def _mib(path: Path) -> float:
    return path.stat().st_size / 2 ** 20


def report(out: Path, args, info: dict, lat: dict, start: dict, mem: dict) -> dict:
    sizes = {"original": _mib(out / "model.onnx"), "folded": _mib(out / "folded0.onnx"),
             "base": _mib(out / "base.onnx"), "adapter": _mib(out / "ft0.onnx_adapter"),
             "adapter_npz": _mib(out / "ft0.npz")}
    print()
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, {platform.machine()}, {os.cpu_count()} cores, "
          f"intra-op threads {args.threads or 'ORT default'}; MiniLM classifier, {info['records']} weights "
          f"(encoder MatMuls rank:{args.rank} branch, head full), sequence {args.seq}")
    print()
    print(f"Latency (ms, median of {args.runs} runs; the five take turns, a new random order each round):")
    print()
    ratios = ("folded", "folded_cpu", "original")
    print("| batch | " + " | ".join(LABELS[k] for k in MODELS) + " | "
          + " | ".join(f"adapter / {LABELS[k]}" for k in ratios) + " |")
    print("|---|" + "---:|" * (len(MODELS) + len(ratios)))
    for batch, r in lat.items():
        m, pr = r["median_ms"], r["paired_ratio"]
        print(f"| {batch} | " + " | ".join(f"{m[k]:.1f}" for k in MODELS) + " | "
              + " | ".join(f"{m['adapter'] / m[k]:.3f} ({pr[k]:.3f})" for k in ratios) + " |")
    print()
    print("(ratios: of the medians, and in brackets the median of the ratios within each round)")
    print()
    for batch, r in lat.items():
        d = r["diff"]
        print(f"batch {batch}: max |base+adapter - folded| {d['adapter_vs_folded']:.2e}, "
              f"max |base - original| {d['base_vs_original']:.2e}, max |base+adapter - base| "
              f"{d['adapter_vs_base']:.2e}")
    print()
    print(f"Session start (ms, median of {args.session_repeats}): original {start['original']:.0f}, folded "
          f"{start['folded']:.0f}, base {start['base']:.0f}; one adapter: LoraAdapter.Load "
          f"{start['lora_adapter_load']:.2f}, AdapterSession.load_adapter {start['adapter_session_load_adapter']:.2f}")
    print()
    one = mem.get("original:1", {}).get("net_mib")
    print("Memory (MiB resident, fresh process, over its RSS before any session; peak in brackets):")
    print()
    print("| fine-tunes N | one base + N adapters | N folded sessions | base+adapters / one model "
          "| folded / one model |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.n:
        a, f = mem.get(f"adapters:{n}"), mem.get(f"folded:{n}")
        cell = (lambda m: f"{m['net_mib']:.0f} ({m['net_peak_mib']:.0f})" if m else "n/a")
        ratio = (lambda m: f"{m['net_mib'] / one:.2f}x" if m and one else "n/a")
        print(f"| {n} | {cell(a)} | {cell(f)} | {ratio(a)} | {ratio(f)} |")
    if one:
        print(f"(one model = the original export in one session: {one:.0f} MiB)")
    print()
    print(f"Files (MiB): adapter {sizes['adapter']:.2f} (.npz {sizes['adapter_npz']:.2f}), folded model "
          f"{sizes['folded']:.1f}, base {sizes['base']:.1f}, original {sizes['original']:.1f}; adapter / folded "
          f"{sizes['adapter'] / sizes['folded']:.3%}")
    print()
    b16 = lat.get(16, lat[max(lat)])
    overhead = b16["median_ms"]["adapter"] / b16["median_ms"]["folded"] - 1
    overhead_paired = b16["paired_ratio"]["folded"] - 1
    n16 = mem.get(f"adapters:{max(args.n)}")
    mem_ratio = n16["net_mib"] / one if n16 and one else None
    print(f"Target 1, adapter overhead over folded at batch {16 if 16 in lat else max(lat)} <= 10%: "
          f"{overhead:+.1%} (paired {overhead_paired:+.1%}) -> "
          f"{'holds' if max(overhead, overhead_paired) <= 0.10 else 'does not hold'}")
    if mem_ratio is not None:
        gross = n16["rss_kib"] / mem["original:1"]["rss_kib"]
        print(f"Target 2, memory of {max(args.n)} fine-tunes < 1.2x one model: {mem_ratio:.2f}x -> "
              f"{'holds' if mem_ratio < 1.2 else 'does not hold'} (whole processes, the interpreter's own "
              f"memory included: {gross:.2f}x)")
    results = {"onnxruntime": ort.__version__, "machine": platform.machine(), "cores": os.cpu_count(),
               "args": {k: v for k, v in vars(args).items() if k != "child"}, "build": info,
               "latency": {str(k): v for k, v in lat.items()}, "session_start_ms": start, "memory": mem,
               "sizes_mib": sizes, "overhead_batch16": overhead, "overhead_batch16_paired": overhead_paired,
               "memory_ratio": mem_ratio}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for every file this script writes (required)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and batch (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq", type=int, default=128, help="tokens per sentence (default 128)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--n", default="1,4,16", help="fine-tune counts for the memory table (default 1,4,16)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--session-repeats", type=int, default=5)
    p.add_argument("--spin", action="store_true", help="let ORT's intra-op threads spin (default off, see "
                   "session_options)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if not args.out:
        p.error("--out is required")
    args.n = sorted({int(x) for x in str(args.n).split(",")})
    args.batches = [int(x) for x in str(args.batches).split(",")]
    out = Path(args.out).resolve()

    def say(msg: str) -> None:
        print(msg, flush=True)

    info = build(out, args, say)
    lat = latency(out, args)
    say("latency measured")
    start = session_start(out, args)
    say("session start measured")
    mem = memory(out, args, say)
    report(out, args, info, lat, start, mem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
