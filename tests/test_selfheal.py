"""Self-healing runs (issue 15): every shipped experiment's init logic on meta tensors, whole-model init into
a larger resolution, bounded collectives that name the missing rank, and loss-spike rollback."""
import os
import subprocess
import sys

import pytest
import torch

from evaclip.config import load_config

from evaclip.preflight import resolve
from evaclip.files import builtin_names
from evaclip.models import create_model, get_variant
from evaclip.models.convert import apply_inits, timm_to_eva
from tests.conftest import REPO, tiny_overrides

# where each experiment's whole-model init comes from (model.init): a run of this architecture
WHOLE_INIT_SOURCE = {"eva02_clip_l14_336": "EVA02-L-14"}


def _mim_checkpoint_shapes(variant):
    """An EVA / EVA-02 MIM checkpoint as BAAI ships them: original EVA keys, patch 14 at 224 px, MIM head."""
    from evaclip.models.eva_vit import Eva

    kw = dict(variant.vision, img_size=224, patch_size=14)
    if kw.get("ref_feat_shape"):
        kw["ref_feat_shape"] = [16, 16]
    with torch.device("meta"):
        sd = Eva(**kw, num_classes=variant.embed_dim).state_dict()
        sd = {k: v for k, v in timm_to_eva(sd).items() if not k.startswith("head.")}
        sd["mask_token"] = torch.empty(1, 1, kw["embed_dim"])
        sd["lm_head.weight"] = torch.empty(1024, kw["embed_dim"])
    return {"model": sd}


@pytest.mark.parametrize("name", builtin_names("experiment"))
def test_every_shipped_experiments_init_logic_passes_on_meta(name):
    """Builds the experiment's model on the meta device and loads a synthetic state dict of each init's
    shapes through the real init logic: no shipped experiment can fail at start on shapes."""
    cfg = load_config(name, ["data.root=/datasets"])
    model = create_model(cfg.model, device="meta")
    weights = {}
    if cfg.model.init:
        assert name in WHOLE_INIT_SOURCE, f"{name}: declare where its model.init comes from"
        weights["model"] = create_model(WHOLE_INIT_SOURCE[name], device="meta").state_dict()
    if cfg.model.vision.init:
        weights["vision"] = _mim_checkpoint_shapes(get_variant(cfg.model.name, cfg.model.model_dir))
    if cfg.model.text.init:  # OpenAI CLIP / open_clip text weights of the same width (flat OpenAI keys)
        weights["text"] = create_model(cfg.model, device="meta").text.state_dict()
    report = apply_inits(model, cfg.model, weights)
    if weights:
        lines = report.splitlines()
        assert len(lines) == len(weights) and "loaded 0 tensors" not in report, report
        for line in lines:  # everything loads; a MIM checkpoint has no CLIP projection (the tower's head)
            assert "missing" not in line or line.endswith("missing 2: head.weight, head.bias"), line


def test_whole_model_init_into_a_larger_resolution_trains(synth_dir, tmp_path):
    """A 64 px export initialises a 96 px model of the same architecture (position embeddings resized,
    RoPE rebuilt for the larger grid) and the run trains."""
    from evaclip.config import load_config as lc
    from evaclip.export.open_clip import export_open_clip
    from evaclip.models import model_record
    from evaclip.train import Trainer
    from tests.conftest import mcfg

    small = create_model("EVA02-Ti-8-64")
    export_open_clip(small.state_dict(), model_record(mcfg()), str(tmp_path / "small"))
    v = get_variant("EVA02-Ti-8-64")
    from evaclip.config import dumps_toml

    big = tmp_path / "big.toml"  # the tiny architecture at 96 px (a 12 x 12 grid instead of 8 x 8)
    big.write_text(dumps_toml({"name": "tiny-96", "embed_dim": v.embed_dim, "vision": dict(v.vision, img_size=96),
                               "text": v.text}) + "\n")
    cfg = lc("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), "big", steps=2, extra=[
        f"model.name={big}", f"model.init={tmp_path / 'small'}"]))
    logs = []
    tr = Trainer(cfg, resolve(cfg, 1), log=logs.append)
    assert tr.model.visual.trunk.pos_embed.shape[1] == 1 + 12 * 12
    assert any("model.init" in m and "loaded" in m for m in logs), logs
    # the cls token and blocks are the small model's: only the grid-dependent tensor changed
    assert torch.equal(tr.model.visual.trunk.cls_token, small.visual.trunk.cls_token)
    assert tr.train()["steps"] == 2


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_that_never_arrives_stops_the_others_with_a_message(tmp_path):
    """2 gloo ranks: rank 1 never reaches the checkpoint barrier; rank 0 stops within the configured timeout,
    naming what it waited for and the missing rank."""
    code = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
import evaclip
from evaclip import dist as edist
from evaclip.errors import TrainingStopped
edist.init_distributed(torch.device("cpu"), collective_timeout_s=4)
if edist.rank() == 1:
    time.sleep(60)
    sys.exit(0)
t0 = time.time()
try:
    edist.barrier("checkpoint step 7")
except TrainingStopped as e:
    print("STOPPED", round(time.time() - t0), e, flush=True)
    os._exit(3)
