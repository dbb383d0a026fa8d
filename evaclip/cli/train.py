"""``evaclip train``: an experiment (built-in name or TOML file) with dotted overrides; --dry-run shows what it resolves to."""
from __future__ import annotations

import json
import os
import sys
import textwrap

from evaclip.cli.common import FORMATTER, number
from evaclip.errors import UserError


def add_parser(sub) -> None:
    t = sub.add_parser("train", formatter_class=FORMATTER, help="train from an experiment file",
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
    t.add_argument("--world-size", type=number(int, ge=0), default=0, help="with --dry-run: resolve for this many processes")
    t.add_argument("--gpu", default="", metavar="KIND", help="with --dry-run: also plan the run on this GPU kind "
                   "(a100-40gb, a100-80gb, h100-80gb, h200): memory by part, fits or not, speed (`evaclip plan` "
                   "for nodes and --json)")
    t.add_argument("--help-config", action="store_true", help="list every config key and exit")
    t.add_argument("--print-run-dir", action="store_true", help="print the run directory and exit (scripts)")
    t.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    from evaclip import dist as edist
    from evaclip.config import describe, load_config, to_dict
    from evaclip.preflight import missing_inputs, resolve

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
    derived = resolve(cfg, world, inputs_here=not args.dry_run)
    if args.dry_run:
        from evaclip.config import dumps_toml

        print(dumps_toml(to_dict(cfg)))
        print("\n[derived]")
        for k, v in derived.__dict__.items():
            print(f"{k} = {v!r}")
        if cfg.engine.kind == "deepspeed":
            _print_deepspeed_config(cfg, world)
        print(f"\nworld size {world}, global batch {derived.global_batch}, {derived.steps} steps, "
              f"{derived.train_samples:,} samples; run dir {derived.run_dir}")
        for line in missing_inputs(cfg):  # may exist where the run will run; a start here would stop on it
            print(f"warning: {line} (on this machine)", file=sys.stderr)
        if args.gpu:
            from evaclip.models import get_variant
            from evaclip.plan import plan, render

            print("\n# plan (evaclip plan)\n" + render(plan(cfg, get_variant(cfg.model.name, cfg.model.model_dir),
                                                           args.gpu, 1, world)))
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


def _print_deepspeed_config(cfg, world: int) -> None:
    """The DeepSpeed config a run on this machine writes (adjusted to its process group's backend), naming the keys
    a GPU (nccl) run writes differently."""
    from evaclip import dist as edist
    from evaclip.engine import device_kind, run_deepspeed_config

    backend = edist.backend_for(device_kind(cfg.run.device))
    here, gpu = (run_deepspeed_config(cfg.engine, cfg.data.micro_batch_size, world, b) for b in (backend, "nccl"))
    differs = ", ".join(_differing_keys(here, gpu))
    print(f"\n# DeepSpeed config (as a run on this machine writes it: {backend} process group"
          f"{f'; a GPU run (nccl) differs in {differs}' if differs else ''})")
    print(json.dumps(here, indent=2))


def _differing_keys(a, b, prefix: str = "") -> list:
    """The dotted keys whose values differ between two nested dicts (a key only one of them has differs)."""
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{k}.")
        elif x != y or (k in a) != (k in b):  # the second test: a key set to None on one side, absent on the other
            keys.append(f"{prefix}{k}")
    return keys
