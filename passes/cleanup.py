"""Cleanup passes: identities, no-op ops, dead code, duplicate initializers,
common subexpressions.  Each recurses into If/Loop/Scan bodies."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .convert import _PACKED_4BIT, ExternalValues, open_external
from .graph import (
    NONDETERMINISTIC_OPS,
    attr_key,
    bypass,
    const_dtype,
    const_shape,
    const_value,
    count_nodes,
    has_subgraphs,
    io_ids,
    is_const,
    is_standard,
    iter_graphs,
    remove_nodes,
    replace_uses,
)
from .shapes import TypeMap, infer_types

_INT64_MAX_ISH = 2**31 - 1  # exporters write INT_MAX or INT64_MAX for "to the end"


def _bump(stats: dict[str, int], key: str) -> None:
    stats[key] = stats.get(key, 0) + 1


class EliminateIdentity(Pass):
    """Identity, and Dropout at inference (mask unused, not in training mode)."""

    name = "eliminate_identity"

    def call(self, graph: gs.Graph) -> PassResult:
        stats: dict[str, int] = {}
        for g in iter_graphs(graph):
            for node in list(g.nodes):
                if not is_standard(node) or not node.inputs or not node.outputs:
                    continue
                if node.op == "Identity":
                    pass
                elif node.op == "Dropout":
                    if any(t.name and (t.outputs or id(t) in io_ids(g)[1]) for t in node.outputs[1:]):
                        continue
                    if len(node.inputs) > 2 and node.inputs[2].name:
                        mode = node.inputs[2]
                        if not is_const(mode) or bool(const_value(mode).ravel()[0]):
                            continue
                else:
                    continue
                src, dst = node.inputs[0], node.outputs[0]
                if not src.name:
                    continue
                while len(node.outputs) > 1:
                    node.outputs.pop()
                if bypass(g, node, src, dst):
                    _bump(stats, node.op)
        return PassResult(bool(stats), stats)


class EliminateNopOps(Pass):
    """Cast to the same type, Reshape/Expand to the same shape, identity
    Transpose, zero Pad, full Slice, single-input Concat."""

    name = "eliminate_nop_ops"

    def call(self, graph: gs.Graph) -> PassResult:
        tm = infer_types(graph)
        stats: dict[str, int] = {}
        changed = True
        while changed:  # a bypass may rename a value to a graph output whose declared type proves an earlier node a nop
            changed = False
            for g in iter_graphs(graph):
                for node in list(g.nodes):
                    if not is_standard(node) or not node.inputs or len(node.outputs) != 1:
                        continue
                    check = getattr(self, "_nop_" + node.op, None)
                    if check is None or not node.inputs[0].name:
                        continue
                    try:
                        nop = check(node, tm)
                    except (ValueError, IndexError, TypeError):
                        nop = False
                    if nop and bypass(g, node, node.inputs[0], node.outputs[0]):
                        _bump(stats, node.op)
                        changed = True
        return PassResult(bool(stats), stats)

    @staticmethod
    def _nop_Cast(node, tm: TypeMap) -> bool:
        src = tm.dtype(node.inputs[0])
        dst = tm.dtype(node.outputs[0])
        return src is not None and dst is not None and src == dst

    @staticmethod
    def _nop_CastLike(node, tm: TypeMap) -> bool:
        src = tm.dtype(node.inputs[0])
        return src is not None and src == tm.dtype(node.inputs[1])

    @staticmethod
    def _nop_Reshape(node, tm: TypeMap) -> bool:
        if len(node.inputs) < 2 or not is_const(node.inputs[1]):
            return False
        shape = tm.shape(node.inputs[0])
        target = [int(v) for v in const_value(node.inputs[1]).ravel()]
        if shape is None or len(shape) != len(target):
            return False
        allowzero = node.attrs.get("allowzero", 0)
        minus_one = 0
        for have, want in zip(shape, target):
            if want == 0 and not allowzero:
                continue
            if want == -1:
                minus_one += 1
                continue
            if have != want:
                return False
        # A single -1 among dims that all match is the one remaining dim.
        return minus_one <= 1

    @staticmethod
    def _nop_Expand(node, tm: TypeMap) -> bool:
        if len(node.inputs) < 2 or not is_const(node.inputs[1]):
            return False
        shape = tm.shape(node.inputs[0])
        target = [int(v) for v in const_value(node.inputs[1]).ravel()]
        if shape is None or len(target) > len(shape):
            return False
        # Every target dim is 1 or equals the input's (static) dim.
        tail = shape[len(shape) - len(target):]
        return all(w == 1 or (isinstance(h, int) and h == w) for h, w in zip(tail, target))

    @staticmethod
    def _nop_Transpose(node, tm: TypeMap) -> bool:
        perm = node.attrs.get("perm")
        rank = tm.rank(node.inputs[0])
        if perm is None:
            return rank is not None and rank <= 1
        return list(perm) == list(range(len(perm)))

    @staticmethod
    def _nop_Pad(node, tm: TypeMap) -> bool:
        if "pads" in node.attrs:  # opset < 11
            return not any(node.attrs["pads"])
        if len(node.inputs) < 2 or not is_const(node.inputs[1]):
            return False
        return not np.any(const_value(node.inputs[1]))

    @staticmethod
    def _nop_Slice(node, tm: TypeMap) -> bool:
        if len(node.inputs) < 3:
            return False
        parts = node.inputs[1:5]
        if not all(is_const(t) for t in parts if t.name):
            return False
        starts = const_value(parts[0]).astype(np.int64).ravel()
        ends = const_value(parts[1]).astype(np.int64).ravel()
        shape = tm.shape(node.inputs[0])
        rank = None if shape is None else len(shape)
        if len(parts) > 2 and parts[2].name:
            axes = const_value(parts[2]).astype(np.int64).ravel()
        else:
            axes = np.arange(len(starts))
        steps = const_value(parts[3]).astype(np.int64).ravel() if len(parts) > 3 and parts[3].name else np.ones_like(starts)
        for s, e, a, st in zip(starts, ends, axes, steps):
            if st != 1 or s != 0:
                return False
            if e >= _INT64_MAX_ISH:
                continue
            if rank is None:
                return False
            dim = shape[int(a) % rank]
            if not (isinstance(dim, int) and e >= dim):
                return False
        return True

    @staticmethod
    def _nop_Concat(node, tm: TypeMap) -> bool:
        return len(node.inputs) == 1


class EliminateDeadCode(Pass):
    """Nodes that no graph output depends on (unused initializers go with them)."""

    name = "eliminate_dead_code"

    def call(self, graph: gs.Graph) -> PassResult:
        before = count_nodes(graph)
        graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        removed = before - count_nodes(graph)
        return PassResult(removed > 0, {"nodes_removed": removed})


def _local_constants(g: gs.Graph) -> list[gs.Constant]:
    seen: dict[int, gs.Constant] = {}
    for node in g.nodes:
        for t in node.inputs:
            if is_const(t) and id(t) not in seen:
                seen[id(t)] = t
    return list(seen.values())


_PROBE_BYTES = 1 << 16


def _probe(c: gs.Constant) -> bytes:
    """The first 64 KiB of the constant's bytes (the dtype and shape are already equal)."""
    v = c._values
    if isinstance(v, ExternalValues) and v.tensor.data_type not in _PACKED_4BIT:
        f, offset, length = open_external(v.tensor, v.base_dir)
        with f:
            f.seek(offset)
            return f.read(min(_PROBE_BYTES, length))
    a = np.ascontiguousarray(const_value(c)).reshape(-1).view(np.uint8)
    return a[:_PROBE_BYTES].tobytes()


