"""What the command modules share: the help formatter and a progress bar that leaves no trace."""
from __future__ import annotations

import argparse
import math
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
