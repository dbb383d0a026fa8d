"""One raw webdataset sample -> (image tensor, caption), or the reason it is skipped (counted per reason)."""
from __future__ import annotations

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
