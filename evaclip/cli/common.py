"""What the command modules share: the help formatter and a progress bar that leaves no trace."""
from __future__ import annotations

import argparse
import math
from typing import Optional

FORMATTER = argparse.RawDescriptionHelpFormatter


def progress(total: Optional[int], desc: str, unit: str = "it"):
    from evaclip.metrics import progress_bar

    return progress_bar(total, desc, unit, leave=False)


def number(kind=int, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None):
    """An argparse ``type`` for a finite number in a range: a bad value is argparse's one-line error naming the
    option (``argument --batch-size: must be >= 1, got 0``), before any work starts."""
    bounds = [(sym, b, test) for sym, b, test in ((">=", ge, lambda v, b: v >= b), (">", gt, lambda v, b: v > b),
                                                  ("<=", le, lambda v, b: v <= b)) if b is not None]

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not all(test(v, b) for _, b, test in bounds):
            raise argparse.ArgumentTypeError(f"must be {' and '.join(f'{s} {b}' for s, b, _ in bounds)}, got {text}")
        return v

    return parse
