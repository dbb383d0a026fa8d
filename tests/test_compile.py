"""engine.compile (issue 28): compiled towers and losses equal eager (fp32, forward and gradients), each tower
traces as one graph, and a compiled run ends where the eager one does, rebuilding each training graph at most
twice. ``make test`` compiles with the aot_eager backend (traced graphs, no code generation); Inductor runs in
the slow tier and in ``make bench``."""
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


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("drop,ckpt", [(0.0, False), (0.5, False), (0.5, True)])
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
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), name, steps=30, extra=[
        "model.vision.patch_dropout=0.5", "schedule.unmasked_tuning_samples=80", "log.every_steps=10", *extra]))
    summary = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()
    from evaclip.engine import read_weights

    return summary, read_weights(summary["checkpoint"])


@pytest.fixture(scope="module")
def eager_weights(synth_dir, tmp_path_factory):
    return _run(synth_dir, tmp_path_factory.mktemp("eager"), "eager")[1]


@pytest.mark.parametrize("mode,backend", [("towers", "aot_eager"), ("step", "aot_eager"),
                                          pytest.param("towers", "inductor", marks=pytest.mark.slow)])
def test_a_compiled_run_ends_where_the_eager_one_does(synth_dir, tmp_path, eager_weights, mode, backend):
    """30 steps, token dropping 0.5 then 10 steps of unmasked tuning (the kept count changes: one recompile of
    the image tower): the weights within 1e-4 of the eager run's, each training graph built at most 3 times,
    and the counts in the metrics. Inductor (generated C++ kernels) in the slow tier."""
    eager = eager_weights
    summary, compiled = _run(synth_dir, tmp_path, f"{mode}-{backend}", [f"engine.compile={mode}",
                                                                        f"engine.compile_backend={backend}"])
    assert max((eager[k].float() - compiled[k].float()).abs().max().item() for k in eager) <= 1e-4
    graphs = summary["compiled_graphs"]
    want = {"visual", "text"} | ({"loss", "optimizer"} if mode == "step" else set())
    assert want <= set(graphs) and all(graphs[k] <= 3 for k in want), graphs
    assert graphs["visual"] == 2  # the switch to unmasked tuning (all patches kept) is the one rebuild
    logged = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    assert any(r.get("compile/visual") == 2 for r in logged)


@pytest.mark.dist
def test_compiled_towers_under_deepspeed_zero2_on_two_ranks_equal_eager(synth_dir, tmp_path):
    """10 steps of DeepSpeed ZeRO-2 + LAMB on 2 gloo ranks with token dropping 0.5, towers compiled (aot_eager)
    against the same run eager: weights within 1e-4, each tower built once."""
    from tests.test_distributed import torchrun

    shard = os.path.join(synth_dir, "train", "00000.tar")
    runs = {}
    for mode in ("off", "towers"):
        out = str(tmp_path / f"{mode}.pt")
        torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
                  "optim.name=lamb", "model.vision.patch_dropout=0.5", f"engine.compile={mode}",
                  "engine.compile_backend=aot_eager"])
        runs[mode] = torch.load(out)
    eager, compiled = runs["off"]["weights"], runs["towers"]["weights"]
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) <= 1e-4
    assert runs["towers"]["graphs"] == {"visual": 1, "text": 1}
