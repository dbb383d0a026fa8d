"""``evaclip caption``: captions of images, folders or shards from a CoCa run or export."""
from __future__ import annotations

import json
import sys
import textwrap

from evaclip.cli.common import FORMATTER, number


def add_parser(sub) -> None:
    c = sub.add_parser("caption", formatter_class=FORMATTER, help="write captions with a CoCa model",
                       description=textwrap.dedent("""\
        Caption images with a CoCa (a run trained with objective.kind = "coca", or its export folder, which holds
        the caption decoder in caption_decoder/). One JSON line per image: {"image": ..., "caption": ...}.

          evaclip caption --model runs/coca_demo_cpu photo.jpg photos/ shards/000000.tar
          evaclip caption --model exports/coca --method beam --beams 5 photos/ --out captions.jsonl
          evaclip caption --model runs/coca_demo_cpu --method top_p --top-p 0.9 --seed 1 photos/
        """))
    c.add_argument("inputs", nargs="+", help="image files, folders of images, or .tar shards")
    c.add_argument("--model", required=True, help="a CoCa run dir, checkpoint dir, or evaclip export folder")
    c.add_argument("--method", choices=["greedy", "beam", "top_p"], default="greedy")
    c.add_argument("--beams", type=number(int, ge=1), default=3, help="--method beam: beams per image")
    c.add_argument("--top-p", type=number(float, gt=0, le=1), default=0.9, help="--method top_p: nucleus mass")
    c.add_argument("--temperature", type=number(float, gt=0), default=1.0, help="--method top_p: softmax temperature")
    c.add_argument("--seed", type=number(int, ge=0), default=0, help="--method top_p: sampling seed")
    c.add_argument("--max-len", type=number(int, ge=2), default=20, help="tokens per caption, start token included")
    c.add_argument("--batch-size", type=number(int, ge=1), default=32)
    c.add_argument("--no-cache", action="store_true", help="recompute the whole prefix per token (for checking)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", default="", help="write the JSON lines here (default: standard output)")
    c.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoint files that hold pickled objects (they can run code: only files you trust)")
    c.set_defaults(fn=cmd_caption)


def cmd_caption(args) -> int:
    from evaclip.captioning import iter_images, load_captioner
    from evaclip.files import atomic_write
    from evaclip.metrics import progress_bar

    cap = load_captioner(args.model, args.device, args.trust_pickle)
    kw = {"beams": args.beams, "top_p": args.top_p, "temperature": args.temperature, "seed": args.seed,
          "cache": not args.no_cache}
    lines, batch, skipped = [], [], 0
    bar = progress_bar(None, "caption", "img", leave=False, disable=not args.out)  # stdout carries the captions

    def flush():
        for (name, _), text in zip(batch, cap.caption([im for _, im in batch], args.method, args.max_len, **kw)):
            lines.append(json.dumps({"image": name, "caption": text}))
        bar.update(len(batch))
        batch.clear()

    for name, im in iter_images(args.inputs):
        if im is None:
            skipped += 1
            print(f"skipped (unreadable image): {name}", file=sys.stderr)
            continue
        batch.append((name, im))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    text = "\n".join(lines) + ("\n" if lines else "")
    if args.out:
        with atomic_write(args.out) as f:
            f.write(text)
        print(f"{len(lines)} captions -> {args.out}" + (f" ({skipped} unreadable images skipped)" if skipped else ""),
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
