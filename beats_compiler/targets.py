"""Target profiles (plain data) and the one place each target's pipeline is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from passes import (
    DedupeInitializers,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    EliminateIdentity,
    EliminateNopOps,
    FoldConstants,
    FoldShapes,
    FuseConvBatchNorm,
    FuseMatMulAdd,
    InlineConstantIf,
    Pass,
)

from .errors import InputError
from .verify import DEFAULT_ATOL, DEFAULT_RTOL

MiB = 1 << 20


@dataclass(frozen=True)
class PipelineOptions:
    """Knobs shared by every target's passes."""

    fold_size_limit: int = 4 * MiB  # most bytes a constant fold may add to the model
    fold_max_tensor: int = 1 << 30  # largest tensor a fold may create at all


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    passes: tuple[str, ...]
    rtol: float
    atol: float
    providers: tuple[str, ...]


PASSES: dict[str, Callable[[PipelineOptions], Pass]] = {
    "inline_constant_if": lambda o: InlineConstantIf(),
    "eliminate_identity": lambda o: EliminateIdentity(),
    "fold_constants": lambda o: FoldConstants(max_output_bytes=o.fold_max_tensor, max_growth_bytes=o.fold_size_limit),
    "fold_shapes": lambda o: FoldShapes(),
    "eliminate_nop_ops": lambda o: EliminateNopOps(),
    "dedupe_initializers": lambda o: DedupeInitializers(),
    "eliminate_common_subexpressions": lambda o: EliminateCommonSubexpressions(),
    "fuse_conv_batchnorm": lambda o: FuseConvBatchNorm(),
    "fuse_matmul_add": lambda o: FuseMatMulAdd(),
    "eliminate_dead_code": lambda o: EliminateDeadCode(),
}

_CPU_PASSES = (
    "inline_constant_if",
    "eliminate_identity",
    "fold_constants",
    "fold_shapes",
    "eliminate_nop_ops",
    "dedupe_initializers",
    "eliminate_common_subexpressions",
    "fuse_conv_batchnorm",
    "fuse_matmul_add",
    "eliminate_dead_code",
)

TARGETS: dict[str, TargetProfile] = {
    "cpu": TargetProfile(
        name="cpu",
        description="fp32 graph cleanup and folding, verified on ONNX Runtime's CPU provider",
        passes=_CPU_PASSES,
        rtol=DEFAULT_RTOL,
        atol=DEFAULT_ATOL,
        providers=("CPUExecutionProvider",),
    ),
}


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}; available: {', '.join(TARGETS)}") from None


def build_passes(profile: TargetProfile, options: PipelineOptions) -> list[Pass]:
    return [PASSES[name](options) for name in profile.passes]
