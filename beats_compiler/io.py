"""Model files: safe loading, atomic saving, external data."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import onnx
import numpy as np
from onnx import external_data_helper, numpy_helper

from passes.convert import ExternalDataError, check_external, open_external, read_external, uses_external_refs
from passes.graph import ComputedValues, is_computed_ref
from passes.tensors import tensor_nbytes

from .errors import InputError, short_message
from .proto import PROTOBUF_LIMIT, copy_except, is_repeated, model_shell
from .validate import Limits, UnsortedGraph, range_lengths, read_model_file_ranges, sort_nodes, validate_model
from .wire import write_model

_EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    file_bytes: int  # the .onnx file plus every external data file it uses
    external_files: list[Path] = field(default_factory=list)
    # Set to a ``DataFolder`` (on the model's own folder) by a transformation
    # that computes tensors as they are written (insert, fold): it travels as base_dir.
    data_folder: DataFolder | None = None
    notes: list[str] = field(default_factory=list)  # what loading mended (report warnings)
    # (offset, length) in ``path`` of each top-level initializer's raw_data as read
    # (``validate.raw_data_ranges``; None where unknown): probes may sample a weight
    # there instead of copying it out of its TensorProto (``passes.graph.file_ranges``)
    raw_ranges: list[tuple[int, int] | None] | None = None

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_files)

    @property
    def base_dir(self) -> Path | DataFolder:
        """The folder the model's external data references resolve in."""
        return self.data_folder if self.data_folder is not None else self.path.parent


class DataFolder(os.PathLike):
    """The ``base_dir`` of a model some of whose tensors are computed while it
    is written (``passes.graph.ComputedValues``: fold's folded weights,
    insert's full-size initial D/V):
    the folder its external data references resolve in, plus those tensors by
    name.  Anything that takes a folder takes it; ``save_model`` also fills
    the computed tensors, one block at a time, into the data file it writes."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(os.fspath(folder))
        self.computed: dict[str, ComputedValues] = {}

    def __fspath__(self) -> str:
        return os.fspath(self.folder)

    def __str__(self) -> str:
        return str(self.folder)

    def __repr__(self) -> str:
        return f"DataFolder({str(self.folder)!r}, computed={sorted(self.computed)})"


def default_output_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".beats.onnx")


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def resolve_external(base: Path, tensor: onnx.TensorProto) -> Path:
    """The checked data file of ``tensor`` (see ``passes.convert.check_external``)."""
    try:
        return Path(check_external(tensor, base)[0])
    except ExternalDataError as exc:
        raise InputError(f"tensor {tensor.name!r}: {exc}") from None


def _all_external_tensors(model: onnx.ModelProto):
    """Every tensor with external data, wherever it sits: graphs, subgraphs,
    attributes, sparse tensors, functions, training info."""
    stack = [model]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            if msg.data_location == onnx.TensorProto.EXTERNAL:
                yield msg
            continue
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            if is_repeated(fd):
                stack.extend(value)
            else:
                stack.append(value)


def load_model(path: str | os.PathLike, *, lazy: bool = False, limits: Limits | None = None) -> LoadedModel:
    """Read a model file or raise ``InputError``: the file is parsed and
    validated (``beats_compiler.validate``), external data is checked
    (inside the model's folder, a regular file, in range, the size its dims
    call for) and, with ``lazy``, left on disk: the model keeps references,
    read one tensor at a time when needed."""
    p = Path(path)
    model, size, raw_ranges = read_model_file_ranges(p)
    raw_sizes = range_lengths(raw_ranges)
    notes: list[str] = []
    try:
        validate_model(model, limits or Limits(), str(p), raw_sizes=raw_sizes)
    except UnsortedGraph:
        if not sort_nodes(model):  # reorders nodes only: the initializers' sizes still hold
            raise
        validate_model(model, limits or Limits(), str(p), raw_sizes=raw_sizes)
        notes.append("the input's nodes were not in topological order: sorted (ONNX Runtime sorts them too)")
    base = p.parent
    files: dict[Path, None] = {}
    tensors = list(_all_external_tensors(model))
    in_graph = {id(t) for t in external_tensors(model)}
    for t in tensors:
        if id(t) not in in_graph:
            raise InputError(f"{p}: tensor {t.name!r}: external data outside the graph's initializers and "
                             "attributes (a function, sparse tensor or training info) is not supported")
        files[resolve_external(base, t)] = None
    if tensors and not lazy:
        for t in tensors:
            try:
                data = read_external(t, base)
            except (ExternalDataError, OSError) as exc:
                raise InputError(f"{p}: tensor {t.name!r}: cannot read external data ({exc})") from None
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
    total = size + sum(f.stat().st_size for f in files)
    _check(model, p)
    return LoadedModel(model=model, path=p, file_bytes=total, external_files=list(files), notes=notes,
                       raw_ranges=raw_ranges)


def serialized_size(model: onnx.ModelProto) -> int | None:
    """Bytes the model serializes to, or None when that is over protobuf's 2 GB."""
    inline = sum(tensor_nbytes(t) or 0 for t in model.graph.initializer
                 if not external_data_helper.uses_external_data(t))
    if inline >= PROTOBUF_LIMIT:  # sizing would encode the whole model only to fail
        return None
    try:
        size = _size_by_parts(model) if inline > _SIZE_BY_PARTS else model.ByteSize()
    except Exception:  # protobuf refuses to size a message over 2 GB
        return None
    return size if size < PROTOBUF_LIMIT else None


