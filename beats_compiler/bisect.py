"""Culprit finding: which pass, and which node of its output, makes a result differ.

When verification fails (or on request, ``bisect=True`` / ``--bisect``) the
pipeline is run again on a fresh copy of the input, the model is exported
after every pass application that modified the graph, and each snapshot is
run on ONNX Runtime with the verification's inputs and compared with the
original's outputs.  The first snapshot that fails names the pass.  Within
that pass's output the node is found by exposing the intermediate tensors of
the graphs before and after the pass as graph outputs, matching them by name
(passes keep the names of surviving tensors; fp16 Casts rename, so only the
names that survive are compared) and walking the top-level graph in
topological order to the first node whose outputs differ beyond tolerance
while all its compared inputs agree.

Quantized (QDQ) results are compared by cosine: each fp32 tensor against the
QDQ model's dequantized tensor of the same name (run on ONNX Runtime's CPU
provider), and the node named is the first in topological order where the
cosine drops the most relative to the node's inputs.

Nothing here raises for a search that cannot finish: the culprit then says why
(``note``).  Library code: nothing is printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from passes import PassManager, to_graph, to_model
from passes.convert import quiet
from passes.graph import is_sorted

from .errors import short_message

NODE_LIMIT = 2000  # node-level localisation on larger graphs is skipped (memory, time)
BYTES_LIMIT = 1 << 30  # ... and where the exposed tensors would exceed this
NAME_LIMIT = 40  # names are shortened to this many characters in messages
NO_PASS = "no pass changes the outputs beyond tolerance"


class _Stop(Exception):
    """Raised from a snapshot hook to end the pipeline early."""


Hook = Callable[[str, int, onnx.ModelProto], None]
Stage = Callable[[onnx.ModelProto, Hook], onnx.ModelProto]


# --------------------------------------------------------------------------- stages


@dataclass
class Pipeline:
    """What a pass manager ran: enough to run it again pass by pass."""

    make_passes: Callable[[], list]  # fresh pass objects (passes keep per-compile budgets)
    disabled: frozenset = frozenset()
    max_rounds: int = 8
    base_dir: object = None  # external data of the first model it runs on

    def run(self, model: onnx.ModelProto, hook: Hook) -> onnx.ModelProto:
        """Run on a fresh graph of ``model``; ``hook(name, round, snapshot)``
        after every pass application that modified the graph."""
        graph, env = to_graph(model, self.base_dir)

        def on_pass(rec) -> None:
            if rec.modified:
                hook(rec.name, rec.round, to_model(graph, env))

        manager = PassManager(self.make_passes(), max_rounds=self.max_rounds, disabled=self.disabled,
                              on_pass=on_pass)
        manager.run(graph)
        with quiet():
            if not is_sorted(graph):
                graph.toposort()
        return to_model(graph, env)


def step_stage(name: str, fn: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Stage:
    """One step that is not a pass (fp16 conversion): its output is one snapshot."""

    def run(model: onnx.ModelProto, hook: Hook) -> onnx.ModelProto:
        out = fn(model)
        hook(name, None, out)
        return out

    return run


# --------------------------------------------------------------------------- running models


def _session(model: onnx.ModelProto, base_dir=None, optimize: bool | str = "extended"):
    # "extended": ORT's CPU-only layout level segfaults on some fp16 snapshots (gpu)
    from .verify import Session

    return Session(model, None, optimize=optimize, base_dir=base_dir)


def _short(exc: BaseException, limit: int = 100) -> str:
    """A one-line reason: ONNX Runtime's "Non-zero status code ... Status Message:" preamble dropped."""
    text = short_message(exc, None)
    return short_message(text.split("Status Message: ", 1)[-1], limit)


