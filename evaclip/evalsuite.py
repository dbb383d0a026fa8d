"""Evaluation suites as data: ``eval/suites/*.toml`` list datasets of the registry ``eval/datasets.toml``.

    # eval/suites/quick.toml
    name = "quick"
    datasets = ["synth_shapes", "synth_retrieval"]
    [overrides.synth_shapes]          # optional per-dataset overrides of registry fields
    transform = "squash"

A registry entry names the task, the folder (under ``--datasets-root``), the layout (wds | imagefolder |
csv), the split, the default transform chosen per dataset (EVA-CLIP-18B: resize+centre-crop or squash),
and optionally class names / templates shipped under ``eval/`` (else the dataset's own files are used).
A dataset whose files are missing is reported as ``missing`` (an error only with ``strict``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

from evaclip.caption_eval import caption_function, evaluate_captions
from evaclip.data.transforms import eval_transform
from evaclip.files import ConfigError, asset_file, atomic_write, find, load_typed, resolve_value
from evaclip.zeroshot import evaluate as eval_one
from evaclip.zeroshot import open_dataset

_PATH = {"path": "file"}  # relative to the registry file (evaclip.files)


@dataclass
class DatasetEntry:
    name: str = ""
    task: str = "zeroshot_classification"
    path: str = ""  # folder under the datasets root (default: wds_<name> as clip_benchmark names them)
    layout: str = "wds"
    split: str = "test"
    transform: str = "center_crop"
    # class names / templates files (relative to the registry file); default: the dataset's own
    classnames: str = field(default="", metadata=_PATH)
    templates: str = field(default="", metadata=_PATH)
    clip_benchmark: str = ""  # clip_benchmark's dataset name, for reference and comparisons
    notes: str = ""


@dataclass
class Registry:
    dataset: List[DatasetEntry] = field(default_factory=list)


@dataclass
class Suite:
    name: str = ""
    description: str = ""
    datasets: List[str] = field(default_factory=list)
    overrides: Dict = field(default_factory=dict)


def load_registry(path: Optional[str] = None) -> Dict[str, DatasetEntry]:
    """The dataset registry (default: the packaged ``eval/datasets.toml``)."""
    path = path or asset_file("eval/datasets.toml")
    reg = load_typed(Registry, path)
    out = {}
    for d in reg.dataset:
        if d.name in out:
            raise ConfigError(f"{path}: dataset {d.name!r} listed twice")
        if d.task not in ("zeroshot_classification", "zeroshot_retrieval", "captioning"):
            raise ConfigError(f"{path}: dataset {d.name}: unknown task {d.task!r}")
        if d.transform not in ("center_crop", "squash"):
            raise ConfigError(f"{path}: dataset {d.name}: transform must be center_crop or squash")
        out[d.name] = d
    return out


def load_suite(name_or_path: str, registry: Optional[Dict[str, DatasetEntry]] = None) -> List[DatasetEntry]:
    """The suite's datasets (a built-in name like ``quick`` or a suite file), resolved against the registry
    (unknown names are an error)."""
    registry = registry if registry is not None else load_registry()
    path = find("suite", name_or_path)
    suite = load_typed(Suite, path)
    entries = []
    for name in suite.datasets:
        if name not in registry:
            raise ConfigError(f"{path}: dataset {name!r} is not in the registry (eval/datasets.toml)")
        e = registry[name]
        over = suite.overrides.get(name, {})
        try:
            # the suite's own file paths resolve against the suite file (evaclip.files' one rule)
            e = replace(e, **{k: resolve_value(v, "file", os.path.dirname(path)) if k in ("classnames", "templates")
                              else v for k, v in over.items()})
        except TypeError as err:
            raise ConfigError(f"{path}: overrides.{name}: {err}") from None
        entries.append(e)
    for name in suite.overrides:
        if name not in suite.datasets:
            raise ConfigError(f"{path}: overrides.{name} names a dataset the suite does not list")
    return entries


def _eval_file(path: str) -> Optional[List[str]]:
    if not path:
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def dataset_root(entry: DatasetEntry, datasets_root: str) -> str:
    return os.path.join(datasets_root, entry.path or f"wds_{entry.name}")


def within(context: Callable, fn: Callable) -> Callable:
    """``fn`` run inside a fresh ``context()`` at each call: an encoder in the precision it is evaluated in."""
    def run(x):
        with context():
            return fn(x)
    return run


def run_suite(enc, entries: List[DatasetEntry], datasets_root: str, device, batch_size: int = 64,
              strict: bool = False, classifier_cache: Optional[str] = None, progress_factory=None, log=print,
              workers: int = 0, out_dir: Optional[str] = None, shard=(0, 1), gather=None) -> List[Dict]:
    """Evaluate the model ``enc`` (an ``evaclip.encoders.Encoders``: its two encoders, tokenizer, preprocessing,
    name, where its weights came from and ``extra``, recorded in every result) on every dataset; one
    CLIP_benchmark-shaped result dict each (``status`` ok | missing | error).

    A dataset that fails (unreadable shards, class names that do not cover the labels ...) is reported as
    ``error`` with its message and the suite goes on (``strict``: stop); undecodable images are skipped and
    counted (``skipped``). With ``out_dir`` each result is written as soon as its dataset is done, so a
    crash later loses nothing.

    Sharded over ranks (``shard`` = (rank, world), ``gather`` = an all-gather of objects; every rank calls
    with the same arguments): each dataset is split across the ranks, every rank gets the same results, and
    rank 0 alone writes files."""

    results, writer = [], shard[0] == 0
    out_dir = out_dir if writer else None
    gather = gather or (lambda obj: [obj])
    for e in entries:
        root = dataset_root(e, datasets_root)
        base = {"dataset": e.name, "model": enc.name, "pretrained": enc.pretrained, "task": e.task, "language": "en",
                **(enc.extra or {})}
        evalset = _open_or_missing(e, root, strict, log)
        if evalset is None:
            results.append(_done(dict(base, metrics={}, status="missing", path=root), out_dir))
            continue
        transform = eval_transform(enc.image_size, enc.mean, enc.std, e.transform, enc.interpolation)
        names, tpls = _eval_file(e.classnames) or evalset.classnames, _eval_file(e.templates) or evalset.templates
        cache_file, classifier = _cached_classifier(classifier_cache, e, names, tpls, gather, device)
        bar = progress_factory(e.name) if progress_factory else None
        t0 = time.time()
        try:
            metrics, clf, extra = _evaluate(e.task, enc, evalset, transform, device, batch_size, dict(
                templates=tpls, classnames=names, classifier=classifier, workers=workers, shard=shard, gather=gather,
                progress=bar.update if bar is not None else None))
        except Exception as err:  # noqa: BLE001 - one bad dataset must not cost the others their results
            if strict:
                raise
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            log(f"  {e.name}: error: {msg}")
            results.append(_done(dict(base, metrics={}, status="error", error=msg), out_dir))
            continue
        finally:
            if bar is not None:
                bar.close()
        if cache_file and clf is not None and classifier is None and writer:
            _save_classifier(cache_file, clf)
        skipped = dict(evalset.skipped) if evalset.skipped else {}
        if skipped:
            log(f"  {e.name}: skipped {sum(skipped.values())} unreadable samples {skipped}")
        results.append(_done(dict(base, metrics=metrics, status="ok", skipped=skipped,
                                  seconds=round(time.time() - t0, 2), **extra), out_dir))
    return results


def _evaluate(task: str, enc, evalset, transform, device, batch_size: int, kw: Dict) -> tuple:
    """(metrics, the zero-shot classifier or None, extra result fields) of one dataset: a CoCa's captions against
    the dataset's for the captioning task (``evaclip.caption_eval``), CLIP_benchmark's tasks otherwise."""

    if task == "captioning":
        metrics, extra = evaluate_captions(caption_function(enc.module, device), evalset, transform, batch_size,
                                           kw["progress"], kw["workers"], kw["shard"], kw["gather"])
        return metrics, None, extra
    metrics, clf = eval_one(enc.encode_image, enc.encode_text, enc.tokenizer, evalset, transform, device, batch_size,
                            **kw)
    return metrics, clf, {}


def _open_or_missing(e: DatasetEntry, root: str, strict: bool, log):
    """The dataset's reader, or None when it is missing (an error under ``strict``)."""

    try:
        return open_dataset(e.layout, root, e.split)
    except (FileNotFoundError, NotADirectoryError) as err:
        if strict:
            raise FileNotFoundError(f"dataset {e.name}: {err}") from None
        log(f"  {e.name}: missing ({root})")
        return None


