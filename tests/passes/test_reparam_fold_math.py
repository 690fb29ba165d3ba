"""Fold arithmetic at disk speed (issue 17): the fast paths of
``passes.reparam`` give the same bits as the code they replaced.

The reference below is a verbatim copy of the fold arithmetic before issue 17
(``_delta_rows``/``_combine``/``_absmax``/``apply_delta``): float64 products
out of place, a ``dlt == 0`` mask on every block, the delta computed again for
the largest |delta|.  The new code must agree with it byte for byte (NaN
payloads, -0.0, subnormals, infinities included) for every factorization,
layout axis and float dtype, through ``apply_delta`` (in memory, fold and
unfold) and ``FoldedValues`` (streamed)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from passes import reparam as rp

BF16 = np.dtype(ml_dtypes.bfloat16)
# NaN/inf factors are part of the cases: numpy warns about them, as it should
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# --------------------------------------------------------------------------- the reference (pre issue 17)


def ref_delta_rows(rec, shape, values, r0, r1):
    f64 = np.float64
    if rec.factorization == "full":
        return values[rec.D][r0:r1].astype(f64) * values[rec.V][r0:r1].astype(f64)
    ax, d, nd = rec.axis, values[rec.D], len(shape)
    if rec.factorization == "vector":
        bshape = [1] * nd
        if ax == 0:
            bshape[0], d = r1 - r0, d[r0:r1]
        else:
            bshape[ax] = shape[ax]
        return np.asarray(d, f64).reshape(bshape) * values[rec.V][r0:r1].astype(f64)
    rest = [s for i, s in enumerate(shape) if i != ax]
    a, b = values[rec.A], values[rec.B]
    if ax == 0:
        mat = (np.asarray(a, f64) @ np.asarray(b[:, r0:r1], f64)) * np.asarray(d[r0:r1], f64)
        return np.moveaxis(mat.reshape(rest + [r1 - r0]), -1, 0)
    inner = int(np.prod(rest[1:], dtype=np.int64))
    mat = (np.asarray(a[r0 * inner:r1 * inner], f64) @ np.asarray(b, f64)) * np.asarray(d, f64)
    return np.moveaxis(mat.reshape([r1 - r0] + rest[1:] + [shape[ax]]), -1, ax)


def ref_combine(blk, dlt, sign):
    acc = blk.astype(np.float64)
    (np.add if sign > 0 else np.subtract)(acc, dlt, out=acc)
    out = acc.astype(blk.dtype)
    np.copyto(out, blk, where=dlt == 0)
    return out


def ref_absmax(a):
    return float(np.max(np.abs(a))) if a.size else 0.0


def ref_apply_delta(rec, w, values, sign=1):
    out = np.empty_like(w)
    if w.size == 0:
        return out, 0.0
    if w.ndim == 0:
        dlt = rp.delta(rec, values)
        out[...] = ref_combine(w, dlt, sign)
        return out, ref_absmax(dlt)
    biggest = 0.0
    for r0, r1 in rp._row_ranges(w.shape):
        dlt = ref_delta_rows(rec, w.shape, values, r0, r1)
        out[r0:r1] = ref_combine(w[r0:r1], dlt, sign)
        biggest = max(biggest, ref_absmax(dlt))
    return out, biggest


# --------------------------------------------------------------------------- cases


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(rp, "_BLOCK_BYTES", 3000)  # several row blocks per weight, the last one partial


def record(shape, axis, fact, rank=3, dtype="float16") -> rp.Record:
    kind, r = rp.parse_factorization(fact if fact != "rank" else f"rank:{rank}")
    rec = rp.Record(weight="W", shape=list(shape), dtype=str(dtype), factorization=kind, rank=r, layout="weight",
                    axis=axis % len(shape), D="W.D")
    if kind == "rank":
        rec.A, rec.B = "W.A", "W.B"
    else:
        rec.V = "W.V"
    return rec


def specials(dtype) -> np.ndarray:
    """Values whose bits a sloppy fold could change: +-0, NaN with payloads,
    infinities, subnormals, the largest finite."""
    info = np.finfo(dtype) if dtype != BF16 else ml_dtypes.finfo(BF16)
    vals = [0.0, -0.0, np.inf, -np.inf, float(info.max), -float(info.max), float(info.smallest_subnormal),
            -float(info.smallest_subnormal), float(info.tiny)]
    arr = np.array(vals, np.float64).astype(dtype)
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]
    inf = int(np.array(np.inf, dtype).view(uint))
    nans = np.array([inf | 1, inf | 3, (inf | 1) | (1 << (8 * np.dtype(dtype).itemsize - 1))], uint).view(dtype)
    return np.concatenate([arr, nans])


def weight(shape, dtype, rng) -> np.ndarray:
    w = (rng.standard_normal(shape) * 0.05).astype(dtype)
    flat = w.reshape(-1)
    sp = specials(dtype)
    at = rng.choice(flat.size, size=min(flat.size, 4 * sp.size), replace=False)
    flat[at] = np.resize(sp, at.size)
    return w


def trained(rec, rng, zeros=True) -> dict:
    """Trained values: nonzero, with exact zeros in places (a delta of exactly 0
    there, where W's bits must be kept), float32 as the model stores them."""
    shp = rp.shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)
    vals = {}
    for key in ("D", "V", "A", "B"):
        name = getattr(rec, key)
        if not name:
            continue
        v = (rng.standard_normal(shp[key]) * (0.1 if key != "D" else 1.0)).astype(np.float32)
        if zeros and v.size > 4:
            v.reshape(-1)[rng.choice(v.size, size=v.size // 4, replace=False)] = 0.0
        vals[name] = v
    return vals


CASES = [  # shape, axis: MatMul [in, out] (axis -1), Gemm transB [out, in], Conv [out, in, kh, kw], ConvTranspose
    ((37, 23), 1),
    ((29, 41), 0),
    ((6, 5, 3, 3), 0),
    ((5, 6, 3, 2), 1),
    ((4, 3, 7), 2),
]
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), BF16, np.dtype(np.float64)]


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fact", ["full", "vector", "rank"])
@pytest.mark.parametrize("shape,axis", CASES)
def test_apply_delta_bits_equal_the_reference(shape, axis, fact, dtype):
    rng = np.random.default_rng(hash((shape, axis, fact, str(dtype))) % 2**32)
    rec = record(shape, axis, fact, dtype=dtype)
    w = weight(shape, dtype, rng)
    vals = trained(rec, rng)
    for sign in (1, -1):  # fold, unfold
        got, big = rp.apply_delta(rec, w, vals, sign=sign)
        want, want_big = ref_apply_delta(rec, w, vals, sign=sign)
        assert got.dtype == want.dtype and bits(got) == bits(want)
        assert big == want_big and big > 0
    assert bits(got) != bits(w)  # the values are trained: the weight changed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fact", ["full", "vector", "rank"])
