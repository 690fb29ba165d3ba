"""Legalization for ONNX Runtime training's gradient builder (ORT 1.19.2).

The inference graph is unchanged (the added outputs are unused, the added
bias is zero); the edits only give ORT's gradient builders the operands they
index unconditionally:

- ``LayerNormalizationGrad`` reads the forward node's Mean and InvStdDev
  outputs (``O(1)``, ``O(2)``); torch's opset-17 export writes only ``Y``, and
  the builder then fails with ``gradient_builder_base.h ... OutputDefs().size()``
  (onnxruntime issues 22465, 19038).
- it also emits a gradient for input 2 (``GI(2)``), so a LayerNormalization
  without its optional bias fails with ``... InputDefs().size()``.

- ``LayerNormalizationGrad`` names its scale/bias gradients after the input
  tensors and emits them even for frozen ones, so LayerNormalization nodes
  sharing a scale (torch writes one initializer plus Identity nodes for equal
  parameters, e.g. a freshly initialized model) define ``<name>_grad`` twice.

The passes (``add_layernorm_stat_outputs``, ``add_layernorm_bias``,
``untie_layernorm_params``) visit the top-level graph and every If/Loop/Scan body (ORT has no
gradient for control flow, but the edit is harmless there and keeps the
passes simple to state).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .graph import is_standard

__all__ = ["is_layernorm"]


def is_layernorm(node: gs.Node) -> bool:
    """A LayerNormalization of the standard domain or of com.microsoft."""
    return node.op == "LayerNormalization" and (is_standard(node) or node.domain == "com.microsoft")
