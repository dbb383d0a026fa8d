"""evaclip: large-batch contrastive image-text (CLIP) training in the style of EVA-CLIP.

The import is cheap on purpose (the venv's ``.pth`` hook imports this package in every interpreter):
heavy modules load on first attribute access.
"""
from evaclip import _shim

_shim.install()

__version__ = "0.1.0"

_LAZY = {
    "create_model": "evaclip.models",
    "list_models": "evaclip.models",
    "load_checkpoint": "evaclip.checkpoint",
    "export_open_clip": "evaclip.export.open_clip",
    "ExperimentConfig": "evaclip.config",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evaclip' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