print("NOT STOPPED", flush=True)
""".format(repo=REPO)
    script = tmp_path / "w.py"
    script.write_text(code)
    from tests.test_distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = r.stdout + r.stderr
    line = next((x for x in out.splitlines() if "STOPPED" in x), "")
    assert line.startswith("STOPPED"), out[-3000:]
    waited = int(line.split()[1])
    assert waited <= 20 and "checkpoint step 7" in line and "rank 1" in line, line


# ------------------------------------------------------------------------------------------------ rollback
MB, POOL, P0, P1 = 8, 2, 9, 12  # batches come from a pool of 2; batches 9, 10, 11 are poisoned


def _batch(index: int, poisoned: bool):
    """Batch ``index`` of the test-only source: a small pool the model learns fast; a poisoned batch pairs each
    image with another image's caption (a high contrastive loss for a model that learned the pool)."""
    g = torch.Generator().manual_seed(index % POOL)
    image = torch.randn(MB, 3, 64, 64, generator=g)
    text = torch.randint(1, 49000, (MB, 32), generator=g)
    if poisoned:
        text = text.roll(1, 0)
    return {"image": image, "text": text, "key": [f"b{index}-{i}" for i in range(MB)], "source": ["s"] * MB}


def _source_trainer(window_in_data: bool):
    """A Trainer whose data is the test-only source; ``window_in_data``: the poisoned window is in the stream
    (else the stream is the same without it: the reference run)."""
    from evaclip.data.pipeline import DataState
    from evaclip.train import Trainer
    from evaclip.train.data import TrainData

    class SourceData(TrainData):
        def open(self):
            self.state = DataState(self.positions)
            start = self.state.workers.get(0, {}).get("batches", 0)

            def stream():
                n = start
                while True:
                    index = n if window_in_data or n < P0 else n + (P1 - P0)
                    b = _batch(index, window_in_data and P0 <= index < P1)
                    n += 1
                    b["__state__"] = {"worker": 0, "num_workers": 1, "batches": n, "stream": {}, "counts": {},
                                      "per_source": {"s": n * MB}}
                    yield b

            self.iterator = stream()

    class SourceTrainer(Trainer):
        data_class = SourceData

    return SourceTrainer


def _spike_run(tmp_path, window_in_data, name, every=3, patch=None):
    """The spike test's run (``patch(trainer)`` may plant a crash); returns (trainer, summary, log lines)."""
    cfg = load_config(None, [
        'data.shards="unused.tar"', f"run.output_dir={tmp_path}", f"run.name={name}", "run.steps=18",
        f"data.micro_batch_size={MB}", "data.workers=0", "log.progress=false", "log.tensorboard=false",
        "log.plot=false", "log.every_steps=1", "schedule.name=constant", "optim.lr=1e-3", "optim.eps=1e-3",
        "engine.grad_clip=0", f"checkpoint.every_steps={every}", "checkpoint.keep_last=20",
        "spike.enabled=true", "spike.window=5", "spike.k_mad=6", "spike.patience=2",
        f"spike.skip_samples={(P1 - P0) * MB}"])
    logs = []
    tr = _source_trainer(window_in_data)(cfg, resolve(cfg, 1), log=logs.append)
    if patch:
        patch(tr)
    summary = tr.train()
    return tr, summary, logs


def test_a_loss_spike_rolls_back_skips_the_window_and_ends_as_a_run_without_it(tmp_path):
    import json

    def run(window_in_data, name):
        return _spike_run(tmp_path, window_in_data, name)

    tr, summary, logs = run(True, "spiky")
    ref, ref_summary, _ = run(False, "clean")
    assert len(summary["rollbacks"]) == 1 and not ref_summary["rollbacks"], logs
    ev = summary["rollbacks"][0]
    assert ev["spike_step"] == P0 and ev["rolled_back_to"] <= P0 and ev["skip_samples"] == (P1 - P0) * MB
    assert summary["steps"] == ref_summary["steps"] == 18
    a, b = tr.model.state_dict(), ref.model.state_dict()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    recs = [json.loads(x) for x in open(os.path.join(tr.run_dir, "metrics.jsonl"))]
    assert any(r.get("rollback/spike_step") == P0 for r in recs)
    assert tr.data.order_hash == ref.data.order_hash  # the same samples were trained on, in the same order


class _Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["before the checkpoints are set back", "right after the rollback"])
def test_a_crash_during_or_after_a_rollback_resumes_it(tmp_path, monkeypatch, where):
    """Issue 32 (2): a crash right after a rollback resumed the checkpoint from after the spike (still ``latest``)
    and forgot the rollback. Now the rollback is recorded before training goes on: the rerun resumes the
    checkpoint rolled back to, skips the same data, rolls back no more, and ends as the run without the spike."""
    import evaclip.train.trainer as trainer_mod

    def plant(tr):
        if where == "right after the rollback":
            tr.data.reopen = lambda: (_ for _ in ()).throw(_Crash())
        else:
            monkeypatch.setattr(trainer_mod, "rewind", lambda *a: (_ for _ in ()).throw(_Crash()))

    with pytest.raises(_Crash):  # checkpoints every step: some are from after the spike's first step
        _spike_run(tmp_path, True, "crashy", every=1, patch=plant)
    monkeypatch.undo()
    tr, summary, logs = _spike_run(tmp_path, True, "crashy", every=1)
    ref, _, _ = _spike_run(tmp_path, False, "clean", every=1)
    assert len(summary["rollbacks"]) == 1 and summary["rollbacks"][0]["spike_step"] == P0, logs
    assert not any("rolled back to" in x for x in logs), logs  # the rerun did not meet the spike again
    assert any("resumed from" in x and f"at step {summary['rollbacks'][0]['rolled_back_to']} " in x for x in logs)
    a, b = tr.model.state_dict(), ref.model.state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
