"""``evaclip plan``: per-GPU memory by part, fits or not, speed and suggestions for an experiment on a GPU kind."""
from __future__ import annotations

import json
import textwrap

from evaclip.cli.common import FORMATTER, number


def add_parser(sub) -> None:
    from evaclip.plan import GPUS

    p = sub.add_parser("plan", formatter_class=FORMATTER, help="will an experiment fit a GPU, and how fast will it run",
                       description=textwrap.dedent("""\
        Plan an experiment before it is queued: memory per GPU by part (weights, gradients and optimizer states
        by ZeRO stage and precision; each tower's activations with token dropping and gradient checkpointing;
        the loss's buffers at the global batch; DeepSpeed's buckets; the CUDA context and a fragmentation
        margin), whether it fits, the largest micro-batch that does, FLOPs per sample, step time, wall time and
        GPU-hours for run.steps, and one-line changes (a micro-batch and accumulation that keep the global
        batch, checkpointing, a ZeRO stage, the loss impl). Nothing is allocated: the model runs on the meta
        device.

          evaclip plan eva02_clip_b16 --gpu a100-40gb --nodes 4 --gpus-per-node 8
          evaclip plan my_run.toml data.micro_batch_size=1024 --gpu h100-80gb --json

        The micro-batch, accumulation, engine, ZeRO stage, precision and checkpointing are the experiment's
        (override them as for `evaclip train`); the global batch is micro-batch x nodes x GPUs x accumulation.
        """))
    p.add_argument("experiment", help="a built-in experiment name (eva02_clip_b16, ...) or a TOML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, as for train")
    p.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS), help="the GPU kind (default: a100-80gb)")
    p.add_argument("--nodes", type=number(int, ge=1), default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=number(int, ge=1), default=8, help="GPUs per node (default 8)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)


def cmd_plan(args) -> int:
    from evaclip.config import load_config
    from evaclip.models import get_variant
    from evaclip.plan import plan, render

    cfg = load_config(args.experiment, args.overrides)
    variant = get_variant(cfg.model.name, cfg.model.model_dir)
    p = plan(cfg, variant, args.gpu, args.nodes, args.gpus_per_node)
    print(json.dumps(p, indent=2) if args.json else render(p))
    return 0
