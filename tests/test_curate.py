"""Curation: `evaclip data score` / `evaclip data filter` and per-sample training losses (log.sample_loss).

The model is the demo experiment trained briefly on its own synthetic data; the scored set is a held-out
synthetic shard in which a known 30% of the captions were moved to other images."""
import glob
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest
import torch

from evaclip.data.shards import iter_tar_samples
from tests.conftest import REPO, run_cli, tiny_overrides, wait_for

SHUFFLED = 0.3


def _write_tar(path, samples):
    with tarfile.open(path, "w") as t:
        for s in samples:
            for ext in sorted(e for e in s if not e.startswith("__")):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                t.addfile(info, io.BytesIO(s[ext]))


def _shuffle_captions(src, dst, frac, seed=0):
    """Copy a shard, moving the captions of a random ``frac`` of its samples to one another (a rotation):
    returns the keys whose caption is now wrong."""
    samples = list(iter_tar_samples(src))
    idx = random.Random(seed).sample(range(len(samples)), int(frac * len(samples)))
    caps = [samples[i]["txt"] for i in idx]
    wrong = set()
    for i, c in zip(idx, caps[1:] + caps[:1]):
        if c != samples[i]["txt"]:
            samples[i]["txt"] = c
            wrong.add(samples[i]["__key__"])
    _write_tar(dst, samples)
    return wrong


@pytest.fixture(scope="module")
def curate_data(tmp_path_factory):
    """Synthetic training shards, and held-out shards (another seed) with 30% shuffled captions."""
    from evaclip.data import synth

    root = tmp_path_factory.mktemp("curate")
    synth.write_all(str(root / "synth"), shards=6, per_shard=500, image_size=64, seed=3, eval_per_class=2,
                    retrieval_images=8)
    held = root / "held"
    synth.write_train(str(held / "clean"), 3, 200, 64, seed=11)
    os.makedirs(held / "mixed")
    wrong = set()
    for i in range(3):
        wrong |= _shuffle_captions(str(held / "clean" / f"{i:05d}.tar"), str(held / "mixed" / f"{i:05d}.tar"),
                                   SHUFFLED, seed=i)
    return {"root": root, "synth": str(root / "synth"), "mixed": str(held / "mixed" / "{00000..00002}.tar"),
            "mixed_dir": str(held / "mixed"), "wrong": wrong}


