"""The default training engine: the gradient pass plus current onnxruntime.

``generate_native`` writes a train-step model (forward, loss, backward,
optimizer update in one graph: ``passes.train_step``) and an eval model.  The
frozen weights are stored once, in ``weights.data``, which both models
reference.  ``NativeTrainer`` runs them on an ONNX Runtime
``InferenceSession`` with I/O binding: parameters and optimizer state live in
OrtValues between steps, in two sets, the step reading one set and writing the
other (binding an output to its own input's OrtValue is accepted by ORT and
can be silently wrong: its execution order is no contract), swapped each step.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from passes.tensors import tensor_nbytes

from ..errors import InputError
from ..io import save_model
from ..verify import quiet_session_options
from ..version import VERSION
from .common import (ENGINE, EVAL_MODEL, FORMAT, INSERTED, PARAMS, TRAIN_MODEL, WEIGHTS, atomic_npz,
                     batches, dtype_name, model_inputs_and_label, open_inserted, publish, score, shape)

CONVERT_TO = 17  # opset an older model is converted to (the gradient pass needs >= 13)
_INLINE_LIMIT = 1024  # initializers of at most this many bytes stay inside each model


def _problems_line(problems: list[str]) -> str:
    n = len(problems)
    return "\n".join([f"the gradient pass cannot train this model ({n} problem{'s' if n != 1 else ''}):"]
                     + [f"  - {p}" for p in problems])


def preflight(model: onnx.ModelProto, trainable: list[str], output: str) -> tuple[onnx.ModelProto, list[str], dict]:
    """What the gradient pass needs, checked before anything is written:
    opset >= 13 (older models converted), float trainables, a float loss
    output, and a rule for every op on the path from the trainables to it.
    Returns (model to build from, fixes, stats); raises ``InputError`` with
    one line per problem."""
    from passes.convert import to_graph
    from passes.gradient import MIN_OPSET, plan
    from passes.shapes import infer_types

    fixes: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if opset is None:
        raise InputError(_problems_line(["the model imports no default-domain (ai.onnx) opset"]))
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, CONVERT_TO)
        except Exception as exc:
            raise InputError(_problems_line([f"opset {opset} < {MIN_OPSET} and onnx's converter cannot raise it: "
                                             f"{' '.join(str(exc).split())[:200]}"])) from None
        fixes.append(f"opset {opset} -> {CONVERT_TO} (onnx version converter)")
    graph, _ = to_graph(model)
    types = infer_types(graph)
    problems = []
    tensors = graph.tensors()
    for n in trainable:
        t = tensors.get(n)
        if t is None:
            problems.append(f"trainable {n!r} is not a tensor of the graph")
        elif (types.dtype(t) is None) or types.dtype(t).kind != "f":
            problems.append(f"trainable {n!r} is {types.dtype(t)}, not a float tensor")
    if problems:
        raise InputError(_problems_line(problems))
    p = plan(graph, output, trainable, types)
    for op, nodes in sorted(p.missing.items()):
        shown = ", ".join(repr(x) for x in nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
        problems.append(f"no gradient rule for {op} ({len(nodes)} node{'s' if len(nodes) != 1 else ''} on the path "
                        f"to the loss: {shown})")
    if problems:
        raise InputError(_problems_line(problems))
    stats = {"opset": opset, "path_nodes": len(p.path), "unreached_trainables": p.unreached}
    return model, fixes, stats


def _save_pair(train: onnx.ModelProto, ev: onnx.ModelProto, folder: Path) -> None:
    """Both models with their large initializers in one shared ``weights.data``."""
    from onnx import external_data_helper as ext

    onnx.save_model(train, str(folder / TRAIN_MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS, size_threshold=_INLINE_LIMIT)
    saved = onnx.load_model(str(folder / TRAIN_MODEL), load_external_data=False)
    refs = {t.name: list(t.external_data) for t in saved.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}
    for t in ev.graph.initializer:
        if t.name in refs and not ext.uses_external_data(t):  # the same bytes: point at them
            t.ClearField("raw_data")
            del t.float_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(refs[t.name])
    with open(folder / EVAL_MODEL, "wb") as f:
        f.write(ev.SerializeToString())


def generate_native(*, inserted_model: str, out_dir: str, loss: str, output: str | None, label_name: str | None,
                    optimizer: str, lr: float, weight_decay: float, betas: list[float], eps: float,
                    momentum: float = 0.0, ignore_index: int = -100,
                    progress: Callable[[dict], None] | None = None) -> dict:
    from passes.convert import to_graph, to_model
    from passes.gradient import GradientError
    from passes.train_step import LossSpec, OptimizerSpec, build_train_step

    say = progress or (lambda ev: None)
    src, out = Path(inserted_model), Path(out_dir)
    model, external, manifest, output = open_inserted(src, out, output, say)
    trainable = manifest["trainable"]
    inputs, label = model_inputs_and_label(model, loss, label_name)
    say({"type": "message", "text": "pre-flight"})
    legal, fixes, stats = preflight(model, trainable, output)
    graph, env = to_graph(legal)
    say({"type": "message", "text": "building the train step (gradient pass)"})
    try:
        ts = build_train_step(graph, trainable, LossSpec(loss, output, label, ignore_index),
                              OptimizerSpec(optimizer, tuple(betas), eps, weight_decay, momentum))
    except GradientError as exc:
        raise InputError(_problems_line([str(exc)])) from None
    train_m, eval_m = to_model(ts.train, env), to_model(ts.eval, env)
    inits = {t.name: t for t in legal.graph.initializer}
    values = {n: onnx.numpy_helper.to_array(inits[n]) for n in trainable}
    out_vi = next(o for o in eval_m.graph.output if o.name == output)
    label_shape = [d if isinstance(d, int) or d is None else d for d in ts.label_shape] if ts.label_shape else []
    frozen = [n for n in inits if n not in set(trainable)]
    if not out.absolute().parent.is_dir():
        raise InputError(f"{out}: parent folder {out.absolute().parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _save_pair(train_m, eval_m, tmp)
        np.savez(tmp / PARAMS, **values)
        if external:
            save_model(onnx.load_model(str(src), load_external_data=False), tmp / INSERTED, external_data=True,
                       base_dir=src.parent)
        else:
            shutil.copyfile(src, tmp / INSERTED)
        import onnxruntime

        t_params = sum(int(v.size) for v in values.values())
        f_params = sum(int(np.prod(list(inits[n].dims), dtype=np.int64)) for n in frozen)
        body = {
            "format": FORMAT,
            "engine": ENGINE,
            "producer": f"beats-compile {VERSION}",
            "loss": loss,
            "loss_output": output,
            "ignore_index": ignore_index if loss == "ce" else None,
            "label": {"name": label, "dtype": str(ts.label_dtype), "shape": label_shape},
            "inputs": [{"name": i.name, "dtype": dtype_name(i.type.tensor_type.elem_type), "shape": shape(i)}
                       for i in inputs],
            "eval_outputs": [o.name for o in eval_m.graph.output],
            "output_shape": shape(out_vi),
            "trainable": {"names": trainable, "count": len(trainable), "params": t_params,
                          "bytes": sum(tensor_nbytes(inits[n]) or 0 for n in trainable)},
            "frozen": {"count": len(frozen), "params": f_params, "bytes": sum(tensor_nbytes(inits[n]) or 0 for n in frozen)},
            "state": ts.state,
            "weights": manifest["weights"],
            "optimizer": {"name": optimizer, "lr": lr, "weight_decay": weight_decay,
                          "betas": list(betas) if optimizer == "adamw" else None,
                          "eps": eps if optimizer == "adamw" else None,
                          "momentum": momentum if optimizer == "sgd" else None},
            "preflight": {"ok": True, "problems": [], "fixes": fixes, "stats": stats},
            "graph": {"train_nodes": len(train_m.graph.node), "eval_nodes": len(eval_m.graph.node),
                      "backward_nodes": ts.backward_nodes, "optimizer_nodes": ts.optimizer_nodes},
            "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                         "beats_compile": VERSION},
            "files": {},
        }
        if shape(out_vi) and loss == "ce":
            last = shape(out_vi)[-1]
            body["classes"] = last if isinstance(last, int) else None
        files = publish(tmp, out, body)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say({"type": "message", "text": f"wrote {out}"})
    return {"dir": str(out), "files": {f: (out / f).stat().st_size for f in files}, "manifest": body,
            "preflight": body["preflight"]}


# --------------------------------------------------------------------------- running


def providers(device: str | None) -> list:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device in (None, "cpu"):
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise InputError("--device cuda: this onnxruntime has no CUDA execution provider "
                             "(install onnxruntime-gpu on a machine with an NVIDIA GPU)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise InputError(f"unknown device {device!r}: use cpu or cuda")


class NativeTrainer:
    """The train-step and eval sessions, the parameters and optimizer state in
    two OrtValue sets, and the step counter."""

    def __init__(self, art: Path, man: dict, *, device: str | None = None, threads: int = 0):
        import onnxruntime as ort

        self.art, self.man = art, man
        self.device = "cuda" if device == "cuda" else "cpu"
        so = quiet_session_options()
        if threads:
            so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        prov = providers(device)
        self.train_sess = ort.InferenceSession(str(art / TRAIN_MODEL), so, providers=prov)
        self.eval_sess = ort.InferenceSession(str(art / EVAL_MODEL), so, providers=prov)
        self.params = list(man["trainable"]["names"])
        self.state_names = [s for p in self.params for s in man["state"].get(p, [])]
        self.persistent = self.params + self.state_names
        self.model_inputs = [i["name"] for i in man["inputs"]]
        self.label = man["label"]["name"]
        with np.load(art / PARAMS, allow_pickle=False) as z:
            init = {k: z[k] for k in z.files}
        init.update({s: np.zeros_like(init[p]) for p in self.params for s in man["state"].get(p, [])})
        self.step_count = 0
        self._make_buffers(init)

    def _ortvalue(self, a: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

    def _make_buffers(self, values: dict) -> None:
        self.bufs = [{n: self._ortvalue(values[n]) for n in self.persistent},
                     {n: self._ortvalue(np.zeros_like(values[n])) for n in self.persistent}]
        loss_type = next(o.type for o in self.train_sess.get_outputs() if o.name == "loss")
        loss_dt = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(loss_type, np.float32)
        self.loss_val = self._ortvalue(np.zeros((), loss_dt))
        self.cur = 0
        self.bindings = []
        for k in (0, 1):
            b = self.train_sess.io_binding()
            for n in self.persistent:
                b.bind_ortvalue_input(n, self.bufs[k][n])
                b.bind_ortvalue_output(n + ".next", self.bufs[1 - k][n])
            b.bind_ortvalue_output("loss", self.loss_val)
            self.bindings.append(b)

    def step(self, arrays: dict, idx, lr: float) -> float:
        b = self.bindings[self.cur]
        for n in self.model_inputs + [self.label]:
            b.bind_cpu_input(n, np.ascontiguousarray(arrays[n][idx]))
        b.bind_cpu_input("lr", np.asarray(lr, np.float32))
        b.bind_cpu_input("step", np.asarray(self.step_count + 1, np.float32))
        self.train_sess.run_with_iobinding(b)
        self.step_count += 1
        self.cur = 1 - self.cur
        return float(self.loss_val.numpy())

    def _eval_run(self, feeds: dict) -> list:
        b = self.eval_sess.io_binding()
        for n in self.params:
            b.bind_ortvalue_input(n, self.bufs[self.cur][n])
        for n, a in feeds.items():
            b.bind_cpu_input(n, np.ascontiguousarray(a))
        for o in self.man["eval_outputs"]:
            b.bind_output(o, "cpu")
        self.eval_sess.run_with_iobinding(b)
        return [v.numpy() for v in b.get_outputs()]

    def evaluate(self, arrays: dict, n: int, batch: int, drop_last: bool) -> tuple[float, float | None]:
        loss_sum, seen, correct, count = 0.0, 0, 0, 0
        lab = arrays[self.label]
        ignore = self.man.get("ignore_index")
        for idx in batches(n, batch, np.arange(n), drop_last):
            feeds = {k: arrays[k][idx] for k in self.model_inputs + [self.label]}
            loss, logits = self._eval_run(feeds)[:2]
            loss_sum += float(loss) * len(idx)
            seen += len(idx)
            c, k = score(self.man["loss"], logits, lab[idx], ignore)
            correct, count = correct + c, count + k
        acc = correct / count if count else None
        return (loss_sum / seen if seen else float("nan")), acc

    def logits(self, arrays: dict, idx):
        feeds = {k: arrays[k][idx] for k in self.model_inputs}
        feeds[self.label] = self._dummy_label(len(idx), arrays, idx)
        return self._eval_run(feeds)[1]

    def _dummy_label(self, n, arrays, idx):
        if self.label in arrays:
            return arrays[self.label][idx]
        raise InputError("no labels for the reference examples")

    def values(self) -> dict:
        return {n: self.bufs[self.cur][n].numpy().copy() for n in self.params}

    def set_values(self, values: dict) -> None:
        for n, v in values.items():
            self.bufs[self.cur][n].update_inplace(np.ascontiguousarray(v))

    def state(self) -> dict:
        return {n: self.bufs[self.cur][n].numpy().copy() for n in self.persistent}

    def save(self, path: Path, epoch: int) -> None:
        body = self.state()
        body["__step__"] = np.asarray(self.step_count, np.int64)
        body["__epoch__"] = np.asarray(epoch, np.int64)
        atomic_npz(path, body)

    def load(self, path: Path) -> int:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        missing = [n for n in self.persistent if n not in d]
        if missing or "__epoch__" not in d:
            raise InputError(f"{path}: not a checkpoint of these artifacts (missing {', '.join(missing[:3]) or '__epoch__'})")
        for n in self.persistent:
            self.bufs[self.cur][n].update_inplace(np.ascontiguousarray(d[n]))
        self.step_count = int(d["__step__"])
        return int(d["__epoch__"])

