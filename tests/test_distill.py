"""Distillation from a frozen teacher CLIP (objective.kind = "distill"): the losses against float64 references
written from the formulas (one rank, and 2 / 4 gloo ranks for local / tiled / ring), and training runs."""
import pytest
import torch
import torch.nn.functional as F

from evaclip.losses.distill import DistillLoss, feature_loss
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
def test_soft_ce_over_gloo_ranks_equals_the_reference_over_the_global_batch(world, tmp_path):
    """local / tiled / ring on W gloo ranks (7 rows each, a teacher 12 wide): the mean of the ranks' losses, each
    rank's feature gradients (x W, the engine's average) and the scale's gradient against the float64 reference
    over the gathered batch (fp32 <= 1e-6, float64 <= 1e-12). ring gathers nothing: the teacher's blocks travel
    with the student's."""
    from tests.dist_worker import DISTILL_CASES, LOSS_ROWS, distill_inputs

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
