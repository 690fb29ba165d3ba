"""Training benchmark on the MiniLM sentence task: the new engine against ORT training 1.19.2, PEFT LoRA and torch.

    .venv/bin/python bench/train_minilm.py [--quick] [--configs NAME,NAME|default|all] [--epochs 2]
                                           [--batch-size 16] [--rank 8] [--threads 2] [--out bench/train_minilm.md]
                                           [--workdir DIR]

Rows (``--configs``; the default set is marked *), all on the same model
(all-MiniLM-L6-v2 + mean pooling + a fresh Linear head, ``fixtures/training_sets.py``),
the same data, batch, sequence length, step plan and thread count:

- ``beats-<factorization>-<layout>`` (``beats-rank8-branch`` *; also
  ``beats-full-weight``, ``beats-vector-weight``, ``beats-rank8-weight``): the
  **new engine**. ``beats-compile insert`` (the head gets a ``full``
  factorization, every encoder MatMul weight the one named), then
  ``generate_artifacts(..., format="beats")`` (= ``beats-compile artifacts``:
  the train-step model from the gradient pass, AdamW in the graph), stepped by
  ``NativeTrainer`` (IOBinding, two OrtValue sets) on this ``.venv``'s
  onnxruntime;
- ``ort119-beats-<factorization>-<layout>`` (``ort119-beats-rank8-branch`` *):
  the same inserted model, ``generate_artifacts(..., format="ort")``, stepped by
  ONNX Runtime training 1.19.2's ``api.Module``/``Optimizer`` in ``.venv-train``
  (made by ``scripts/ort-training-env.sh`` when it is missing);
- ``peft-lora-r8`` *: the PyTorch module the ONNX model was exported from, HF
  PEFT LoRA of the same rank on the same 36 encoder Linear layers (alpha = rank,
  so the update is A @ B as in Beats' rank:R), the head trained in full
  (``modules_to_save``);
- ``torch-full-ft`` *: the same PyTorch module, every parameter trainable, AdamW;
- ``ort119-full-ft``: the exported model, every float initializer trainable,
  ORT training 1.19.2's own artifact builder (the previous full fine-tuning row).

Learning rates: 1e-3 for low-rank updates (Beats rank:R, LoRA), 1e-4 for
full-size ones (Beats full/vector, full fine-tuning); AdamW, no weight decay
everywhere; torch threads = ORT intra-op threads (``--threads``); ORT without
spinning, torch with ``OMP_WAIT_POLICY=PASSIVE``.

Artifacts are generated first, each in a process of its own (not counted in any
row's memory or step time).  Then each row lives in its own worker process
(ORT 1.19.2 in ``.venv-train``, everything else in ``.venv``), so its peak RSS
(VmHWM at the end of training, before evaluation) is its own, and the
coordinator runs the workers round-robin, ``--chunk`` steps each in turn (who
goes first rotates), with the same shuffled batches for everyone: load from
other processes falls on every row alike.  Step time = one optimizer step
(forward, backward, update), median over the timed steps (the first
``--warmup`` steps of each worker are untimed).  "Paired" speed-ups are the
median over step indices of the ratio of two rows' times for the same step
(same round of the round-robin, seconds apart).  Held-out accuracy after
training, by ONNX Runtime inference in ``.venv``: Beats rows (both engines) on
the deployable model, the trained adapter folded into the inserted model
(``fold``, verified); ``ort119-full-ft`` on ``export_model_for_inferencing``'s
model; torch rows by torch.

"adapter": what was trained, as a file (Beats: the ``.npz`` that ``fold
--adapter`` takes; PEFT: ``save_pretrained``'s safetensors; full fine-tuning:
every weight).  "checkpoint": what resuming needs (trainable values plus AdamW
state: the native ``.npz``, ``torch.save`` of parameters + optimizer; ORT's
``checkpoint`` file also holds every frozen weight).

Writes the markdown table and the summary to ``--out`` (and prints them) plus a
JSON with every number beside it (``--render JSON`` reprints its table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LOW_LR, FULL_LR = 1e-3, 1e-4
SPEEDUP_TARGET = 1.25  # best Beats new-engine row vs PEFT LoRA (paired)
ORT_TRAINING = "ORT training 1.19.2"


def _tag(fact: str, layout: str) -> str:
    return f"{fact.replace(':', '')}-{layout}"


def configs(rank: int) -> list[dict]:
    """Every row this bench knows, in table order.  Learning rates: a low-rank
    update (Beats rank:R, LoRA) at 1e-3, updates of full-size tensors (Beats
    full / vector, full fine-tuning) at 1e-4 (the usual ranges for adapters
    vs. full fine-tuning of BERT-class encoders)."""
    beats = [("full", "weight", FULL_LR), ("vector", "weight", FULL_LR), (f"rank:{rank}", "weight", LOW_LR),
             (f"rank:{rank}", "branch", LOW_LR)]
    rows = [{"name": f"beats-{_tag(f, lay)}", "kind": "native", "factorization": f, "layout": lay, "lr": lr,
             "twin": f"ort119-beats-{_tag(f, lay)}"} for f, lay, lr in beats]
    rows += [{"name": f"ort119-beats-{_tag(f, lay)}", "kind": "ort", "factorization": f, "layout": lay, "lr": lr}
             for f, lay, lr in beats]
    rows += [{"name": f"peft-lora-r{rank}", "kind": "peft", "rank": rank, "lr": LOW_LR},
             {"name": "torch-full-ft", "kind": "torchfull", "lr": FULL_LR},
             {"name": "ort119-full-ft", "kind": "ortfull", "lr": FULL_LR}]
    return rows


def default_names(rank: int) -> list[str]:
    return [f"beats-rank{rank}-branch", f"ort119-beats-rank{rank}-branch", f"peft-lora-r{rank}", "torch-full-ft"]


def select(rank: int, spec: str | None, only: list[str]) -> list[dict]:
    """``--configs`` (names, ``default`` or ``all``, comma-separated), then
    ``--only`` (substrings) on the result; ``--only`` alone picks from all."""
    allc = configs(rank)
    by = {c["name"]: c for c in allc}
    if spec is None:
        spec = "all" if only else "default"
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names += list(by)
        elif item == "default":
            names += default_names(rank)
        elif item in by:
            names.append(item)
        else:
            raise SystemExit(f"--configs: unknown row {item!r}; known: default, all, {', '.join(by)}")
    keep = set(names)
    if only:
        keep = {n for n in keep if any(o in n for o in only)}
    return [c for c in allc if c["name"] in keep]


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


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:800]}"


# --------------------------------------------------------------------------- artifacts (one process each)


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
    """ORT training's artifacts/onnxblock/api without torch (see beats_compiler.training.env)."""
    from beats_compiler.training.env import import_ort_training as imp

    return imp()


