"""Two processes under torchrun (gloo on CPU) with real DeepSpeed.

Exactness runs use lr 1e-4 and eps 1e-3: in float32 the two runs sum gradients in different orders
(~1e-7 absolute noise), and Adam-type updates amplify noise on gradients near eps (e.g. the attention
key bias, whose exact gradient is 0). These settings keep that amplification below 1e-6 while a wrong
LAMB (trust ratios per ZeRO partition) still diverges by ~1e-3: the negative control below shows the
test can fail.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.dist_worker import EXACT

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout=600, env=None, nproc=2):
    """Run ``args`` on ``nproc`` gloo ranks; a port that another process took between free_port() and torchrun's
    bind (a race of the test machine, not of the code under test) gets one more try on another port."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *args]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def shard(synth_dir):
    return os.path.join(synth_dir, "train", "00000.tar")


@pytest.fixture(scope="module")
def reference(shard, tmp_path_factory):
    """The same 10 steps in one process with the plain engine on the whole global batch."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.dist_worker import run_steps, train_overrides

    out = {}
    for opt in ("lamb",):
        cfg = load_config(None, train_overrides(shard, str(tmp_path_factory.mktemp("ref")),
                                                ["data.micro_batch_size=8", f"optim.name={opt}", *EXACT]))
        tr = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)
        losses = run_steps(tr, 0, 1)
        out[opt] = {"weights": {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, "losses": losses}
    return out


def _worst(a, b):
    """(the largest difference, its key of ``b``) between ``a`` and ``b``: what a failed exactness check names."""
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in b)


def _max_diff(a, b):
    return _worst(a, b)[0]


@pytest.mark.parametrize("world", [2, 4])
def test_losses_over_gloo_match_the_gathered_reference(world, tmp_path):
    """Every impl of CLIP and SigLIP on W gloo ranks (7 rows each; tiles 1, 3, 5, 64) against the reference
    over the gathered batch: value, feature gradients, temperature and bias gradients (fp32 to 1e-6, float64
    to 1e-12). ring gathers nothing: its blocks and column gradients travel point-to-point."""
    from evaclip.losses import clip_loss_naive, siglip_loss
    from tests.dist_worker import LOSS_CASES, LOSS_ROWS, loss_inputs

    out = str(tmp_path / "loss.pt")
    torchrun(["tests/dist_worker.py", "loss", out], nproc=world)
    ranks = [torch.load(out.replace(".pt", f".{r}.pt")) for r in range(world)]
    for kind, impl, dt, tile in LOSS_CASES:
        dtype, tol = getattr(torch, dt), (1e-6 if dt == "float32" else 1e-12)
        parts = [loss_inputs(r, dtype) for r in range(world)]
        img = torch.cat([p[0] for p in parts]).requires_grad_()
        txt = torch.cat([p[1] for p in parts]).requires_grad_()
        scale = torch.tensor([12.0], dtype=dtype, requires_grad=True)
        bias = torch.tensor([-4.0], dtype=dtype, requires_grad=True)
        if kind == "clip":
            ref, params = clip_loss_naive(img, txt, scale), [scale]
        else:  # the global objective: the mean over ranks of each rank's rows' loss
            b = LOSS_ROWS
            ref = sum(siglip_loss(img[r * b:(r + 1) * b], txt, scale, bias, r * b) for r in range(world)) / world
            params = [scale, bias]
        grads = torch.autograd.grad(ref, [img, txt, *params])
        case = (kind, impl, dt, tile)
        assert abs(ranks[0]["res"][case]["loss"] - ref.item()) <= tol, case
        for r, rk in enumerate(ranks):
            res = rk["res"][case]
            sl = slice(r * LOSS_ROWS, (r + 1) * LOSS_ROWS)
            # the engine averages gradients over ranks: each rank's feature gradient is W x its share
            assert (res["gi"] / world - grads[0][sl]).abs().max() <= tol, case
            assert (res["gt"] / world - grads[1][sl]).abs().max() <= tol, case
            for got, want in zip(res["params"], grads[2:]):
                assert (got - want).abs().max() <= tol, case


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_lamb_equals_single_process(zero, shard, reference, tmp_path):
    """Tiny CLIP, 10 steps, DeepSpeed ZeRO-{1,2,3} + LAMB on 2 ranks == 1 process on the whole batch."""
    out = str(tmp_path / f"z{zero}.pt")
    extra = {2: ["checkpoint.every_steps=1"],  # the ZeRO-2 run also leaves a checkpoint to export
             3: ["eval.suite=eval/suites/quick.toml",  # and ZeRO-3 evaluates with gathered weights
                 f"eval.datasets_root={os.path.join(os.path.dirname(os.path.dirname(shard)), 'zeroshot')}"]}
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", f"engine.zero_stage={zero}",
              "optim.name=lamb", *EXACT, *extra.get(zero, [])])
    got = torch.load(out)
    if zero == 3:
        assert 0.0 <= got["zeroshot"]["zeroshot/synth_shapes/acc1"] <= 1.0
    assert _max_diff(got["weights"], reference["lamb"]["weights"]) <= 1e-6, (
        _worst(got["weights"], reference["lamb"]["weights"]), got["losses"], reference["lamb"]["losses"])
    assert max(abs(a - b) for a, b in zip(got["losses"], reference["lamb"]["losses"])) <= 1e-5
    if zero == 2:
        _check_export_of_zero_checkpoint(os.path.join(str(tmp_path), "dist"), got["weights"], tmp_path)


def test_zero3_full_weights_are_complete_every_time_on_gloo(shard, tmp_path):
    """ZeRO-3 on 2 gloo ranks, 10 steps: after each, the parameters DeepSpeed keeps whole (re-gathered after every
    step), and then all the engine's full weights, entered 40 times, equal a blocking gather of the partitions.
    DeepSpeed's coalesced gather waits on its last launched all-gather only: enough on a CUDA stream, a race on
    gloo's worker threads, so on gloo the engine asks for blocking gathers (the written config says so)."""
    out = str(tmp_path / "g.pt")
    torchrun(["tests/dist_worker.py", "gathers", out, shard])
    with open(tmp_path / "dist" / "ds_config.json") as f:  # the engine asked for blocking gathers on gloo
        assert json.load(f)["zero_optimization"]["stage3_allgather_sequential"] is True
    for r in range(2):
        got = torch.load(f"{out}.rank{r}")
        assert got["checked"] > 1000 and got["bad"] == [], (r, got["bad"][:10], len(got["bad"]))


