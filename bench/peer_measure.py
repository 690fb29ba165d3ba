"""Measure one optimized model against its original, in its own process:

    python bench/peer_measure.py ORIG RESULT FEEDS.npz ROUNDS

Prints one JSON line: max abs diff of every output (ORT default level, same
feeds), median latency of original and result at ORT's default level
(ORT_ENABLE_ALL) and with graph optimizations off (ORT_DISABLE_ALL), timed
alternately (orig, result, orig, ...) in this one process, and the median
session start time (default level) of each.  One intra-op thread: the machine
is small and shared, and one thread keeps the ratios stable.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def _session(path, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(sess, feeds):
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _diff(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return float("inf")
        if x.dtype.kind in "fiub" and y.dtype.kind in "fiub":
            if x.size:
                d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                worst = max(worst, float(np.nanmax(d)) if not np.isnan(d).all() else 0.0)
                if (np.isnan(x) != np.isnan(y)).any():
                    return float("inf")
        elif not np.array_equal(x, y):
            return float("inf")
    return worst


def _alternate(s0, s1, f0, f1, rounds, budget_s):
    for _ in range(2):
        s0.run(None, f0)
        s1.run(None, f1)
    t0, t1 = [], []
    start = time.perf_counter()
    for i in range(max(rounds, 5)):
        a = time.perf_counter()
        s0.run(None, f0)
        b = time.perf_counter()
        s1.run(None, f1)
        c = time.perf_counter()
        t0.append(b - a)
        t1.append(c - b)
        if i >= 4 and time.perf_counter() - start > budget_s:
            break
    # The ratio is the median of the per-round ratios: on a shared machine the load drifts
    # between rounds, much less within one round.
    return statistics.median(t0), statistics.median(t1), statistics.median(a / b for a, b in zip(t0, t1))


def main() -> None:
    orig, result, feeds_path, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    budget = float(sys.argv[5]) if len(sys.argv) > 5 else 20.0
    feeds = dict(np.load(feeds_path, allow_pickle=False))
    out = {}
    level = ort.GraphOptimizationLevel
    s0 = _session(orig, level.ORT_ENABLE_ALL)
    s1 = _session(result, level.ORT_ENABLE_ALL)
    f0, f1 = _feeds(s0, feeds), _feeds(s1, feeds)
    out["diff"] = _diff(s0.run(None, f0), s1.run(None, f1))
    out["lat_default"] = _alternate(s0, s1, f0, f1, rounds, budget)
    s0 = s1 = None
    try:
        s0 = _session(orig, level.ORT_DISABLE_ALL)
        s1 = _session(result, level.ORT_DISABLE_ALL)
        out["lat_off"] = _alternate(s0, s1, f0, f1, rounds, budget)
    except Exception as e:  # noqa: BLE001 - e.g. com.microsoft ops need ORT's own fusions: report it
        out["lat_off_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    del s0, s1
    starts = ([], [])
    for _ in range(3 if rounds > 10 else 2):
        for k, p in enumerate((orig, result)):
            a = time.perf_counter()
            _session(p, level.ORT_ENABLE_ALL)
            starts[k].append(time.perf_counter() - a)
    out["start"] = (statistics.median(starts[0]), statistics.median(starts[1]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
