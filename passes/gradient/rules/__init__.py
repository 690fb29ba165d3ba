"""The gradient rule table: ONNX op type (default domain) -> ``Rule``.

One table, assembled here from the op families; each family module defines
its ``RULES`` dict next to the builders, and ``tests/passes/gradient`` checks
every entry against float64 finite differences.
"""

from __future__ import annotations

from .base import Rule
from . import elementwise, linalg, nn, norm, reduce, shape

RULES: dict[str, Rule] = {}
for _family in (elementwise, linalg, nn, norm, reduce, shape):
    _dup = RULES.keys() & _family.RULES.keys()
    assert not _dup, f"gradient rules defined twice: {sorted(_dup)}"
    RULES.update(_family.RULES)

__all__ = ["RULES", "Rule"]
