"""Pass protocol and pass manager.

A pass edits an onnx-graphsurgeon ``Graph`` in place and returns a
``PassResult``.  The manager runs a list of passes in rounds until a whole
round modifies nothing (a fixed point), or until a round cap is hit, and
records time and stats for every pass it ran.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Sequence

import onnx_graphsurgeon as gs


@dataclass
class PassResult:
    """What one pass did to a graph: ``modified`` plus counted stats."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class PassRecord:
    """One pass invocation as recorded by the manager (and shown in reports)."""

    name: str
    round: int
    modified: bool
    seconds: float
    stats: dict[str, int]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "round": self.round,
            "modified": self.modified,
            "seconds": round(self.seconds, 6),
            "stats": dict(self.stats),
        }


class PassError(RuntimeError):
    """A pass failed, or the model failed its check after a pass."""

    def __init__(self, pass_name: str, ran_before: Sequence[str], cause: BaseException):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.cause = cause
        before = ", ".join(self.ran_before[-8:]) or "none"
        super().__init__(f"pass {pass_name!r} failed: {cause} (passes run before it: {before})")


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` (a snake_case verb_object), ``idempotent`` and
    implement ``call``.  Options go in the constructor; per-run state must be
    created inside ``call`` so that one instance can run on many graphs.
    """

    name: ClassVar[str] = ""
    idempotent: ClassVar[bool] = True

    def call(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        return result


@dataclass
class ManagerReport:
    records: list[PassRecord]
    rounds: int
    converged: bool

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def totals(self) -> dict[str, dict[str, int]]:
        """Stats summed over rounds, per pass name (in first-run order)."""
        out: dict[str, Counter] = {}
        for r in self.records:
            out.setdefault(r.name, Counter()).update(r.stats)
        return {k: dict(v) for k, v in out.items()}


class PassManager:
    """Runs passes in rounds to a fixed point.

    ``check`` is called after every pass that modified the graph (for example
    the ONNX checker on the exported model); an exception from it, or from a
    pass, is raised as ``PassError`` naming the pass and those run before it.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        max_rounds: int = 8,
        disabled: Iterable[str] = (),
        check: Callable[[gs.Graph], None] | None = None,
        on_pass: Callable[[PassRecord], None] | None = None,
    ):
        self.disabled = set(disabled)
        all_passes = list(passes)
        unknown = self.disabled - {p.name for p in all_passes}
        if unknown:
            raise ValueError(
                f"unknown pass name(s) to disable: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(p.name for p in all_passes)}"
            )
        self.passes = [p for p in all_passes if p.name not in self.disabled]
        if max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")
        self.max_rounds = max_rounds
        self.check = check
        self.on_pass = on_pass

    def run(self, graph: gs.Graph) -> ManagerReport:
        records: list[PassRecord] = []
        ran: list[str] = []
        converged = False
        rounds = 0
        for rnd in range(1, self.max_rounds + 1):
            rounds = rnd
            round_modified = False
            for p in self.passes:
                t0 = time.perf_counter()
                try:
                    result = p(graph)
                    if result.modified and self.check is not None:
                        self.check(graph)
                except Exception as exc:  # re-raised with the pass history
                    raise PassError(p.name, ran, exc) from exc
                rec = PassRecord(p.name, rnd, result.modified, time.perf_counter() - t0, dict(result.stats))
                records.append(rec)
                ran.append(p.name)
                if self.on_pass is not None:
                    self.on_pass(rec)
                round_modified |= result.modified
            if not round_modified:
                converged = True
                break
        return ManagerReport(records=records, rounds=rounds, converged=converged)
