"""Contrastive losses against a float64 reference written from the CLIP paper; tiled == local == naive.
Multi-rank behaviour is simulated by shapes here and run for real over gloo (2 and 4 ranks, the ring
included) in test_distributed.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from evaclip.losses import (ContrastiveLoss, clip_loss_local, clip_loss_naive, clip_loss_ring, clip_loss_tiled,
                            siglip_loss, siglip_loss_ring, siglip_loss_tiled)


def reference_clip_loss(img, txt, scale):
    """Radford et al. 2021, written out in float64 with explicit sums (no library CE)."""
    img, txt, s = img.double(), txt.double(), scale.double()
    g = img.shape[0]
    logits = s * img @ txt.t()
    i2t = sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(g)) / g
    t2i = sum(torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(g)) / g
    return (i2t + t2i) / 2


def make_feats(g, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(g, d, generator=gen, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(g, d, generator=gen, dtype=dtype), dim=-1).requires_grad_()
    scale = torch.tensor([14.3], dtype=dtype, requires_grad=True)
    return img, txt, scale


def _grads(loss, ts):
    return torch.autograd.grad(loss, ts)


def test_naive_matches_float64_reference():
    img, txt, s = make_feats(48, 16, torch.float64)
    ref = reference_clip_loss(img, txt, s)
    got = clip_loss_naive(img, txt, s)
    assert abs(ref.item() - got.item()) < 1e-12
    for a, b in zip(_grads(ref, [img, txt, s]), _grads(got, [img, txt, s])):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("impl", ["local", "tiled"])
def test_local_and_tiled_equal_naive_fp32(world, impl):
    """Rank r computes its rows with labels offset by r*b; the mean over ranks is the global loss, and the
    summed gradients are the global gradients (what all-gather-with-grad + averaging produce)."""
    g, d = 64, 32
    img, txt, s = make_feats(g, d)
    ref = clip_loss_naive(img, txt, s)
    g_ref = _grads(ref, [img, txt, s])
    b = g // world
    total = 0
    for r in range(world):
        sl = slice(r * b, (r + 1) * b)
        if impl == "local":
            total = total + clip_loss_local(img[sl], txt[sl], img, txt, s, r * b)
        else:
            total = total + clip_loss_tiled(img[sl], txt[sl], img, txt, s, r * b, tile=5)
    got = total / world
    assert abs(got.item() - ref.item()) <= 1e-6
    for a, bb in zip(g_ref, _grads(got, [img, txt, s])):
        assert (a - bb).abs().max().item() <= 1e-6


@pytest.mark.parametrize("tile", [1, 7, 64, 1000])
def test_tiled_any_tile_size_float64(tile):
    img, txt, s = make_feats(40, 8, torch.float64)
    ref = reference_clip_loss(img, txt, s)
    got = clip_loss_tiled(img, txt, img, txt, s, 0, tile=tile)
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(_grads(ref, [img, txt, s]), _grads(got, [img, txt, s])):
        assert (a - b).abs().max() < 1e-12


def test_tiled_bf16_features_computed_in_fp32():
    img, txt, s = make_feats(32, 16)
    ref = clip_loss_naive(img, txt, s)
    ib, tb = img.detach().bfloat16().requires_grad_(), txt.detach().bfloat16().requires_grad_()
    got = clip_loss_tiled(ib, tb, ib, tb, s, 0, tile=8)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 0.05
    gi, = torch.autograd.grad(got, [ib])
    assert gi.dtype == torch.bfloat16 and torch.isfinite(gi.float()).all()


def test_siglip_matches_reference():
    img, txt, s = make_feats(12, 8, torch.float64)
    bias = torch.tensor([-10.0], dtype=torch.float64, requires_grad=True)
    got = siglip_loss(img, txt, s, bias, 0)
    logits = s * img @ txt.t() + bias
    ref = 0
    for i in range(12):
        for j in range(12):
            z = 1.0 if i == j else -1.0
            ref = ref - math.log(1 / (1 + math.exp(-z * logits[i, j].item())))
    assert abs(got.item() - ref / 12) < 1e-9


def reference_siglip_loss(img, txt, s, bias):
    """Zhai et al. 2023 in float64 with explicit sums: -sum_ij log sigmoid(z_ij (s x_i.y_j + bias)) / n."""
    img, txt, s, bias = img.double(), txt.double(), s.double(), bias.double()
    n = img.shape[0]
    total = 0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (s * img[i] @ txt[j] + bias)))
    return (total / n).reshape(())


@pytest.mark.parametrize("tile", [1, 7, 64, 1000])
def test_ring_on_one_rank_any_tile_size_float64(tile):
    """The ring of one rank (its own block only) against the float64 references, for CLIP and SigLIP."""
    img, txt, s = make_feats(23, 8, torch.float64)
    bias = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    ref, got = reference_clip_loss(img, txt, s), clip_loss_ring(img, txt, s, tile=tile)
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(_grads(ref, [img, txt, s]), _grads(got, [img, txt, s])):
        assert (a - b).abs().max() < 1e-12
    ref, got = reference_siglip_loss(img, txt, s, bias), siglip_loss_ring(img, txt, s, bias, tile=tile)
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(_grads(ref, [img, txt, s, bias]), _grads(got, [img, txt, s, bias])):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("tile", [1, 5, 64])
def test_tiled_siglip_rows_of_a_rank_float64(tile):
    """Tiled SigLIP of one rank's rows (offset diagonal) == the b x G SigLIP, value and every gradient."""
    img, txt, s = make_feats(24, 8, torch.float64)
    bias = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    rows = slice(8, 16)
    ref = siglip_loss(img[rows], txt, s, bias, 8)
    got = siglip_loss_tiled(img[rows], txt, s, bias, 8, tile=tile)
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(_grads(ref, [img, txt, s, bias]), _grads(got, [img, txt, s, bias])):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_ring_and_tiled_bf16_features_accumulate_in_fp32(kind):
    img, txt, s = make_feats(32, 16)
    bias = torch.tensor([-3.0], requires_grad=True)
    ib, tb = img.detach().bfloat16().requires_grad_(), txt.detach().bfloat16().requires_grad_()
    if kind == "clip":
        ref, got = clip_loss_naive(img, txt, s), clip_loss_ring(ib, tb, s, tile=8)
    else:
        ref, got = siglip_loss(img, txt, s, bias, 0), siglip_loss_ring(ib, tb, s, bias, tile=8)
        tiled = siglip_loss_tiled(ib, tb, s, bias, 0, tile=8)
        assert tiled.dtype == torch.float32 and abs(tiled.item() - ref.item()) < 0.05
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 0.05
    gi, gt = torch.autograd.grad(got, [ib, tb])
    assert gi.dtype == gt.dtype == torch.bfloat16 and torch.isfinite(gi.float()).all()


def test_module_single_process_impls_agree():
    img, txt, s = make_feats(16, 8)
    vals = [ContrastiveLoss("clip", impl, tile_size=3)(img, txt, s).item()
            for impl in ("naive", "local", "tiled", "ring")]
    assert max(vals) - min(vals) < 1e-6 * max(vals)  # fp32: a loss of ~24 summed in another order
    bias = torch.tensor([-2.0])
    vals = [ContrastiveLoss("siglip", impl, tile_size=3)(img, txt, s, bias).item()
            for impl in ("naive", "local", "tiled", "ring")]
    assert max(vals) - min(vals) < 1e-6 * max(vals)  # fp32: a loss of ~24 summed in another order
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")(img, txt, s)
