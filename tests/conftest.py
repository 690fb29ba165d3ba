import os

# Real exporters must never reach for a hub: everything here is offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): a worker per core, at most 4, and no more than
    one per 5 GiB of memory available (a worker running the exporters holds 2-3 GiB)."""
    from beats_compiler.runner import available_memory

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    avail = available_memory()
    return min(cores, 4) if avail is None else max(1, min(cores, 4, avail // (5 << 30)))


def pytest_collection_modifyitems(config, items):
    """The optional ORT on-device export (``artifacts --format ort``) needs a second
    environment, onnxruntime-training 1.19.2 in ``.venv-train``: its tests run only
    when the ``-m`` expression names ``ort_training`` (``pytest -m ort_training``
    makes that environment on first use).  Training itself needs nothing of it."""
    if "ort_training" in (config.getoption("markexpr") or ""):
        return
    keep, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("ort_training") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
