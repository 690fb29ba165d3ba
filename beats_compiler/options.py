"""The options of one compile, grouped (plain frozen data; no behaviour).

``CompileOptions`` is what ``pipeline.compile`` takes; the CLI and
``beats_compiler.compile`` only fill it in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

Progress = Callable[[str], None]


@dataclass(frozen=True)
class VerifyOptions:
    """How the result is checked against the original on ONNX Runtime."""

    enabled: bool = True
    inputs: Mapping[str, np.ndarray] | None = None  # None: generated from how the graph uses each input
    rtol: float | None = None  # None: the target profile's tolerance
    atol: float | None = None
    measure_latency: bool = True
    # weight bytes per ORT session when the models are run one at a time (verify.py);
    # None: side by side up to 1 GiB of weights, else one at a time in 1 GiB parts
    memory: int | None = None
    # "auto": side by side, one at a time, or partially past 4 GiB of weights;
    # "full": every output; "partial": the outputs the first ``memory`` bytes of weights give
    scope: str = "auto"


@dataclass(frozen=True)
class PassOptions:
    """How the pass manager runs the target's passes."""

    disable: Iterable[str] = ()
    max_rounds: int = 8
    check_each_pass: bool = False  # the ONNX checker after every pass that modified the graph
    fold_size_limit: int | None = None  # None: PipelineOptions' defaults
    fold_memory_limit: int | None = None


@dataclass(frozen=True)
class TargetOptions:
    """Options of one target (a profile's ``flags`` says which it takes)."""

    input_shapes: Mapping[str, Iterable[int]] | None = None  # npu
    calib: str | os.PathLike | Mapping[str, np.ndarray] | None = None  # npu: .npz, arrays or "random"
    fp32_ops: tuple[str, ...] = ()  # gpu: more ops kept in fp32
    precompile: bool = False  # npu: an EPContext model too
    activation_type: str = "uint8"  # npu: uint8 | uint16 | float16
    weight_type: str = "uint8"  # npu: uint8 | int8
    per_channel: bool = False  # npu
    min_cosine: float | None = None  # npu: None = the profile's bar
    soc_model: int | None = None  # npu: QNN's SoC number

    def given(self) -> dict[str, bool]:
        """Which options differ from their defaults (by field name)."""
        return {
            "input_shapes": bool(self.input_shapes),
            "calib": self.calib is not None,
            "fp32_ops": bool(self.fp32_ops),
            "precompile": self.precompile,
            "activation_type": self.activation_type != "uint8",
            "weight_type": self.weight_type != "uint8",
            "per_channel": self.per_channel,
            "min_cosine": self.min_cosine is not None,
            "soc_model": self.soc_model is not None,
        }


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    passes: PassOptions = field(default_factory=PassOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    target_options: TargetOptions = field(default_factory=TargetOptions)
    strict: bool = False  # a node off the target's provider fails the compile
    bisect: bool = False  # name the culprit pass even when verification passes
