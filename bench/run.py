"""`make bench`: every benchmark side by side with its peer, measured in the same run on this machine.

    python bench/run.py [--out bench/results] [--only train_step loss ...] [--quick]

Writes bench/results/<date>.json and .md and copies the table to bench/results/LATEST.md (the README
links it). Figures are medians of >= 5 repetitions after warm-up with their spread; comparisons are
ratios against the peer (open_clip_train, open_clip's data pipeline, clip_benchmark, torch AdamW) run
in the same invocation, because absolute times on shared machines do not hold from run to run.
--quick shrinks every size for the test suite (it checks the code, not the numbers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import REPO, fmt_ms  # noqa: E402

SECTIONS = ("train_step", "token_drop", "compiled", "loss", "optimizer", "data", "eval", "score", "filter", "mim",
            "distill", "coca")


def prepare(cache: str, quick: bool):
    """Synthetic 64 px training shards + zero-shot sets, 256 px JPEG shards, and a tiny open_clip export."""
    import evaclip  # noqa: F401
    from bench.data_pipeline import make_shards
    from evaclip.data import synth
    from evaclip.export.open_clip import export_open_clip
    from evaclip.config import ModelConfig
    from evaclip.models import create_model, get_variant, model_record

    tag = "-quick" if quick else ""  # --quick's smaller sets live apart, so a full pass never reuses them
    small = os.path.join(cache, "synth64" + tag)
    if not os.path.exists(os.path.join(small, "recipe.toml")):
        synth.write_all(small, shards=4, per_shard=200 if quick else 500, image_size=64, seed=3,
                        eval_per_class=8 if quick else 40, retrieval_images=50 if quick else 200)
    big = make_shards(os.path.join(cache, "jpeg256" + tag), shards=2, per_shard=200 if quick else 400, size=256)
    export = os.path.join(cache, "export_tiny")
    if not os.path.exists(os.path.join(export, "open_clip_config.json")):
        torch.manual_seed(0)
        v = get_variant("EVA02-Ti-8-64")
        export_open_clip(create_model(v.name).state_dict(), model_record(ModelConfig(name=v.name)), export)
    return {"train_shards": os.path.join(small, "train", "{00000..00003}.tar"), "jpeg256": big,
            "zeroshot": os.path.join(small, "zeroshot", "synth_shapes"), "export": export}


def run_all(sections, quick: bool, cache: str):
    from bench import coca_step, data_pipeline, distill_step, loss_memory, micro, train_step

    # --quick checks the code, not the figures: one repetition after warm-up, the smallest sizes, one token-drop rate
    reps = 1 if quick else 5
    t0 = time.time()
    paths = prepare(cache, quick)
    synth = os.path.dirname(os.path.dirname(paths["train_shards"]))
    batch = 16 if quick else 64
    jobs = {  # one callable per section, run in SECTIONS order
        "train_step": lambda: [dict(r, batch=batch) for r in train_step.run(
            paths["train_shards"], steps=8 if quick else 200, batch=batch, compiled=not quick,
            drops=(0.5,) if quick else (0.0, 0.5))],
        "token_drop": lambda: micro.token_drop(reps, batch=4 if quick else 16, depth=2 if quick else 12),
        "compiled": lambda: micro.compiled_step(2 if quick else 5, batch=4 if quick else 16,
                                                depth=2 if quick else 12, rates=(0.5,) if quick else (0.0, 0.5)),
        "loss": lambda: (loss_memory.run(reps, sizes=(1024,), world=8, large=((4096, 64, 2),),
                                         real=(512, 4)) if quick else loss_memory.run(reps)),
        "optimizer": lambda: micro.optimizer_step(reps, model="EVA02-Ti-8-64" if quick else "EVA02-B-16"),
        "data": lambda: data_pipeline.run(paths["jpeg256"], reps=1 if quick else 5, sizes=(64,) if quick else (224, 64),
                                          rounds=2 if quick else 12, buffer=50 if quick else data_pipeline.BUFFER),
        "eval": lambda: micro.eval_throughput(paths["zeroshot"], paths["export"], reps),
        "score": lambda: micro.score_throughput(paths["jpeg256"], paths["export"], reps),
        "filter": lambda: micro.filter_identity_cost(paths["train_shards"], paths["export"], 2 if quick else 5),
        "mim": lambda: micro.mim_step(paths["export"], reps, batch=batch),
        "distill": lambda: distill_step.run(os.path.join(synth, "recipe.toml"), synth, paths["export"], cache,
                                            steps=10 if quick else 60, batch=batch, rounds=1 if quick else 4,
                                            augmentations=2 if quick else 10),
        "coca": lambda: coca_step.run(reps=2 if quick else 5, batch=8 if quick else 64),
    }
    assert set(jobs) == set(SECTIONS)
    res = {}
    took = {"prepare": round(time.time() - t0, 1)}  # where a pass spends its time (the test suite runs --quick)
    for name in SECTIONS:
        if name in sections:
            t = time.time()
            res[name] = jobs[name]()
            took[name] = round(time.time() - t, 1)
            print(f"bench: {name} took {took[name]} s", file=sys.stderr, flush=True)
    res["_section_seconds"] = took
    res["_seconds"] = time.time() - t0
    return res


def _ratio(x):
    return f"**{x:.2f}x**"


def profile_table(rows) -> list:
    """Where the eager AdamW step's time goes in each framework (bench.step_profile), and evaclip minus open_clip."""
    from bench.step_profile import CATEGORIES

    parts = (*CATEGORIES, "rest", "step")
    out = ["", "Where a step's time goes (the eager AdamW runs above, timed inside each framework's own loop: mean ms "
           "per step after warm-up; forward = both towers and projections, backward = the towers' and the loss's "
           "together, rest = the loop's own Python, zeroing gradients, the lr schedule, meters):", "",
           "| token drop | framework | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
    for r in rows:
        prof = {k: r.get(k, {}).get("profile") or {} for k in ("evaclip", "open_clip")}
        for k, p in prof.items():
            if "mean_s" in p:
                out.append(f"| {r['patch_dropout']} | {k} | " +
                           " | ".join(f"{1000 * p['mean_s'][c]:.1f}" for c in parts) + " |")
            else:
                out.append(f"| {r['patch_dropout']} | {k} | {p.get('error', 'not profiled')[:100]} |")
        if all("mean_s" in p for p in prof.values()):
            e, o = prof["evaclip"]["mean_s"], prof["open_clip"]["mean_s"]
            out.append(f"| {r['patch_dropout']} | evaclip - open_clip | " +
                       " | ".join(f"{1000 * (e[c] - o[c]):+.1f}" for c in parts) + " |")
    return out


def markdown(res, meta) -> str:
    out = [f"# evaclip benchmarks — {meta['date']}", "",
           f"{meta['machine']}; torch {meta['torch']}; {meta['threads']} threads. Medians of >= 5 repetitions after "
           "warm-up, [min-max] spread; ratios > 1 favour evaclip.", ""]
    if "train_step" in res:
        out += ["## Train step: evaclip vs open_clip_train", "",
                f"{res['train_step'][0].get('model', 'EVA02-Ti-8-64')} (written once as an evaclip model file, given "
                "to open_clip as the JSON config written from it), fp32, AdamW, batch "
                f"{res['train_step'][0]['batch']}, {res['train_step'][0].get('steps', 30)} steps in each framework "
                "(the first 5 are warm-up), 1 data worker, the same synthetic shards; step time includes data wait.",
                "",
                "| token drop | evaclip step | open_clip_train step | evaclip samples/s | open_clip samples/s | speed |",
                "|---|---|---|---|---|---|"]
        for r in res["train_step"]:
            e, o = r["evaclip"], r["open_clip"]
            if "error" in e or "error" in o:
                out.append(f"| {r['patch_dropout']} | {e.get('error', '')[:80]} | {o.get('error', '')[:80]} | | | |")
                continue
            out.append(f"| {r['patch_dropout']} | {fmt_ms(e['step_s'])} | {fmt_ms(o['step_s'])} | "
                       f"{e['samples_per_s']:.1f} | {o['samples_per_s']:.1f} | {_ratio(r['speed_ratio'])} |")
        out += ["", "evaclip's variants on the same runs (engine.compile = step: towers, loss and optimizer step by "
                "Inductor, the compile inside the warm-up steps; LAMB eager). Peak share: the step's FLOPs (counted, "
                "forward + backward) per second over this machine's fp32 matmul rate (a 2048 x 2048 product, "
                "measured in the same run):", "",
                "| token drop | compiled step | compiled samples/s | compiled vs open_clip | LAMB step | LAMB / AdamW | "
                "peak share eager | peak share compiled |", "|---|---|---|---|---|---|---|---|"]
        for r in res["train_step"]:
            c, lamb = r.get("evaclip_compiled", {}), r.get("evaclip_lamb", {})
            if "step_s" not in c or "step_s" not in lamb:
                out.append(f"| {r['patch_dropout']} | {c.get('error', '')[:80]} | | | {lamb.get('error', '')[:80]} | | "
                           f"{100 * r.get('evaclip_peak_share', float('nan')):.0f}% | |")
                continue
            out.append(f"| {r['patch_dropout']} | {fmt_ms(c['step_s'])} | {c['samples_per_s']:.1f} | "
                       f"{_ratio(r.get('compiled_ratio', float('nan')))} | {fmt_ms(lamb['step_s'])} | "
                       f"{r.get('lamb_over_adamw', float('nan')):.2f}x the time | "
                       f"{100 * r.get('evaclip_peak_share', float('nan')):.0f}% | "
                       f"{100 * r.get('evaclip_compiled_peak_share', float('nan')):.0f}% |")
        out += profile_table(res["train_step"])
        ok = [r for r in res["train_step"] if "speed_ratio" in r]
        if len(ok) == 2:
            ev = ok[0]["evaclip"]["step_s"]["median"] / ok[1]["evaclip"]["step_s"]["median"]
            out += ["", f"evaclip token drop 0.5 vs 0.0 (whole train step, tiny model, text tower included): "
                        f"{_ratio(ev)}"]
        out.append("")
    if "token_drop" in res:
        t = res["token_drop"]
        out += ["## Image tower: 50% token dropping", "", t["config"] + ", forward + backward.", "",
                "| drop 0.0 | drop 0.5 | speed-up |", "|---|---|---|",
                f"| {fmt_ms(t['drop_0.0'])} | {fmt_ms(t['drop_0.5'])} | {_ratio(t['speedup'])} (target >= 1.8x) |", ""]
    if "loss" in res:
        rows = res["loss"]["rows"]
        world = next((r["world"] for r in rows if "world" in r), "-")
        out += ["## Contrastive loss: naive vs local vs tiled vs ring", "",
                f"Forward + backward of one rank of a {world}-rank job (a rank holds G / {world} rows); fp32. "
                "naive / local / tiled: the inputs are the gathered features [G, D], and the peak above them "
                "includes their gradients (2 x G x D fp32, which the all-gather backward needs whatever the loss). "
                "ring: the inputs are the rank's own rows [b, D]; the other ranks' blocks come from a simulated ring "
                "(generated locally in ring order, into fresh receive buffers). A ring marked 'hops k' ran its first "
                "k hops only: its memory does not grow with the hops, and its step time is the measured time per "
                "hop x the full ring's hops.", "",
                "| global batch | D | impl | time per step | peak above inputs | peak total |", "|---|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r or "error" in r:
                out.append(f"| {r['global_batch']:,} | {r['dim']} | {r['impl']} | not run: "
                           f"{r.get('skipped', r.get('error', ''))[:90]} | | |")
                continue
            t = fmt_ms(r["time"])
            if r.get("hops"):
                t = f"{r['full_ring_s']:.1f} s (from {r['hops']} hops: {t})"
            out.append(f"| {r['global_batch']:,} | {r['dim']} | {r['impl']} | {t} | "
                       f"{r['above_inputs_mb'] / 1024:.2f} GiB | {r['peak_rss_mb'] / 1024:.2f} GiB |")
        by = {(r["global_batch"], r["dim"], r["impl"]): r for r in rows if "time" in r}
        ratios = []
        for g, d in sorted({(k[0], k[1]) for k in by}):
            if (g, d, "tiled") in by and (g, d, "ring") in by:
                ring = by[(g, d, "ring")]
                ring_s = ring["full_ring_s"] if ring.get("hops") else ring["time"]["median"]
                ratios.append(f"- ring / tiled time at {g:,} x {d}: "
                              f"{ring_s / by[(g, d, 'tiled')]['time']['median']:.2f}x (target <= 1.3x at 131,072)")
        out += [""] + ratios if ratios else []
        rr = res["loss"].get("real_ring")
        if rr and "error" not in rr:
            real, sim = rr["real"], rr["simulated"]
            mem = [x["above_inputs_mb"] for x in real["ranks"]]
            out += ["", f"Real ring check: {real['world']} gloo ranks (torchrun, 1 thread each), G = "
                        f"{real['global_batch']:,}, D = {real['dim']}, b = {real['local_batch']}: peak above inputs "
                        f"per rank {min(mem):.0f}-{max(mem):.0f} MiB; the simulated ring at the same b and G: "
                        f"{sim.get('above_inputs_mb', float('nan')):.0f} MiB."]
        elif rr:
            out += ["", f"Real ring check failed: {rr['error'][:300]}"]
        out.append("")
    if "optimizer" in res:
        o = res["optimizer"]
        out += ["## Optimizer step: LAMB vs torch AdamW", "",
                f"{o['model']} parameters ({o['params'] / 1e6:.1f}M), fp32, CPU. LAMB's Adam part runs in torch's "
                "fused Adam kernel; its trust ratios need the whole update before the weights move (norms, then "
                "one more pass), which a one-pass fused AdamW does not.", "",
                "| torch AdamW (foreach) | torch AdamW (fused) | evaclip LAMB | LAMB / AdamW foreach | "
                "LAMB / AdamW fused |", "|---|---|---|---|---|",
                f"| {fmt_ms(o['adamw'])} | {fmt_ms(o['adamw_fused'])} | {fmt_ms(o['lamb'])} | "
                f"{o['lamb_over_adamw']:.2f}x the time | {o['lamb_over_adamw_fused']:.2f}x the time |", ""]
    if "compiled" in res:
        c = res["compiled"]
        out += ["## Compiled vs eager: image-tower step", "",
                f"{c['config']}; forward + backward; eager vs torch.compile (Inductor, fullgraph, as engine.compile "
                "builds a tower), timed in alternating paired rounds; speed-up = median over rounds of eager / "
                "compiled. Matmul share: the eager step's operator time in matrix products (mm, addmm, bmm, SDPA, "
                "the patch convolution), which compilation does not make faster on a CPU. Deviation: the largest "
                "|compiled - eager| over the output and every gradient (fp32).", "",
                "| token drop | eager | compiled | speed-up | compile time | matmul share (eager) | deviation |",
                "|---|---|---|---|---|---|---|"]
        for rate in [k[len("drop_"):] for k in c if k.startswith("drop_")]:
            r = c[f"drop_{rate}"]
            out.append(f"| {rate} | {fmt_ms(r['eager'])} | {fmt_ms(r['compiled'])} | {_ratio(r['speedup'])} | "
                       f"{r['compile_s']:.0f} s | {100 * r['matmul_share']:.0f}% | "
                       f"{r.get('max_diff', float('nan')):.1e} |")
        out.append("")
    if "data" in res:
        out += ["## Input pipeline: evaclip vs open_clip_train.data", "",
                "256 px JPEG shards; decode + RandomResizedCrop + normalise + tokenize + batch of 64; one thread "
                "(images/s per core). The five pipelines run in one process after the same warm-up and are timed in "
                "alternation (12 rounds of 3 batches each, the order rotating), so a slow spell of this shared "
                "machine falls on all of them alike. A ratio is the median over rounds of the two pipelines' rates in "
                "the same round; median over 5 processes, [min-max] over the processes.", "",
                "before: the pipeline before logical streams (one stream per rank x worker, augmentation seeded per "
                "batch, tars read with Python's tarfile); per-worker: the same with today's tar reader; logical x1: "
                "the trainer's logical streams (data.streams) with per-sample augmentation seeds, one stream per "
                "worker (the default, data.streams = ranks x workers); logical x8: 8 streams in the worker (8 shuffle "
                "buffers), as a run set up to shrink to an 8th of its ranks reads them.", "",
                "| output size | before img/s | per-worker img/s | logical x1 img/s | logical x8 img/s | open_clip img/s "
                "| logical x1 / before | logical x8 / before | logical x1 / per-worker | logical x8 / per-worker | "
                "per-worker / open_clip | logical x1 / open_clip |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rr = lambda q: f"{_ratio(q['median'])} [{q['min']:.2f}-{q['max']:.2f}]"  # noqa: E731
        for r in res["data"]:
            if "error" in r:
                out.append(f"| {r['image_size']} | error: {r['error'][:100]} |" + " |" * 10)
            else:
                out.append(f"| {r['image_size']} | {r['before_images_per_s']:.0f} | {r['evaclip_images_per_s']:.0f} | "
                           f"{r['evaclip_streams1_images_per_s']:.0f} | {r['evaclip_streams_images_per_s']:.0f} | "
                           f"{r['open_clip_images_per_s']:.0f} | {rr(r['streams1_vs_before'])} (target >= 1.0x) | "
                           f"{rr(r['streams_vs_before'])} | {rr(r['streams1_vs_per_worker'])} | "
                           f"{rr(r['streams_vs_per_worker'])} | {rr(r['ratio'])} (target >= 1.0x) | "
                           f"{rr(r['streams1_ratio'])} |")
        out.append("")
    if "eval" in res:
        e = res["eval"]
        out += ["## Zero-shot eval: evaclip vs clip_benchmark", "",
                f"EVA02-Ti-8-64 export, {e['images']} images (synthetic, 32 classes x 4 prompts), CPU, one process, classifier "
                "building included.", "",
                "| evaclip img/s | clip_benchmark img/s | ratio |", "|---|---|---|",
                f"| {e['evaclip_images_per_s']:.0f} | {e['clip_benchmark_images_per_s']:.0f} | {_ratio(e['ratio'])} |", ""]
    if "score" in res:
        c = res["score"]
        out += ["## Curation: evaclip data score vs open_clip's encode loop", "",
                f"EVA02-Ti-8-64 export, {c['pairs']} pairs of the 256 px JPEG shards, one process, one thread (pairs/s per "
                "core); evaclip's figure includes writing the parquet tables.", "",
                "| evaclip pairs/s | open_clip loop pairs/s | ratio |", "|---|---|---|",
                f"| {c['evaclip_pairs_per_s']:.0f} | {c['open_clip_pairs_per_s']:.0f} | {_ratio(c['ratio'])} (target >= 1.0x) |",
                ""]
    if "filter" in res:
        f = res["filter"]
        ms = lambda r: f"{r['median'] * 1e3:.0f} ms ({r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f})"  # noqa: E731
        out += ["## Curation: the cost of data filter's shard identity check", "",
                f"evaclip data filter on the demo data: score tables of the 4 synthetic 64 px shards, {f['samples']} "
                "samples kept and copied; the check (each shard's size and sampled content digest against the "
                "table's record) on and replaced by the recorded value.", "",
                "| with the check | without | overhead |", "|---|---|---|",
                f"| {ms(f['with_check'])} | {ms(f['without_check'])} | {f['overhead']:+.1%} (target < 10%) |", ""]
    if "mim" in res:
        m = res["mim"]
        ms = lambda r: f"{r['median'] * 1e3:.0f} ms ({r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f})"  # noqa: E731
        out += ["## MIM step: the teacher's cost", "",
                f"{m['student']} student, {m['teacher']} teacher (the tiny export), batch {m['batch']}, 40% block masks, "
                "fp32, CPU, AdamW; median of the repetitions.", "",
                "| step with teacher forward | step without (targets precomputed) | teacher share | masks alone |",
                "|---|---|---|---|",
                f"| {ms(m['with_teacher'])} | {ms(m['without_teacher'])} | {m['teacher_share']:.0%} | {ms(m['masks'])} |", ""]
    if "distill" in res:
        d = res["distill"]
        ms = lambda r: f"{r['median'] * 1e3:.0f} ms ({r['min'] * 1e3:.0f}-{r['max'] * 1e3:.0f})"  # noqa: E731
        out += ["## Distillation: step time without, online, offline", "",
                f"{d['student']} student, {d['teacher']} teacher (the tiny export), batch {d['batch']}, fp32, CPU, "
                f"2 data workers; whole training steps (data wait included), {d['rounds']} alternating rounds of "
                f"{d['steps']} steps per variant (the first 5 of each run are warm-up). Offline: shards reinforced "
                f"with {d['augmentations']} crops per sample (`evaclip data reinforce`), no teacher forward.", "",
                "| CLIP loss alone | online distillation | offline distillation | online / alone | offline / alone |",
                "|---|---|---|---|---|",
                f"| {ms(d['clip'])} | {ms(d['online'])} | {ms(d['offline'])} | {d['online_over_clip']:.2f}x | "
                f"**{d['offline_over_clip']:.2f}x** (target <= 1.1x) |", ""]
    if "coca" in res:
        from bench.coca_step import markdown as coca_markdown

        out += coca_markdown(res["coca"])
    out.append(f"Total benchmark time: {res['_seconds'] / 60:.1f} min ("
               + ", ".join(f"{k} {v:.0f} s" for k, v in res.get("_section_seconds", {}).items()) + ").")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions (tests)")
    ap.add_argument("--cache", default=os.path.join(REPO, "bench", ".cache"), help="generated benchmark data")
    a = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": a.quick}
    res = run_all(a.only, a.quick, a.cache)
    os.makedirs(a.out, exist_ok=True)
    partial = sorted(set(SECTIONS) - set(a.only))
    # a run of some sections only gets its own file and leaves LATEST.md (the whole suite) alone
    stem = meta["date"] + ("-quick" if a.quick else "") + ("-" + "-".join(a.only) if partial else "")
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=2)
    md = markdown(res, meta)
    with open(os.path.join(a.out, stem + ".md"), "w") as f:
        f.write(md)
    if not a.quick and not partial:
        shutil.copy(os.path.join(a.out, stem + ".md"), os.path.join(a.out, "LATEST.md"))
    print(md)
    print(f"results: {os.path.join(a.out, stem + '.json')}")
    return res


if __name__ == "__main__":
    main()
