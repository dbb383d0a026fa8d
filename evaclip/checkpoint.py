"""Run-directory checkpoints: atomic step directories, a manifest of checksums, a ``latest`` pointer, pruning,
verified resume with fallback.

    <run_dir>/checkpoints/step-00001000/   engine state (the engine's own files, see engine/base.py),
                                           rank00000.pt ... (per-rank data position + RNG states, tensors and
                                           plain types only), meta.json (step, samples seen, model record ...),
                                           manifest.json (size + sha256 of every file) -- written last
    <run_dir>/checkpoints/latest           text: the tag of the newest complete checkpoint

A checkpoint is written under ``.tmp-step-N`` and renamed after every rank has finished and the manifest is
written; ``latest`` is then replaced atomically. A kill at any point leaves ``latest`` naming a complete
checkpoint. Resume and export verify the manifest (sizes and checksums) and the weights (finite); a damaged
checkpoint is reported and the newest valid one before it is used instead.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from evaclip import dist as edist
from evaclip.engine import read_weights
from evaclip.errors import CheckpointError, TrainingStopped
from evaclip.files import atomic_write, replace_dir
from evaclip.safe_load import load_torch

META, MANIFEST = "meta.json", "manifest.json"
ROLLED_BACK = "rolled-back-"  # prefix of the checkpoints a rollback set aside
_OPT_IN = "checkpoint.trust_pickle=true (or --trust-pickle)"


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------------- RNG
def rng_state() -> Dict:
    """The process's RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)],
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------------- manifest
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: str) -> List[str]:
    out = []
    for dirpath, _, names in os.walk(ckpt):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(ckpt: str) -> str:
    """Size and sha256 of every file of a checkpoint dir; the ranks hash a share each (collective)."""
    files = _files(ckpt)
    mine = {f: {"size": os.path.getsize(os.path.join(ckpt, f)), "sha256": _sha256(os.path.join(ckpt, f))}
            for i, f in enumerate(files) if i % edist.world_size() == edist.rank()}
    entries: Dict[str, Dict] = {}
    for part in edist.all_gather_objects(mine):
        entries.update(part)
    path = os.path.join(ckpt, MANIFEST)
    if edist.is_main():
        with atomic_write(path) as f:
            f.write(json.dumps({"files": entries}, indent=1, sort_keys=True))
    return path


