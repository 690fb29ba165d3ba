"""The bridge to the training interpreter.

Parent side (``call``): runs ``python -m beats_compiler.training.worker`` in
the training environment, sends one JSON request on stdin, and reads JSON
lines back on stdout: ``{"event": "progress", "data": ...}`` (handed to the
progress callback), then exactly one ``{"event": "result", "data": ...}`` or
``{"event": "error", "exit_code": N, "message": "..."}``.  The worker's own
stdout is moved to stderr, so nothing a library prints can corrupt the
protocol; the parent keeps the tail of stderr for internal errors.

Child side (``main``): dispatches ``op`` to the in-process implementation.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable

from ..errors import BeatsError, InputError, InternalError, VerificationError
from .artifacts import generate_here
from .env import HOWTO, REPO_ROOT
from .loop import train_here

ProgressFn = Callable[[dict], None]
OPS: dict[str, Callable[..., dict]] = {"artifacts": generate_here, "train": train_here}


def call(python: str, op: str, args: dict, progress: ProgressFn | None = None) -> dict:
    """Run ``op`` in the training interpreter ``python``; its result dict, or
    the error it reported raised as the matching BeatsError."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("MPLBACKEND", "Agg")
    try:
        proc = subprocess.Popen([python, "-m", "beats_compiler.training.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1)
    except OSError as exc:
        raise InputError(f"cannot start the training Python {python}: {exc.strerror or exc}") from None
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def drain() -> None:
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    outcome: dict | None = None
    try:
        proc.stdin.write(json.dumps({"op": op, "args": args}))
        proc.stdin.close()
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                tail.append(line.rstrip("\n"))
                continue
            if msg.get("event") == "progress":
                if progress is not None:
                    progress(msg["data"])
            elif msg.get("event") in ("result", "error"):
                outcome = msg
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    t.join(timeout=5)
    if outcome is None:
        detail = next((ln for ln in reversed(tail) if ln.strip()), "no output")
        if "ModuleNotFoundError" in detail or "ImportError" in detail:  # not a training environment
            raise InputError(f"the training Python {python} cannot run the worker ({detail.strip()}); {HOWTO}")
        raise InternalError(f"the training worker ({python}) exited with code {rc} without a result: {detail}")
    if outcome["event"] == "result":
        return outcome["data"]
    code, message = int(outcome.get("exit_code", 3)), str(outcome.get("message", "unknown error"))
    if code == InputError.exit_code:
        raise InputError(message)
    if code == VerificationError.exit_code:
        raise VerificationError(message)
    err = InternalError(message)
    err.worker_traceback = outcome.get("traceback")  # type: ignore[attr-defined]
    raise err


def main() -> int:
    # The protocol owns the real stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with lock:
            proto.write(json.dumps(obj, default=_json_default) + "\n")
            proto.flush()

    try:
        req = json.loads(sys.stdin.read())
        op = OPS[req["op"]]
        result = op(**req["args"], progress=lambda ev: emit({"event": "progress", "data": ev}))
        emit({"event": "result", "data": result})
    except BeatsError as exc:
        emit({"event": "error", "exit_code": exc.exit_code, "message": " ".join(str(exc).split())})
    except Exception as exc:  # a bug: one line, the traceback for --debug
        emit({"event": "error", "exit_code": 3, "message": f"{type(exc).__name__}: {' '.join(str(exc).split())}",
              "traceback": traceback.format_exc()})
    return 0


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