_SIZE_BY_PARTS = 16 << 20


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _size_by_parts(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` without encoding the weights: upb sizes a message by
    encoding it (8 s a call for BERT-base on a loaded machine).  Each top-level
    initializer's ``raw_data`` is counted from its length (field 9 of TensorProto;
    the initializer is field 5 of GraphProto, the graph field 7 of ModelProto,
    every tag one byte)."""
    graph = copy_except(model.graph, "initializer").ByteSize()
    for t in model.graph.initializer:
        raw = tensor_nbytes(t) if t.HasField("raw_data") else None  # len(raw_data), without copying it
        if raw is not None and raw > 4096:
            size = copy_except(t, "raw_data").ByteSize() + 1 + _varint_len(raw) + raw
        else:
            size = t.ByteSize()
        graph += 1 + _varint_len(size) + size
    return copy_except(model, "graph").ByteSize() + 1 + _varint_len(graph) + graph


_CHECK_INLINE_LIMIT = 1 << 20


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the in-memory checker can read cheaply: each top-level
    initializer kept as external data (the checker would look for its file
    relative to the working directory) or over 1 MiB becomes an empty
    placeholder; the checker checks structure, not weight bytes."""
    shell = model_shell(model)
    for t in model.graph.initializer:
        c = shell.graph.initializer.add()
        if external_data_helper.uses_external_data(t) or (tensor_nbytes(t) or 0) > _CHECK_INLINE_LIMIT:
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
        raise InputError(f"{where}invalid model ({short_message(exc, None, first_line=True)})") from None


def check_model(model: onnx.ModelProto) -> None:
    """The ONNX checker on an in-memory model, as an ``InputError``."""
    _check(model, None)


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
    try:
        if external_data or refs or needs_external_data(model):
            data = out.with_name(out.name + ".data")
            if data.is_symlink() or (data.exists() and not data.is_file()):
                raise InputError(f"{data}: exists and is not a regular file; refusing to replace it")
            folder = base_dir if isinstance(base_dir, DataFolder) or base_dir is None else Path(base_dir)
            return _save_external(model, out, parent, folder)
        # The bytes of SerializeToString(deterministic=True), the weights
        # written from the model's own raw_data (``wire``): encoding a 600 MB
        # model whole costs seconds.
        atomic_write(out, lambda f: write_model(model, f))
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return SavedModel(out, None, out.stat().st_size)


_ALIGN = 4096
_CHUNK = 16 << 20  # read/write copies: one reused buffer of this size
_COPY_CALL = 1 << 30  # bytes asked of one copy_file_range call
# copy_file_range refusals that mean "not between these files" (another file
# system on old kernels, a file system without it, no such call): copy through
# user space instead.  Anything else (a full disk, an I/O error) is an error.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                   errno.EPERM}


class _DataWriter:
    """Appends tensor bytes to the data file, page-aligned, and rewrites each
    tensor as a reference to it.  Tensors already in a data file are copied in
    the kernel (``os.copy_file_range``, large calls), computed ones are written
    a block at a time, all-zero computed ones are left as holes; ``finish``
    gives the file its length.  The caller fsyncs once, at the end."""

    def __init__(self, f, location: str, base_dir: Path | DataFolder | None):
        self.f, self.location, self.base_dir = f, location, base_dir
        self.computed = base_dir.computed if isinstance(base_dir, DataFolder) else {}
        self.offset = 0
        self.kernel_copy = hasattr(os, "copy_file_range")
        self._buf: memoryview | None = None

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

    def add_external(self, t: onnx.TensorProto) -> None:
        """``t`` references external data: copy it, or compute it (a placeholder)."""
        if is_computed_ref(t):
            self.write_computed(t)
        else:
            self.copy_external(t)

    def write_computed(self, t: onnx.TensorProto) -> None:
        """Compute ``t`` (a ``ComputedValues`` placeholder) block by block into
        the file; an all-zero one (``zeros``) becomes a hole, not written."""
        src = self.computed.get(t.name)
        if src is None or list(src.tensor.dims) != list(t.dims) or src.tensor.data_type != t.data_type:
            raise InputError(f"tensor {t.name!r} is computed as the model is written, but its source is not given: "
                             "save the result with the base_dir it came with (CompileResult.save)")
        start = self._start()
        if src.zeros:
            self.offset += src.nbytes_total
            self.f.seek(self.offset)  # reads back as zero bytes; ``finish`` sets the length
            self._ref(t, start, src.nbytes_total)
            return
        try:
            for blk in src.blocks():
                b = np.ascontiguousarray(blk, dtype=src.np_dtype)
                self.f.write(b.reshape(-1).view(np.uint8).data)
                self.offset += b.nbytes
                del b, blk
        except ExternalDataError as exc:  # an input data file changed since it was loaded
            raise InputError(f"tensor {t.name!r}: {exc}") from None
        if self.offset - start != src.nbytes_total:
            raise RuntimeError(f"tensor {t.name!r}: computed {self.offset - start} bytes, "
                               f"its dims call for {src.nbytes_total}")
        self._ref(t, start, self.offset - start)

    def copy_external(self, t: onnx.TensorProto) -> None:
        if self.base_dir is None:
            raise InputError(f"tensor {t.name!r} references external data, but no folder to read it from was given")
        try:
            g, offset, length = open_external(t, self.base_dir)
        except ExternalDataError as exc:
            raise InputError(f"tensor {t.name!r}: {exc}") from None
        start = self._start()
        with g:
            self._copy(g, offset, length, t.name)
        self.offset += length
        self._ref(t, start, length)

    def _copy(self, g, src_offset: int, length: int, name: str) -> None:
        """Append ``length`` bytes of ``g`` from ``src_offset`` on at
        ``self.offset``: in the kernel where it can (no pass through user
        space; extents shared where the file system does that), else through
        one reused buffer."""
        done = 0
        if self.kernel_copy and length:
            self.f.flush()
            fd_in, fd_out = g.fileno(), self.f.fileno()
            try:
                while done < length:
                    n = os.copy_file_range(fd_in, fd_out, min(length - done, _COPY_CALL), src_offset + done,
                                           self.offset + done)
                    if n == 0:  # the end of the file, or a file system that copies nothing this way:
                        self.kernel_copy = False  # read/write finds out (and refuses a short file)
                        break
                    done += n
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self.kernel_copy = False  # the rest, and every later tensor, through user space
            self.f.seek(self.offset + done)
        if done < length:
            if self._buf is None:
                self._buf = memoryview(bytearray(_CHUNK))
            g.seek(src_offset + done)
            while done < length:
                view = self._buf[:min(_CHUNK, length - done)]
                n = g.readinto(view)
                if not n:
                    raise InputError(f"tensor {name!r}: external data ends early")
                self.f.write(view[:n])
                done += n

    def finish(self) -> None:
        """Flush, and give the file its full length (it may end in a hole)."""
        self.f.flush()
        if os.fstat(self.f.fileno()).st_size != self.offset:
            self.f.truncate(self.offset)

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


def _save_external(model: onnx.ModelProto, out: Path, parent: Path, base_dir: Path | DataFolder | None) -> SavedModel:
    data_name = out.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    data_tmp = tmpdir / data_name
    try:
        shell = model_shell(model)
        wrote_data = False
        with open(data_tmp, "wb") as f:
            writer = _DataWriter(f, data_name, base_dir)
            for t in model.graph.initializer:  # one tensor at a time
                c = shell.graph.initializer.add()
                if external_data_helper.uses_external_data(t):
                    c.CopyFrom(t)
                    writer.add_external(c)
                    wrote_data = True
                elif (tensor_nbytes(t) or 0) >= _EXTERNAL_THRESHOLD:
                    writer.move_inline(t, c)
                    wrote_data = True
                else:
                    c.CopyFrom(t)
            for t in _nested_tensors(shell.graph):  # tensors inside subgraphs and attributes
                if external_data_helper.uses_external_data(t):
                    writer.add_external(t)
                    wrote_data = True
            writer.finish()
            _default_mode(f.fileno())
            os.fsync(f.fileno())  # once, for the whole file
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
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and
    rename it to ``path``; on any error the temporary file is removed (and
    ``path`` left as it was), an ``OSError`` raised as a one-line ``InputError``."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
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
