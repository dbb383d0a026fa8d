"""Image decode and transforms (EVA/OpenAI CLIP mean-std), and the text tokenizer."""
from __future__ import annotations

import io
import math
import threading
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
    """Decode to RGB with PIL. For JPEG, draft mode lets libjpeg decode at 1/2, 1/4, 1/8 scale directly when
    the image is much larger than needed (``min_side``: the smallest shorter side we still need)."""
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)  # PIL's own convert clips 16-bit / float values: an all-white image
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale -> 8-bit 'L' by the range its mode can hold."""
    import numpy as np

    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "F":
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
    elif arr.size and arr.max() > 255:  # 'I': 16-bit data stored in 32 bits, or wider
        arr = arr / (257.0 if arr.max() <= 65535 else arr.max() / 255.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _mode(interpolation: str):
    from torchvision import transforms as T

    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
             "nearest": T.InterpolationMode.NEAREST}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {', '.join(modes)}, got {interpolation!r}")
    return modes[interpolation]


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    crop_scale: Tuple[float, float] = (0.9, 1.0), interpolation: str = "bicubic",
                    hflip: bool = False):
    """RandomResizedCrop (-> random horizontal flip) -> tensor -> normalise, as EVA-CLIP (no flip) and EVA-02
    MIM (flip) train, with the model file's interpolation."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=_mode(interpolation)),
        *([T.RandomHorizontalFlip()] if hflip else []),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], mode: str = "center_crop",
                   interpolation: str = "bicubic"):
    """Resize the shorter side + centre crop (``center_crop``) or resize both sides (``squash``)."""
    from torchvision import transforms as T

    interp = _mode(interpolation)
    if mode == "squash":
        resize = [T.Resize((image_size, image_size), interpolation=interp)]
    elif mode == "center_crop":
        resize = [T.Resize(image_size, interpolation=interp), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"eval transform mode must be center_crop or squash, got {mode!r}")
    return T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])


def draft_side(image_size: int, crop_scale_min: float = 1.0) -> int:
    """Shorter side to decode at so a crop of ``crop_scale_min`` of the area still has ``image_size`` pixels."""
    return math.ceil(image_size / math.sqrt(max(crop_scale_min, 1e-3)))


class Tokenizer:
    """open_clip's CLIP BPE tokenizer (ships its vocab; offline) at a given context length."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self.sot, self.eot = self._tok.sot_token_id, self._tok.eot_token_id  # start / end of text ids

    def __call__(self, texts) -> torch.Tensor:
        return self._tok(texts, context_length=self.context_length)

    def decode(self, ids) -> str:
        """Token ids (a caption, without start / end tokens) -> text."""
        return self._tok.decode(list(ids)).strip()


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (the HF text tower's), padded/truncated to a fixed length."""

    def __init__(self, path: str, context_length: int = 77):
        from transformers import AutoTokenizer

        self.context_length = context_length
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tok(list(texts), max_length=self.context_length, padding="max_length", truncation=True,
                         return_tensors="pt")["input_ids"]


def make_tokenizer(context_length: int, text_kind: str = "clip", hf_path: str = ""):
    """The tokenizer that matches the text tower: CLIP BPE, or the HF tower's own."""
    return HFTokenizer(hf_path, context_length) if text_kind == "hf" else Tokenizer(context_length)


def reframe(x: torch.Tensor, src_mean, src_std, dst_mean, dst_std, size: int) -> torch.Tensor:
    """Images [B, 3, H, W] normalised for one model -> normalised and sized for another (a frozen teacher's own
    preprocessing; resized bicubic, antialiased). Stats are compared as plain numbers: no tensors built and no
    device sync on every micro-batch when they match. At least float32 (float64 stays float64)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    src = (tuple(map(float, src_mean)), tuple(map(float, src_std)))
    dst = (tuple(map(float, dst_mean)), tuple(map(float, dst_std)))
    if src != dst:
        s_mean, s_std, d_mean, d_std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (*src, *dst))
        x = (x * s_std + s_mean - d_mean) / d_std
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x


_GLOBAL_RNG = threading.Lock()


def draw_crops(img: Image.Image, k: int, crop_scale: Tuple[float, float], hflip: bool, generator) -> list:
    """K crops [top, left, height, width, flip] as ``train_transform`` draws them (RandomResizedCrop's parameters,
    then a coin for the flip), from ``generator``: what `evaclip data reinforce` stores per sample."""
    from torchvision import transforms as T

    crops = []
    # get_params draws from the global RNG: give it the generator's state, one caller at a time (decoding threads)
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        for _ in range(k):
            top, left, h, w = T.RandomResizedCrop.get_params(img, list(crop_scale), [3 / 4, 4 / 3])
            flip = int(hflip and torch.rand(1).item() < 0.5)
            crops.append([int(top), int(left), int(h), int(w), flip])
        generator.set_state(torch.get_rng_state())
    return crops


def crop_view(img: Image.Image, box, image_size: int, mean: Sequence[float], std: Sequence[float],
              interpolation: str = "bicubic") -> torch.Tensor:
    """One stored crop [top, left, height, width, flip] of ``img`` resized to ``image_size``, flipped, normalised:
    ``train_transform``'s output for those parameters, at any model's size and statistics."""
    from torchvision.transforms import functional as TF

    top, left, h, w, flip = box
    x = TF.resized_crop(img, top, left, h, w, [image_size, image_size], interpolation=_mode(interpolation),
                        antialias=True)
    if flip:
        x = TF.hflip(x)
    return TF.normalize(TF.to_tensor(x), list(mean), list(std))
