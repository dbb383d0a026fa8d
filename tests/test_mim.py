"""Masked image modeling against a CLIP teacher (objective.kind = "mim"): masking, loss, teacher, student,
training, resume, init of a CLIP from the student, timm export, image-only shards, the flywheel script."""
import json
import os

import numpy as np
import pytest
import torch

from evaclip.checkpoint import latest_checkpoint, load_weights
from evaclip.config import ConfigError, load_config
from evaclip.preflight import resolve
from evaclip.data.masking import BlockMasking, sample_rng
from evaclip.errors import TrainingStopped
from evaclip.train import REQUEUE_EXIT_CODE, Trainer
from tests.conftest import REPO, mcfg, preempt_during, run_cli, tiny_overrides

MIM = os.path.join(REPO, "launch", "experiments", "mim_demo_cpu.toml")
DEMO = os.path.join(REPO, "launch", "experiments", "demo_cpu.toml")


def mim_trainer(synth_dir, tmp_path, teacher, name="mim", steps=4, extra=()):
    cfg = load_config(MIM, tiny_overrides(synth_dir, str(tmp_path), name, steps, [f"mim.teacher={teacher}", *extra]))
    return Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)


def losses(run_dir):
    return [json.loads(x)["train/loss"] for x in open(os.path.join(run_dir, "metrics.jsonl")) if "train/loss" in x]


# ---------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("grid,ratio,min_patches", [((8, 8), 0.4, 4), ((14, 14), 0.4, 16), ((14, 14), 0.75, 16),
                                                     ((4, 6), 0.5, 2)])
def test_block_masking_exact_count_seeded_and_different_per_sample(grid, ratio, min_patches):
    gen = BlockMasking(grid, ratio, min_patches)
    want = int(round(ratio * grid[0] * grid[1]))
    masks = [gen(sample_rng(0, 5, f"key{i}")) for i in range(200)]
    assert all(m.shape == grid and m.dtype == bool and int(m.sum()) == want for m in masks)
    assert np.array_equal(gen(sample_rng(0, 5, "key3")), masks[3])  # a function of (seed, step, key)
    assert len({m.tobytes() for m in masks}) > 150  # different per sample (a 4 x 6 grid has few block layouts)
    assert not np.array_equal(gen(sample_rng(0, 6, "key3")), masks[3])  # and per step
    batch = gen.batch(["key0", "key1"], 5, 0)
    assert batch.shape == (2, grid[0] * grid[1]) and torch.equal(batch[1], torch.from_numpy(masks[1].reshape(-1)))


def _components(mask: np.ndarray) -> int:
    seen, n = np.zeros_like(mask), 0
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        n, stack = n + 1, [(i, j)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return n


def test_block_masking_masks_blocks_not_scattered_patches():
    """78 masked patches of 14 x 14 in blocks of >= 16: a few connected regions (random masks: dozens)."""
    gen = BlockMasking((14, 14), 0.4, 16)
    blocks = np.mean([_components(gen(sample_rng(1, 0, str(i)))) for i in range(50)])
    rng = np.random.default_rng(0)
    scattered = np.mean([_components(rng.permutation(196).reshape(14, 14) < 78) for _ in range(50)])
    assert blocks <= 6 and scattered >= 15, (blocks, scattered)
    # every block has an aspect ratio within [0.3, 1/0.3]: the bounding box of a 1-region mask is not a line
    one = next(m for m in (gen(sample_rng(2, 0, str(i))) for i in range(200)) if _components(m) == 1)
    rows, cols = np.nonzero(one)
    assert rows.max() > rows.min() and cols.max() > cols.min()


# ---------------------------------------------------------------------------------------------------- loss
def _reference(pred, target, mask):
    """The paper's loss in float64: -(1/|M|) sum over masked (b, n) of <p, t> / (|p| |t|)."""
    p, t = pred.double(), target.double()
    cos = (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))
    return -cos[mask].sum() / mask.sum()


