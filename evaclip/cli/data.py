"""``evaclip data``: synth, stats, verify, preview, curation (score, filter), reinforce (a teacher's embeddings
stored in new shards) and capfilt (``evaclip.cli.capfilt``)."""
from __future__ import annotations


from evaclip.cli.capfilt import add_capfilt_parser, run_capfilt
from evaclip.cli.common import FORMATTER, add_shard_job, add_shard_source, number, progress, rank_device


def add_parser(sub) -> None:
    d = sub.add_parser("data", formatter_class=FORMATTER, help="make, inspect and check datasets",
                       description="Dataset tools: synth (the embedded default dataset), stats, verify, preview; curation: "
                       "score (CLIP score per sample) and filter (keep by score / loss into new shards); reinforce (a teacher's "
                       "embeddings of K augmentations per sample, for offline distillation).")
    dsub = d.add_subparsers(dest="data_cmd", metavar="DATA_COMMAND")
    s = dsub.add_parser("synth", help="write the synthetic captioned-shapes dataset (train shards + zero-shot sets)")
    s.add_argument("--out", default="data/synth")
    s.add_argument("--shards", type=number(int, ge=1), default=20)
    s.add_argument("--per-shard", type=number(int, ge=1), default=1000)
    s.add_argument("--image-size", type=number(int, ge=8), default=64)
    s.add_argument("--eval-per-class", type=number(int, ge=1), default=20)
    s.add_argument("--retrieval-images", type=number(int, ge=1), default=200)
    s.add_argument("--seed", type=int, default=0)
    from evaclip.data import tools

    tools.add_parsers(dsub)
    add_curation_parsers(dsub)
    add_reinforce_parser(dsub)
    add_capfilt_parser(dsub)
    d.set_defaults(fn=cmd_data)


def cmd_data(args) -> int:
    if args.data_cmd == "synth":
        from evaclip.data import synth

        bar = progress(args.shards, "synth shards", "shard")
        out = synth.write_all(args.out, shards=args.shards, per_shard=args.per_shard, image_size=args.image_size,
                              seed=args.seed, eval_per_class=args.eval_per_class,
                              retrieval_images=args.retrieval_images, progress=bar.update)
        bar.close()
        print(f"wrote {args.shards * args.per_shard} training samples in {args.shards} shards: {out['train']}\n"
              f"zero-shot classification set: {out['zeroshot']}\nzero-shot retrieval set: {out['retrieval']}\n"
              f"recipe: {out['recipe']}")
        return 0
    if args.data_cmd in ("score", "filter", "reinforce", "capfilt"):
        return run_curation(args)
    from evaclip.data import tools

    return tools.run(args)