def _cached_classifier(classifier_cache: Optional[str], e: DatasetEntry, names, templates, gather, device) -> tuple:
    """(the cache file of this dataset's zero-shot classifier or None, the classifier when every rank has it).
    ``classifier_cache`` is keyed by the weights; the file name adds the class names and templates, so editing
    either builds a new classifier (the old one was reused: 32.81% reported where the truth was 0%)."""
    import hashlib

    import torch

    if not classifier_cache or e.task != "zeroshot_classification":
        return None, None
    prompts = hashlib.sha1(json.dumps([list(names or []), list(templates or [])]).encode()).hexdigest()[:16]
    cache_file = os.path.join(classifier_cache, f"{e.name}-{prompts}.pt")
    # every rank must take the same path (building the classifier is itself sharded): use the cache only when
    # all of them see it
    if all(gather(os.path.exists(cache_file))):
        return cache_file, torch.load(cache_file, map_location=device, weights_only=True)
    return cache_file, None


def _save_classifier(cache_file: str, clf) -> None:
    import torch

    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    with atomic_write(cache_file, "wb") as f:  # another rank or run never reads half a file
        torch.save(clf.cpu(), f)


def _done(result: Dict, out_dir: Optional[str]) -> Dict:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_write(os.path.join(out_dir, f"{result['dataset']}.json")) as f:
            json.dump(result, f, indent=2)
    return result


