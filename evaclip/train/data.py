"""This rank's training input: the logical streams it owns, the loader over them, its position (saved in every
checkpoint, so a resume continues with the next sample) and a running hash of the data order."""
from __future__ import annotations

import contextlib
import functools
import math
import time
import zlib
from typing import Callable, Dict, Iterator, List, Optional

import torch

from evaclip import dist as edist
from evaclip.checkpoint import rank_states
from evaclip.data.recipes import load_recipe, recipe_from_shards
from evaclip.data.transforms import crop_view, draft_side, make_tokenizer, train_transform
from evaclip.data.loader import make_loader, stop_workers
from evaclip.data.pipeline import DataState, ImageTextStream
from evaclip.data.streams import build_stream_spec
from evaclip.data.topology import check_streams
from evaclip.errors import ConfigError, StopInterrupt, TrainingStopped
from evaclip.train.resume import same_ranks_only


def logical_streams(cfg, saved: Optional[Dict], world: int, global_batch: int) -> int:
    """The run's logical data streams: ``data.streams``, else the checkpoint's, else ranks x workers now (0: a
    checkpoint from before logical streams, which resumes with per-worker streams). ``cfg``: the [data] section."""
    if saved is not None and "data.num_streams" not in saved:
        return 0
    workers = max(1, cfg.workers)
    n = cfg.streams or (saved or {}).get("data.num_streams") or world * workers
    why = check_streams(n, global_batch, world, workers)
    if why:
        raise ConfigError(f"the run's {n} logical data streams cannot serve {world} ranks x {workers} "
                          f"data.workers: {why}; change data.workers (the streams are fixed for the run)")
    return n


def worker_error(e: Exception, bound: float) -> str:
    """The first line of a DataLoader worker's error (the loader wraps it in traceback text)."""
    msg = str(e)
    if "DataLoader timed out" in msg:
        return (f"no batch within {2 * bound + 30:g} s (the loader's bound, data.batch_timeout_s = {bound:g}): a "
                "worker is blocked reading a shard")
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return msg.splitlines()[0] if msg else type(e).__name__