def prepare_main(spec_path: str) -> int:
    """Generate one row's artifacts into spec["art"]; answer one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    out = sys.stdout
    sys.stdout = sys.stderr
    cfg, art = spec["cfg"], Path(spec["art"])
    try:
        if art.exists():
            shutil.rmtree(art)
        t0 = time.perf_counter()
        if cfg["kind"] in ("native", "ort"):
            from beats_compiler.training import generate_artifacts

            res = generate_artifacts(spec["model"], art, loss="ce", output="logits", optimizer="adamw", lr=cfg["lr"],
                                     format="beats" if cfg["kind"] == "native" else "ort")
            body = {"files": res.files, "trainable_params": res.trainable_params,
                    "model_params": res.trainable_params + res.frozen_params}
        elif cfg["kind"] == "ortfull":  # in .venv-train: ORT's builder directly, same loss and optimizer
            import onnx

            artifacts, onnxblock, _api = import_ort_training()
            model = onnx.load(spec["model"])
            _legalize_layernorm(model)
            floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
            fset = set(floats)
            frozen = [t.name for t in model.graph.initializer if t.name not in fset]
            sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
            art.mkdir(parents=True)
            artifacts.generate_artifacts(
                model, requires_grad=floats, frozen_params=frozen, loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=onnxblock.optim.AdamW(weight_decay=0.0), artifact_directory=str(art))
            body = {"trainable": {"names": floats, "params": sum(sizes[n] for n in floats)},
                    "label": {"name": "labels"}, "model_params": sum(sizes[n] for n in floats)}
            (art / "bench_manifest.json").write_text(json.dumps(body))
            body = {"files": {p.name: p.stat().st_size for p in art.iterdir()},
                    "trainable_params": body["trainable"]["params"], "model_params": body["model_params"]}
        else:
            raise ValueError(f"no artifacts for kind {cfg['kind']}")
        body["artifacts_s"] = time.perf_counter() - t0
        body["rss_mb"] = peak_rss_mb()
    except Exception as exc:  # noqa: BLE001  (the coordinator reports it as the row's error)
        out.write(json.dumps({"error": _one_line(exc)}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps(body) + "\n")
    out.flush()
    return 0


# --------------------------------------------------------------------------- workers


class NativeWorker:
    """The new engine: NativeTrainer on this interpreter's onnxruntime (.venv)."""

    def __init__(self, spec: dict, train: dict, evalset: dict):
        from beats_compiler.training.native import NativeTrainer

        self.cfg, self.dir = spec["cfg"], Path(spec["dir"])
        art = Path(spec["art"])
        self.man = json.loads((art / "beats_artifacts.json").read_text())
        self.tr = NativeTrainer(art, self.man, threads=spec["threads"])
        names = [i["name"] for i in self.man["inputs"]]
        label = self.man["label"]["name"]
        self.train = {n: np.ascontiguousarray(train[n]) for n in names}
        self.train[label] = np.ascontiguousarray(train["labels"])
        self.eval = {n: evalset[n] for n in names}
        self.eval[label] = evalset["labels"]
        self.lr = float(self.cfg["lr"])

    def step(self, idx: np.ndarray) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = self.tr.step(self.train, idx, self.lr)
        return time.perf_counter() - t0, loss

    def finish(self) -> dict:
        trained = self.dir / "trained_params.npz"
        np.savez(trained, **self.tr.values())
        ck = self.dir / "checkpoint.npz"
        self.tr.save(ck, 1)
        n = len(self.eval[self.man["label"]["name"]])
        _loss, acc = self.tr.evaluate(self.eval, n, 64, False)  # the eval model, a cross-check of the folded one
        t, f = self.man["trainable"]["params"], self.man["frozen"]["params"]
        return {"trained_values": str(trained), "trainable_params": t, "model_params": t + f,
                "checkpoint_bytes": ck.stat().st_size, "engine_accuracy": acc}