def test_mim_loss_equals_a_float64_reference_and_unmasked_positions_get_no_gradient():
    from evaclip.losses import mim_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 16, 24, generator=g, requires_grad=True)
    target = torch.randn(3, 16, 24, generator=g)
    mask = torch.rand(3, 16, generator=g) < 0.4
    loss = mim_loss(pred, target, mask)
    ref_pred = pred.detach().double().requires_grad_(True)
    ref = _reference(ref_pred, target, mask)
    ref.backward()
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-6
    assert (pred.grad.double() - ref_pred.grad).abs().max() <= 1e-6
    assert torch.count_nonzero(pred.grad[~mask]) == 0 and torch.count_nonzero(pred.grad[mask]) > 0
    everything = torch.ones_like(mask)
    assert abs(mim_loss(pred, target).item() - _reference(pred.detach(), target, everything).item()) <= 1e-6
    rows = []
    half = mim_loss(pred, target, mask, denom=2 * int(mask.sum()), rows=rows)  # a micro-batch's share of a step
    assert abs(half.item() - ref.item() / 2) <= 1e-6 and rows[0].shape == (3,)


# ---------------------------------------------------------------------------------------------------- student
@pytest.mark.parametrize("name", ["EVA02-Ti-8-64", "EVA01-Ti-8-64", "EVA02E-Ti-8-64"])
def test_student_every_parameter_gets_a_gradient_and_the_mask_token_replaces_patches(name):
    from evaclip.models import create_mim_student

    torch.manual_seed(0)
    model = create_mim_student(mcfg(name), target_dim=40)
    x = torch.randn(2, 3, 64, 64)
    mask = BlockMasking(model.grid, 0.4, 4).batch(["a", "b"], 0, 0)
    out = model(x, mask)["pred"]
    assert out.shape == (2, 64, 40)
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    # masked patches carry no image information: changing the image there leaves the output unchanged
    with torch.no_grad():
        y = x.clone()
        m = mask[0].reshape(8, 8).repeat_interleave(8, 0).repeat_interleave(8, 1)
        y[0, :, m] = torch.randn(3, int(m.sum()))
        assert torch.allclose(model(x, mask)["pred"][0], model(y, mask)["pred"][0], atol=1e-6)
        assert not torch.allclose(model(x, None)["pred"][0], model(y, None)["pred"][0], atol=1e-3)


# ---------------------------------------------------------------------------------------------------- teacher
def test_teacher_from_an_evaclip_export_equals_the_same_export_through_open_clip(mim_teacher):
    """Two loaders of the teacher (evaclip's model record; open_clip's model with weights) give the same targets,
    for the last block and a chosen one."""
    from evaclip.config import MIMConfig
    from evaclip.models.mim import load_teacher
    from evaclip.models.registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for layer in (-1, 0):
        ours = load_teacher(MIMConfig(teacher=mim_teacher, teacher_layer=layer))
        theirs = load_teacher(MIMConfig(teacher=f"open_clip:local-dir:{mim_teacher}", teacher_layer=layer,
                                        teacher_weights=os.path.join(mim_teacher, "open_clip_model.safetensors")))
        a = ours(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, (8, 8))
        b = theirs(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, (8, 8))
        assert a.shape == (2, 64, 128) and (a - b).abs().max() <= 1e-5
        assert all(not p.requires_grad for p in ours.parameters()) and not ours.net.training
    with pytest.raises(ConfigError, match="teacher_layer"):
        load_teacher(MIMConfig(teacher=mim_teacher, teacher_layer=9))