@pytest.fixture(scope="module")
def demo_model(curate_data):
    """The demo experiment, 150 steps of 64 on the synthetic shards (about a minute on 2 cores)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config("demo_cpu", [f"run.output_dir={curate_data['root'] / 'runs'}", "run.name=demo", "run.steps=150",
                                   f"data.root={curate_data['synth']}",
                                   f"data.recipe={os.path.join(curate_data['synth'], 'recipe.toml')}", "data.workers=1", "log.progress=false",
                                   "log.plot=false", "log.tensorboard=false", 'eval.suite=""'])
    summary = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()
    return summary["run_dir"]


@pytest.fixture(scope="module")
def scored(curate_data, demo_model):
    from evaclip.curation.score import score
    from evaclip.encoders import load_encoders

    out = str(curate_data["root"] / "scores")
    res = score(curate_data["mixed"], "", load_encoders(demo_model), out, batch_size=64, workers=1)
    assert res["scored_shards"] == 3 and res["samples"] == 600
    return out


def _tables(folder):
    import pyarrow.parquet as pq

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".parquet"))
    return {os.path.relpath(f, folder): pq.read_table(f).to_pydict() for f in files}


def _same_tables(a, b):
    """Same files, rows and columns; scores to 1e-6 (another process may sum in another order)."""
    assert sorted(a) == sorted(b)
    for name in a:
        ta, tb = a[name], b[name]
        assert {c: v for c, v in ta.items() if c != "score"} == {c: v for c, v in tb.items() if c != "score"}, name
        assert max(abs(x - y) for x, y in zip(ta["score"], tb["score"])) <= 1e-6, name
    return True


@pytest.mark.slow
def test_the_score_of_a_trained_demo_model_separates_shuffled_captions(curate_data, scored):
    """Top 70% by score keeps >= 95% of the correct pairs and drops >= 80% of the shuffled ones."""
    import pyarrow.parquet as pq

    from evaclip.curation.filter import select

    table = pq.read_table(os.path.join(scored, "shards"))
    keep, _ = select(table, top=0.7)
    keys = table.column("key").to_pylist()
    wrong = curate_data["wrong"]
    kept_ok = sum(1 for k, m in zip(keys, keep) if m and k not in wrong) / sum(1 for k in keys if k not in wrong)
    dropped_bad = sum(1 for k, m in zip(keys, keep) if not m and k in wrong) / len(wrong)
    print(f"top 70%: kept {100 * kept_ok:.1f}% of the correct pairs, dropped {100 * dropped_bad:.1f}% of the shuffled")
    assert kept_ok >= 0.95 and dropped_bad >= 0.80, (kept_ok, dropped_bad)


@pytest.mark.slow
def test_scores_equal_the_models_own_cosine(curate_data, demo_model, scored):
    from PIL import Image

    from evaclip.checkpoint import load_weights
    from evaclip.data.transforms import eval_transform, make_tokenizer
    from evaclip.models import model_from_record, record_variant

    sd, meta = load_weights(demo_model)
    model = model_from_record(meta["model"])
    model.load_state_dict(sd)
    model.eval()
    v = record_variant(meta["model"])
    tf = eval_transform(v.image_size, v.mean, v.std, interpolation=v.interpolation)
    tok = make_tokenizer(v.context_length)
    samples = list(iter_tar_samples(os.path.join(curate_data["mixed_dir"], "00001.tar")))[:40]
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples]),
                                 normalize=True)
        txt = model.encode_text(tok([s["txt"].decode().strip() for s in samples]), normalize=True)
    want = dict(zip([s["__key__"] for s in samples], (img * txt).sum(-1).tolist()))
    table = _tables(scored)["shards/000001_00001.parquet"]
    got = dict(zip(table["key"], table["score"]))
    assert max(abs(got[k] - w) for k, w in want.items()) <= 1e-5
    assert table["width"][0] == 64 and table["caption_chars"][0] == len(table["caption"][0])


def _score_cmd(curate_data, demo_model, out, *extra):
    return [sys.executable, "-m", "evaclip.cli", "data", "score", curate_data["mixed"], "--checkpoint", demo_model,
            "--out", out, "--workers", "0", "--batch-size", "64", *extra]


@pytest.mark.slow
def test_a_killed_score_run_resumes_to_the_same_tables(curate_data, demo_model, scored, tmp_path):
    out = str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_score_cmd(curate_data, demo_model, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, "shards", "000000_00000.parquet")
    assert wait_for(lambda: os.path.exists(first), 120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_tables(out)) < 3  # killed midway
    r = subprocess.run(_score_cmd(curate_data, demo_model, out), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "already scored" in r.stdout and "skipped 0 already" not in r.stdout, \
        r.stdout + r.stderr[-2000:]
    assert _same_tables(_tables(out), _tables(scored))


@pytest.mark.slow
def test_two_process_scoring_equals_one_process(curate_data, demo_model, scored, tmp_path):
    """Two concurrent processes, as torchrun starts them (RANK / WORLD_SIZE), and a --part split."""
    out = str(tmp_path / "two")
    procs = [subprocess.Popen(_score_cmd(curate_data, demo_model, out), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r),
                                                               WORLD_SIZE="2"))
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert _same_tables(_tables(out), _tables(scored))
    r = run_cli(["data", "score", curate_data["mixed"], "--checkpoint", demo_model, "--out", out, "--part", "1/2"])
    assert r.returncode == 0 and "skipped 1 already scored" in r.stdout, r.stdout + r.stderr


def test_a_score_folder_refuses_another_model(curate_data, tmp_path):
    from evaclip.curation.score import check_out_settings
    from evaclip.errors import UserError

    check_out_settings(str(tmp_path), {"model": "a", "weights": "1"})
    check_out_settings(str(tmp_path), {"model": "a", "weights": "1"})
    with pytest.raises(UserError, match="weights"):
        check_out_settings(str(tmp_path), {"model": "a", "weights": "2"})


@pytest.mark.slow
def test_filtered_shards_hold_exactly_the_kept_keys_and_train(curate_data, scored, tmp_path):
    import hashlib

    import webdataset as wds

    from evaclip.config import load_config

    from evaclip.preflight import resolve
    import pyarrow.parquet as pq

    from evaclip.curation.filter import filter_tables, select
    from evaclip.train import Trainer

    def digest():
        return [hashlib.sha1(open(os.path.join(curate_data["mixed_dir"], f), "rb").read()).hexdigest()
                for f in sorted(os.listdir(curate_data["mixed_dir"]))]

    before = digest()
    out = str(tmp_path / "kept")
    res = filter_tables([scored], out, top=0.7, shard_size=150)
    table = pq.read_table(os.path.join(scored, "shards"))
    keep, cuts = select(table, top=0.7)
    want = {k for k, m in zip(table.column("key").to_pylist(), keep) if m}
    assert res["kept"] == len(want) == 420 and res["shards"] == 3 and digest() == before
    pattern = os.path.join(out, "{00000..00002}.tar")
    got_wds = [s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False)]  # webdataset as-is
    got_own = [s["__key__"] for u in sorted(os.listdir(out)) if u.endswith(".tar")
               for s in iter_tar_samples(os.path.join(out, u))]
    assert set(got_wds) == set(got_own) == want and len(got_own) == len(want)
    one = next(iter_tar_samples(os.path.join(out, "00000.tar")))
    assert json.loads(one["json"])["score"] >= cuts["shards"]["top"]
    assert os.path.exists(os.path.join(out, "histogram.png")) and os.path.exists(os.path.join(out, "manifest.parquet"))
    cfg = load_config("demo_cpu", tiny_overrides(curate_data["synth"], str(tmp_path / "runs"), "filtered", steps=2,
                                                 extra=[f"data.recipe={os.path.join(out, 'recipe.toml')}",
                                                        'data.root=""']))
    assert Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()["steps"] == 2


def test_where_is_parsed_never_run(tmp_path):
    import pyarrow as pa

    from evaclip.curation.filter import select
    from evaclip.errors import UserError

    t = pa.table({"key": ["a", "b", "c"], "source": ["s"] * 3, "score": [0.1, 0.3, 0.5], "caption_chars": [5, 20, 30]})
    keep, _ = select(t, where="score > 0.2 and not (caption_chars >= 30)")
    assert keep.tolist() == [False, True, False]
    keep, _ = select(t, min_value=0.3)
    assert keep.tolist() == [False, True, True]
    for bad in ("__import__('os').system('true')", "score.real > 0", "nope > 1", "[1][0] > 0", "score >"):
        with pytest.raises(UserError):
            select(t, where=bad)
    for not_a_condition in ("score", "score * 2", "1", "'x'"):  # issue 32 (12): these kept every row
        with pytest.raises(UserError, match="is not a condition"):
            select(t, where=not_a_condition)


@pytest.mark.parametrize("impl,accum", [("local", 1), ("tiled", 2)])
def test_sample_losses_average_to_the_logged_loss(synth_dir, tmp_path, impl, accum):
    import pyarrow.parquet as pq

    from evaclip.config import load_config

    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), "sl", steps=3, extra=[
        "log.sample_loss=true", f"loss.impl={impl}", "loss.tile_size=5", f"engine.accum_steps={accum}"]))
    summary = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()
    rows = pq.read_table(os.path.join(summary["run_dir"], "sample_loss")).to_pydict()
    logged = {r["step"]: r["train/loss"] for r in map(json.loads, open(os.path.join(summary["run_dir"], "metrics.jsonl")))
              if "train/loss" in r}
    assert sorted(set(rows["step"])) == [1, 2, 3] and len(rows["key"]) == 3 * 8 * accum
    for step, want in logged.items():
        got = [x for s, x in zip(rows["step"], rows["loss"]) if s == step]
        assert abs(sum(got) / len(got) - want) <= 1e-6, (step, sum(got) / len(got), want)


def test_sample_loss_tables_filter_through_their_shards(synth_dir, tmp_path):
    """Drop the highest-loss 25% of the samples a run saw (mean loss per key), found via --shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evaclip.curation.filter import filter_tables

    pattern = os.path.join(synth_dir, "train", "{00000..00001}.tar")
    keys = [s["__key__"] for u in ("00000", "00001") for s in iter_tar_samples(os.path.join(synth_dir, "train", u + ".tar"))]
    loss = {k: float(i) for i, k in enumerate(keys)}
    os.makedirs(tmp_path / "sl")
    pq.write_table(pa.table({"step": [1] * len(keys) + [2] * len(keys), "key": keys + keys,
                             "source": ["synthetic"] * (2 * len(keys)),
                             "loss": [loss[k] for k in keys] + [loss[k] + 2 for k in keys]}), tmp_path / "sl" / "a.parquet")
    res = filter_tables([str(tmp_path / "sl")], str(tmp_path / "out"), by="loss", bottom=0.75, shards=pattern)
    got = {s["__key__"] for s in iter_tar_samples(str(tmp_path / "out" / "00000.tar"))}
    assert got == set(keys[:int(round(0.75 * len(keys)))]) and res["kept"] == len(got)


