"""Training benchmark on the MiniLM sentence task (issue 4, acceptance 3).

    .venv/bin/python bench/train_minilm.py [--quick] [--epochs 3] [--batch-size 16] [--rank 8]
                                           [--threads 2] [--out bench/train_minilm.md] [--workdir DIR]

Configurations, all on the same model (all-MiniLM-L6-v2 + mean pooling + a fresh
Linear head, ``fixtures/training_sets.py``), the same data, batch, sequence
length, number of steps and thread count:

- ``beats-<factorization>-<layout>``: ``beats-compile insert`` (the head gets a
  ``full`` factorization, every encoder MatMul weight the one named), ONNX
  Runtime training 1.19.2 artifacts with D/V (A/B) trainable and every other
  initializer frozen;
- ``ort-full-ft``: the exported model itself, every float initializer
  trainable (full fine-tuning), same ORT training;
- ``peft-lora``: the same PyTorch module the ONNX model was exported from, HF
  PEFT LoRA of the same rank on the same 36 encoder Linear layers (alpha = rank,
  so the update is A @ B as in Beats' rank:R), the head trained in full
  (``modules_to_save``), torch threads = ORT intra-op threads.

Each configuration lives in its own worker process (ORT ones in the training
environment ``.venv-train``, PEFT in ``.venv``), so the peak RSS reported is its
own.  The coordinator runs the workers round-robin, one chunk of steps each in
turn, so load from other processes on the machine falls on every
configuration alike.  Step time = one optimizer step (forward, backward,
update), median over the timed steps (the first ``--warmup`` steps of each
worker are not timed).  Accuracy is measured on the held-out set after
training, by ONNX Runtime inference on the trained model (ORT configs:
``export_model_for_inferencing``) or by torch (PEFT).

Writes the markdown table to ``--out`` (and prints it) plus a JSON with every
number beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# (name, kind, factorization, layout, lr)
LOW_LR, FULL_LR = 1e-3, 1e-4


def configs(rank: int) -> list[dict]:
    """Learning rates: a low-rank update (Beats rank:R, LoRA) at 1e-3, updates of
    full-size tensors (Beats full / vector, full fine-tuning) at 1e-4 (the usual
    ranges for adapters vs. full fine-tuning of BERT-class encoders).  Every
    configuration also trains the fresh head: the learning rates are chosen
    so that each family learns the task in the given number of epochs."""
    return [
        {"name": "beats-full-weight", "kind": "beats", "factorization": "full", "layout": "weight", "lr": FULL_LR},
        {"name": "beats-vector-weight", "kind": "beats", "factorization": "vector", "layout": "weight",
         "lr": FULL_LR},
        {"name": f"beats-rank{rank}-weight", "kind": "beats", "factorization": f"rank:{rank}", "layout": "weight",
         "lr": LOW_LR},
        {"name": f"beats-rank{rank}-branch", "kind": "beats", "factorization": f"rank:{rank}", "layout": "branch",
         "lr": LOW_LR},
        {"name": "ort-full-ft", "kind": "ortfull", "lr": FULL_LR},
        {"name": f"peft-lora-r{rank}", "kind": "peft", "rank": rank, "lr": LOW_LR},
    ]


def policy_for(cfg: dict) -> dict:
    rule = {"ops": ["MatMul"], "factorization": cfg["factorization"]}
    if cfg["factorization"].startswith("rank:"):
        rule["layout"] = cfg["layout"]
    return {"rules": [{"ops": ["Gemm"], "min_size": 0, "factorization": "full"}, rule], "seed": 0}


def batches(n: int, batch_size: int, epoch: int, seed: int = 0) -> list[np.ndarray]:
    """The same shuffled batches for every configuration (last partial batch dropped,
    so every step has the same shape)."""
    perm = np.random.default_rng(seed + epoch).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry over
    the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- ORT worker (.venv-train)


def _legalize_layernorm(model) -> int:
    """ORT training's gradient builder needs LayerNormalization's Mean and
    InvStdDev outputs (torch's opset-17 export writes only Y)."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}__mean", f"{node.output[0]}__inv_std"])
            n += 1
    return n


def import_ort_training():
    """ORT training's artifacts/onnxblock/api without torch: an empty package
    module for onnxruntime.training (what beats_compiler.training.env does)."""
    import types

    import onnxruntime

    folder = Path(onnxruntime.__file__).parent / "training"
    if "onnxruntime.training" not in sys.modules:
        mod = types.ModuleType("onnxruntime.training")
        mod.__path__ = [str(folder)]
        sys.modules["onnxruntime.training"] = mod
    onnxruntime.set_default_logger_severity(3)
    from onnxruntime.training import api, artifacts, onnxblock

    return artifacts, onnxblock, api


class OrtWorker:
    def __init__(self, cfg: dict, model_path: str, workdir: str, threads: int, train: dict, evalset: dict,
                 batch_size: int):
        import onnx

        artifacts, onnxblock, api = import_ort_training()
        import onnxruntime as ort

        self.cfg, self.train_data, self.eval_data, self.bs = cfg, train, evalset, batch_size
        self.art = Path(workdir) / cfg["name"]
        if cfg["kind"] != "beats":
            self.art.mkdir(parents=True, exist_ok=True)
        model = onnx.load(model_path)
        _legalize_layernorm(model)
        floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,)]
        if cfg["kind"] == "beats":
            from passes.reparam import RECORD_KEY, load_records

            recs = load_records(next(e.value for e in model.metadata_props if e.key == RECORD_KEY))
            trainable = [n for r in recs for n in r.trainable]
            self.records = recs
        else:  # full fine-tuning: every float initializer
            trainable = [t.name for t in floats]
            self.records = None
        tset = set(trainable)
        frozen = [t.name for t in model.graph.initializer if t.name not in tset]
        sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
        self.trainable_params = sum(sizes[n] for n in trainable)
        self.model_params = sum(int(np.prod(t.dims)) for t in floats)
        t0 = time.perf_counter()
        if cfg["kind"] == "beats":  # what `beats-compile artifacts` writes (pre-flight included)
            from beats_compiler.training import generate_artifacts

            generate_artifacts(model_path, self.art, loss="ce", output="logits", optimizer="adamw", lr=cfg["lr"])
        else:  # full fine-tuning: ORT's builder directly, same loss and optimizer
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen, loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=onnxblock.optim.AdamW(weight_decay=0.0), artifact_directory=str(self.art))
        self.artifacts_s = time.perf_counter() - t0
        self.trainable = trainable
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # no spinning after a step: the next worker in the round-robin must get the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.state = api.CheckpointState.load_checkpoint(str(self.art / "checkpoint"))
        self.module = api.Module(str(self.art / "training_model.onnx"), self.state, str(self.art / "eval_model.onnx"),
                                 session_options=so)
        self.opt = api.Optimizer(str(self.art / "optimizer_model.onnx"), self.module)
        self.opt.set_learning_rate(cfg["lr"])
        self.module.train()
        self.input_names = [n for n in self.module.input_names() if n != "labels"]
        self.ort = ort
        self.threads = threads

    def step(self, idx: np.ndarray) -> tuple[float, float]:
        feeds = [self.train_data[n][idx] for n in self.input_names] + [self.train_data["labels"][idx]]
        t0 = time.perf_counter()
        out = self.module(*feeds)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        self.opt.step()
        self.module.lazy_reset_grad()
        return time.perf_counter() - t0, float(loss)

    def finish(self) -> dict:
        path = self.art / "trained_inference.onnx"
        self.module.export_model_for_inferencing(str(path), ["logits"])
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        sess = self.ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        logits = np.concatenate([sess.run(["logits"], {n: self.eval_data[n][i:i + 64] for n in names})[0]
                                 for i in range(0, len(self.eval_data["labels"]), 64)])
        acc = float((logits.argmax(1) == self.eval_data["labels"]).mean())
        # the trainable tensors alone (for Beats: the adapter's D/V/A/B)
        trained = {n: self.state.parameters[n].data for n in self.trainable}
        adapter = self.art / "trained_params.npz"
        if self.records:  # Beats: the adapter file `beats-compile fold --adapter` takes (D/V plus records)
            from beats_compiler.reparam import Adapter

            Adapter(self.records, trained).save(adapter)
        else:
            np.savez(adapter, **trained)
        return {"accuracy": acc, "trainable_params": self.trainable_params, "model_params": self.model_params,
                "checkpoint_bytes": (self.art / "checkpoint").stat().st_size,
                "adapter_bytes": adapter.stat().st_size, "artifacts_s": self.artifacts_s}