@pytest.fixture(scope="module")
def mim_run(synth_dir, mim_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mimrun")
    tr = mim_trainer(synth_dir, tmp, mim_teacher, steps=4, extra=["checkpoint.every_steps=2"])
    before = {k: v.clone() for k, v in tr.objective.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    result = tr.train()
    return {"trainer": tr, "result": result, "teacher_before": before, "student_before": student_before,
            "tmp": tmp}


def test_mim_run_trains_the_student_and_leaves_the_teacher_bit_identical(mim_run):
    tr, res = mim_run["trainer"], mim_run["result"]
    assert res["steps"] == 4 and len(losses(res["run_dir"])) == 4 and all(-1 <= v <= 1 for v in losses(res["run_dir"]))
    after = tr.objective.teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in mim_run["teacher_before"].items())
    teacher_params = {id(p) for p in tr.objective.teacher.parameters()}
    opt = tr.engine.optimizer
    assert not any(id(p) in teacher_params for g in opt.param_groups for p in g["params"])
    assert not any(id(p) in teacher_params for p in opt.state)
    assert all(p.grad is None and not p.requires_grad for p in tr.objective.teacher.parameters())
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, mim_run["student_before"][k])]
    assert "mask_token" in changed and "mim_head.weight" in changed and "visual.trunk.blocks.0.attn.q_proj.weight" in changed


def test_mim_checkpoint_initialises_a_clip_and_exports_a_timm_tower(mim_run, synth_dir, tmp_path):
    import timm
    from safetensors.torch import load_file

    from evaclip.models import create_model
    from evaclip.models.convert import init_from_files

    run_dir = mim_run["result"]["run_dir"]
    mim_sd, meta = load_weights(run_dir)
    # model.vision.init = the MIM run dir: the CLIP's image trunk is the student's (its projection is new)
    cfg = load_config(DEMO, [f"model.vision.init={run_dir}"])
    clip = create_model(cfg.model)
    report = init_from_files(clip, cfg.model)
    assert "missing 2: head.weight, head.bias" in report
    trunk = clip.visual.trunk.state_dict()
    for k, v in mim_sd.items():
        if k.startswith("visual.trunk."):
            assert torch.equal(trunk[k[len("visual.trunk."):]], v), k
    # a CLIP run starts from it through the config
    cfg = load_config(DEMO, tiny_overrides(synth_dir, str(tmp_path), "clip", 1, [f"model.vision.init={run_dir}"]))
    assert Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()["steps"] == 1
    # evaclip export of a MIM run: the student trunk as a timm folder that timm loads strictly
    out = str(tmp_path / "export")
    r = run_cli(["export", run_dir, "--out", out])
    assert r.returncode == 0, r.stderr
    sd = load_file(os.path.join(out, "timm_image_tower", "model.safetensors"))
    tower = timm.create_model(meta["model"]["arch"]["timm_name"], num_classes=0)
    tower.load_state_dict(sd, strict=True)
    via_dir = timm.create_model(f"local-dir:{os.path.join(out, 'timm_image_tower')}", pretrained=True)
    student = mim_run["trainer"].model.visual.trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = student.forward_features(x)
        assert (tower.eval().forward_features(x) - want).abs().max() <= 1e-5
        assert (via_dir.eval().forward_features(x) - want).abs().max() <= 1e-5
    r = run_cli(["export", run_dir, "--out", str(tmp_path / "e2"), "--verify"])
    assert r.returncode != 0 and "image tower only" in r.stderr
    r = run_cli(["eval", "--checkpoint", run_dir, "--suite", "quick", "--datasets-root", str(tmp_path), "--out",
                 str(tmp_path / "ev")])
    assert r.returncode != 0 and "masked-image-modeling run" in r.stderr and "Traceback" not in r.stderr


def test_a_teacher_of_another_width_patch_and_resolution(synth_dir, tmp_path):
    """Student EVA02-Ti-8-64 (8 x 8 patches, width 128); teacher 96 px, patch 16 (6 x 6), width 96, depth 2."""
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import create_model, model_record
    from evaclip.models.registry import get_variant

    text = """name = "teacher-96"
embed_dim = 64
[vision]
img_size = 96
patch_size = 16
embed_dim = 96
depth = 2
num_heads = 4
qkv_fused = false
mlp_ratio = 2.0
swiglu_mlp = true
scale_mlp = true
scale_attn_inner = true
use_rot_pos_emb = true
[text]
context_length = 32
width = 64
heads = 4
layers = 1
"""
    path = tmp_path / "teacher-96.toml"
    path.write_text(text)
    v = get_variant(str(path))
    assert (v.image_size, v.vision["patch_size"], v.vision["embed_dim"], v.vision["depth"]) == (96, 16, 96, 2)
    cfg = mcfg(str(path))
    export_open_clip(create_model(cfg).state_dict(), model_record(cfg), str(tmp_path / "t96"))
    tr = mim_trainer(synth_dir, tmp_path, str(tmp_path / "t96"), steps=2)
    assert tr.objective.teacher.grid == (6, 6) and tr.objective.teacher.width == 96 and tr.model.mim_head.out_features == 96
    res = tr.train()
    assert res["steps"] == 2 and all(np.isfinite(losses(res["run_dir"])))


