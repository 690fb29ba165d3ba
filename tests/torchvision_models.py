"""Moved to fixtures/torchvision_models.py (temporary re-export while helpers move over)."""
from fixtures.torchvision_models import *  # noqa: F401,F403
from fixtures.torchvision_models import export_mobilenet_v3_small, import_torchvision, mobilenet_v3_small_module  # noqa: F401
