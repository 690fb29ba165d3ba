"""A model's file bytes without encoding its weights through protobuf.

``write_model(model, f)`` writes exactly ``model.SerializeToString(deterministic=True)``
(ONNX has no map fields: deterministic or not, upb writes the known fields in
field-number order, each repeated field's elements together, unknown fields
last).  upb encodes at a few hundred MB/s, and sizing a message encodes it too,
so a 600 MB model costs seconds to serialize whole; here only a skeleton is
encoded: the model with an empty graph, the graph with empty initializers, and
each top-level initializer with an empty ``raw_data``.  Those placeholders
(``tag 00``) mark where upb puts the real field; the file is streamed from the
skeleton's wire format with the lengths recomputed and each ``raw_data``
written straight from the tensor (one weight in memory at a time).  The
caller's model is read, never changed.  A leaf module beside ``proto``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import onnx
from google.protobuf import unknown_fields

from passes.tensors import tensor_nbytes

from .proto import copy_except

__all__ = ["model_bytes", "model_pieces", "write_model"]

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2
_SPLICE_MIN = 4096  # smaller raw_data: the tensor is encoded whole (a skeleton costs more than the bytes)


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def fields(buf: bytes) -> list[tuple[int, int, int, int]]:
    """The top-level fields of a serialized message, in order:
    ``(field number, wire type, start, end)``, ``buf[start:end]`` the whole
    field (tag included).  Groups (wire types 3 and 4) are refused: none of the
    messages read here has one (unknown fields are ruled out first)."""
    out = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == _LENGTH_DELIMITED:
            n, pos = _read_varint(buf, pos)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} (a group) in field {number}")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end of the message")
        out.append((number, wire, start, pos))
    return out


def _placeholders(buf: bytes, number: int) -> list[int]:
    """Where ``buf``'s empty length-delimited fields numbered ``number`` start
    (each is two bytes: the one-byte tag and a zero length)."""
    found = []
    tag = (number << 3) | _LENGTH_DELIMITED
    for n, wire, start, end in fields(buf):
        if n == number:
            if wire != _LENGTH_DELIMITED or end - start != 2 or buf[start] != tag or buf[start + 1] != 0:
                raise ValueError(f"field {number} is not an empty placeholder")
            found.append(start)
    return found


def _has_unknown(msg) -> bool:
    return len(unknown_fields.UnknownFieldSet(msg)) > 0


class _Tensor:
    """One top-level initializer: its bytes before and after ``raw_data``
    (whole when not spliced) and the length of its ``raw_data``."""

    __slots__ = ("tensor", "head", "tail", "raw_len", "size")

    def __init__(self, t: onnx.TensorProto):
        # The length of raw_data without reading it (reading it copies the weight, and
        # ByteSize encodes the tensor): the bytes its dims and type call for, which a
        # tensor's raw_data holds exactly (validation refuses any other length on
        # input; ``pieces`` checks it again as it writes).
        self.tensor = t
        self.raw_len = -1
        if t.HasField("raw_data"):
            n = tensor_nbytes(t)
            self.raw_len = n if n is not None else len(t.raw_data)
        if self.raw_len < _SPLICE_MIN:
            self.raw_len = -1
            self.head, self.tail = t.SerializeToString(deterministic=True), b""
            self.size = len(self.head)
            return
        skel = copy_except(t, "raw_data")
        skel.raw_data = b""
        buf = skel.SerializeToString(deterministic=True)
        spot = _placeholders(buf, _RAW_DATA)
        if len(spot) != 1:
            raise ValueError("the tensor's raw_data placeholder is not where expected")
        self.head, self.tail = buf[: spot[0]], buf[spot[0] + 2:]
        self.size = len(buf) - 2 + len(_field_header(_RAW_DATA, self.raw_len)) + self.raw_len

    def pieces(self) -> Iterator[bytes]:
        yield self.head
        if self.raw_len < 0:
            return
        raw = self.tensor.raw_data
        if len(raw) != self.raw_len:  # the lengths already written are wrong: never a partial file
            raise RuntimeError(f"tensor {self.tensor.name!r}: raw_data of {len(raw)} bytes, its dims call for "
                               f"{self.raw_len} (or it changed while the model was written)")
        yield _field_header(_RAW_DATA, len(raw))
        yield raw
        del raw
        yield self.tail


def _field_header(number: int, length: int) -> bytes:
    return varint((number << 3) | _LENGTH_DELIMITED) + varint(length)


def model_pieces(model: onnx.ModelProto) -> tuple[int, Iterator[bytes]] | None:
    """``(length, pieces)``: the bytes of ``model.SerializeToString(deterministic=True)``
    as a series of pieces (the weights are the model's own ``raw_data``, read
    one at a time as the pieces are drawn), or None where the splice does not
    apply (then serialize the model whole):

    - a model with no graph, or no initializer with ``raw_data`` worth it:
      nothing to gain;
    - unknown fields on the model, its graph or a top-level initializer: the
      skeleton copies (``copy_except``) drop them, and upb writes them back
      verbatim (overlong varints included), which a re-encoding would not match.

    The model must not change until the pieces are drawn."""
    if not model.HasField("graph"):
        return None
    graph = model.graph
    if _has_unknown(model) or _has_unknown(graph):
        return None
    inits = graph.initializer
    if not any(t.HasField("raw_data") for t in inits):
        return None
    if any(_has_unknown(t) for t in inits):
        return None
    try:
        tensors = [_Tensor(t) for t in inits]
        if all(t.raw_len < 0 for t in tensors):
            return None
        gskel = copy_except(graph, "initializer")
        for _ in range(len(inits)):
            gskel.initializer.add()
        gbuf = gskel.SerializeToString(deterministic=True)
        gspots = _placeholders(gbuf, _INITIALIZER)
        # upb writes a repeated field's elements one after another.
        if len(gspots) != len(inits) or gspots != list(range(gspots[0], gspots[0] + 2 * len(gspots), 2)):
            return None
        mskel = copy_except(model, "graph")
        mskel.graph.SetInParent()
        mbuf = mskel.SerializeToString(deterministic=True)
        mspots = _placeholders(mbuf, _GRAPH)
        if len(mspots) != 1:
            return None
    except ValueError:  # a skeleton not laid out as expected: serialize whole
        return None
    headers = [_field_header(_INITIALIZER, t.size) for t in tensors]
    glen = len(gbuf) - 2 * len(inits) + sum(len(h) + t.size for h, t in zip(headers, tensors))
    gheader = _field_header(_GRAPH, glen)
    total = len(mbuf) - 2 + len(gheader) + glen
    g0, g1 = gspots[0], gspots[0] + 2 * len(inits)
    m0, m1 = mspots[0], mspots[0] + 2

    def pieces() -> Iterator[bytes]:
        yield mbuf[:m0] + gheader + gbuf[:g0]
        for h, t in zip(headers, tensors):
            yield h
            yield from t.pieces()
        yield gbuf[g1:] + mbuf[m1:]

    return total, pieces()


def write_model(model: onnx.ModelProto, f: BinaryIO) -> int:
    """Write ``model.SerializeToString(deterministic=True)`` to ``f`` (spliced
    where ``model_pieces`` applies, else encoded whole); the bytes written."""
    plan = model_pieces(model)
    if plan is None:
        data = model.SerializeToString(deterministic=True)
        f.write(data)
        return len(data)
    total, pieces = plan
    written = 0
    for p in pieces:
        if p:
            f.write(p)
            written += len(p)
    if written != total:
        raise RuntimeError(f"wrote {written} bytes of a model of {total}")
    return written


def model_bytes(model: onnx.ModelProto) -> bytes:
    """``model.SerializeToString(deterministic=True)``, the weights copied once
    (joined from ``model_pieces``) instead of encoded through protobuf."""
    plan = model_pieces(model)
    if plan is None:
        return model.SerializeToString(deterministic=True)
    total, pieces = plan
    data = b"".join(p for p in pieces if p)
    if len(data) != total:
        raise RuntimeError(f"joined {len(data)} bytes of a model of {total}")
    return data
