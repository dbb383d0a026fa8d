"""The embedded default dataset: procedurally drawn captioned images (``evaclip data synth``).

Each image shows one shape of a colour at a position and size on a noisy grey background; its caption
composes those attributes with varied phrasings. Training shards use the img2dataset layout
(``{key}.jpg``, ``{key}.txt``, ``{key}.json`` + ``{shard}_stats.json``). The held-out zero-shot sets use
CLIP_benchmark's webdataset layout:

    zeroshot/synth_shapes/   classification, classes = "<colour> <shape>" (32 classes)
        test/0.tar ... test/nshards.txt, classnames.txt, zeroshot_classification_templates.txt
    zeroshot/synth_retrieval/ retrieval (dataset_type.txt = retrieval), several captions per image

The zero-shot prompts ("a photo of a {c}.") differ from every training phrasing, so scoring well needs the
model to have bound the attribute words to what they look like, not to have memorised caption strings.
"""
from __future__ import annotations

import io
import json
import os
import random
from typing import Dict, List, Set, Tuple

import numpy as np
from PIL import Image, ImageDraw

from evaclip.data.recipes import shard_pattern, write_recipe
from evaclip.data.shard_writer import write_shard, write_stats
from evaclip.files import ConfigError

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 70, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 190), "orange": (250, 140, 20), "cyan": (30, 210, 220), "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
SIZES = {"small": 0.22, "large": 0.36}

TRAIN_PHRASES = (
    "a {size} {colour} {shape} in the {position}",
    "{colour} {shape}, {position}",
    "there is a {colour} {shape} near the {position}",
    "a {shape} coloured {colour}",
    "{size} {shape} painted {colour} at the {position} of the picture",
    "the {colour} {shape} sits in the {position}",
    "{colour} {shape} on a grey background",
)
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a rendering of a {c}.", "an image containing a {c}.",
                      "a drawing of the {c}.")


def draw(colour: str, shape: str, position: str, size: str, image_size: int, rng: random.Random) -> Image.Image:
    s = image_size
    base = rng.randint(70, 190)
    # grey background with sparse noise, so the background is not a constant
    nrng = np.random.default_rng(rng.getrandbits(63))
    bg = np.full((s, s), base, dtype=np.int16)
    mask = nrng.random((s, s)) < 0.16
    bg[mask] += nrng.integers(-40, 41, size=int(mask.sum()), dtype=np.int16)
    img = Image.fromarray(np.repeat(np.clip(bg, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2), "RGB")
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx, cy = (cx + rng.uniform(-0.05, 0.05)) * s, (cy + rng.uniform(-0.05, 0.05)) * s
    r = SIZES[size] * s / 2 * rng.uniform(0.9, 1.1)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 2.5
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def _attrs(rng: random.Random) -> Dict[str, str]:
    return dict(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), position=rng.choice(list(POSITIONS)),
                size=rng.choice(list(SIZES)))


def caption(attrs: Dict[str, str], rng: random.Random) -> str:
    return rng.choice(TRAIN_PHRASES).format(**attrs)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def caption_words(text: str) -> Set[str]:
    """A caption's words, lower case, commas and full stops dropped (how the studies read a caption)."""
    return set(text.lower().replace(",", " ").replace(".", " ").split())


def names_right(text: str, colour: str, shape: str) -> bool:
    """Whether a caption names this colour and this shape and no other colour or shape (how the studies judge a
    caption of a synthetic image)."""
    return words_name_right(caption_words(text), colour, shape)


def words_name_right(words, colour: str, shape: str) -> bool:
    """``names_right`` on a caption's words (``caption_words``) already split."""
    return (colour in words and shape in words and not (words & set(COLOURS)) - {colour}
            and not (words & set(SHAPES)) - {shape})