def test_folded_values_bits_equal_the_reference(fact, dtype):
    """The streamed form: W0 read a block at a time (an array stands in for
    ``graph.ExternalRows``), the delta computed once per block; the largest
    |delta| is set, in the report entry too, once the weight is computed."""
    shape, axis = (45, 19), 1
    rng = np.random.default_rng(7)
    rec = record(shape, axis, fact, dtype=dtype)
    w = weight(shape, dtype, rng)
    vals = trained(rec, rng)
    entry = {"weight": "W", "max_abs_delta": None}
    fv = rp.FoldedValues(rec, w, vals, entry)
    assert fv.max_abs_delta is None
    got = fv.load()
    want, want_big = ref_apply_delta(rec, w, vals)
    assert bits(got) == bits(want)
    assert fv.max_abs_delta == entry["max_abs_delta"] == want_big > 0


@pytest.mark.parametrize("value", [0.7, -0.0, 0.0, np.nan])
@pytest.mark.parametrize("dv", [(1.5, 0.25), (0.0, 3.0), (2.0, -0.0)])
def test_scalar_weight_matches_the_reference(value, dv):
    rec = rp.Record(weight="W", shape=[], dtype="float16", factorization="full", rank=0, layout="weight", axis=0,
                    D="W.D", V="W.V")
    w = np.array(value, np.float16)
    vals = {"W.D": np.array(dv[0], np.float32), "W.V": np.array(dv[1], np.float32)}
    for sign in (1, -1):
        got, big = rp.apply_delta(rec, w, vals, sign=sign)
        want, want_big = ref_apply_delta(rec, w, vals, sign=sign)
        assert bits(got) == bits(want) and big == want_big


