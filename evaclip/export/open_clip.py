"""Export to open_clip's folder format, loadable with ``open_clip.create_model_and_transforms('local-dir:DIR')``.

    DIR/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}, "evaclip": {"model": <record>}}
    DIR/open_clip_model.safetensors  the CustomTextCLIP state dict (``visual.trunk.*``, ``text.*``, ``logit_scale``)
    DIR/timm_image_tower/            the image tower alone as a timm folder (config.json + model.safetensors):
                                     ``timm.create_model('local-dir:DIR/timm_image_tower', pretrained=True)``
    DIR/text_tower/text.safetensors  with ``tower='text'``: open_clip's ``text.*`` keys alone (in a subfolder:
                                     open_clip's ``local-dir:`` would load any top-level .safetensors strictly)
    DIR/README.md                    what the folder is and how to load it

``tower='both'`` (default) writes the open_clip model and the timm tower; ``'image'`` only the timm tower;
``'text'`` only the text tower. ``evaclip.model`` in the config is the model record (``models.model_record``):
the architecture and knobs, so the exact evaclip model is rebuilt from the export alone.

open_clip builds the image tower through timm (``vision_cfg.timm_model_name``): by its timm name when the
architecture has one (evaclip's own ``evaclip_*`` names are registered with timm when evaclip is imported,
which the venv's import hook does in every process), else, for a user-defined architecture, from the
export's own ``timm_image_tower`` folder by absolute path (``local-dir:``), which needs no registration;
moving such an export means exporting it again.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from evaclip.errors import UserError
from evaclip.files import replace_dir
from evaclip.models import model_from_record, record_variant
from evaclip.models.convert import evaclip_to_open_clip
from evaclip.models.eva_vit import Eva
from evaclip.models.registry import Variant, timm_pretrained_cfg

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TIMM_DIR = "timm_image_tower"
DECODER_DIR = "caption_decoder"  # a CoCa export: the decoder and its pooler (`evaclip caption` loads them)
DECODER_KEYS = ("decoder.", "decoder_pool.")


_HF_POOLERS = {"mean": "mean_pooler"}  # open_clip's cls_pooler prefers BERT's pooler_output: not our "cls"


def timm_tower_config(variant: Variant, num_classes: Optional[int] = None) -> Dict:
    """timm's ``config.json`` for the image tower: the architecture and every Eva kwarg (timm ``local-dir:``).
    ``num_classes``: the head's width (default: the CLIP projection's; 0 for a MIM student, which has none)."""
    num_classes = variant.embed_dim if num_classes is None else num_classes
    import inspect

    params = inspect.signature(Eva.__init__).parameters
    args = {k: p.default for k, p in params.items() if k not in ("self", "patch_drop_rate", "attn_impl")}
    args.update(variant.vision, num_classes=num_classes, global_pool="token")
    # any timm Eva entrypoint builds it once every kwarg is given; the variant's own when it has one
    arch = variant.timm_name or "eva02_base_patch16_clip_224"
    return {"architecture": arch, "num_classes": num_classes, "model_args": args,
            "pretrained_cfg": dict(timm_pretrained_cfg(variant), architecture=arch, num_classes=num_classes)}


def open_clip_config(variant: Variant, text: Dict, logit_bias: bool = False,
                     timm_model_name: Optional[str] = None) -> Dict:
    """open_clip_config.json's model and preprocess parts; ``text``: the record's ``[model.text]`` section."""
    if text["kind"] == "hf":
        pooler = text["hf_pooler"]
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
        "vision_cfg": {"image_size": variant.image_size, "timm_model_name": timm_model_name or variant.timm_name,
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
        "text_cfg": text_cfg,
        "custom_text": True,
    }
    if text["act"] == "quick_gelu" and text["kind"] == "clip":
        model_cfg["quick_gelu"] = True
    if logit_bias:
        model_cfg["init_logit_bias"] = 0.0  # creates the parameter; the exported value is loaded over it
    preprocess = {"size": variant.image_size, "mean": list(variant.mean), "std": list(variant.std),
                  "interpolation": variant.interpolation, "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def check_target(out_dir: str, replace: bool) -> None:
    """An export never mixes with what a folder holds: a non-empty target needs ``replace`` (it is then replaced
    whole). Callers check before a long consolidation; ``export_open_clip`` checks again."""

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not replace:
        raise UserError(f"--out {out_dir} is not empty; export into a new folder or replace it whole (--force)")


def export_open_clip(state_dict: Dict[str, torch.Tensor], record: Dict, out_dir: str, dtype: str = "fp32",
                     tower: str = "both", source: Optional[str] = None, replace: bool = False) -> Dict[str, str]:
    """Write the open_clip folder (and the timm image tower). ``record``: the checkpoint's model record
    (``models.model_record``). ``tower``: both | image | text.

    The folder is written under a temporary name and renamed into place, so it never mixes two exports;
    a non-empty ``out_dir`` is refused unless ``replace`` (then it is replaced whole)."""
    import copy
    import shutil

    if tower not in ("both", "image", "text"):
        raise ValueError(f"--tower must be both, image or text, got {tower!r}")
    if "mim" in record and tower != "image":
        raise ValueError("a MIM run has an image tower only: export it with --tower image")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    final = os.path.abspath(out_dir)
    check_target(out_dir, replace)
    tmp = final.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    # a distillation head is training-only: the export is the CLIP without it; a CoCa's decoder and its
    # pooler go into their own folder (open_clip's CustomTextCLIP has no place for them)
    decoder = {k: v for k, v in state_dict.items() if k.startswith(DECODER_KEYS)}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("distill_head.", *DECODER_KEYS))}
    coca = record.get("coca")
    record = {k: v for k, v in record.items() if k not in ("distill", "coca")}
    written = _write_export(state_dict, copy.deepcopy(record), tmp, final, dtype, tower, source,
                            (decoder, coca) if coca and tower == "both" else None)
    replace_dir(tmp, final)
    return {k: v.replace(tmp, final) for k, v in written.items()}


def _write_decoder(decoder: Dict[str, torch.Tensor], coca: Dict, out_dir: str, dtype: str) -> str:
    """``caption_decoder/``: the CoCa decoder's weights (evaclip keys ``decoder.*``, ``decoder_pool.*``) and its
    shape (``config.json``: the model record's ``coca`` part), what `evaclip caption` adds to the exported CLIP."""
    from safetensors.torch import save_file

    folder = os.path.join(out_dir, DECODER_DIR)
    os.makedirs(folder)
    save_file({k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in decoder.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"coca": coca}, f, indent=2)
    return folder


def _write_export(state_dict, record, out_dir: str, final: str, dtype: str, tower: str, source,
                  caption: Optional[Tuple[Dict[str, torch.Tensor], Dict]] = None) -> Dict[str, str]:
    """The export's files into ``out_dir``; paths written into configs name ``final``, where it will live.
    ``caption``: a CoCa's (decoder weights, coca record) for ``caption_decoder/``."""
    from safetensors.torch import save_file

    variant = record_variant(record)
    text = record["config"]["text"]
    os.makedirs(out_dir)
    if text["kind"] == "hf":
        # self-contained: the HF encoder's config.json and tokenizer files go into the export folder, which
        # open_clip then names as the HF model (architecture only: weights come from open_clip_model.safetensors)
        import transformers

        transformers.AutoConfig.from_pretrained(text["hf_path"], local_files_only=True).save_pretrained(out_dir)
        transformers.AutoTokenizer.from_pretrained(text["hf_path"], local_files_only=True).save_pretrained(out_dir)
        text["hf_path"] = final
    timm_dir = os.path.join(out_dir, TIMM_DIR)
    cfg = open_clip_config(variant, text, record["config"]["use_logit_bias"],
                           None if variant.timm_name else f"local-dir:{os.path.join(final, TIMM_DIR)}")
    sd = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in evaclip_to_open_clip(state_dict).items()}
    written = {}
    if tower == "both":  # a complete CustomTextCLIP: open_clip loads it strictly
        path = os.path.join(out_dir, "open_clip_model.safetensors")
        save_file(sd, path, metadata={"format": "pt", "evaclip_model": variant.name})
        written["open_clip_model"] = path
    if tower == "text":  # open_clip's text-tower keys (``text.*``) alone
        os.makedirs(os.path.join(out_dir, "text_tower"))
        path = os.path.join(out_dir, "text_tower", "text.safetensors")
        save_file({k: v for k, v in sd.items() if k.startswith("text.")}, path, metadata={"format": "pt"})
        written["text_tower"] = path
    os.makedirs(timm_dir, exist_ok=True)  # the architecture always (open_clip builds a user tower from it)
    with open(os.path.join(timm_dir, "config.json"), "w") as f:
        json.dump(timm_tower_config(variant, 0 if "mim" in record else None), f, indent=2)
    if tower in ("both", "image"):
        trunk = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
        save_file(trunk, os.path.join(timm_dir, "model.safetensors"), metadata={"format": "pt"})
        written["timm_image_tower"] = timm_dir
    cfg["evaclip"] = {"model": record, "tower": tower, "dtype": dtype, "source": source or ""}
    path = os.path.join(out_dir, "open_clip_config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    written["config"] = path
    if caption:
        written["caption_decoder"] = _write_decoder(*caption, out_dir, dtype)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_README["mim" if "mim" in record else tower].format(name=variant.name, dtype=dtype, tower=tower, src=source or "-")
                + (_LOAD_DECODER if caption else ""))
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, names in os.walk(out_dir):  # safetensors writes 0600: exports are for sharing
        for n in names:
            os.chmod(os.path.join(dirpath, n), 0o666 & ~umask)
    return written


