"""The training loop (``train_here``, called by ``api.train`` in-process or by
the worker): over the default engine's train step (``native.NativeTrainer``)
or over ORT training artifacts (``--format ort``).

Data: ``.npz`` files mapping each model input name and the label name to an
array whose first axis is the example.  Each epoch: seeded shuffle, batches,
the learning rate set every step (warmup, then constant, linear or cosine
decay), evaluation, a checkpoint (parameters and optimizer state: an .npz, or
ORT's CheckpointState for ORT artifacts, plus ``loop_state.json``), early stop on the monitored
metric.  At the end: the kept D/V (the best epoch's when there is an eval
metric) as an adapter, ``metrics.json``, ``curve.png`` and, with ``fold``,
the deployable model (folded in the calling process and checked against the
trained model's logits).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..reparam import Adapter, get_records
from ..verify import load_inputs
from . import env as _env
from .common import (ENGINE, INSERTED, SCHEDULES, atomic_json, atomic_npz, batches, load_manifest, read_model,
                     score)
from .native import NativeTrainer

RUN_FILES = {
    "checkpoint": "checkpoint",
    "loop_state": "loop_state.json",
    "best": "best_params.npz",
    "metrics": "metrics.json",
    "curve": "curve.png",
    "adapter": "adapter.npz",
    "reference": "reference.npz",
}
REFERENCE_EXAMPLES = 32
LOGITS_KEY = "__trained_logits__"


def lr_at(step: int, total: int, lr: float, schedule: str, warmup: int) -> float:
    """Learning rate of (0-based) ``step`` of ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return lr * (1.0 - p)
    return lr * 0.5 * (1.0 + math.cos(math.pi * p))


def check_args(epochs: int, batch_size: int, lr: float | None, schedule: str, warmup: int, patience: int | None) -> None:
    if epochs < 1:
        raise InputError(f"--epochs must be at least 1, not {epochs}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {batch_size}")
    if lr is not None and not lr > 0:
        raise InputError(f"--lr must be > 0, not {lr}")
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}: use {', '.join(SCHEDULES)}")
    if warmup < 0:
        raise InputError(f"--warmup must be >= 0, not {warmup}")
    if patience is not None and patience < 1:
        raise InputError(f"--patience must be at least 1, not {patience}")


# --------------------------------------------------------------------------- in the training environment


