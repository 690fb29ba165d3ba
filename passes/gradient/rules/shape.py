"""Gradient rules: shape ops."""

from __future__ import annotations

from .base import Rule

RULES: dict[str, Rule] = {}
