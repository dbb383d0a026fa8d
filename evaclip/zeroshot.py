"""Zero-shot evaluation: classification (prompt ensembles) and retrieval, shared by the runner and training.

Classification (Radford et al. 2021): for each class embed every template, L2-normalise, average,
re-normalise -> classifier W [D, C]; logits = 100 * img . W; metrics top-1, top-5 and mean per-class recall.
Retrieval (CLIP paper definition, as CLIP_benchmark): with several captions per image,
  image_retrieval_recall@k  text -> image: fraction of captions whose image is among the top-k images
  text_retrieval_recall@k   image -> text: fraction of images with at least one of their captions in the top-k
Ties are broken by index (a stable descending sort), so results are deterministic.

Datasets are read in CLIP_benchmark's webdataset layout unchanged (``<root>/<split>/nshards.txt``, ``0.tar``,
``classnames.txt``, ``zeroshot_classification_templates.txt``, ``dataset_type.txt``), or as an ImageFolder
(``<root>/<split>/<class>/<image>``) or a CSV (``<root>/<split>.csv`` with ``path,caption`` rows).
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from evaclip.data.shards import iter_tar_samples
from evaclip.data.transforms import IMAGE_EXTS, decode_image

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"


# ---------------------------------------------------------------------------------------------------- metrics
def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
    """top-1, top-5 accuracy and mean per-class recall (balanced accuracy over the classes present)."""
    n, c = logits.shape
    order = _stable_desc(logits)
    hit = order[:, : min(5, c)] == targets[:, None]
    acc1 = hit[:, :1].any(1).float().mean().item()
    acc5 = hit.any(1).float().mean().item()
    pred = order[:, 0]
    recalls = [(pred[targets == k] == k).float().mean().item() for k in targets.unique().tolist()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def _stable_desc(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@k both ways for normalised embeddings; ``text_to_image[j]`` is the image of caption j."""
    scores = text_emb @ image_emb.t()  # [T, I]
    t2i_rank = _stable_desc(scores)  # images ranked per caption
    i2t_rank = _stable_desc(scores.t())  # captions ranked per image
    out = {}
    for k in ks:
        k_i, k_t = min(k, scores.shape[1]), min(k, scores.shape[0])
        out[f"image_retrieval_recall@{k}"] = (t2i_rank[:, :k_i] == text_to_image[:, None]).any(1).float().mean().item()
        # captions in the top-k of image i that belong to image i
        owners = text_to_image[i2t_rank[:, :k_t]]  # [I, k]
        mine = torch.arange(scores.shape[1])[:, None]
        out[f"text_retrieval_recall@{k}"] = (owners == mine).any(1).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------------- encoders
def _single(obj) -> list:
    return [obj]


