"""ONNX Runtime training artifacts for an inserted model: D/V (A/B) trainable,
every other initializer frozen.

``DIR`` holds ORT's standard files (``training_model.onnx``,
``eval_model.onnx``, ``optimizer_model.onnx``, ``checkpoint``), which ORT's
C/C++/C#/Java/Python training APIs load, plus ``inserted.onnx`` (the model
given, to fold trained values into) and ``beats_artifacts.json`` (what the
loop needs: loss, its output, the label input, model inputs, trainable names,
optimizer settings, pre-flight fixes, versions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from . import env as _env

MANIFEST = "beats_artifacts.json"
ORT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
INSERTED = "inserted.onnx"
FORMAT = 1
LOSSES = {"ce": "CrossEntropyLoss", "mse": "MSELoss", "bce": "BCEWithLogitsLoss", "l1": "L1Loss"}
OPTIMIZERS = ("adamw", "sgd")
DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}


@dataclass
class ArtifactsResult:
    """What ``generate_artifacts`` wrote."""

    dir: str
    files: dict[str, int]  # file name in dir -> bytes
    manifest: dict  # the content of beats_artifacts.json
    preflight: dict = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return self.manifest["trainable"]["params"]

    @property
    def frozen_params(self) -> int:
        return self.manifest["frozen"]["params"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ArtifactsResult":
        return cls(**d)


ENGINES = ("beats", "ort")


def _check_options(loss: str, optimizer: str, lr: float, weight_decay: float, betas, eps: float,
                   engine: str = "ort", momentum: float = 0.0) -> None:
    if engine not in ENGINES:
        raise InputError(f"unknown format {engine!r}: use beats (the default) or ort")
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}: use adamw or sgd")
    if not (lr > 0):
        raise InputError(f"the learning rate must be > 0, not {lr}")
    if not (weight_decay >= 0):
        raise InputError(f"weight decay must be >= 0, not {weight_decay}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise InputError(f"betas must be two numbers in [0, 1), not {tuple(betas)}")
    if not (eps > 0):
        raise InputError(f"eps must be > 0, not {eps}")
    if not (0 <= momentum < 1):
        raise InputError(f"momentum must be in [0, 1), not {momentum}")
    if momentum and optimizer != "sgd":
        raise InputError("--momentum applies to --optimizer sgd")
    if engine == "ort" and optimizer == "sgd" and (weight_decay or momentum):
        raise InputError("ORT training's SGD has no weight decay or momentum: use --format beats (the default) "
                         "or --optimizer adamw")


def generate_artifacts(
    inserted_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    loss: str = "ce",
    output: str | None = None,
    label_name: str | None = None,
    optimizer: str = "adamw",
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    betas: tuple[float, float] = DEFAULTS["betas"],
    eps: float = DEFAULTS["eps"],
    momentum: float = 0.0,
    ignore_index: int = -100,
    format: str = "beats",
    progress: Callable[[dict], None] | None = None,
) -> ArtifactsResult:
    """Generate ORT training artifacts for ``inserted_model`` (made by
    ``beats-compile insert``) into ``out_dir``.

    ``loss`` (ce | mse | bce | l1) applies to the model output ``output``
    (default: the first); the label input is ``label_name`` (default
    ``labels`` for ce, ``target`` otherwise).  ``lr`` is stored as the default
    learning rate of ``train``.  ``format="beats"`` (the default): a train-step
    and an eval model built by the gradient pass, run by ``train`` on current
    onnxruntime (``momentum``: SGD's; ``ignore_index``: ce labels that do not
    count).  ``format="ort"``: ONNX Runtime training's on-device artifacts
    (for its C/C++/C#/Java training API), made by onnxruntime-training 1.19.2
    in this process when it is the training environment, otherwise in the
    training interpreter (see ``env``).  A model the engine cannot take raises
    ``InputError`` with the pre-flight report."""
    betas = tuple(float(b) for b in betas)
    _check_options(loss, optimizer, lr, weight_decay, betas, eps, format, momentum)
    if format == "beats":
        from .native import generate_native

        src, out = Path(inserted_model), Path(out_dir)
        if not src.is_file():
            raise InputError(f"{src}: no such file")
        if not out.absolute().parent.is_dir():
            raise InputError(f"{out}: parent folder {out.absolute().parent} does not exist")
        return ArtifactsResult.from_dict(generate_native(
            inserted_model=os.fspath(src.absolute()), out_dir=os.fspath(out.absolute()), loss=loss, output=output,
            label_name=label_name, optimizer=optimizer, lr=float(lr), weight_decay=float(weight_decay),
            betas=list(betas), eps=float(eps), momentum=float(momentum), ignore_index=int(ignore_index),
            progress=progress))
    args = dict(inserted_model=os.fspath(Path(inserted_model).absolute()), out_dir=os.fspath(Path(out_dir).absolute()),
                loss=loss, output=output, label_name=label_name, optimizer=optimizer, lr=float(lr),
                weight_decay=float(weight_decay), betas=list(betas), eps=float(eps))
    src, out = Path(inserted_model), Path(out_dir)
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    if not out.absolute().parent.is_dir():
        raise InputError(f"{out}: parent folder {out.absolute().parent} does not exist")
    python = _env.find_training_python()
    if _env.runs_here(python):
        return ArtifactsResult.from_dict(generate_here(**args, progress=progress))
    # The training environment's onnx (1.17) knows no opset above 21 and no IR
    # above 10: a newer model is converted here, where this process's onnx can,
    # and the worker gets the converted copy (``inserted.onnx`` stays the model given).
    legal_tmp, fixes = _preconvert(src, out, output, progress)
    try:
        from .worker import call

        if legal_tmp is not None:
            args.update(legal_model=os.fspath(legal_tmp), earlier_fixes=fixes)
        data = call(python, "artifacts", args, progress)
    finally:
        if legal_tmp is not None:
            shutil.rmtree(legal_tmp.parent, ignore_errors=True)
    return ArtifactsResult.from_dict(data)


TRAINING_MAX_IR, TRAINING_MAX_OPSET = 10, 21


def _preconvert(src: Path, out: Path, output: str | None, progress) -> tuple[Path | None, list[str]]:
    """Run the pre-flight in this process when the model is newer than the
    training environment's onnx reads; return the converted model's path (in a
    private temp folder beside ``out``), or None when the model needs no conversion."""
    import onnx

    from ..reparam import trainable_manifest

    model, external = _read_model(src)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if model.ir_version <= TRAINING_MAX_IR and opset <= TRAINING_MAX_OPSET:
        return None, []
    trainable = trainable_manifest(model)["trainable"]
    if not trainable:
        raise InputError(f"{src}: the model has no D/V to train (make it with `beats-compile insert`)")
    if progress:
        progress({"type": "message", "text": f"pre-flight (IR {model.ir_version}, opset {opset}: converting here)"})
    report = _run_preflight(model, trainable, output)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".convert", dir=out.absolute().parent))
    path = tmpdir / "converted.onnx"
    try:
        from ..io import save_model

        save_model(report.model, path, external_data=bool(external), base_dir=src.parent)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return path, list(report.fixes)


# --------------------------------------------------------------------------- in the training environment


def _read_model(path: Path):
    """The model with its external data (checked to lie inside its folder),
    without onnx's checker: the pre-flight decides what ORT training takes."""
    import onnx
    from onnx import external_data_helper

    from ..io import _external_tensors, _first_line, _resolve_external

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or opset import)")
    ext = _external_tensors(model)
    for t in ext:
        _resolve_external(path.parent, t)
    if ext:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model, bool(ext)