_HEAD = """# {name} exported by evaclip

- source: {src}
- towers: {tower}; dtype: {dtype}
"""
_LOAD_BOTH = """
```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<this folder>")
tokenizer = open_clip.get_tokenizer("local-dir:<this folder>")
```
"""
_LOAD_IMAGE = """
The image tower as a timm model (architecture and weights in `timm_image_tower/`):

```python
import timm
tower = timm.create_model("local-dir:<this folder>/timm_image_tower", pretrained=True)
```
(evaclip's own `evaclip_*` timm names are registered when evaclip is imported; its venv does that in every
process.)
"""
_LOAD_TEXT = """
The text tower alone: `text_tower/text.safetensors` holds open_clip's `text.*` weights. Build the open_clip model
from this folder's config (its image tower stays randomly initialised) and load them:

```python
import open_clip
from safetensors.torch import load_file
model = open_clip.create_model("local-dir:<this folder>")
missing, unexpected = model.load_state_dict(load_file("<this folder>/text_tower/text.safetensors"), strict=False)
tokenizer = open_clip.get_tokenizer("local-dir:<this folder>")
text_features = model.encode_text(tokenizer(["a photo of a dog"]))
```
"""
_LOAD_MIM = """
The image tower of a masked-image-modeling run (the student, without the MIM head), as a timm model with no
head (`num_classes=0`; `timm_image_tower/`):

```python
import timm
tower = timm.create_model("local-dir:<this folder>/timm_image_tower", pretrained=True)
```
A CLIP run starts from it with `model.vision.init = "<this folder>"` (or the MIM run dir itself).
"""
_LOAD_DECODER = """
## Caption decoder (a CoCa run)

`caption_decoder/` holds the CoCa decoder and the attentional pooler that feeds it (`model.safetensors`, evaclip
keys `decoder.*`, `decoder_pool.*`; `config.json`, their shape). open_clip loads the CLIP above without them:
open_clip's own `CoCa` needs its ViT with `output_tokens` and its `TimmModel` returns pooled features only, so it
cannot run this decoder on the EVA tower. evaclip can:

```
evaclip caption --model <this folder> image.jpg more_images/ shards-{{000..009}}.tar
```
"""
_README = {"mim": _HEAD + _LOAD_MIM, "both": _HEAD + _LOAD_BOTH + _LOAD_IMAGE, "image": _HEAD + _LOAD_IMAGE, "text": _HEAD + _LOAD_TEXT}


@torch.no_grad()
def verify_export(export_dir: str, state_dict: Dict[str, torch.Tensor], record: Dict, n: int = 4,
                  seed: int = 0) -> Dict[str, float]:
    """Load the export with open_clip (and the tower with timm) and compare embeddings with ``state_dict``
    loaded into an evaclip model (fp32). Returns the max abs differences."""
    import open_clip
    import timm

    variant = record_variant(record)
    ours = model_from_record(record)
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
    timm_dir = os.path.join(export_dir, TIMM_DIR)
    if os.path.isdir(timm_dir):
        t = timm.create_model(f"local-dir:{os.path.abspath(timm_dir)}", pretrained=True).eval()
        diffs["timm_image"] = (ours.encode_image(images, normalize=False) - t(images).float()).abs().max().item()
    return diffs
