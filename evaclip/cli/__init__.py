"""``evaclip`` command line: train, eval, export, caption, data, models, plan. Thin: parse, build, call; a module per command.
Each command imports its work inside its own function, so a command loads only what it runs (importing the CLI
loads no torch, DeepSpeed or open_clip; tests/test_package.py checks it)."""
from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap
from typing import List, Optional

from evaclip.cli import caption, data, evaluate, export, models, plan, train
from evaclip.cli.common import FORMATTER
from evaclip.errors import StopInterrupt, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaclip", formatter_class=FORMATTER, description=textwrap.dedent("""\
        Large-batch contrastive image-text (CLIP) training in the style of EVA-CLIP.

        Typical flow:
          evaclip data synth --out data/synth                       # a small local dataset
          evaclip train demo_cpu data.root=data/synth               # train (overrides: optim.lr=3e-4 ...)
          evaclip eval --checkpoint runs/demo_cpu --suite quick --datasets-root data/synth/zeroshot
          evaclip export runs/demo_cpu --out exports/demo --verify  # open_clip folder (+ timm image tower)
          evaclip caption --model runs/coca_demo_cpu photos/         # captions from a CoCa run or export
        """))
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for command in (train, evaluate, export, caption, data, models, plan):
        command.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    try:  # argparse exits on --help (0) and on a bad argument (2, usage and one error line): a return code here
        args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
        if extra:  # `train x.toml a=1 --dry-run b=2` (or plan): overrides may come after options
            bad = [a for a in extra if a.startswith("-") or "=" not in a or args.cmd not in ("train", "plan")]
            if bad:
                parser.error(f"unrecognized arguments: {' '.join(bad)}")
            args.overrides = list(args.overrides) + extra
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    args.debug = debug
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
    except BrokenPipeError:  # `evaclip models | head`: the reader left; stop writing quietly (Python's advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if args.debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk (filter, score, export, synth): one line; every writer publishes whole files (files.py), so
        # what it had finished stays and a rerun resumes or starts again
        where = f" writing {e.filename}" if e.filename else ""
        print(f"evaclip {args.cmd}: error: disk full{where} ({e.strerror}); free space and run the same command again",
              file=sys.stderr)
        return 2
    except StopInterrupt as e:  # a stop signal into a data wait, escaped before the wait could convert it
        if args.debug:
            raise
        print(f"evaclip {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130