def _validate(arrays: dict, path: Path, man: dict, label_key: str) -> tuple[dict, int]:
    """Check names, example counts, shapes and dtypes; return the arrays
    (same-kind dtypes cast to the model's) keyed by model input / label name."""
    import numpy as np

    specs = {i["name"]: i for i in man["inputs"]}
    lab = man["label"]
    wanted = list(specs) + [label_key]
    missing = [n for n in wanted if n not in arrays]
    extra = [k for k in arrays if k not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise InputError(f"{path}: {'; '.join(parts)} (expected arrays: {', '.join(wanted)}"
                         f"{'' if label_key != lab['name'] else '; use --label to name the label array'})")
    out, n = {}, None
    for key in wanted:
        a = arrays[key]
        spec = specs[key] if key in specs else {"name": lab["name"], "dtype": lab["dtype"], "shape": lab["shape"]}
        if a.ndim == 0:
            raise InputError(f"{path}: {key!r} is a scalar; the first axis must be the example")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise InputError(f"{path}: {key!r} has {a.shape[0]} examples, {wanted[0]!r} has {n}")
        shape = spec["shape"]
        if shape and len(shape) != a.ndim:
            raise InputError(f"{path}: {key!r} has shape {list(a.shape)}, the model wants rank {len(shape)} "
                             f"{_fmt_shape(shape)}")
        for i, (want, have) in enumerate(zip(shape, a.shape)):
            if i > 0 and isinstance(want, int) and want > 0 and want != have:
                raise InputError(f"{path}: {key!r} has shape {list(a.shape)}, the model wants {_fmt_shape(shape)}")
        dt = np.dtype(spec["dtype"])
        if a.dtype != dt:
            if a.dtype.kind != dt.kind and not (a.dtype.kind in "iu" and dt.kind in "iu"):
                raise InputError(f"{path}: {key!r} is {a.dtype}, the model wants {dt}")
            a = a.astype(dt)
        out[spec["name"]] = np.ascontiguousarray(a)
    if not n:
        raise InputError(f"{path}: no examples")
    if man["loss"] == "ce":
        y = out[lab["name"]]
        if man.get("ignore_index") is not None:  # positions that do not count (padding tokens)
            y = y[y != man["ignore_index"]]
        classes = man.get("classes")
        if y.size and (y.min() < 0 or (classes and y.max() >= classes)):
            raise InputError(f"{path}: labels must lie in [0, {classes}) for ce (or be the ignore index "
                             f"{man.get('ignore_index')}), found {int(y.min())}..{int(y.max())}")
    return out, int(n)


def load_data(art: Path, man: dict, data, eval_data, label: str | None):
    """The checked training and eval arrays (eval: None, 0 when not given)."""
    if man["loss"] == "ce" and "classes" not in man:
        import onnx

        classes = None
        m = onnx.load_model(str(art / "eval_model.onnx"), load_external_data=False)
        for o in m.graph.output:
            if o.name == man["loss_output"] and o.type.tensor_type.shape.dim:
                d = o.type.tensor_type.shape.dim[-1]
                classes = d.dim_value if d.HasField("dim_value") else None
        man["classes"] = classes
    label_key = label or man["label"]["name"]
    train_arrays, n_train = _validate(load_inputs(Path(data), "training data"), Path(data), man, label_key)
    eval_arrays, n_eval = None, 0
    if eval_data is not None:
        eval_arrays, n_eval = _validate(load_inputs(Path(eval_data), "eval data"), Path(eval_data), man, label_key)
    return train_arrays, n_train, eval_arrays, n_eval


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _static_batch(man: dict) -> int | None:
    dims = [i["shape"][0] for i in man["inputs"] if i["shape"]]
    fixed = {d for d in dims if isinstance(d, int) and d > 0}
    return fixed.pop() if len(fixed) == 1 else None


def _plot(path: Path, history: list[dict], loss: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    if any(h.get("eval_loss") is not None for h in history):
        ax.plot(ep, [h.get("eval_loss") for h in history], "s-", label="eval loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({loss})")
    handles, labels = ax.get_legend_handles_labels()
    if any(h.get("eval_accuracy") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(ep, [h.get("eval_accuracy") for h in history], "^--", color="tab:green", label="eval accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1.02)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    ax.set_title("beats-compile train")
    fig.tight_layout()
    import io

    from ..io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


class _Trainer:
    def __init__(self, art: Path, man: dict, state, api):
        self.art, self.man, self.state = art, man, state
        self.module = api.Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"))
        self.optimizer = api.Optimizer(str(art / "optimizer_model.onnx"), self.module)
        # The training and eval models list their inputs and outputs separately.
        self.order, self.out_index = {}, {}
        for mode in (False, True):
            self.module.train(mode)
            outs = list(self.module.output_names())
            self.order[mode] = list(self.module.input_names())
            self.out_index[mode] = outs.index(man["loss_output"]) if man["loss_output"] in outs else 1

    def feeds(self, arrays: dict, idx) -> list:
        return [arrays[name][idx] for name in self.order[self.module.training]]

    def step(self, arrays: dict, idx, lr: float) -> float:
        self.module.train()
        self.optimizer.set_learning_rate(lr)
        outs = self.module(*self.feeds(arrays, idx))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(outs[0])

    def evaluate(self, arrays: dict, n: int, batch: int, drop_last: bool) -> tuple[float, float | None]:
        import numpy as np

        self.module.eval()
        loss_sum, seen, correct, count = 0.0, 0, 0, 0
        lab = arrays[self.man["label"]["name"]]
        for idx in batches(n, batch, np.arange(n), drop_last):
            outs = self.module(*self.feeds(arrays, idx))
            loss_sum += float(outs[0]) * len(idx)
            seen += len(idx)
            logits = outs[self.out_index[False]]
            c, k = score(self.man["loss"], logits, lab[idx])
            correct, count = correct + c, count + k
        acc = correct / count if count else None
        return (loss_sum / seen if seen else float("nan")), acc

    def logits(self, arrays: dict, idx):
        self.module.eval()
        return self.module(*self.feeds(arrays, idx))[self.out_index[False]]

    def values(self) -> dict:
        return {n: self.state.parameters[n].data.copy() for n in self.man["trainable"]["names"]}

    def set_values(self, values: dict) -> None:
        for n, v in values.items():
            self.state.parameters[n] = v


def train_here(*, artifacts_dir: str, data: str, eval_data: str | None, epochs: int, batch_size: int, lr: float | None,
               schedule: str, warmup: int, seed: int, patience: int | None, resume: bool, label: str | None,
               out_dir: str, save_adapter: str | None, curve: bool = True, device: str | None = None, threads: int = 0,
               progress: Callable[[dict], None] | None = None) -> dict:
    import numpy as np

    say = progress or (lambda ev: None)
    check_args(epochs, batch_size, lr, schedule, warmup, patience)
    art, run = Path(artifacts_dir), Path(out_dir)
    man = load_manifest(art)
    lr = float(man["optimizer"]["lr"] if lr is None else lr)
    train_arrays, n_train, eval_arrays, n_eval = load_data(art, man, data, eval_data, label)
    fixed = _static_batch(man)
    if fixed is not None and fixed != batch_size:
        raise InputError(f"the model's inputs have a fixed batch dimension of {fixed}: use --batch-size {fixed}")
    drop_last = fixed is not None
    steps_per_epoch = n_train // batch_size if drop_last else -(-n_train // batch_size)
    if steps_per_epoch == 0:
        raise InputError(f"{data}: {n_train} examples make no batch of {batch_size}")
    total_steps = epochs * steps_per_epoch
    is_cls = man["loss"] in ("ce", "bce")
    monitor = ("eval_accuracy" if is_cls else "eval_loss") if eval_arrays is not None else "train_loss"
    higher = monitor == "eval_accuracy"

    if run.exists() and not run.is_dir():
        raise InputError(f"{run}: exists and is not a folder")
    if not run.parent.is_dir():
        raise InputError(f"{run}: parent folder {run.parent} does not exist")
    ck_path, ls_path = run / RUN_FILES["checkpoint"], run / RUN_FILES["loop_state"]
    adapter_path = Path(save_adapter) if save_adapter else run / RUN_FILES["adapter"]
    if not adapter_path.parent.is_dir() and adapter_path.parent != run:
        raise InputError(f"{adapter_path}: folder {adapter_path.parent} does not exist")
    config = {"artifacts": hashlib.sha256((art / "beats_artifacts.json").read_bytes()).hexdigest()[:16],
              "data": data, "eval_data": eval_data, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "schedule": schedule, "warmup": warmup, "seed": seed, "patience": patience, "n_train": n_train,
              "n_eval": n_eval}
    native = man.get("engine") == ENGINE
    if native:
        tr = NativeTrainer(art, man, device=device, threads=threads)
    else:
        _art_mod, _ob, api = _env.import_ort_training()
    loop = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": [],
            "stopped_early": False}
    if resume:
        if not (ck_path.is_file() and ls_path.is_file()):
            raise InputError(f"{run}: nothing to resume (no checkpoint and loop_state.json from an earlier run)")
        loop = json.loads(ls_path.read_text())
        old = loop.get("config", {})
        keys = ["artifacts", "batch_size", "n_train", "seed", "schedule", "warmup"]
        if schedule != "constant":  # a decaying schedule spans all steps of the run
            keys.append("epochs")
        for k in keys:
            if old.get(k) != config[k]:
                raise InputError(f"--resume: {k} was {old.get(k)} in the run being resumed, now {config[k]}")
        if native:
            ck_epoch = tr.load(ck_path)
        else:
            state = api.CheckpointState.load_checkpoint(str(ck_path))
            ck_epoch = int(state.properties["beats_epoch"]) if "beats_epoch" in state.properties else None
        if ck_epoch != loop["epoch"]:
            raise InputError(f"{run}: checkpoint and loop_state.json disagree (an interrupted save?); start again "
                             "without --resume")
        say({"type": "message", "text": f"resuming after epoch {loop['epoch']} (step {loop['step']})"})
    else:
        run.mkdir(exist_ok=True)
        for f in RUN_FILES.values():  # a fresh run: nothing stale from an earlier one
            if (run / f).is_file():
                (run / f).unlink()
        if not native:
            state = api.CheckpointState.load_checkpoint(str(art / "checkpoint"))
    loop["config"] = config
    if not native:
        tr = _Trainer(art, man, state, api)
    if loop["step"] and not native:
        tr.optimizer.set_learning_rate(lr_at(loop["step"] - 1, total_steps, lr, schedule, warmup))
    best_path = run / RUN_FILES["best"]
    t_params = man["trainable"]["params"]
    say({"type": "start", "epochs": epochs, "steps_per_epoch": steps_per_epoch, "first_epoch": loop["epoch"] + 1,
         "n_train": n_train, "n_eval": n_eval, "trainable_params": t_params, "monitor": monitor})
    if loop["epoch"] == 0 and eval_arrays is not None:  # the starting point, for the record
        l0, a0 = tr.evaluate(eval_arrays, n_eval, batch_size, drop_last)
        loop["initial_eval"] = {"eval_loss": l0, "eval_accuracy": a0}
        say({"type": "message", "text": f"before training: eval loss {l0:.4f}"
             + (f", accuracy {a0:.4f}" if a0 is not None else "")})
    while loop["epoch"] < epochs and not loop["stopped_early"]:
        epoch = loop["epoch"] + 1
        order = np.random.default_rng([seed, epoch]).permutation(n_train)
        t0, loss_sum, seen, last_emit = time.perf_counter(), 0.0, 0, 0.0
        for i, idx in enumerate(batches(n_train, batch_size, order, drop_last)):
            cur_lr = lr_at(loop["step"], total_steps, lr, schedule, warmup)
            loss = tr.step(train_arrays, idx, cur_lr)
            if not math.isfinite(loss):
                raise InputError(f"the training loss became {loss} at epoch {epoch}, step {i + 1}: "
                                 "lower the learning rate")
            loop["step"] += 1
            loss_sum += loss * len(idx)
            seen += len(idx)
            now = time.perf_counter()
            if now - last_emit > 0.2 or i + 1 == steps_per_epoch:
                last_emit = now
                say({"type": "step", "epoch": epoch, "step": i + 1, "steps": steps_per_epoch,
                     "loss": loss_sum / seen, "lr": cur_lr})
        secs = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "eval_loss": None, "eval_accuracy": None,
               "lr": cur_lr, "seconds": secs, "steps": steps_per_epoch, "steps_per_s": steps_per_epoch / secs,
               "trainable_params": t_params}
        if eval_arrays is not None:
            row["eval_loss"], row["eval_accuracy"] = tr.evaluate(eval_arrays, n_eval, batch_size, drop_last)
        # Accuracy ties are broken by the eval loss.
        metric = [row[monitor], row["eval_loss"]] if higher else [row[monitor]]
        better = loop["best"] is None or (
            (metric[0], -metric[1]) > (loop["best"][0], -loop["best"][1]) if higher else metric[0] < loop["best"][0])
        if better:
            loop["best"], loop["best_epoch"], loop["bad_epochs"] = metric, epoch, 0
            atomic_npz(best_path, tr.values())
        else:
            loop["bad_epochs"] += 1
        row["best"] = better
        loop["history"].append(row)
        loop["epoch"] = epoch
        if patience is not None and loop["bad_epochs"] >= patience and epoch < epochs:
            loop["stopped_early"] = True
        # The checkpoint first (with the epoch as a property), then the loop state.
        if native:
            tr.save(ck_path, epoch)
        else:
            state.properties["beats_epoch"] = epoch
            tmp_ck = run / f".{RUN_FILES['checkpoint']}.tmp"
            api.CheckpointState.save_checkpoint(state, str(tmp_ck), include_optimizer_state=True)
            os.replace(tmp_ck, ck_path)
        atomic_json(ls_path, loop)
        say({"type": "epoch", **row, "stopped_early": loop["stopped_early"]})

    # The kept values: the best epoch's when there is an eval metric.
    kept = "last"
    if monitor != "train_loss" and best_path.is_file():
        with np.load(best_path, allow_pickle=False) as z:
            tr.set_values({k: z[k] for k in z.files})
        kept = f"best (epoch {loop['best_epoch']})"
    values = tr.values()
    model, _ = read_model(art / INSERTED)
    Adapter(get_records(model), values).save(adapter_path)
    ref_src, ref_n = (eval_arrays, n_eval) if eval_arrays is not None else (train_arrays, n_train)
    k = min(REFERENCE_EXAMPLES, ref_n)
    if fixed is not None:
        k = fixed if ref_n >= fixed else 0
    idx = np.arange(k)
    ref = {name: ref_src[name][idx] for name in (i["name"] for i in man["inputs"])}
    ref[LOGITS_KEY] = tr.logits(ref_src, idx) if k else np.zeros((0,), np.float32)
    atomic_npz(run / RUN_FILES["reference"], ref)
    hist = loop["history"]
    metrics = {
        "loss": man["loss"], "loss_output": man["loss_output"], "monitor": monitor, "kept": kept,
        "best_epoch": loop["best_epoch"], "best": loop["best"][0] if loop["best"] else None, "stopped_early": loop["stopped_early"],
        "epochs_run": loop["epoch"], "steps": loop["step"], "trainable_params": t_params,
        "frozen_params": man["frozen"]["params"], "initial_eval": loop.get("initial_eval"),
        "config": config, "epochs": hist,
        "sizes": {"adapter_bytes": adapter_path.stat().st_size, "checkpoint_bytes": ck_path.stat().st_size},
    }
    metrics_path = run / RUN_FILES["metrics"]
    atomic_json(metrics_path, metrics)
    warnings = []
    want_curve = curve
    curve = _plot(run / RUN_FILES["curve"], hist, man["loss"]) if hist and want_curve else None
    if hist and want_curve and curve is None:
        warnings.append("curve.png not written: matplotlib is not installed in the training environment")
    return {"run_dir": str(run), "metrics": metrics, "adapter": str(adapter_path), "checkpoint": str(ck_path),
            "metrics_path": str(metrics_path), "curve": curve, "warnings": warnings}