@torch.no_grad()
def build_classifier(encode_text: Callable, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device, batch_size: int = 256, shard: Tuple[int, int] = (0, 1),
                     gather: Callable = _single) -> torch.Tensor:
    """[D, C] prompt-ensemble classifier; all class x template prompts are encoded in large batches.

    Sharded (``shard`` = (rank, world), ``gather`` = an all-gather of objects): each rank encodes the classes
    c with c % world == rank and every rank assembles the same whole classifier."""
    bad = [t for t in templates if "{c}" not in t]
    if bad:  # every class would get the same prompt: a classifier at chance, reported as a result
        raise ValueError(f"zero-shot template {bad[0]!r} has no {{c}} (the class name's place), "
                         f"{len(bad)} of {len(templates)} templates")
    rank, world = shard
    mine = list(range(rank, len(classnames), world))
    texts = [t.format(c=classnames[c]) for c in mine for t in templates]
    emb = [F.normalize(encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
           for i in range(0, len(texts), batch_size)]
    w = torch.cat(emb).reshape(len(mine), len(templates), -1).mean(1) if emb else None  # [C_rank, D]
    parts = gather((mine, None if w is None else w.cpu()))
    dim = next(p[1].shape[1] for p in parts if p[1] is not None)
    full = torch.empty(len(classnames), dim)
    for idx, part in parts:
        if idx:
            full[idx] = part
    return F.normalize(full.to(device), dim=-1).t()


# ---------------------------------------------------------------------------------------------------- datasets
@dataclass
class EvalSet:
    """What a dataset on disk provides."""

    task: str
    # samples(shard=(rank, world)) -> (image, (index, label int | list of captions)) for the samples whose
    # index in the dataset's order is rank mod world; the others are not decoded
    samples: Callable[..., Iterator[Tuple[Image.Image, object]]]
    classnames: Optional[List[str]] = None
    templates: Optional[List[str]] = None
    size: Optional[int] = None
    skipped: Counter = field(default_factory=Counter)  # samples whose image could not be decoded, by reason


def _read_lines(path: str) -> List[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _decode(data: bytes) -> Image.Image:
    return decode_image(data)


def _decoded(items: Iterator[Tuple[Callable, object]], skipped: Counter,
             shard: Tuple[int, int] = (0, 1)) -> Iterator[Tuple[Image.Image, object]]:
    """(image, (index, target)) for this shard's (loader, target) pairs; an image that does not decode is
    skipped and counted."""
    rank, world = shard
    for i, (load, target) in enumerate(items):
        if i % world != rank:
            continue
        try:
            img = load()
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
            skipped["decode_error"] += 1
            continue
        yield img, (i, target)


def open_wds_benchmark(root: str, split: str = "test") -> EvalSet:
    """CLIP_benchmark's webdataset layout (``wds_*`` sets), read unchanged."""
    split_dir = os.path.join(root, split)
    nshards_file = os.path.join(split_dir, "nshards.txt")
    if not os.path.exists(nshards_file):
        raise FileNotFoundError(f"{nshards_file} not found")
    nshards = int(open(nshards_file).read().strip())
    kind_file = os.path.join(root, "dataset_type.txt")
    kind = open(kind_file).read().strip() if os.path.exists(kind_file) else "classification"
    task = RETRIEVAL if kind == "retrieval" else CLASSIFICATION

    def raw():
        for k in range(nshards):
            for s in iter_tar_samples(os.path.join(split_dir, f"{k}.tar")):
                ext = next((e for e in ("webp", "png", "jpg", "jpeg") if e in s), None)
                if ext is None:
                    es.skipped["missing_image"] += 1
                    continue
                if task == CLASSIFICATION:
                    target = int(s["cls"].decode().strip())
                else:
                    target = [c for c in s["txt"].decode().split("\n") if c.strip()]
                yield (lambda data=s[ext]: _decode(data)), target

    def samples(shard=(0, 1)):
        return _decoded(raw(), es.skipped, shard)

    classnames = templates = None
    if task == CLASSIFICATION:
        classnames = _read_lines(os.path.join(root, "classnames.txt"))
        tpl = os.path.join(root, "zeroshot_classification_templates.txt")
        templates = _read_lines(tpl) if os.path.exists(tpl) else None
    es = EvalSet(task, samples, classnames, templates)
    return es


def open_imagefolder(root: str, split: str = "test") -> EvalSet:
    """``<root>/<split>/<class>/<image>``; classes sorted, names from classnames.txt if present."""
    split_dir = os.path.join(root, split)
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    names_file = os.path.join(root, "classnames.txt")
    classnames = _read_lines(names_file) if os.path.exists(names_file) else [c.replace("_", " ") for c in classes]
    files = [(os.path.join(split_dir, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c))) if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]

    def samples(shard=(0, 1)):
        return _decoded((((lambda p=path: _decode(open(p, "rb").read())), label) for path, label in files), es.skipped,
                        shard)

    tpl = os.path.join(root, "zeroshot_classification_templates.txt")
    es = EvalSet(CLASSIFICATION, samples, classnames, _read_lines(tpl) if os.path.exists(tpl) else None, len(files))
    return es


def open_csv_retrieval(root: str, split: str = "test") -> EvalSet:
    """``<root>/<split>.csv`` with ``path,caption`` rows (several rows per image = several captions)."""
    path = os.path.join(root, f"{split}.csv")
    captions: Dict[str, List[str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["path"], []).append(row["caption"])

    def samples(shard=(0, 1)):
        return _decoded((((lambda q=(p if os.path.isabs(p) else os.path.join(root, p)): _decode(open(q, "rb").read())),
                          caps) for p, caps in captions.items()), es.skipped, shard)

    es = EvalSet(RETRIEVAL, samples, size=len(captions))
    return es


LAYOUTS = {"wds": open_wds_benchmark, "imagefolder": open_imagefolder, "csv": open_csv_retrieval}


def open_dataset(layout: str, root: str, split: str = "test") -> EvalSet:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](root, split)


def prefetch(gen: Iterator, depth: int = 2) -> Iterator:
    """Run a (reading + decoding) generator in a thread so it overlaps the model's forward passes (PIL
    decoding and torch ops both release the GIL)."""
    import queue
    import threading

    q: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in gen:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def image_batches(it: Iterator, transform, batch_size: int, workers: int = 0):
    """Transformed image batches; with ``workers`` > 0 the transforms run in a thread pool (in order)."""
    pool = None
    if workers > 0:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(workers)
    try:
        chunk = []
        for item in it:
            chunk.append(item)
            if len(chunk) == batch_size:
                yield _make_batch(chunk, transform, pool)
                chunk = []
        if chunk:
            yield _make_batch(chunk, transform, pool)
    finally:  # also when the consumer stops early
        if pool is not None:
            pool.shutdown()


def _make_batch(chunk, transform, pool):
    images = [img for img, _ in chunk]
    tensors = list(pool.map(transform, images)) if pool is not None else [transform(i) for i in images]
    return torch.stack(tensors), [t for _, t in chunk]


# ---------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(encode_image: Callable, encode_text: Callable, tokenizer, evalset: EvalSet, transform,
             device: torch.device, batch_size: int = 64, templates: Optional[List[str]] = None,
             classnames: Optional[List[str]] = None, classifier: Optional[torch.Tensor] = None,
             progress=None, workers: int = 0, shard: Tuple[int, int] = (0, 1),
             gather: Callable = _single) -> Tuple[Dict[str, float], Optional[torch.Tensor]]:
    """Metrics for one dataset (and the classifier used, so callers can cache it).

    Sharded (``shard`` = (rank, world), ``gather`` = an all-gather of objects, every rank calling): each rank
    encodes its share of the images (and of the classes), the outputs are gathered and put back in the
    dataset's order, and every rank computes the same metrics a single process would; ``evalset.skipped``
    becomes the total over the ranks."""
    batches = prefetch(image_batches(evalset.samples(shard), transform, batch_size, workers))
    if evalset.task == CLASSIFICATION:
        return _classify(encode_image, encode_text, tokenizer, evalset, batches, device, templates, classnames,
                         classifier, progress, shard, gather)
    return _retrieve(encode_image, encode_text, tokenizer, evalset, batches, device, progress, gather), None


