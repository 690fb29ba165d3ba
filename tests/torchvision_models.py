"""torchvision's real ``mobilenet_v3_small`` (random, seeded weights) and its
TorchScript ONNX export, for the slow exporter tier.

Why the import needs a workaround: the only torchvision that matches torch
2.13.0 is 0.28.0 (it pins ``torch==2.13.0``), and its PyPI wheel is the CUDA
build (``0.28.0+cu130``): its ``torchvision/_C.so`` links ``libc10_cuda.so``
and ``libtorch_cuda.so``, which the CPU torch (``2.13.0+cpu``) does not ship.
``torchvision.extension`` swallows that load failure, but
``torchvision/_meta_registrations.py`` then runs, unguarded,
``@torch.library.register_fake("torchvision::nms")`` and the import dies with
``RuntimeError: operator torchvision::nms does not exist``.

The workaround (``import_torchvision``): put an empty module in
``sys.modules["torchvision._meta_registrations"]`` before the first
``import torchvision``.  That file only registers fake (meta) kernels of the
C++ ops (nms, roi_align, ...), which do not exist here anyway; the models,
``torchvision.ops`` layers and transforms are pure Python.  If the C++
extension did load (a matching build), the real registrations are imported
right after.

Where torchvision comes from: transformers imports torchvision whenever it is
installed (``transformers.image_utils``, reached from ``modeling_utils``), so
a torchvision in ``.venv``'s site-packages breaks ``from transformers import
BertModel`` in any process that has not applied this workaround first.  The
recommended install therefore keeps it out of site-packages::

    .venv/bin/python -m pip install --no-deps --target .cache/torchvision-0.28.0 torchvision==0.28.0

and this module puts that folder (or ``$BEATS_TORCHVISION_DIR``) on
``sys.path`` when ``torchvision`` is not importable otherwise.  An ordinary
install in the venv works too.

torch and torchvision are imported inside the functions, so importing this
module needs neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path

TORCHVISION_VERSION = "0.28.0"  # the release that pins torch==2.13.0
OPSET = 17
ROOT = Path(__file__).resolve().parent.parent
TORCHVISION_DIR = Path(os.environ.get("BEATS_TORCHVISION_DIR", ROOT / ".cache" / f"torchvision-{TORCHVISION_VERSION}"))
_META = "torchvision._meta_registrations"


def import_torchvision():
    """Import torchvision beside a CPU torch whose ABI its C++ extension lacks."""
    tv = sys.modules.get("torchvision")
    if tv is not None and hasattr(tv, "models"):  # already imported (by us or a matching build)
        return tv
    if importlib.util.find_spec("torchvision") is None:
        if not (TORCHVISION_DIR / "torchvision").is_dir():
            raise ModuleNotFoundError(
                f"torchvision {TORCHVISION_VERSION} not found; install it with: python -m pip install "
                f"--no-deps --target {TORCHVISION_DIR} torchvision=={TORCHVISION_VERSION}", name="torchvision")
        sys.path.append(str(TORCHVISION_DIR))
    stubbed = _META not in sys.modules
    if stubbed:
        sys.modules[_META] = types.ModuleType(_META)  # skips register_fake("torchvision::nms"), see above
    try:
        import torchvision
    except BaseException:
        if stubbed:
            sys.modules.pop(_META, None)
        raise
    if stubbed and torchvision.extension._has_ops():  # the C++ ops loaded: keep their fake kernels
        del sys.modules[_META]
        torchvision._meta_registrations = importlib.import_module(_META)
    return torchvision


def mobilenet_v3_small_module(seed: int = 0, num_classes: int = 4):
    """torchvision.models.MobileNetV3 (``mobilenet_v3_small``, weights=None), in
    eval mode, with weights drawn from ``seed``.

    torchvision's own init gives logits of about 1e-11 (Linear ~ N(0, 0.01),
    zero biases, BatchNorm at identity), which would make any tolerance check
    vacuous, so every BatchNorm gets random statistics and affine parameters
    and the classifier's Linear layers Kaiming-normal weights and random
    biases (logits of about 0.3).  The global RNG is left untouched."""
    import torch
    from torch import nn

    tv = import_torchvision()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tv.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(1.0, 2.0)
                    m.bias.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                elif isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight)
                    m.bias.normal_(0.0, 0.1)
    return model.eval()


def export_mobilenet_v3_small(path, seed: int = 0, num_classes: int = 4, image_size: int = 32):
    """Export ``mobilenet_v3_small_module(seed, num_classes)`` with the
    TorchScript exporter (opset 17): input ``input`` [batch, 3, image_size,
    image_size] float32, output ``logits`` [batch, num_classes], batch axis
    dynamic.  Returns ``path``."""
    import torch

    model = mobilenet_v3_small_module(seed=seed, num_classes=num_classes)
    example = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path