def open_inserted(src: Path, out: Path, output: str | None, say: Callable[[dict], None],
                  read_from: Path | None = None):
    """The checks every format makes before building: the output folder, the inserted
    model (read from ``read_from`` when a converted copy stands in for it) with its
    D/V, and the loss output (default: the first).  Returns (model, external,
    manifest, output)."""
    from ..reparam import trainable_manifest

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if (out / INSERTED).resolve() == src.resolve() or (out / (INSERTED + ".data")).resolve() == src.resolve():
        raise InputError(f"{src}: refusing to overwrite the input with the artifacts' copy of it; use another -o")
    say({"type": "message", "text": f"loading {src}"})
    model, external = _read_model(read_from or src)
    manifest = trainable_manifest(model)
    if not manifest["trainable"]:
        raise InputError(f"{src}: the model has no D/V to train (make it with `beats-compile insert`)")
    outputs = [o.name for o in model.graph.output]
    if output is None:
        output = outputs[0]
    elif output not in outputs:
        raise InputError(f"--output {output!r} is not a model output ({', '.join(outputs)})")
    return model, external, manifest, output


def model_inputs_and_label(model, loss: str, label_name: str | None):
    """The model's data inputs (not initializers) and the label input's name: the one
    given, else ``labels`` (ce) or ``target``, prefixed ``beats_`` if the model has it."""
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    taken = init_names | {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    label = label_name or ("labels" if loss == "ce" else "target")
    if label in taken:
        if label_name:
            raise InputError(f"--label-name {label!r} is already a tensor of the model")
        label = "beats_" + label
    return inputs, label


def _value_info(model, name: str):
    for vi in list(model.graph.output) + list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name:
            return vi
    return None


def _shape(vi) -> list:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _dtype_name(elem_type: int) -> str:
    from onnx import helper

    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def _run_preflight(model, trainable: list[str], loss_output: str):
    from .preflight import preflight

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


def _tensor_bytes(t) -> int:
    import numpy as np
    from onnx import helper

    n = int(np.prod(list(t.dims), dtype=np.int64))
    try:
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return n * 4


def generate_here(*, inserted_model: str, out_dir: str, loss: str, output: str | None, label_name: str | None,
                  optimizer: str, lr: float, weight_decay: float, betas: list[float], eps: float,
                  legal_model: str | None = None, earlier_fixes: list[str] | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    import numpy as np
    import onnx

    from .. import __version__

    say = progress or (lambda ev: None)
    _check_options(loss, optimizer, lr, weight_decay, betas, eps)
    artifacts_mod, onnxblock, _api = _env.import_ort_training()  # not a training environment: say so first
    src, out = Path(inserted_model), Path(out_dir)
    if not out.parent.is_dir():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    # ``legal_model``: the model already converted by the caller's newer onnx (see _preconvert)
    model, external, manifest, output = open_inserted(src, out, output, say,
                                                      Path(legal_model) if legal_model else None)
    trainable = manifest["trainable"]
    out_vi = _value_info(model, output)
    out_dtype = _dtype_name(out_vi.type.tensor_type.elem_type)
    if np.dtype(out_dtype).kind != "f":
        raise InputError(f"output {output!r} is {out_dtype}: the loss needs a float output")
    out_shape = _shape(out_vi)
    if loss == "ce" and out_shape and len(out_shape) != 2:
        raise InputError(f"ce needs logits of shape (batch, classes); output {output!r} has rank {len(out_shape)}")
    inputs, label = model_inputs_and_label(model, loss, label_name)
    if loss == "ce":
        label_dtype, label_shape = "int64", out_shape[:-1]
    else:
        label_dtype, label_shape = out_dtype, out_shape

    say({"type": "message", "text": "pre-flight"})
    report = _run_preflight(model, trainable, output)
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
        from ..io import serialized_size

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
            from .worker import TrainingInternalError

            from ..verify import short_message

            raise TrainingInternalError(f"ORT training could not generate the artifacts: {short_message(exc)}") from exc
        for f in ("legal.onnx", "legal.onnx.data"):
            if (tmp / f).exists():
                (tmp / f).unlink()
        # The model given, to fold trained values into later.
        if external:
            from ..io import save_model

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
            "producer": f"beats-compile {__version__}",
            "loss": loss,
            "loss_output": output,
            "label": {"name": label, "dtype": label_dtype, "shape": label_shape},
            "inputs": [{"name": i.name, "dtype": _dtype_name(i.type.tensor_type.elem_type), "shape": _shape(i)}
                       for i in inputs],
            "eval_outputs": eval_outputs,
            "trainable": {"names": trainable, "count": len(trainable), "params": t_params,
                          "bytes": sum(_tensor_bytes(params[n]) for n in trainable)},
            "frozen": {"count": len(frozen), "params": f_params, "bytes": sum(_tensor_bytes(params[n]) for n in frozen)},
            "weights": manifest["weights"],
            "optimizer": {"name": optimizer, "lr": lr, "weight_decay": weight_decay,
                          "betas": list(betas) if optimizer == "adamw" else None,
                          "eps": eps if optimizer == "adamw" else None},
            "preflight": _with_fixes(report.to_dict(), earlier_fixes),
            "versions": {"onnx": onnx.__version__, "onnxruntime_training": ort_version, "beats_compile": __version__,
                         "model_ir_version": legal.ir_version,
                         "model_opset": max((o.version for o in legal.opset_import if o.domain in ("", "ai.onnx")),
                                            default=None)},
            "files": {},
        }
        files = sorted(p.name for p in tmp.iterdir())
        body["files"] = {f: (tmp / f).stat().st_size for f in files}
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
        files.append(MANIFEST)
        _publish(tmp, out, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = {f: (out / f).stat().st_size for f in files}
    say({"type": "message", "text": f"wrote {out}"})
    return {"dir": str(out), "files": sizes, "manifest": body, "preflight": body["preflight"]}


def _publish(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the finished files into ``out``: a rename of the whole folder when
    it is new, else one rename per file (each file replaced atomically)."""
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; give it a plain mkdir's mode
        try:
            os.rename(tmp, out)
            return
        except OSError:
            out.mkdir()
    for f in files:
        os.replace(tmp / f, out / f)


def load_manifest(art_dir: str | os.PathLike) -> dict:
    d = Path(art_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such artifacts folder (make it with `beats-compile artifacts`)")
    p = d / MANIFEST
    if not p.is_file():
        raise InputError(f"{d}: not a beats artifacts folder (no {MANIFEST}; make it with `beats-compile artifacts`)")
    try:
        body = json.loads(p.read_text())
    except ValueError as exc:
        raise InputError(f"{p}: not valid JSON ({exc})") from None
    if body.get("format") != FORMAT:
        raise InputError(f"{p}: unsupported format {body.get('format')!r} (this beats-compile reads {FORMAT})")
    from .native import ENGINE, FILES as NATIVE_FILES

    needed = NATIVE_FILES if body.get("engine") == ENGINE else ORT_FILES
    missing = [f for f in (*needed, INSERTED) if not (d / f).exists()]
    if missing:
        raise InputError(f"{d}: incomplete artifacts folder, missing {', '.join(missing)}")
    return body
