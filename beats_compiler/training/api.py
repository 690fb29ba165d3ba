"""The training side's entry points: ``generate_artifacts`` and ``train``
(what ``beats-compile artifacts|train`` and ``beats_compiler.training`` call).

Each one checks its arguments here, in the calling process, then runs the
work where it can run: the default format (``native``) in this process; ORT
training's format in this process when it is the training environment
(``artifacts.generate_here``, ``loop.train_here``), otherwise in the training
interpreter through ``worker.call``.  The trained D/V are folded here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError, VerificationError
from . import env as _env
from .artifacts import generate_here, run_preflight
from .common import DEFAULTS, ENGINE, INSERTED, check_options, load_manifest, read_model
from .loop import LOGITS_KEY, RUN_FILES, check_args, load_data, train_here
from .native import generate_native


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


@dataclass
class TrainResult:
    """What ``train`` did and wrote."""

    run_dir: str
    metrics: dict  # the content of metrics.json
    adapter: str
    checkpoint: str
    metrics_path: str
    curve: str | None
    folded: str | None = None
    fold_max_abs_diff: float | None = None  # folded model vs. the trained model's logits
    folded_node_count: int | None = None
    inserted_node_count: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def history(self) -> list[dict]:
        return self.metrics["epochs"]

    def to_dict(self) -> dict:
        return asdict(self)


def _call_worker(python: str, op: str, args: dict, progress) -> dict:
    # Imported here: ``python -m beats_compiler.training.worker`` imports this
    # package first, and runpy warns when the module it runs is already loaded.
    from .worker import call

    return call(python, op, args, progress)


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
    check_options(loss, optimizer, lr, weight_decay, betas, eps, format, momentum)
    if format == "beats":
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
        if legal_tmp is not None:
            args.update(legal_model=os.fspath(legal_tmp), earlier_fixes=fixes)
        data = _call_worker(python, "artifacts", args, progress)
    finally:
        if legal_tmp is not None:
            shutil.rmtree(legal_tmp.parent, ignore_errors=True)
    return ArtifactsResult.from_dict(data)


TRAINING_MAX_IR, TRAINING_MAX_OPSET = 10, 21


def _preconvert(src: Path, out: Path, output: str | None, progress) -> tuple[Path | None, list[str]]:
    """Run the pre-flight in this process when the model is newer than the
    training environment's onnx reads; return the converted model's path (in a
    private temp folder beside ``out``), or None when the model needs no conversion."""
    from ..io import save_model
    from ..reparam import trainable_manifest

    model, external = read_model(src)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if model.ir_version <= TRAINING_MAX_IR and opset <= TRAINING_MAX_OPSET:
        return None, []
    trainable = trainable_manifest(model)["trainable"]
    if not trainable:
        raise InputError(f"{src}: the model has no D/V to train (make it with `beats-compile insert`)")
    if progress:
        progress({"type": "message", "text": f"pre-flight (IR {model.ir_version}, opset {opset}: converting here)"})
    report = run_preflight(model, trainable, output)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".convert", dir=out.absolute().parent))
    path = tmpdir / "converted.onnx"
    try:
        save_model(report.model, path, external_data=bool(external), base_dir=src.parent)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return path, list(report.fixes)


def train(
    artifacts_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float | None = None,
    schedule: str = "constant",
    warmup: int = 0,
    seed: int = 0,
    patience: int | None = None,
    resume: bool = False,
    label: str | None = None,
    out_dir: str | os.PathLike | None = None,
    fold: str | os.PathLike | None = None,
    save_adapter: str | os.PathLike | None = None,
    fold_atol: float = 1e-4,
    curve: bool = True,
    device: str | None = None,
    threads: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the D/V of ``artifacts_dir`` (from ``generate_artifacts``) on
    ``data`` (.npz: model input names and the label name -> arrays).

    Writes into ``out_dir`` (default ``<artifacts_dir>/run``): ``checkpoint``
    (ORT, with optimizer state), ``loop_state.json``, ``metrics.json``,
    ``curve.png``, ``adapter.npz`` (or ``save_adapter``).  ``resume``
    continues from the last checkpoint there.  ``fold`` also writes the
    deployable model (W0 + D (.) V folded in), verified on ONNX Runtime and
    against the trained model's logits (max abs diff <= ``fold_atol``).
    ``curve=False`` skips the PNG (matplotlib takes seconds to import).
    ``device`` (cpu | cuda) and ``threads`` (intra-op threads, 0 = ORT's
    default) apply to the default engine (artifacts from the gradient pass).
    ``progress`` receives event dicts (type: start, step, epoch, message)."""
    check_args(epochs, batch_size, lr, schedule, warmup, patience)
    art = Path(artifacts_dir).absolute()
    load_manifest(art)
    run = Path(out_dir).absolute() if out_dir is not None else art / "run"
    fold_path = Path(fold).absolute() if fold is not None else None
    if fold_path is not None and not fold_path.parent.is_dir():
        raise InputError(f"{fold_path}: folder {fold_path.parent} does not exist")
    if fold_path is not None and fold_path.resolve() == (art / INSERTED).resolve():
        raise InputError(f"{fold_path}: refusing to overwrite the inserted model")
    run_check = Path(out_dir) if out_dir is not None else art / "run"
    if resume and not ((run_check / RUN_FILES["checkpoint"]).is_file() and (run_check / RUN_FILES["loop_state"]).is_file()):
        raise InputError(f"{run_check}: nothing to resume (no checkpoint and loop_state.json from an earlier run)")
    load_data(art, load_manifest(art), data, eval_data, label)  # bad data: one line, before starting the worker
    args = dict(artifacts_dir=str(art), data=str(Path(data).absolute()),
                eval_data=str(Path(eval_data).absolute()) if eval_data is not None else None,
                epochs=int(epochs), batch_size=int(batch_size), lr=None if lr is None else float(lr), schedule=schedule,
                warmup=int(warmup), seed=int(seed), patience=None if patience is None else int(patience),
                resume=bool(resume), label=label, out_dir=str(run),
                save_adapter=str(Path(save_adapter).absolute()) if save_adapter is not None else None,
                curve=bool(curve))
    if load_manifest(art).get("engine") == ENGINE:
        data_out = train_here(**args, device=device, threads=int(threads), progress=progress)
    elif device not in (None, "cpu"):
        raise InputError("--device applies to the default engine; these are ORT training artifacts (CPU)")
    elif _env.runs_here(python := _env.find_training_python()):
        data_out = train_here(**args, progress=progress)
    else:
        data_out = _call_worker(python, "train", args, progress)
    result = TrainResult(**data_out)
    if fold_path is not None:
        _fold(result, art, fold_path, fold_atol, progress)
    return result