def test_a_runs_sample_loss_table_copies_only_out_of_the_shards_it_read(synth_dir, tmp_path):
    """Issue 32 (4): loss tables record the identity of each sample's shard. --shards at a copy of the same bytes
    works; at a copy whose shard holds the same keys with other captions it is a one-line error (it copied them)."""
    from evaclip.config import load_config
    from evaclip.curation.filter import filter_tables
    from evaclip.errors import UserError
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), "ids", steps=2, extra=["log.sample_loss=true"]))
    run = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None).train()["run_dir"]
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(synth_dir, "train"), copy)
    pattern = str(copy / "{00000..00003}.tar")
    res = filter_tables([os.path.join(run, "sample_loss")], str(tmp_path / "same"), by="loss", bottom=1.0,
                        shards=pattern)
    assert res["kept"] == 16
    for name in glob.glob1(str(copy), "*.tar"):  # the same keys, other captions
        with tarfile.open(copy / name) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(copy / name, "w") as t:
            for m, data in members:
                data = b"another caption" if m.name.endswith(".txt") else data
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))
    with pytest.raises(UserError, match=r"is not the shard the run read it from .*point --shards at the shards"):
        filter_tables([os.path.join(run, "sample_loss")], str(tmp_path / "other"), by="loss", bottom=1.0,
                      shards=pattern)
    assert not os.path.exists(tmp_path / "other")


