"""Run-directory checkpoints: atomic step directories, a ``latest`` pointer, pruning, resume.

    <run_dir>/checkpoints/step-00001000/   engine state (the engine's own files, see engine.py),
                                           rank00000.pt ... (per-rank data position + RNG states),
                                           meta.json (step, samples seen, ...) -- written last
    <run_dir>/checkpoints/latest           text: the tag of the newest complete checkpoint

A checkpoint is written under ``.tmp-step-N`` and renamed after every rank has finished; ``latest`` is then
replaced atomically. A kill at any point leaves ``latest`` naming a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from evaclip import dist as edist

META = "meta.json"


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(engine, run_dir: str, step: int, meta: Dict, rank_state: Dict, keep_last: int) -> str:
    """Write a complete checkpoint for ``step`` (collective: every rank calls it)."""
    root, tag = ckpt_root(run_dir), tag_for(step)
    tmp, final = os.path.join(root, f".tmp-{tag}"), os.path.join(root, tag)
    if edist.is_main():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    edist.barrier()
    engine.save(tmp)
    torch.save(rank_state, os.path.join(tmp, f"rank{edist.rank():05d}.pt"))
    edist.barrier()
    if edist.is_main():
        _atomic_write(os.path.join(tmp, META), json.dumps(dict(meta, step=step, tag=tag), indent=2))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(os.path.join(root, "latest"), tag + "\n")
        prune(root, keep_last)
    edist.barrier()
    return final


def complete_checkpoints(root: str):
    if not os.path.isdir(root):
        return []
    tags = [d for d in os.listdir(root) if d.startswith("step-") and os.path.exists(os.path.join(root, d, META))]
    return sorted(tags)


def prune(root: str, keep_last: int) -> None:
    tags = complete_checkpoints(root)
    for t in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    for d in os.listdir(root):  # leftovers of interrupted saves
        if d.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run (``latest`` if it is complete, else the newest with meta)."""
    root = ckpt_root(run_dir)
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            tag = f.read().strip()
        if os.path.exists(os.path.join(root, tag, META)):
            return os.path.join(root, tag)
    tags = complete_checkpoints(root)
    return os.path.join(root, tags[-1]) if tags else None


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """``auto`` -> latest complete checkpoint of the run (or None); ``none`` -> None; else a checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if not os.path.exists(os.path.join(resume, META)):
        raise FileNotFoundError(f"checkpoint.resume = {resume!r} is not a complete checkpoint (no {META})")
    return resume


def load_checkpoint(engine, path: str) -> Tuple[Dict, Dict]:
    """Restore engine state; return (meta, this rank's state)."""
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    engine.load(path)
    rank_file = os.path.join(path, f"rank{edist.rank():05d}.pt")
    if not os.path.exists(rank_file):
        raise RuntimeError(f"{path} has no state for rank {edist.rank()}; resume with the same world size")
    return meta, torch.load(rank_file, map_location="cpu", weights_only=False)


def find_checkpoint(path: str) -> str:
    """A checkpoint dir from a run dir (its latest) or a checkpoint dir itself."""
    if os.path.exists(os.path.join(path, META)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {META}) nor a run dir with checkpoints")
    return latest


def load_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Full fp32 model weights and meta of a checkpoint (or a run dir's latest), whatever engine wrote it."""
    from evaclip.engine import read_weights

    ckpt = find_checkpoint(path)
    with open(os.path.join(ckpt, META)) as f:
        meta = json.load(f)
    return read_weights(ckpt), meta
