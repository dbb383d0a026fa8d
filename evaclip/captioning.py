"""Captions from a CoCa model (``evaclip caption``): the model from an evaclip run, checkpoint or export (the
export's ``caption_decoder/`` beside its CLIP), the images from files, folders or webdataset shards.

    cap = load_captioner("runs/coca_demo_cpu")
    cap.caption([Image.open("a.jpg")], method="beam")      # -> ["a red circle in the top left"]
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from evaclip.checkpoint import load_weights
from evaclip.data.shards import iter_tar_samples
from evaclip.data.transforms import IMAGE_EXTS, Tokenizer, eval_transform
from evaclip.errors import UserError
from evaclip.export.open_clip import DECODER_DIR
from evaclip.models import CoCa, model_from_record, record_variant
from evaclip.models.convert import open_clip_to_evaclip, read_state_dict
from evaclip.models.generate import caption_texts


@dataclass
class Captioner:
    model: Any  # a CoCa
    transform: Callable  # PIL image -> tensor [3, H, W], the model's eval preprocessing
    tokenizer: Any  # the CLIP BPE tokenizer (its start / end ids and decode)
    name: str
    source: str
    device: torch.device

    def caption(self, images: List, method: str = "greedy", max_len: int = 20, **kw) -> List[str]:
        """Captions of PIL ``images`` (``method``, ``kw``: see ``evaclip.models.generate.generate``)."""
        x = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)
        return caption_texts(self.model, x, self.tokenizer, method, max_len, **kw)


def load_captioner(src: str, device: str = "cpu", trust_pickle: bool = False) -> Captioner:
    """The CoCa in ``src``: an evaclip run dir or checkpoint of a coca run, or an evaclip export folder with its
    ``caption_decoder/`` (weights read weights-only)."""

    if not os.path.exists(src):
        raise UserError(f"--model {src}: no such run, checkpoint or export folder")
    sd, record = _read(src, trust_pickle)
    if "coca" not in record:
        raise UserError(f"--model {src}: not a CoCa (train one with objective.kind = \"coca\"); a CLIP has no "
                        "caption decoder")
    model = model_from_record(record)
    assert isinstance(model, CoCa)
    model.load_state_dict(sd)
    dev = torch.device(device)
    model.eval().requires_grad_(False).to(dev)
    v = record_variant(record)
    return Captioner(model, eval_transform(v.image_size, v.mean, v.std, interpolation=v.interpolation),
                     Tokenizer(model.text.context_length), v.name, os.path.abspath(src), dev)


def _read(src: str, trust_pickle: bool) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(evaclip state dict, model record) of a run / checkpoint, or of an export plus its decoder folder."""

    config = os.path.join(src, "open_clip_config.json")
    if not os.path.isfile(config):
        sd, meta = load_weights(src, trust_pickle)
        return sd, meta["model"]
    with open(config) as f:
        record = json.load(f).get("evaclip", {}).get("model")
    if not record:
        raise UserError(f"{src}: an open_clip folder not written by evaclip (no model record): no caption decoder")
    dec = os.path.join(src, DECODER_DIR)
    if not os.path.isdir(dec):
        raise UserError(f"{src}: an export without {DECODER_DIR}/ (not a CoCa, or exported with --tower image|text)")
    with open(os.path.join(dec, "config.json")) as f:
        record = dict(record, coca=json.load(f)["coca"])
    sd = open_clip_to_evaclip(read_state_dict(os.path.join(src, "open_clip_model.safetensors"), "export"))
    sd.update(read_state_dict(os.path.join(dec, "model.safetensors"), "caption decoder"))
    return sd, record


def iter_images(inputs: List[str]) -> Iterator[Tuple[str, Any]]:
    """(name, PIL image) from image files, folders of them (sorted, not recursive) and .tar shards (name:
    ``<shard>:<key>``, unique across shards); an unreadable image is yielded as (name, None)."""
    from PIL import Image

    def opened(name, data):
        try:
            return name, Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        except Exception:  # noqa: BLE001 - any decode failure is a skipped image
            return name, None

    for path in inputs:
        if path.endswith(".tar"):
            for s in iter_tar_samples(path):
                ext = next((e for e in IMAGE_EXTS if e in s), None)
                name = f"{path}:{s['__key__']}"
                yield opened(name, s[ext]) if ext else (name, None)
        elif os.path.isdir(path):
            for n in sorted(os.listdir(path)):
                if n.lower().rsplit(".", 1)[-1] in IMAGE_EXTS:
                    yield opened(os.path.join(path, n), os.path.join(path, n))
        elif os.path.isfile(path):
            yield opened(path, path)
        else:
            raise UserError(f"{path}: no such image, folder or shard")