def classnames() -> List[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def write_train(out: str, shards: int, per_shard: int, image_size: int, seed: int, progress=None) -> List[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for shard in range(shards):
        rng = random.Random(seed * 100003 + shard)
        samples = []
        for i in range(per_shard):
            a = _attrs(rng)
            key = f"{shard:05d}{i:04d}"
            img = draw(a["colour"], a["shape"], a["position"], a["size"], image_size, rng)
            samples.append({"__key__": key, "jpg": _encode(img, "JPEG"), "txt": caption(a, rng).encode(),
                            "json": json.dumps(dict(a, key=key)).encode()})
        path = os.path.join(out, f"{shard:05d}.tar")
        write_shard(path, samples)
        write_stats(path, per_shard)  # as img2dataset writes them
        paths.append(path)
        if progress:
            progress(1)
    return paths


def write_zeroshot_classification(out: str, per_class: int, image_size: int, seed: int, shards: int = 2) -> str:
    names = classnames()
    rng = random.Random(seed + 7)
    items = []
    for label, name in enumerate(names):
        colour, shape = name.split(" ")
        for _ in range(per_class):
            img = draw(colour, shape, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)), image_size, rng)
            items.append((label, img))
    rng.shuffle(items)
    _write_benchmark(out, items, names, ZEROSHOT_TEMPLATES, shards, kind="classification")
    return out


def write_zeroshot_retrieval(out: str, n_images: int, image_size: int, seed: int, captions_per_image: int = 3) -> str:
    """Retrieval set: every image has a distinct attribute combination, so no two captions are identical
    (identical captions would make recall depend on how ties are broken)."""
    combos = [dict(colour=c, shape=s, position=p, size=z) for c in COLOURS for s in SHAPES for p in POSITIONS
              for z in SIZES]
    if n_images > len(combos):
        raise ValueError(f"at most {len(combos)} retrieval images (distinct attribute combinations)")
    rng = random.Random(seed + 11)
    items = []
    for a in rng.sample(combos, n_images):
        img = draw(a["colour"], a["shape"], a["position"], a["size"], image_size, rng)
        caps = [f"a {a['size']} {a['colour']} {a['shape']} at the {a['position']}",
                f"{a['colour']} {a['shape']}, {a['size']}, in the {a['position']}",
                f"the {a['position']} holds a {a['size']} {a['colour']} {a['shape']}"][:captions_per_image]
        items.append((caps, img))
    _write_benchmark(out, items, None, None, 1, kind="retrieval")
    return out


def _write_benchmark(out: str, items, names, templates, shards: int, kind: str) -> None:
    split = os.path.join(out, "test")
    os.makedirs(split, exist_ok=True)
    per = (len(items) + shards - 1) // shards
    for k in range(shards):
        samples = []
        for j, (target, img) in enumerate(items[k * per:(k + 1) * per]):
            s = {"__key__": f"s{k * per + j:07d}", "webp": _encode(img, "WEBP")}
            if kind == "classification":
                s["cls"] = str(target).encode()
            else:
                s["txt"] = "\n".join(target).encode()
            samples.append(s)
        write_shard(os.path.join(split, f"{k}.tar"), samples)
    with open(os.path.join(split, "nshards.txt"), "w") as f:
        f.write(f"{shards}\n")
    if names is not None:
        with open(os.path.join(out, "classnames.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        with open(os.path.join(out, "zeroshot_classification_templates.txt"), "w") as f:
            f.write("\n".join(templates) + "\n")
    if kind == "retrieval":
        with open(os.path.join(out, "dataset_type.txt"), "w") as f:
            f.write("retrieval\n")


def write_all(out: str, shards: int = 20, per_shard: int = 1000, image_size: int = 64, seed: int = 0,
              eval_per_class: int = 20, retrieval_images: int = 200, progress=None) -> Dict[str, str]:
    """Training shards + both zero-shot sets + a recipe matching what was written."""
    for name, n in (("--shards", shards), ("--per-shard", per_shard), ("--image-size", image_size),
                    ("--eval-per-class", eval_per_class), ("--retrieval-images", retrieval_images)):
        if n < 1:
            raise ConfigError(f"data synth {name} must be >= 1, got {n}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"data synth --out {out}: exists and is not a folder")
    train = write_train(os.path.join(out, "train"), shards, per_shard, image_size, seed, progress)
    zs = write_zeroshot_classification(os.path.join(out, "zeroshot", "synth_shapes"), eval_per_class, image_size, seed)
    rt = write_zeroshot_retrieval(os.path.join(out, "zeroshot", "synth_retrieval"), retrieval_images, image_size, seed)
    recipe = write_recipe(os.path.join(out, "recipe.toml"), "synthetic", "evaclip data synth output",
                          [{"name": "synthetic", "shards": shard_pattern("{root}/train", shards),
                            "samples": shards * per_shard}])
    return {"train": os.path.dirname(train[0]), "zeroshot": zs, "retrieval": rt, "recipe": recipe}
