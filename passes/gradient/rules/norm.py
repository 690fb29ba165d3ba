"""Gradient rules: normalizations and softmax (Softmax, LogSoftmax,
LayerNormalization, BatchNormalization in its inference form)."""

from __future__ import annotations

from .base import Rule

RULES: dict[str, Rule] = {}
