"""Worker for the multi-process tests, run under ``torchrun --nproc_per_node 2`` (gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py train  OUT.pt shard.tar [overrides]
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py loss   OUT.pt

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py nanstep OUT.pt shard.tar

``train``: the real Trainer.train_step for 10 steps on fixed per-(step, rank) batches; rank 0 saves the full
weights (and, with checkpoint.*, a checkpoint). ``compiled``: ``train`` with engine.compile off, then towers, in
one launch. ``loss``: the CLIP and SigLIP loss (every impl) and their feature / temperature / bias gradients, per
rank. The reference runs in the test process. ``nanstep``: a NaN gradient under DeepSpeed is reported as a skipped
step (engine contract), per ZeRO stage and precision.
``states OUT.pt shard.tar STAGE PRECISION``: the bytes of the tensors the DeepSpeed engine holds (issue 31's plan).
``gathers OUT.pt shard.tar``: ZeRO-3's whole parameters after each step and in ``full_weights``, each against a
blocking gather.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaclip  # noqa: E402,F401
from evaclip import dist as edist  # noqa: E402

EXACT = ["optim.lr=1e-4", "optim.eps=1e-3"]  # exactness settings: why, in tests/test_distributed.py's docstring
STEPS, MB = int(os.environ.get("DIST_STEPS", 10)), 4


def batch_for(step: int, rank: int, mb: int = MB):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {"image": torch.randn(mb, 3, 64, 64, generator=g), "text": torch.randint(1, 49000, (mb, 32), generator=g),
            "key": [f"s{step}-r{rank}-{i}" for i in range(mb)]}  # keys seed the MIM masks


def train_overrides(shard: str, run_dir: str, extra=()):
    return [f'data.shards="{shard}"', f'run.output_dir="{run_dir}"', "run.name=dist", f"run.steps={STEPS}",
            f"data.micro_batch_size={MB}", "data.workers=0", "log.progress=false", "log.tensorboard=false",
            "log.plot=false", "schedule.warmup_steps=2", "optim.lr=2e-3", "engine.grad_clip=0", *extra]


def run_steps(trainer, rank: int, world: int, steps: int = STEPS):
    """The reference (world=1) sees each step's rank batches concatenated in rank order; with accumulation
    a rank's batch is split into ``engine.accum_steps`` micro-batches."""
    trainer.engine.train(True)
    losses = []
    for step in range(steps):
        trainer.scheduler.set_step(step)
        trainer.state.step = step
        n = trainer.cfg.engine.accum_steps
        if world == 1:
            parts = [batch_for(step, r) for r in range(2)]
            b = {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k]) else sum((p[k] for p in parts), [])
                 for k in parts[0]}
        else:
            b = batch_for(step, rank)
        mb = b["image"].shape[0] // n  # the samples split into accumulation micro-batches
        micro = [{k: v[j * mb:(j + 1) * mb] for k, v in b.items()} for j in range(n)]
        out = trainer.train_step(micro)
        losses.append(out.get("train/loss"))
    return losses


