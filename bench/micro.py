"""Micro-benchmarks: optimizer step (LAMB vs torch AdamW), image-tower token dropping, eval and scoring throughput."""
from __future__ import annotations

import os

import torch

from bench.common import summarize, timeit


def optimizer_step(reps: int = 5, model: str = "EVA02-B-16"):
    """One optimizer step over a real model's parameter set (fp32, random gradients): our LAMB (its Adam part in
    torch's fused kernel, per-tensor trust ratios) against torch.optim.AdamW, foreach (the issue's peer) and
    fused (torch's one-pass CPU kernel, for scale), on the same parameter groups. The three step in alternating
    rounds (each on its own copy of the parameters), so a slow spell of this shared machine falls on all of
    them; a ratio is the median over rounds of the two steps' times in the same round."""
    import copy
    import statistics
    import time

    from evaclip.config import OptimConfig
    from evaclip.models import create_model
    from evaclip.optim import Lamb, param_groups

    torch.manual_seed(0)
    base = create_model(model)
    for p in base.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {}
    for name in ("adamw", "adamw_fused", "lamb"):
        m = copy.deepcopy(base)
        for p, q in zip(base.parameters(), m.parameters()):
            q.grad = p.grad.clone()
        groups = param_groups(m, OptimConfig())
        opts[name] = (Lamb(groups, lr=1e-4) if name == "lamb" else
                      torch.optim.AdamW(groups, lr=1e-4, foreach=name == "adamw", fused=name == "adamw_fused" or None))
        opts[name].step()  # warm-up: the moments allocated
    del base
    times = {name: [] for name in opts}
    for _ in range(reps):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    n = sum(p.numel() for g in opts["lamb"].param_groups for p in g["params"])

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    return {"model": model, "params": n, **{k: summarize(v) for k, v in times.items()},
            "lamb_over_adamw": ratio("lamb", "adamw"), "lamb_over_adamw_fused": ratio("lamb", "adamw_fused")}


def small_tower(depth: int = 12):
    """EVA-02 Small's image tower (timm eva02_small_patch14_224: width 384, 6 heads, 224 px / 14 = 256 patches),
    seeded, in train mode."""
    from evaclip.models.eva_vit import Eva

    torch.manual_seed(0)
    return Eva(img_size=224, patch_size=14, embed_dim=384, depth=depth, num_heads=6, qkv_fused=False,
               mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
               ref_feat_shape=(16, 16), num_classes=384).train()


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::linear_backward", "aten::convolution_backward",
           "aten::mkldnn_convolution")


