"""Every pass of this package, by its ``name``.

A ``Pass`` subclass defined in a module of this package registers itself when
its class is created (``Pass.__init_subclass__`` calls ``register``); the
first lookup imports every module of the package, so adding a pass is adding
one file.  Two classes may not share a name.  Passes defined elsewhere (a
test's toy pass, a driver's stand-in for a real pass) are not registered: they
run in a ``PassManager`` like any other, without touching this table.
"""

from __future__ import annotations

import importlib
import pkgutil
__all__ = ["get_pass", "pass_names", "register"]

_PACKAGE = __name__.rpartition(".")[0]
_PASSES: dict[str, type] = {}
_discovered = False


def register(cls: type) -> None:
    """Record ``cls`` under its ``name`` (classes outside this package, and
    unnamed base classes, are ignored); a second class with the same name raises."""
    module = cls.__module__
    if not cls.name or not (module == _PACKAGE or module.startswith(_PACKAGE + ".")):
        return
    other = _PASSES.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (module, cls.__qualname__):
        raise ValueError(f"pass name {cls.name!r} is taken twice: {other.__module__}.{other.__qualname__} "
                         f"and {module}.{cls.__qualname__}")
    _PASSES[cls.name] = cls  # the same class again (a module reloaded): the new object


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.walk_packages(package.__path__, _PACKAGE + "."):
        importlib.import_module(info.name)  # a module that fails to import raises here, not silently
    _discovered = True


def get_pass(name: str) -> type:
    """The pass class registered as ``name``; KeyError naming the known ones."""
    _discover()
    try:
        return _PASSES[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(pass_names())}") from None


def pass_names() -> list[str]:
    """Names of every pass of the package, sorted."""
    _discover()
    return sorted(_PASSES)