def write_results(results: List[Dict], out_dir: str) -> str:
    """One JSON per dataset in CLIP_benchmark's shape, plus ``results.md`` (the table) and ``results.csv``.
    Returns the table."""
    import csv

    for r in results:
        _done(r, out_dir)
    md = table(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    keys = sorted({k for r in results for k in r["metrics"]})
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "task", "status"] + keys)
        for r in results:
            w.writerow([r["dataset"], r["task"], r["status"]] + [r["metrics"].get(k, "") for k in keys])
    return md


def compare(files: List[str]) -> str:
    """A side-by-side markdown table of the headline metric of result JSON files (one column per file)."""
    rows: Dict[str, List[Optional[float]]] = {}
    for i, path in enumerate(files):
        try:
            with open(path) as f:
                data = json.load(f)
            for r in data if isinstance(data, list) else [data]:
                rows.setdefault(r["dataset"], [None] * len(files))[i] = headline(r)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"--compare {path}: not an evaluation result file ({type(e).__name__}: {e})") from None
    lines = ["| dataset | " + " | ".join(os.path.basename(f) for f in files) + " |", "|---|" + "---|" * len(files)]
    for ds, vals in rows.items():
        lines.append(f"| {ds} | " + " | ".join("-" if v is None else f"{100 * v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def headline(r: Dict) -> Optional[float]:
    """The metric a table shows for a result: top-1 for classification, mean recall@5 for retrieval, CIDEr for
    captioning."""
    m = r.get("metrics") or {}
    if "cider" in m:
        return m["cider"]
    if "acc1" in m:
        return m["acc1"]
    if "image_retrieval_recall@5" in m:
        return (m["image_retrieval_recall@5"] + m["text_retrieval_recall@5"]) / 2
    return None


def table(results: List[Dict]) -> str:
    """A markdown table with the average of the available headline metrics."""
    lines = ["| dataset | task | metric | value |", "|---|---|---|---|"]
    vals = []
    for r in results:
        v = headline(r)
        metric = {"zeroshot_classification": "acc1", "captioning": "CIDEr x 100"}.get(r["task"], "mean R@5")
        lines.append(f"| {r['dataset']} | {r['task'].replace('zeroshot_', '')} | {metric} | "
                     f"{r['status'] if v is None else f'{100 * v:.2f}'} |")
        if v is not None and r["task"] != "captioning":  # the average is of accuracies and recalls
            vals.append(v)
    if vals:
        lines.append(f"| **average** ({len(vals)}) | | | **{100 * sum(vals) / len(vals):.2f}** |")
    return "\n".join(lines)