def _matmul_share(fn) -> float:
    """The share of an eager step's operator self-time spent in matrix products (mm / addmm / bmm, SDPA, the
    patch convolution): what Inductor cannot fuse away, on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    return mm / total if total else float("nan")


def _deviation(eager, compiled, fwd_bwd) -> float:
    """max |eager - compiled| over the output and every parameter's gradient of one ``fwd_bwd`` (the compiled
    tower is a deep copy of the eager one, so both start from the same weights)."""
    res = []
    for m in (eager, compiled):
        m.zero_grad(set_to_none=True)
        res.append([fwd_bwd(m)] + [p.grad for p in m.parameters() if p.grad is not None])
    assert len(res[0]) == len(res[1]), "the compiled tower's parameters got other gradients than the eager one's"
    return max((a - b).abs().max().item() for a, b in zip(*res))


def compiled_step(rounds: int = 5, batch: int = 16, depth: int = 12, rates=(0.0, 0.5)):
    """Image-tower forward + backward on EVA-02 Small at 224 px (token_drop's geometry), eager against
    torch.compile (Inductor, one graph, as engine.compile = "towers" builds it), with and without token dropping.
    Timed in alternating paired rounds (eager, compiled, eager, ...), so a slow spell of this shared machine falls
    on both; the ratio is the median over rounds of eager / compiled. The compile time is reported apart, and
    the largest deviation of the compiled output and gradients from eager's (``max_diff``: the generated kernels
    are checked where they are timed; ``make test`` runs this section's quick form).
    ``rates``: the token-drop rates compared (one compile each)."""
    import copy
    import statistics
    import time

    from evaclip.engine.compiling import Compiler

    eager = small_tower(depth)
    x = torch.randn(batch, 3, 224, 224)
    out = {}
    for rate in rates:
        eager.set_patch_dropout(rate)
        compiled = copy.deepcopy(eager)
        Compiler("inductor").module("tower", compiled)
        noise = torch.rand(batch, eager.patch_embed.num_patches)

        def fwd_bwd(m, noise=noise):
            """one forward + backward of the bench's loss; the output"""
            y = m(x, noise)
            y.square().mean().backward()
            return y.detach()

        def step(m):
            m.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fwd_bwd(m)
            return time.perf_counter() - t

        t0 = time.perf_counter()
        step(compiled)
        compile_s = time.perf_counter() - t0
        max_diff = _deviation(eager, compiled, fwd_bwd)
        step(eager), step(compiled)  # warm-up
        pairs = [(step(eager), step(compiled)) for _ in range(rounds)]
        out[f"drop_{rate}"] = {"eager": summarize([a for a, _ in pairs]), "compiled": summarize([b for _, b in pairs]),
                               "speedup": statistics.median(a / b for a, b in pairs), "compile_s": compile_s,
                               "max_diff": max_diff,
                               "matmul_share": _matmul_share(lambda: step(eager))}
    out["config"] = "EVA-02 Small (width 384, depth %d, 256 patches of 14 px), batch %d, fp32" % (depth, batch)
    return out


def token_drop(reps: int = 5, batch: int = 16, depth: int = 12):
    """Image-tower forward+backward at token drop 0.5 vs 0.0 on EVA-02 Small (timm eva02_small_patch14_224's
    geometry: width 384, depth 12, 224 px / 14 = 256 patches). The patch embedding runs on every patch
    either way, so the FLOP ratio is ~2.0x for this geometry; on a CPU the measured time ratio can exceed it
    (the full sequence's activations cost memory traffic beyond their FLOPs)."""
    tower = small_tower(depth)
    x = torch.randn(batch, 3, 224, 224)
    out = {}
    for rate in (0.0, 0.5):
        tower.set_patch_dropout(rate)

        def step():
            tower.zero_grad(set_to_none=True)
            tower(x).square().mean().backward()

        out[f"drop_{rate}"] = timeit(step, reps=reps, warmup=1)
    out["speedup"] = out["drop_0.0"]["median"] / out["drop_0.5"]["median"]
    out["config"] = "EVA-02 Small (width 384, depth %d, 256 patches of 14 px), batch %d, fp32" % (depth, batch)
    return out


def eval_throughput(dataset_root: str, export_dir: str, reps: int = 5):
    """Images/s of zero-shot classification (classifier included) for the tiny model: our evaluator against
    clip_benchmark's, same open_clip model and files, in this process."""
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as cb

    from evaclip.data.transforms import eval_transform
    from evaclip.zeroshot import evaluate, open_wds_benchmark

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    model.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    size = model.visual.image_size[0]
    cfg = model.visual.preprocess_cfg
    ours_set = open_wds_benchmark(dataset_root)
    n_images = sum(1 for _ in ours_set.samples())
    tf = eval_transform(size, cfg["mean"], cfg["std"])
    dev = torch.device("cpu")

    def ours():
        evaluate(model.encode_image, model.encode_text, tok, ours_set, tf, dev, batch_size=64)

    ds = build_dataset("wds/synth", root=dataset_root, transform=preprocess, split="test")
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, num_workers=0)

    def theirs():
        cb.evaluate(model, loader, tok, ds.classes, ds.templates, "cpu", amp=False)

    t_ours, t_cb = timeit(ours, reps, 1), timeit(theirs, reps, 1)
    return {"images": n_images, "evaclip_images_per_s": n_images / t_ours["median"],
            "clip_benchmark_images_per_s": n_images / t_cb["median"], "evaclip": t_ours, "clip_benchmark": t_cb,
            "ratio": t_cb["median"] / t_ours["median"]}



