"""The rule record: a builder and the input slots it differentiates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import onnx_graphsurgeon as gs

__all__ = ["Rule", "RuleFn"]

RuleFn = Callable[..., Sequence[gs.Tensor | None]]


@dataclass(frozen=True)
class Rule:
    fn: RuleFn
    # Input slots that can carry a gradient (None: every float input).  Index,
    # shape and mask operands are left out, so no gradient work reaches them.
    inputs: tuple[int, ...] | None = None
