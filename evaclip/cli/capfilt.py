"""``evaclip data capfilt``: BLIP's CapFilt over shards (a captioner's synthetic captions, a CLIP's filter)."""
from __future__ import annotations


from evaclip.cli.common import FORMATTER, add_shard_job, add_shard_source, number, progress, rank_device


DESCRIPTION = """\
BLIP's CapFilt: a CoCa writes K synthetic captions per image (nucleus sampling), a CLIP scores them and the original
against the image, and --keep decides what the new shards carry (.txt; every candidate with its score in capfilt.json):
  best      the highest-scoring caption, original or synthetic
  original  the original if its score >= --threshold, else the best synthetic one
  both      the original and the best synthetic one, each if its score >= --threshold (two samples)

  evaclip data capfilt data/synth/recipe.toml --root data/synth --captioner runs/coca_demo_cpu \\
      --out data/synth-capfilt --captions 3 --keep best
  evaclip train demo_cpu data.recipe=data/synth-capfilt/recipe.toml

Rerun the same command after a kill: finished shards are skipped. Under torchrun every rank takes its own shards;
--part I/N splits them across separate jobs."""


def add_capfilt_parser(dsub) -> None:
    c = dsub.add_parser("capfilt", formatter_class=FORMATTER, description=DESCRIPTION,
                        help="new shards whose captions a CoCa wrote or a CLIP kept (BLIP's CapFilt)")
    add_shard_source(c)
    c.add_argument("--captioner", required=True, help="a CoCa run dir, checkpoint or evaclip export (evaclip caption)")
    c.add_argument("--scorer", default="", help="the CLIP that scores the captions: an evaclip run dir or checkpoint, "
                   "an open_clip export folder, or open_clip:<name> with --scorer-weights (default: the captioner's "
                   "own contrastive half)")
    c.add_argument("--scorer-weights", default="", help="with --scorer open_clip:<name>: its weights file")
    c.add_argument("--captions", type=number(int, ge=1), default=3, help="synthetic captions per image (K)")
    c.add_argument("--top-p", type=number(float, gt=0, le=1), default=0.9, help="nucleus sampling mass (BLIP: 0.9)")
    c.add_argument("--max-len", type=number(int, ge=2), default=20, help="tokens per caption, start token included")
    c.add_argument("--keep", choices=["best", "original", "both"], default="best")
    c.add_argument("--threshold", type=float, default=0.0, help="--keep original|both: the least cosine score kept")
    c.add_argument("--seed", type=int, default=0, help="the synthetic captions are drawn from (seed, shard, batch)")
    c.add_argument("--out", required=True, help="folder for the shards, capfilt.json, recipe.toml, manifest.parquet")
    add_shard_job(c, 64, "images per captioning batch", "threads decoding images (0: inline)", precision=False)


def run_capfilt(args) -> int:
    from evaclip.captioning import load_captioner
    from evaclip.curation.capfilt import capfilt
    from evaclip.curation.score import parse_part
    from evaclip.encoders import load_source
    from evaclip.models.sources import source_identity

    device = rank_device(args.device)
    cap = load_captioner(args.captioner, device, args.trust_pickle)
    scorer = load_source(args.scorer or args.captioner, args.scorer_weights, device, args.trust_pickle)
    settings = {"captioner": cap.source, "captioner_identity": source_identity(args.captioner),
                "scorer": args.scorer or "(the captioner)", "scorer_identity": scorer.identity,
                "captions": args.captions, "top_p": args.top_p, "max_len": args.max_len, "keep": args.keep,
                "threshold": args.threshold, "seed": args.seed}
    bar = progress(None, "capfilt", "img")
    res = capfilt(args.source, args.root, cap, scorer, args.out, settings, args.batch_size, args.workers,
                  parse_part(args.part), bar.update)
    bar.close()
    print(f"capfilt: {res['shards']} shards ({res['samples']:,} samples -> {res['written']:,} written), "
          f"{res['done_before']} done before; kept {res['kept']}; skipped samples {res['skipped']}"
          + (f"; unreadable shards: {len(res['unreadable'])}" if res["unreadable"] else "")
          + (f"\nrecipe: {res['recipe']}" if res["recipe"] else "\nrecipe.toml: written when every part is done"))
    return 0
