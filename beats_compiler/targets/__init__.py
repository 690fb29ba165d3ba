"""Deployment targets as data: every module of this package that defines a
``PROFILE`` (a ``TargetProfile``) is a target, named by the profile.  A target
with a lowering step (gpu: fp16, npu: QDQ) also defines ``prepare`` and
``lower`` (see ``targets.lowering.Lowering``); ``pipeline`` calls them and
knows no target by name.  Adding a target is adding one module here and its
passes in ``passes/``."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import InputError
from .profile import PASS_OPTIONS, PipelineOptions, TargetProfile, build_passes

__all__ = [
    "FLAG_GROUPS",
    "FLAG_NAMES",
    "PASS_OPTIONS",
    "PipelineOptions",
    "TARGETS",
    "TargetProfile",
    "build_passes",
    "check_disabled",
    "check_flags",
    "get_target",
    "target_module",
    "target_passes",
]

def _discover() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        profile = getattr(module, "PROFILE", None)
        if isinstance(profile, TargetProfile):
            found[profile.name] = module
    return found


_MODULES = _discover()
TARGETS: dict[str, TargetProfile] = {name: m.PROFILE for name, m in _MODULES.items()}

# Target options (``options.TargetOptions`` fields) by their command-line flag,
# and the groups whose misuse is reported together (in this order).
FLAG_NAMES = {
    "input_shapes": "--input-shape",
    "calib": "--calib",
    "fp32_ops": "--fp32-ops",
    "precompile": "--precompile",
    "activation_type": "--activation-type",
    "weight_type": "--weight-type",
    "per_channel": "--per-channel",
    "min_cosine": "--min-cosine",
    "soc_model": "--soc-model",
}
FLAG_GROUPS = (
    ("precompile",),
    ("fp32_ops",),
    ("activation_type", "weight_type", "per_channel", "soc_model", "min_cosine"),
    ("input_shapes", "calib"),
)


def target_passes() -> list[str]:
    """Every pass some target runs, each once (the cpu pipeline's order first)."""
    return list(dict.fromkeys(n for p in TARGETS.values() for n in p.passes + p.post_passes))


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}; available: {', '.join(TARGETS)}") from None


def target_module(profile: TargetProfile) -> ModuleType:
    """The module that defines ``profile`` (its ``prepare``/``lower``)."""
    return _MODULES[profile.name]


def _joined(flags: list[str]) -> str:
    return flags[0] + " applies" if len(flags) == 1 else ", ".join(flags[:-1]) + f" and {flags[-1]} apply"


def check_flags(profile: TargetProfile, given: dict[str, bool]) -> None:
    """Bad input when an option this target does not take was given, naming
    the target(s) that take it."""
    used = [f for f in FLAG_NAMES if given.get(f)]
    if not profile.flags:
        if used:
            others = "|".join(n for n, p in TARGETS.items() if p.flags)
            raise InputError(f"{', '.join(FLAG_NAMES[f] for f in used)}: not used by target {profile.name} "
                             f"(see --target {others})")
        return
    for group in FLAG_GROUPS:
        if any(given.get(f) and f not in profile.flags for f in group):
            owners = "/".join(n for n, p in TARGETS.items() if group[0] in p.flags)
            raise InputError(f"{_joined([FLAG_NAMES[f] for f in group])} to the {owners} target only")


def check_disabled(profile: TargetProfile, disable) -> frozenset[str]:
    """The pass names to skip, each one a pass this target runs (its pipeline or its
    post-conversion passes); an unknown name is bad input naming the target's passes."""
    names = frozenset(disable or ())
    runs = list(dict.fromkeys(profile.passes + profile.post_passes))
    unknown = sorted(names - set(runs))
    if unknown:
        owners = sorted({t for n in unknown for t, prof in TARGETS.items() if n in prof.passes + prof.post_passes})
        where = f" (a pass of target {'/'.join(owners)})" if owners else ""
        raise InputError(f"--disable-pass {', '.join(unknown)}: not a pass of target {profile.name}{where}; "
                         f"`beats-compile --help` lists the passes")
    return names
