"""Pass protocol and PassManager: fixed point, round cap, disabling passes,
the check hook, and errors that name the passes run before."""

import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from passes import PassError, PassManager, PassResult, to_graph
from passes.base import Pass
from tests.helpers import make_model, vi

H = helper.make_node


def graph():
    g, _ = to_graph(make_model([H("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])]))
    return g


class Countdown(Pass):
    """Modifies the graph on its first ``n`` calls (per graph), then reports a fixed point."""

    name = "countdown"

    def __init__(self, n):
        self.n = n

    def call(self, graph):
        left = graph.__dict__.setdefault("_left", self.n)
        graph._left = max(left - 1, 0)
        return PassResult(left > 0, {"changed": int(left > 0)})


class Never(Pass):
    name = "never"

    def call(self, graph):
        return PassResult(False, {})


class Always(Pass):
    name = "always"

    def call(self, graph):
        return PassResult(True, {"x": 1})


class Boom(Pass):
    name = "boom"

    def __init__(self, on_call=1):
        self.on_call = on_call
        self.calls = 0

    def call(self, graph):
        self.calls += 1
        if self.calls >= self.on_call:
            raise ValueError("kaboom")
        return PassResult(True, {})


class Bad(Pass):
    name = "bad"

    def call(self, graph):
        return True


def test_runs_to_fixed_point():
    rep = PassManager([Countdown(3), Never()]).run(graph())
    assert rep.converged and rep.rounds == 4
    assert [r.name for r in rep.records] == ["countdown", "never"] * 4
    assert [r.modified for r in rep.records if r.name == "countdown"] == [True, True, True, False]
    assert rep.modified
    assert rep.totals() == {"countdown": {"changed": 3}, "never": {}}
    assert all(r.seconds >= 0 and r.round >= 1 for r in rep.records)


def test_nothing_to_do_is_one_round():
    rep = PassManager([Never()]).run(graph())
    assert rep.converged and rep.rounds == 1 and not rep.modified


def test_round_cap():
    rep = PassManager([Always()], max_rounds=3).run(graph())
    assert not rep.converged and rep.rounds == 3 and len(rep.records) == 3


def test_max_rounds_must_be_positive():
    with pytest.raises(ValueError):
        PassManager([Never()], max_rounds=0)


def test_disable_by_name():
    boom = Boom()
    rep = PassManager([Countdown(1), boom], disabled=["boom"]).run(graph())
    assert boom.calls == 0 and {r.name for r in rep.records} == {"countdown"}


def test_disable_unknown_name_is_an_error_listing_known_names():
    with pytest.raises(ValueError, match="nope") as exc:
        PassManager([Countdown(1), Never()], disabled=["nope"])
    assert "countdown" in str(exc.value) and "never" in str(exc.value)


def test_check_runs_after_each_modifying_pass_only():
    seen = []
    pm = PassManager([Countdown(2), Never()], check=lambda g: seen.append(isinstance(g, gs.Graph)))
    pm.run(graph())
    assert seen == [True, True]


def test_check_failure_is_pass_error_naming_the_pass():
    def check(g):
        raise RuntimeError("invalid model")

    with pytest.raises(PassError) as exc:
        PassManager([Never(), Countdown(1)], check=check).run(graph())
    e = exc.value
    assert e.pass_name == "countdown" and e.ran_before == ["never"]
    assert isinstance(e.cause, RuntimeError)
    assert "countdown" in str(e) and "never" in str(e) and "invalid model" in str(e)


def test_pass_error_names_passes_run_before():
    with pytest.raises(PassError) as exc:
        PassManager([Countdown(5), Never(), Boom(on_call=2)]).run(graph())
    e = exc.value
    assert e.pass_name == "boom"
    assert e.ran_before == ["countdown", "never", "boom", "countdown", "never"]
    assert "kaboom" in str(e) and "countdown" in str(e)
    assert isinstance(e.__cause__, ValueError)


def test_pass_must_return_pass_result():
    with pytest.raises(PassError) as exc:
        PassManager([Bad()]).run(graph())
    assert isinstance(exc.value.cause, TypeError)


def test_on_pass_sees_every_record():
    got = []
    rep = PassManager([Countdown(1), Never()], on_pass=got.append).run(graph())
    assert got == rep.records


def test_records_serialize():
    rep = PassManager([Countdown(1)]).run(graph())
    d = rep.records[0].to_dict()
    assert set(d) == {"name", "round", "modified", "seconds", "stats"}
    assert d["name"] == "countdown" and d["modified"] is True and d["stats"] == {"changed": 1}


def test_one_instance_runs_on_many_graphs():
    # Per-run state lives in the graph / call, never on the pass.
    p = Countdown(2)
    for _ in range(2):
        rep = PassManager([p]).run(graph())
        assert rep.rounds == 3


class Twice(Pass):
    """Modifies the graph on its first two calls per graph: a second run right
    after a modifying one modifies again (not idempotent)."""

    name = "twice"

    def call(self, graph):
        left = graph.__dict__.setdefault("_twice", 2)
        graph._twice = max(left - 1, 0)
        return PassResult(left > 0, {"changed": int(left > 0)})


class HonestTwice(Twice):
    name = "honest_twice"
    idempotent = False


class Once(Pass):
    """Modifies the graph on its first call per graph only."""

    name = "once"

    def call(self, graph):
        first = not graph.__dict__.get("_once")
        graph._once = True
        return PassResult(first, {"changed": int(first)})


def test_idempotence_checked_on_request():
    with pytest.raises(PassError) as e:
        PassManager([Never(), Twice()], check_idempotent=True).run(graph())
    assert e.value.pass_name == "twice" and e.value.ran_before == ["never"]
    assert "twice is declared idempotent but modified the graph again" in str(e.value)


def test_idempotence_not_checked_by_default():
    rep = PassManager([Twice()]).run(graph())
    assert rep.converged and [r.modified for r in rep.records] == [True, True, False]


def test_idempotence_not_checked_for_passes_declared_otherwise():
    rep = PassManager([HonestTwice()], check_idempotent=True).run(graph())
    assert rep.converged and [r.modified for r in rep.records] == [True, True, False]


def test_idempotent_pass_passes_the_check_and_records_one_run():
    p = Once()
    rep = PassManager([p], check_idempotent=True).run(graph())
    assert rep.converged and rep.rounds == 2
    assert [(r.round, r.modified, r.stats) for r in rep.records] == [(1, True, {"changed": 1}), (2, False, {"changed": 0})]


class Tally(Pass):
    """Counts its runs; never modifies; its stats say how many it found (``found``)."""

    name = "tally"

    def __init__(self, found=0, idempotent=True):
        self.runs = 0
        self.found = found
        self.idempotent = idempotent

    def call(self, graph):
        self.runs += 1
        return PassResult(False, {"found": self.found})


def test_idle_pass_on_an_unchanged_graph_is_not_run_again():
    # round 1: tally (idle), countdown modifies; round 2: tally runs (the graph
    # changed since), countdown idle; round 3 would be the same as round 2 ...
    late, early = Tally(found=7), Tally(found=5)
    rep = PassManager([early, Countdown(1), late]).run(graph())
    assert rep.converged and rep.rounds == 2
    assert early.runs == 2  # countdown modified after its first run
    assert late.runs == 1  # nothing modified since its round-1 run: skipped in round 2
    # ... and the skipped run's record says what the run would have said
    assert [(r.name, r.round, r.modified, r.stats) for r in rep.records if r.name == "tally"] == [
        ("tally", 1, False, {"found": 5}), ("tally", 1, False, {"found": 7}),
        ("tally", 2, False, {"found": 5}), ("tally", 2, False, {"found": 7})]


def test_non_idempotent_pass_always_runs_again():
    late = Tally(idempotent=False)
    PassManager([Countdown(1), late]).run(graph())
    assert late.runs == 2
