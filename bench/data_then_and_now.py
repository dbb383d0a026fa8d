"""evaclip's per-worker input pipeline against open_clip_train's, from the evaclip source tree given: the same
measurement run on an older commit's tree (a ``git worktree``) and on this one, to tell a code change from a
change of the machine when a bench ratio moves (issue 26).

    python -S -m bench.data_then_and_now TREE SIZE SHARDS    # -S: no .pth hooks, so TREE's evaclip is imported

One process, one thread, batches of 64, alternating 12 rounds of 3 batches after the shuffle buffers fill;
prints JSON: each pipeline's images/s and the median over rounds of evaclip's rate over open_clip's.
Understands the trees before and after issue 26 moved the pipeline (``evaclip.data.wds`` -> ``pipeline``).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time


def iterators(tree: str, shards: str, size: int, batch: int):
    """Both pipelines' batch iterators, built as ``tree``'s own data bench builds them."""
    if os.path.exists(os.path.join(tree, "evaclip", "data", "pipeline.py")):
        from bench.data_pipeline import make_iter

        return {"evaclip": make_iter("evaclip", shards, size, batch), "open_clip": make_iter("open_clip", shards, size, batch)}
    from argparse import Namespace

    import open_clip

    from bench.data_pipeline import patch_open_clip_train
    from evaclip.data.recipes import recipe_from_shards
    from evaclip.data.transforms import Tokenizer, draft_side, train_transform
    from evaclip.data.wds import ImageTextStream, build_stream_spec, make_loader
    from evaclip.models.registry import OPENAI_CLIP_MEAN as MEAN
    from evaclip.models.registry import OPENAI_CLIP_STD as STD

    tok = Tokenizer(77)
    spec = build_stream_spec(recipe_from_shards(shards), "", 0, 0, 1, True, 500)
    stream = ImageTextStream(spec, batch, train_transform(size, MEAN, STD, (0.9, 1.0)), tok,
                             min_side=draft_side(size, 0.9))
    ocd = patch_open_clip_train()
    args = Namespace(train_data=shards, train_data_upsampling_factors=None, dataset_resampled=True,
                     train_num_samples=10 ** 7, batch_size=batch, workers=0, world_size=1, seed=0, val_data=None,
                     val_num_samples=None)
    pre = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD)
    return {"evaclip": iter(make_loader(stream, 0)),
            "open_clip": iter(ocd.get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=tok).dataloader)}


def main(argv) -> dict:
    if len(argv) != 3 or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    tree, size, shards = argv[0], int(argv[1]), argv[2]
    sys.path.insert(0, os.path.abspath(tree))
    venv = os.path.dirname(os.path.dirname(sys.executable))  # -S leaves the venv undetected: add its packages,
    sys.path.append(os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages"))
    import torch

    import evaclip  # TREE's, with its own torchvision import shim

    torch.set_num_threads(1)
    batch, rounds, per_round = 64, 12, 3
    its = iterators(tree, shards, size, batch)
    for it in its.values():  # until every shuffle buffer is full (8 streams x 500 samples at most)
        for _ in range(3 + -(-8 * 500 // batch)):
            next(it)
    names, spent = list(its), {k: [] for k in its}
    for r in range(rounds):
        for k in names[r % 2:] + names[:r % 2]:
            t = time.perf_counter()
            for _ in range(per_round):
                next(its[k])
            spent[k].append(time.perf_counter() - t)
    ratio = statistics.median(b / a for a, b in zip(spent["evaclip"], spent["open_clip"]))  # rate over rate
    return {"tree": os.path.dirname(os.path.dirname(evaclip.__file__)), "image_size": size,
            **{f"{k}_images_per_s": rounds * per_round * batch / sum(v) for k, v in spent.items()},
            "evaclip_over_open_clip": ratio}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
