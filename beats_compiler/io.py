"""Model files: safe loading, atomic saving, external data."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import numpy as np
from onnx import external_data_helper, numpy_helper

from passes.convert import uses_external_refs

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

    @property
    def base_dir(self) -> Path:
        """The folder the model's external data references resolve in."""
        return self.path.parent


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


def load_model(path: str | os.PathLike, *, lazy: bool = False) -> LoadedModel:
    """Read a model file or raise ``InputError``.  External data is checked
    (inside the model's folder, in range) and, with ``lazy``, left on disk:
    the model keeps references, read one tensor at a time when needed."""
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
    if files and not lazy:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise InputError(f"{p}: cannot read external data ({_first_line(exc)})") from None
    total = size + sum(f.stat().st_size for f in files)
    _check(model, p)
    return LoadedModel(model=model, path=p, file_bytes=total, external_files=list(files))


def serialized_size(model: onnx.ModelProto) -> int | None:
    """Bytes the model serializes to, or None when that is over protobuf's 2 GB."""
    inline = sum(_inline_bytes(t) for t in model.graph.initializer if not external_data_helper.uses_external_data(t))
    if inline >= PROTOBUF_LIMIT:  # sizing would encode the whole model only to fail
        return None
    try:
        size = model.ByteSize()
    except Exception:  # protobuf refuses to size a message over 2 GB
        return None
    return size if size < PROTOBUF_LIMIT else None


_CHECK_INLINE_LIMIT = 1 << 20


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the in-memory checker can read cheaply: each top-level
    initializer kept as external data (the checker would look for its file
    relative to the working directory) or over 1 MiB becomes an empty
    placeholder; the checker checks structure, not weight bytes."""
    shell = _model_shell(model)
    for t in model.graph.initializer:
        c = shell.graph.initializer.add()
        if external_data_helper.uses_external_data(t) or _inline_bytes(t) > _CHECK_INLINE_LIMIT:
            c.name, c.data_type = t.name, t.data_type
            c.dims.append(0)
        else:
            c.CopyFrom(t)
    return shell


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    try:
        if path is not None and (uses_external_refs(model) or serialized_size(model) is None):
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(_checkable(model))
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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               base_dir: str | os.PathLike | None = None) -> SavedModel:
    """Write ``model`` atomically: a temporary file in the same folder, then a
    rename.  External data (forced when the model exceeds protobuf's 2 GB, or
    when it references external data) goes to ``<name>.data`` beside it,
    streamed one tensor at a time; references to external data are resolved
    under ``base_dir``.  ``model`` itself is not changed."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: output folder {parent} does not exist")
    if out.exists() and not out.is_file():
        raise InputError(f"{out}: exists and is not a regular file")
    refs = uses_external_refs(model)
    if refs and base_dir is None:
        raise InputError("the model references external data: pass the folder it lives in (base_dir)")
    if external_data or refs or needs_external_data(model):
        return _save_external(model, out, parent, Path(base_dir) if base_dir is not None else None)
    atomic_write_bytes(out, model.SerializeToString(deterministic=True))
    return SavedModel(out, None, out.stat().st_size)


_ALIGN = 4096
_CHUNK = 16 << 20


class _DataWriter:
    """Appends tensor bytes to the data file, page-aligned, and rewrites each
    tensor as a reference to it."""

    def __init__(self, f, location: str, base_dir: Path | None):
        self.f, self.location, self.base_dir = f, location, base_dir
        self.offset = 0

    def _start(self) -> int:
        pad = (-self.offset) % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        return self.offset

    def _ref(self, t: onnx.TensorProto, start: int, length: int) -> None:
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(start)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v

    def copy_external(self, t: onnx.TensorProto) -> None:
        info = external_data_helper.ExternalDataInfo(t)
        src = _resolve_external(self.base_dir, t)
        start, left = self._start(), info.length
        with open(src, "rb") as g:
            g.seek(info.offset or 0)
            if left is None:
                left = src.stat().st_size - (info.offset or 0)
            total = left
            while left > 0:
                block = g.read(min(_CHUNK, left))
                if not block:
                    raise InputError(f"tensor {t.name!r}: external data ends early in {src.name}")
                self.f.write(block)
                left -= len(block)
        self.offset += total
        self._ref(t, start, total)

    def move_inline(self, src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
        """Write ``src``'s bytes to the data file; ``dst`` (empty) becomes the
        reference.  The weight is never copied into ``dst``: a protobuf arena
        would keep that memory until the whole model is freed."""
        data = src.raw_data if src.HasField("raw_data") else numpy_helper.to_array(src).tobytes()
        start = self._start()
        self.f.write(data)
        self.offset += len(data)
        del data
        dst.name, dst.data_type = src.name, src.data_type
        dst.dims.extend(src.dims)
        if src.doc_string:
            dst.doc_string = src.doc_string
        self._ref(dst, start, self.offset - start)


def _inline_bytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    try:  # from dims: reading raw_data would copy the whole weight
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        return len(t.raw_data) if t.HasField("raw_data") else 0


def _repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6 drops FieldDescriptor.label
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _copy_except(src, skip: str):
    """A copy of the message ``src`` without its field ``skip``."""
    dst = type(src)()
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if _repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)
    return dst


def _nested_tensors(g: onnx.GraphProto):
    """Tensors held in node attributes and subgraphs (not ``g``'s initializers)."""
    for node in g.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subs:
                yield from sub.initializer
                yield from _nested_tensors(sub)


def _model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its top-level initializers (the heavy part)."""
    shell = _copy_except(model, "graph")
    shell.graph.CopyFrom(_copy_except(model.graph, "initializer"))
    return shell


def _save_external(model: onnx.ModelProto, out: Path, parent: Path, base_dir: Path | None) -> SavedModel:
    data_name = out.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    data_tmp = tmpdir / data_name
    try:
        shell = _model_shell(model)
        wrote_data = False
        with open(data_tmp, "wb") as f:
            writer = _DataWriter(f, data_name, base_dir)
            for t in model.graph.initializer:  # one tensor at a time
                c = shell.graph.initializer.add()
                if external_data_helper.uses_external_data(t):
                    c.CopyFrom(t)
                    writer.copy_external(c)
                    wrote_data = True
                elif _inline_bytes(t) >= _EXTERNAL_THRESHOLD:
                    writer.move_inline(t, c)
                    wrote_data = True
                else:
                    c.CopyFrom(t)
            for t in _nested_tensors(shell.graph):  # tensors inside subgraphs and attributes
                if external_data_helper.uses_external_data(t):
                    writer.copy_external(t)
                    wrote_data = True
            _default_mode(f.fileno())
            f.flush()
            os.fsync(f.fileno())
        model_tmp = tmpdir / out.name
        with open(model_tmp, "wb") as f:
            f.write(shell.SerializeToString(deterministic=True))
            _default_mode(f.fileno())
            f.flush()
            os.fsync(f.fileno())
        del shell
        data_out = parent / data_name if wrote_data else None
        backup = None
        try:
            if data_out is not None:
                if data_out.exists():  # an earlier output's weights, kept until the model is in place
                    backup = tmpdir / (data_name + ".old")
                    os.replace(data_out, backup)
                os.replace(data_tmp, data_out)
            os.replace(model_tmp, out)
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
