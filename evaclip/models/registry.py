"""Model architectures as data: one TOML file per architecture (``launch/models/*.toml``, shipped in the
package; a user's own file works the same way).

    name = "EVA02-B-16"
    embed_dim = 512                        # CLIP embedding width
    timm_name = "eva02_base_patch16_clip_224"   # the timm model the image tower equals ("" for a new one)
    [vision]   img_size = 224, patch_size = 16, embed_dim = 768, ...   (timm ``Eva`` kwargs)
    [text]     context_length = 77, width = 512, heads = 8, layers = 12 (CLIP ``TextTransformer`` kwargs)
    [preprocess] mean = [...], std = [...], interpolation = "bicubic"

Names follow open_clip's model configs. A ``Variant`` is the parsed file; ``Variant.to_dict()`` is the record
a checkpoint and an export carry, so a model is rebuilt from them alone (``Variant.from_dict``). Our own
small variants (``*-Ti-*``) are registered as timm model names (``register_timm_variants``) so open_clip can
build their image tower by name from an export.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Dict, List

from evaclip.files import ConfigError, builtin_names, find, from_dict, is_name, load_typed
from evaclip.models.eva_vit import Eva
from evaclip.models.text import TextTransformer

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass
class Preprocess:
    mean: List[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    std: List[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    interpolation: str = field(default="bicubic", metadata={"choices": INTERPOLATIONS})


@dataclass
class Variant:
    """One CLIP architecture. ``vision`` are ``Eva`` kwargs; ``text`` are ``TextTransformer`` kwargs."""

    name: str = ""
    embed_dim: int = 0
    description: str = ""
    timm_name: str = ""  # the timm model whose architecture (and state dict) the image tower equals, if any
    register_in_timm: bool = False  # True for evaclip's own variants, registered with timm under timm_name
    published_params: float = 0.0  # total (image + text), open_clip's docs/model_profile.csv (0: unknown)
    gflops: float = 0.0  # forward FLOPs per image-text pair (same profile; 2 FLOPs per MAC)
    vision: Dict = field(default_factory=dict)
    text: Dict = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=Preprocess)

    @property
    def image_size(self) -> int:
        return self.vision["img_size"]

    @property
    def context_length(self) -> int:
        return self.text.get("context_length", 77)

    @property
    def mean(self):
        return tuple(self.preprocess.mean)

    @property
    def std(self):
        return tuple(self.preprocess.std)

    @property
    def interpolation(self) -> str:
        return self.preprocess.interpolation

    def to_dict(self) -> Dict:
        """The architecture record written into checkpoints and exports (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict, where: str = "model") -> "Variant":
        try:
            v = from_dict(cls, data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        v.check(where)
        return v

    def check(self, where: str) -> None:
        """Names and kinds of the tower kwargs against the towers' signatures: a typo names the key."""

        if not self.name or self.embed_dim < 1:
            raise ConfigError(f"{where}: a model file needs name and embed_dim (> 0)")
        # set by the factory from the config (patch dropout, kernel, activation) or by the CLIP head
        fixed = {"vision": {"num_classes", "global_pool", "patch_drop_rate", "attn_impl"},
                 "text": {"output_dim", "act", "attn_impl"}}
        for section, ctor, required in [("vision", Eva, ("img_size", "patch_size", "embed_dim", "depth", "num_heads")),
                                        ("text", TextTransformer, ("width", "heads", "layers"))]:
            kwargs = getattr(self, section)
            params = inspect.signature(ctor.__init__).parameters
            allowed = [p for p in params if p != "self" and p not in fixed[section]]
            for k, val in kwargs.items():
                if k not in allowed:
                    raise ConfigError(f"{where}: unknown key '{section}.{k}'; valid keys in [{section}]: "
                                      f"{', '.join(allowed)}")
                default = params[k].default
                kinds = (int, float) if isinstance(default, float) else (type(default),)
                if default is not None and not isinstance(default, (tuple, list)) and \
                        (not isinstance(val, kinds) or (isinstance(val, bool) and not isinstance(default, bool))):
                    raise ConfigError(f"{where}: {section}.{k}: expected {type(default).__name__}, got {val!r}")
            missing = [k for k in required if k not in kwargs]
            if missing:
                raise ConfigError(f"{where}: [{section}] needs {', '.join(missing)}")
        if self.vision["embed_dim"] % self.vision["num_heads"] or self.text["width"] % self.text["heads"]:
            raise ConfigError(f"{where}: a tower's width must be divisible by its number of heads")
        if self.vision["img_size"] % self.vision["patch_size"]:
            raise ConfigError(f"{where}: vision.img_size must be a multiple of vision.patch_size")


def load_model_file(path: str) -> Variant:
    """A model TOML file -> ``Variant`` (strict, errors name the file and key)."""
    v = load_typed(Variant, path)
    v.check(path)
    return v


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> Variant:
    return load_model_file(find("model", name))


def list_models() -> List[str]:
    """Names of the built-in architectures (``launch/models/*.toml``)."""
    return builtin_names("model")


def builtin_variants() -> Dict[str, Variant]:
    return {n: _builtin(n) for n in list_models()}


def get_variant(name: str, model_dir: str = "") -> Variant:
    """An architecture by built-in name, by a name in ``model_dir`` (a folder of model files) or by file path."""
    if is_name(name) and not (model_dir and os.path.exists(os.path.join(model_dir, name + ".toml"))):
        if name not in list_models():
            raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(list_models())}"
                              + (f"; none named so in {model_dir}" if model_dir else "")
                              + " (or give a model TOML file)")
        return _builtin(name)
    return load_model_file(find("model", name, extra_dirs=(model_dir,) if model_dir else ()))


_registered = set()
# timm reads a registering module's ``default_cfgs`` for the pretrained cfg (input size, mean/std) of a name
default_cfgs: Dict[str, Dict] = {}


def timm_pretrained_cfg(v: Variant) -> Dict:
    """timm's pretrained cfg of an architecture (input size, crop, interpolation, mean / std)."""
    return dict(url="", num_classes=v.embed_dim, input_size=(3, v.image_size, v.image_size), pool_size=None,
                crop_pct=1.0, interpolation=v.interpolation, mean=v.mean, std=v.std, first_conv="patch_embed.proj",
                classifier="head", license="apache-2.0")


def register_timm_variants() -> None:
    """Register our own built-in variants with timm so ``timm.create_model(<name>)`` (and open_clip) can build them.

    ``pretrained=True`` works with a local file: ``pretrained_cfg_overlay=dict(file=<export>/timm_image_tower/model.safetensors)``.
    """
    from timm.models import register_model
    from timm.models._registry import is_model

    for v in builtin_variants().values():
        if not v.register_in_timm or v.timm_name in _registered or is_model(v.timm_name):
            continue

        def _fn(pretrained: bool = False, _args=v.vision, _name=v.timm_name, **kwargs):
            from timm.models.eva import _create_eva

            # CLIP towers pool the class token (timm's own *_clip_* EVA entrypoints say so too)
            return _create_eva(_name, pretrained=pretrained, **{"global_pool": "token", **_args, **kwargs})

        _fn.__name__ = v.timm_name
        _fn.__module__ = __name__
        default_cfgs[v.timm_name] = timm_pretrained_cfg(v)
        register_model(_fn)
        _registered.add(v.timm_name)
