"""The one resolver of model sources: what a string naming a model points at (``distill.teacher``, ``mim.teacher``,
``data reinforce --teacher``, ``data capfilt --captioner / --scorer``), and its identity, which changes whenever the
weights do (a resume and a reinforced shard compare it).

    an export folder (holds open_clip_config.json)      kind "export"
    an evaclip run dir or checkpoint dir                 kind "checkpoint"
    open_clip:<name>, with a weights file (or a tag)     kind "open_clip"
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Union

import torch

from evaclip.checkpoint import checkpoint_identity, find_checkpoint, is_checkpoint, latest_checkpoint, read_meta
from evaclip.errors import ConfigError
from evaclip.files import sampled_digest
from evaclip.models.convert import weights_file


@dataclass(frozen=True)
class Source:
    kind: str  # "export" | "checkpoint" | "open_clip"
    path: str  # the export folder, the run / checkpoint dir; for open_clip its weights ("" or a tag: open_clip's)
    name: str = ""  # open_clip's model name (kind "open_clip")


def resolve_source(src: str, weights: str = "", setting: str = "") -> Source:
    """Where ``src`` (with ``weights`` for ``open_clip:<name>``) points; one that does not exist is an error
    (naming ``setting`` where given)."""
    if src.startswith("open_clip:"):
        return Source("open_clip", weights, src[len("open_clip:"):])
    if os.path.isfile(os.path.join(src, "open_clip_config.json")):
        return Source("export", src)
    if os.path.exists(src):
        return Source("checkpoint", src)
    raise ConfigError(f"{setting + ': ' if setting else ''}{src} does not exist (an evaclip run dir or checkpoint, an export folder, or "
                      "open_clip:<name>)")


def source_identity(src: Union[str, Source], weights: str = "", setting: str = "") -> str:
    """The identity of the model ``src`` names (or of a Source already resolved), without building it (a big
    teacher need not fit in memory to be compared with the one a reinforced shard or a checkpoint records)."""
    source = src if isinstance(src, Source) else resolve_source(src, weights, setting)
    if source.kind == "open_clip":
        if source.path and not os.path.exists(source.path):
            raise ConfigError(f"{setting + '_weights: ' if setting else ''}{source.path}: no such weights file")
        return fingerprint(source.name, source.path)
    if source.kind == "export":
        return fingerprint("export", source.path)
    return checkpoint_identity(find_checkpoint(source.path, log=lambda *a: None))


def fingerprint(name: str, pretrained: str) -> str:
    """The model name and its weights' content (size, first and last MiB; a folder's whole-model file, else its
    first weights file): a copy of the same file elsewhere is the same model, the file rewritten another."""
    if pretrained and os.path.isdir(pretrained):
        found = weights_file(pretrained)
        stamp = sampled_digest(found) if found else ""
    elif pretrained and os.path.exists(pretrained):
        stamp = sampled_digest(pretrained)
    else:
        stamp = pretrained  # an open_clip tag
    return hashlib.sha1(f"{name}|{stamp}".encode()).hexdigest()[:16]


def meta_model(source: Source, setting: str, math_attention: bool = False, export_as_open_clip: bool = False):
    """``(model, record)``: the model a source names, built on the meta device from its record (an evaclip run,
    checkpoint or export; ``record`` is that record) or its open_clip config (``record`` None); no weights read,
    so a 5B-parameter teacher is planned in seconds. ``math_attention``: an evaclip model's attention written out
    as matmuls (what a FLOP counter sees; on the meta device a fused kernel's memory is traced otherwise).
    ``export_as_open_clip``: an export folder built by open_clip, as ``encoders.load_source`` builds it."""
    # a real cycle: the factory (evaclip.models) imports this module
    from evaclip.models import model_from_record

    record = None
    if source.kind == "checkpoint":
        found = source.path if is_checkpoint(source.path) else latest_checkpoint(source.path)
        if found is None:
            raise ConfigError(f"{setting}: {source.path} is neither an evaclip checkpoint nor a run dir with "
                              "checkpoints")
        record = read_meta(found)["model"]
    elif source.kind == "export" and not export_as_open_clip:
        with open(os.path.join(source.path, "open_clip_config.json")) as f:
            record = json.load(f).get("evaclip", {}).get("model")
    if record is not None:
        if math_attention:
            record = json.loads(json.dumps(record))
            for tower in ("vision", "text"):
                record["config"][tower]["attn_impl"] = "math"
        return model_from_record(record, device="meta"), record
    import open_clip

    name = source.name if source.kind == "open_clip" else f"local-dir:{source.path}"
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: none are wanted
    try:
        with torch.device("meta"):
            return open_clip.create_model(name, pretrained=None, device="meta", load_weights=False), None
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        why = str(e).splitlines()[0].split(" Available:")[0]  # not the list of every model open_clip has
        raise ConfigError(f"{setting}: open_clip cannot build {name} ({why})") from None
    finally:
        logging.disable(level)