def _train(run_dir: str, shard: str, overrides):
    """10 steps of the real Trainer; rank 0 returns the full weights, the losses, the zero-shot metrics and the
    compiled graphs (other ranks None)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config(None, train_overrides(shard, run_dir, overrides))
    tr = Trainer(cfg, resolve(cfg, edist.env_world()[2]), log=lambda *a, **k: None)
    if os.environ.get("NAIVE_LAMB"):  # negative control: an off-the-shelf LAMB, trust ratios per partition
        tr.engine.client_optimizer.layouts.clear()
    losses = run_steps(tr, edist.rank(), edist.world_size())
    if cfg.checkpoint.every_steps < 1000:
        tr.state.step, tr.state.samples_seen = STEPS, STEPS * MB * edist.world_size()
        tr.save()
    zeroshot = tr.evaluate() if cfg.eval.suite else {}  # every rank calls it (ZeRO-3 gathers the weights)
    with tr.engine.full_weights() as model:
        if edist.is_main():
            return {"weights": {k: v.detach().float().clone() for k, v in model.state_dict().items()},
                    "losses": losses, "zeroshot": zeroshot,
                    "graphs": dict(tr.engine.compiler.graphs) if tr.engine.compiler else {}}
    return None


def main_train(out: str, shard: str, overrides):
    res = _train(os.path.dirname(out), shard, overrides)
    if res is not None:
        torch.save(res, out)
    edist.shutdown()


def main_compiled(out: str, shard: str, overrides):
    """The same run with engine.compile off and on (towers), one after the other in one launch (one torchrun
    start-up instead of two); rank 0 saves {mode: what ``train`` saves}."""
    runs = {mode: _train(os.path.join(os.path.dirname(out), mode), shard, [*overrides, f"engine.compile={mode}"])
            for mode in ("off", "towers")}
    if edist.is_main():
        torch.save(runs, out)
    edist.shutdown()


LOSS_CASES = [("clip", "naive", "float32", 3), ("clip", "local", "float32", 3), ("clip", "tiled", "float32", 3),
              ("clip", "ring", "float32", 3), ("clip", "ring", "float64", 1), ("clip", "ring", "float64", 5),
              ("clip", "ring", "float64", 64), ("siglip", "local", "float32", 3),
              ("siglip", "tiled", "float32", 3), ("siglip", "ring", "float32", 3),
              ("siglip", "ring", "float64", 1), ("siglip", "ring", "float64", 64)]
LOSS_ROWS, LOSS_DIM = 7, 16  # 7 rows per rank: tiles of 3 and 5 do not divide it


def loss_inputs(rank: int, dtype):
    g = torch.Generator().manual_seed(rank)
    img = torch.nn.functional.normalize(torch.randn(LOSS_ROWS, LOSS_DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(LOSS_ROWS, LOSS_DIM, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def main_loss(out: str):
    """Every (kind, impl, dtype, tile) case: this rank's loss and gradients, reduced as the engine would."""
    from evaclip.losses import ContrastiveLoss

    torch.distributed.init_process_group("gloo")
    rank, world = edist.rank(), edist.world_size()
    res = {}
    for kind, impl, dt, tile in LOSS_CASES:
        dtype = getattr(torch, dt)
        img, txt = (x.requires_grad_() for x in loss_inputs(rank, dtype))
        scale = torch.tensor([12.0], dtype=dtype, requires_grad=True)
        bias = torch.tensor([-4.0], dtype=dtype, requires_grad=True)
        loss = ContrastiveLoss(kind, impl, tile_size=tile)(img, txt, scale, bias if kind == "siglip" else None)
        params = [scale, bias] if kind == "siglip" else [scale]
        grads = torch.autograd.grad(loss, [img, txt, *params])
        # the engine averages parameter gradients over ranks; do the same for the temperature's (and bias')
        reduced = []
        for p in grads[2:]:
            p = p.clone()
            torch.distributed.all_reduce(p)
            reduced.append(p / world)
        val = loss.detach().clone()
        torch.distributed.all_reduce(val)
        res[(kind, impl, dt, tile)] = {"loss": (val / world).item(), "gi": grads[0], "gt": grads[1],
                                       "params": reduced}
    torch.save({"rank": rank, "res": res}, out.replace(".pt", f".{rank}.pt"))
    edist.shutdown()


DISTILL_CASES = [(impl, dt, tile) for impl in ("local", "tiled", "ring") for dt, tile in
                 (("float32", 3), ("float64", 1), ("float64", 64))]
FEATURE_CASES = [(kind, dt) for kind in ("cosine", "mse") for dt in ("float32", "float64")]
TEACHER_DIM = 12  # the teacher's embeddings are narrower than the student's: soft CE compares similarities only


def distill_inputs(rank: int, dtype):
    """This rank's student rows (``loss_inputs``) and its teacher rows (another width)."""
    g = torch.Generator().manual_seed(100 + rank)
    t_img, t_txt = (torch.nn.functional.normalize(torch.randn(LOSS_ROWS, TEACHER_DIM, generator=g,
                                                              dtype=torch.float64), dim=-1) for _ in range(2))
    return (*loss_inputs(rank, dtype), t_img.to(dtype), t_txt.to(dtype))


