"""What a target is (a frozen, plain-data profile) and the options its passes take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from passes import Pass
from passes.registry import get_pass

MiB = 1 << 20


@dataclass(frozen=True)
class PipelineOptions:
    """Knobs shared by every target's passes."""

    fold_size_limit: int = 4 * MiB  # most bytes a constant fold may add to the model
    fold_max_tensor: int = 1 << 30  # largest tensor a fold may create at all
    fold_memory_limit: int = 1 << 30  # most bytes all folds of one compile may allocate together
    input_shapes: tuple = ()  # ((input name, (dims...)), ...): npu's static shapes
    protected_casts: frozenset = frozenset()  # Casts the model had before fp16 conversion
    drop_new_lossy_casts: bool = False  # gpu after conversion: fp32->fp16->fp32 pairs of new Casts go


@dataclass(frozen=True)
class TargetProfile:
    """One deployment target, as data: its passes, its lowering step (a
    ``targets.<name>`` module's ``lower``), its legal ops and dtypes, the
    flags it accepts and how its result is verified."""

    name: str
    description: str
    passes: tuple[str, ...]  # the fp32 pipeline, by pass name (``passes.get_pass``)
    rtol: float
    atol: float
    providers: tuple[str, ...]
    # What runs after the fp32 pipeline: "none", "fp16" (targets.gpu) or "qdq"
    # (targets.npu); ``post_passes`` clean up after it.
    convert: str = "none"
    post_passes: tuple[str, ...] = ()
    dtype_policy: str = "fp32 everywhere"
    static_shapes: bool = False  # every input dim fixed before the passes run
    # Ops the target's provider takes (None: every standard op).  See targets.legality.
    legal_ops: frozenset | None = None
    legal_dtypes: frozenset | None = None  # element types of node inputs/outputs it takes
    fp32_ops: tuple[str, ...] = ()  # fp16: ops kept in fp32 (the block list, user-extendable)
    # Target options (``pipeline.TargetOptions`` field names) this target accepts.
    flags: frozenset[str] = frozenset()
    # How the result is verified: "allclose" (rtol/atol on every output) or
    # "accuracy" (cosine similarity and top-1 agreement on held-out inputs).
    verify_metric: str = "allclose"
    verify_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    min_cosine: float | None = None
    min_top1: float | None = None


# The passes that take options: how each one's constructor arguments come from
# ``PipelineOptions`` (every other pass is built with no arguments).
PASS_OPTIONS: dict[str, Callable[[PipelineOptions], dict]] = {
    "fold_constants": lambda o: dict(max_output_bytes=min(o.fold_max_tensor, o.fold_memory_limit),
                                     max_growth_bytes=o.fold_size_limit, max_total_bytes=o.fold_memory_limit),
    "fix_input_shapes": lambda o: dict(shapes=dict(o.input_shapes)),
    "remove_redundant_casts": lambda o: dict(protected=o.protected_casts, allow_precision_gain=o.drop_new_lossy_casts),
}


def build_passes(names: tuple[str, ...], options: PipelineOptions) -> list[Pass]:
    """Fresh pass objects for ``names`` (passes keep per-run budgets)."""
    return [get_pass(name)(**PASS_OPTIONS[name](options)) if name in PASS_OPTIONS else get_pass(name)()
            for name in names]
