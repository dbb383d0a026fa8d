"""engine.compile (issue 28): compiled towers and losses equal eager (fp32, forward and gradients), each tower
traces as one graph, and a compiled run ends where the eager one does, rebuilding each training graph at most
twice. These compile with the aot_eager backend (traced graphs, no code generation). Inductor builds its C++
kernels once in ``make test`` (a minute on 2 cores, cold): the slow tier's ``test_bench_quick`` runs the bench's
compiled section, which holds the Inductor-compiled image tower's output and gradients to eager's (<= 1e-4);
``make bench`` runs it at EVA-02 Small's size and the train-step benchmark trains with engine.compile = step."""
import copy
import json
import os

import pytest
import torch

from evaclip.config import ConfigError, load_config
from evaclip.engine.compiling import Compiler
from evaclip.losses import ContrastiveLoss
from evaclip.models import create_model, get_variant
from tests.conftest import mcfg, tiny_overrides

VARIANTS = ["EVA02-Ti-8-64", "EVA02E-Ti-8-64", "EVA01-Ti-8-64"]


def _inputs(model, name, batch=4, drop=0.0):
    v = get_variant(name)
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen)
    txt = torch.randint(1, 1000, (batch, v.context_length), generator=gen)
    noise = torch.rand(batch, model.visual.trunk.patch_embed.num_patches, generator=gen) if drop else None
    return img, txt, noise


def _forward_backward(model, img, txt, noise):
    out = model(img, txt, noise)
    gen = torch.Generator().manual_seed(2)  # a weighted sum: every feature gets its own gradient
    loss = sum((out[k] * torch.randn(out[k].shape, generator=gen)).sum() for k in ("image_features", "text_features"))
    loss.backward()
    return out


# every variant with and without token dropping; gradient checkpointing (one wrapper around each block, the same
# code for every variant) with token dropping on EVA02
@pytest.mark.parametrize("name,drop,ckpt", [(name, drop, False) for name in VARIANTS for drop in (0.0, 0.5)]
                         + [(VARIANTS[0], 0.5, True)])
def test_compiled_towers_equal_eager_and_trace_as_one_graph(name, drop, ckpt):
    torch.manual_seed(0)
    cfg = mcfg(name, patch_dropout=drop)
    cfg.vision.grad_checkpointing = cfg.text.grad_checkpointing = ckpt
    eager = create_model(cfg).train()
    compiled = copy.deepcopy(eager)
    compiler = Compiler("aot_eager")
    compiler.module("visual", compiled.visual)
    compiler.module("text", compiled.text)
    img, txt, noise = _inputs(eager, name, drop=drop)
    want, got = _forward_backward(eager, img, txt, noise), _forward_backward(compiled, img, txt, noise)
    for k in ("image_features", "text_features"):
        assert (got[k] - want[k]).abs().max() <= 1e-5, k
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-5, n
    assert compiler.graphs == {"visual": 1, "text": 1}
    assert torch._dynamo.explain(eager.visual)(img, noise).graph_break_count == 0
    assert torch._dynamo.explain(eager.text)(txt).graph_break_count == 0


@pytest.mark.parametrize("kind,impl", [("clip", "naive"), ("clip", "local"), ("siglip", "local")])
def test_a_compiled_loss_equals_eager(kind, impl):
    gen = torch.Generator().manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1) for _ in range(2)]
    loss = ContrastiveLoss(kind, impl)
    compiler = Compiler("aot_eager")
    fns = {"eager": loss, "compiled": compiler.function("loss", loss)}
    res = {}
    for what, fn in fns.items():
        img, txt = (f.clone().requires_grad_() for f in feats)
        scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
        rows = []
        value = fn(img, txt, scale, bias, rows=rows)
        value.backward()
        res[what] = [value.detach(), rows[0], img.grad, txt.grad, scale.grad] + ([bias.grad] if kind == "siglip" else [])
    for a, b in zip(res["eager"], res["compiled"]):
        assert (a - b).abs().max() <= 1e-6
    assert compiler.graphs["loss"] >= 1


def test_compile_settings_load_old_booleans_and_refuse_others():
    assert load_config("demo_cpu", ["engine.compile=true"]).engine.compile == "towers"
    assert load_config("demo_cpu", ["engine.compile=false"]).engine.compile == "off"
    assert load_config("demo_cpu", ["engine.compile=step"]).engine.compile == "step"
    with pytest.raises(ConfigError, match="engine.compile"):
        load_config("demo_cpu", ["engine.compile=fast"])


def _run(synth_dir, tmp_path, name, extra=()):
    from evaclip.engine import read_weights
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), name, steps=30, extra=[
        "model.vision.patch_dropout=0.5", "schedule.unmasked_tuning_samples=80", "log.every_steps=10", *extra]))
    summary = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()
    return summary, read_weights(summary["checkpoint"])


def test_a_compiled_run_ends_where_the_eager_one_does(synth_dir, tmp_path):
    """30 steps, token dropping 0.5 then 10 steps of unmasked tuning, engine.compile = step (the towers, the loss
    and the optimizer's update; plain "towers" is compiled under DeepSpeed below): the weights within 1e-4 of the
    eager run's, and the graphs each piece built, in the summary and the metrics. The image tower is rebuilt once,
    when unmasked tuning keeps every patch; the optimizer's first step (creating its state) runs eagerly, its
    graph is built for step 2 and once more when the step count and the lr turn symbolic."""
    eager = _run(synth_dir, tmp_path, "eager")[1]
    summary, compiled = _run(synth_dir, tmp_path, "step", ["engine.compile=step", "engine.compile_backend=aot_eager"])
    assert max((eager[k].float() - compiled[k].float()).abs().max().item() for k in eager) <= 1e-4
    assert summary["compiled_graphs"] == {"visual": 2, "text": 1, "loss": 1, "optimizer": 2}
    logged = [r["compile/visual"] for r in map(json.loads, open(os.path.join(summary["run_dir"], "metrics.jsonl")))
              if "compile/visual" in r]
    assert logged[0] == 1 and logged[-1] == 2, logged


@pytest.mark.dist
def test_compiled_towers_under_deepspeed_zero2_on_two_ranks_equal_eager(synth_dir, tmp_path):
    """10 steps of DeepSpeed ZeRO-2 + LAMB on 2 gloo ranks with token dropping 0.5, towers compiled (aot_eager)
    against the same run eager: weights within 1e-4, each tower built once."""
    from tests.test_distributed import torchrun

    shard = os.path.join(synth_dir, "train", "00000.tar")
    out = str(tmp_path / "runs.pt")
    torchrun(["tests/dist_worker.py", "compiled", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "optim.name=lamb", "model.vision.patch_dropout=0.5", "engine.compile_backend=aot_eager"])
    runs = torch.load(out)
    eager, compiled = runs["off"]["weights"], runs["towers"]["weights"]
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) <= 1e-4
    assert runs["towers"]["graphs"] == {"visual": 1, "text": 1} and runs["off"]["graphs"] == {}