def verify_checkpoint(ckpt: str, checksums: bool = True) -> Optional[str]:
    """None if the checkpoint is complete and intact, else what is wrong (one line)."""
    try:
        with open(os.path.join(ckpt, MANIFEST)) as f:
            entries = json.load(f)["files"]
    except FileNotFoundError:
        return "no manifest (an interrupted save)"
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, want in sorted(entries.items()):
        p = os.path.join(ckpt, rel)
        if not os.path.exists(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != want["size"]:
            return f"{rel} has {os.path.getsize(p)} bytes, the manifest says {want['size']} (truncated?)"
        if checksums and _sha256(p) != want["sha256"]:
            return f"{rel} does not match its checksum (corrupted)"
    try:
        with open(os.path.join(ckpt, META)) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"{META} is unreadable ({e})"
    return None


def checkpoint_identity(ckpt: str) -> str:
    """``step-N-<manifest checksum>``: changes whenever any file of the checkpoint does (cache keys)."""
    with open(os.path.join(ckpt, META)) as f:
        step = json.load(f)["step"]
    return f"step{step}-{_sha256(os.path.join(ckpt, MANIFEST))[:16]}"


# ---------------------------------------------------------------------------------------------------- save
def save_checkpoint(engine, run_dir: str, step: int, meta: Dict, rank_state: Dict, keep_last: int) -> str:
    """Write a complete checkpoint for ``step`` (collective: every rank calls it)."""
    root, tag = ckpt_root(run_dir), tag_for(step)
    tmp, final = os.path.join(root, f".tmp-{tag}"), os.path.join(root, tag)
    # no checkpoint holds non-finite weights: it would push good ones out of keep_last. Each rank checks what it
    # holds (under ZeRO-3 its partitions live in the engine; the trainer also saves only after a finite step)
    bad = _non_finite(engine.model.named_parameters())
    if edist.all_reduce_sum(torch.tensor([float(len(bad))], device=engine.device)).item() > 0:
        raise TrainingStopped(f"step {step}: non-finite weights ({', '.join(bad[:4]) or 'on another rank'}); no "
                              f"checkpoint written, the kept ones in {root} are from before (resume from them with "
                              "a lower lr, or enable spike.enabled to roll back automatically)")
    try:
        if edist.is_main():
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        edist.barrier(f"checkpoint step {step} (start)")
        engine.save(tmp)
        torch.save(rank_state, _rank_file(tmp, edist.rank()))
        edist.barrier(f"checkpoint step {step} (every rank's files written)")
        if edist.is_main():
            with atomic_write(os.path.join(tmp, META)) as f:
                f.write(json.dumps(dict(meta, step=step, tag=tag), indent=2))
        edist.barrier(f"checkpoint step {step} (meta written)")
        write_manifest(tmp)  # last: its presence marks the checkpoint complete
        if edist.is_main():
            replace_dir(tmp, final)
            with atomic_write(os.path.join(root, "latest")) as f:
                f.write(tag + "\n")
            prune(root, keep_last)
    except (OSError, RuntimeError) as e:
        if edist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves no partial folder behind
        if not _disk_full(e, root):
            raise
        free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
        raise TrainingStopped(
            f"disk full while saving checkpoint step {step} to {root} ({free / 2**30:.1f} GiB free): a save needs room "
            f"for one checkpoint more than checkpoint.keep_last = {keep_last} keeps; free space and rerun the same "
            "command (it resumes from the last complete checkpoint)") from None
    edist.barrier(f"checkpoint step {step} (renamed into place)")
    return final


def _disk_full(e: BaseException, root: str) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as torch.save's RuntimeError: its zip writer loses the errno (seen on a
    full tmpfs: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), so a writer failure with
    under 256 MiB left on the disk counts as full too."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    if any(s in text for s in ("No space left", "errno 28", "Disk quota")):
        return True
    return "inline_container" in text and os.path.isdir(root) and shutil.disk_usage(root).free < 256 * 2 ** 20


def complete_checkpoints(root: str) -> List[str]:
    """Tags of the checkpoints whose manifest exists (cheap; ``verify_checkpoint`` checks them)."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.exists(os.path.join(root, d, MANIFEST)))


def prune(root: str, keep_last: int) -> None:
    tags = complete_checkpoints(root)
    for t in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    for d in os.listdir(root):  # set aside by a rollback: kept until the kept checkpoints are all newer
        if d.startswith(ROLLED_BACK) and tags and d[len(ROLLED_BACK):] < tags[-keep_last:][0]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    for d in os.listdir(root):  # leftovers of interrupted saves
        if d.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def rewind(run_dir: str, ckpt: str) -> List[str]:
    """After a rollback to ``ckpt`` (rank 0): ``latest`` names it again and the newer checkpoints are set aside as
    ``rolled-back-<tag>`` (not resumed, kept for a look until pruned); returns those set aside."""
    root, tag = ckpt_root(run_dir), os.path.basename(ckpt.rstrip("/"))
    with atomic_write(os.path.join(root, "latest")) as f:
        f.write(tag + "\n")
    newer = [t for t in complete_checkpoints(root) if t > tag]
    for t in newer:
        replace_dir(os.path.join(root, t), os.path.join(root, ROLLED_BACK + t))
    return newer


def candidates(run_dir: str) -> List[str]:
    """Complete checkpoints of a run, newest first (``latest`` first when it names one)."""
    root = ckpt_root(run_dir)
    tags = complete_checkpoints(root)[::-1]
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            tag = f.read().strip()
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return [os.path.join(root, t) for t in tags]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run (by its manifest; not verified)."""
    c = candidates(run_dir)
    return c[0] if c else None


def is_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, META)) or os.path.exists(os.path.join(path, MANIFEST))


def read_meta(ckpt: str) -> Dict:
    with open(os.path.join(ckpt, META)) as f:
        return json.load(f)


def resume_candidates(resume: str, run_dir: str) -> List[str]:
    """``auto``: the run's complete checkpoints, newest first; ``none``: none; else that checkpoint alone."""
    if resume == "none":
        return []
    if resume == "auto":
        return candidates(run_dir)
    if not is_checkpoint(resume):
        raise CheckpointError(f"checkpoint.resume = {resume!r} is not a checkpoint directory (no {MANIFEST})")
    return [resume]


