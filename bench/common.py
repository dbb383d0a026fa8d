"""Timing and memory helpers shared by the benchmarks.

These machines are shared and noisy: every figure is the median of >= 5 repetitions after warm-up, with
its spread (min-max), and every comparison is a ratio against a peer measured in the same run.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summarize(times: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def timeit(fn: Callable[[], None], reps: int = 5, warmup: int = 1) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return summarize(times)


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux: write 5 to /proc/self/clear_refs).
    Needed because a forked child starts with its parent's high-water mark (ru_maxrss even survives exec)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process image (VmHWM; falls back to ru_maxrss)."""
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run_child(module: str, args: Dict, timeout: int = 1200) -> Dict:
    """Run ``python -m bench.<module>`` with JSON args in a fresh process (clean peak memory); returns its JSON."""
    cmd = [sys.executable, "-m", f"bench.{module}", json.dumps(args)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=REPO))
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-1500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt_ms(s: Dict[str, float]) -> str:
    return f"{1000 * s['median']:.1f} ms [{1000 * s['min']:.1f}-{1000 * s['max']:.1f}]"