def _fold(result: TrainResult, art: Path, out: Path, atol: float, progress) -> None:
    """Fold the adapter into the inserted model (in this process), save it,
    and compare its logits with the trained model's on the saved examples."""
    import numpy as np
    import onnxruntime as ort

    from ..io import load_model, save_model
    from ..verify import quiet_session_options
    from ..reparam import Adapter, fold

    say = progress or (lambda ev: None)
    say({"type": "message", "text": "folding the trained D/V"})
    with np.load(Path(result.run_dir) / RUN_FILES["reference"], allow_pickle=False) as ref:
        arrays = {k: ref[k] for k in ref.files}
    trained = arrays.pop(LOGITS_KEY)
    loaded = load_model(art / INSERTED, lazy=True)
    adapter = Adapter.load(result.adapter)
    # verified on the saved training examples: generated inputs can be out of range for the
    # model (token ids past an embedding table, a token_type_ids of 2 for BERT's two rows)
    folded = fold(loaded, adapter=adapter, inputs=arrays if trained.size else None, measure_latency=False)
    if folded.report.verified is False:
        raise VerificationError("the folded model does not match the inserted model carrying the trained D/V")
    saved = save_model(folded.model, out, external_data=loaded.uses_external_data, base_dir=folded.base_dir)
    output = result.metrics["loss_output"]
    sess = ort.InferenceSession(str(saved.path), quiet_session_options(), providers=["CPUExecutionProvider"])
    got = sess.run([output], arrays)[0]
    diff = float(np.max(np.abs(got.astype(np.float64) - trained.astype(np.float64)))) if trained.size else 0.0
    result.folded = str(saved.path)
    result.fold_max_abs_diff = diff
    result.folded_node_count = len(folded.model.graph.node)
    result.inserted_node_count = folded.report.nodes_before
    if not diff <= atol:
        raise VerificationError(f"the folded model's {output!r} differs from the trained model's by {diff:.3g} "
                                f"(> {atol:g}); {saved.path} was written for inspection")