class DedupeInitializers(Pass):
    """Initializers with identical dtype, shape and bytes are merged into one."""

    name = "dedupe_initializers"

    def call(self, graph: gs.Graph) -> PassResult:
        stats = {"merged": 0, "bytes_saved": 0}
        for g in iter_graphs(graph):
            groups: dict[tuple, list[gs.Constant]] = {}
            for c in _local_constants(g):
                dt = const_dtype(c)
                if dt is None or dt == object:
                    continue
                groups.setdefault((dt.str, const_shape(c)), []).append(c)
            for same_shape in groups.values():
                if len(same_shape) < 2:
                    continue
                # A cheap first look (the first 64 KiB, read from the file for external data) splits
                # the group; only tensors that still share it are read and hashed in full.
                probes: dict[bytes, list[gs.Constant]] = {}
                for c in same_shape:
                    probes.setdefault(_probe(c), []).append(c)
                same_shape = [c for cs in probes.values() if len(cs) > 1 for c in cs]
                canon: dict[bytes, gs.Constant] = {}
                for c in same_shape:
                    v = np.ascontiguousarray(const_value(c))
                    digest = hashlib.blake2b(v.reshape(-1).view(np.uint8), digest_size=20).digest()
                    first = canon.get(digest)
                    if first is None:
                        canon[digest] = c
                    elif np.array_equal(const_value(first), v, equal_nan=v.dtype.kind in "fc"):
                        replace_uses(c, first)
                        stats["merged"] += 1
                        stats["bytes_saved"] += int(v.nbytes)
        return PassResult(stats["merged"] > 0, stats)


class EliminateCommonSubexpressions(Pass):
    """Two nodes with the same op, attributes and input tensors become one."""

    name = "eliminate_common_subexpressions"

    def call(self, graph: gs.Graph) -> PassResult:
        merged = 0
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            seen: dict[tuple, gs.Node] = {}
            dead = []
            for node in g.nodes:
                if not is_standard(node) or node.op in NONDETERMINISTIC_OPS or has_subgraphs(node):
                    continue
                key = (
                    node.op,
                    tuple(id(t) if t.name else None for t in node.inputs),
                    tuple(sorted((k, attr_key(v)) for k, v in node.attrs.items())),
                    tuple(bool(t.name) for t in node.outputs),
                )
                first = seen.get(key)
                if first is None:
                    seen[key] = node
                    continue
                if any(id(t) in out_ids for t in node.outputs):
                    continue
                for mine, theirs in zip(node.outputs, first.outputs):
                    if mine.name:
                        replace_uses(mine, theirs)
                dead.append(node)
            if dead:
                remove_nodes(g, dead)
                merged += len(dead)
        return PassResult(merged > 0, {"merged": merged})
