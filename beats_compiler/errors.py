"""Error classes, each carrying the CLI exit code it maps to, and the one
function that turns an exception's text into a short, one-line cause."""

from __future__ import annotations

import re


class BeatsError(Exception):
    """Base of every error the tool reports as a one-line message."""

    exit_code = 3


class InputError(BeatsError):
    """Bad input or usage: unreadable model, bad flag value, unsafe path."""

    exit_code = 2


class VerificationError(BeatsError):
    """The compiled model does not compute the same function as the input."""

    exit_code = 1


class TargetError(BeatsError):
    """A valid model that the target's own toolchain (fp16 converter, quantizer,
    QNN HTP backend) fails on: not bad input, not a bug of beats-compile."""

    exit_code = 4


class InternalError(BeatsError):
    """A pass or the exporter produced something invalid: a bug in beats-compile."""

    exit_code = 3


# "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ", "Load model from /tmp/m.onnx failed:Fatal error: "
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : |Load model from \S+ failed: ?(?:Fatal error: )?")
# "/onnxruntime_src/.../reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(const ..., bool) "
_SOURCE_LOCATION = re.compile(r"(?:/[\w.+-]+)+\.(?:h|hpp|cc|cpp|cu|cuh):\d+ (?:[\w:~<>]+\([^()]*\)(?: const)? )?")
SHORT_LIMIT = 160  # characters of a cause quoted inside a one-line error


def short_message(msg: BaseException | str, limit: int | None = SHORT_LIMIT, *, first_line: bool = False,
                  raw: bool = False, cut: str = "word") -> str:
    """``msg`` (an exception or a text) as one line for an error message.

    Whitespace is collapsed; ONNX Runtime's status prefix and C++ source
    locations are dropped (not with ``raw``).  ``first_line``: only the first
    non-empty line, after the exception's type name (``ValidationError: ...``;
    the onnx checker appends context lines).  A text over ``limit`` characters
    is cut: ``cut="word"`` keeps at most ``limit`` characters up to a word
    boundary and appends `` ...``; ``"fit"`` does the same within ``limit``
    characters, the mark included; ``"hard"`` cuts mid-word, ``...`` included.
    An exception whose text comes out empty gives its type name."""
    text = str(msg).strip()
    if first_line:
        text = next((ln for ln in text.splitlines() if ln.strip()), "")
    text = " ".join(text.split())
    if not raw:
        text = _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", text)).strip()
    if limit is not None and len(text) > limit:
        if cut == "hard":
            text = text[:limit - 3] + "..."
        else:
            keep = limit - 4 if cut == "fit" else limit
            text = text[:keep].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    if isinstance(msg, BaseException):
        name = type(msg).__name__
        return f"{name}: {text}" if first_line and text else text or name
    return text
