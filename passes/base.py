"""Pass protocol and pass manager.

A pass edits an onnx-graphsurgeon ``Graph`` in place and returns a
``PassResult``.  The manager runs a list of passes in rounds until a whole
round modifies nothing (a fixed point), or until a round cap is hit, and
records time and stats for every pass it ran.
"""

from __future__ import annotations

import contextvars
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Iterable, Sequence

import onnx_graphsurgeon as gs

from .registry import register

__all__ = ["ManagerReport", "Pass", "PassError", "PassManager", "PassRecord", "PassResult", "cached_analysis"]


@dataclass
class PassResult:
    """What one pass did to a graph: ``modified`` plus counted stats."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    # The modification left every remaining tensor's element type and shape as
    # it was and added no computed tensor (identical constants merged, a node
    # that computed its input bypassed; a new constant answers for itself):
    # analyses of the graph before it stay valid for the tensors still in it.
    types_kept: bool = False


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
    ``idempotent``: a second run right after a run that modified the graph
    modifies nothing (``PassManager(check_idempotent=True)`` checks it).  A
    named subclass in this package is registered by its name (``registry``).
    """

    name: ClassVar[str] = ""
    idempotent: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    def call(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, not PassResult")
        return result


class _AnalysisCache:
    """Analyses (shape inference) of the graph a ``PassManager`` is running on.
    A result is handed out again only while no pass has modified the graph
    since it was computed, and at most once per pass: after its first request
    a pass may have edited the graph, so a second request recomputes."""

    def __init__(self, graph: gs.Graph, check: bool = False):
        self.graph = graph
        self.results: dict[Hashable, Any] = {}
        self.asked: set[Hashable] = set()  # keys the running pass has requested
        # keys whose result predates a ``types_kept`` modification: handed out
        # again only through the caller's ``revalidate`` (dropping removed tensors)
        self.stale: set[Hashable] = set()
        # check: a result handed out again after a ``types_kept`` modification is
        # also recomputed and compared (``PassManager(check_idempotent=True)``)
        self.check = check
        self.kept_by: list[str] = []  # the passes whose types_kept modifications made results stale

    def end_pass(self, modified: bool, types_kept: bool = False, name: str = "") -> None:
        if modified and types_kept:
            self.stale.update(self.results)
            self.kept_by.append(name)
        elif modified:
            self.kept_by.clear()
            self.results.clear()
            self.stale.clear()
        self.asked.clear()


_ANALYSES: contextvars.ContextVar[_AnalysisCache | None] = contextvars.ContextVar("beats_analyses", default=None)


def cached_analysis(graph: gs.Graph, key: Hashable, compute: Callable[[], Any],
                    revalidate: Callable[[Any], Any] | None = None,
                    disagreement: Callable[[Any, Any], str | None] | None = None) -> tuple[Any, bool]:
    """``compute()``, or its result from an earlier pass of the running
    ``PassManager`` when the graph is unchanged since; returns (value, reused).
    A result from before a modification that kept types (``PassResult.types_kept``)
    is reused as ``revalidate(result)`` (which drops what the graph no longer
    holds), or recomputed without ``revalidate``.  In a manager that checks each
    pass, such a reuse is also recomputed and ``disagreement(reused, fresh)`` (a
    description, or None) raises naming the passes that declared types kept.
    Outside a manager (or for another graph) it always computes."""
    cache = _ANALYSES.get()
    if cache is None or cache.graph is not graph:
        return compute(), False
    first = key not in cache.asked
    cache.asked.add(key)
    if first and key in cache.results:
        if key not in cache.stale:
            return cache.results[key], True
        cache.stale.discard(key)
        if revalidate is not None:
            value = cache.results[key] = revalidate(cache.results[key])
            if cache.check and disagreement is not None:
                problem = disagreement(value, compute())
                if problem:
                    raise RuntimeError(f"{', '.join(dict.fromkeys(cache.kept_by))} declared that it kept every "
                                       f"tensor's type, but {problem}")
            return value, True
    value = compute()
    cache.results[key] = value
    cache.stale.discard(key)
    return value, False


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


@dataclass
class _RunState:
    """What a ``PassManager.run`` knows between passes: how many pass runs have
    modified the graph (``version``), and per pass index the version and stats
    of its last run when that run modified nothing."""

    version: int = 0
    idle: dict[int, tuple[int, dict[str, int]]] = field(default_factory=dict)


class PassManager:
    """Runs passes in rounds to a fixed point.

    ``check`` is called after every pass that modified the graph (for example
    the ONNX checker on the exported model); an exception from it, or from a
    pass, is raised as ``PassError`` naming the pass and those run before it.
    With ``check_idempotent``, a pass declared ``idempotent`` that modified
    the graph is run once more at once, and a second modification is a
    ``PassError``; an inference reused after a pass declared ``types_kept`` is
    also recomputed, and a tensor whose type it got wrong is a ``PassError``.
    Shape inference (``shapes.infer_types``) is computed once and reused by
    later passes while none of them reports a modification (or only
    modifications that kept every tensor's type).
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        max_rounds: int = 8,
        disabled: Iterable[str] = (),
        check: Callable[[gs.Graph], None] | None = None,
        on_pass: Callable[[PassRecord], None] | None = None,
        check_idempotent: bool = False,
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
        self.check_idempotent = check_idempotent

    def run(self, graph: gs.Graph) -> ManagerReport:
        records: list[PassRecord] = []
        ran: list[str] = []
        converged = False
        rounds = 0
        cache = _AnalysisCache(graph, check=self.check_idempotent)
        state = _RunState()
        token = _ANALYSES.set(cache)
        try:
            for rnd in range(1, self.max_rounds + 1):
                rounds = rnd
                if self._run_round(graph, rnd, cache, records, ran, state):
                    continue
                converged = True
                break
        finally:
            _ANALYSES.reset(token)
        return ManagerReport(records=records, rounds=rounds, converged=converged)

    def _run_round(self, graph: gs.Graph, rnd: int, cache: _AnalysisCache, records: list[PassRecord],
                   ran: list[str], state: _RunState | None = None) -> bool:
        """One round of every pass; whether any of them modified the graph.
        A pass declared idempotent whose last run modified nothing is not run
        again while no pass has modified the graph since (the same pass on the
        same graph finds the same nothing): its record repeats that run's stats
        with 0 seconds."""
        state = state if state is not None else _RunState()
        round_modified = False
        for k, p in enumerate(self.passes):
            t0 = time.perf_counter()
            idle = state.idle.get(k)
            if p.idempotent and idle is not None and idle[0] == state.version:
                result = PassResult(False, dict(idle[1]))
            else:
                try:
                    result = p(graph)
                    cache.end_pass(result.modified, result.types_kept, p.name)
                    if result.modified and self.check is not None:
                        self.check(graph)
                    if result.modified and self.check_idempotent and p.idempotent:
                        self._run_again(p, graph, cache)
                except Exception as exc:  # re-raised with the pass history
                    raise PassError(p.name, ran, exc) from exc
                if result.modified:
                    state.version += 1
                    state.idle.pop(k, None)
                else:
                    state.idle[k] = (state.version, dict(result.stats))
            rec = PassRecord(p.name, rnd, result.modified, time.perf_counter() - t0, dict(result.stats))
            records.append(rec)
            ran.append(p.name)
            if self.on_pass is not None:
                self.on_pass(rec)
            round_modified |= result.modified
        return round_modified

    @staticmethod
    def _run_again(p: Pass, graph: gs.Graph, cache: _AnalysisCache) -> None:
        again = p(graph)
        cache.end_pass(again.modified, again.types_kept, p.name)
        if again.modified:
            raise RuntimeError(f"{p.name} is declared idempotent but modified the graph again "
                               f"(second run: {dict(again.stats)})")
