"""Distillation from a frozen teacher CLIP (objective.kind = "distill"): the losses against float64 references
written from the formulas (one rank, and 2 / 4 gloo ranks for local / tiled / ring), and training runs."""
import io
import os

import pytest
import torch
import torch.nn.functional as F

from evaclip.losses.distill import DistillLoss, feature_loss
from tests.conftest import REPO
from tests.test_distributed import torchrun


def reference_soft_ce(img, txt, t_img, t_txt, s, tau):
    """-sum_j p^T_ij log p^S_ij per row, image -> text and text -> image, averaged over the G rows and the two
    directions; float64, explicit sums and exponentials (no library softmax or cross-entropy)."""
    img, txt, t_img, t_txt, s, tau = (x.double() for x in (img, txt, t_img, t_txt, s, tau))
    g = img.shape[0]
    student, teacher = s * img @ txt.t(), tau * t_img @ t_txt.t()  # [G, G]: rows image -> text

    def row(st, te):
        p_t = torch.exp(te) / torch.exp(te).sum()
        log_p_s = st - torch.log(torch.exp(st).sum())
        return -(p_t * log_p_s).sum()

    i2t = sum(row(student[i], teacher[i]) for i in range(g))
    t2i = sum(row(student[:, j], teacher[:, j]) for j in range(g))
    return (i2t + t2i) / (2 * g)


