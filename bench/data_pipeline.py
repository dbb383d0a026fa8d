"""Images/s per core of the training input pipeline (tar -> decode -> train transform -> tokenize -> batch):
evaclip's stream (as before logical streams, per-worker, and the trainer's logical streams) against
open_clip_train's webdataset pipeline, same shards, one thread, all pipelines in one process timed in alternation.

    python -m bench.data_pipeline '{"shards": "...{00000..00001}.tar", "image_size": 224}'
"""
from __future__ import annotations

import contextlib
import json
import sys
import time


def patch_open_clip_train():
    """open_clip_train + webdataset 1.0.2 raise KeyError('fname') at each shard's end (open_clip#935,
    webdataset#384); expanding tars with eof_value=None is the known fix."""
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    return ocd


STREAMS = {"evaclip_streams1": 1, "evaclip_streams": 8}  # impl -> logical streams in this one worker
IMPLS = ("before", "evaclip", "evaclip_streams1", "evaclip_streams", "open_clip")


class before_issue_16:
    """Context in which the shards a pipeline opens are read with Python's tarfile (``shards.tarfile_members``), as
    before logical streams: the per-worker stream in it is that pipeline (its sample loop differs only in being one
    function)."""

    def __enter__(self):
        from evaclip.data import shards

        self.shards, self.ours = shards, shards.tar_members
        shards.tar_members = shards.tarfile_members

    def __exit__(self, *exc):
        self.shards.tar_members = self.ours


BUFFER = 500  # the shuffle buffer of every pipeline compared (samples): the full bench's; --quick passes 50


def make_iter(impl: str, shards: str, size: int, batch: int, buffer: int = BUFFER):
    """An iterator of training batches of one pipeline, with workers = 0 (this process decodes); ``buffer``:
    evaclip's shuffle buffer in samples."""
    from evaclip.data.transforms import Tokenizer, draft_side, train_transform
    from evaclip.models.registry import OPENAI_CLIP_MEAN as MEAN
    from evaclip.models.registry import OPENAI_CLIP_STD as STD

    tok = Tokenizer(77)
    if impl in ("before", "evaclip", *STREAMS):
        from evaclip.data.recipes import recipe_from_shards
        from evaclip.data.loader import make_loader
        from evaclip.data.pipeline import ImageTextStream
        from evaclip.data.streams import build_stream_spec

        # logical streams, as the trainer runs them (per-sample augmentation seeds): one per worker (the default,
        # data.streams = ranks x workers) or 8 per worker (a run set up to shrink 8x later)
        n = STREAMS.get(impl, 0)
        logical = dict(num_streams=n, step_samples=batch) if n else {}
        spec = build_stream_spec(recipe_from_shards(shards), "", 0, 0, 1, True, buffer, **logical)
        stream = ImageTextStream(spec, batch, train_transform(size, MEAN, STD, (0.9, 1.0)), tok,
                                 min_side=draft_side(size, 0.9))
        return iter(make_loader(stream, 0))
    from argparse import Namespace

    import open_clip

    ocd = patch_open_clip_train()
    pre = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD)
    args = Namespace(train_data=shards, train_data_upsampling_factors=None, dataset_resampled=True,
                     train_num_samples=10 ** 7, batch_size=batch, workers=0, world_size=1, seed=0,
                     val_data=None, val_num_samples=None)
    return iter(ocd.get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=tok).dataloader)


def child(a):
    """Every pipeline of ``a["impls"]`` in this one process, timed in alternation: ``rounds`` rounds of
    ``per_round`` batches each (the order rotates every round), so a slow spell of a shared machine falls on
    all of them alike; images/s = images / time summed over the rounds."""
    import torch

    torch.set_num_threads(1)
    impls = a.get("impls", list(IMPLS))
    size, batch = a["image_size"], a.get("batch", 64)
    rounds, per_round, buffer = a.get("rounds", 12), a.get("per_round", 3), a.get("buffer", BUFFER)
    its = {impl: make_iter(impl, a["shards"], size, batch, buffer) for impl in impls}
    scope = {impl: before_issue_16 if impl == "before" else contextlib.nullcontext for impl in impls}
    # warm-up: until every shuffle buffer is full (8 logical streams x buffer samples), the same for every impl,
    # so the timed batches are the steady state (a stream's start reads its buffer's worth without emitting)
    for impl, it in its.items():
        with scope[impl]():
            for _ in range(3 + -(-8 * buffer // batch)):
                next(it)
    spent = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            it = its[impl]
            with scope[impl]():
                t = time.perf_counter()
                for _ in range(per_round):
                    next(it)
                spent[impl].append(time.perf_counter() - t)
    return {impl: {"images_per_s": rounds * per_round * batch / sum(ts),
                   "round_images_per_s": [per_round * batch / t for t in ts]} for impl, ts in spent.items()}


def make_shards(out: str, shards: int = 2, per_shard: int = 400, size: int = 256) -> str:
    import os

    from evaclip.data.synth import write_train

    if not os.path.exists(os.path.join(out, f"{shards - 1:05d}.tar")):
        write_train(out, shards, per_shard, size, seed=5)
    return os.path.join(out, "{%05d..%05d}.tar" % (0, shards - 1))


def run(shards: str, reps: int = 5, sizes=(224, 64), rounds: int = 12, buffer: int = BUFFER):
    """``reps`` processes per output size, each timing every pipeline in alternation (see ``child``); ``buffer``:
    the shuffle buffer (the warm-up fills it; --quick shrinks it, the figures are then not steady state); reports
    the median over processes of each pipeline's images/s and of each ratio (paired round by round), with the
    ratios' min-max over processes."""
    import statistics

    from bench.common import run_child

    def ratio(runs, a, b):
        # per process: the median over rounds of a's rate over b's in the same round (neighbours in time)
        r = [statistics.median(p / q for p, q in zip(x[a]["round_images_per_s"], x[b]["round_images_per_s"]))
             for x in runs]
        return {"median": statistics.median(r), "min": min(r), "max": max(r), "runs": r}

    rows = []
    for size in sizes:
        runs = []
        for _ in range(reps):
            r = run_child("data_pipeline", {"shards": shards, "image_size": size, "rounds": rounds,
                                           "buffer": buffer})
            if "error" in r:
                return [{"image_size": size, "error": r["error"]}]
            runs.append(r)
        row = {"image_size": size, "processes": reps, "rounds": rounds, "runs": runs}
        for impl in IMPLS:
            row[impl + "_images_per_s"] = statistics.median(x[impl]["images_per_s"] for x in runs)
        row["ratio"] = ratio(runs, "evaclip", "open_clip")
        row["streams1_vs_before"] = ratio(runs, "evaclip_streams1", "before")
        row["streams_vs_before"] = ratio(runs, "evaclip_streams", "before")
        row["streams1_vs_per_worker"] = ratio(runs, "evaclip_streams1", "evaclip")
        row["streams_vs_per_worker"] = ratio(runs, "evaclip_streams", "evaclip")
        row["streams1_ratio"] = ratio(runs, "evaclip_streams1", "open_clip")
        rows.append(row)
    return rows


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
