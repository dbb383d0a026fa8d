"""The histogram ``data filter`` draws of the --by column per source: kept and dropped samples, and the cuts."""
from __future__ import annotations

from typing import Dict


class Histogram:
    """Per-source kept / dropped counts of the --by column over fixed bins (memory: the bins, not the rows)."""

    def __init__(self, lo: float, hi: float, bins: int = 60):
        import numpy as np

        self.edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        self.counts: Dict[str, Dict[str, "np.ndarray"]] = {}

    def add(self, values, sources, keep) -> None:
        import numpy as np

        for src in np.unique(sources):
            sel = sources == src
            c = self.counts.setdefault(str(src), {"kept": np.zeros(len(self.edges) - 1), "dropped": np.zeros(len(self.edges) - 1)})
            c["kept"] += np.histogram(values[sel & keep], self.edges)[0]
            c["dropped"] += np.histogram(values[sel & ~keep], self.edges)[0]

    def save(self, path: str, by: str, cuts: Dict, min_value, max_value) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = sorted(self.counts) or [""]
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
        width = self.edges[1] - self.edges[0]
        for ax, src in zip(axes[:, 0], names):
            c = self.counts.get(src, {})
            for what, colour in (("kept", "tab:green"), ("dropped", "tab:red")):
                if what in c:
                    ax.bar(self.edges[:-1], c[what], width=width, align="edge", color=colour, alpha=0.65,
                           label=f"{what} ({int(c[what].sum()):,})")
            marks = [v for v in (min_value, max_value, *cuts.get(src, {}).values()) if v is not None]
            for v in marks:
                if abs(v) != float("inf"):
                    ax.axvline(v, color="black", linestyle="--", label=f"cut {v:.4g}")
            ax.set_title(f"{src or 'all'}: {by}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
