"""The EVA flywheel on the embedded synthetic data: CLIP teacher -> MIM student -> CLIP from the student,
against a CLIP from scratch with the same steps, data and seed (``make flywheel``).

    python -m evaclip.flywheel --data data/synth --teacher runs/demo_cpu --out runs/flywheel --seeds 0 1 2

Stages, per seed: (1) the teacher, the demo CLIP (``--teacher``; trained with ``demo_cpu`` into
``<out>/teacher`` when it is not there), (2) ``mim_demo_cpu``: a fresh student tower MIM-trained against the
teacher's image tower, (3) two ``demo_cpu`` CLIPs of ``--clip-steps`` steps, one with
``model.vision.init`` = the MIM run, one from scratch, (4) both evaluated zero-shot (``quick`` suite, the
held-out synthetic sets). Writes ``<out>/summary.json`` and ``<out>/summary.md`` (the table it prints):
zero-shot top-1 of each arm, the MIM loss at the start and end, the wall time of every stage.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List

from evaclip.study import (demo_teacher, margins, md_table, parse_study_args, publish, retrieval_r5, study_parser, train_losses,
                           train_run, warmup)


def run(data: str, teacher: str, out: str, seeds: List[int], mim_steps: int, clip_steps: int,
        teacher_steps: int = 0, dataset: str = "synth_shapes") -> Dict:
    """The flywheel (see the module docstring); ``teacher_steps``: steps of a teacher trained here (0: demo_cpu's)."""
    # the data folder's own recipe (what `evaclip data synth` wrote, whatever its shard count)
    common = [f"run.output_dir={out}", f"data.root={data}", f"data.recipe={os.path.join(data, 'recipe.toml')}",
              "checkpoint.resume=none", "log.tensorboard=false"]
    walls: Dict[str, float] = {}
    steps = [f"run.steps={teacher_steps}", warmup(teacher_steps)] if teacher_steps else []
    teacher, wall = demo_teacher(teacher, out, common, "flywheel", steps)
    if wall is not None:
        walls["teacher"] = wall
    arms = []
    key = f"zeroshot/{dataset}/acc1"
    for seed in seeds:
        tag = f"seed{seed}"
        print(f"[flywheel] seed {seed}: (2) MIM student against the teacher ({mim_steps} steps)", flush=True)
        mim = train_run("mim_demo_cpu", common + [f"run.name={tag}/mim", f"run.seed={seed}", f"run.steps={mim_steps}",
                                               warmup(mim_steps), f"mim.teacher={teacher}"])
        losses = train_losses(mim["run_dir"])
        clip = common + [f"run.seed={seed}", f"run.steps={clip_steps}", "eval.every_steps=0",
                         f"checkpoint.every_steps={clip_steps}", warmup(clip_steps)]
        print(f"[flywheel] seed {seed}: (3) CLIP from the MIM student ({clip_steps} steps)", flush=True)
        from_mim = train_run("demo_cpu", clip + [f"run.name={tag}/clip_from_mim", f"model.vision.init={mim['run_dir']}"])
        print(f"[flywheel] seed {seed}: (3) CLIP from scratch ({clip_steps} steps)", flush=True)
        scratch = train_run("demo_cpu", clip + [f"run.name={tag}/clip_scratch"])
        arms.append({"seed": seed, "top1_from_mim": from_mim["zeroshot"][key], "top1_scratch": scratch["zeroshot"][key],
                     # a second view, not the comparison: mean image/text R@5 on the held-out retrieval set
                     "retrieval_r5_from_mim": retrieval_r5(from_mim["zeroshot"]), "retrieval_r5_scratch": retrieval_r5(scratch["zeroshot"]),
                     "mim_loss_start": losses[0], "mim_loss_end": losses[-1],
                     "wall_s": {"mim": mim["wall_s"], "clip_from_mim": from_mim["wall_s"],
                                "clip_scratch": scratch["wall_s"]},
                     "runs": {"mim": mim["run_dir"], "clip_from_mim": from_mim["run_dir"],
                              "clip_scratch": scratch["run_dir"]}})
    m = margins(arms, "top1_from_mim", "top1_scratch")
    summary = {"teacher": teacher, "dataset": dataset, "metric": "zero-shot top-1", "mim_steps": mim_steps,
               "clip_steps": clip_steps, "seeds": arms, "teacher_wall_s": walls.get("teacher"),
               **m}  # margin_mean, margin_min, ahead_on (seeds where CLIP from MIM is ahead), of
    publish(out, summary, _table(summary))
    return summary


def _table(s: Dict) -> str:
    rows = [f"| {a['seed']} | {a['top1_from_mim']:.4f} | {a['top1_scratch']:.4f} | "
            f"{a['top1_from_mim'] - a['top1_scratch']:+.4f} | {a['retrieval_r5_from_mim']:.4f} / "
            f"{a['retrieval_r5_scratch']:.4f} | {a['mim_loss_start']:.3f} -> {a['mim_loss_end']:.3f} | "
            f"{a['wall_s']['mim']:.0f} / {a['wall_s']['clip_from_mim']:.0f} / {a['wall_s']['clip_scratch']:.0f} |"
            for a in s["seeds"]]
    head = (f"EVA flywheel on {s['dataset']} ({s['metric']}; MIM {s['mim_steps']} steps, each CLIP {s['clip_steps']} "
            f"steps; teacher {s['teacher']}): CLIP from MIM ahead on {s['ahead_on']} of {s['of']} seeds, "
            f"mean margin {s['margin_mean']:+.4f}")
    return head + "\n\n" + md_table(["seed", "top-1 CLIP from MIM", "top-1 CLIP from scratch", "margin",
                                      "retrieval R@5 from MIM / scratch", "MIM loss start -> end",
                                      "wall s (MIM / from MIM / scratch)"], rows)


def main(argv=None) -> int:
    p = study_parser("flywheel", __doc__, out="runs/flywheel", seeds=[0], teacher=True)
    p.add_argument("--mim-steps", type=int, default=150, help="MIM steps of the student")
    p.add_argument("--clip-steps", type=int, default=100, help="steps of each CLIP arm")
    a = parse_study_args(p, argv, any_size=True)
    if a is None:
        return 2
    run(a.data, a.teacher, a.out, a.seeds, a.mim_steps, a.clip_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
