"""The pass registry: every pass of the package by its name, found without a list
to maintain; one file per pass, named after it."""

from pathlib import Path

import pytest
from onnx import helper

import passes
from passes import Pass, PassResult, get_pass, pass_names, to_graph
from tests.helpers import make_model, vi

# Passes whose constructor needs an argument the tests give here.
ARGS = {"fix_input_shapes": ({"x": (2,)},)}


def graph():
    g, _ = to_graph(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])]))
    return g


def test_every_pass_is_found_by_name():
    names = pass_names()
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"fold_constants", "eliminate_dead_code", "fuse_matmul_add", "upcast_float16"} <= set(names)
    for name in names:
        assert get_pass(name).name == name


def test_one_file_per_pass_named_after_it():
    for name in pass_names():
        cls = get_pass(name)
        assert cls.__module__.rsplit(".", 1)[-1] == name, f"{cls.__qualname__} lives in {cls.__module__}"
    root = Path(passes.__file__).parent
    files = {p.stem for p in root.rglob("*.py")} - {"__init__"}
    assert set(pass_names()) <= files


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError) as e:
        get_pass("fold_everything")
    assert "unknown pass 'fold_everything'" in str(e.value) and "fold_constants" in str(e.value)


def test_a_name_taken_twice_raises():
    with pytest.raises(ValueError, match="'fold_constants' is taken twice"):
        type("Copy", (Pass,), {"name": "fold_constants", "__module__": "passes.copy_of_fold_constants",
                               "call": lambda self, graph: PassResult(False)})
    assert get_pass("fold_constants") is passes.FoldConstants


def test_passes_defined_outside_the_package_are_not_registered():
    class Stand(Pass):  # a test's stand-in for a real pass, under its name
        name = "fold_constants"

        def call(self, graph):
            return PassResult(False)

    assert get_pass("fold_constants") is passes.FoldConstants and Stand.name in pass_names()


def test_every_pass_is_stateless_across_graphs():
    for name in pass_names():
        p = get_pass(name)(*ARGS.get(name, ()))
        assert p.name == name
        assert p(graph()) == p(graph())