def feats(g, d, dt, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    unit = [F.normalize(torch.randn(g, w, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
            for w in (d, d, dt, dt)]
    return unit[0].requires_grad_(), unit[1].requires_grad_(), unit[2], unit[3]


@pytest.mark.parametrize("impl", ["naive", "local", "tiled", "ring"])
@pytest.mark.parametrize("tile", [1, 5, 64])
def test_soft_ce_on_one_rank_equals_the_float64_reference(impl, tile):
    """Value and gradients (features and the student's scale) in float64 (<= 1e-12) and fp32 (<= 1e-6), with a
    teacher of another width; tiles of 1 and 5 do not divide the 13 rows."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        img, txt, t_img, t_txt = feats(13, 8, 5, dtype)
        s = torch.tensor([9.0], dtype=dtype, requires_grad=True)
        tau = torch.tensor(25.0, dtype=dtype)
        ref = reference_soft_ce(img, txt, t_img, t_txt, s, tau)
        want = torch.autograd.grad(ref, [img, txt, s])
        got = DistillLoss("soft_ce", impl, tile)(img, txt, s, t_img, t_txt, tau)
        assert got.dtype == dtype and abs(got.item() - ref.item()) <= tol
        for a, b in zip(torch.autograd.grad(got, [img, txt, s]), want):
            assert (a.double() - b).abs().max().item() <= tol


def test_soft_ce_is_the_hard_clip_loss_when_the_teacher_is_certain():
    """A teacher whose rows are one-hot on the true pairs (huge scale, orthogonal embeddings) turns soft CE
    into the CLIP loss: the soft target generalises the label."""
    from evaclip.losses import clip_loss_naive

    img, txt, _, _ = feats(6, 8, 6)
    eye = torch.eye(6, dtype=torch.float64)
    s = torch.tensor([7.0], dtype=torch.float64)
    got = DistillLoss("soft_ce", "local")(img, txt, s, eye, eye, torch.tensor(1e4, dtype=torch.float64))
    assert abs(got.item() - clip_loss_naive(img, txt, s).item()) < 1e-9


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_losses_equal_the_float64_reference(kind):
    img, txt, t_img, t_txt = feats(9, 8, 8, torch.float32)
    rows = []
    got = DistillLoss(kind)(img * 3, txt * 0.5, None, t_img, t_txt, 1.0, rows=rows)  # unnormalised: it normalises

    def ref(a, t):
        a, t = a.double(), t.double()
        a, t = a / a.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        if kind == "cosine":
            return 1 - (a * t).sum(-1)
        return ((a - t) ** 2).sum(-1)

    per = (ref(img * 3, t_img) + ref(txt * 0.5, t_txt)) / 2
    assert abs(got.item() - per.mean().item()) < 1e-6 and (rows[0].double() - per).abs().max() < 1e-6
    want = torch.autograd.grad(per.mean(), [img, txt])
    for a, b in zip(torch.autograd.grad(got, [img, txt]), want):
        assert (a.double() - b).abs().max() < 1e-6
    assert feature_loss(kind, t_img, t_txt, t_img, t_txt).item() < 1e-6  # the teacher itself: no loss


@pytest.mark.parametrize("world", [2, 4])
def test_distill_losses_over_gloo_ranks_equal_the_reference_over_the_global_batch(world, tmp_path):
    """Soft CE, local / tiled / ring on W gloo ranks (7 rows each, a teacher 12 wide): the mean of the ranks'
    losses, each rank's feature gradients (x W, the engine's average) and the scale's gradient against the float64
    reference over the gathered batch (fp32 <= 1e-6, float64 <= 1e-12); ring gathers nothing: the teacher's blocks
    travel with the student's. Cosine and MSE regression likewise against the global batch's mean."""
    from tests.dist_worker import DISTILL_CASES, FEATURE_CASES, LOSS_ROWS, distill_inputs, loss_inputs

    out = str(tmp_path / "distill.pt")
    torchrun(["tests/dist_worker.py", "distill", out], nproc=world)
    ranks = [torch.load(out.replace(".pt", f".{r}.pt")) for r in range(world)]
    for impl, dt, tile in DISTILL_CASES:
        dtype, tol = getattr(torch, dt), (1e-6 if dt == "float32" else 1e-12)
        parts = [distill_inputs(r, torch.float64) for r in range(world)]
        img, txt, t_img, t_txt = (torch.cat([p[k] for p in parts]) for k in range(4))
        img, txt = img.to(dtype).double().requires_grad_(), txt.to(dtype).double().requires_grad_()
        t_img, t_txt = t_img.to(dtype).double(), t_txt.to(dtype).double()
        s = torch.tensor([12.0], dtype=torch.float64, requires_grad=True)
        ref = reference_soft_ce(img, txt, t_img, t_txt, s, torch.tensor(30.0, dtype=torch.float64))
        gi, gt, gs = torch.autograd.grad(ref, [img, txt, s])
        case = (impl, dt, tile)
        assert abs(ranks[0]["res"][case]["loss"] - ref.item()) <= tol, case
        assert (ranks[0]["res"][case]["scale"].double() - gs).abs().max() <= tol, case
        for r, rk in enumerate(ranks):
            sl = slice(r * LOSS_ROWS, (r + 1) * LOSS_ROWS)
            assert (rk["res"][case]["gi"].double() / world - gi[sl]).abs().max() <= tol, case
            assert (rk["res"][case]["gt"].double() / world - gt[sl]).abs().max() <= tol, case
    for kind, dt in FEATURE_CASES:  # the global batch's mean regression loss, from its formula in float64
        tol = 1e-6 if dt == "float32" else 1e-12
        dtype = getattr(torch, dt)
        img, txt = (torch.cat([distill_inputs(r, dtype)[k] for r in range(world)]).double().requires_grad_()
                    for k in (0, 1))
        t_img, t_txt = (torch.cat([loss_inputs(r + 50, dtype)[k] for r in range(world)]).double() for k in (0, 1))

        def per(a, t, kind=kind):
            a, t = a / a.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            return 1 - (a * t).sum(-1) if kind == "cosine" else ((a - t) ** 2).sum(-1)

        ref = ((per(img, t_img) + per(txt, t_txt)) / 2).mean()
        gi, gt = torch.autograd.grad(ref, [img, txt])
        assert abs(ranks[0]["res"][(kind, dt)]["loss"] - ref.item()) <= tol, kind
        for r, rk in enumerate(ranks):
            sl = slice(r * LOSS_ROWS, (r + 1) * LOSS_ROWS)
            assert (rk["res"][(kind, dt)]["gi"].double() / world - gi[sl]).abs().max() <= tol, kind
            assert (rk["res"][(kind, dt)]["gt"].double() / world - gt[sl]).abs().max() <= tol, kind


# ------------------------------------------------------------------------------------------------ training
DISTILL = ["objective.kind=distill", "model.name=EVA02-Mi-8-64"]  # the smaller student, the demo-size teacher


def distill_trainer(synth_dir, tmp_path, teacher, name="kd", steps=4, extra=()):
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.conftest import tiny_overrides

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), name, steps,
                                                 [*DISTILL, f"distill.teacher={teacher}", *extra]))
    return Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)


def test_a_distill_run_trains_the_student_and_leaves_the_teacher_bit_identical(synth_dir, mim_teacher, tmp_path):
    """Tiled loss, 50% token dropping, 2 accumulation steps: the student's weights move, the teacher's do not
    (bit-identical), never require grad and are in no optimizer group or state; both loss parts are logged."""
    import json
    import os

    tr = distill_trainer(synth_dir, tmp_path, mim_teacher, steps=3,
                         extra=["loss.impl=tiled", "loss.tile_size=3", "model.vision.patch_dropout=0.5",
                                "engine.accum_steps=2", "data.micro_batch_size=4"])
    teacher = tr.objective.teacher.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = {k: v.clone() for k, v in tr.model.state_dict().items()}
    result = tr.train()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    mine = {id(p) for p in teacher.parameters()}
    opt = tr.engine.optimizer
    assert not any(id(p) in mine for g in opt.param_groups for p in g["params"]) and not any(id(p) in mine for p in opt.state)
    assert not torch.equal(tr.model.state_dict()["visual.trunk.blocks.0.attn.q_proj.weight"],
                           student["visual.trunk.blocks.0.attn.q_proj.weight"])
    recs = [json.loads(x) for x in open(os.path.join(result["run_dir"], "metrics.jsonl")) if "train/loss" in x]
    assert len(recs) == 3
    for r in recs:  # the loss is the weighted sum of its logged parts (weights 1 and 1)
        assert abs(r["train/loss"] - r["train/distill_loss"] - r["train/clip_loss"]) < 1e-5 * r["train/loss"]


@pytest.mark.parametrize("impl", ["local", "ring"])
def test_distill_accumulation_equals_the_big_batch(synth_dir, mim_teacher, tmp_path, impl):
    """4 micro-batches of 8 == one batch of 32 (float64, <= 1e-6 after 2 steps, 50% token dropping): the teacher's
    features of the step are cached and concatenated like the student's."""
    from tests.test_train import accumulated_minus_big_batch

    diff = accumulated_minus_big_batch(lambda name, accum: distill_trainer(
        synth_dir, tmp_path, mim_teacher, name, extra=[f"engine.accum_steps={accum}", "engine.grad_clip=0",
                                                       f"loss.impl={impl}", "model.vision.patch_dropout=0.5"]))
    assert diff <= 1e-6, diff


def test_a_distill_resume_refuses_another_teacher_and_changed_distill_settings(synth_dir, mim_teacher, tmp_path):
    import shutil

    from evaclip.errors import CheckpointError
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import create_model, model_record
    from tests.conftest import mcfg

    teacher = str(tmp_path / "teacher")
    shutil.copytree(mim_teacher, teacher)
    distill_trainer(synth_dir, tmp_path, teacher, "r", 2, ["checkpoint.every_steps=2"]).train()
    for override, key in (("distill.weight=2.0", "distill.weight"), ("distill.temperature=0.05", "distill.temperature"),
                          ("distill.clip_weight=0.5", "distill.clip_weight")):
        with pytest.raises(CheckpointError, match=f"other settings: {key}"):
            distill_trainer(synth_dir, tmp_path, teacher, "r", 4, ["checkpoint.every_steps=2", override])
    torch.manual_seed(7)  # other weights, same architecture, same folder
    export_open_clip(create_model(mcfg()).state_dict(), model_record(mcfg()), teacher, replace=True)
    with pytest.raises(CheckpointError, match=r"other settings: distill.teacher_identity"):
        distill_trainer(synth_dir, tmp_path, teacher, "r", 4, ["checkpoint.every_steps=2"])


@pytest.mark.parametrize("override,needle", [
    ('distill.teacher=""', "needs distill.teacher"),
    ("distill.teacher=open_clip:EVA02-B-16", "distill.teacher_weights"),
    ("loss.kind=siglip", "distillation into a SigLIP student is not supported"),
    ("distill.weight=0", "distill.weight"),
    ("distill.loss=kl", "distill.loss"),
])
def test_distill_config_errors_name_the_key(override, needle):
    from evaclip.config import ConfigError, load_config
    from evaclip.preflight import resolve

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        resolve(load_config("distill_demo_cpu", ["data.root=/d", "distill.teacher=/runs/teacher",
                                                 "model.use_logit_bias=true", override]))


def test_a_teacher_that_tokenizes_otherwise_is_refused(synth_dir, tmp_path):
    """The batch's tokens are the student's: a teacher with another context length is one line at start."""
    from evaclip.config import ConfigError, ModelConfig
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import create_model, model_record

    src = open(os.path.join(REPO, "launch", "models", "EVA02-Mi-8-64.toml")).read()
    short = tmp_path / "models"
    short.mkdir()
    (short / "EVA02-Mi-8-64-ctx16.toml").write_text(src.replace('name = "EVA02-Mi-8-64"', 'name = "EVA02-Mi-8-64-ctx16"')
                                                   .replace("context_length = 32", "context_length = 16")
                                                   .replace('timm_name = "evaclip_eva02_micro_patch8_64"', 'timm_name = ""')
                                                   .replace("register_in_timm = true", "register_in_timm = false"))
    cfg = ModelConfig(name="EVA02-Mi-8-64-ctx16", model_dir=str(short))
    export_open_clip(create_model(cfg).state_dict(), model_record(cfg), str(tmp_path / "ctx16"))
    with pytest.raises(ConfigError, match=r"tokenizes captions unlike the student"):
        distill_trainer(synth_dir, tmp_path, str(tmp_path / "ctx16"), "tok")


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_regression_across_widths_trains_a_head_that_checkpoints_keep_and_exports_leave_out(
        synth_dir, mim_teacher, tmp_path, kind):
    """The teacher's embeddings are 128 wide, the student's 64: a linear head maps the student's into the
    teacher's space. Every student parameter, the head included, gets a gradient; the checkpoint's model record
    rebuilds the model with its head; the export is the plain CLIP (open_clip loads it strictly, same embeddings)."""
    from evaclip.checkpoint import load_weights
    from evaclip.export.open_clip import export_open_clip, verify_export
    from evaclip.models import model_from_record

    tr = distill_trainer(synth_dir, tmp_path, mim_teacher, kind, 2, [f"distill.loss={kind}", "checkpoint.every_steps=2",
                                                                     "engine.accum_steps=2", "data.micro_batch_size=4"])
    from tests.test_train import fixed_batches

    assert tr.model.distill_head.weight.shape == (128, 64)
    batch = fixed_batches(1, 4)[0]
    loss = tr.objective.loss(tr.model(batch["image"], batch["text"]), tr.objective.targets(batch))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.model.parameters())
    tr.model.zero_grad(set_to_none=True)
    head = tr.model.distill_head.weight.detach().clone()
    result = tr.train()
    assert not torch.equal(head, tr.model.distill_head.weight)
    sd, meta = load_weights(result["run_dir"])
    assert meta["model"]["distill"] == {"target_dim": 128}
    rebuilt = model_from_record(meta["model"])
    rebuilt.load_state_dict(sd)  # strict: the head is part of the model the record describes
    out = str(tmp_path / f"export_{kind}")
    export_open_clip(sd, meta["model"], out)
    diffs = verify_export(out, sd, meta["model"])
    assert max(diffs.values()) <= 1e-5, diffs
    from safetensors.torch import load_file

    assert not any(k.startswith("distill_head") for k in load_file(os.path.join(out, "open_clip_model.safetensors")))


@pytest.mark.dist
@pytest.mark.slow
def test_distill_under_zero2_on_two_ranks_with_the_ring_equals_one_process(synth_dir, mim_teacher, tmp_path):
    """10 steps of DeepSpeed ZeRO-2 + LAMB on 2 gloo ranks, ring loss (the teacher's blocks travel with the
    student's) and 50% token dropping == the plain engine in one process on the whole batch with the local loss
    (<= 1e-6); the teacher is never in a ZeRO partition (it lives outside the engine)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.dist_worker import run_steps, train_overrides
    from tests.test_distributed import EXACT

    shard = os.path.join(synth_dir, "train", "00000.tar")
    common = [*DISTILL, f"distill.teacher={mim_teacher}", "model.vision.patch_dropout=0.5", "optim.name=lamb", *EXACT]
    cfg = load_config(None, train_overrides(shard, str(tmp_path / "ref"), ["data.micro_batch_size=8", *common]))
    tr = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)
    ref_losses = run_steps(tr, 0, 1)
    out = str(tmp_path / "z2.pt")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "loss.impl=ring", *common])
    got = torch.load(out)
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses)) <= 1e-5
    ref = tr.model.state_dict()
    assert max((got["weights"][k].float() - ref[k].float()).abs().max().item() for k in ref) <= 1e-6
    assert set(got["weights"]) == set(ref)  # the student alone: no teacher weights in the engine's model


# ------------------------------------------------------------------------------------------ offline: reinforce
@pytest.fixture(scope="module")
def reinforced(synth_dir, mim_teacher, tmp_path_factory):
    """The test data's 4 shards reinforced by the teacher export: 3 crops per sample (hflip on)."""
    from evaclip.curation.reinforce import reinforce
    from evaclip.encoders import load_source

    out = str(tmp_path_factory.mktemp("kd") / "kd")
    enc = load_source(mim_teacher)
    res = reinforce(os.path.join(synth_dir, "recipe.toml"), synth_dir, enc, mim_teacher, out, augmentations=3,
                    crop_scale=(0.5, 1.0), hflip=True, seed=4, batch_size=20, workers=2)
    return {"out": out, "res": res, "enc": enc}


def test_reinforced_shards_carry_the_teachers_embeddings_of_their_stored_crops(reinforced, synth_dir):
    """webdataset reads the new shards; every member of the input is there byte for byte; kd.npy's image
    embedding k is the teacher's unit embedding of stored crop k (recomputed here, float16) and its text embedding
    the caption's; a recipe and a manifest list the shards; a rerun skips them; other settings are refused."""
    import numpy as np
    import webdataset as wds

    from evaclip.curation.reinforce import reinforce
    from evaclip.data.samples import read_kd
    from evaclip.data.transforms import crop_view, decode_image
    from evaclip.errors import UserError

    out, enc, res = reinforced["out"], reinforced["enc"], reinforced["res"]
    assert res["shards"] == 4 and res["samples"] == 256 and res["skipped"] == {}
    originals = {s["__key__"]: s for s in wds.WebDataset(os.path.join(synth_dir, "train", "{00000..00003}.tar"),
                                                         shardshuffle=False)}
    samples = list(wds.WebDataset(os.path.join(out, "synthetic", "{000000..000003}.tar"), shardshuffle=False))
    assert len(samples) == 256 and {s["__key__"] for s in samples} == set(originals)
    flips = 0
    for s in samples[:12]:
        src = originals[s["__key__"]]
        assert all(s[m] == src[m] for m in src if not m.startswith("__"))
        kd = read_kd(s["kd.npy"])
        assert kd["image"].dtype == np.float16 and kd["image"].shape == (3, 128) and str(kd["teacher"]) == enc.identity
        img = decode_image(src["jpg"])
        views = torch.stack([crop_view(img, b.tolist(), enc.image_size, enc.mean, enc.std) for b in kd["boxes"]])
        with torch.no_grad():
            want = F.normalize(enc.encode_image(views), dim=-1)
            text = F.normalize(enc.encode_text(enc.tokenizer([src["txt"].decode()])), dim=-1)[0]
        assert (torch.from_numpy(kd["image"]).float() - want).abs().max() < 2e-3  # float16: 1e-3 relative
        assert (torch.from_numpy(kd["text"]).float() - text).abs().max() < 2e-3
        flips += int(kd["boxes"][:, 4].sum())
    assert 0 < flips < 36  # hflip: some crops flipped, not all
    assert os.path.exists(os.path.join(out, "manifest.parquet"))
    assert 'shards = "synthetic/{000000..000003}.tar"' in open(os.path.join(out, "recipe.toml")).read()
    teacher = res["settings"]["teacher"]
    again = reinforce(os.path.join(synth_dir, "recipe.toml"), synth_dir, enc, teacher, out, 3, (0.5, 1.0), True, 4)
    assert again["done_before"] == 4 and again["shards"] == 0
    with pytest.raises(UserError, match="other settings .*augmentations"):
        reinforce(os.path.join(synth_dir, "recipe.toml"), synth_dir, enc, teacher, out, 5, (0.5, 1.0), True, 4)


def test_reinforce_in_two_parts_writes_the_same_shards_and_counts_corrupt_samples(mim_teacher, tmp_path):
    """--part 0/2 and 1/2 (run one after the other, as a killed run resumed) == one run, byte for byte; the recipe
    appears once every part is done; a corrupt image and a missing caption are skipped and counted."""
    from evaclip.curation.reinforce import reinforce
    from evaclip.encoders import load_source
    from tests.test_data import write_shards

    pattern = write_shards(str(tmp_path / "in"), "c", 3, 10, corrupt={(1, 3)}, no_caption={(2, 5)})
    enc = load_source(mim_teacher)
    whole = reinforce(pattern, "", enc, "t", str(tmp_path / "one"), 2, batch_size=4, workers=0)
    assert whole["samples"] == 28 and whole["skipped"] == {"decode_error": 1, "missing_caption": 1}
    first = reinforce(pattern, "", enc, "t", str(tmp_path / "two"), 2, part=(0, 2), batch_size=4, workers=2)
    assert first["shards"] == 2 and first["recipe"] is None
    second = reinforce(pattern, "", enc, "t", str(tmp_path / "two"), 2, part=(1, 2), batch_size=4, workers=2)
    assert second["shards"] == 1 and second["recipe"]
    for k in range(3):
        name = os.path.join("shards", f"{k:06d}.tar")
        assert open(tmp_path / "one" / name, "rb").read() == open(tmp_path / "two" / name, "rb").read()


def test_offline_distillation_equals_online_on_the_stored_crops(reinforced, synth_dir, mim_teacher, tmp_path):
    """6 steps (2 workers, 2 accumulation steps) on the reinforced shards with the stored embeddings (no teacher
    forward) == the same run with the teacher's forward on the same stored crops, its embeddings rounded to float16
    as stored: losses and weights <= 1e-5. The teacher's identity is checked against the shards' record."""
    import json

    runs = {}
    for name, source in (("offline", "shards"), ("online", "online")):
        tr = distill_trainer(synth_dir, tmp_path, mim_teacher, name, 6,
                             [f"distill.source={source}", f"data.recipe={reinforced['out']}/recipe.toml",
                              "data.workers=2", "engine.accum_steps=2", "data.micro_batch_size=4"])
        if source == "online":
            exact = tr.objective.targets
            tr.objective.targets = lambda m, f=exact: {k: F.normalize(v.half().float(), dim=-1) for k, v in f(m).items()}
        else:
            assert tr.objective.teacher is None  # nothing loaded: the shards hold what it would give
        result = tr.train()
        losses = [json.loads(x)["train/loss"] for x in open(os.path.join(result["run_dir"], "metrics.jsonl"))
                  if "train/loss" in x]
        runs[name] = (losses, {k: v.clone() for k, v in tr.model.state_dict().items()})
    (la, wa), (lb, wb) = runs["offline"], runs["online"]
    assert len(la) == 6 and max(abs(a - b) for a, b in zip(la, lb)) <= 1e-5
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_shards_mode_refuses_plain_shards_another_teacher_and_a_width_it_was_not_told(reinforced, synth_dir, tmp_path):
    from evaclip.errors import TrainingStopped
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import create_model, model_record
    from tests.conftest import mcfg

    with pytest.raises(TrainingStopped, match="carry no teacher embeddings"):
        distill_trainer(synth_dir, tmp_path, "", "plain", 1, ["distill.source=shards"]).train()
    other = str(tmp_path / "other")
    torch.manual_seed(99)
    export_open_clip(create_model(mcfg()).state_dict(), model_record(mcfg()), other)
    with pytest.raises(TrainingStopped, match="carry embeddings of teacher"):
        distill_trainer(synth_dir, tmp_path, other, "other", 1,
                        ["distill.source=shards", f"data.recipe={reinforced['out']}/recipe.toml"]).train()
    shards = ["distill.source=shards", f"data.recipe={reinforced['out']}/recipe.toml", "distill.loss=cosine"]
    with pytest.raises(TrainingStopped, match="128 wide, this run regresses 64-wide ones: set distill.teacher_width=128"):
        distill_trainer(synth_dir, tmp_path, "", "width", 1, shards).train()
    tr = distill_trainer(synth_dir, tmp_path, "", "head", 1, [*shards, "distill.teacher_width=128"])
    assert tr.train()["steps"] == 1 and tr.model.distill_head.weight.shape == (128, 64)


def test_a_damaged_or_pickled_teacher_record_skips_its_sample_as_a_decode_error(reinforced):
    """A kd.npy that is truncated, of another layout, or a pickle (np.load refuses it: no code runs) skips the
    sample like an undecodable image; a good one gives the stored crop's image and that crop's embedding."""
    import functools
    import pickle

    import numpy as np
    import webdataset as wds

    from evaclip.data.samples import SkipSample, decode_reinforced, read_kd
    from evaclip.data.transforms import crop_view

    raw = next(iter(wds.WebDataset(os.path.join(reinforced["out"], "synthetic", "000000.tar"), shardshuffle=False)))
    crop = functools.partial(crop_view, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.manual_seed(0)
    img, caption, kd = decode_reinforced(raw, crop, True)
    torch.manual_seed(0)
    k = int(torch.randint(3, (1,)).item())
    stored = read_kd(raw["kd.npy"])
    assert torch.equal(kd["image"], torch.from_numpy(stored["image"][k].astype(np.float32))) and img.shape == (3, 64, 64)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for bad in (raw["kd.npy"][:100], pickle.dumps({"image": 1}), buf.getvalue(), np.zeros(3).tobytes()):
        with pytest.raises(SkipSample, match="decode_error"):
            decode_reinforced(dict(raw, **{"kd.npy": bad}), crop, True)


def test_shards_mode_names_a_teacher_that_is_not_there(synth_dir, tmp_path):
    """distill.teacher is only compared in shards mode (its identity, without loading it): one that does not exist
    is still one line naming the key."""
    from evaclip.config import ConfigError

    for teacher, extra in ((str(tmp_path / "no_run"), []),
                           ("open_clip:ViT-B-32", [f"distill.teacher_weights={tmp_path / 'no.safetensors'}"])):
        with pytest.raises(ConfigError, match="distill.teacher"):
            distill_trainer(synth_dir, tmp_path, teacher, "gone", 1, ["distill.source=shards", *extra])