class OrtWorker:
    """ORT training 1.19.2 (api.Module + Optimizer) in .venv-train."""

    def __init__(self, spec: dict, train: dict, evalset: dict):
        _artifacts, _onnxblock, api = import_ort_training()
        import onnxruntime as ort

        self.cfg, self.dir, self.api = spec["cfg"], Path(spec["dir"]), api
        art = Path(spec["art"])
        mf = art / ("bench_manifest.json" if self.cfg["kind"] == "ortfull" else "beats_artifacts.json")
        self.man = json.loads(mf.read_text())
        so = ort.SessionOptions()
        so.intra_op_num_threads = spec["threads"]
        so.inter_op_num_threads = 1
        # no spinning after a step: the next worker in the round-robin must get the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
        self.module = api.Module(str(art / "training_model.onnx"), self.state, str(art / "eval_model.onnx"),
                                 session_options=so)
        self.opt = api.Optimizer(str(art / "optimizer_model.onnx"), self.module)
        self.opt.set_learning_rate(self.cfg["lr"])
        self.module.train()
        label = self.man["label"]["name"]
        self.feeds = [np.ascontiguousarray(train["labels"] if n == label else train[n])
                      for n in self.module.input_names()]

    def step(self, idx: np.ndarray) -> tuple[float, float]:
        feeds = [a[idx] for a in self.feeds]
        t0 = time.perf_counter()
        out = self.module(*feeds)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        self.opt.step()
        self.module.lazy_reset_grad()
        return time.perf_counter() - t0, float(loss)

    def finish(self) -> dict:
        names = self.man["trainable"]["names"]
        trained = self.dir / "trained_params.npz"
        np.savez(trained, **{n: self.state.parameters[n].data for n in names})
        ck = self.dir / "checkpoint"
        self.api.CheckpointState.save_checkpoint(self.state, str(ck), include_optimizer_state=True)
        r = {"trained_values": str(trained), "trainable_params": self.man["trainable"]["params"],
             "model_params": self.man.get("model_params") or
             (self.man["trainable"]["params"] + self.man["frozen"]["params"]),
             "checkpoint_bytes": ck.stat().st_size}
        if self.cfg["kind"] == "ortfull":  # no adapter to fold: ORT's inference export
            path = self.dir / "trained_inference.onnx"
            self.module.export_model_for_inferencing(str(path), ["logits"])
            r.update(infer_model=str(path), adapter_bytes=trained.stat().st_size)
        return r