def test_zero2_feature_cached_accumulation(shard, reference, tmp_path):
    """2 ranks x 2 micro-batches of 2 with accumulation == 1 process on the whole batch of 8."""
    out = str(tmp_path / "acc.pt")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "optim.name=lamb", "engine.accum_steps=2", "data.micro_batch_size=2", *EXACT])
    got = torch.load(out)
    assert _max_diff(got["weights"], reference["lamb"]["weights"]) <= 1e-6


def test_ring_loss_training_under_zero2_with_accumulation_equals_the_local_loss(shard, reference, tmp_path):
    """10 steps with loss.impl=ring (tiles of 3: uneven) on 2 DeepSpeed ZeRO-2 ranks, each accumulating 2
    feature-cached micro-batches of 2 == 1 process with the local loss on the whole batch. The run then
    evaluates on both ranks (each a share of every dataset): the same metrics as one process on its weights."""
    from evaclip.config import load_config
    from evaclip.data.transforms import make_tokenizer
    from evaclip.encoders import Encoders
    from evaclip.evalsuite import load_suite, run_suite
    from evaclip.models import create_model, get_variant
    from tests.dist_worker import train_overrides

    out = str(tmp_path / "ring.pt")
    zs = os.path.join(os.path.dirname(os.path.dirname(shard)), "zeroshot")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "engine.accum_steps=2", "data.micro_batch_size=2", "optim.name=lamb", "loss.impl=ring",
              "loss.tile_size=3", "eval.suite=quick", f"eval.datasets_root={zs}", *EXACT])
    got = torch.load(out)
    assert _max_diff(got["weights"], reference["lamb"]["weights"]) <= 1e-6
    mc = load_config(None, train_overrides(shard, str(tmp_path))).model  # the model the workers built
    v = get_variant(mc.name, mc.model_dir)
    model = create_model(mc, v)
    model.load_state_dict(got["weights"])
    model.eval()
    enc = Encoders(lambda x: model.encode_image(x, normalize=False), lambda t: model.encode_text(t, normalize=False),
                   make_tokenizer(v.context_length), v.image_size, v.mean, v.std, v.interpolation, v.name, "", "")
    one = run_suite(enc, load_suite("quick"), zs, torch.device("cpu"), 64)
    want = {f"zeroshot/{r['dataset']}/{k}": x for r in one for k, x in r["metrics"].items()}
    assert want and got["zeroshot"] == want


