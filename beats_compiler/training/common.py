"""What the training modules share: the artifacts folder's file names and
manifest, the options both formats accept, reading the inserted model,
shapes and dtype names of its value infos, atomic writes, batches and the
accuracy score.  A leaf of the package: it imports none of its modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import InputError, short_message

MANIFEST = "beats_artifacts.json"
ORT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
INSERTED = "inserted.onnx"
FORMAT = 1
LOSSES = {"ce": "CrossEntropyLoss", "mse": "MSELoss", "bce": "BCEWithLogitsLoss", "l1": "L1Loss"}
OPTIMIZERS = ("adamw", "sgd")
DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}
ENGINES = ("beats", "ort")
SCHEDULES = ("constant", "linear", "cosine")

# The default engine's folder (``native``): a train-step and an eval model.
ENGINE = "beats"
TRAIN_MODEL, EVAL_MODEL, WEIGHTS, PARAMS = "train_step.onnx", "eval_model.onnx", "weights.data", "params.npz"
NATIVE_FILES = (TRAIN_MODEL, EVAL_MODEL, PARAMS)  # weights.data only when a weight is over native's inline limit


def check_options(loss: str, optimizer: str, lr: float, weight_decay: float, betas, eps: float,
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


def load_manifest(art_dir: str | os.PathLike) -> dict:
    """The manifest of an artifacts folder of either format, the folder checked complete."""
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
    needed = NATIVE_FILES if body.get("engine") == ENGINE else ORT_FILES
    missing = [f for f in (*needed, INSERTED) if not (d / f).exists()]
    if missing:
        raise InputError(f"{d}: incomplete artifacts folder, missing {', '.join(missing)}")
    return body


# --------------------------------------------------------------------------- the inserted model


def read_model(path: Path):
    """The model with its external data (checked to lie inside its folder),
    without onnx's checker: the pre-flight decides what ORT training takes."""
    import onnx
    from onnx import external_data_helper

    from ..io import external_tensors, resolve_external

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not an ONNX model ({short_message(exc, None, first_line=True)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or opset import)")
    ext = external_tensors(model)
    for t in ext:
        resolve_external(path.parent, t)
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
    model, external = read_model(read_from or src)
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


def shape(vi) -> list:
    """A value info's dims: ints, symbolic names, None for unknown; [] without a shape."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def dtype_name(elem_type: int) -> str:
    from onnx import helper

    return str(helper.tensor_dtype_to_np_dtype(elem_type))


# --------------------------------------------------------------------------- writing


def publish(tmp: Path, out: Path, manifest: dict) -> list[str]:
    """Write ``manifest`` (with every file's size under "files") into ``tmp``,
    then move the finished files into ``out``: a rename of the whole folder when
    it is new, else one rename per file (each file replaced atomically).
    Returns the file names, the manifest last."""
    files = sorted(p.name for p in tmp.iterdir())
    manifest["files"] = {f: (tmp / f).stat().st_size for f in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    files.append(MANIFEST)
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; give it a plain mkdir's mode
        try:
            os.rename(tmp, out)
            return files
        except OSError:
            out.mkdir()
    for f in files:
        os.replace(tmp / f, out / f)
    return files


def atomic_json(path: Path, body: dict) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(body, indent=2) + "\n").encode())


def atomic_npz(path: Path, arrays: dict) -> None:
    import io

    import numpy as np

    from ..io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- the loop's pieces both engines use


def batches(n: int, batch: int, order, drop_last: bool):
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        if drop_last and len(idx) < batch:
            return
        yield idx


def score(loss: str, logits, labels, ignore_index: int | None = None) -> tuple[int, int]:
    """(correct, counted) predictions of a batch: argmax for ce (positions labelled
    ``ignore_index`` not counted), sign for bce; (0, 0) for regression losses."""
    import numpy as np

    if loss == "ce":
        keep = labels != ignore_index if ignore_index is not None else np.ones(labels.shape, bool)
        return int(((logits.argmax(-1) == labels) & keep).sum()), int(keep.sum())
    if loss == "bce":
        return int(((logits > 0) == (labels > 0.5)).sum()), int(np.prod(logits.shape))
    return 0, 0
