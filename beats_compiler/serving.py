"""Serving one adapter base with many ``.onnx_adapter`` fine-tunes on ONNX Runtime.

``AdapterSession`` loads an adapter base (``beats-compile adapter-base``) once
and activates one adapter (``beats-compile export-adapter``) per call, in
onnxruntime's own terms: ``.session`` is the plain ``InferenceSession`` and
``run_options(name)`` returns a plain ``ort.RunOptions`` with that adapter
active, which the caller may pass to ``session.run`` directly::

    s = AdapterSession("model.base.onnx")
    s.load_adapter("support", "support.onnx_adapter")
    s.load_adapter("legal", "legal.onnx_adapter")
    y = s.run(None, {"x": x}, adapter="legal")
    ro = s.run_options("support")            # or: ort.RunOptions, for session.run
    y = s.session.run(None, {"x": x}, ro)

What it guards against (ONNX Runtime catches none of these):

- a partial adapter (a tensor missing: only A of A/B, or D without V) would mix
  with the base's defaults; an adapter of another base (unknown names, wrong
  shapes or dtypes, another rank): ``load_adapter`` refuses both with a
  one-line ``InputError`` naming the first problem (``adapters.check_fit``, the
  check ``export-adapter`` makes);
- two adapters active in one RunOptions (ORT applies one of them to the names
  they share, silently): ``run_options`` activates exactly one adapter per
  RunOptions and marks it (run config entry ``beats.adapter``); a RunOptions
  that carries the mark of another adapter is refused.  A RunOptions on which
  the caller called ``add_active_adapter`` directly carries no mark: ORT has no
  way to list a RunOptions' active adapters, so that case cannot be detected;
- feeds naming adapter parameters (an active adapter silently overrides an
  explicit feed of the same name): ``run`` refuses them (``.session.run`` is
  there for feeding parameters by hand);
- a ``LoraAdapter`` garbage-collected while a RunOptions still refers to it
  (ORT then reads freed memory: wrong results): the session keeps every loaded
  adapter until ``unload_adapter``; every RunOptions that ``run_options``
  activated an adapter on keeps that adapter alive for as long as it lives
  itself (also past the ``AdapterSession``), and ``unload_adapter`` refuses
  while such a RunOptions is still referenced, so that after an unload nothing
  can apply the adapter any more;
- ``run_with_iobinding`` ignores active adapters (ORT only logs a warning):
  ``AdapterSession.run_with_iobinding`` raises instead.

Threads: the ORT session's ``run`` is thread-safe; the adapter table is
guarded by a lock, so ``load_adapter``, ``unload_adapter``, ``run_options``
and ``run`` may be called from several threads at once.  One RunOptions may be
shared by concurrent runs (ORT reads it only).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import onnx

from .adapters import base_parameters, check_fit
from .errors import InputError, short_message

MARK = "beats.adapter"  # run config entry: the name of the adapter a RunOptions has active

Shape = list  # of int (fixed) or str (symbolic: "beats_rank")


def _ort():
    import onnxruntime as ort

    return ort


def _keep(*_objects) -> None:
    """A ``weakref.finalize`` callback that does nothing: the finalizer's
    arguments are what it is for (kept alive until the RunOptions dies)."""


@dataclass
class _Loaded:
    path: Path
    lora: Any  # ort.LoraAdapter
    parameters: dict[str, tuple[str, list[int]]]
    issued: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # RunOptions given out by run_options
    own: Any = None  # the RunOptions run() uses for this adapter (never given out)


def _metadata_model(meta: Mapping[str, str]) -> onnx.ModelProto:
    """A model holding only ``meta`` as its metadata_props: what ``base_parameters``
    and ``check_fit`` read of a base (the session has the base itself)."""
    m = onnx.ModelProto()
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    return m


class AdapterSession:
    """One adapter base on ONNX Runtime, any number of ``.onnx_adapter`` files
    loaded by name, one activated per call (see the module's doc).

    ``base``: a path (or the model's bytes).  ``sess_options`` and
    ``providers`` go to ``ort.InferenceSession`` as they are; without
    ``sess_options`` the session logs errors only (ORT warns about every
    initializer that is also a graph input, which an adapter base is made of).
    Adapters are loaded on the CPU (``ort.LoraAdapter`` memory-maps the file).
    """

    def __init__(self, base: str | os.PathLike | bytes, sess_options=None, providers: Sequence | None = None):
        ort = _ort()
        self._where = "the base" if isinstance(base, (bytes, bytearray)) else Path(base).name
        if not isinstance(base, (bytes, bytearray)) and not Path(base).is_file():
            raise InputError(f"{base}: adapter base not found")
        if sess_options is None:
            sess_options = ort.SessionOptions()
            sess_options.log_severity_level = 3
        src = bytes(base) if isinstance(base, (bytes, bytearray)) else str(base)
        try:
            self.session = ort.InferenceSession(src, sess_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own classes (Fail, InvalidGraph, ...)
            raise InputError(f"{self._where}: ONNX Runtime cannot load it ({short_message(exc)})") from None
        self._meta = _metadata_model(self.session.get_modelmeta().custom_metadata_map)
        params = base_parameters(self._meta, where=self._where)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        lost = [n for n in params if n not in overridable]
        if lost:
            raise InputError(f"{self._where}: adapter parameter '{lost[0]}' is not an overridable initializer "
                             "(a graph input with a default) of the session: the base is broken")
        self._parameters = params
        self._adapters: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what is loaded

    @property
    def parameters(self) -> Mapping[str, tuple[str, Shape]]:
        """Adapter parameter name -> (dtype, shape); a str dim is symbolic (the rank)."""
        return MappingProxyType(self._parameters)

    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters, in load order."""
        with self._lock:
            return list(self._adapters)

    def check_adapter(self, path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
        """The parameters (name -> (dtype, shape)) of the ``.onnx_adapter`` at
        ``path`` if it fits this base, else a one-line ``InputError`` naming
        the first problem (``adapters.check_fit``, as ``export-adapter``
        checks): a missing tensor (a partial adapter), a name the base lacks,
        a shape other than its record's (another rank included) or another
        dtype.  Loads nothing."""
        ort = _ort()
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: adapter file not found")
        try:
            fmt = ort.AdapterFormat.read_adapter(str(p))
            values = dict(fmt.get_parameters())
        except Exception as exc:
            raise InputError(f"{p}: not a readable .onnx_adapter file ({short_message(exc)})") from None
        check_fit(values, self._meta, what=p.name, where=self._where)
        return {n: (self._parameters[n][0], [int(d) for d in v.shape()]) for n, v in values.items()}

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Check the ``.onnx_adapter`` at ``path`` against the base
        (``check_adapter``) and load it as ``name``.  The session keeps the
        ``ort.LoraAdapter`` until ``unload_adapter(name)``."""
        if not isinstance(name, str) or not name:
            raise InputError(f"an adapter name must be a non-empty string, not {name!r}")
        with self._lock:
            if name in self._adapters:
                raise InputError(f"adapter '{name}' is already loaded (from {self._adapters[name].path.name}); "
                                 "unload it first")
        params = self.check_adapter(path)
        lora = _ort().LoraAdapter()
        try:
            lora.Load(str(path))
        except Exception as exc:
            raise InputError(f"{Path(path)}: ONNX Runtime cannot load the adapter ({short_message(exc)})") from None
        with self._lock:
            if name in self._adapters:  # loaded by another thread meanwhile
                raise InputError(f"adapter '{name}' is already loaded (from {self._adapters[name].path.name}); "
                                 "unload it first")
            self._adapters[name] = _Loaded(Path(path), lora, params)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``.  Refused while a RunOptions that
        ``run_options(name)`` returned is still referenced (drop it first):
        after an unload, nothing can apply the adapter any more."""
        with self._lock:
            entry = self._get(name)
            live = len(entry.issued)
            if live:
                raise InputError(f"adapter '{name}' is still active in {live} RunOptions returned by run_options(); "
                                 "drop them (del) before unloading it")
            del self._adapters[name]

    def _get(self, name: str) -> _Loaded:
        try:
            return self._adapters[name]
        except (KeyError, TypeError):
            loaded = ", ".join(self._adapters) or "none"
            raise InputError(f"no adapter '{name}' is loaded (loaded: {loaded})") from None

    # ------------------------------------------------------------------ activation

    def run_options(self, name: str, run_options=None):
        """An ``ort.RunOptions`` with adapter ``name`` active, exactly one:
        a new one, or ``run_options`` (the caller's, with its own settings)
        with the adapter added; ORT cannot remove an active adapter, so a
        RunOptions that already has another adapter active through this
        method is refused (one that got one by ``add_active_adapter`` directly
        cannot be detected).  Asking again for the same adapter on the same
        RunOptions returns it unchanged.  The RunOptions keeps the adapter
        alive for as long as it lives itself."""
        ort = _ort()
        if run_options is not None and not isinstance(run_options, ort.RunOptions):
            raise InputError(f"run_options must be an onnxruntime.RunOptions, not {type(run_options).__name__}")
        with self._lock:
            entry = self._get(name)
            ro = ort.RunOptions() if run_options is None else run_options
            if ro in entry.issued:
                return ro
            self._activate(ro, name, entry)
            entry.issued.add(ro)
            return ro

    @staticmethod
    def _activate(ro, name: str, entry: _Loaded) -> None:
        prior = _mark(ro)
        if prior is not None:
            raise InputError(f"these RunOptions already have adapter '{prior}' active: ONNX Runtime cannot "
                             f"remove it and would apply both; use one RunOptions per adapter")
        ro.add_run_config_entry(MARK, name)
        ro.add_active_adapter(entry.lora)
        weakref.finalize(ro, _keep, entry.lora)  # the adapter lives as long as the RunOptions

    def _options_for(self, adapter: str | None, run_options):
        if adapter is None:
            return run_options
        if run_options is not None:
            return self.run_options(adapter, run_options)
        with self._lock:
            entry = self._get(adapter)
            if entry.own is None:
                ro = _ort().RunOptions()
                self._activate(ro, adapter, entry)
                entry.own = ro
            return entry.own

    def _check_feeds(self, feeds: Mapping[str, Any]) -> None:
        named = [n for n in feeds if n in self._parameters]
        if named:
            raise InputError(f"the feeds name adapter parameter '{named[0]}': an active adapter would silently "
                             "override it; load the values as an adapter, or feed them to .session.run directly")

    # ------------------------------------------------------------------ running

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], adapter: str | None = None,
            run_options=None) -> list:
        """``session.run`` with adapter ``adapter`` active (None: the base alone,
        or whatever adapter ``run_options`` carries).  With both, the adapter is
        added to ``run_options`` (see ``run_options``).  Feeds that name
        adapter parameters are refused."""
        self._check_feeds(feeds)
        return self.session.run(output_names, feeds, self._options_for(adapter, run_options))

    def run_with_ort_values(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any],
                            adapter: str | None = None, run_options=None) -> list:
        """``run`` with ``ort.OrtValue`` feeds and results (``session.run_with_ort_values``)."""
        self._check_feeds(feeds)
        return self.session.run_with_ort_values(output_names, feeds, self._options_for(adapter, run_options))

    def run_with_iobinding(self, *args, **kwargs):
        """Refused: ONNX Runtime ignores active adapters under
        ``run_with_iobinding`` (it only logs a warning)."""
        raise InputError("run_with_iobinding ignores adapters in ONNX Runtime (it only logs a warning): use run() or "
                         "run_with_ort_values() with an adapter, or .session.run_with_iobinding for the base alone")


def _mark(ro) -> str | None:
    """The adapter ``run_options`` activated on ``ro``, or None."""
    try:
        return ro.get_run_config_entry(MARK)
    except RuntimeError:  # "RunOptions does not have configuration with key"
        return None