def score_throughput(shards: str, export_dir: str, reps: int = 5, batch: int = 64):
    """Pairs/s of CLIP-scoring shards with the tiny model, one thread: ``evaclip data score`` (its whole path:
    tar reading, decode, preprocessing, both encoders, cosine, parquet tables) against open_clip's own loop on
    the same files (webdataset decode -> its preprocess and tokenizer -> encode_image / encode_text -> cosine)."""
    import shutil
    import tempfile

    import open_clip
    import torch.nn.functional as F
    import webdataset as wds

    from evaclip.curation.score import score
    from evaclip.encoders import load_encoders

    torch.set_num_threads(1)
    enc = load_encoders(model="open_clip:tiny", pretrained=export_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    model.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    tmp = tempfile.mkdtemp()
    counts = {}

    def ours():
        out = os.path.join(tmp, "scores")
        shutil.rmtree(out, ignore_errors=True)
        counts["ours"] = score(shards, "", enc, out, batch_size=batch, workers=0)["samples"]

    def theirs():
        ds = (wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
              .map_tuple(preprocess, lambda t: t).batched(batch, partial=True))
        n = 0
        with torch.no_grad():
            for images, texts in ds:
                fi = F.normalize(model.encode_image(images), dim=-1)
                ft = F.normalize(model.encode_text(tok(list(texts))), dim=-1)
                (fi * ft).sum(-1).tolist()
                n += len(texts)
        counts["theirs"] = n

    try:
        t_ours, t_oc = timeit(ours, reps, 1), timeit(theirs, reps, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(os.cpu_count() or 1)
    n = counts["ours"]
    assert n == counts["theirs"], counts
    return {"pairs": n, "evaclip_pairs_per_s": n / t_ours["median"], "open_clip_pairs_per_s": n / t_oc["median"],
            "evaclip": t_ours, "open_clip": t_oc, "ratio": t_oc["median"] / t_ours["median"]}


def mim_step(export_dir: str, reps: int = 5, batch: int = 64, student: str = "EVA02-Ti-8-64"):
    """One MIM optimizer step of the tiny student (forward, negative-cosine loss on 40% block-masked
    positions, backward, AdamW), fp32, CPU: with the teacher's forward (what a MIM run does each step) and
    without it (targets computed once beforehand), plus the masks' generation alone (per-sample seeded
    BEiT blocks in the main process). The difference is the teacher's cost."""
    from evaclip.config import MIMConfig, ModelConfig
    from evaclip.data.masking import BlockMasking
    from evaclip.losses import mim_loss
    from evaclip.models import create_mim_student
    from evaclip.models.mim import load_teacher
    from evaclip.models.registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.manual_seed(0)
    teacher = load_teacher(MIMConfig(teacher=export_dir))
    model = create_mim_student(ModelConfig(name=student), teacher.width).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    masking = BlockMasking(model.grid, 0.4, 4)
    x = torch.randn(batch, 3, *model.visual.image_size)
    keys = [str(i) for i in range(batch)]
    fixed = teacher(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, model.grid)
    state = {"step": 0}

    def step(with_teacher: bool):
        state["step"] += 1
        mask = masking.batch(keys, state["step"], 0)
        target = teacher(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, model.grid) if with_teacher else fixed
        opt.zero_grad(set_to_none=True)
        mim_loss(model(x, mask)["pred"], target, mask).backward()
        opt.step()

    with_t = timeit(lambda: step(True), reps, 1)
    without = timeit(lambda: step(False), reps, 1)
    masks = timeit(lambda: masking.batch(keys, 0, 0), reps, 1)
    return {"student": student, "teacher": teacher.name.split(" (")[0], "batch": batch,
            "with_teacher": with_t, "without_teacher": without, "masks": masks,
            "teacher_share": 1 - without["median"] / with_t["median"]}


def filter_identity_cost(shards: str, export_dir: str, reps: int = 5):
    """``evaclip data filter`` on the demo data (score tables of the synthetic 64 px shards, every sample kept):
    with its check that each shard is the one scored (size and sampled content digest per shard, issue 32) and
    with the check's digest replaced by the recorded value, to isolate its cost."""
    import shutil
    import tempfile

    from evaclip.curation import filter as filt
    from evaclip.curation.score import score
    from evaclip.encoders import load_encoders

    tmp = tempfile.mkdtemp()
    try:
        score(shards, "", load_encoders(model="open_clip:tiny", pretrained=export_dir), os.path.join(tmp, "s"),
              batch_size=64, workers=0)
        real = filt.shard_identity
        recorded = {u: real(u) for u in filt.expand_sources(shards, "")[0][1]}

        def run(check: bool):
            def go():
                shutil.rmtree(os.path.join(tmp, "out"), ignore_errors=True)
                if not check:  # the value the table recorded, without touching the shard
                    filt.shard_identity = recorded.__getitem__
                try:
                    counts["kept"] = filt.filter_tables([os.path.join(tmp, "s")], os.path.join(tmp, "out"),
                                                        min_value=-1.0)["kept"]
                finally:
                    filt.shard_identity = real
            return go

        counts = {}
        # interleaved, so that drifts of the shared machine fall on both
        with_check, without = [], []
        for _ in range(2 * reps):
            without.append(timeit(run(False), 1, 0)["median"])
            with_check.append(timeit(run(True), 1, 0)["median"])
        with_check, without = summarize(with_check[2:]), summarize(without[2:])  # the first two: warm-up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"samples": counts["kept"], "with_check": with_check, "without_check": without,
            "overhead": with_check["median"] / without["median"] - 1}