class TorchWorker:
    """PEFT LoRA (kind peft) or full fine-tuning (kind torchfull) of the module the ONNX model came from."""

    def __init__(self, spec: dict, train: dict, evalset: dict):
        import torch

        from fixtures.training_sets import minilm_classifier

        self.cfg, self.dir, self.torch = spec["cfg"], Path(spec["dir"]), torch
        torch.set_num_threads(spec["threads"])
        torch.set_num_interop_threads(1)
        base = minilm_classifier()  # the module the ONNX model was exported from (same weights, same head)
        if self.cfg["kind"] == "peft":
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=self.cfg["rank"], lora_alpha=self.cfg["rank"], lora_dropout=0.0,
                              target_modules=["query", "key", "value", "dense"], modules_to_save=["head"])
            self.model = get_peft_model(base, lcfg)
        else:
            for p in base.parameters():
                p.requires_grad_(True)
            self.model = base
        self.model.eval()  # no dropout: the same function as the exported graph; gradients still flow
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.model_params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg["lr"], weight_decay=0.0)
        self.train_data = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in train.items()}
        self.eval_data = evalset

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
        if self.cfg["kind"] == "peft":
            self.model.save_pretrained(str(self.dir / "adapter"))
            adapter_bytes = sum(p.stat().st_size for p in (self.dir / "adapter").rglob("*") if p.is_file()
                                and p.suffix in (".safetensors", ".bin"))
        else:
            torch.save(self.model.state_dict(), self.dir / "model.pt")
            adapter_bytes = (self.dir / "model.pt").stat().st_size
        trainable = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({"params": trainable, "optimizer": self.opt.state_dict()}, self.dir / "checkpoint.pt")
        return {"accuracy": acc, "trainable_params": self.trainable_params, "model_params": self.model_params,
                "checkpoint_bytes": (self.dir / "checkpoint.pt").stat().st_size, "adapter_bytes": adapter_bytes}


WORKERS = {"native": NativeWorker, "ort": OrtWorker, "ortfull": OrtWorker, "peft": TorchWorker,
           "torchfull": TorchWorker}