class Reference:
    """The original model's outputs on the verification's inputs (the given
    ones, or generated exactly as verification generates them)."""

    def __init__(self, model: onnx.ModelProto | None, path=None, *, inputs: Mapping[str, np.ndarray] | None = None,
                 analysis_model: onnx.ModelProto | None = None, base_dir=None, seed: int = 0):
        from . import verify as v

        self.base_dir = base_dir
        sess = v.Session(model, path, base_dir=base_dir)
        try:
            so = sess.sess
            self.names = [o.name for o in so.get_outputs()]
            if inputs is not None:
                self.feeds = dict(inputs)
                self.expected = so.run(None, self.feeds)
            else:
                self.feeds, self.expected = _generated(v, so, analysis_model if analysis_model is not None else model,
                                                       seed)
        finally:
            sess.close()

    def run(self, model: onnx.ModelProto) -> tuple[list | None, str]:
        """``model``'s outputs (by the original's output names), or None and why."""
        try:
            s = _session(model, self.base_dir)
        except Exception as exc:  # noqa: BLE001
            return None, f"ONNX Runtime cannot load it: {_short(exc)}"
        try:
            return s.sess.run(self.names, self.feeds), ""
        except Exception as exc:  # noqa: BLE001
            return None, f"it fails on ONNX Runtime: {_short(exc)}"
        finally:
            s.close()


def _generated(v, so, analysis_model, seed: int):
    """The inputs verification generates for this session (``InputGenerator`` +
    ``pick_generated``), and the outputs on them."""
    cand, expected = v.pick_generated(so, v.InputGenerator(so.get_inputs(), analysis_model, seed))
    return cand.feeds, expected


def _diffs(names, want, got, rtol, atol):
    from .verify import compare

    return [compare(n, a, b, rtol, atol) for n, a, b in zip(names, want, got)]


# --------------------------------------------------------------------------- pass-level search


@dataclass
class _Hit:
    index: int
    name: str
    round: int | None
    max_abs_diff: float = 0.0
    output: str = ""
    error: str = ""


class _Search:
    """The hook of a pipeline run: checks each snapshot against the reference.
    ``stop_first``: stop at the first snapshot that fails (keeping it and the
    model before it); ``stop_index``: stop at that snapshot (keeping the pair)."""

    def __init__(self, ref: Reference, start: onnx.ModelProto, rtol: float, atol: float, *, stop_first: bool = True,
                 stop_index: int | None = None):
        self.ref, self.rtol, self.atol = ref, rtol, atol
        self.stop_first, self.stop_index = stop_first, stop_index
        self.index = 0
        self.prev_model, self.prev_out = start, ref.expected
        self.first: _Hit | None = None
        self.largest: _Hit | None = None
        self.pair: tuple[onnx.ModelProto, onnx.ModelProto] | None = None
        self.last_model = start

    def __call__(self, name: str, rnd: int, model: onnx.ModelProto) -> None:
        self.index += 1
        if self.stop_index is not None:
            if self.index == self.stop_index:
                self.pair = (self.prev_model, model)
                raise _Stop
            self.prev_model = model
            return
        out, err = self.ref.run(model)
        if out is None:
            hit = _Hit(self.index, name, rnd, math.inf, "", err)
            self.first = self.first or hit
            self.pair = self.pair or (self.prev_model, model)
            raise _Stop  # nothing after it can be compared
        diffs = _diffs(self.ref.names, self.ref.expected, out, self.rtol, self.atol)
        if self.first is None and not all(d.ok for d in diffs):
            worst = max(diffs, key=lambda d: d.max_abs_diff if not d.ok else -1.0)
            self.first = _Hit(self.index, name, rnd, worst.max_abs_diff, worst.name)
            self.pair = (self.prev_model, model)
            if self.stop_first:
                raise _Stop
        own = _diffs(self.ref.names, self.prev_out, out, self.rtol, self.atol)  # this pass's own change
        mine = max(own, key=lambda d: d.max_abs_diff, default=None)
        if mine is not None and mine.max_abs_diff > 0 and (self.largest is None
                                                            or mine.max_abs_diff > self.largest.max_abs_diff):
            self.largest = _Hit(self.index, name, rnd, mine.max_abs_diff, mine.name)
        self.prev_model, self.prev_out = model, out
        self.last_model = model