class TrainData:
    """The batches of one rank. ``open`` starts the loader at the current position; ``next_step`` returns the
    micro-batches of one optimizer step; ``state_dict`` / ``load_state_dict`` carry the position and order hash."""

    def __init__(self, cfg, seed: int, variant, text_cfg, uses_text: bool, device: torch.device,
                 global_batch: int, accum_steps: int, num_streams: int):
        self.cfg, self.seed, self.variant, self.text_cfg, self.uses_text = cfg, seed, variant, text_cfg, uses_text
        self.device, self.global_batch, self.accum_steps, self.num_streams = device, global_batch, accum_steps, num_streams
        self.positions: Optional[Dict] = None  # per-stream (or per-worker) positions to start from
        self.order_hash = 0  # running CRC of the sample keys consumed: the data order, comparable across runs
        self.state: Optional[DataState] = None
        self.iterator: Optional[Iterator] = None
        self.waiting: Optional[tuple] = None  # (since, what) while the run waits for data: a signal may end it

    def open(self) -> None:
        """Build the stream and the DataLoader, starting at ``positions``."""
        c, v = self.cfg, self.variant
        recipe = load_recipe(c.recipe) if c.recipe else recipe_from_shards(c.shards)
        spec = build_stream_spec(recipe, c.root, self.seed, edist.rank(), edist.world_size(),
                                 c.resampled, c.shuffle_buffer, batch_timeout_s=c.batch_timeout_s,
                                 num_streams=self.num_streams, step_samples=self.global_batch)
        transform = train_transform(v.image_size, v.mean, v.std, c.crop_scale, v.interpolation, c.hflip)
        tokenizer = make_tokenizer(v.context_length, self.text_cfg.kind, self.text_cfg.hf_path) \
            if self.uses_text else None  # MIM: images only
        stored = functools.partial(crop_view, image_size=v.image_size, mean=v.mean, std=v.std,
                                   interpolation=v.interpolation)
        stream = ImageTextStream(spec, c.micro_batch_size, transform, tokenizer,
                                 min_side=draft_side(v.image_size, c.crop_scale[0]), stored_crop=stored)
        stream.set_state(self.positions)
        self.state = DataState(self.positions)
        self.iterator = iter(make_loader(stream, c.workers, pin_memory=self.device.type == "cuda"))

    def close(self) -> None:
        """Shut the DataLoader workers down now. They ignore SIGTERM (so a process-group signal reaches the main
        process first): left to interpreter exit, multiprocessing would SIGTERM and then wait for them forever."""
        stop_workers(self.iterator)
        self.iterator = None

    def reopen(self) -> None:
        """Start again from the positions last loaded (after a rollback)."""
        self.close()
        self.open()

    def _next(self) -> Dict:
        """The loader's next batch; a worker's error arrives as the loader's "Caught X in DataLoader worker process
        N" and its traceback text (whatever X, TrainingStopped included): it becomes its own message again."""
        try:
            return next(self.iterator)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, TrainingStopped) and "Original Traceback" not in str(e):
                raise  # from this process (data.workers = 0): already the message
            raise TrainingStopped(f"data (rank {edist.rank()}): {worker_error(e, self.cfg.batch_timeout_s)}") from None

    def next_batch(self) -> Dict:
        batch = self._next()
        state = batch.pop("__state__")
        self.state.update(state)
        self.order_hash = zlib.crc32(",".join(batch["key"]).encode(), self.order_hash)
        ids = batch.pop("stream_id", None)
        batch["stream"] = [f"stream{i}" for i in ids] if ids is not None else \
            [f"rank{edist.rank()}/worker{state['worker']}"] * len(batch["key"])
        return batch

    @contextlib.contextmanager
    def _wait(self, what: str):
        """While the run waits for data: ``waiting`` says since when and for what (a stop signal's handler reads
        it), and a StopInterrupt the handler raised into the wait leaves it as TrainingStopped."""
        try:
            self.waiting = (time.monotonic(), what)
            yield
        except StopInterrupt as e:
            raise TrainingStopped(str(e)) from None
        finally:
            self.waiting = None

    def next_step(self) -> List[Dict]:
        """The micro-batches of one optimizer step. Logical streams: one piece from each DataLoader worker (in
        the loader's worker order) joined into this rank's share of the global batch, cut into accum_steps
        micro-batches; per-worker streams: accum_steps loader batches."""
        with self._wait("for data"):
            return self._next_step()

    def _next_step(self) -> List[Dict]:
        if not self.num_streams:
            return [self.next_batch() for _ in range(self.accum_steps)]
        pieces = [self.next_batch() for _ in range(max(1, self.cfg.workers))]
        # (a key some pieces lack, the teacher's targets of reinforced shards mixed with plain ones, is dropped)
        whole = {k: torch.cat([p[k] for p in pieces]) if torch.is_tensor(pieces[0][k]) else
                 [x for p in pieces for x in p[k]] for k in pieces[0] if all(k in p for p in pieces)}
        m = self.cfg.micro_batch_size
        return [{k: v[j * m:(j + 1) * m] for k, v in whole.items()} for j in range(self.accum_steps)]

    def skip(self, n: int, tick: Callable[[], None] = lambda: None) -> None:
        """Consume ``n`` samples without training on them (a loss spike's window): the position moves on, the
        order hash does not. Logical streams skip whole data steps (the pieces of ceil(n / global batch) steps).
        ``tick`` runs between batches (the trainer's: end a long skip once a stop signal came)."""
        if self.num_streams:
            batches = math.ceil(n / self.global_batch) * max(1, self.cfg.workers)
        else:
            batches = math.ceil(n / (self.cfg.micro_batch_size * edist.world_size()))
        with self._wait(f"while skipping {n} samples"):
            for _ in range(batches):
                tick()
                self.state.update(self._next().pop("__state__"))

    def check_skips(self) -> None:
        """Stop when more than ``data.max_skip_fraction`` of the samples were unusable. Summed over ranks, so every
        rank takes the same decision (one rank stopping alone would hang the rest)."""
        local = self.state.lost_samples()  # unreadable shards count by the samples they should hold
        tot = edist.all_reduce_sum(torch.tensor([float(local), float(self.state.samples() + local)],
                                                device=self.device))
        skips, seen = int(tot[0].item()), int(tot[1].item())
        if seen >= 1000 and skips / seen > self.cfg.max_skip_fraction:
            raise TrainingStopped(f"{skips} of {seen} samples were unusable (this rank: {self.state.skip_counts()}), "
                                  f"above data.max_skip_fraction = {self.cfg.max_skip_fraction}; check the shards "
                                  "(`evaclip data verify`)")

    def state_dict(self) -> Dict:
        return {"data": self.state.state_dict(), "order_hash": self.order_hash}

    def load_state_dict(self, rank_state: Dict) -> None:
        self.positions, self.order_hash = rank_state["data"], rank_state.get("order_hash", 0)

    def regroup(self, ckpt: str, saved_world: int, trust_pickle: bool) -> Dict:
        """This rank's share of a checkpoint written by another number of ranks: the saved positions of the
        logical streams it now owns (the data continue exactly); refused for per-worker streams."""
        if not self.num_streams:
            raise same_ranks_only(ckpt, saved_world)
        states = rank_states(ckpt, saved_world, trust_pickle)
        mine = set(range(edist.rank(), self.num_streams, edist.world_size()))
        data = {int(k): v for st in states for k, v in st["data"].items() if int(k) in mine}
        order = states[edist.rank()].get("order_hash", 0) if edist.rank() < saved_world else 0
        return {"data": data, "order_hash": order}
