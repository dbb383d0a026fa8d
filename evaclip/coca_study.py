"""CoCa on the embedded synthetic data (``make coca``): per seed, the CoCa demo (``coca_demo_cpu``) and the CLIP demo
(``demo_cpu``), alike in everything but the objective (seed, data order, steps, optimizer), evaluated zero-shot on
the held-out shapes (top-1), and the CoCa's greedy captions of those held-out images scored for naming the right
colour and the right shape (and no other colour or shape). Then the captioner: the CoCa demo trained for
``--caption-steps`` (seed 0; as many as naming the shapes needs), its captions scored at every 300th step.

    python -m evaclip.coca_study --data data/synth --out runs/coca --seeds 0 1 2 --steps 300 --caption-steps 1800

Writes ``<out>/summary.json`` and ``<out>/summary.md`` (the table it prints).
"""
from __future__ import annotations

import glob
import os
import statistics
import sys
from typing import Dict, List

from evaclip.captioning import iter_images, load_captioner
from evaclip.data.shards import iter_tar_samples
from evaclip.data.synth import caption_words, words_name_right
from evaclip.study import parse_study_args, publish, study_parser, train_run, warmup


def caption_accuracy(run_dir: str, shapes_dir: str, batch_size: int = 64) -> Dict:
    """Greedy captions of the held-out classification images: the fraction whose caption names the image's
    colour and shape and no other colour or shape word; with a few examples."""

    with open(os.path.join(shapes_dir, "classnames.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]
    shards = sorted(glob.glob(os.path.join(shapes_dir, "test", "*.tar")))
    labels = {f"{sh}:{s['__key__']}": classes[int(s["cls"])] for sh in shards for s in iter_tar_samples(sh)}
    cap = load_captioner(run_dir)
    items = [(k, im) for k, im in iter_images(shards) if im is not None]
    right, colour_right, shape_right, examples = 0, 0, 0, []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        for (key, _), text in zip(chunk, cap.caption([im for _, im in chunk])):
            colour, shape = labels[key].split(" ")
            words = caption_words(text)
            ok = words_name_right(words, colour, shape)
            right += ok
            colour_right += colour in words
            shape_right += shape in words
            if len(examples) < 6:
                examples.append({"label": labels[key], "caption": text, "right": bool(ok)})
    n = max(len(items), 1)
    return {"accuracy": right / n, "colour_named": colour_right / n, "shape_named": shape_right / n,
            "images": len(items), "examples": examples}


def run(data: str, out: str, seeds: List[int], steps: int, overrides: List[str] = (), caption_steps: int = 0) -> Dict:
    """Per seed, the CoCa and the CLIP demo for ``steps``; then (``caption_steps``) the captioner: the CoCa demo
    trained for that many steps (seed 0, checkpoints every 300), its captions scored at each checkpoint."""
    common = [f"run.output_dir={out}", f"data.root={data}", f"data.recipe={os.path.join(data, 'recipe.toml')}",
              "checkpoint.resume=none", "log.tensorboard=false", *overrides]
    shapes, key, arms = os.path.join(data, "zeroshot", "synth_shapes"), "zeroshot/synth_shapes/acc1", []
    for seed in seeds:
        arm = common + [f"run.seed={seed}", f"run.steps={steps}", "eval.every_steps=0",
                        f"checkpoint.every_steps={steps}", warmup(steps)]
        print(f"[coca] seed {seed}: CoCa ({steps} steps)", flush=True)
        coca = train_run("coca_demo_cpu", arm + [f"run.name=seed{seed}/coca"], reuse=True)
        print(f"[coca] seed {seed}: the CLIP demo ({steps} steps)", flush=True)
        clip = train_run("demo_cpu", arm + [f"run.name=seed{seed}/clip"], reuse=True)
        captions = caption_accuracy(coca["run_dir"], shapes)
        print(f"[coca] seed {seed}: captions right on {captions['accuracy']:.1%} of {captions['images']} images; "
              f"e.g. {captions['examples'][:3]}", flush=True)
        arms.append({"seed": seed, "top1_coca": coca["zeroshot"][key], "top1_clip": clip["zeroshot"][key],
                     "captions": captions, "wall_s": {"coca": coca["wall_s"], "clip": clip["wall_s"]},
                     "runs": {"coca": coca["run_dir"], "clip": clip["run_dir"]}})
    gaps = [a["top1_coca"] - a["top1_clip"] for a in arms]
    summary = {"steps": steps, "overrides": list(overrides), "seeds": arms,
               "top1_gap_mean": statistics.mean(gaps),
               "caption_accuracy_mean": statistics.mean(a["captions"]["accuracy"] for a in arms)}
    if caption_steps:
        summary["captioner"] = captioner(common, shapes, caption_steps)
    publish(out, summary, _table(summary))
    return summary


def captioner(common: List[str], shapes: str, steps: int) -> Dict:
    """The CoCa demo trained for ``steps`` (seed 0) and its held-out captions scored at every kept checkpoint."""
    every = min(300, steps)
    print(f"[coca] the captioner: CoCa ({steps} steps)", flush=True)
    run_ = train_run("coca_demo_cpu", common + ["run.seed=0", f"run.steps={steps}", "run.name=captioner",
                                                f"checkpoint.every_steps={every}", f"checkpoint.keep_last={steps}",
                                                "eval.every_steps=0", warmup(steps)], reuse=True)
    ckpts = sorted(glob.glob(os.path.join(run_["run_dir"], "checkpoints", "step-*")))
    curve = {int(os.path.basename(c)[len("step-"):]): caption_accuracy(c, shapes)["accuracy"] for c in ckpts}
    return {"run": run_["run_dir"], "steps": steps, "wall_s": run_["wall_s"], "accuracy_by_step": curve,
            "zeroshot_top1": run_["zeroshot"].get("zeroshot/synth_shapes/acc1")}


def _table(s: Dict) -> str:
    rows = ["| seed | caption right | colour named | shape named | top-1 CoCa | top-1 CLIP | gap | wall s (CoCa / CLIP) |",
            "|---|---|---|---|---|---|---|---|"]
    for a in s["seeds"]:
        c = a["captions"]
        rows.append(f"| {a['seed']} | {c['accuracy']:.1%} | {c['colour_named']:.1%} | {c['shape_named']:.1%} | "
                    f"{a['top1_coca']:.4f} | {a['top1_clip']:.4f} | "
                    f"{a['top1_coca'] - a['top1_clip']:+.4f} | {a['wall_s']['coca']:.0f} / {a['wall_s']['clip']:.0f} |")
    head = (f"CoCa demo vs CLIP demo (EVA02-Ti-8-64), {s['steps']} steps each"
            f"{' (' + ' '.join(s['overrides']) + ')' if s['overrides'] else ''}: held-out captions naming the right "
            f"colour and shape {s['caption_accuracy_mean']:.1%} (mean of {len(s['seeds'])} seeds); zero-shot top-1 "
            f"gap CoCa - CLIP {s['top1_gap_mean']:+.4f} (mean)")
    examples = "\n".join(f"- {e['label']}: \"{e['caption']}\"" for e in s["seeds"][0]["captions"]["examples"])
    cap = s.get("captioner")
    tail = "" if not cap else (
        f"\n\nThe captioner, CoCa demo trained {cap['steps']} steps ({cap['wall_s']:.0f} s): held-out captions right at "
        "step " + ", ".join(f"{k}: {v:.1%}" for k, v in sorted(cap["accuracy_by_step"].items())))
    return head + "\n\n" + "\n".join(rows) + "\n\nCaptions of seed " + str(s["seeds"][0]["seed"]) + ":\n" + examples + tail


def main(argv=None) -> int:
    p = study_parser("coca_study", __doc__, out="runs/coca", seeds=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="steps of each run (the CLIP demo's 300)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for both arms")
    p.add_argument("--caption-steps", type=int, default=1800, help="steps of the captioner whose captions are "
                   "scored along its training (0: none)")
    a = parse_study_args(p, argv)
    if a is None:
        return 2
    run(a.data, a.out, a.seeds, a.steps, overrides=a.set, caption_steps=a.caption_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
