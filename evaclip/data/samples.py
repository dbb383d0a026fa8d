"""One raw webdataset sample -> (image tensor, caption), or the reason it is skipped (counted per reason)."""
from __future__ import annotations

import io
from typing import Dict

from evaclip.data.transforms import IMAGE_EXTS, decode_image

SKIP_REASONS = ("decode_error", "missing_image", "missing_caption", "empty_caption", "unreadable_shard",
                "truncated_shard")


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_sample(raw: Dict, transform, min_side: int, captions: bool = True):
    """(image tensor, caption) or SkipSample(reason); ``captions=False`` (MIM): images only, caption None."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image")
    caption = None
    if captions:
        if "txt" not in raw:
            raise SkipSample("missing_caption")
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SkipSample("missing_caption") from None
        if not caption:
            raise SkipSample("empty_caption")
    try:
        img = decode_image(raw[ext], min_side)
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise SkipSample("decode_error") from None
    return transform(img), caption


# ---------------------------------------------------------------------------------------------- reinforced samples
# `evaclip data reinforce` adds one member to each sample: KD_MEMBER, a .npy (read without pickle) holding one
# record: a frozen teacher's unit embeddings of K augmentations of the image and of the caption (float16), the K
# crops that reproduce those augmentations exactly (top, left, height, width, flip; pixels of the image decoded at
# full size), the teacher's identity and its logit scale. One record, not an .npz of arrays: 5x faster to read.
KD_MEMBER = "kd.npy"
KD_FIELDS = ("image", "text", "boxes", "teacher", "scale")


def read_kd(data: bytes) -> Dict:
    """The fields of a KD_MEMBER, checked; ValueError when it is not one (any damage: the sample is skipped)."""
    import numpy as np

    rec = np.load(io.BytesIO(data), allow_pickle=False)
    if rec.shape != () or not set(KD_FIELDS) <= set(rec.dtype.names or ()):
        raise ValueError("not a teacher record")
    kd = {k: rec[k] for k in KD_FIELDS}
    k, dim = kd["image"].shape
    if k < 1 or kd["boxes"].shape != (k, 5) or kd["text"].shape != (dim,):
        raise ValueError("inconsistent shapes")
    return kd


def decode_reinforced(raw: Dict, stored_crop, captions: bool = True):
    """(image tensor, caption, teacher targets) of a reinforced sample: augmentation k drawn from the torch RNG
    (seeded per sample from (seed, data step, key) in logical streams) and its stored crop applied by
    ``stored_crop(image, box)``; the targets are that augmentation's image embedding and the caption's."""
    import torch

    try:
        kd = read_kd(raw[KD_MEMBER])
    except Exception:  # noqa: BLE001 - numpy / zipfile raise many types for a damaged member
        raise SkipSample("decode_error") from None
    k = int(torch.randint(kd["image"].shape[0], (1,)).item())
    img, caption = decode_sample(raw, lambda im: stored_crop(im, [int(v) for v in kd["boxes"][k]]), 0, captions)
    targets = {"image": torch.from_numpy(kd["image"][k].astype("float32")),
               "text": torch.from_numpy(kd["text"].astype("float32")),
               "teacher": str(kd["teacher"]), "scale": float(kd["scale"])}
    return img, caption, targets