def main_distill(out: str):
    """Every (impl, dtype, tile) case of the soft-CE distillation loss: this rank's loss and gradients."""
    from evaclip.losses.distill import DistillLoss

    torch.distributed.init_process_group("gloo")
    rank, world = edist.rank(), edist.world_size()
    res = {}
    for impl, dt, tile in DISTILL_CASES:
        dtype = getattr(torch, dt)
        img, txt, t_img, t_txt = distill_inputs(rank, dtype)
        img, txt = img.requires_grad_(), txt.requires_grad_()
        scale = torch.tensor([12.0], dtype=dtype, requires_grad=True)
        loss = DistillLoss("soft_ce", impl, tile)(img, txt, scale, t_img, t_txt, torch.tensor(30.0, dtype=dtype))
        gi, gt, gs = torch.autograd.grad(loss, [img, txt, scale])
        torch.distributed.all_reduce(gs)
        val = loss.detach().clone()
        torch.distributed.all_reduce(val)
        res[(impl, dt, tile)] = {"loss": (val / world).item(), "gi": gi, "gt": gt, "scale": gs / world}
    for kind, dt in FEATURE_CASES:  # per-sample regression to same-width teacher embeddings: nothing gathered
        dtype = getattr(torch, dt)
        img, txt, _, _ = distill_inputs(rank, dtype)
        t_img, t_txt = loss_inputs(rank + 50, dtype)
        img, txt = img.requires_grad_(), txt.requires_grad_()
        loss = DistillLoss(kind, "local")(img, txt, None, t_img, t_txt, 1.0)
        gi, gt = torch.autograd.grad(loss, [img, txt])
        val = loss.detach().clone()
        torch.distributed.all_reduce(val)
        res[(kind, dt)] = {"loss": (val / world).item(), "gi": gi, "gt": gt}
    torch.save({"rank": rank, "res": res}, out.replace(".pt", f".{rank}.pt"))
    edist.shutdown()


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def main_nanstep(out: str, shard: str):
    """One NaN gradient (finite loss) under DeepSpeed: the engine must report the step skipped and leave the
    weights as they were, for each (ZeRO stage, precision); then training goes on."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    res = {}
    for stage, prec in [(0, "fp32"), (2, "fp32"), (2, "bf16")]:
        cfg = load_config(None, train_overrides(shard, os.path.join(os.path.dirname(out), f"z{stage}{prec}"), [
            "engine.kind=deepspeed", f"engine.zero_stage={stage}", f"engine.precision={prec}"]))
        tr = Trainer(cfg, resolve(cfg, edist.env_world()[2]), log=lambda *a, **k: None)
        tr.engine.train(True)
        b = batch_for(0, edist.rank())
        ok1 = "train/loss" in tr.train_step([b])

        def weights(tr=tr):
            return {k: v.detach().float().clone() for k, v in tr.model.state_dict().items()}

        before = weights()
        # identity forward, NaN backward: the loss stays finite, the patch-embedding gradients are NaN
        hook = tr.model.visual.trunk.patch_embed.register_forward_hook(lambda m, i, out: _NanGrad.apply(out))
        skipped = tr.train_step([batch_for(1, edist.rank())])
        hook.remove()
        counted, after = tr.state.bad_steps, weights()
        ok2 = "train/loss" in tr.train_step([batch_for(2, edist.rank())])
        res[f"{stage}/{prec}"] = {"first": ok1, "skipped": skipped, "counted": counted,
                                  "unchanged": all(torch.equal(before[k], after[k]) for k in before),
                                  "finite_after": all(torch.isfinite(v).all().item() for v in weights().values()),
                                  "next": ok2}
    if edist.is_main():
        torch.save(res, out)
    edist.shutdown()


def live_tensor_bytes() -> int:
    """Bytes of every tensor alive in this process (each storage once): what the engine holds, measured."""
    import gc

    gc.collect()
    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def main_states(out: str, shard: str, stage: int, prec: str):
    """The real DeepSpeed engine's tensors on this rank at one ZeRO stage and precision: at the end of the second
    step's backward (weights, gradients, optimizer states, communication buckets: ZeRO 1-2 release theirs just
    before the step, so that moment is caught too) and after its step, less what was alive before the trainer was
    built (one configuration a process: DeepSpeed keeps references to an engine once built)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    base = live_tensor_bytes()
    cfg = load_config(None, train_overrides(shard, os.path.dirname(out), [
        "engine.kind=deepspeed", f"engine.zero_stage={stage}", f"engine.precision={prec}", "optim.name=lamb",
        'eval.suite=""']))
    tr = Trainer(cfg, resolve(cfg, edist.env_world()[2]), log=lambda *a, **k: None)
    run_steps(tr, edist.rank(), edist.world_size(), steps=1)
    real_step, seen = tr.engine.step, {}

    def measured_step():
        seen["backward"] = live_tensor_bytes() - base
        return real_step()

    tr.engine.step = measured_step
    optimizer = tr.engine.ds.optimizer
    release = getattr(optimizer, "_release_ipg_buffers", None)
    if release is not None:  # ZeRO 1-2: the reduce buckets live from the first gradient to here
        def measured_release():
            seen["buckets"] = live_tensor_bytes() - base
            return release()

        optimizer._release_ipg_buffers = measured_release
    run_steps(tr, edist.rank(), edist.world_size(), steps=1)
    seen["step"] = live_tensor_bytes() - base
    torch.save(seen, f"{out}.rank{edist.rank()}")
    edist.shutdown()


