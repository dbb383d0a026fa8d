"""What the command modules share: the help formatter, a progress bar that leaves no trace, number ranges and the
options of a job over shards (score, reinforce, capfilt)."""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

from evaclip.files import out_of_range, range_text

FORMATTER = argparse.RawDescriptionHelpFormatter


def progress(total: Optional[int], desc: str, unit: str = "it"):
    from evaclip.metrics import progress_bar

    return progress_bar(total, desc, unit, leave=False)


def number(kind=int, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None):
    """An argparse ``type`` for a finite number in a range: a bad value is argparse's one-line error naming the
    option (``argument --batch-size: must be >= 1, got 0``), before any work starts."""
    bounds = {"ge": ge, "gt": gt, "le": le}

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if out_of_range(v, bounds):
            raise argparse.ArgumentTypeError(f"must be {range_text(bounds)}, got {text}")
        return v

    return parse


def add_shard_source(p: argparse.ArgumentParser) -> None:
    """The input of a job over shards: a recipe or a brace pattern, and its {root}."""
    p.add_argument("source", help="a recipe (built-in name or TOML file) or a brace pattern of tar shards")
    p.add_argument("--root", default="", help="value of {root} in the pattern / recipe")


def add_shard_job(p: argparse.ArgumentParser, batch_size: int, batch_help: str, workers_help: str,
                  precision: bool = True) -> None:
    """How a job over shards runs: batch, decoding threads, device (and precision), its part, pickle consent."""
    p.add_argument("--batch-size", type=number(int, ge=1), default=batch_size, help=batch_help)
    p.add_argument("--workers", type=number(int, ge=0), default=2, help=workers_help)
    p.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: each rank its LOCAL_RANK's GPU)")
    if precision:
        p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--part", default="0/1", metavar="I/N", help="only the shards with index %% N == I")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled (non-safetensors) checkpoint")


def rank_device(device: str) -> str:
    """``cuda`` under torchrun is this rank's GPU (one GPU per rank); any other device as given."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device
