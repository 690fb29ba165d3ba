"""Protobuf helpers that reading, validating and writing models share: field
reflection and copies that leave out a model's heavy part.  A leaf module:
it imports nothing of beats_compiler."""

from __future__ import annotations

import onnx

__all__ = ["PROTOBUF_LIMIT", "copy_except", "is_repeated", "model_shell"]

PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot parse, size or write a message over 2 GB


def is_repeated(fd) -> bool:
    """Whether the field descriptor ``fd`` is a repeated field."""
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6 drops FieldDescriptor.label
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def copy_except(src, skip: str):
    """A copy of the message ``src`` without its field ``skip``.  The skipped
    field is never read: ``ListFields`` would hand a tensor's ``raw_data`` over
    as a new bytes object (a copy of the weight) only for it to be dropped."""
    dst = type(src)()
    for fd in src.DESCRIPTOR.fields:
        if fd.name == skip:
            continue
        if is_repeated(fd):
            value = getattr(src, fd.name)
            if len(value):
                getattr(dst, fd.name).extend(value)
            continue
        if not src.HasField(fd.name):
            continue
        value = getattr(src, fd.name)
        if fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)
    return dst


def model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its top-level initializers (the heavy part)."""
    shell = copy_except(model, "graph")
    shell.graph.CopyFrom(copy_except(model.graph, "initializer"))
    return shell
