"""Run logging: metrics.jsonl (always), tensorboard and wandb (when asked and installed), plots.png on rank 0;
per-sample losses (``log.sample_loss``) on every rank."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional

from evaclip.files import atomic_write


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm bar on stdout. Redirected to a file (a Slurm log), it refreshes every 30 s instead of every
    update, so a week-long run's log holds progress lines, not megabytes of carriage returns."""
    from tqdm import tqdm

    interactive = sys.stdout.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stdout,
                mininterval=0.1 if interactive else 30.0, **kw)


class MetricLogger:
    def __init__(self, run_dir: str, log_cfg, enabled: bool = True, run_name: str = "", config: Optional[Dict] = None):
        self.run_dir, self.cfg, self.enabled = run_dir, log_cfg, enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if log_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                pass
        if log_cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="evaclip", name=run_name, config=config, dir=run_dir)
            except ImportError:
                print("log.wandb = true but wandb is not installed; skipping wandb", flush=True)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out: Optional[str] = None) -> Optional[str]:
    """plots.png: training loss (and an objective's terms), learning rates, logit scale (MIM: gradient norm),
    zero-shot metrics over steps."""
    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return zip(*pts) if pts else ((), ())

    zs_keys = sorted({k for r in recs for k in r if k.startswith("zeroshot/") and k.endswith(("/acc1", "recall@1"))})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(*series("train/loss"), lw=1, label="loss")
    parts = sorted({k for r in recs for k in r if k.startswith("train/") and k.endswith("_loss")})
    for k in parts:  # an objective's terms (CoCa: contrastive and caption; distillation: clip and distill)
        ax.plot(*series(k), lw=1, label=k[len("train/"):])
    if parts:
        ax.legend(fontsize=8)
    for r in recs:  # loss-spike rollbacks: where the spike began and where the run went back to
        if "rollback/spike_step" in r:
            ax.axvspan(r["rollback/to_step"], r["step"], color="tab:red", alpha=0.15)
            ax.axvline(r["rollback/spike_step"], color="tab:red", lw=1, ls="--")
    ax.set_title("training loss (red: rolled-back spikes)")
    ax.set_xlabel("step")
    ax = axes[0][1]
    for k in sorted({k for r in recs for k in r if k.startswith("lr/")}):
        ax.plot(*series(k), label=k[3:])
    ax.set_title("learning rate (peak of each tower)")
    ax.legend(fontsize=8)
    ax = axes[1][0]  # CLIP: the temperature; MIM (no temperature): the gradient norm
    clip = any("train/logit_scale" in r for r in recs)
    ax.plot(*series("train/logit_scale" if clip else "train/grad_norm"), color="tab:purple")
    ax.set_title("exp(logit_scale)" if clip else "gradient norm")
    ax = axes[1][1]
    for k in zs_keys:
        ax.plot(*series(k), marker="o", label=k[len("zeroshot/"):])
    ax.set_title("zero-shot")
    if zs_keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "plots.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


class StepRowLog:
    """Rows keyed by training step (one per sample), a parquet file per rank and checkpoint interval under
    <run>/<folder>/: ``log.sample_loss`` (step, key, source, shard_id, loss) and ``data.log_keys`` (step, key, source,
    stream).

    Rows are buffered and written just before a checkpoint is (``flush``), so a kill after a checkpoint loses
    none of its steps; a resumed or rolled-back run first drops what lies beyond the step it restarts from
    (``truncate``: rows of a save that did not complete) and then writes those steps again, never twice."""

    _NAME = re.compile(r"rank(\d+)_steps(\d+)-(\d+)\.parquet$")
    COLUMNS: Dict[str, str] = {}  # column -> pyarrow type name, after "step"

    def __init__(self, run_dir: str, folder: str, rank: int, start_step: int, world_size: int = 1):
        self.dir, self.rank, self.world_size = os.path.join(run_dir, folder), rank, world_size
        os.makedirs(self.dir, exist_ok=True)
        self.rows: Dict[str, list] = {k: [] for k in ("step", *self.COLUMNS)}
        self.truncate(start_step)

    def _add(self, step: int, **columns) -> None:
        n = {len(v) for v in columns.values()}
        if len(n) != 1:
            raise ValueError(f"{os.path.basename(self.dir)} log: columns of different lengths at step {step}")
        self.rows["step"] += [step] * n.pop()
        for k, v in columns.items():
            self.rows[k] += list(v)

    def flush(self) -> Optional[str]:
        import pyarrow as pa

        if not self.rows["step"]:
            return None
        first, last = self.rows["step"][0], self.rows["step"][-1]
        path = os.path.join(self.dir, f"rank{self.rank:04d}_steps{first:09d}-{last:09d}.parquet")
        types = dict(step="int64", **self.COLUMNS)
        table = pa.table({k: pa.array(v, getattr(pa, types[k])()) for k, v in self.rows.items()})
        self._write(table, path)
        self.rows = {k: [] for k in self.rows}
        return path

    @staticmethod
    def _write(table, path: str) -> None:
        import pyarrow.parquet as pq

        with atomic_write(path, "wb") as f:
            pq.write_table(table, f)

    def truncate(self, step: int) -> None:
        """Forget every row after ``step`` (buffered or on disk) of this rank; rank 0 also of the ranks a run
        resumed on fewer ranks no longer has."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        keep = [i for i, s in enumerate(self.rows["step"]) if s <= step]
        self.rows = {k: [v[i] for i in keep] for k, v in self.rows.items()}
        for name in os.listdir(self.dir):
            m = self._NAME.match(name)
            if not m or int(m.group(3)) <= step:
                continue
            owner = int(m.group(1))
            if owner != self.rank and not (self.rank == 0 and owner >= self.world_size):
                continue
            path = os.path.join(self.dir, name)
            if int(m.group(2)) > step:
                os.remove(path)
                continue
            table = pq.read_table(path)  # spans the restart step: keep its first part
            table = table.filter(pc.less_equal(table.column("step"), step))
            self._write(table, os.path.join(self.dir, f"rank{owner:04d}_steps{int(m.group(2)):09d}-{step:09d}.parquet"))
            os.remove(path)


class SampleLossLog(StepRowLog):
    """``log.sample_loss``: each sample's contrastive loss, <run>/sample_loss/ (input for `evaclip data filter`), and
    the identity of the shard it was read from (``shard_id``, bytes:digest), which `data filter --shards` checks."""

    COLUMNS = {"key": "string", "source": "string", "shard_id": "string", "loss": "float32"}

    def __init__(self, run_dir: str, rank: int, start_step: int, world_size: int = 1):
        super().__init__(run_dir, "sample_loss", rank, start_step, world_size)

    def add(self, step: int, keys, sources, shards, losses) -> None:
        losses = losses.detach().float().cpu().tolist()
        if len(keys) != len(losses):
            raise ValueError(f"sample loss log: {len(keys)} keys for {len(losses)} losses at step {step}")
        self._add(step, key=keys, source=sources, shard_id=shards, loss=losses)


class KeyLog(StepRowLog):
    """``data.log_keys``: the samples every step trained on (step, key, source, the stream that read it:
    ``rank<r>/worker<w>``), <run>/keys/: what a run saw, for audits and for comparing runs."""

    COLUMNS = {"key": "string", "source": "string", "stream": "string"}

    def __init__(self, run_dir: str, rank: int, start_step: int, world_size: int = 1):
        super().__init__(run_dir, "keys", rank, start_step, world_size)

    def add(self, step: int, keys, sources, streams) -> None:
        self._add(step, key=keys, source=sources, stream=streams)
