"""ONNX Runtime training's on-device artifacts (``--format ort``) for an
inserted model: D/V (A/B) trainable, every other initializer frozen.  Runs in
the training environment (onnxruntime-training 1.19.2), called in-process or
by the worker; ``api.generate_artifacts`` is the entry point.

``DIR`` holds ORT's standard files (``training_model.onnx``,
``eval_model.onnx``, ``optimizer_model.onnx``, ``checkpoint``), which ORT's
C/C++/C#/Java/Python training APIs load, plus ``inserted.onnx`` (the model
given, to fold trained values into) and ``beats_artifacts.json`` (what the
loop needs: loss, its output, the label input, model inputs, trainable names,
optimizer settings, pre-flight fixes, versions).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from passes.tensors import tensor_nbytes

from ..errors import InputError, InternalError, short_message
from ..io import save_model, serialized_size
from ..version import VERSION
from . import env as _env
from .common import (FORMAT, INSERTED, LOSSES, check_options, dtype_name,
                     model_inputs_and_label, open_inserted, publish, shape)
from .preflight import preflight


def _value_info(model, name: str):
    for vi in list(model.graph.output) + list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name:
            return vi
    return None


def run_preflight(model, trainable: list[str], loss_output: str):
    """ORT training's pre-flight; a model it cannot take raises ``InputError`` with the report."""
    report = preflight(model, trainable, loss_output)
    if not report.ok:
        raise InputError(report.summary())
    return report


def _with_fixes(report: dict, earlier: list[str] | None) -> dict:
    """The pre-flight as the user sees it: the conversion done in the calling
    process first, then what the training environment's pass changed."""
    if earlier:
        report = dict(report, fixes=list(earlier) + list(report.get("fixes", [])))
    return report


def generate_here(*, inserted_model: str, out_dir: str, loss: str, output: str | None, label_name: str | None,
                  optimizer: str, lr: float, weight_decay: float, betas: list[float], eps: float,
                  legal_model: str | None = None, earlier_fixes: list[str] | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    import numpy as np
    import onnx


    say = progress or (lambda ev: None)
    check_options(loss, optimizer, lr, weight_decay, betas, eps)
    artifacts_mod, onnxblock, _api = _env.import_ort_training()  # not a training environment: say so first
    src, out = Path(inserted_model), Path(out_dir)
    if not out.parent.is_dir():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    # ``legal_model``: the model already converted by the caller's newer onnx (see _preconvert)
    model, external, manifest, output = open_inserted(src, out, output, say,
                                                      Path(legal_model) if legal_model else None)
    trainable = manifest["trainable"]
    out_vi = _value_info(model, output)
    out_dtype = dtype_name(out_vi.type.tensor_type.elem_type)
    if np.dtype(out_dtype).kind != "f":
        raise InputError(f"output {output!r} is {out_dtype}: the loss needs a float output")
    out_shape = shape(out_vi)
    if loss == "ce" and out_shape and len(out_shape) != 2:
        raise InputError(f"ce needs logits of shape (batch, classes); output {output!r} has rank {len(out_shape)}")
    inputs, label = model_inputs_and_label(model, loss, label_name)
    if loss == "ce":
        label_dtype, label_shape = "int64", out_shape[:-1]
    else:
        label_dtype, label_shape = out_dtype, out_shape

    say({"type": "message", "text": "pre-flight"})
    report = run_preflight(model, trainable, output)
    legal = report.model
    legal_inits = {t.name: t for t in legal.graph.initializer}
    missing = [n for n in trainable if n not in legal_inits]
    if missing:
        raise InputError(f"the legalized model lacks trainable tensors {', '.join(missing[:5])}")
    tset = set(trainable)
    frozen = [n for n in legal_inits if n not in tset]

    class _Loss(onnxblock.Block):
        """ORT's loss block on one output, with our label name."""

        def __init__(self):
            super().__init__()
            self.inner = getattr(onnxblock.loss, LOSSES[loss])()

        def build(self, scores):
            return self.inner(scores, label)

    if optimizer == "adamw":
        opt_block = onnxblock.optim.AdamW(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    else:
        opt_block = onnxblock.optim.SGD()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        say({"type": "message", "text": "building the gradient graph"})
        model_arg = legal
        if serialized_size(legal) is None:  # ORT wants a path over 2 GB
            big = tmp / "legal.onnx"
            onnx.save_model(legal, str(big), save_as_external_data=True, location="legal.onnx.data")
            model_arg = str(big)
        try:
            artifacts_mod.generate_artifacts(
                model_arg, requires_grad=list(trainable), frozen_params=frozen, loss=_Loss(), optimizer=opt_block,
                artifact_directory=str(tmp), loss_input_names=[output], additional_output_names=[output])
        except InputError:
            raise
        except Exception as exc:
            raise InternalError(f"ORT training could not generate the artifacts: {short_message(exc)}") from exc
        for f in ("legal.onnx", "legal.onnx.data"):
            if (tmp / f).exists():
                (tmp / f).unlink()
        # The model given, to fold trained values into later.
        if external:
            m2 = onnx.load_model(str(src), load_external_data=False)
            save_model(m2, tmp / INSERTED, external_data=True, base_dir=src.parent)
        else:
            shutil.copyfile(src, tmp / INSERTED)
        params = {n: legal_inits[n] for n in legal_inits}
        t_params = sum(int(np.prod(list(params[n].dims), dtype=np.int64)) for n in trainable)
        f_params = sum(int(np.prod(list(params[n].dims), dtype=np.int64)) for n in frozen)
        from onnxruntime import __version__ as ort_version

        eval_outputs = [o.name for o in onnx.load_model(str(tmp / "eval_model.onnx"), load_external_data=False).graph.output]
        body = {
            "format": FORMAT,
            "producer": f"beats-compile {VERSION}",
            "loss": loss,
            "loss_output": output,
            "label": {"name": label, "dtype": label_dtype, "shape": label_shape},
            "inputs": [{"name": i.name, "dtype": dtype_name(i.type.tensor_type.elem_type), "shape": shape(i)}
                       for i in inputs],
            "eval_outputs": eval_outputs,
            "trainable": {"names": trainable, "count": len(trainable), "params": t_params,
                          "bytes": sum(tensor_nbytes(params[n]) or 0 for n in trainable)},
            "frozen": {"count": len(frozen), "params": f_params, "bytes": sum(tensor_nbytes(params[n]) or 0 for n in frozen)},
            "weights": manifest["weights"],
            "optimizer": {"name": optimizer, "lr": lr, "weight_decay": weight_decay,
                          "betas": list(betas) if optimizer == "adamw" else None,
                          "eps": eps if optimizer == "adamw" else None},
            "preflight": _with_fixes(report.to_dict(), earlier_fixes),
            "versions": {"onnx": onnx.__version__, "onnxruntime_training": ort_version, "beats_compile": VERSION,
                         "model_ir_version": legal.ir_version,
                         "model_opset": max((o.version for o in legal.opset_import if o.domain in ("", "ai.onnx")),
                                            default=None)},
            "files": {},
        }
        files = publish(tmp, out, body)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = {f: (out / f).stat().st_size for f in files}
    say({"type": "message", "text": f"wrote {out}"})
    return {"dir": str(out), "files": sizes, "manifest": body, "preflight": body["preflight"]}
