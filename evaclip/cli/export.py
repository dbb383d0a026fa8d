"""``evaclip export``: a checkpoint (any ZeRO stage) to an open_clip folder and a timm image tower, optionally verified."""
from __future__ import annotations

import textwrap

from evaclip.cli.common import FORMATTER, number
from evaclip.errors import UserError


def add_parser(sub) -> None:
    x = sub.add_parser("export", formatter_class=FORMATTER, help="export to open_clip / timm format",
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
    x.add_argument("--tolerance", type=number(float, gt=0), default=1e-5, help="--verify: max abs difference allowed")
    x.add_argument("--force", action="store_true", help="replace a non-empty --out folder (whole)")
    x.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoint files that hold pickled objects (they can run code: only files you trust)")
    x.set_defaults(fn=cmd_export)


def cmd_export(args) -> int:
    from evaclip.checkpoint import find_checkpoint, load_weights
    from evaclip.export.open_clip import check_target, export_open_clip, verify_export
    from evaclip.models import record_variant

    if args.verify and (args.tower != "both" or args.dtype != "fp32"):  # before anything is written
        raise UserError("--verify compares fp32 embeddings of a full export: use --tower both --dtype fp32 (or "
                        "leave --verify out)")
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
        diffs = verify_export(args.out, sd, meta["model"])
        print("open_clip reload, max |embedding difference| vs the trained model: "
              + ", ".join(f"{k} {d:.2e}" for k, d in diffs.items()))
        if max(diffs.values()) > args.tolerance:
            raise UserError(f"export verification failed: max difference {max(diffs.values()):.3e} > {args.tolerance}")
    print(f"exported {v.name} to {args.out}")
    return 0