def test_nan_and_inf_deltas_match_the_reference():
    """A NaN or infinite factor: NaN/inf in the weight, and the largest |delta|
    as the reference counted it (a block holding a NaN was skipped)."""
    rng = np.random.default_rng(3)
    for fact in ("full", "vector", "rank"):
        rec = record((31, 17), 1, fact)
        w = weight((31, 17), np.float16, rng)
        vals = trained(rec, rng)
        first = rec.A if fact == "rank" else rec.V
        vals[first].reshape(-1)[[0, 5]] = [np.nan, np.inf]
        got, big = rp.apply_delta(rec, w, vals)
        want, want_big = ref_apply_delta(rec, w, vals)
        assert bits(got) == bits(want) and (big == want_big or (math.isnan(big) and math.isnan(want_big)))
        assert not rp.zero_delta(rec, vals)


# --------------------------------------------------------------------------- the zero delta


def zeroed(rec, vals, key) -> dict:
    out = dict(vals)
    name = getattr(rec, key)
    out[name] = np.zeros_like(vals[name])
    out[name].reshape(-1)[::3] = -0.0
    return out


@pytest.mark.parametrize("fact,key", [("full", "V"), ("full", "D"), ("vector", "V"), ("vector", "D"),
                                      ("rank", "B"), ("rank", "A"), ("rank", "D")])
def test_zero_delta_is_w0_bits(fact, key):
    """One factor zero, the others finite: no arithmetic, W0's bits (NaN
    payloads and -0.0 included), as the reference computes them."""
    rng = np.random.default_rng(11)
    rec = record((33, 21), 1, fact)
    w = weight((33, 21), np.float16, rng)
    vals = zeroed(rec, trained(rec, rng), key)
    assert rp.zero_delta(rec, vals)
    for sign in (1, -1):
        got, big = rp.apply_delta(rec, w, vals, sign=sign)
        want, want_big = ref_apply_delta(rec, w, vals, sign=sign)
        assert bits(got) == bits(want) == bits(w) and big == want_big == 0.0


@pytest.mark.parametrize("fact,zero,poison", [("full", "V", "D"), ("vector", "V", "D"), ("vector", "D", "V"),
                                              ("rank", "B", "A"), ("rank", "B", "D"), ("rank", "D", "B")])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_zero_factor_with_a_non_finite_one_is_not_zero(fact, zero, poison, bad):
    """0 * inf and 0 * NaN are NaN: no fast path; the result is the reference's."""
    rng = np.random.default_rng(5)
    rec = record((17, 9), 1, fact)
    w = weight((17, 9), np.float16, rng)
    vals = zeroed(rec, trained(rec, rng, zeros=False), zero)
    vals[getattr(rec, poison)].reshape(-1)[2] = bad
    assert not rp.zero_delta(rec, vals)
    got, _ = rp.apply_delta(rec, w, vals)
    want, _ = ref_apply_delta(rec, w, vals)
    assert bits(got) == bits(want) and bits(got) != bits(w)


def test_zero_d_of_rank_needs_a_finite_a_times_b():
    rec = record((8, 6), 1, "rank", rank=2)
    vals = {"W.D": np.zeros(6, np.float64), "W.A": np.full((8, 2), 1e200), "W.B": np.full((2, 6), 1e200)}
    assert not rp.zero_delta(rec, vals)  # A @ B overflows to inf, inf * 0 = NaN
    w = np.ones((8, 6), np.float32)
    got, _ = rp.apply_delta(rec, w, vals)
    assert np.isnan(got).all() and bits(got) == bits(ref_apply_delta(rec, w, vals)[0])
    vals["W.A"][:] = 1e100
    assert rp.zero_delta(rec, vals)


def test_zero_or_nan_mask():
    for dtype in DTYPES:
        sp = specials(dtype)
        mask = rp._zero_or_nan(sp)
        want = (sp.astype(np.float64) == 0) | np.isnan(sp.astype(np.float64))
        assert mask.tolist() == want.tolist(), dtype
    assert rp._zero_or_nan(np.zeros(3, np.int32)) is None


def test_absmax_matches_the_reference():
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(50), np.array([-0.0, -0.0]), np.array([-3.0, 2.0]), np.array([1.0, np.nan, -5.0]),
             np.array([-np.inf, 1.0]), np.array([])]
    for a in cases:
        got, want = rp._absmax(a), ref_absmax(a)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == want and math.copysign(1, got) == math.copysign(1, want)
