"""Export to open_clip's folder format, loadable with ``open_clip.create_model_and_transforms('local-dir:DIR')``.

    DIR/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}}
    DIR/open_clip_model.safetensors  the CustomTextCLIP state dict (``visual.trunk.*``, ``text.*``, ``logit_scale``)
    DIR/timm_image_tower.safetensors the image tower alone, a timm state dict:
                                     ``timm.create_model(<timm name>, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=...), num_classes=<embed dim>, global_pool='token')``
    DIR/text_tower.safetensors       with ``tower='text'``: open_clip's ``text.*`` keys alone
    DIR/README.md                    what the folder is and how to load it

``tower='both'`` (default) writes the open_clip model and the timm tower; ``'image'`` only the timm tower;
``'text'`` only the text tower.

The image tower is built by open_clip through timm by name (``vision_cfg.timm_model_name``); for evaclip's
own small variants that name is registered with timm when timm is imported in an evaclip environment.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from evaclip.models.convert import evaclip_to_open_clip
from evaclip.models.registry import Variant, get_variant

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_HF_POOLERS = {"mean": "mean_pooler"}  # open_clip's cls_pooler prefers BERT's pooler_output: not our "cls"


def open_clip_config(variant: Variant, text: Optional[Dict] = None, logit_bias: bool = False) -> Dict:
    """open_clip_config.json for a variant; ``text`` is the checkpoint meta's text-tower description."""
    text = text or {"kind": "clip", "act": "gelu"}
    if text.get("kind", "clip") == "hf":
        pooler = text.get("hf_pooler", "mean")
        if pooler not in _HF_POOLERS:
            raise ValueError(f"open_clip's HF text tower has no equivalent of the '{pooler}' pooler; "
                             f"export needs model.text.hf_pooler = 'mean'")
        path = os.path.abspath(text["hf_path"])
        text_cfg = {"hf_model_name": path, "hf_tokenizer_name": path, "hf_model_pretrained": False,
                    "hf_proj_type": "linear", "hf_pooler_type": _HF_POOLERS[pooler],
                    "context_length": variant.context_length}
    else:
        text_cfg = dict(variant.text)
    model_cfg = {
        "embed_dim": variant.embed_dim,
        "vision_cfg": {"image_size": variant.image_size, "timm_model_name": variant.timm_name,
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
        "text_cfg": text_cfg,
        "custom_text": True,
    }
    if text.get("act") == "quick_gelu" and text.get("kind", "clip") == "clip":
        model_cfg["quick_gelu"] = True
    if logit_bias:
        model_cfg["init_logit_bias"] = 0.0  # creates the parameter; the exported value is loaded over it
    preprocess = {"size": variant.image_size, "mean": list(variant.mean), "std": list(variant.std),
                  "interpolation": variant.interpolation, "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess, "evaclip": {"model": variant.name}}


def export_open_clip(state_dict: Dict[str, torch.Tensor], meta: Dict, out_dir: str, dtype: str = "fp32",
                     tower: str = "both", source: Optional[str] = None) -> Dict[str, str]:
    """Write the open_clip folder (and the timm image tower). ``meta``: the checkpoint's model description
    (``models.model_meta``; at least {"model": <variant name>}). ``tower``: both | image | text."""
    from safetensors.torch import save_file

    if tower not in ("both", "image", "text"):
        raise ValueError(f"--tower must be both, image or text, got {tower!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    variant = get_variant(meta["model"])
    text = dict(meta.get("text") or {})
    os.makedirs(out_dir, exist_ok=True)
    if text.get("kind") == "hf":
        # self-contained: the HF encoder's config.json and tokenizer files go into the export folder, which
        # open_clip then names as the HF model (architecture only: weights come from open_clip_model.safetensors)
        import transformers

        transformers.AutoConfig.from_pretrained(text["hf_path"], local_files_only=True).save_pretrained(out_dir)
        transformers.AutoTokenizer.from_pretrained(text["hf_path"], local_files_only=True).save_pretrained(out_dir)
        text["hf_path"] = os.path.abspath(out_dir)
    cfg = open_clip_config(variant, text, bool(meta.get("logit_bias")))
    sd = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in evaclip_to_open_clip(state_dict).items()}
    written = {}
    if tower == "both":  # a complete CustomTextCLIP: open_clip loads it strictly
        path = os.path.join(out_dir, "open_clip_model.safetensors")
        save_file(sd, path, metadata={"format": "pt", "evaclip_model": variant.name})
        written["open_clip_model"] = path
    if tower == "text":  # open_clip's text-tower keys (``text.*``) alone
        path = os.path.join(out_dir, "text_tower.safetensors")
        save_file({k: v for k, v in sd.items() if k.startswith("text.")}, path, metadata={"format": "pt"})
        written["text_tower"] = path
    if source:
        cfg["evaclip"]["source"] = source
    cfg["evaclip"]["tower"] = tower
    path = os.path.join(out_dir, "open_clip_config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    written["config"] = path
    if tower in ("both", "image"):
        trunk = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
        path = os.path.join(out_dir, "timm_image_tower.safetensors")
        save_file(trunk, path, metadata={"format": "pt", "timm_model": variant.timm_name})
        written["timm_image_tower"] = path
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_README.format(name=variant.name, timm=variant.timm_name, dim=variant.embed_dim, dtype=dtype,
                               tower=tower, src=source or "-"))
    return written


_README = """# {name} exported by evaclip

- source: {src}
- towers: {tower}; dtype: {dtype}

```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<this folder>")
tokenizer = open_clip.get_tokenizer("local-dir:<this folder>")
```

The image tower alone is a timm model ({timm}):

```python
import timm
tower = timm.create_model("{timm}", pretrained=True, num_classes={dim}, global_pool="token",
                          pretrained_cfg_overlay=dict(file="<this folder>/timm_image_tower.safetensors"))
```
(`evaclip_*` timm names are registered when timm is imported in an environment with evaclip installed.)
"""


@torch.no_grad()
def verify_export(export_dir: str, state_dict: Dict[str, torch.Tensor], meta: Dict, n: int = 4,
                  seed: int = 0) -> Dict[str, float]:
    """Load the export with open_clip (and the tower with timm) and compare embeddings with ``state_dict``
    loaded into an evaclip model (fp32). Returns the max abs differences."""
    import open_clip
    import timm

    from evaclip.models import build_from_meta

    variant = get_variant(meta["model"])
    ours = build_from_meta(meta)
    ours.load_state_dict({k: v.float() for k, v in state_dict.items()})
    ours.eval()
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    oc.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, variant.image_size, variant.image_size, generator=g)
    texts = tok(["a photo of a red circle", "a blue square in the top left", "two dogs", "an empty room"][:n])
    diffs = {
        "image": (ours.encode_image(images, normalize=False) - oc.encode_image(images).float()).abs().max().item(),
        "text": (ours.encode_text(texts, normalize=False) - oc.encode_text(texts).float()).abs().max().item(),
    }
    tower_file = os.path.join(export_dir, "timm_image_tower.safetensors")
    if os.path.exists(tower_file):
        t = timm.create_model(variant.timm_name, pretrained=True, num_classes=variant.embed_dim, global_pool="token",
                              pretrained_cfg_overlay=dict(file=tower_file)).eval()
        diffs["timm_image"] = (ours.encode_image(images, normalize=False) - t(images).float()).abs().max().item()
    return diffs
