"""Reverse-mode differentiation over ONNX graphs (the gradient pass).

``build_gradient(graph, loss, wrt)`` appends to an onnx-graphsurgeon graph the
backward nodes of ``loss`` with respect to ``wrt``; ``plan`` says which nodes
are on the path and which ops there have no rule; ``RULES`` is the rule table.
"""

from .context import GradContext, GradientError
from .engine import MIN_OPSET, GradientPlan, GradientResult, build_gradient, plan, rule_for
from .rules import RULES, Rule

__all__ = ["GradContext", "GradientError", "GradientPlan", "GradientResult", "MIN_OPSET", "RULES", "Rule",
           "build_gradient", "plan", "rule_for"]