def _run_stages(stages: Sequence[Stage], start: onnx.ModelProto, hook: Hook) -> onnx.ModelProto | None:
    """Run the stages in order; the final model, or None when a hook stopped them."""
    model = start
    try:
        for stage in stages:
            model = stage(model, hook)
    except _Stop:
        return None
    return model


# --------------------------------------------------------------------------- node-level localisation


def topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Top-level nodes in a topological order (Kahn; the file order among ready nodes)."""
    produced = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    deps = [set() for _ in graph.node]
    users: list[list[int]] = [[] for _ in graph.node]
    for k, n in enumerate(graph.node):
        for i in n.input:
            j = produced.get(i)
            if j is not None and j != k and j not in deps[k]:
                deps[k].add(j)
                users[j].append(k)
    import heapq

    ready = [k for k in range(len(graph.node)) if not deps[k]]
    heapq.heapify(ready)
    left = [len(d) for d in deps]
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, u)
    seen = set(order)
    order += [k for k in range(len(graph.node)) if k not in seen]  # a cycle: keep file order
    return [graph.node[k] for k in order]


def _itemsize(elem: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
    except Exception:  # noqa: BLE001 - string or exotic types
        return 8


def estimate_bytes(model: onnx.ModelProto, names: Iterable[str], feeds: Mapping[str, np.ndarray]) -> int | None:
    """Bytes of the tensors ``names`` with the inputs bound to ``feeds``' shapes
    (ONNX shape inference on a copy without the large weights); None if unknown."""
    g = model.graph
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    sg = skel.graph
    sg.node.extend(g.node)
    sg.output.extend(g.output)
    listed = set()
    for vi in g.input:
        listed.add(vi.name)
        if vi.name in feeds and vi.type.HasField("tensor_type"):
            a = np.asarray(feeds[vi.name])
            sg.input.append(onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, list(a.shape)))
        else:
            sg.input.append(vi)
    for t in g.initializer:
        count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        if count <= 1024 and t.data_location != onnx.TensorProto.EXTERNAL:
            sg.initializer.append(t)
        elif t.name not in listed:
            sg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001
        return None
    info = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    total = 0
    for n in names:
        vi = info.get(n)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            total += int(np.prod([d.dim_value for d in dims], dtype=np.int64)) * _itemsize(vi.type.tensor_type.elem_type)
    return total


def run_exposed(model: onnx.ModelProto, names: Sequence[str], feeds: Mapping[str, np.ndarray], base_dir=None) -> list:
    """Run ``model`` (graph optimizations off) with ``names`` exposed as outputs.
    The model is changed only while the session is made, and restored."""
    g = model.graph
    have = {o.name for o in g.output}
    keep = len(g.output)
    g.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    try:
        s = _session(model, base_dir, optimize=False)
    finally:
        del g.output[keep:]
    try:
        return s.sess.run(list(names), dict(feeds))
    finally:
        s.close()


def _is_float(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind in "fc"


def _allclose(a, b, rtol: float, atol: float) -> tuple[bool, float, str]:
    from .verify import compare

    if _is_float(a) and _is_float(b) and a.dtype != b.dtype:  # fp32 vs fp16: compare the values
        a, b = a.astype(np.float64), b.astype(np.float64)
    d = compare("", a, b, rtol, atol)
    detail = d.detail
    if _is_float(a) and _is_float(b) and a.shape == b.shape:
        fa, fb = np.isfinite(a), np.isfinite(b)
        if np.any(fa & ~fb):
            detail = "overflows (inf)" if np.any(fa & np.isinf(b)) else "becomes NaN"
    return d.ok, d.max_abs_diff, detail


def cosine(a, b) -> float:
    from .targets.qnn import cosine as _cos

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return 0.0
    return _cos(a, b)


@dataclass
class Located:
    node: str | None = None
    op_type: str | None = None
    tensor: str | None = None
    max_abs_diff: float | None = None
    cosine: float | None = None
    cosine_drop: float | None = None
    detail: str = ""
    folded: bool = False  # the tensor became a constant of the pass's output
    subgraph: bool = False  # the node has subgraphs (localisation covers the top level)
    note: str = ""


def dequantized_names(qdq: onnx.ModelProto) -> dict[str, str]:
    """fp32 tensor name -> the QDQ model's tensor holding its dequantized value
    (QuantizeLinear -> DequantizeLinear; a graph output's producer is renamed
    ``<name>_QuantizeLinear_Input`` by the quantizer)."""
    readers: dict[str, list] = {}
    for n in qdq.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out: dict[str, str] = {}
    suffix = "_QuantizeLinear_Input"
    for n in qdq.graph.node:
        if n.op_type != "QuantizeLinear" or not n.input or not n.output:
            continue
        dq = next((r for r in readers.get(n.output[0], []) if r.op_type == "DequantizeLinear"), None)
        if dq is None or not dq.output:
            continue
        x = n.input[0]
        out.setdefault(x[: -len(suffix)] if x.endswith(suffix) else x, dq.output[0])
    return out


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or f"<unnamed {node.op_type} -> {node.output[0] if node.output else '?'}>"


def localise(before: onnx.ModelProto, after: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | Sequence[Mapping],
             *, rtol: float = 0.0, atol: float = 0.0, metric: str = "allclose", mode: str = "first",
             base_dir=None) -> Located:
    """The node of ``after`` (``metric="allclose"``) whose output first differs
    from ``before``'s tensor of the same name beyond tolerance while its
    compared inputs agree (``mode="first"``), or whose own divergence is the
    largest (``mode="largest"``).  ``metric="cosine"``: ``after`` is the QDQ
    model; nodes of ``before`` (fp32) are walked and each fp32 tensor compared
    with its dequantized counterpart; the node with the largest cosine drop
    relative to its inputs is named.  Only the top-level graph is searched."""
    samples = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    bg, ag = before.graph, after.graph
    count = max(len(bg.node), len(ag.node))
    if count > NODE_LIMIT:
        return Located(note=f"node-level localisation skipped: {count} nodes (limit {NODE_LIMIT})")
    b_prod = {o: n for n in bg.node for o in n.output if o}
    a_prod = {o: n for n in ag.node for o in n.output if o}
    b_inputs = {i.name for i in bg.input}
    a_inits = {t.name: t for t in ag.initializer}
    cos = metric == "cosine"
    rename = dequantized_names(after) if cos else {}
    pairs: dict[str, str] = {}  # before name -> after name
    for b in list(b_prod) + ([i for i in b_inputs if i in rename] if cos else []):
        a = rename.get(b, b)
        if a in a_prod or (not cos and a in a_inits and b in b_prod):
            pairs[b] = a
    if not pairs:
        return Located(note="no tensor of the result keeps a name of the model before: nothing to compare")
    b_run = [b for b in pairs if b in b_prod]
    a_run = list(dict.fromkeys(a for a in pairs.values() if a in a_prod))
    size = estimate_bytes(before, b_run, samples[0])
    if size is not None and 2 * size * (2 if len(samples) > 1 else 1) > BYTES_LIMIT:
        return Located(note=f"node-level localisation skipped: the intermediate tensors take about "
                            f"{2 * size / (1 << 20):.0f} MiB (limit {BYTES_LIMIT >> 20} MiB)")
    per: dict[str, list] = {}  # before name -> [(ok, abs, detail) or cosine per sample]
    for feed in samples:
        try:
            b_vals = dict(zip(b_run, run_exposed(before, b_run, feed, base_dir))) if b_run else {}
        except Exception as exc:  # noqa: BLE001
            return Located(note=f"the model before fails on ONNX Runtime with its tensors exposed ({_short(exc)})")
        try:
            a_vals = dict(zip(a_run, run_exposed(after, a_run, feed, base_dir))) if a_run else {}
        except Exception as exc:  # noqa: BLE001
            return Located(note=f"the result fails on ONNX Runtime with its tensors exposed ({_short(exc)})")
        for b, a in pairs.items():
            want = b_vals[b] if b in b_vals else feed.get(b)
            if a in a_vals:
                got = a_vals[a]
            elif a in a_inits:
                got = onnx.numpy_helper.to_array(a_inits[a], base_dir=str(base_dir or ""))
            else:
                continue
            if want is None:
                continue
            if cos:
                if not isinstance(want, np.ndarray) or not isinstance(got, np.ndarray):
                    continue
                per.setdefault(b, []).append(cosine(want, got))
            else:
                per.setdefault(b, []).append(_allclose(want, got, rtol, atol))
        del b_vals, a_vals
    if cos:
        score = {b: min(v) for b, v in per.items()}  # worst cosine over the samples
        return _walk_cosine(topological(bg), score)
    res = {b: (all(ok for ok, _, _ in v), max(d for _, d, _ in v), next((t for ok, _, t in v if not ok), ""))
           for b, v in per.items()}
    return _walk_allclose(topological(ag), res, pairs, b_prod, a_inits, mode, bg)


def _walk_allclose(order, res, pairs, b_prod, a_inits, mode, bg) -> Located:
    by_after = {pairs[b]: r for b, r in res.items()}
    folded = [b for b in res if pairs[b] in a_inits and b in b_prod]
    rank = {id(n): k for k, n in enumerate(topological(bg))}
    folded.sort(key=lambda b: rank.get(id(b_prod[b]), 0))
    best: tuple[tuple, Located] | None = None
    if mode == "first":
        for b in folded:
            ok, d, detail = res[b]
            if not ok:
                return _folded(b_prod[b], b, d, detail)
    else:
        for b in folded:
            _, d, detail = res[b]
            if d > 0 and (best is None or (True, d) > best[0]):
                best = ((True, d), _folded(b_prod[b], b, d, detail))
    for node in order:
        outs = [(o, by_after[o]) for o in node.output if o in by_after and o not in a_inits]
        if not outs:
            continue
        ins = [by_after[i] for i in node.input if i in by_after]
        name, (ok, d, detail) = max(outs, key=lambda x: (not x[1][0], x[1][1]))
        if mode == "first":
            if not ok and all(r[0] for r in ins):
                return _at(node, name, d, detail)
            continue
        # largest: where a change starts (its inputs identical) and is biggest; else the
        # biggest growth over its inputs
        upstream = max((r[1] for r in ins), default=0.0)
        key = (upstream == 0.0, d if upstream == 0.0 else d - upstream)
        if d > 0 and key[1] > 0 and (best is None or key > best[0]):
            best = (key, _at(node, name, d, detail))
    if best is not None:
        return best[1]
    if mode == "first":
        return Located(note="no node's output differs beyond tolerance with ONNX Runtime's graph optimizations off")
    return Located(note="no node's output changes")


def _walk_cosine(order, score) -> Located:
    best: tuple[float, Located] | None = None
    for node in order:
        outs = [(o, score[o]) for o in node.output if o in score]
        if not outs:
            continue
        name, c = min(outs, key=lambda x: x[1])
        base = min((score[i] for i in node.input if i in score), default=1.0)
        drop = base - c
        if best is None or drop > best[0] + 1e-12:
            loc = _at(node, name, None, "")
            loc.cosine, loc.cosine_drop = c, drop
            best = (drop, loc)
    if best is None:
        return Located(note="no quantized tensor keeps the name of an fp32 tensor: nothing to compare")
    return best[1]


def _at(node: onnx.NodeProto, tensor: str, d, detail: str) -> Located:
    sub = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
    return Located(_node_label(node), node.op_type, tensor, d, detail=detail, subgraph=sub)


def _folded(node: onnx.NodeProto, tensor: str, d, detail: str) -> Located:
    loc = _at(node, tensor, d, detail)
    loc.folded = True
    return loc


# --------------------------------------------------------------------------- the culprit


def _cut(name: str | None) -> str:
    name = str(name)
    return name if len(name) <= NAME_LIMIT else name[: NAME_LIMIT - 3] + "..."


def _num(x) -> str:
    return "inf" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _pass_text(name: str, rnd: int | None) -> str:
    return f"{name} (round {rnd})" if rnd else name


def _node_text(loc: Located) -> str:
    if loc.node is None:
        return ""
    what = f"node '{_cut(loc.node)}' ({loc.op_type})"
    if loc.cosine is not None:
        return f"{what} output '{_cut(loc.tensor)}' cosine {loc.cosine:.4f} (drop {loc.cosine_drop:.4f} from its inputs)"
    how = f"differs by {_num(loc.max_abs_diff)}" + (f", {loc.detail}" if loc.detail in ("overflows (inf)", "becomes NaN")
                                                   else "")
    if loc.folded:
        text = f"{what}, folded to the constant '{_cut(loc.tensor)}' that {how}"
    else:
        text = f"{what} output '{_cut(loc.tensor)}' {how}"
    if loc.subgraph:
        text += " (it has subgraphs, where the difference may arise: only the top-level graph is searched)"
    return text


def culprit_dict(pass_name: str | None, rnd: int | None, loc: Located | None, *, message: str,
                 within_tolerance: bool = False, largest: dict | None = None, notes: Sequence[str] = ()) -> dict:
    loc = loc or Located()
    out = {
        "pass": pass_name,
        "round": rnd,
        "node": loc.node,
        "op_type": loc.op_type,
        "tensor": loc.tensor,
        "max_abs_diff": loc.max_abs_diff,
        "within_tolerance": within_tolerance,
        "message": message,
    }
    if loc.cosine is not None:
        out["cosine"] = loc.cosine
        out["cosine_drop"] = loc.cosine_drop
    if loc.folded:
        out["folded"] = True
    if loc.subgraph:
        out["in_subgraph"] = True
    if largest is not None:
        out["largest"] = largest
    notes = [n for n in list(notes) + [loc.note] if n]
    if notes:
        out["notes"] = notes
    return out


def _failing(name: str, rnd: int | None, loc: Located, error: str = "", notes: Sequence[str] = ()) -> dict:
    msg = f"first differing pass: {_pass_text(name, rnd)}"
    if error:
        msg += f" (the model after it: {error})"  # e.g. "it fails on ONNX Runtime: ..."
    node = _node_text(loc)
    if node:
        msg += f", {node}"
    elif loc.note and not error:
        msg += f" ({loc.note})"
    return culprit_dict(name, rnd, loc, message=msg, notes=notes)


def _healthy(name: str | None, rnd: int | None, loc: Located | None, notes: Sequence[str] = (),
             what: str = NO_PASS) -> dict:
    if name is None:
        return culprit_dict(None, None, None, message=what, within_tolerance=True, notes=notes)
    node = _node_text(loc) if loc is not None else ""
    largest = culprit_dict(name, rnd, loc, message="")
    largest.pop("message")
    largest.pop("within_tolerance")
    msg = f"{what} (largest divergence: {_pass_text(name, rnd)}" + (f", {node}" if node else "") + ")"
    return culprit_dict(None, None, None, message=msg, within_tolerance=True, largest=largest,
                        notes=[n for n in notes] + ([loc.note] if loc is not None and loc.note else []))


def failed_search(exc: BaseException) -> dict:
    return culprit_dict(None, None, None, message=f"culprit search failed: {type(exc).__name__}: {_short(exc)}")


def search_passes(stages: Sequence[Stage], start: onnx.ModelProto, ref: Reference, *, rtol: float, atol: float,
                  base_dir=None) -> tuple[dict | None, onnx.ModelProto | None, _Hit | None]:
    """Run ``stages`` from ``start`` with a check of every snapshot against
    ``ref``.  Returns (culprit of the first failing snapshot or None, the
    final model, the snapshot whose own change of the outputs is largest)."""
    search = _Search(ref, start, rtol, atol, stop_first=True)
    final = _run_stages(stages, start, search)
    if search.first is not None:
        hit = search.first
        before, after = search.pair
        if hit.error:
            loc = Located(note="node-level localisation skipped: the model after the pass does not run")
        else:
            loc = localise(before, after, ref.feeds, rtol=rtol, atol=atol, mode="first", base_dir=base_dir)
        return _failing(hit.name, hit.round, loc, hit.error), None, None
    return None, final, search.largest


def largest_pass(stages: Sequence[Stage], start: onnx.ModelProto, ref: Reference, hit: _Hit | None, *, rtol: float,
                 atol: float, base_dir=None, notes: Sequence[str] = ()) -> dict:
    """The culprit of a healthy run: the pass whose own change of the outputs is
    the largest, and the node of its output that diverges the most."""
    if hit is None:
        return _healthy(None, None, None, notes)
    again = _Search(ref, start, rtol, atol, stop_index=hit.index)
    _run_stages(stages, start, again)
    loc = None
    if again.pair is not None:
        loc = localise(again.pair[0], again.pair[1], ref.feeds, rtol=rtol, atol=atol, mode="largest",
                       base_dir=base_dir)
    return _healthy(hit.name, hit.round, loc, notes)


# --------------------------------------------------------------------------- entry points (one per command)


def find(stages: Sequence[Stage], start: onnx.ModelProto, ref: Reference, *, rtol: float, atol: float,
         failed: bool, base_dir=None) -> dict:
    """Culprit of an allclose-verified pipeline (cpu, gpu, insert, fold ...)."""
    culprit, _final, largest = search_passes(stages, start, ref, rtol=rtol, atol=atol, base_dir=base_dir)
    if culprit is not None:
        if not failed:
            culprit.setdefault("notes", []).append("a later pass brings the outputs back within tolerance: "
                                                   "the result verifies")
        return culprit
    notes = []
    if failed:
        notes.append("verification failed, but no snapshot of the pipeline differs beyond tolerance when run again")
    return largest_pass(stages, start, ref, largest, rtol=rtol, atol=atol, base_dir=base_dir, notes=notes)


def single_step(name: str, before: onnx.ModelProto, after: onnx.ModelProto, ref: Reference, *, rtol: float,
                atol: float, failed: bool, base_dir=None) -> dict:
    """Culprit of a one-step edit (insert, fold, unfold): the step itself when
    its result differs, with the node of its output."""
    out, err = ref.run(after)
    if out is None:
        return _failing(name, None, Located(note="node-level localisation skipped: the result does not run"), err)
    diffs = _diffs(ref.names, ref.expected, out, rtol, atol)
    bad = not all(d.ok for d in diffs)
    if bad or failed:
        loc = localise(before, after, ref.feeds, rtol=rtol, atol=atol, mode="first", base_dir=base_dir)
        notes = [] if bad else ["verification failed, but the result matches when run again"]
        return _failing(name, None, loc, notes=notes)
    if max((d.max_abs_diff for d in diffs), default=0.0) == 0.0:
        return _healthy(None, None, None, what=f"{name} does not change the outputs")
    loc = localise(before, after, ref.feeds, rtol=rtol, atol=atol, mode="largest", base_dir=base_dir)
    return _healthy(name, None, loc)


def quantized(fp32: onnx.ModelProto, qdq: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]], *,
              failed: bool, step: str = "quantize_qdq") -> dict:
    """Culprit of a QDQ result whose fp32 pipeline matched: the quantization,
    and the node whose dequantized output loses the most cosine similarity
    (on ONNX Runtime's CPU provider, not the HTP)."""
    loc = localise(fp32, qdq, list(samples)[:4], metric="cosine")
    notes = ["node cosine measured on ONNX Runtime's CPU provider (the QDQ model, not the HTP)"]
    if failed:
        return _failing(step, None, loc, notes=notes)
    return _healthy(step, None, loc, notes=notes)


# --------------------------------------------------------------------------- gpu and npu (beats_compiler.targets)


def _numeric_failure(report) -> bool:
    """Verification failed on the numbers (not only a --strict legality failure)."""
    return report.verified is False and any(not o.get("ok", True) for o in report.outputs)


def _fp32_pipeline(ctx) -> Pipeline:
    from .targets import build_passes

    profile, options = ctx.profile, ctx.pass_options
    return Pipeline(lambda: build_passes(profile.passes, options), ctx.disabled & set(profile.passes),
                    ctx.options.passes.max_rounds)


def for_lowered(result, ctx):
    """``report.culprit`` of a gpu/npu compile (``targets.lowering.Lowering``)
    when verification failed on the numbers or ``bisect`` was asked."""
    say = ctx.say
    if ctx.profile.convert == "fp16":
        return for_fp16(result, ctx, say=say)
    held_out = ctx.state["data"].held_out
    return for_qdq(result, ctx, samples=held_out, say=say)


def for_fp16(result, ctx, *, say=None):
    """gpu: the fp32 passes, the fp16 conversion and the cleanup passes after it,
    each checked against the original with the target's tolerance; the
    conversion's node by the tensors whose names survive its Casts."""
    report = result.report
    failed = _numeric_failure(report)
    if not (ctx.options.bisect or failed):
        return result
    (say or (lambda _m: None))("looking for the step that changes the outputs")
    try:
        from .targets import build_passes
        from .targets import gpu

        original, loaded, profile = ctx.original, ctx.loaded, ctx.profile
        path = loaded.path if loaded is not None else None
        ref = Reference(None if path is not None else original, path, inputs=ctx.options.verify.inputs,
                        analysis_model=original)
        convert = gpu.ConvertFloatToFloat16(gpu.block_ops(profile, ctx.options.target_options.fp32_ops))

        def post(model: onnx.ModelProto, hook: Hook) -> onnx.ModelProto:
            opts = gpu.post_options(convert.protected)
            p = Pipeline(lambda: build_passes(profile.post_passes, opts), ctx.disabled & set(profile.post_passes),
                         ctx.options.passes.max_rounds)
            return p.run(model, hook)

        stages = [_fp32_pipeline(ctx).run, step_stage(convert.name, lambda m: convert.call(m).model), post]
        report.culprit = find(stages, original, ref, rtol=report.rtol, atol=report.atol, failed=failed)
    except Exception as exc:  # noqa: BLE001 - the search must not hide the verification result
        report.culprit = failed_search(exc)
    return result


def for_qdq(result, ctx, *, samples, say=None):
    """npu: the fp32 passes checked against the original (fp32 tolerance, on a
    held-out sample); when they all match, the quantization, with the node
    whose dequantized output loses the most cosine similarity."""
    report = result.report
    failed = _numeric_failure(report)
    if not (ctx.options.bisect or failed):
        return result
    (say or (lambda _m: None))("looking for the step that loses accuracy")
    try:
        from .verify import DEFAULT_ATOL, DEFAULT_RTOL

        samples = list(samples)
        original, loaded = ctx.original, ctx.loaded
        path = loaded.path if loaded is not None else None
        ref = Reference(None if path is not None else original, path, inputs=samples[0])
        pipe = _fp32_pipeline(ctx)
        culprit, final, _largest = search_passes([pipe.run], original, ref, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL)
        if culprit is not None:
            culprit.setdefault("notes", []).append("fp32 passes are checked with the fp32 tolerances "
                                                   f"(rtol {DEFAULT_RTOL:g}, atol {DEFAULT_ATOL:g})")
        elif ctx.options.target_options.activation_type == "float16":
            what = ("no fp32 pass changes the outputs beyond tolerance; the HTP's fp16 execution is not "
                    "localised (it runs on the HTP only)")
            culprit = (culprit_dict("htp_fp16", None, None, message="first differing step: htp_fp16 (" + what + ")")
                       if failed else _healthy(None, None, None, what=what))
        else:
            culprit = quantized(final, result.model, samples, failed=failed)
        report.culprit = culprit
    except Exception as exc:  # noqa: BLE001
        report.culprit = failed_search(exc)
    return result