def worker_main(spec_path: str) -> int:
    """One configuration: reads commands from stdin (JSON lines), answers on stdout."""
    spec = json.loads(Path(spec_path).read_text())
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries that print must not corrupt the protocol
    train = dict(np.load(spec["train"]))
    evalset = dict(np.load(spec["eval"]))
    Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
    try:
        w = WORKERS[spec["cfg"]["kind"]](spec, train, evalset)
    except Exception as exc:  # noqa: BLE001  (reported to the coordinator, which prints the table without this row)
        out.write(json.dumps({"error": _one_line(exc)}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True, "rss_mb": peak_rss_mb()}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "steps":
                res = [w.step(np.asarray(b, np.int64)) for b in cmd["batches"]]
                out.write(json.dumps({"times": [r[0] for r in res], "losses": [r[1] for r in res]}) + "\n")
            elif cmd["op"] == "finish":
                train_peak = peak_rss_mb()  # training's peak: before evaluation and saving
                r = w.finish()
                r.update(peak_rss_mb=train_peak, final_peak_rss_mb=peak_rss_mb())
                out.write(json.dumps(r) + "\n")
                out.flush()
                return 0
        except Exception as exc:  # noqa: BLE001
            out.write(json.dumps({"error": _one_line(exc)}) + "\n")
            out.flush()
            return 1
        out.flush()
    return 0


# --------------------------------------------------------------------------- coordinator (.venv)


def _child_env(threads: int, train_py: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY="PASSIVE")  # torch's OpenMP threads do not spin either (cf. ORT allow_spinning=0)
    if train_py:
        env["BEATS_TRAIN_PYTHON"] = train_py
    return env


class Proc:
    def __init__(self, python: str, spec: dict, spec_path: Path, log: Path, env: dict, mode: str = "--worker"):
        spec_path.write_text(json.dumps(spec))
        self.log = open(log, "a")  # noqa: SIM115  (closed in close())
        self.p = subprocess.Popen([python, str(Path(__file__).resolve()), mode, str(spec_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  env=env, cwd=str(REPO))

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.p.stdin.write(json.dumps(cmd) + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            return {"error": f"worker exited with {self.p.returncode}; see {self.log.name}"}
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


def ensure_ort_training_env() -> str:
    """The ORT training 1.19.2 interpreter: $BEATS_TRAIN_PYTHON, else
    .venv-train, made by scripts/ort-training-env.sh when it is missing."""
    given = os.environ.get("BEATS_TRAIN_PYTHON")
    if given:
        return given
    venv = REPO / ".venv-train"
    py = venv / "bin" / "python"
    if not (py.is_file() and any(venv.glob(".beats-setup-*"))):
        print("installing ORT training 1.19.2 into .venv-train (scripts/ort-training-env.sh, a few minutes) ...",
              file=sys.stderr)
        r = subprocess.run(["bash", str(REPO / "scripts" / "ort-training-env.sh")], cwd=str(REPO))
        if r.returncode != 0:
            raise RuntimeError(f"scripts/ort-training-env.sh failed with exit code {r.returncode}")
    return str(py)


def accuracy_on_ort(model_path: Path, evalset: dict, threads: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    logits = np.concatenate([sess.run(["logits"], {n: evalset[n][i:i + 64] for n in names})[0]
                             for i in range(0, len(evalset["labels"]), 64)])
    return float((logits.argmax(1) == evalset["labels"]).mean())


def fold_and_score(inserted: Path, trained: Path, out_dir: Path, evalset: dict, threads: int) -> dict:
    """The trained D/V as an adapter, folded into the inserted model (verified),
    scored on the held-out set by ORT inference."""
    import onnx

    from beats_compiler.reparam import Adapter, get_records, fold

    records = get_records(onnx.load(str(inserted), load_external_data=False))
    with np.load(trained) as z:
        adapter = Adapter(records, {k: z[k] for k in z.files})
    apath = out_dir / "adapter.npz"
    adapter.save(apath)
    res = fold(str(inserted), adapter=adapter, measure_latency=False)
    fpath = out_dir / "folded.onnx"
    res.save(fpath)
    acc = accuracy_on_ort(fpath, evalset, threads)
    fpath.unlink()
    return {"accuracy": acc, "adapter_bytes": apath.stat().st_size, "fold_verified": res.report.verified}


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


def _vs(ref: dict | None, r: dict, warmup: int) -> str:
    if ref is None:
        return "n/a"
    return f"**{paired_speedup(ref, r, warmup):.2f}x** / {ref['median_step_ms'] / r['median_step_ms']:.2f}x"


ENGINES = {"native": "beats-compile (onnxruntime {ort})", "ort": ORT_TRAINING, "ortfull": ORT_TRAINING,
           "peft": "torch + PEFT", "torchfull": "torch"}


def _ok(rows: list[dict]) -> dict:
    return {r["name"]: r for r in rows if "error" not in r}


def _lora(by: dict) -> dict | None:
    return next((r for n, r in by.items() if n.startswith("peft-lora")), None)


def table(rows: list[dict], base_params: int, warmup: int, ort_version: str = "?") -> str:
    by = _ok(rows)
    lora = _lora(by)
    head = ("| configuration | engine | trainable params | adapter | checkpoint | median step ms (IQR) "
            "| speed-up vs PEFT LoRA (paired / ratio of medians) | vs ORT training 1.19.2, same config (paired / ratio) "
            "| peak RSS (MB) | held-out acc. | final loss |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:160]} |||||||||| ")
            continue
        twin = by.get(r.get("twin") or "")
        acc = f"{100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else "n/a"
        lines.append(
            f"| {r['name']} | {ENGINES.get(r.get('kind'), '?').format(ort=ort_version)} "
            f"| {r['trainable_params']:,} ({100 * r['trainable_params'] / base_params:.2f}%) "
            f"| {fmt_bytes(r.get('adapter_bytes'))} | {fmt_bytes(r.get('checkpoint_bytes'))} "
            f"| {r['median_step_ms']:.0f} ({r['q1_step_ms']:.0f}-{r['q3_step_ms']:.0f}) | {_vs(lora, r, warmup)} "
            f"| {_vs(twin, r, warmup) if r.get('kind') == 'native' else ''} | {r['peak_rss_mb']:.0f} "
            f"| {acc} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def summary(rows: list[dict], warmup: int) -> tuple[str, dict]:
    """The acceptance line for the best Beats new-engine row (highest paired
    speed-up vs PEFT LoRA; the lowest median step without a LoRA row)."""
    by = _ok(rows)
    lora = _lora(by)
    native = [r for r in by.values() if r.get("kind") == "native"]
    if not native:
        return "Summary: no Beats new-engine row ran.", {}
    key = (lambda r: paired_speedup(lora, r, warmup)) if lora else (lambda r: -r["median_step_ms"])
    best = max(native, key=key)
    twin = by.get(best.get("twin") or "")
    verdict = {}
    parts = []

    def mark(name: str, ok: bool | None) -> str:
        verdict[name] = ok
        return "not measured" if ok is None else ("met" if ok else "not met")

    if lora:
        s = paired_speedup(lora, best, warmup)
        parts.append(f"speed-up vs PEFT LoRA {s:.2f}x paired ({lora['median_step_ms'] / best['median_step_ms']:.2f}x "
                     f"ratio of medians; target >= {SPEEDUP_TARGET:.2f}x): {mark('speedup_vs_peft', s >= SPEEDUP_TARGET)}")
    else:
        parts.append(f"speed-up vs PEFT LoRA: {mark('speedup_vs_peft', None)}")
    if twin:
        s = paired_speedup(twin, best, warmup)
        parts.append(f"vs {ORT_TRAINING} same config {s:.2f}x paired "
                     f"({twin['median_step_ms'] / best['median_step_ms']:.2f}x ratio of medians; target >= 1.00x, "
                     f"no slower): {mark('no_slower_than_ort', s >= 1.0)}")
    else:
        parts.append(f"vs {ORT_TRAINING} same config: {mark('no_slower_than_ort', None)}")
    refs = [(n, r) for n, r in (("PEFT LoRA", lora), (ORT_TRAINING, twin)) if r is not None]
    if refs and best.get("accuracy") is not None and all(r.get("accuracy") is not None for _n, r in refs):
        ok = all(best["accuracy"] >= r["accuracy"] for _n, r in refs)
        parts.append(f"held-out accuracy {100 * best['accuracy']:.1f}% vs "
                     + ", ".join(f"{n} {100 * r['accuracy']:.1f}%" for n, r in refs)
                     + f" (not worse): {mark('accuracy_not_worse', ok)}")
    else:
        parts.append(f"accuracy: {mark('accuracy_not_worse', None)}")
    if lora:
        ok = best["peak_rss_mb"] <= lora["peak_rss_mb"]
        parts.append(f"peak RSS {best['peak_rss_mb']:.0f} MB vs PEFT LoRA {lora['peak_rss_mb']:.0f} MB (<=): "
                     f"{mark('rss_le_peft', ok)}")
    else:
        parts.append(f"peak RSS vs PEFT: {mark('rss_le_peft', None)}")
    verdict["best"] = best["name"]
    return f"Summary, best Beats new-engine configuration `{best['name']}`: " + "; ".join(parts) + ".", verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prepare", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: warmup + 6 steps per row on a small set (100 train / 40 held-out)")
    p.add_argument("--configs", metavar="NAMES",
                   help="comma-separated rows, or `default` (beats-rankR-branch, ort119-beats-rankR-branch, "
                        "peft-lora-rR, torch-full-ft) or `all`; default: default")
    p.add_argument("--only", action="append", default=[],
                   help="keep only rows whose name contains this (repeatable; alone: picks from all rows)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps of each worker")
    p.add_argument("--chunk", type=int, default=2, help="steps per turn in the round-robin")
    p.add_argument("--workdir", default=None, help="scratch folder, kept (default: a temp folder, removed)")
    p.add_argument("--out", default=str(REPO / "bench" / "train_minilm.md"))
    p.add_argument("--render", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(a.worker)
    if a.prepare:
        return prepare_main(a.prepare)
    if a.render:
        d = json.loads(Path(a.render).read_text())
        print(table(d["results"], d["base_params"], d["args"]["warmup"], d.get("versions", {}).get("onnxruntime", "?")))
        print()
        print(summary(d["results"], d["args"]["warmup"])[0])
        return 0

    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import onnx
    import onnxruntime as ort_main

    from beats_compiler.reparam import insert
    from fixtures import training_sets as ts
    from passes.reparam import Policy

    cfgs = select(a.rank, a.configs, a.only)
    if not cfgs:
        raise SystemExit("no row selected")
    tmp = tempfile.TemporaryDirectory(prefix="train_minilm.") if a.workdir is None else None
    work = Path(a.workdir or tmp.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, dict] = {}

    def fail(c: dict, msg: str) -> None:
        print(f"  {c['name']}: {msg}", file=sys.stderr)
        results[c["name"]] = {"name": c["name"], "kind": c["kind"], "error": msg}

    # The ORT training environment, made when missing (only if an ORT row is asked for).
    train_py = None
    if any(c["kind"] in ("ort", "ortfull") for c in cfgs):
        try:
            train_py = ensure_ort_training_env()
        except Exception as exc:  # noqa: BLE001
            for c in cfgs:
                if c["kind"] in ("ort", "ortfull"):
                    fail(c, f"no ORT training environment: {_one_line(exc)}")
    main_py = sys.executable

    n_train, n_eval = (25, 10) if a.quick else (100, 40)
    print(f"building the task in {work} ...", file=sys.stderr)
    train, ev = ts.sentence_sets(n_train, n_eval, a.seq_len)
    np.savez(work / "train.npz", **train)
    np.savez(work / "eval.npz", **ev)
    model_path = work / "model.onnx"
    if not model_path.exists():
        ts.export_minilm_classifier(model_path)
    acc_before = accuracy_on_ort(model_path, ev, a.threads)
    env = _child_env(a.threads, train_py)

    # Insert (once per policy) and generate every row's artifacts, each in its own process.
    inserted: dict[str, Path] = {}
    prep: dict[str, dict] = {}
    for c in cfgs:
        if c["name"] in results:
            continue
        if c["kind"] in ("native", "ort"):
            tag = _tag(c["factorization"], c["layout"])
            mpath = work / f"inserted-{tag}.onnx"
            if tag not in inserted:
                if not mpath.exists():
                    print(f"inserting {tag} ...", file=sys.stderr)
                    r = insert(str(model_path), Policy.from_dict(policy_for(c)), measure_latency=False)
                    if not r.report.verified:
                        raise SystemExit(f"{tag}: insert did not verify")
                    r.save(mpath)
                inserted[tag] = mpath
            c["model"] = str(mpath)
        elif c["kind"] == "ortfull":
            c["model"] = str(model_path)
        else:
            continue
        c["art"] = str(work / c["name"] / "art")
        (work / c["name"]).mkdir(exist_ok=True)
        print(f"artifacts for {c['name']} ...", file=sys.stderr)
        py = train_py if c["kind"] == "ortfull" else main_py
        pr = Proc(py, {"cfg": c, "model": c["model"], "art": c["art"]}, work / c["name"] / "prepare.json",
                  work / c["name"] / "log.txt", env, mode="--prepare")
        ans = pr.ask(None)
        pr.close()
        if "error" in ans:
            fail(c, f"artifacts: {ans['error']}")
        else:
            prep[c["name"]] = ans
            print(f"  {ans['artifacts_s']:.0f} s", file=sys.stderr)

    # Start the workers one at a time (session creation does not overlap other work).
    procs: dict[str, Proc] = {}
    for c in cfgs:
        if c["name"] in results:
            continue
        spec = {"cfg": c, "art": c.get("art"), "train": str(work / "train.npz"), "eval": str(work / "eval.npz"),
                "threads": a.threads, "batch_size": a.batch_size, "dir": str(work / c["name"])}
        py = train_py if c["kind"] in ("ort", "ortfull") else main_py
        print(f"starting {c['name']} ...", file=sys.stderr)
        (work / c["name"]).mkdir(exist_ok=True)
        procs[c["name"]] = Proc(py, spec, work / f"{c['name']}.spec.json", work / c["name"] / "log.txt", env)
        ready = procs[c["name"]].ask(None)
        if "error" in ready:
            procs.pop(c["name"]).close()
            fail(c, ready["error"])

    # The same step plan for everyone: epochs x batches, in chunks, round-robin.
    if a.quick:
        need, plan, e = a.warmup + 6, [], 0
        while len(plan) < need:
            plan += [b.tolist() for b in batches(len(train["labels"]), a.batch_size, e)]
            e += 1
        plan, epochs = plan[:need], e
    else:
        epochs = a.epochs
        plan = [b.tolist() for e in range(epochs) for b in batches(len(train["labels"]), a.batch_size, e)]
    steps_per_epoch = len(train["labels"]) // a.batch_size
    times = {n: [] for n in procs}
    losses = {n: [] for n in procs}
    t_start = time.perf_counter()
    for start in range(0, len(plan), a.chunk):
        chunk = plan[start:start + a.chunk]
        order = list(procs)  # who goes first rotates each turn
        if not order:
            break
        k = (start // a.chunk) % len(order)
        for name in order[k:] + order[:k]:
            r = procs[name].ask({"op": "steps", "batches": chunk})
            if "error" in r:
                procs.pop(name).close()
                fail(next(c for c in cfgs if c["name"] == name), r["error"])
                continue
            times[name].extend(r["times"])
            losses[name].extend(r["losses"])
        done = min(start + a.chunk, len(plan))
        print(f"  step {done}/{len(plan)}  " + "  ".join(
            f"{n}: {1000 * statistics.fmean(times[n][-len(chunk):]):.0f} ms loss "
            f"{statistics.fmean(losses[n][-len(chunk):]):.3f}" for n in procs), file=sys.stderr)
    train_wall = time.perf_counter() - t_start
    for name, proc in procs.items():
        c = next(c for c in cfgs if c["name"] == name)
        r = proc.ask({"op": "finish"})
        proc.close()
        if "error" in r:
            fail(c, r["error"])
            continue
        try:
            if c["kind"] in ("native", "ort"):
                r.update(fold_and_score(Path(c["model"]), Path(r["trained_values"]), work / name, ev, a.threads))
            elif c["kind"] == "ortfull":
                r["accuracy"] = accuracy_on_ort(Path(r["infer_model"]), ev, a.threads)
        except Exception as exc:  # noqa: BLE001
            r.update(accuracy=None, eval_error=_one_line(exc))
            print(f"  {name}: evaluation failed: {r['eval_error']}", file=sys.stderr)
        t = [1000 * x for x in times[name][a.warmup:]] or [1000 * x for x in times[name]]
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        tail = max(1, min(steps_per_epoch, len(plan)) // 2)
        r.update(name=name, kind=c["kind"], twin=c.get("twin"), lr=c["lr"], median_step_ms=statistics.median(t),
                 q1_step_ms=q[0], q3_step_ms=q[2], timed_steps=len(t), steps=len(plan),
                 final_loss=statistics.fmean(losses[name][-tail:]), losses=losses[name],
                 step_ms=[1000 * x for x in times[name]], artifacts=prep.get(name))
        results[name] = r
    rows = [results[c["name"]] for c in cfgs if c["name"] in results]
    base_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model_path)).graph.initializer
                      if t.data_type == onnx.TensorProto.FLOAT)
    md = table(rows, base_params, a.warmup, ort_main.__version__)
    line, verdict = summary(rows, a.warmup)
    import torch

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = "missing"
    versions = {"onnxruntime": ort_main.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
                "peft": peft_v, "python": sys.version.split()[0],
                "ort_training": "1.19.2 (.venv-train)" if train_py else None}
    load_end = os.getloadavg()
    header = (
        f"MiniLM task: {len(train['labels'])} train / {len(ev['labels'])} held-out sentences, 4 classes, "
        f"sequence length {a.seq_len}, batch {a.batch_size}, {len(plan)} steps per configuration "
        f"({epochs} epoch(s){', quick mode' if a.quick else ''}; {a.warmup} warm-up steps untimed), {a.threads} "
        f"threads each (ORT intra-op / torch), round-robin in chunks of {a.chunk} steps. Held-out accuracy before "
        f"training (exported model, ORT): {100 * acc_before:.1f}%. Training wall time {train_wall:.0f} s "
        f"(whole run {time.perf_counter() - t_all:.0f} s). Versions: onnxruntime {ort_main.__version__} (new engine, "
        f"inference), {ORT_TRAINING + ' (.venv-train)' if train_py else 'no ORT training'}, torch {torch.__version__}, "
        f"peft {peft_v}, Python {versions['python']}. Machine: {os.cpu_count()} CPU cores, load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end.")
    text = header + "\n\n" + md + "\n\n" + line + "\n"
    print(text)
    out = Path(a.out)
    if not a.quick or a.out != p.get_default("out"):
        from beats_compiler.io import atomic_write_bytes

        atomic_write_bytes(out, text.encode())
        atomic_write_bytes(out.with_suffix(".json"), json.dumps(
            {"accuracy_before": acc_before, "base_params": base_params, "args": vars(a), "versions": versions,
             "load_average": {"start": load_start, "end": load_end}, "summary": line, "verdict": verdict,
             "results": rows}, indent=1).encode())
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