def main_gathers(out: str, shard: str, steps: int = 10, times: int = 40):
    """Train ZeRO-3 ``steps`` steps on 2 ranks, one at a time, and after each count the parameters whose whole value
    differs from a blocking all-gather of every rank's partition: the persistent (small) parameters DeepSpeed
    re-gathers after every step, then every parameter inside the engine's ``full_weights``, ``times`` times."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config(None, train_overrides(shard, os.path.dirname(out), [
        "engine.kind=deepspeed", "engine.zero_stage=3", "optim.name=lamb", 'eval.suite=""', *EXACT]))
    tr = Trainer(cfg, resolve(cfg, edist.env_world()[2]), log=lambda *a, **k: None)
    params = list(tr.engine.model.named_parameters())

    def blocking(p):
        full = torch.empty(p.ds_tensor.numel() * edist.world_size(), dtype=p.ds_tensor.dtype)
        torch.distributed.all_gather_into_tensor(full, p.ds_tensor.contiguous())  # async_op=False
        return full[:p.ds_numel].view(p.ds_shape)

    bad, checked = [], 0
    for step in range(steps):
        run_steps(tr, edist.rank(), edist.world_size(), steps=1)
        persistent = [(n, p) for n, p in params if p.data.numel() == p.ds_numel]  # whole on every rank now
        bad += [(step, n) for n, p in persistent if not torch.equal(p.data, blocking(p))]
        checked += len(persistent)
    want = {n: blocking(p) for n, p in params}
    params.sort(key=lambda np_: -np_[1].ds_numel)  # the largest gathers land last: read them first
    for t in range(times):
        with tr.engine.full_weights():
            bad += [("full", t, n) for n, p in params if not torch.equal(p.data, want[n])]
            checked += len(params)
    torch.save({"bad": bad, "checked": checked}, f"{out}.rank{edist.rank()}")
    edist.shutdown()


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        main_train(out, sys.argv[3], sys.argv[4:])
    elif mode == "compiled":
        main_compiled(out, sys.argv[3], sys.argv[4:])
    elif mode == "nanstep":
        main_nanstep(out, sys.argv[3])
    elif mode == "loss":
        main_loss(out)
    elif mode == "distill":
        main_distill(out)
    elif mode == "gathers":
        main_gathers(out, sys.argv[3])
    elif mode == "states":
        main_states(out, sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode}")
