"""What the command modules share: the help formatter and a progress bar that leaves no trace."""
from __future__ import annotations

import argparse
from typing import Optional

FORMATTER = argparse.RawDescriptionHelpFormatter


def progress(total: Optional[int], desc: str, unit: str = "it"):
    from evaclip.metrics import progress_bar

    return progress_bar(total, desc, unit, leave=False)
