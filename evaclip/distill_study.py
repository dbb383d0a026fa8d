"""Distillation on the embedded synthetic data: a student smaller than the demo model (EVA02-Mi-8-64) distilled
from the demo CLIP for N steps, against the same student trained from scratch for N steps (``make distill``).

    python -m evaclip.distill_study --data data/synth --teacher runs/demo_cpu --out runs/distill --seeds 0 1 2

Per seed, two runs of ``distill_demo_cpu`` alike in everything (seed, so the student's init; data order; steps;
optimizer) but the objective: ``distill`` (contrastive loss + soft cross-entropy to the teacher) and ``clip``
(contrastive loss alone). Both are evaluated zero-shot on the held-out synthetic sets (``quick`` suite):
top-1 on synth_shapes and mean image / text R@5 on synth_retrieval. Writes ``<out>/summary.json`` and
``<out>/summary.md`` (the table it prints). The teacher is ``--teacher`` (trained with ``demo_cpu`` into
``<out>/teacher`` when it is not a finished run).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List

from evaclip.study import demo_teacher, margins, md_table, parse_study_args, publish, retrieval_r5, study_parser, train_run, warmup


def run(data: str, teacher: str, out: str, seeds: List[int], steps: int, dataset: str = "synth_shapes",
        overrides: List[str] = ()) -> Dict:
    """``overrides``: dotted settings for both arms (e.g. distill.weight=2)."""
    common = [f"run.output_dir={out}", f"data.root={data}", f"data.recipe={os.path.join(data, 'recipe.toml')}",
              "checkpoint.resume=none", "log.tensorboard=false", *overrides]
    teacher, _ = demo_teacher(teacher, out, common, "distill")
    key, arms = f"zeroshot/{dataset}/acc1", []
    for seed in seeds:
        arm = common + [f"run.seed={seed}", f"run.steps={steps}", "eval.every_steps=0",
                        f"checkpoint.every_steps={steps}", warmup(steps), f"distill.teacher={teacher}"]
        print(f"[distill] seed {seed}: the student distilled from {teacher} ({steps} steps)", flush=True)
        kd = train_run("distill_demo_cpu", arm + [f"run.name=seed{seed}/distilled"])
        print(f"[distill] seed {seed}: the same student from scratch ({steps} steps)", flush=True)
        scratch = train_run("distill_demo_cpu", arm + [f"run.name=seed{seed}/scratch", "objective.kind=clip"])
        arms.append({"seed": seed, "top1_distilled": kd["zeroshot"][key], "top1_scratch": scratch["zeroshot"][key],
                     "r5_distilled": retrieval_r5(kd["zeroshot"]), "r5_scratch": retrieval_r5(scratch["zeroshot"]),
                     "wall_s": {"distilled": kd["wall_s"], "scratch": scratch["wall_s"]},
                     "runs": {"distilled": kd["run_dir"], "scratch": scratch["run_dir"]}})
    summary = {"teacher": teacher, "dataset": dataset, "steps": steps, "overrides": list(overrides), "seeds": arms}
    for metric in ("top1", "r5"):
        summary[metric] = margins(arms, f"{metric}_distilled", f"{metric}_scratch")
    publish(out, summary, _table(summary))
    return summary


def _table(s: Dict) -> str:
    t, r = s["top1"], s["r5"]
    head = (f"EVA02-Mi-8-64 distilled from {s['teacher']} vs from scratch, {s['steps']} steps each"
            f"{' (' + ' '.join(s['overrides']) + ')' if s['overrides'] else ''}: zero-shot top-1 "
            f"on {s['dataset']} ahead on {t['ahead_on']} of {t['of']} seeds (mean margin {t['margin_mean']:+.4f}), "
            f"retrieval R@5 ahead on {r['ahead_on']} of {r['of']} (mean margin {r['margin_mean']:+.4f})")
    rows = [f"| {a['seed']} | {a['top1_distilled']:.4f} | {a['top1_scratch']:.4f} | "
            f"{a['top1_distilled'] - a['top1_scratch']:+.4f} | {a['r5_distilled']:.4f} | "
            f"{a['r5_scratch']:.4f} | {a['r5_distilled'] - a['r5_scratch']:+.4f} | "
            f"{a['wall_s']['distilled']:.0f} / {a['wall_s']['scratch']:.0f} |" for a in s["seeds"]]
    return head + "\n\n" + md_table(["seed", "top-1 distilled", "top-1 scratch", "margin", "R@5 distilled",
                                      "R@5 scratch", "margin", "wall s (distilled / scratch)"], rows)


def main(argv=None) -> int:
    p = study_parser("distill_study", __doc__, out="runs/distill", seeds=[0, 1, 2], teacher=True)
    p.add_argument("--steps", type=int, default=100, help="steps of each run (a third of the teacher's 300: the "
                   "student from scratch is then still behind the teacher)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for both arms, e.g. "
                   "distill.weight=2")
    a = parse_study_args(p, argv)
    if a is None:
        return 2
    run(a.data, a.teacher, a.out, a.seeds, a.steps, overrides=a.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
