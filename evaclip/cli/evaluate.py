"""``evaclip eval``: the zero-shot suite over a checkpoint or an open_clip model, one process or a share per rank."""
from __future__ import annotations

import dataclasses
import os
import textwrap

from evaclip.cli.common import FORMATTER, number, progress
from evaclip.errors import UserError


def add_parser(sub) -> None:
    e = sub.add_parser("eval", formatter_class=FORMATTER, help="zero-shot evaluation suite",
                       description=textwrap.dedent("""\
        Zero-shot classification / retrieval over a suite of datasets (a built-in suite name: quick, eva27,
        retrieval; or a suite TOML file), writing one JSON
        per dataset (CLIP_benchmark's shape) plus results.md / results.csv:

          evaclip eval --checkpoint runs/demo_cpu --suite quick --datasets-root data/synth/zeroshot
          evaclip eval --model open_clip:EVA02-B-16 --pretrained exports/demo --suite ...
          evaclip eval --compare results/a/imagenet1k.json results/b/imagenet1k.json
          torchrun --nproc-per-node 8 -m evaclip.cli eval --checkpoint runs/x --suite eva27 --device cuda ...
              (every rank evaluates a share of each dataset; the metrics equal one process's)

        Datasets are looked up as <datasets-root>/<path> (default path: wds_<name>, as clip_benchmark names
        its webdataset sets). Missing datasets are reported, not fatal, unless --strict.
        """))
    e.add_argument("--checkpoint", help="run dir or checkpoint dir of an evaclip run")
    e.add_argument("--model", help="open_clip:<name> to evaluate an open_clip model with the same code")
    e.add_argument("--pretrained", help="with --model: a weights file, an open_clip export folder, or a tag")
    e.add_argument("--suite", help="a built-in suite name (quick, eva27, retrieval) or a suite TOML file")
    e.add_argument("--datasets-root", default="datasets", help="folder holding the datasets (default: datasets)")
    e.add_argument("--out", default="results", help="output folder (default: results)")
    e.add_argument("--batch-size", type=number(int, ge=1), default=64)
    e.add_argument("--workers", type=number(int, ge=0), default=2, help="threads decoding/transforming images (0: inline)")
    e.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    e.add_argument("--strict", action="store_true", help="fail (exit 2) when a dataset is missing")
    e.add_argument("--compare", nargs="+", metavar="JSON", help="print a side-by-side table of result files")
    e.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoint files that hold pickled objects (they can run code: only files you trust)")
    e.add_argument("--require-acc1", type=number(float, ge=0, le=1), default=None, metavar="FRAC",
                   help="exit 2 if a classification set's top-1 is below FRAC (e.g. 0.094 = 3x chance of 32 classes)")
    e.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from evaclip.evalsuite import compare, load_suite, run_suite, within

    if args.compare:
        print(compare(args.compare))
        return 0
    if not args.suite:
        raise UserError("evaclip eval needs --suite (a built-in name such as quick or eva27, or a suite file)")
    entries = load_suite(args.suite)
    import time

    import torch

    from evaclip import dist as edist
    from evaclip.encoders import load_encoders

    # under torchrun every rank evaluates a share of each dataset; rank 0 writes and prints the results
    rank, local, world = edist.env_world()
    device = f"cuda:{local}" if args.device == "cuda" and world > 1 else args.device
    if world > 1:
        edist.init_distributed(torch.device(device), timeout_min=30)
    t0 = time.time()
    enc = load_encoders(args.checkpoint, args.model or "", args.pretrained or "", device, args.trust_pickle)

    amp = args.precision == "bf16"

    def amp_context():
        return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=amp)

    # the text classifier depends on the weights: keyed by the checkpoint's identity (step + manifest checksum)
    cache = os.path.join(args.out, ".classifier_cache", enc.identity)
    enc = dataclasses.replace(enc, encode_image=within(amp_context, enc.encode_image),
                              encode_text=within(amp_context, enc.encode_text))
    results = run_suite(enc, entries, args.datasets_root, torch.device(device), args.batch_size, strict=args.strict,
                        classifier_cache=cache, workers=args.workers,
                        progress_factory=(lambda n: progress(None, n, "img")) if rank == 0 else None,
                        out_dir=args.out, shard=(rank, world),
                        gather=edist.all_gather_objects if world > 1 else None,
                        log=print if rank == 0 else (lambda *a, **k: None))
    seconds = time.time() - t0
    if world > 1:
        edist.shutdown()
        if rank != 0:
            return 0
    _report(results, args, seconds, world)
    return 0


def _report(results, args, seconds: float, world: int) -> None:
    """The results table and files, what was missing or failed, and the --require-acc1 check."""
    from evaclip.evalsuite import write_results

    print(write_results(results, args.out))
    print(f"evaluated in {seconds:.1f} s on {world} process{'es' if world > 1 else ''}")
    missing = [r["dataset"] for r in results if r["status"] == "missing"]
    failed = [r["dataset"] for r in results if r["status"] == "error"]
    print(f"results: {args.out} ({len(results) - len(missing) - len(failed)} evaluated, {len(missing)} missing"
          + (f": {', '.join(missing)}" if missing else "") + f", {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else "") + ")")
    if args.require_acc1 is not None:
        low = [f"{r['dataset']} {100 * r['metrics']['acc1']:.2f}%" for r in results
               if "acc1" in r["metrics"] and r["metrics"]["acc1"] < args.require_acc1]
        if low:
            raise UserError(f"top-1 below the required {100 * args.require_acc1:.2f}%: {', '.join(low)}")
        print(f"top-1 >= {100 * args.require_acc1:.2f}% on every classification set: ok")
