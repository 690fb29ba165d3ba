"""The generated Llama-style decoder (fixtures/large_decoder.py, issue 17): the tiny
preset in float32 and float16 is a valid model that ONNX Runtime runs, its KV cache
and padding mask behave as a real export's do, its logits match a numpy forward
written here from the weights alone, the file layout is what ORT mmaps, generation
memory is bounded, and beats-compile compiles and verifies it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fixtures import large_decoder as ld

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "float16")
# float16 runs: the graph computes in float16 (norms and softmax in float32), the
# references in float32 / float64; logits are ~N(0, 0.16^2).
ATOL = {"float32": 2e-5, "float16": 3e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, ld.DecoderConfig, ld.DecoderInfo]]:
    out = {}
    for dtype in DTYPES:
        config = ld.preset("tiny", dtype=dtype)
        path = tmp_path_factory.mktemp(f"tiny_{dtype}") / "model.onnx"
        out[dtype] = (path, config, ld.build(path, config))
    return out


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(config, ids, mask, pos, past=None) -> dict[str, np.ndarray]:
    dt = np.dtype(config.dtype)
    f = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
         "position_ids": np.asarray(pos, np.int64)}
    b = f["input_ids"].shape[0]
    for i in range(config.num_hidden_layers):
        for j, kind in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{kind}"] = (
                past[2 * i + j] if past is not None
                else np.zeros((b, config.num_key_value_heads, 0, config.head_dim), dt))
    return f


def run(sess, config, ids, mask, pos, past=None):
    out = sess.run(None, feeds(config, ids, mask, pos, past))
    names = [o.name for o in sess.get_outputs()]
    return out[names.index("logits")], [out[names.index(f"present.{i}.{k}")]
                                        for i in range(config.num_hidden_layers) for k in ("key", "value")]


def tokens(config, shape, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


# -- a numpy forward from the weights alone (no code of the generator's graph) ---------

def reference(weights, config, ids, mask, pos, past):
    """Llama forward in float64: logits and presents."""
    c = config
    nh, kvh, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def rms(x, g):
        return g * (x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps))

    b, s = ids.shape
    p = past[0].shape[2]
    inv = 1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[:, None]          # [b, 1, s, hd]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    # key j visible to query i (absolute position p + i) iff j <= p + i and not padding
    allowed = (np.arange(p + s)[None, :] <= p + np.arange(s)[:, None])[None] & (mask[:, None, :] != 0)
    h = w["model.embed_tokens.weight"][ids]
    presents = []
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        x = rms(h, w[pre + "input_layernorm.weight"])
        q, k, v = (x @ w[pre + f"self_attn.{n}_proj.weight"] for n in "qkv")
        q = rope(q.reshape(b, s, nh, hd).transpose(0, 2, 1, 3))
        k = rope(k.reshape(b, s, kvh, hd).transpose(0, 2, 1, 3))
        v = v.reshape(b, s, kvh, hd).transpose(0, 2, 1, 3)
        k = np.concatenate([past[2 * i].astype(np.float64), k], 2)
        v = np.concatenate([past[2 * i + 1].astype(np.float64), v], 2)
        presents += [k, v]
        kr, vr = np.repeat(k, nh // kvh, axis=1), np.repeat(v, nh // kvh, axis=1)
        sc = q @ kr.transpose(0, 1, 3, 2) / math.sqrt(hd)
        sc = np.where(allowed[:, None], sc, -1e300)
        e = np.exp(sc - sc.max(-1, keepdims=True))
        a = (e / e.sum(-1, keepdims=True)) @ vr
        h = h + a.transpose(0, 2, 1, 3).reshape(b, s, c.hidden_size) @ w[pre + "self_attn.o_proj.weight"]
        x = rms(h, w[pre + "post_attention_layernorm.weight"])
        g = x @ w[pre + "mlp.gate_proj.weight"]
        h = h + (g / (1 + np.exp(-g)) * (x @ w[pre + "mlp.up_proj.weight"])) @ w[pre + "mlp.down_proj.weight"]
    return rms(h, w["model.norm.weight"]) @ w["lm_head.weight"], presents


# -- tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_checker_and_onnx_runtime(models, dtype):
    path, config, _ = models[dtype]
    onnx.checker.check_model(str(path), full_check=True)
    logits, presents = run(session(path), config, tokens(config, (2, 5)), np.ones((2, 5)),
                           np.tile(np.arange(5), (2, 1)))
    assert logits.shape == (2, 5, config.vocab_size) and logits.dtype == np.dtype(dtype)
    assert np.isfinite(logits).all()
    # small-scale init: logits neither saturated nor degenerate
    assert 0.05 < float(logits.astype(np.float32).std()) < 1.0
    assert len(presents) == 2 * config.num_hidden_layers
    for p in presents:   # empty past: present is the new keys/values only
        assert p.shape == (2, config.num_key_value_heads, 5, config.head_dim) and np.isfinite(p).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_continues_a_run(models, dtype):
    path, config, _ = models[dtype]
    sess = session(path)
    ids = tokens(config, (2, 6), seed=1)
    pos = np.tile(np.arange(6), (2, 1))
    full, full_present = run(sess, config, ids, np.ones((2, 6)), pos)
    _, first_present = run(sess, config, ids[:, :3], np.ones((2, 3)), pos[:, :3])
    second, second_present = run(sess, config, ids[:, 3:], np.ones((2, 6)), pos[:, 3:], past=first_present)
    assert second.shape == (2, 3, config.vocab_size)
    np.testing.assert_allclose(second.astype(np.float32), full[:, 3:].astype(np.float32), atol=ATOL[dtype], rtol=0)
    for a, b in zip(second_present, full_present):
        assert a.shape == b.shape == (2, config.num_key_value_heads, 6, config.head_dim)
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_left_padding_is_masked(models, dtype):
    path, config, _ = models[dtype]
    x = tokens(config, (6,), seed=2)
    ids = np.stack([x, np.concatenate([[7, 9], x[:4]])])
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    pos = np.array([np.arange(6), [1, 1, 0, 1, 2, 3]])   # HF: cumsum(mask) - 1, padding -> 1
    logits, _ = run(session(path), config, ids, mask, pos)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[1, 2:].astype(np.float32), logits[0, :4].astype(np.float32),
                               atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_a_numpy_forward(models, dtype):
    path, config, _ = models[dtype]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    rng = np.random.default_rng(3)
    past = [rng.standard_normal((2, config.num_key_value_heads, 3, config.head_dim)).astype(dtype)
            for _ in range(2 * config.num_hidden_layers)]
    ids = tokens(config, (2, 4), seed=3)
    mask = np.array([[1] * 7, [0, 1, 1, 1, 1, 1, 1]])    # second row: its first past slot is padding
    pos = np.array([np.arange(3, 7), np.arange(2, 6)])
    logits, presents = run(session(path), config, ids, mask, pos, past=past)
    ref_logits, ref_presents = reference(weights, config, ids, mask, pos, past)
    np.testing.assert_allclose(logits.astype(np.float64), ref_logits, atol=ATOL[dtype], rtol=0)
    for a, b in zip(presents, ref_presents):
        np.testing.assert_allclose(a.astype(np.float64), b, atol=ATOL[dtype], rtol=0)


def test_layout_and_info(models):
    for dtype, (path, config, info) in models.items():
        model = onnx.load(str(path), load_external_data=False)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ld.OPSET]
        data = path.with_name(path.name + ".data")
        assert info.data_path == data and info.data_bytes == data.stat().st_size
        itemsize = np.dtype(dtype).itemsize
        spans, sizes, params = [], {}, 0
        for t in model.graph.initializer:
            n = math.prod(t.dims) * itemsize
            sizes[t.name] = n
            params += math.prod(t.dims) if "rotary_emb" not in t.name else 0
            if n < ld.EXTERNAL_MIN_BYTES:
                assert t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) == n
                continue
            ext = {e.key: e.value for e in t.external_data}
            assert t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data
            assert ext["location"] == data.name and int(ext["length"]) == n
            assert int(ext["offset"]) % 4096 == 0, t.name
            spans.append((int(ext["offset"]), int(ext["offset"]) + n))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == info.data_bytes
        assert info.largest_tensor_bytes == max(sizes.values())
        assert info.parameters == params == config.parameter_count
        h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        dims = {t.name: list(t.dims) for t in model.graph.initializer}
        # nn.Linear weights stored transposed, [in, out], as torch's export writes them
        assert dims["model.layers.0.self_attn.q_proj.weight"] == [h, h]
        assert dims["model.layers.1.self_attn.k_proj.weight"] == [h, kv]
        assert dims["model.layers.0.mlp.gate_proj.weight"] == [h, config.intermediate_size]
        assert dims["model.layers.0.mlp.down_proj.weight"] == [config.intermediate_size, h]
        assert dims["lm_head.weight"] == [h, config.vocab_size]
        assert dims["model.rotary_emb.cos_cached"] == [config.max_position_embeddings, config.head_dim]


def test_llama2_7b_preset_has_llama2_7b_parameters():
    config = ld.preset("llama2-7b")
    assert config.dtype == "float16" and config.head_dim == 128
    assert config.parameter_count == 6_738_415_616        # Llama-2-7b-hf
    assert ld.preset("llama2-7b", layers=2).parameter_count == 2 * 32000 * 4096 + 2 * 202_383_360 + 4096


def test_weights_do_not_depend_on_block_size_or_layer_count(tmp_path, models):
    config = ld.preset("tiny")
    a = np.concatenate(list(ld.normal_blocks("w", 1001, config, block=8)))
    b = np.concatenate(list(ld.normal_blocks("w", 1001, config)))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    big = np.concatenate(list(ld.normal_blocks("x", 200_000, config)))
    assert abs(big.mean()) < 1e-3 and abs(big.std() - 0.02) < 5e-4
    # another name or seed: other values
    assert not np.array_equal(a, np.concatenate(list(ld.normal_blocks("v", 1001, config))))
    assert not np.array_equal(a, np.concatenate(list(ld.normal_blocks("w", 1001, ld.preset("tiny", seed=1)))))
    # float16 = float32 of the same seed, cast
    half = np.concatenate(list(ld.normal_blocks("w", 1001, ld.preset("tiny", dtype="float16"))))
    assert np.array_equal(half, a.astype(np.float16))
    # --layers 1 is the first layer of the full model, byte for byte
    one = ld.build(tmp_path / "one.onnx", ld.preset("tiny", layers=1))
    small = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(one.path)).graph.initializer}
    full = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(models["float32"][0])).graph.initializer}
    assert set(small) < set(full) and "model.layers.0.mlp.up_proj.weight" in small
    for name, value in small.items():
        assert np.array_equal(value, full[name]), name


def cli(argv) -> int:
    try:
        return ld.main(argv)
    except SystemExit as e:   # argparse's own refusals
        return e.code


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert cli([str(out), "--preset", "tiny", "--layers", "1", "--dtype", "float16", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "parameters" in lines[0] and "m.onnx.data" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]   # no temp files left
    model = onnx.load(str(out), load_external_data=False)
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    for argv in ([str(tmp_path / "no" / "m.onnx"), "--preset", "tiny"],
                 [str(out), "--preset", "tiny", "--layers", "0"],
                 [str(out), "--preset", "huge"]):
        assert cli(argv) == 2, argv
        captured = capsys.readouterr()
        assert not captured.out and len(captured.err.strip().splitlines()) == 1 and "error" in captured.err


MEMORY_PROBE = """
import json, sys
from fixtures.large_decoder import DecoderConfig, build

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
config = DecoderConfig(vocab_size=4096, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, intermediate_size=2816, max_position_embeddings=256,
                       dtype="float32")
