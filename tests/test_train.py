"""A short CPU training run, exact feature-cached accumulation, non-finite steps, checkpoint/resume."""
import json
import os

import pytest
import torch

from evaclip.checkpoint import latest_checkpoint, load_weights
from evaclip.config import load_config
from evaclip.preflight import resolve
from evaclip.errors import TrainingStopped
from evaclip.train import REQUEUE_EXIT_CODE, Trainer
from tests.conftest import REPO, preempt_during, tiny_overrides

DEMO = os.path.join(REPO, "launch", "experiments", "demo_cpu.toml")


def make_trainer(synth_dir, tmp_path, name="t", steps=4, extra=()):
    cfg = load_config(DEMO, tiny_overrides(synth_dir, str(tmp_path), name, steps, extra))
    return Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)


def test_short_training_run(synth_dir, tmp_path):
    tr = make_trainer(synth_dir, tmp_path, steps=6, extra=["checkpoint.every_steps=3"])
    summary = tr.train()
    run = summary["run_dir"]
    recs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert os.path.exists(os.path.join(run, "config.resolved.toml"))
    assert latest_checkpoint(run).endswith("step-00000006")
    sd, meta = load_weights(run)
    assert meta["step"] == 6 and meta["samples_seen"] == 6 * 8 and "visual.trunk.pos_embed" in sd
    assert summary["skips"] == {k: 0 for k in summary["skips"]}


def fixed_batches(n, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(b, 3, 64, 64, generator=g), "text": torch.randint(1, 49000, (b, 32), generator=g),
             "key": [f"k{seed}-{i}-{j}" for j in range(b)]} for i in range(n)]


@pytest.mark.parametrize("optim,drop", [("lamb", 0.0), ("adamw", 0.0), ("lamb", 0.5)])
def test_feature_cached_accumulation_equals_big_batch(synth_dir, tmp_path, optim, drop):
    """4 micro-batches of 8 with accumulation == steps on the 32-sample batch (<= 1e-6), also with 50% token
    dropping (each sample's kept patches are drawn from its key, not from the batch it is in).

    In float64: in float32 the two differ by summation order (~1e-6 relative in the gradients), which
    Adam-type updates amplify on near-zero gradients; float64 shows the algorithm itself is exact."""
    # the big batch in the other order: the loss does not depend on it, masks drawn from a batch RNG would
    diff = accumulated_minus_big_batch(
        lambda name, accum: make_trainer(synth_dir, tmp_path, name, extra=[
            f"engine.accum_steps={accum}", f"optim.name={optim}", "engine.grad_clip=0",
            f"model.vision.patch_dropout={drop}"]), reverse=True)
    assert diff <= 1e-6, diff


def accumulated_minus_big_batch(make, reverse: bool = False) -> float:
    """Largest weight difference after 2 steps (float64) between ``make(name, accum)``'s trainer on 4
    micro-batches of 8 with accumulation 4 and on the same 32 samples as one batch (``reverse``: in the other
    order)."""
    micro = [{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in m.items()}
             for m in fixed_batches(4, 8)]
    order = micro[::-1] if reverse else micro
    big = [{"image": torch.cat([m["image"] for m in order]), "text": torch.cat([m["text"] for m in order]),
            "key": [k for m in order for k in m["key"]]}]
    params = []
    for batches, accum, name in ((micro, 4, "acc"), (big, 1, "big")):
        tr = make(name, accum)
        tr.model.double()
        for part in tr.objective.frozen_modules():  # a teacher computes in float64 too
            part.double()
        tr.engine.train(True)
        tr.scheduler.set_step(3)
        for _ in range(2):
            tr.train_step(batches)
        params.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    return max((params[0][k] - params[1][k]).abs().max().item() for k in params[0])