def test_mim_resume_continues_exactly(synth_dir, mim_teacher, tmp_path):
    """Stop a MIM run after 3 of 6 steps, resume: the same losses and final weights as one run."""
    extra = ["checkpoint.every_steps=3", "data.workers=2"]
    full = mim_trainer(synth_dir, tmp_path, mim_teacher, "full", 6, extra).train()
    part = mim_trainer(synth_dir, tmp_path, mim_teacher, "part", 6, extra)
    preempt_during(part, 3)
    with pytest.raises(SystemExit) as stop:
        part.train()
    assert stop.value.code == REQUEUE_EXIT_CODE and latest_checkpoint(part.run_dir).endswith("step-00000003")
    resumed = mim_trainer(synth_dir, tmp_path, mim_teacher, "part", 6, extra).train()
    assert losses(full["run_dir"]) == losses(resumed["run_dir"])
    a, _ = load_weights(full["run_dir"])
    b, _ = load_weights(resumed["run_dir"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_a_compiled_mim_run_equals_the_eager_one(synth_dir, mim_teacher, tmp_path):
    """engine.compile (aot_eager): the student and the teacher compiled, 4 steps end within 1e-4 of eager, each
    built once (the teacher's forward runs without grad)."""
    eager = mim_trainer(synth_dir, tmp_path, mim_teacher, "eager").train()
    compiled = mim_trainer(synth_dir, tmp_path, mim_teacher, "compiled", extra=[
        "engine.compile=towers", "engine.compile_backend=aot_eager"]).train()
    a, _ = load_weights(eager["run_dir"])
    b, _ = load_weights(compiled["run_dir"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert compiled["compiled_graphs"] == {"student": 1, "teacher/no_grad": 1}


def _image_only_shards(synth_dir, out_dir):
    """The synthetic shard 0 without its captions (an ImageNet-21K-style image-only shard)."""
    import tarfile

    os.makedirs(out_dir, exist_ok=True)
    src, dst = os.path.join(synth_dir, "train", "00000.tar"), os.path.join(out_dir, "img-000.tar")
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if not m.name.endswith(".txt"):
                tout.addfile(m, tin.extractfile(m))
    return dst


def test_caption_less_shards_train_under_mim_and_are_refused_under_clip(synth_dir, mim_teacher, tmp_path):
    shard = _image_only_shards(synth_dir, str(tmp_path / "imgs"))
    only = ['data.recipe=""', f'data.shards="{shard}"']
    res = mim_trainer(synth_dir, tmp_path, mim_teacher, "imgonly", 2, only).train()
    assert res["steps"] == 2 and res["skips"]["missing_caption"] == 0
    cfg = load_config(DEMO, tiny_overrides(synth_dir, str(tmp_path), "clip", 2, only))
    with pytest.raises(TrainingStopped, match=r"no caption .*objective.kind = 'mim'"):
        Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()


@pytest.mark.parametrize("override,needle", [
    ('mim.teacher=""', "needs mim.teacher"),
    ("mim.mask_ratio=1.5", "mim.mask_ratio"),
    ("mim.teacher=open_clip:EVA02-B-16", "mim.teacher_weights"),
    ("model.vision.patch_dropout=0.5", "patch_dropout must be 0"),
    ("eval.suite=quick", "eval.suite"),
    ("log.sample_loss=true", "log.sample_loss"),
    ("objective.kind=mlm", "objective.kind"),
])
def test_mim_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        resolve(load_config(MIM, ["data.root=/d", "mim.teacher=/runs/teacher", override]))


@pytest.mark.slow
def test_flywheel_script_writes_its_summary(synth_dir, tmp_path):
    """The flywheel end to end in miniature (3 steps a stage): summary.json and the table."""
    from evaclip import flywheel

    s = flywheel.run(synth_dir, str(tmp_path / "none"), str(tmp_path / "fw"), [0], mim_steps=3, clip_steps=3,
                     teacher_steps=3)
    saved = json.load(open(tmp_path / "fw" / "summary.json"))
    assert saved["of"] == 1 and set(saved["seeds"][0]) >= {"top1_from_mim", "top1_scratch", "mim_loss_start",
                                                             "mim_loss_end", "wall_s"}
    assert s["teacher_wall_s"] > 0 and os.path.exists(tmp_path / "fw" / "seed0" / "clip_from_mim" / "config.resolved.toml")
    cfg_text = open(tmp_path / "fw" / "seed0" / "clip_from_mim" / "config.resolved.toml").read()
    assert "seed0/mim" in cfg_text  # the from-MIM arm's model.vision.init
    assert "CLIP from MIM ahead on" in open(tmp_path / "fw" / "summary.md").read()


def test_shipped_mim_experiments_name_a_known_teacher_and_build_their_student():
    import open_clip

    from evaclip.files import builtin_names
    from evaclip.models import create_mim_student

    mims = [n for n in builtin_names("experiment") if load_config(n).objective.kind == "mim"]
    assert {"mim_demo_cpu", "eva02_mim_b16_in21k"} <= set(mims)
    cfg = load_config("eva02_mim_b16_in21k")
    assert cfg.mim.teacher.startswith("open_clip:") and cfg.mim.teacher[len("open_clip:"):] in open_clip.list_models()
    import timm

    vision = open_clip.get_model_config(cfg.mim.teacher[len("open_clip:"):])["vision_cfg"]
    width = timm.create_model(vision["timm_model_name"], pretrained=False, num_classes=0, device="meta").num_features
    student = create_mim_student(cfg.model, width, device="meta")
    n = sum(p.numel() for p in student.visual.trunk.parameters())
    assert student.mim_head.out_features == width and 80e6 < n < 95e6  # EVA-02-B: 86M
    assert load_config("eva02_clip_b16_from_mim").model.vision.init == "/runs/eva02_mim_b16_in21k"


def test_a_mim_resume_refuses_another_teacher_and_a_teacher_that_does_not_fit_is_named(synth_dir, mim_teacher,
                                                                                        tmp_path):
    """Issue 32 (5): a MIM resume quietly took other teacher weights (a teacher run's newer checkpoint, a
    re-exported folder), regressing other targets from the same step on; (17) weights of another architecture
    for an open_clip teacher were a load_state_dict traceback."""
    import shutil

    from evaclip.errors import CheckpointError
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import create_model, model_record

    teacher = str(tmp_path / "teacher")
    shutil.copytree(mim_teacher, teacher)
    mim_trainer(synth_dir, tmp_path, teacher, "t", 2, ["checkpoint.every_steps=2"]).train()
    torch.manual_seed(7)  # other weights, same architecture, same folder
    export_open_clip(create_model(mcfg()).state_dict(), model_record(mcfg()), teacher, replace=True)
    with pytest.raises(CheckpointError, match=r"other settings: mim.teacher_identity \(\w+ -> \w+\)"):
        mim_trainer(synth_dir, tmp_path, teacher, "t", 4, ["checkpoint.every_steps=2"])
    weights = os.path.join(mim_teacher, "open_clip_model.safetensors")
    with pytest.raises(ConfigError, match=r"mim.teacher_weights: .* does not fit the teacher's architecture"):
        mim_trainer(synth_dir, tmp_path, "open_clip:ViT-B-32", "vit", 2, [f"mim.teacher_weights={weights}"])
