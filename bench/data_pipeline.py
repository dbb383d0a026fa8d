"""Images/s per core of the training input pipeline (tar -> decode -> train transform -> tokenize -> batch):
evaclip's stream (per-worker streams, and the trainer's logical streams) against open_clip_train's webdataset
pipeline, same shards, one process, one thread.

    python -m bench.data_pipeline '{"shards": "...{0..1}.tar", "image_size": 224, "impl": "evaclip"}'
"""
from __future__ import annotations

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


def child(a):
    import torch

    torch.set_num_threads(1)
    from evaclip.data.transforms import Tokenizer, draft_side, train_transform
    from evaclip.models.registry import OPENAI_CLIP_MEAN as MEAN
    from evaclip.models.registry import OPENAI_CLIP_STD as STD

    size, batch, n_batches = a["image_size"], a.get("batch", 64), a.get("batches", 20)
    tok = Tokenizer(77)
    if a["impl"] in ("evaclip", *STREAMS):
        from evaclip.data.recipes import recipe_from_shards
        from evaclip.data.wds import ImageTextStream, build_stream_spec, make_loader

        # logical streams, as the trainer runs them (per-sample augmentation seeds): one per worker (the default,
        # data.streams = ranks x workers) or 8 per worker (a run set up to shrink 8x later)
        n = STREAMS.get(a["impl"], 0)
        logical = dict(num_streams=n, step_samples=batch) if n else {}
        spec = build_stream_spec(recipe_from_shards(a["shards"]), "", 0, 0, 1, True, 500, **logical)
        stream = ImageTextStream(spec, batch, train_transform(size, MEAN, STD, (0.9, 1.0)), tok,
                                 min_side=draft_side(size, 0.9))
        it = iter(make_loader(stream, 0))
    else:
        from argparse import Namespace

        import open_clip

        ocd = patch_open_clip_train()
        pre = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD)
        args = Namespace(train_data=a["shards"], train_data_upsampling_factors=None, dataset_resampled=True,
                         train_num_samples=10 ** 7, batch_size=batch, workers=0, world_size=1, seed=0,
                         val_data=None, val_num_samples=None)
        data = ocd.get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=tok)
        it = iter(data.dataloader)
    # warm-up: until every shuffle buffer is full (8 logical streams x 500 samples), the same for every impl, so
    # the timed batches are the steady state (a stream's start reads its buffer's worth without emitting)
    for _ in range(3 + -(-8 * 500 // batch)):
        next(it)
    times = []
    for _ in range(n_batches):
        t = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"images_per_s": batch / med, "batch_s_median": med, "batch_s_min": times[0], "batch_s_max": times[-1],
            "batches": n_batches}


def make_shards(out: str, shards: int = 2, per_shard: int = 400, size: int = 256) -> str:
    import os

    from evaclip.data.synth import write_train

    if not os.path.exists(os.path.join(out, f"{shards - 1:05d}.tar")):
        write_train(out, shards, per_shard, size, seed=5)
    return os.path.join(out, "{%05d..%05d}.tar" % (0, shards - 1))


def run(shards: str, reps: int = 5, sizes=(224, 64)):
    """Alternate the two pipelines ``reps`` times per output size; report medians of the per-run rates."""
    import statistics

    from bench.common import run_child

    rows = []
    for size in sizes:
        rates = {"evaclip": [], "evaclip_streams1": [], "evaclip_streams": [], "open_clip": []}
        for _ in range(reps):
            for impl in rates:
                r = run_child("data_pipeline", {"shards": shards, "image_size": size, "impl": impl})
                if "error" in r:
                    return [{"image_size": size, "error": r["error"]}]
                rates[impl].append(r["images_per_s"])
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"image_size": size, "evaclip_images_per_s": med["evaclip"],
                     "streams1_images_per_s": med["evaclip_streams1"],
                     "streams1_vs_per_worker": med["evaclip_streams1"] / med["evaclip"],
                     "streams1_ratio": med["evaclip_streams1"] / med["open_clip"],
                     "streams_images_per_s": med["evaclip_streams"],
                     "open_clip_images_per_s": med["open_clip"], "ratio": med["evaclip"] / med["open_clip"],
                     "streams_ratio": med["evaclip_streams"] / med["open_clip"],
                     "streams_vs_per_worker": med["evaclip_streams"] / med["evaclip"],
                     "evaclip_runs": rates["evaclip"], "streams1_runs": rates["evaclip_streams1"],
                     "streams_runs": rates["evaclip_streams"],
                     "open_clip_runs": rates["open_clip"]})
    return rows


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