def test_score_and_filter_have_help():
    for cmd in ("score", "filter"):
        r = run_cli(["data", cmd, "--help"])
        assert r.returncode == 0 and "--out" in r.stdout


def test_score_counts_corrupt_samples_as_training_does_and_stores_embeddings(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evaclip.curation.score import score
    from evaclip.encoders import Encoders
    from evaclip.models import create_model, get_variant
    from tests.test_data import write_shards

    pattern = write_shards(str(tmp_path / "s"), "c", 1, 12, corrupt={(0, 3)}, no_caption={(0, 5)},
                           empty_caption={(0, 7)})
    v = get_variant("EVA02-Ti-8-64")
    torch.manual_seed(0)
    m = create_model(v.name).eval()
    from evaclip.data.transforms import make_tokenizer

    enc = Encoders(m.encode_image, m.encode_text, make_tokenizer(v.context_length), v.image_size, v.mean, v.std,
                   v.interpolation, v.name, "random", "random-0")
    res = score(pattern, "", enc, str(tmp_path / "out"), batch_size=5, workers=2, embeddings=True)
    assert res["skipped"] == {"decode_error": 1, "missing_caption": 1, "empty_caption": 1} and res["samples"] == 9
    t = pq.read_table(tmp_path / "out" / "shards" / "000000_00000.parquet")
    assert t.num_rows == 9 and t.schema.field("embedding").type == pa.list_(pa.float16(), v.embed_dim)
    assert json.loads(t.schema.metadata[b"evaclip.skipped"]) == res["skipped"]
    emb = torch.tensor(t.column("embedding").to_pylist(), dtype=torch.float32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(9), atol=1e-2)  # the normalised image embeddings


def test_filter_refuses_an_out_that_is_or_holds_an_input_even_with_force(curate_data, scored, tmp_path):
    """Issue 32 (1): --out equal to the tables' folder, to the shards' folder or to a parent of either, --force
    included, used to delete the inputs before writing; now a one-line error, and every input is unchanged."""
    import hashlib

    from evaclip.curation.filter import filter_tables
    from evaclip.errors import UserError

    def digest(folder):
        return {f: hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
                for d, _, fs in os.walk(folder) for f in fs}

    before = digest(scored), digest(curate_data["mixed_dir"])
    for out in (scored, curate_data["mixed_dir"], str(curate_data["root"]), os.path.join(scored, "kept")):
        with pytest.raises(UserError, match="would overwrite an input"):
            filter_tables([scored], out, min_value=0.0, force=True)
    assert (digest(scored), digest(curate_data["mixed_dir"])) == before
    res = filter_tables([scored], str(tmp_path / "kept"), min_value=-1.0)  # elsewhere: fine (cosine >= -1: all)
    assert res["kept"] == 600


def test_a_second_filter_of_the_same_out_is_refused_and_a_failed_one_keeps_the_old_out(curate_data, scored,
                                                                                       tmp_path):
    """Issue 32 (11): two filters writing the same --out at once mixed their outputs. Now the second is refused
    while the first holds the lock (a lock left by a killed filter is taken over), and a filter that fails, --force
    included, leaves the previous --out whole (it was deleted before the new one was written)."""
    import socket
    import subprocess

    from evaclip.curation.filter import filter_tables
    from evaclip.errors import UserError

    out = str(tmp_path / "kept")
    first = filter_tables([scored], out, min_value=-1.0)
    before = sorted(os.listdir(out))
    holder = subprocess.Popen(["sleep", "60"])  # a live writer holding the lock
    try:
        (tmp_path / "kept.lock").write_text(f"{socket.gethostname()} {holder.pid}")
        with pytest.raises(UserError, match=rf"--out {out} is being written by another process .*pid {holder.pid}"):
            filter_tables([scored], out, min_value=0.0, force=True)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(out)) == before  # untouched by the refused filter
    with pytest.raises(UserError, match="nothing is kept"):  # the lock of a dead writer is taken over
        filter_tables([scored], out, min_value=2.0, force=True)
    assert sorted(os.listdir(out)) == before and not os.path.exists(out + ".lock")
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]
    again = filter_tables([scored], out, min_value=-1.0, force=True)
    assert again["keys_sha1"] == first["keys_sha1"] and again["manifest"] == os.path.join(out, "manifest.parquet")