# --------------------------------------------------------------------------- PEFT worker (.venv)


class PeftWorker:
    def __init__(self, cfg: dict, threads: int, train: dict, evalset: dict, batch_size: int, workdir: str):
        import torch
        from peft import LoraConfig, get_peft_model

        from fixtures.training_sets import minilm_classifier

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        self.torch = torch
        base = minilm_classifier()  # the module the ONNX model was exported from (same weights, same head)
        lcfg = LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], lora_dropout=0.0,
                          target_modules=["query", "key", "value", "dense"], modules_to_save=["head"])
        self.model = get_peft_model(base, lcfg)
        self.model.eval()  # no dropout: the same function as the exported graph; gradients still flow
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        self.model_params = sum(p.numel() for p in self.model.parameters())  # base + LoRA + the head's copy
        self.opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
        self.train_data = {k: torch.from_numpy(v) for k, v in train.items()}
        self.eval_data = evalset
        self.dir = Path(workdir) / cfg["name"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads

    def step(self, idx: np.ndarray) -> tuple[float, float]:
        torch = self.torch
        i = torch.from_numpy(idx)
        ids, mask, y = (self.train_data[k][i] for k in ("input_ids", "attention_mask", "labels"))
        t0 = time.perf_counter()
        logits = self.model(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    def finish(self) -> dict:
        torch = self.torch
        with torch.no_grad():
            logits = np.concatenate([
                self.model(torch.from_numpy(self.eval_data["input_ids"][i:i + 64]),
                           torch.from_numpy(self.eval_data["attention_mask"][i:i + 64])).numpy()
                for i in range(0, len(self.eval_data["labels"]), 64)])
        acc = float((logits.argmax(1) == self.eval_data["labels"]).mean())
        self.model.save_pretrained(str(self.dir / "adapter"))
        adapter_bytes = sum(p.stat().st_size for p in (self.dir / "adapter").rglob("*") if p.is_file()
                            and p.suffix in (".safetensors", ".bin"))
        return {"accuracy": acc, "trainable_params": self.trainable_params, "model_params": self.model_params,
                "checkpoint_bytes": None, "adapter_bytes": adapter_bytes, "artifacts_s": None}


def worker_main(spec_path: str) -> int:
    """One configuration: reads commands from stdin (JSON lines), answers on stdout."""
    spec = json.loads(Path(spec_path).read_text())
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries that print must not corrupt the protocol
    train = dict(np.load(spec["train"]))
    evalset = dict(np.load(spec["eval"]))
    cfg = spec["cfg"]
    try:
        if cfg["kind"] == "peft":
            w = PeftWorker(cfg, spec["threads"], train, evalset, spec["batch_size"], spec["workdir"])
        else:
            w = OrtWorker(cfg, spec["model"], spec["workdir"], spec["threads"], train, evalset, spec["batch_size"])
    except Exception as exc:  # noqa: BLE001  (reported to the coordinator, which prints the table without this row)
        out.write(json.dumps({"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:800]}"}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True, "rss_mb": peak_rss_mb()}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "steps":
            res = [w.step(np.asarray(b, np.int64)) for b in cmd["batches"]]
            out.write(json.dumps({"times": [r[0] for r in res], "losses": [r[1] for r in res]}) + "\n")
        elif cmd["op"] == "finish":
            r = w.finish()
            r["peak_rss_mb"] = peak_rss_mb()
            out.write(json.dumps(r) + "\n")
            out.flush()
            return 0
        out.flush()
    return 0


# --------------------------------------------------------------------------- coordinator (.venv)


class Proc:
    def __init__(self, python: str, spec: dict, spec_path: Path, log: Path):
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
                   OMP_WAIT_POLICY="PASSIVE")  # torch's OpenMP threads do not spin either (cf. ORT allow_spinning=0)
        self.log = open(log, "w")  # noqa: SIM115  (closed in close())
        self.p = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  env=env, cwd=str(REPO))

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.p.stdin.write(json.dumps(cmd) + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            raise RuntimeError(f"worker exited with {self.p.returncode}; see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        self.p.wait(timeout=60)
        self.log.close()


def accuracy_on_ort(model_path: Path, evalset: dict, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    logits = np.concatenate([sess.run(["logits"], {n: evalset[n][i:i + 64] for n in names})[0]
                             for i in range(0, len(evalset["labels"]), 64)])
    return float((logits.argmax(1) == evalset["labels"]).mean())


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def paired_speedup(ref: dict, r: dict, warmup: int) -> float:
    """Median over step indices of ref_step_i / r_step_i: step i of every
    configuration ran in the same round of the round-robin, so the pairing
    cancels slow drifts in machine load."""
    a, b = ref["step_ms"][warmup:], r["step_ms"][warmup:]
    return statistics.median(x / y for x, y in zip(a, b))


def table(rows: list[dict], base_params: int, warmup: int) -> str:
    by = {r["name"]: r for r in rows if "error" not in r}
    full = by.get("ort-full-ft")
    lora = next((r for n, r in by.items() if n.startswith("peft-lora")), None)
    head = ("| configuration | trainable params | adapter | ORT checkpoint | median step (ms) | speed-up vs ORT full FT "
            "(ratio of medians / paired) | speed-up vs PEFT LoRA (ratio / paired) | peak RSS (MB) | held-out acc. "
            "| final loss |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} ||||||||| ")
            continue
        cols = []
        for ref in (full, lora):
            cols.append("n/a" if ref is None else
                        f"{ref['median_step_ms'] / r['median_step_ms']:.2f}x / {paired_speedup(ref, r, warmup):.2f}x")
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} ({100 * r['trainable_params'] / base_params:.2f}%) "
            f"| {fmt_bytes(r['adapter_bytes'])} | {fmt_bytes(r['checkpoint_bytes'])} | {r['median_step_ms']:.0f} "
            f"(IQR {r['q1_step_ms']:.0f}-{r['q3_step_ms']:.0f}) | {cols[0]} | {cols[1]} | {r['peak_rss_mb']:.0f} "
            f"| {100 * r['accuracy']:.1f}% | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 epoch of few steps, small data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps of each worker")
    p.add_argument("--chunk", type=int, default=2, help="steps per turn in the round-robin")
    p.add_argument("--only", action="append", default=[], help="run only configurations whose name contains this")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed)")
    p.add_argument("--out", default=str(REPO / "bench" / "train_minilm.md"))
    p.add_argument("--render", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(a.worker)
    if a.render:
        d = json.loads(Path(a.render).read_text())
        print(table(d["results"], d["base_params"], d["args"]["warmup"]))
        return 0

    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from beats_compiler.reparam import insert
    from fixtures import training_sets as ts
    from passes.reparam import Policy

    try:
        from beats_compiler.training import find_training_python

        train_py = find_training_python()
    except ImportError:  # the training package is not importable yet: the default place
        train_py = str(REPO / ".venv-train" / "bin" / "python")
    main_py = sys.executable
    tmp = tempfile.TemporaryDirectory(prefix="train_minilm.") if a.workdir is None else None
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    n_train, n_eval = (25, 10) if a.quick else (100, 40)
    epochs = 1 if a.quick else a.epochs
    print(f"building the task in {work} ...", file=sys.stderr)
    train, ev = ts.sentence_sets(n_train, n_eval, a.seq_len)
    np.savez(work / "train.npz", **train)
    np.savez(work / "eval.npz", **ev)
    model_path = work / "model.onnx"
    if not model_path.exists():
        ts.export_minilm_classifier(model_path)
    acc_before = accuracy_on_ort(model_path, ev, a.threads)
    cfgs = [c for c in configs(a.rank) if not a.only or any(o in c["name"] for o in a.only)]
    procs: dict[str, Proc] = {}
    results: dict[str, dict] = {}
    for c in cfgs:
        mpath = model_path
        if c["kind"] == "beats":
            mpath = work / f"{c['name']}.onnx"
            if not mpath.exists():
                r = insert(str(model_path), Policy.from_dict(policy_for(c)), measure_latency=False)
                if not r.report.verified:
                    raise SystemExit(f"{c['name']}: insert did not verify")
                r.save(mpath)
        spec = {"cfg": c, "model": str(mpath), "train": str(work / "train.npz"), "eval": str(work / "eval.npz"),
                "threads": a.threads, "batch_size": a.batch_size, "workdir": str(work)}
        py = main_py if c["kind"] == "peft" else train_py
        print(f"starting {c['name']} ...", file=sys.stderr)
        procs[c["name"]] = Proc(py, spec, work / f"{c['name']}.spec.json", work / f"{c['name']}.log")
        # Start-up (artifact generation) one at a time, so it does not overlap other work.
        ready = procs[c["name"]].ask(None)
        if "error" in ready:
            results[c["name"]] = {"name": c["name"], "error": ready["error"]}
            procs.pop(c["name"]).close()
    # The same step plan for everyone: epochs x batches, in chunks, round-robin.
    plan = [b.tolist() for e in range(epochs) for b in batches(len(train["labels"]), a.batch_size, e)]
    if a.quick:
        plan = plan[:a.warmup + 6]
    times = {n: [] for n in procs}
    losses = {n: [] for n in procs}
    t_start = time.perf_counter()
    for start in range(0, len(plan), a.chunk):
        chunk = plan[start:start + a.chunk]
        order = list(procs)  # who goes first rotates each turn
        order = order[(start // a.chunk) % len(order):] + order[:(start // a.chunk) % len(order)]
        for name in order:
            r = procs[name].ask({"op": "steps", "batches": chunk})
            times[name].extend(r["times"])
            losses[name].extend(r["losses"])
        done = min(start + a.chunk, len(plan))
        print(f"  step {done}/{len(plan)}  " + "  ".join(
            f"{n}: loss {statistics.fmean(losses[n][-len(chunk):]):.3f}" for n in procs), file=sys.stderr)
    for name, proc in procs.items():
        r = proc.ask({"op": "finish"})
        proc.close()
        t = [1000 * x for x in times[name][a.warmup:]]
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        steps_per_epoch = len(plan) // epochs if not a.quick else len(plan)
        r.update(name=name, median_step_ms=statistics.median(t), q1_step_ms=q[0], q3_step_ms=q[2],
                 timed_steps=len(t), steps=len(plan),
                 final_loss=statistics.fmean(losses[name][-max(1, min(steps_per_epoch, len(plan)) // 2):]),
                 losses=losses[name], step_ms=[1000 * x for x in times[name]])
        results[name] = r
    rows = [results[c["name"]] for c in cfgs if c["name"] in results]
    import onnx

    base_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model_path)).graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT)
    md = table(rows, base_params, a.warmup)
    import onnxruntime as ort_main
    import torch

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = "missing"
    header = (
        f"MiniLM task: {len(train['labels'])} train / {len(ev['labels'])} held-out sentences, 4 classes, "
        f"sequence length {a.seq_len}, batch {a.batch_size}, {epochs} epoch(s) = {len(plan)} steps per configuration "
        f"({a.warmup} warm-up steps untimed), {a.threads} threads each (ORT intra-op / torch), round-robin in chunks "
        f"of {a.chunk} steps. Held-out accuracy before training (exported model, ORT): {100 * acc_before:.1f}%. "
        f"Wall time {time.perf_counter() - t_start:.0f} s. Versions: ORT training 1.19.2 (.venv-train), "
        f"torch {torch.__version__}, peft {peft_v}, onnxruntime {ort_main.__version__} (accuracy before). "
        f"Machine: {os.cpu_count()} CPU cores{' (quick mode)' if a.quick else ''}.")
    text = header + "\n\n" + md + "\n"
    print(text)
    out = Path(a.out)
    if not a.quick or a.out != p.get_default("out"):
        from beats_compiler.io import atomic_write_bytes

        atomic_write_bytes(out, text.encode())
        atomic_write_bytes(out.with_suffix(".json"), json.dumps(
            {"accuracy_before": acc_before, "base_params": base_params, "args": vars(a), "results": rows}, indent=1).encode())
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
