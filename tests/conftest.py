import os

# Real exporters must never reach for a hub: everything here is offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
