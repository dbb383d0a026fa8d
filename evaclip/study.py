"""Studies on the embedded data (``make flywheel``, ``make distill``): in-process runs of shipped experiments with
overrides, and what their summaries read from them."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

from evaclip.checkpoint import find_checkpoint, read_meta
from evaclip.config import load_config, load_run_config
from evaclip.data.recipes import load_recipe
from evaclip.data.synth import write_all
from evaclip.metrics import read_metrics
from evaclip.preflight import resolve
from evaclip.train import Trainer


CLI = [sys.executable, "-m", "evaclip.cli"]  # the evaclip command in a child process (a study's capfilt pass)


def train_run(experiment: str, overrides: List[str], reuse: bool = False) -> Dict:
    """Train a shipped experiment with dotted overrides in this process; its result with the wall time.
    ``reuse``: a run already finished in that run dir (a study rerun after a crash) is read back, not trained."""
    import json

    cfg = load_config(experiment, overrides)
    derived = resolve(cfg)
    wall_file = os.path.join(derived.run_dir, "study_wall_s.json")
    if reuse and finished(derived.run_dir) and os.path.exists(wall_file):
        recs = [r for r in read_metrics(os.path.join(derived.run_dir, "metrics.jsonl")) if any(
            k.startswith("zeroshot/") for k in r)]
        print(f"[study] {derived.run_dir}: finished before, read back", flush=True)
        with open(wall_file) as f:
            wall = json.load(f)["wall_s"]
        return {"run_dir": derived.run_dir, "zeroshot": {k: v for k, v in recs[-1].items() if k.startswith(
            "zeroshot/")} if recs else {}, "wall_s": wall}
    t = time.time()
    result = Trainer(cfg, derived).train()
    result["wall_s"] = round(time.time() - t, 1)
    with open(wall_file, "w") as f:
        json.dump({"wall_s": result["wall_s"]}, f)
    return result


def check_demo_data(data: str) -> str:
    """The error of a study pointed at other data than `evaclip data synth`'s default (a smaller set a test or a
    trial wrote would make every figure of the study meaningless), or "" when it is the default's size."""
    import inspect

    recipe = os.path.join(data, "recipe.toml")
    if not os.path.exists(recipe):
        return f"{data} holds no synthetic data: run `evaclip data synth --out {data}` first"
    defaults = inspect.signature(write_all).parameters
    want = defaults["shards"].default * defaults["per_shard"].default
    have = sum(s.samples for s in load_recipe(recipe).source)
    if have != want:
        return (f"{data} holds {have} training samples, not the {want} of `evaclip data synth`'s default: the study's "
                f"figures are for the embedded default (rm -r {data} && evaclip data synth --out {data})")
    return ""


def study_parser(name: str, doc: str, out: str, seeds: List[int], teacher: bool = False) -> argparse.ArgumentParser:
    """A study's command line with what every study takes: --data, --out, --seeds (and --teacher, a demo CLIP)."""
    p = argparse.ArgumentParser(prog=f"python -m evaclip.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synth", help="the synthetic data (`evaclip data synth --out ...`)")
    if teacher:
        p.add_argument("--teacher", default="runs/demo_cpu", help="a finished demo CLIP run (else one is trained)")
    p.add_argument("--out", default=out, help="where the runs, summary.json and summary.md go")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="one run of each arm per seed")
    return p


def parse_study_args(p: argparse.ArgumentParser, argv, any_size: bool = False) -> Optional[argparse.Namespace]:
    """The parsed arguments, or None after saying why --data cannot serve (``check_demo_data``; with ``any_size``
    only that it exists)."""
    a = p.parse_args(argv)
    exists = os.path.exists(os.path.join(a.data, "recipe.toml"))
    problem = "" if any_size and exists else check_demo_data(a.data)
    if problem:
        print(problem, file=sys.stderr)
        return None
    return a


def warmup(steps: int) -> str:
    """10% of the steps (at most 15, demo_cpu's), for stages shorter than the experiments' defaults."""
    return f"schedule.warmup_steps={max(1, min(15, steps // 10))}" if steps > 1 else "schedule.warmup_steps=0"


def finished(run_dir: str) -> bool:
    """A run whose newest valid checkpoint is its last step."""

    try:
        _, derived = load_run_config(run_dir)
        return read_meta(find_checkpoint(run_dir, log=lambda *a: None))["step"] >= derived["steps"]
    except (OSError, ValueError, KeyError):
        return False


def demo_teacher(given: str, out: str, common: List[str], tag: str, extra: List[str] = (),
                 experiment: str = "demo_cpu", role: str = "teacher") -> Tuple[str, Optional[float]]:
    """The model a study starts from (a ``role``: teacher, captioner): ``given`` when it is a finished run, else
    ``<out>/<role>``, trained with ``experiment`` unless a finished one is already there (a rerun of the study does
    not train it again); (its run dir, the wall time spent training it here or None)."""
    if finished(given):
        print(f"[{tag}] {role}: {given}", flush=True)
        return given, None
    run_dir = os.path.join(out, role)
    if finished(run_dir):
        print(f"[{tag}] {role}: {run_dir} (trained by an earlier run of this study)", flush=True)
        return run_dir, None
    print(f"[{tag}] no finished {role} run given: training {experiment} into {run_dir}", flush=True)
    return run_dir, train_run(experiment, [*common, f"run.name={role}", *extra])["wall_s"]


def publish(out: str, summary: Dict, table: str) -> None:
    """A study's ``<out>/summary.json`` and ``<out>/summary.md`` (the table, also printed)."""
    import json

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def md_table(columns: List[str], lines: List[str]) -> str:
    """A markdown table: the header of ``columns`` over ``lines`` (each a whole ``| ... |`` row)."""
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + lines)


def margins(arms: List[Dict], ours: str, theirs: str) -> Dict:
    """How one arm's figure compares with the other's over the seeds: mean and least margin, seeds ahead, of how many."""
    m = [a[ours] - a[theirs] for a in arms]
    return {"margin_mean": statistics.mean(m), "margin_min": min(m), "ahead_on": sum(x > 0 for x in m), "of": len(m)}


def train_losses(run_dir: str) -> List[float]:
    """A run's logged train/loss, step by step."""

    return [r["train/loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "train/loss" in r]


def retrieval_r5(zeroshot: Dict) -> float:
    """Mean image and text R@5 on the held-out synthetic retrieval set (nan when it was not evaluated)."""
    keys = ("zeroshot/synth_retrieval/image_retrieval_recall@5", "zeroshot/synth_retrieval/text_retrieval_recall@5")
    vals = [zeroshot[k] for k in keys if k in zeroshot]
    return sum(vals) / len(vals) if vals else float("nan")