def test_filter_refuses_a_replaced_shard_and_tables_of_two_models(curate_data, demo_model, tmp_path):
    """Issue 32 (4): data filter matched samples by key alone: a shard replaced after scoring (here: the same keys
    with the original, unshuffled captions) was copied with exit 0, and tables of two models were merged (scores
    on two scales). Now each table records the shard it scored (bytes and a content digest) and the model: a
    replaced shard and a mix of models (unless --mixed-models) are one-line errors naming them."""
    import dataclasses

    from evaclip.curation.filter import filter_tables
    from evaclip.curation.score import score
    from evaclip.encoders import load_encoders
    from evaclip.errors import UserError

    shards = tmp_path / "shards"
    shutil.copytree(curate_data["mixed_dir"], shards)
    pattern = str(shards / "{00000..00002}.tar")
    enc = load_encoders(demo_model)
    score(pattern, "", enc, str(tmp_path / "a"), batch_size=64, workers=0)
    score(pattern, "", dataclasses.replace(enc, identity="other-weights"), str(tmp_path / "b"), batch_size=64,
          workers=0)
    with pytest.raises(UserError, match=r"scored by 2 models .*other-weights.*--mixed-models"):
        filter_tables([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"), min_value=-1.0)
    both = filter_tables([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "ab"), min_value=-1.0,
                         mixed_models=True)
    assert both["kept"] == 1200
    shutil.copy(os.path.join(curate_data["root"], "held", "clean", "00001.tar"), shards / "00001.tar")
    with pytest.raises(UserError, match=r"00001.tar is not the shard .* scored .*score it again"):
        filter_tables([str(tmp_path / "a")], str(tmp_path / "kept"), min_value=-1.0)
    assert not os.path.exists(tmp_path / "kept")


def test_a_second_scorer_of_the_same_part_is_refused(curate_data, demo_model, tmp_path):
    """Issue 32 (11): two processes given the same --part of one --out wrote the same tables at once. A lock per
    part: the second is a one-line error naming the part and the holder; other parts are free."""
    import socket

    from evaclip.curation.score import score
    from evaclip.encoders import load_encoders
    from evaclip.errors import UserError

    out = tmp_path / "scores"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".part-0-of-2.lock").write_text(f"{socket.gethostname()} {holder.pid}")
        enc = load_encoders(demo_model)
        with pytest.raises(UserError, match=rf"part 0/2 is being written by another process .*pid {holder.pid}"):
            score(curate_data["mixed"], "", enc, str(out), workers=0, part=(0, 2))
        assert score(curate_data["mixed"], "", enc, str(out), workers=0, part=(1, 2))["scored_shards"] == 1
    finally:
        holder.kill()
        holder.wait()
    assert not (out / ".part-1-of-2.lock").exists()