info = build(sys.argv[1], config)
print(json.dumps({"base": base, "peak": status("VmHWM"), "largest": info.largest_tensor_bytes,
                  "data": info.data_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_generation_memory_is_bounded(tmp_path):
    """~236 MB of weights, largest tensor 16.8 MB (the embedding): the generator's peak stays within
    the interpreter (after imports) + 100 MB + its largest tensor."""
    out = tmp_path / "m.onnx"
    try:
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(proc.stdout)
    finally:
        for p in tmp_path.iterdir():
            p.unlink()
    assert r["data"] > 200e6 and r["largest"] < 20e6
    assert r["peak"] - r["base"] < 100e6 + r["largest"], r


@pytest.mark.parametrize("dtype", DTYPES)
def test_beats_compile_compiles_and_verifies(models, dtype, tmp_path):
    from beats_compiler.cli import main

    path, _, _ = models[dtype]
    out = tmp_path / "model.beats.onnx"
    report = tmp_path / "report.json"
    assert main([str(path), "-o", str(out), "-q", "--no-latency", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert out.exists() and r["verified"] is True and r["verify_input_source"] == "generated"
    # the KV-cache relation was found: total = past + new, and the empty cache checked too
    assert r["verify_inputs"]["attention_mask"][1] == (r["verify_inputs"]["past_key_values.0.key"][2]
                                                       + r["verify_inputs"]["input_ids"][1])
