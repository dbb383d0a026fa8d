"""``evaclip`` command line: train, eval, export, data, models. Thin: parse, build, call."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import List, Optional

from evaclip.errors import UserError

_F = argparse.RawDescriptionHelpFormatter


def _progress(total: Optional[int], desc: str, unit: str = "it"):
    from evaclip.metrics import progress_bar

    return progress_bar(total, desc, unit, leave=False)


# ---------------------------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from evaclip import dist as edist
    from evaclip.config import describe, load_config, resolve, to_dict

    if args.help_config:
        print("\n".join(describe()))
        return 0
    if not args.experiment:
        raise UserError("evaclip train needs an experiment: a built-in name (e.g. demo_cpu) or a TOML file")
    cfg = load_config(args.experiment, args.overrides)
    world = args.world_size or edist.env_world()[2]
    if args.print_run_dir:
        print(os.path.join(cfg.run.output_dir, cfg.run.name))
        return 0
    derived = resolve(cfg, world)
    if args.dry_run:
        from evaclip.config import dumps_toml
        from evaclip.engine import deepspeed_config

        print(dumps_toml(to_dict(cfg)))
        print("\n[derived]")
        for k, v in derived.__dict__.items():
            print(f"{k} = {v!r}")
        if cfg.engine.kind == "deepspeed":
            print("\n# DeepSpeed config")
            print(json.dumps(deepspeed_config(cfg.engine, cfg.data.micro_batch_size, world), indent=2))
        print(f"\nworld size {world}, global batch {derived.global_batch}, {derived.steps} steps, "
              f"{derived.train_samples:,} samples; run dir {derived.run_dir}")
        return 0
    from evaclip.train import Trainer

    trainer = Trainer(cfg, derived)
    summary = trainer.train()
    main = edist.is_main()  # before shutdown: every process is rank 0 after it
    edist.shutdown()
    if main:
        zs = summary["zeroshot"]
        acc = {k: v for k, v in zs.items() if k.endswith("/acc1")}
        print(f"trained {summary['steps']} steps ({summary['samples']:,} samples); skipped samples: "
              f"{sum(summary['skips'].values())} {summary['skips']}")
        for k, v in acc.items():
            print(f"  {k}: {100 * v:.2f}%")
        for ev in summary.get("rollbacks", []):
            print(f"  rollback: loss spike from step {ev['spike_step']} (detected at {ev['detected_step']}), back to "
                  f"step {ev['rolled_back_to']}, {ev['skip_samples']:,} samples skipped")
        print(f"run dir: {summary['run_dir']}\ncheckpoint: {summary['checkpoint']}"
              + (f"\nplots: {summary['plot']}" if summary.get("plot") else ""))
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from evaclip.evalsuite import compare, load_suite, run_suite, write_results

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

    def wrap(fn):
        def run(x):
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                return fn(x)
        return run

    # the text classifier depends on the weights: keyed by the checkpoint's identity (step + manifest checksum)
    cache = os.path.join(args.out, ".classifier_cache", enc.identity)
    results = run_suite(wrap(enc.encode_image), wrap(enc.encode_text), enc.tokenizer, entries, args.datasets_root,
                        enc.image_size, enc.mean, enc.std, torch.device(device), args.batch_size,
                        strict=args.strict, classifier_cache=cache, model_name=enc.name, pretrained=enc.pretrained,
                        workers=args.workers, interpolation=enc.interpolation,
                        progress_factory=(lambda n: _progress(None, n, "img")) if rank == 0 else None,
                        out_dir=args.out, extra=enc.extra, shard=(rank, world),
                        gather=edist.all_gather_objects if world > 1 else None,
                        log=print if rank == 0 else (lambda *a, **k: None))
    seconds = time.time() - t0
    if world > 1:
        edist.shutdown()
        if rank != 0:
            return 0
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
    return 0


# ---------------------------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from evaclip.checkpoint import find_checkpoint, load_weights
    from evaclip.export.open_clip import check_target, export_open_clip, verify_export
    from evaclip.models import record_variant

    check_target(args.out, args.force)  # before a consolidation that can take minutes
    ckpt = find_checkpoint(args.source)
    print(f"consolidating {ckpt} ...", flush=True)
    sd, meta = load_weights(ckpt, args.trust_pickle)
    v = record_variant(meta.get("model"))
    tower = args.tower
    if "mim" in meta["model"]:  # a MIM student is an image tower alone
        if args.verify:
            raise UserError("--verify compares open_clip embeddings; a MIM run exports its image tower only "
                            "(timm, num_classes=0): leave --verify out")
        tower = "image"
    written = export_open_clip(sd, meta["model"], args.out, dtype=args.dtype, tower=tower, source=ckpt,
                               replace=args.force)
    for k, p in written.items():
        print(f"  {k}: {p}")
    if args.verify:
        if args.tower != "both" or args.dtype != "fp32":
            raise UserError("--verify compares fp32 embeddings of a full export: use --tower both --dtype fp32")
        diffs = verify_export(args.out, sd, meta["model"])
        print("open_clip reload, max |embedding difference| vs the trained model: "
              + ", ".join(f"{k} {d:.2e}" for k, d in diffs.items()))
        if max(diffs.values()) > args.tolerance:
            raise UserError(f"export verification failed: max difference {max(diffs.values()):.3e} > {args.tolerance}")
    print(f"exported {v.name} to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------- data
def cmd_data(args) -> int:
    if args.data_cmd == "synth":
        from evaclip.data import synth

        bar = _progress(args.shards, "synth shards", "shard")
        out = synth.write_all(args.out, shards=args.shards, per_shard=args.per_shard, image_size=args.image_size,
                              seed=args.seed, eval_per_class=args.eval_per_class,
                              retrieval_images=args.retrieval_images, progress=bar.update)
        bar.close()
        print(f"wrote {args.shards * args.per_shard} training samples in {args.shards} shards: {out['train']}\n"
              f"zero-shot classification set: {out['zeroshot']}\nzero-shot retrieval set: {out['retrieval']}\n"
              f"recipe: {out['recipe']}")
        return 0
    if args.data_cmd in ("score", "filter"):
        from evaclip.data import curate

        return curate.run(args)
    from evaclip.data import tools

    return tools.run(args)


# ---------------------------------------------------------------------------------------------------- models
def cmd_models(args) -> int:
    import glob

    from evaclip.models import create_model, get_variant, list_models

    paths = []
    for p in args.files:
        paths += sorted(glob.glob(os.path.join(p, "*.toml"))) if os.path.isdir(p) else [p]
    print(f"{'model':<20} {'image':>8} {'patch':>5} {'width':>5} {'depth':>5} {'params':>10}  published  file")
    for name in paths or list_models():
        v = get_variant(name)
        m = create_model(v.name, v, device="meta")
        n = sum(p.numel() for p in m.parameters())
        pub = f"{v.published_params / 1e6:,.0f}M" if v.published_params else "-"
        vis = v.vision
        print(f"{v.name:<20} {v.image_size:>8} {vis['patch_size']:>5} {vis['embed_dim']:>5} {vis['depth']:>5} "
              f"{n / 1e6:>9,.1f}M  {pub:>9}  {name if paths else 'built-in'}")
        del m
    return 0


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaclip", formatter_class=_F, description=textwrap.dedent("""\
        Large-batch contrastive image-text (CLIP) training in the style of EVA-CLIP.

        Typical flow:
          evaclip data synth --out data/synth                       # a small local dataset
          evaclip train demo_cpu data.root=data/synth               # train (overrides: optim.lr=3e-4 ...)
          evaclip eval --checkpoint runs/demo_cpu --suite quick --datasets-root data/synth/zeroshot
          evaclip export runs/demo_cpu --out exports/demo --verify  # open_clip folder (+ timm image tower)
        """))
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    t = sub.add_parser("train", formatter_class=_F, help="train from an experiment file",
                       description=textwrap.dedent("""\
        Train from an experiment (a built-in name such as demo_cpu or eva02_clip_b16, or a TOML file), with
        dotted overrides:

          evaclip train demo_cpu data.root=data/synth optim.visual.lr=3e-4 model.vision.patch_dropout=0.5
          evaclip train my_experiment.toml --dry-run

        Relative paths inside an experiment file resolve against that file's folder; relative paths in
        overrides against the current directory; bare names (demo_cpu, merged2b, quick, EVA02-B-16) are the
        built-in experiments, recipes, suites and models shipped with evaclip.

        Single process runs directly; several processes under torchrun or Slurm (launch/torchrun.sh,
        launch/slurm/train.sbatch) with engine.kind=deepspeed. A run resumes from its latest checkpoint
        (checkpoint.resume=auto). --help-config lists every key with its type, default and meaning.
        """))
    t.add_argument("experiment", nargs="?", help="a built-in experiment name (demo_cpu, ...) or a TOML file")
    t.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (any position)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config, derived values and the "
                   "DeepSpeed config, then exit")
    t.add_argument("--world-size", type=int, default=0, help="with --dry-run: resolve for this many processes")
    t.add_argument("--help-config", action="store_true", help="list every config key and exit")
    t.add_argument("--print-run-dir", action="store_true", help="print the run directory and exit (scripts)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", formatter_class=_F, help="zero-shot evaluation suite",
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
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=2, help="threads decoding/transforming images (0: inline)")
    e.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    e.add_argument("--strict", action="store_true", help="fail (exit 2) when a dataset is missing")
    e.add_argument("--compare", nargs="+", metavar="JSON", help="print a side-by-side table of result files")
    e.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoint files that hold pickled objects (they can run code: only files you trust)")
    e.add_argument("--require-acc1", type=float, default=None, metavar="FRAC",
                   help="exit 2 if a classification set's top-1 is below FRAC (e.g. 0.094 = 3x chance of 32 classes)")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", formatter_class=_F, help="export to open_clip / timm format",
                       description=textwrap.dedent("""\
        Consolidate a checkpoint (plain or DeepSpeed ZeRO-1/2/3 shards, to fp32) and write an open_clip folder
        (open_clip_config.json + open_clip_model.safetensors) plus the image tower as a timm state dict:

          evaclip export runs/demo_cpu --out exports/demo --verify
          python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exports/demo')"
        """))
    x.add_argument("source", help="run dir (its latest checkpoint) or checkpoint dir")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--tower", choices=["both", "image", "text"], default="both")
    x.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    x.add_argument("--verify", action="store_true", help="reload with open_clip and timm, compare embeddings")
    x.add_argument("--tolerance", type=float, default=1e-5, help="--verify: max abs difference allowed")
    x.add_argument("--force", action="store_true", help="replace a non-empty --out folder (whole)")
    x.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoint files that hold pickled objects (they can run code: only files you trust)")
    x.set_defaults(fn=cmd_export)

    d = sub.add_parser("data", formatter_class=_F, help="make, inspect and check datasets",
                       description="Dataset tools: synth (the embedded default dataset), stats, verify, preview; curation: "
                       "score (CLIP score per sample) and filter (keep by score / loss into new shards).")
    dsub = d.add_subparsers(dest="data_cmd", metavar="DATA_COMMAND")
    s = dsub.add_parser("synth", help="write the synthetic captioned-shapes dataset (train shards + zero-shot sets)")
    s.add_argument("--out", default="data/synth")
    s.add_argument("--shards", type=int, default=20)
    s.add_argument("--per-shard", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--eval-per-class", type=int, default=20)
    s.add_argument("--retrieval-images", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    from evaclip.data import curate, tools

    tools.add_parsers(dsub)
    curate.add_parsers(dsub)
    d.set_defaults(fn=cmd_data)

    m = sub.add_parser("models", formatter_class=_F, help="list model architectures with parameter counts",
                       description=textwrap.dedent("""\
        List the built-in model architectures (launch/models/*.toml inside the package) with their parameter
        counts, or your own model files / folders of them:

          evaclip models
          evaclip models my_models/            # every *.toml in the folder
          evaclip models my_models/tiny.toml

        A model file is the architecture: image-tower kwargs as timm's Eva takes them ([vision]), the CLIP
        text tower ([text]), the embedding width, mean/std and interpolation ([preprocess]). Train one with
        model.name = "path/to/file.toml" (or model.model_dir = "folder" and model.name = "<file name>").
        """))
    m.add_argument("files", nargs="*", metavar="FILE_OR_DIR", help="model TOML files or folders of them")
    m.set_defaults(fn=cmd_models)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if extra:  # `train x.toml a=1 --dry-run b=2`: overrides may come after options
        bad = [a for a in extra if a.startswith("-") or "=" not in a or args.cmd != "train"]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "fn", None) or (args.cmd == "data" and not args.data_cmd):
        parser.print_help() if not getattr(args, "fn", None) else parser.parse_args([args.cmd, "--help"])
        return 2
    try:
        return args.fn(args) or 0
    except (UserError, FileNotFoundError) as e:  # one line; --debug for the traceback
        if args.debug:
            raise
        print(f"evaclip {args.cmd}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