def test_ring_loss_training_on_the_plain_engine_equals_the_local_loss(shard, reference, tmp_path):
    """One process, plain engine, 2 accumulated micro-batches of 4, loss.impl=ring == the local-loss reference."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.dist_worker import run_steps, train_overrides

    cfg = load_config(None, train_overrides(shard, str(tmp_path), [
        "data.micro_batch_size=4", "engine.accum_steps=2", "optim.name=lamb", "loss.impl=ring", "loss.tile_size=3",
        *EXACT]))
    tr = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)
    run_steps(tr, 0, 1)
    assert _max_diff({k: v.detach() for k, v in tr.model.state_dict().items()}, reference["lamb"]["weights"]) <= 1e-6


def test_two_rank_sharded_eval_equals_one_process(synth_dir, tmp_path):
    """evaclip eval under torchrun (2 gloo ranks, each a share of every dataset) == one process, to the last
    digit, for the classification and the retrieval set of the quick suite."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.conftest import run_cli, tiny_overrides

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), "ev", steps=2))
    run = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()["run_dir"]
    common = ["eval", "--checkpoint", run, "--suite", "quick", "--datasets-root",
              os.path.join(synth_dir, "zeroshot"), "--workers", "0", "--batch-size", "16"]
    one = run_cli([*common, "--out", str(tmp_path / "one")], env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(["-m", "evaclip.cli", *common, "--out", str(tmp_path / "two")])
    assert "on 2 processes" in two.stdout, two.stdout[-2000:]
    for name in ("synth_shapes", "synth_retrieval"):
        a = json.load(open(tmp_path / "one" / f"{name}.json"))
        b = json.load(open(tmp_path / "two" / f"{name}.json"))
        assert a["status"] == b["status"] == "ok" and a["metrics"] and a["metrics"] == b["metrics"], name
    print(two.stdout.strip().splitlines()[-3:])


def test_two_rank_zero2_mim_with_accumulation_equals_one_process(shard, mim_teacher, tmp_path):
    """MIM (objective.kind = mim), 10 steps: 2 DeepSpeed ZeRO-2 ranks x 2 micro-batches of 2 == 1 process with the
    plain engine on the whole batch of 8 (the same keys, so the same masks)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.dist_worker import run_steps, train_overrides

    mim = ["objective.kind=mim", f"mim.teacher={mim_teacher}", "optim.name=lamb", *EXACT]
    cfg = load_config(None, train_overrides(shard, str(tmp_path / "ref"), ["data.micro_batch_size=8", *mim]))
    ref = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)
    ref_losses = run_steps(ref, 0, 1)
    out = str(tmp_path / "mim.pt")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "engine.accum_steps=2", "data.micro_batch_size=2", *mim])
    got = torch.load(out)
    assert _max_diff(got["weights"], ref.model.state_dict()) <= 1e-6
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses)) <= 1e-6
    assert max(abs(a - b) for a, b in zip(ref_losses[:1], ref_losses[-1:])) > 1e-4  # it trained


def test_off_the_shelf_lamb_diverges_under_zero(shard, reference, tmp_path):
    """Negative control: the same run with trust ratios taken per partition (what a plain LAMB does)."""
    out = str(tmp_path / "naive.pt")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "optim.name=lamb", *EXACT], env={"NAIVE_LAMB": "1"})
    assert _max_diff(torch.load(out)["weights"], reference["lamb"]["weights"]) > 1e-4


def test_bf16_zero1_trains(shard, tmp_path):
    out = str(tmp_path / "bf16.pt")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=1",
              "engine.precision=bf16", "optim.name=lamb"])
    losses = torch.load(out)["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == 10


def test_deepspeed_reports_a_nan_gradient_as_a_skipped_step(shard, tmp_path):
    """Engine contract: a NaN gradient under DeepSpeed (ZeRO-0 fp32, ZeRO-2 fp32 and bf16) is a skipped,
    counted step with the weights left as they were, as with the plain engine; the next step trains."""
    out = str(tmp_path / "nan.pt")
    torchrun(["tests/dist_worker.py", "nanstep", out, shard])
    res = torch.load(out)
    assert set(res) == {"0/fp32", "2/fp32", "2/bf16"}
    for key, r in res.items():
        assert r["first"] and r["next"], (key, r)
        assert r["skipped"] == {"train/skipped_step": 1.0} and r["counted"] == 1, (key, r)
        assert r["unchanged"] and r["finite_after"], (key, r)


def _check_export_of_zero_checkpoint(run_dir, weights, tmp_path):
    """Export consolidates the ZeRO-2 shards (DeepSpeed's zero_to_fp32) into an open_clip / timm folder whose
    embeddings equal the trained model's."""
    from evaclip.checkpoint import load_weights
    from evaclip.export.open_clip import export_open_clip, verify_export

    sd, meta = load_weights(run_dir)
    assert _max_diff(sd, weights) == 0.0
    out = str(tmp_path / "export")
    export_open_clip(sd, meta["model"], out)
    diffs = verify_export(out, weights, meta["model"])
    assert max(diffs.values()) <= 1e-5, diffs


# ------------------------------------------------------------------------------------------ kill -9 + resume
def kill_9_tree(proc) -> None:
    """SIGKILL torchrun and every process under it, as a node failure does: torchrun starts its workers in
    sessions of their own, so a signal to its process group alone would leave them training."""
    import psutil

    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _train_cmd(synth_dir, out_dir, name):
    return ["-m", "evaclip.cli", "train", os.path.join(REPO, "launch/experiments/demo_cpu.toml"),
            f"run.output_dir={out_dir}", f"run.name={name}", "run.steps=8", "data.micro_batch_size=8",
            f"data.recipe={os.path.join(synth_dir, 'recipe.toml')}", f"data.root={synth_dir}", "data.workers=1",
            "engine.kind=deepspeed", "engine.zero_stage=2", "checkpoint.every_steps=2", "log.every_steps=1",
            "log.progress=false", "log.tensorboard=false", "log.plot=false", 'eval.suite=""',
            "model.vision.patch_dropout=0.5", "schedule.warmup_steps=2", *EXACT]


def _per_step(run_dir):
    last = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        if "train/loss" in r:
            last[r["step"]] = (r["train/loss"], r["data/order_hash"])
    return last


def test_kill_9_and_resume_equals_uninterrupted(synth_dir, tmp_path):
    from evaclip.checkpoint import load_weights

    torchrun(_train_cmd(synth_dir, str(tmp_path), "full"))
    # the same run, killed with SIGKILL once it has logged step kill_at (after its first checkpoint at step 2,
    # between two saves), then resumed; the kill lands at or shortly after that step (the run is not paused)
    run = tmp_path / "killed"
    kill_at = 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *_train_cmd(synth_dir, str(tmp_path), "killed")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and max(_per_step(str(run)) or [0]) >= kill_at:
            break
        time.sleep(0.2)
    kill_9_tree(proc)
    assert os.path.exists(run / "checkpoints" / "latest")
    torchrun(_train_cmd(synth_dir, str(tmp_path), "killed"))
    full, resumed = _per_step(str(tmp_path / "full")), _per_step(str(run))
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for step in full:
        assert abs(full[step][0] - resumed[step][0]) <= 1e-6 and full[step][1] == resumed[step][1], step
    a, _ = load_weights(str(tmp_path / "full"))
    b, _ = load_weights(str(run))
    assert _max_diff(a, b) <= 1e-6


def _topology_cmd(synth_dir, out_dir, name, extra):
    from tests.conftest import tiny_overrides
    from tests.test_train import TOPOLOGY

    return ["-m", "evaclip.cli", "train", os.path.join(REPO, "launch/experiments/demo_cpu.toml"),
            *tiny_overrides(synth_dir, out_dir, name, 20, [*TOPOLOGY, "engine.kind=deepspeed", "engine.zero_stage=2",
                                                           *extra])]


R2W2 = ["data.workers=2", "data.micro_batch_size=16"]


@pytest.fixture(scope="module")
def r2w2(synth_dir, tmp_path_factory):
    """12 logical streams, global batch 32, 20 steps, 50% token dropping, LAMB: 2 DeepSpeed ZeRO-2 ranks x 2
    workers x micro 16, uninterrupted (checkpoints at steps 10 and 20)."""
    out = str(tmp_path_factory.mktemp("r2w2"))
    torchrun(_topology_cmd(synth_dir, out, "r2w2", R2W2), timeout=900)
    return os.path.join(out, "r2w2")


def test_logical_streams_two_ranks_two_workers_under_zero2_equal_one_process(synth_dir, r2w2, tmp_path):
    """2 ranks x 2 workers x micro 16 (ZeRO-2) train on the same samples in every step as 1 plain process x 1
    worker x micro 32, and end with the same weights (<= 1e-5)."""
    from evaclip.checkpoint import load_weights
    from tests.test_train import TOPOLOGY, make_trainer, step_keys

    ref = make_trainer(synth_dir, tmp_path, "w1", steps=20,
                       extra=[*TOPOLOGY, "data.workers=0", "data.micro_batch_size=32"]).train()
    got = step_keys(r2w2)
    assert sorted(got) == list(range(1, 21)) and got == step_keys(ref["run_dir"])
    a, _ = load_weights(ref["run_dir"])
    b, _ = load_weights(r2w2)
    assert _max_diff(a, b) <= 1e-5


def test_kill_9_on_two_ranks_and_resume_on_one_rank_with_accumulation_equals_uninterrupted(synth_dir, r2w2,
                                                                                        tmp_path):
    """The 2 x 2 ZeRO-2 run killed with SIGKILL after its step-10 checkpoint, resumed on 1 rank x 1 worker x
    micro 16 x 2 accumulation steps (the ZeRO state re-partitioned from 2 ranks to 1): every step's keys and the
    final weights equal the uninterrupted run's (<= 1e-5)."""
    from evaclip.checkpoint import load_weights, read_meta
    from tests.test_train import step_keys

    out = str(tmp_path)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *_topology_cmd(synth_dir, out, "killed", R2W2)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "latest").exists():
        time.sleep(0.1)
    kill_9_tree(proc)
    assert sorted(os.listdir(run / "checkpoints" / "step-00000010")) and \
        not (run / "checkpoints" / "step-00000020").exists(), "the run was not killed between its checkpoints"
    r = torchrun(_topology_cmd(synth_dir, out, "killed", ["data.workers=1", "data.micro_batch_size=16",
                                                            "engine.accum_steps=2"]), nproc=1, timeout=900)
    assert "written by 2 ranks" in r.stdout
    got, want = step_keys(str(run)), step_keys(r2w2)
    assert sorted(got) == list(range(1, 21)) and got == want
    assert read_meta(str(run / "checkpoints" / "step-00000020"))["world_size"] == 1
    assert not [f for f in os.listdir(run / "checkpoints") if "universal" in f]  # the converted copy is gone
    a, _ = load_weights(r2w2)
    b, _ = load_weights(str(run))
    assert _max_diff(a, b) <= 1e-5


def test_a_two_rank_checkpoint_resumes_on_four_ranks_with_the_uninterrupted_runs_keys_and_weights(synth_dir, r2w2,
                                                                                              tmp_path):
    """The 2 x 2 ZeRO-2 run's step-10 checkpoint resumed on 4 ranks x 1 worker x micro 8 (the ZeRO state
    re-partitioned onto more ranks, where the small parameter groups leave some ranks no fragment of theirs):
    steps 11-20 see the same keys and end with the same weights (<= 1e-5) as the uninterrupted run."""
    import shutil

    from evaclip.checkpoint import load_weights
    from tests.test_train import step_keys

    run = tmp_path / "wide"
    os.makedirs(run / "checkpoints")
    shutil.copytree(os.path.join(r2w2, "checkpoints", "step-00000010"), run / "checkpoints" / "step-00000010")
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    r = torchrun(_topology_cmd(synth_dir, str(tmp_path), "wide", ["data.workers=1", "data.micro_batch_size=8"]),
                 nproc=4, timeout=900)
    assert r.stdout.count("run dir:") == 1  # the summary comes from rank 0 only
    got, want = step_keys(str(run)), step_keys(r2w2)
    assert sorted(got) == list(range(11, 21)) and all(got[s] == want[s] for s in got)
    a, _ = load_weights(r2w2)
    b, _ = load_weights(str(run))
    assert _max_diff(a, b) <= 1e-5


def test_blocking_zero3_gathers_only_on_gloo_and_an_overlays_choice_stays():
    """``for_backend``: gloo ZeRO-3 gets ``stage3_allgather_sequential``; NCCL, other stages and an overlay that
    sets the key itself are left as they are."""
    from evaclip.engine import for_backend

    z3 = {"zero_optimization": {"stage": 3}}
    assert for_backend(z3, "gloo")["zero_optimization"]["stage3_allgather_sequential"] is True
    assert "stage3_allgather_sequential" not in for_backend(z3, "nccl")["zero_optimization"]
    assert "stage3_allgather_sequential" not in z3["zero_optimization"]  # the input is not changed
    assert for_backend({"zero_optimization": {"stage": 2}}, "gloo") == {"zero_optimization": {"stage": 2}}
    own = {"zero_optimization": {"stage": 3, "stage3_allgather_sequential": False}}
    assert for_backend(own, "gloo") == own