def add_curation_parsers(dsub) -> None:
    """``data score`` and ``data filter``."""
    s = dsub.add_parser(
        "score", formatter_class=FORMATTER,
        help="CLIP-score every sample of a recipe or shard pattern (one parquet table per shard; resumable)",
        description="Score image-caption pairs with a model: cosine of the normalised image and text embeddings.\n\n"
                    "  evaclip data score merged2b --root /datasets --checkpoint runs/eva02_clip_b16 --out scores/\n"
                    "  evaclip data score '/data/{00000..00099}.tar' --model open_clip:ViT-B-32 \\\n"
                    "      --pretrained laion2b_s34b_b79k --out scores/ --part 0/4      # this process: shards 0, 4, 8...\n\n"
                    "Rerun the same command after a kill: finished shards are skipped. Under torchrun every rank "
                    "takes its own shards.")
    add_shard_source(s)
    s.add_argument("--checkpoint", default="", help="an evaclip run dir or checkpoint dir")
    s.add_argument("--model", default="", help="open_clip:<name> (with --pretrained: weights, an export folder or a tag)")
    s.add_argument("--pretrained", default="")
    s.add_argument("--out", required=True, help="folder for the tables (<out>/<source>/<shard>.parquet)")
    s.add_argument("--embeddings", action="store_true", help="also store each image embedding (float16) for clustering")
    add_shard_job(s, 256, "pairs per scoring batch", "threads decoding images (0: inline)")

    f = dsub.add_parser(
        "filter", formatter_class=FORMATTER,
        help="keep samples by score / loss and write them as new shards with a manifest and a recipe",
        description="Keep samples from score tables (evaclip data score) or per-sample loss tables "
                    "(log.sample_loss) and copy them into new shards.\n\n"
                    "  evaclip data filter scores/ --min-score 0.28 --out laion-0.28/          # LAION style\n"
                    "  evaclip data filter scores/ --top 0.3 --out top30/                      # DataComp: top 30% per source\n"
                    "  evaclip data filter scores/ --where 'score > 0.25 and caption_chars >= 10' --out f/\n"
                    "  evaclip data filter runs/x/sample_loss --by loss --bottom 0.99 \\\n"
                    "      --shards merged2b --root /datasets --out clean/    # drop the 1% highest-loss samples\n\n"
                    "--where: comparisons (< <= > >= == !=), and / or / not, + - * /, numbers and 'strings' over "
                    "the table's columns. It is parsed, never executed.")
    f.add_argument("tables", nargs="+", help="parquet tables or folders of them")
    f.add_argument("--out", required=True, help="folder for the new shards, manifest.parquet, recipe.toml, summary")
    f.add_argument("--by", default="score", help="the column the thresholds and fractions apply to (default: score)")
    f.add_argument("--min-score", "--min", dest="min", type=number(float), default=None, help="keep rows with --by >= this")
    f.add_argument("--max", type=number(float), default=None, help="keep rows with --by <= this")
    f.add_argument("--top", type=number(float, gt=0, le=1), default=None, metavar="FRAC", help="keep the highest FRAC of each source")
    f.add_argument("--bottom", type=number(float, gt=0, le=1), default=None, metavar="FRAC", help="keep the lowest FRAC of each source")
    f.add_argument("--where", default="", help="an expression over the columns (see above)")
    f.add_argument("--shards", default="", help="recipe or pattern holding the samples, for tables without a "
                   "shard column (per-sample loss tables)")
    f.add_argument("--root", default="", help="value of {root} in --shards")
    f.add_argument("--shard-size", type=number(int, ge=1), default=10000, help="samples per output shard (img2dataset: 10000)")
    f.add_argument("--name", default="", help="recipe name (default: the --out folder's name)")
    f.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    f.add_argument("--mixed-models", action="store_true",
                   help="accept tables scored by different models (their scores are on different scales)")


REINFORCE = """\
Dataset reinforcement (MobileCLIP): run a frozen teacher once over the data, for K crops of each image and its caption,
and store the embeddings (float16) and the crops in new shards. A distillation run on them (objective.kind=distill
distill.source=shards) draws one of the K crops per sample and step and uses the stored embeddings: no teacher forward.

  evaclip data reinforce merged2b --root /datasets --teacher runs/eva02_clip_l14 \\
      --augmentations 10 --out /datasets/merged2b-kd/ --device cuda --precision bf16
  evaclip train distill_demo_cpu distill.source=shards data.recipe=/datasets/merged2b-kd/recipe.toml

Rerun the same command after a kill: finished shards are skipped. Under torchrun every rank takes its own shards;
--part I/N splits them across separate jobs."""


def add_reinforce_parser(dsub) -> None:
    r = dsub.add_parser("reinforce", formatter_class=FORMATTER, description=REINFORCE,
                        help="new shards carrying a teacher CLIP's embeddings of K augmentations per sample "
                             "(offline distillation)")
    add_shard_source(r)
    r.add_argument("--teacher", required=True, help="an evaclip run dir or checkpoint, an open_clip export folder, "
                   "or open_clip:<name> with --teacher-weights (read weights-only)")
    r.add_argument("--teacher-weights", default="", help="with --teacher open_clip:<name>: its weights file")
    r.add_argument("--augmentations", type=number(int, ge=1), default=10, help="crops per image (MobileCLIP: 10)")
    r.add_argument("--crop-scale", type=number(float, gt=0, le=1), nargs=2, default=[0.9, 1.0], metavar=("MIN", "MAX"),
                   help="RandomResizedCrop's area range, as data.crop_scale (default 0.9 1.0)")
    r.add_argument("--hflip", action="store_true", help="also flip half of the crops (as data.hflip)")
    r.add_argument("--seed", type=int, default=0, help="the crops are drawn per sample from (seed, key)")
    r.add_argument("--out", required=True, help="folder for the shards, reinforce.json, recipe.toml, manifest.parquet")
    add_shard_job(r, 64, "samples per teacher batch (x K crops)", "threads decoding and cropping (0: inline)")