def test_non_finite_loss_is_skipped_then_stops(synth_dir, tmp_path):
    tr = make_trainer(synth_dir, tmp_path, "nan", extra=["engine.max_bad_steps=3"])
    tr.engine.train(True)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    bad = fixed_batches(1, 8)
    bad[0]["image"][0, 0, 0, 0] = float("nan")
    out = tr.train_step(bad)
    assert out == {"train/skipped_step": 1.0} and tr.state.bad_steps == 1
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    tr.train_step(bad)
    with pytest.raises(TrainingStopped, match="3 consecutive non-finite steps"):
        tr.train_step(bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(synth_dir, tmp_path, workers):
    """Stop after 3 of 6 steps, resume: same losses, same final weights, same data order as one run (and the
    data.log_keys tables: the same samples per step, each written once)."""
    extra = [f"data.workers={workers}", "checkpoint.every_steps=3", "model.vision.patch_dropout=0.5",
             "data.log_keys=true"]
    full = make_trainer(synth_dir, tmp_path, "full", steps=6, extra=extra).train()
    part = make_trainer(synth_dir, tmp_path, "part", steps=6, extra=extra)
    preempt_during(part, 3)
    with pytest.raises(SystemExit) as stop:
        part.train()
    assert stop.value.code == REQUEUE_EXIT_CODE and latest_checkpoint(part.run_dir).endswith("step-00000003")
    resumed = make_trainer(synth_dir, tmp_path, "part", steps=6, extra=extra).train()
    assert resumed["steps"] == 6

    def losses(run):
        return [json.loads(x)["train/loss"] for x in open(os.path.join(run, "metrics.jsonl")) if "train/loss" in x]

    assert losses(full["run_dir"]) == losses(resumed["run_dir"])
    a, _ = load_weights(full["run_dir"])
    b, _ = load_weights(resumed["run_dir"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    def keys(run):
        import pyarrow.parquet as pq

        t = pq.read_table(os.path.join(run, "keys")).to_pydict()
        return sorted(zip(t["step"], t["key"], t["source"], t["stream"]))

    got = keys(resumed["run_dir"])
    assert got == keys(full["run_dir"]) and len(got) == 6 * 8 and sorted({s for s, *_ in got}) == list(range(1, 7))
    assert {st for *_, st in got} == ({"stream0", "stream1"} if workers else {"stream0"})  # ranks x workers


def test_in_training_eval_and_unmasked_tuning(synth_dir, tmp_path):
    """Zero-shot every 2 steps, logged as zeroshot/<dataset>/<metric>; patch dropout 0 for the last steps."""
    zs = os.path.join(synth_dir, "zeroshot")
    tr = make_trainer(synth_dir, tmp_path, "ev", steps=4, extra=[
        "eval.suite=eval/suites/quick.toml", f"eval.datasets_root={zs}", "eval.every_steps=2",
        "model.vision.patch_dropout=0.5", "schedule.unmasked_tuning_samples=8"])
    summary = tr.train()
    recs = [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    evals = [r for r in recs if "zeroshot/synth_shapes/acc1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert "zeroshot/synth_retrieval/image_retrieval_recall@5" in evals[0]
    drop = {r["step"]: r["train/patch_dropout"] for r in recs if "train/patch_dropout" in r}
    assert drop == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.0}  # 8 samples = the last step of 8
    assert os.path.exists(os.path.join(summary["run_dir"], "eval", "step-00000002", "synth_shapes.json"))


def test_siglip_training_and_export(synth_dir, tmp_path):
    """The sigmoid loss trains with its learned bias, which the open_clip export carries."""
    from evaclip.export.open_clip import export_open_clip, verify_export

    tr = make_trainer(synth_dir, tmp_path, "sig", steps=3, extra=["loss.kind=siglip", "model.use_logit_bias=true"])
    bias0 = tr.model.logit_bias.item()
    summary = tr.train()
    sd, meta = load_weights(summary["run_dir"])
    assert meta["model"]["config"]["use_logit_bias"] and sd["logit_bias"].item() != bias0
    out = str(tmp_path / "sig_export")
    export_open_clip(sd, meta["model"], out)
    assert max(verify_export(out, sd, meta["model"]).values()) <= 1e-5
    import open_clip

    oc = open_clip.create_model(f"local-dir:{out}")
    assert abs(oc.logit_bias.item() - sd["logit_bias"].item()) < 1e-6


def test_hf_text_tower_trains_with_its_own_tokenizer(synth_dir, tmp_path):
    """A local Hugging Face encoder as the text tower: its tokenizer feeds the data pipeline and the evaluator,
    and the export loads in open_clip's HF text tower."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf_bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for line in ["a red green blue yellow purple orange cyan pink circle square triangle cross in the "
                        "top bottom left right centre of picture small large there is near at grey background "
                        "sits coloured painted photo rendering image containing drawing holds"] for w in line.split()})
    hf.mkdir()
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(hf / "vocab.txt"))
    tok.save_pretrained(str(hf))
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    transformers.BertModel(cfg).save_pretrained(str(hf))
    zs = os.path.join(synth_dir, "zeroshot")
    tr = make_trainer(synth_dir, tmp_path, "hf", steps=3, extra=[
        "model.text.kind=hf", f"model.text.hf_path={hf}", "eval.suite=eval/suites/quick.toml",
        f"eval.datasets_root={zs}"])
    summary = tr.train()
    assert "zeroshot/synth_shapes/acc1" in summary["zeroshot"]
    sd, meta = load_weights(summary["run_dir"])
    assert meta["model"]["config"]["text"]["kind"] == "hf"
    from evaclip.export.open_clip import export_open_clip, verify_export

    out = str(tmp_path / "hf_export")
    export_open_clip(sd, meta["model"], out)
    assert max(verify_export(out, sd, meta["model"]).values()) <= 1e-5


def test_too_much_corrupt_data_stops_with_a_clear_error(synth_dir, tmp_path):
    tr = make_trainer(synth_dir, tmp_path, "skip", extra=["data.max_skip_fraction=0.1"])
    tr.data.state.workers = {0: {"worker": 0, "num_workers": 1, "batches": 100, "stream": {},
                                 "counts": {"decode_error": 150}, "per_source": {"s": 850}}}
    with pytest.raises(TrainingStopped, match="150 of 1000 samples were unusable"):
        tr.data.check_skips()
    tr.data.state.workers[0]["counts"] = {"decode_error": 50}
    tr.data.check_skips()  # 5%: fine


TOPOLOGY = ["data.streams=12", "data.log_keys=true", "model.vision.patch_dropout=0.5", "optim.name=lamb",
            "optim.lr=1e-4", "optim.eps=1e-3", "engine.grad_clip=0", "checkpoint.every_steps=10"]


def step_keys(run_dir):
    """{step: sorted keys} from a run's data.log_keys tables."""
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(run_dir, "keys")).to_pydict()
    out = {}
    for s, k in zip(t["step"], t["key"]):
        out.setdefault(s, []).append(k)
    return {s: sorted(v) for s, v in out.items()}


def test_logical_streams_make_training_independent_of_workers_micro_batch_and_accumulation(synth_dir, tmp_path):
    """12 logical streams, 20 steps of a global batch of 32 with 50% token dropping: 1 worker x micro 32 and
    3 workers x micro 16 x 2 accumulation steps train on the same samples in every step and end with the same
    weights (<= 1e-5; exactness settings as the distributed tests)."""
    runs = []
    for name, extra in (("w1", ["data.workers=0", "data.micro_batch_size=32"]),
                        ("w3", ["data.workers=3", "data.micro_batch_size=16", "engine.accum_steps=2"])):
        runs.append(make_trainer(synth_dir, tmp_path, name, steps=20, extra=[*TOPOLOGY, *extra]).train())
    a, b = step_keys(runs[0]["run_dir"]), step_keys(runs[1]["run_dir"])
    assert sorted(a) == list(range(1, 21)) and a == b and all(len(v) == 32 for v in a.values())
    wa, _ = load_weights(runs[0]["run_dir"])
    wb, _ = load_weights(runs[1]["run_dir"])
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    first = [json.loads(x)["train/loss"] for x in open(os.path.join(runs[0]["run_dir"], "metrics.jsonl"))
             if "train/loss" in x]
    assert abs(first[0] - first[-1]) > 1e-3  # it trained
