"""Micro-benchmarks: optimizer step (LAMB vs torch AdamW), image-tower token dropping, eval throughput."""
from __future__ import annotations

import torch

from bench.common import timeit


def optimizer_step(reps: int = 5, model: str = "EVA02-B-16"):
    """One optimizer step over a real model's parameter set (fp32, random gradients): our LAMB (foreach,
    per-tensor trust ratios) against torch.optim.AdamW (foreach) on the same parameter groups."""
    from evaclip.config import OptimConfig
    from evaclip.models import create_model
    from evaclip.optim import Lamb, param_groups

    torch.manual_seed(0)
    m = create_model(model)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rows = {}
    for name in ("adamw", "lamb"):
        groups = param_groups(m, OptimConfig())
        opt = (torch.optim.AdamW(groups, lr=1e-4, foreach=True) if name == "adamw"
               else Lamb(groups, lr=1e-4))
        rows[name] = timeit(opt.step, reps=reps, warmup=1)
        del opt
    n = sum(p.numel() for p in m.parameters())
    return {"model": model, "params": n, "adamw": rows["adamw"], "lamb": rows["lamb"],
            "lamb_over_adamw": rows["lamb"]["median"] / rows["adamw"]["median"]}


def token_drop(reps: int = 5, batch: int = 16, depth: int = 12):
    """Image-tower forward+backward at token drop 0.5 vs 0.0 on EVA-02 Small (timm eva02_small_patch14_224's
    geometry: width 384, depth 12, 224 px / 14 = 256 patches). The patch embedding runs on every patch
    either way, so the FLOP ratio is ~2.0x for this geometry; on a CPU the measured time ratio can exceed it
    (the full sequence's activations cost memory traffic beyond their FLOPs)."""
    from evaclip.models.eva_vit import Eva

    torch.manual_seed(0)
    cfg = dict(img_size=224, patch_size=14, embed_dim=384, depth=depth, num_heads=6, qkv_fused=False,
               mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
               use_rot_pos_emb=True, ref_feat_shape=(16, 16))
    tower = Eva(**cfg, num_classes=384).train()
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