def run_curation(args) -> int:
    if args.data_cmd == "capfilt":
        return run_capfilt(args)
    if args.data_cmd == "reinforce":
        from evaclip.curation.reinforce import reinforce
        from evaclip.curation.score import parse_part
        from evaclip.encoders import load_source

        device = rank_device(args.device)
        if args.crop_scale[0] > args.crop_scale[1]:
            raise SystemExit(f"--crop-scale is MIN MAX: got {args.crop_scale[0]} {args.crop_scale[1]}")
        enc = load_source(args.teacher, args.teacher_weights, device, args.trust_pickle)
        bar = progress(None, "reinforce", "img")
        res = reinforce(args.source, args.root, enc, args.teacher, args.out, args.augmentations,
                        tuple(args.crop_scale), args.hflip, args.seed, args.batch_size, args.workers, device,
                        parse_part(args.part), args.precision == "bf16", bar.update)
        bar.close()
        print(f"reinforced {res['shards']} shards ({res['samples']:,} samples, {res['samples_per_s']:.1f} samples/s, "
              f"{args.augmentations} crops each), skipped {res['done_before']} already done; skipped samples: "
              f"{res['skipped']}" + (f"; unreadable shards: {len(res['unreadable'])}" if res["unreadable"] else "")
              + (f"\nrecipe: {res['recipe']}" if res["recipe"] else "\nrecipe.toml: written when every part is done"))
        return 0
    if args.data_cmd == "score":
        from evaclip.curation.score import parse_part, score
        from evaclip.encoders import load_encoders

        device = rank_device(args.device)
        enc = load_encoders(args.checkpoint, args.model, args.pretrained, device, args.trust_pickle)
        bar = progress(None, "score", "img")
        res = score(args.source, args.root, enc, args.out, batch_size=args.batch_size, workers=args.workers,
                    device=device, part=parse_part(args.part), embeddings=args.embeddings,
                    bf16=args.precision == "bf16", progress=bar.update)
        bar.close()
        print(f"scored {res['scored_shards']} shards ({res['samples']:,} samples, {res['pairs_per_s']:.1f} pairs/s), "
              f"skipped {res['done_before']} already scored; skipped samples: {res['skipped']}"
              + (f"; unreadable shards: {len(res['unreadable'])}" if res["unreadable"] else "")
              + f"\ntables: {args.out}")
        return 0
    if args.data_cmd == "filter":
        from evaclip.curation.filter import filter_tables

        res = filter_tables(args.tables, args.out, by=args.by, min_value=args.min, max_value=args.max, top=args.top,
                            bottom=args.bottom, where=args.where, shards=args.shards, root=args.root,
                            shard_size=args.shard_size, name=args.name, force=args.force,
                            mixed_models=args.mixed_models)
        for src, c in res["per_source"].items():
            print(f"  {src}: kept {c['kept']:,} of {c['total']:,} ({100 * c['kept'] / max(c['total'], 1):.1f}%)"
                  + (f", cut at {c['cut']:.4g}" if c.get("cut") is not None else ""))
        print(f"kept {res['kept']:,}, dropped {res['dropped']:,}; {res['shards']} shards in {args.out}\n"
              f"recipe: {res['recipe']}\nhistogram: {res['histogram']}")
        return 0
    raise ValueError(f"unknown data command {args.data_cmd}")


# ---------------------------------------------------------------------------------------------------- score
