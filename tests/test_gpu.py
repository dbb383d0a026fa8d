"""On a CUDA GPU (skipped without one): the numerics that run there against the CPU float64 references the rest of
the suite uses, and one real bf16 training step of a tower with token dropping and the flash kernel."""
import pytest
import torch

from evaclip.losses import ContrastiveLoss
from evaclip.optim import Lamb

from tests.test_losses import make_feats, reference_clip_loss
from tests.test_optim import HP, lamb_problem, reference_lamb

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("impl", ["local", "tiled", "ring"])
def test_gpu_contrastive_loss_matches_float64_reference(impl):
    img, txt, s = make_feats(256, 64)
    ref = reference_clip_loss(img, txt, s)
    ref_g = torch.autograd.grad(ref, [img, txt, s])
    ic, tc, sc = (t.detach().cuda().requires_grad_() for t in (img, txt, s))
    got = ContrastiveLoss("clip", impl, tile_size=96)(ic, tc, sc)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for a, b in zip(ref_g, torch.autograd.grad(got, [ic, tc, sc])):
        assert (b.double().cpu() - a).norm() <= 1e-4 * a.norm()


def test_gpu_lamb_matches_paper_reference():
    params, grads = lamb_problem()
    ref = reference_lamb(params, grads, **HP)
    ps = [p.clone().cuda().requires_grad_() for p in params]
    opt = Lamb(ps, **HP)
    for g in grads:
        for p, gg in zip(ps, g):
            p.grad = gg.clone().cuda()
        opt.step()
    assert max((a.double().cpu() - b).abs().max().item() for a, b in zip(ps, ref)) <= 1e-5


def test_gpu_bf16_train_steps_with_token_dropping_and_flash():
    """A few bf16-autocast steps of the tiny CLIP on its own batch with half the patch tokens dropped and the
    flash kernel: the loss is finite and falls, and every trainable parameter gets a gradient."""
    from evaclip.config import ModelConfig, TextConfig, VisionConfig
    from evaclip.models import create_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="EVA02-Ti-8-64", vision=VisionConfig(patch_dropout=0.5, attn_impl="sdpa_flash"),
                      text=TextConfig(attn_impl="sdpa_flash"))
    model = create_model(cfg).cuda().train()
    loss_fn = ContrastiveLoss("clip", "local")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, tok = torch.randn(32, 3, 64, 64, device="cuda"), torch.randint(1, 49000, (32, 32), device="cuda")
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, tok)
            loss = loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, missing
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_gpu_barrier_on_a_one_rank_nccl_group_created_elsewhere(tmp_path):
    """DeepSpeed creates an NCCL group when torchrun starts one process (evaclip leaves world 1 alone); the
    bounded barrier (monitored_barrier: gloo only) must not fail on it (found by the first H200 training run)."""
    import torch.distributed as dist

    from evaclip import dist as edist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        edist.barrier("a test barrier", timeout_s=30)
    finally:
        dist.destroy_process_group()
