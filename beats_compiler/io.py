"""Model files: safe loading, atomic saving, external data."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import InputError

PROTOBUF_LIMIT = 2**31 - 1  # serialized protobuf messages cannot exceed 2 GB
_EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    file_bytes: int  # the .onnx file plus every external data file it uses
    external_files: list[Path] = field(default_factory=list)

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_files)


def default_output_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".beats.onnx")


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _resolve_external(base: Path, tensor: onnx.TensorProto) -> Path:
    info = external_data_helper.ExternalDataInfo(tensor)
    loc = info.location
    if not loc:
        raise InputError(f"tensor {tensor.name!r}: external data has no location")
    rel = Path(loc)
    if rel.is_absolute() or ".." in rel.parts:
        raise InputError(f"tensor {tensor.name!r}: external data location {loc!r} is outside the model's folder")
    target = (base / rel).resolve()
    if not target.is_relative_to(base.resolve()):
        raise InputError(f"tensor {tensor.name!r}: external data location {loc!r} leads outside the model's folder")
    if not target.is_file():
        raise InputError(f"tensor {tensor.name!r}: external data file {loc!r} is missing or not a regular file")
    size = target.stat().st_size
    offset = info.offset or 0
    if info.length is not None and offset + info.length > size or offset > size:
        raise InputError(f"tensor {tensor.name!r}: external data range lies beyond the end of {loc!r}")
    return target


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read a model file (and its external data) or raise ``InputError``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{p}: not an ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise InputError(f"{p}: not an ONNX model (no graph, IR version or opset import)")
    base = p.parent
    files: dict[Path, None] = {}
    for t in _external_tensors(model):
        files[_resolve_external(base, t)] = None
    if files:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise InputError(f"{p}: cannot read external data ({_first_line(exc)})") from None
    total = size + sum(f.stat().st_size for f in files)
    _check(model, p)
    return LoadedModel(model=model, path=p, file_bytes=total, external_files=list(files))


def serialized_size(model: onnx.ModelProto) -> int | None:
    """Bytes the model serializes to, or None when that is over protobuf's 2 GB."""
    try:
        size = model.ByteSize()
    except Exception:  # protobuf refuses to size a message over 2 GB
        return None
    return size if size < PROTOBUF_LIMIT else None


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    try:
        if serialized_size(model) is not None:
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except Exception as exc:
        where = f"{path}: " if path is not None else ""
        raise InputError(f"{where}invalid model ({_first_line(exc)})") from None


def check_model(model: onnx.ModelProto) -> None:
    """The ONNX checker on an in-memory model, as an ``InputError``."""
    _check(model, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def needs_external_data(model: onnx.ModelProto) -> bool:
    return serialized_size(model) is None


@dataclass
class SavedModel:
    path: Path
    data_path: Path | None
    file_bytes: int


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> SavedModel:
    """Write ``model`` atomically: a temporary file in the same folder, then a
    rename.  External data (forced when the model exceeds protobuf's 2 GB)
    goes to ``<name>.data`` beside it.  ``model`` itself is not changed."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: output folder {parent} does not exist")
    if out.exists() and not out.is_file():
        raise InputError(f"{out}: exists and is not a regular file")
    if external_data or needs_external_data(model):
        return _save_external(model, out, parent)
    atomic_write_bytes(out, model.SerializeToString(deterministic=True))
    return SavedModel(out, None, out.stat().st_size)


def _save_external(model: onnx.ModelProto, out: Path, parent: Path) -> SavedModel:
    data_name = out.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for t in _external_tensors(copy):  # already-external tensors are re-homed
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(
            copy,
            str(tmpdir / out.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=_EXTERNAL_THRESHOLD,
        )
        del copy
        data_tmp = tmpdir / data_name
        data_out = parent / data_name if data_tmp.exists() else None
        backup = None
        try:
            if data_out is not None:
                with open(data_tmp, "rb") as f:
                    _default_mode(f.fileno())
                if data_out.exists():  # an earlier output's weights, kept until the model is in place
                    backup = tmpdir / (data_name + ".old")
                    os.replace(data_out, backup)
                os.replace(data_tmp, data_out)
            os.replace(tmpdir / out.name, out)
        except BaseException:
            # The earlier model (if any) must still find its own weights.
            if backup is not None:
                os.replace(backup, data_out)
            elif data_out is not None and not data_tmp.exists():
                _unlink(data_out)
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    total = out.stat().st_size + (data_out.stat().st_size if data_out else 0)
    return SavedModel(out, data_out, total)


def _default_mode(fd: int) -> None:
    """mkstemp makes 0600 files; give the output the mode a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: str | os.PathLike) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def check_output_path(loaded: LoadedModel | None, out: Path, *, external_data: bool) -> None:
    """Refuse an output that would overwrite the input or its external data."""
    if loaded is None:
        return
    inputs = [loaded.path, *loaded.external_files]
    targets = [out] + ([out.with_name(out.name + ".data")] if external_data else [])
    for t in targets:
        for i in inputs:
            if t.resolve() == i.resolve() or (t.exists() and os.path.samefile(t, i)):
                raise InputError(f"{t}: refusing to overwrite the input file {i}")
