"""Import hooks that make the pinned CPU stack importable, installed before anything imports torchvision.

Two problems, both solved lazily (nothing is imported until the module in question is):

* torchvision 0.28.0 is the only release paired with torch 2.13.0 and its wheel is a CUDA build: on
  CPU torch its ``_C.so`` cannot load and ``import torchvision`` dies on the missing
  ``torchvision::nms`` schema. timm, open_clip and transformers all import torchvision, so before it is
  first imported we try the real extension and, only if that fails, declare the two op schemas it
  registers kernels for. Transforms and models work; ``ops.nms`` and ``io.decode_jpeg`` do not (we decode
  with PIL). On a GPU machine with a matching CUDA torch the extension loads and nothing is patched.
* evaclip's small research variants (``evaclip_eva02_tiny_*``) are registered as timm model names as
  soon as timm is imported, so an exported open_clip folder that names one of them loads with plain
  ``open_clip.create_model_and_transforms('local-dir:...')`` in any process of this environment.

``make setup`` writes a one-line ``.pth`` file into the venv so the hooks are active in every Python
process (clip_benchmark and open_clip_train subprocesses included); importing ``evaclip`` installs
them as well.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_installed = False
_torchvision_lib = None  # keeps the torch.library.Library alive for the life of the process


def _patch_torchvision_ops(spec) -> None:
    """Declare torchvision's op schemas if its compiled extension cannot be loaded."""
    global _torchvision_lib
    import torch

    locs = list(spec.submodule_search_locations or [])
    so = os.path.join(locs[0], "_C.so") if locs else None
    try:
        if so is None or not os.path.exists(so):
            raise OSError("no _C.so")
        torch.ops.load_library(so)
        return  # real extension (GPU build with matching CUDA torch, or a CPU build): nothing to do
    except (OSError, RuntimeError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    _torchvision_lib = lib


class _Loader(importlib.abc.Loader):
    """Wraps the real loader of one module to run a hook before or after it executes."""

    def __init__(self, real, before=None, after=None):
        self.real, self.before, self.after = real, before, after

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        if self.before:
            self.before(module.__spec__)
        self.real.exec_module(module)
        if self.after:
            self.after(module)


def _register_timm_variants(_module) -> None:
    # imported when timm is, not with this module: the shim is installed before torch, timm and evaclip.models load
    from evaclip.models.registry import register_timm_variants

    register_timm_variants()


class _Finder(importlib.abc.MetaPathFinder):
    hooks = {
        "torchvision": dict(before=_patch_torchvision_ops),
        "timm": dict(after=_register_timm_variants),
    }

    def find_spec(self, fullname, path=None, target=None):
        hook = self.hooks.get(fullname)
        if hook is None:
            return None
        # find the real spec with the other finders, then wrap its loader
        others = [f for f in sys.meta_path if f is not self]
        for finder in others:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, **hook)
                return spec
        return None


def install() -> None:
    """Install the hooks once per process; apply them directly to modules already imported."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.meta_path.insert(0, _Finder())
    if "timm" in sys.modules:
        _register_timm_variants(sys.modules["timm"])


def write_pth(site_packages: str | None = None) -> str:
    """Write ``evaclip_hooks.pth`` into site-packages so every interpreter of the venv installs the hooks."""
    import sysconfig

    target = site_packages or sysconfig.get_paths()["purelib"]
    path = os.path.join(target, "evaclip_hooks.pth")
    with open(path, "w") as f:
        # .pth lines starting with 'import' are executed at interpreter start; keep it cheap: no torch import
        f.write("import evaclip._shim as _s; _s.install()\n")
    return path


if __name__ == "__main__":
    print(write_pth())
