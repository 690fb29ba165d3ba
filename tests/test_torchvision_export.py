"""torchvision's real mobilenet_v3_small through the TorchScript exporter
(opset 17, dynamic batch): ONNX Runtime must match PyTorch and the graph must
keep the hard activations (HardSwish, HardSigmoid) of MobileNetV3.

Needs the ``exporters`` extra and torchvision 0.28.0 (see fixtures/torchvision_models.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fixtures.torchvision_models import export_mobilenet_v3_small, mobilenet_v3_small_module

pytestmark = [pytest.mark.slow, pytest.mark.exporters]


def test_mobilenet_v3_small_torchscript_export(tmp_path):
    import onnxruntime as ort
    import torch

    path = export_mobilenet_v3_small(tmp_path / "mobilenet_v3_small.onnx", seed=0, num_classes=4, image_size=32)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    op_types = {n.op_type for n in model.graph.node}
    assert {"HardSwish", "HardSigmoid"} <= op_types, sorted(op_types)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]

    module = mobilenet_v3_small_module(seed=0, num_classes=4)
    assert type(module).__module__ == "torchvision.models.mobilenetv3"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3):  # the export used batch 2
        x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        (got,) = sess.run(["logits"], {"input": x})
        assert got.shape == (batch, 4)
        assert np.abs(expected).max() > 1e-2  # the seeded weights give non-trivial logits
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