def _non_finite(named) -> List[str]:
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_checkpoint(engine, paths: List[str], trust_pickle: bool = False, log: Callable = print) -> Tuple[str, Dict, Dict]:
    """Restore the first valid checkpoint of ``paths`` (newest first), reporting the ones skipped.

    Collective: rank 0 verifies, every rank loads, the finiteness check is agreed over all ranks.
    Returns (path, meta, this rank's state); the state is None when the checkpoint was written by another
    number of ranks (the engine re-partitioned its state; ``rank_states`` reads every saved rank's)."""
    problems = []
    for path in paths:
        reason = edist.all_gather_objects(verify_checkpoint(path) if edist.is_main() else None)[0]
        if reason is None:
            engine.load(path, trust_pickle=trust_pickle)
            with engine.full_weights() as m:
                bad = _non_finite(m.state_dict().items())
            flag = edist.all_reduce_sum(torch.tensor([float(len(bad))], device=engine.device))
            if flag.item() > 0:
                reason = f"non-finite weights ({', '.join(bad[:4]) or 'on another rank'})"
        if reason is None:
            meta = read_meta(path)
            if meta.get("world_size", edist.world_size()) != edist.world_size():
                return path, meta, None  # written by another number of ranks: see rank_states
            rank_file = _rank_file(path, edist.rank())
            if not os.path.exists(rank_file):
                raise CheckpointError(f"{path} has no state for rank {edist.rank()}; resume with the same world size")
            return path, meta, load_torch(rank_file, "checkpoint", trust_pickle, _OPT_IN)
        problems.append(f"{os.path.basename(path)}: {reason}")
        log(f"checkpoint {path} is not usable: {reason}; falling back to the previous one")
    raise CheckpointError("no valid checkpoint to resume from: " + "; ".join(problems)
                          + " (checkpoint.resume=none starts afresh)")


def _rank_file(ckpt: str, rank: int) -> str:
    """The file of one rank's own state (data position, RNG, order hash) in a checkpoint."""
    return os.path.join(ckpt, f"rank{rank:05d}.pt")


def rank_states(ckpt: str, world_size: int, trust_pickle: bool = False) -> List[Dict]:
    """The per-rank states (``rank00000.pt`` ...) of a checkpoint written by ``world_size`` ranks."""
    out = []
    for r in range(world_size):
        f = _rank_file(ckpt, r)
        if not os.path.exists(f):
            raise CheckpointError(f"{ckpt} has no state for rank {r} of the {world_size} that wrote it")
        out.append(load_torch(f, "checkpoint", trust_pickle, _OPT_IN))
    return out


def find_checkpoint(path: str, log: Callable = print) -> str:
    """A verified checkpoint: ``path`` itself, or a run dir's newest valid checkpoint (reporting damaged ones)."""
    if is_checkpoint(path):
        reason = verify_checkpoint(path)
        if reason:
            raise CheckpointError(f"{path}: {reason}")
        return path
    problems = []
    for c in candidates(path):
        reason = verify_checkpoint(c)
        if reason is None:
            return c
        problems.append(f"{os.path.basename(c)}: {reason}")
        log(f"checkpoint {c} is not usable: {reason}; falling back to the previous one")
    if problems:
        raise CheckpointError(f"{path}: no valid checkpoint ({'; '.join(problems)})")
    raise FileNotFoundError(f"{path}: neither a checkpoint nor a run dir with checkpoints")


def load_weights(path: str, trust_pickle: bool = False, log: Callable = print,
                 opt_in: str = _OPT_IN) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Full fp32 model weights and meta of a verified checkpoint (or a run dir's newest valid one), whatever
    engine wrote it; non-finite weights are refused. ``opt_in``: the setting a refusal names (the caller's)."""

    ckpt = find_checkpoint(path, log)
    sd = read_weights(ckpt, trust_pickle, opt_in)
    bad = _non_finite(sd.items())
    if bad:
        raise CheckpointError(f"{ckpt}: non-finite weights in {', '.join(bad[:6])}; use an earlier checkpoint")
    meta = read_meta(ckpt)
    meta["checkpoint"] = ckpt
    return sd, meta