def _classify(encode_image, encode_text, tokenizer, evalset: EvalSet, batches, device, templates, classnames,
              classifier, progress, shard, gather):
    """Zero-shot classification: the metrics and the classifier (class embeddings averaged over templates)."""
    names = classnames or evalset.classnames
    tpls = templates or evalset.templates
    if not names or not tpls:
        raise ValueError("classification needs class names and templates")
    if classifier is None:
        classifier = build_classifier(encode_text, tokenizer, names, tpls, device, shard=shard, gather=gather)
    logits, targets, index = [], [], []
    for images, labels in batches:
        f = F.normalize(encode_image(images.to(device)).float(), dim=-1)
        logits.append((100.0 * f @ classifier).cpu())
        index += [i for i, _ in labels]
        targets += [t for _, t in labels]
        if progress:
            progress(len(labels))
    parts = gather((index, torch.cat(logits) if logits else torch.zeros(0, classifier.shape[1]), targets,
                    dict(evalset.skipped)))
    total_skips(evalset, parts)
    index = [i for p in parts for i in p[0]]
    if not index:
        raise ValueError("no readable image in the dataset")
    perm = torch.argsort(torch.tensor(index))  # back to the dataset's order
    logits_all = torch.cat([p[1] for p in parts])[perm]
    flat = [t for p in parts for t in p[2]]
    targets = [flat[k] for k in perm.tolist()]
    top = max(targets)
    if top >= len(names) or min(targets) < 0:
        raise ValueError(f"{len(names)} class names but the labels go up to {top}: the class-names file does "
                         "not match the dataset")
    return classification_metrics(logits_all, torch.tensor(targets)), classifier


def _retrieve(encode_image, encode_text, tokenizer, evalset: EvalSet, batches, device, progress, gather):
    """Image-text retrieval metrics (recall@k both ways), every caption of an image counted as its match."""
    img_emb, txt_emb, index, n_caps = [], [], [], []
    for images, caps in batches:
        img_emb.append(F.normalize(encode_image(images.to(device)).float(), dim=-1).cpu())
        flat = [c for _, cs in caps for c in cs]
        txt_emb.append(F.normalize(encode_text(tokenizer(flat).to(device)).float(), dim=-1).cpu())
        index += [i for i, _ in caps]
        n_caps += [len(cs) for _, cs in caps]
        if progress:
            progress(len(caps))
    parts = gather((index, n_caps, torch.cat(img_emb) if img_emb else None, torch.cat(txt_emb) if txt_emb else None,
                    dict(evalset.skipped)))
    total_skips(evalset, parts)
    # back to the dataset's order: images by index, each image's captions after it (ties break by index)
    pieces = []
    for idx, counts, im, tx, _ in parts:
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        pieces += [(i, im[j], tx[starts[j]:starts[j + 1]]) for j, i in enumerate(idx)]
    if not pieces:
        raise ValueError("no readable image in the dataset")
    pieces.sort(key=lambda p: p[0])
    owner = torch.tensor([k for k, (_, _, t) in enumerate(pieces) for _ in range(t.shape[0])])
    return retrieval_metrics(torch.stack([p[1] for p in pieces]), torch.cat([p[2] for p in pieces]), owner)


def total_skips(evalset: EvalSet, parts) -> None:
    total: Counter = Counter()
    for p in parts:
        total.update(p[-1])
    evalset.skipped.clear()
    evalset.skipped.update(total)
