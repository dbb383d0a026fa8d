"""The webdataset stream on shards made here, including deliberately broken ones: true-weight mixing,
exact resume across workers and ranks, corrupt-data accounting, no hang with few shards, manifests."""
import io
import os
import subprocess
import sys
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from evaclip.data.recipes import Recipe, SourceSpec, load_recipe, shard_pattern, write_recipe
from evaclip.data.shards import ShardError, count_tar_samples, expand_pattern, iter_tar_samples
from evaclip.data.transforms import Tokenizer
from evaclip.data.loader import make_loader, stop_workers
from evaclip.data.pipeline import DataState, ImageTextStream
from evaclip.data.streams import MixedStream, ShardSequence, SourceStream, build_stream_spec
from tests.conftest import REPO, run_cli


def _jpeg(seed: int, size: int = 16) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder, name, n_shards, per_shard, corrupt=(), no_caption=(), empty_caption=(), no_image=()):
    """Tiny img2dataset-style shards; the sets name (shard, index) pairs to break."""
    from webdataset import TarWriter

    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        with TarWriter(os.path.join(folder, f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                key = f"{name}{s:03d}{i:05d}"
                sample = {"__key__": key, "jpg": _jpeg(s * 1000 + i), "txt": f"{name} sample {s} {i}".encode()}
                if (s, i) in corrupt:
                    sample["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg" + os.urandom(50)
                if (s, i) in no_caption:
                    del sample["txt"]
                if (s, i) in empty_caption:
                    sample["txt"] = b"   "
                if (s, i) in no_image:
                    del sample["jpg"]
                w.write(sample)
    return os.path.join(folder, "{%05d..%05d}.tar" % (0, n_shards - 1))


def _identity(img):
    return torch.zeros(1)


def stream_for(pattern, rank=0, world=1, mb=8, resampled=True, buffer=20, weights=None, epochs=0, seed=0,
               recipe=None):
    recipe = recipe or Recipe(name="t", source=[SourceSpec(name="s", shards=pattern)])
    spec = build_stream_spec(recipe, "", seed, rank, world, resampled, buffer, block_shards=2)
    spec.epochs = epochs
    return ImageTextStream(spec, mb, _identity, Tokenizer(16))


# ------------------------------------------------------------------------------------------------ mixing
def test_true_weight_mixing_over_20k(tmp_path):
    a = write_shards(tmp_path / "laion", "a", 4, 50)
    b = write_shards(tmp_path / "coyo", "b", 2, 50)
    recipe = Recipe(name="merged", source=[SourceSpec(name="laion", shards=a, samples=1_600_000_000),
                                           SourceSpec(name="coyo", shards=b, samples=400_000_000)])
    assert recipe.weights() == pytest.approx([0.8, 0.2])
    spec = build_stream_spec(recipe, "", 0, 0, 1, True, 50)
    streams = [SourceStream(ShardSequence(u, spec, i, 0, 1), Counter()) for i, u in enumerate(spec.urls)]
    mixed = MixedStream(streams, spec.weights, (0, 0, 0))
    counts = Counter()
    for n, (src, raw) in enumerate(mixed):
        counts[src] += 1
        assert raw["__key__"].startswith("ab"[src])
        if n + 1 == 20_000:
            break
    assert abs(counts[0] / 20_000 - 0.8) <= 0.02 and abs(counts[1] / 20_000 - 0.2) <= 0.02


def test_recipe_weights_explicit_or_from_counts(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\n[[source]]\nname = "a"\nshards = "a.tar"\nweight = 3\n'
                 '[[source]]\nname = "b"\nshards = "b.tar"\nweight = 1\n')
    assert load_recipe(str(p)).weights() == pytest.approx([0.75, 0.25])
    p.write_text('name = "x"\n[[source]]\nname = "a"\nshards = "a.tar"\nwieght = 3\n')
    with pytest.raises(Exception, match="source\\[0\\].wieght"):
        load_recipe(str(p))


def test_a_written_recipe_reads_back_as_written(tmp_path):
    """write_recipe (the one writer of data synth's, filter's, reinforce's, capfilt's and the studies' recipes):
    names with quotes and backslashes, a comment, weights on every source, and shard patterns relative to the file
    read back through load_recipe as they were given; the file is written whole, no temporary file left beside it."""
    path = str(tmp_path / "out" / "recipe.toml")
    os.makedirs(os.path.dirname(path))
    write_recipe(path, 'a "quoted" name', "C:\\data\\x", [
        {"name": "a", "shards": shard_pattern("a", 3, width=6), "samples": 30, "weight": 3},
        {"name": "b\\c", "shards": shard_pattern("../b", 1), "samples": 7, "weight": 1.0}],
        comment="first line\n  second line")
    r = load_recipe(path)
    assert (r.name, r.description) == ('a "quoted" name', "C:\\data\\x")
    assert [(s.name, s.shards, s.samples) for s in r.source] == [
        ("a", os.path.join(str(tmp_path / "out"), "a", "{000000..000002}.tar"), 30),
        ("b\\c", str(tmp_path / "b" / "00000.tar"), 7)]
    assert r.weights() == pytest.approx([0.75, 0.25])
    assert open(path).read().startswith("# first line\n#   second line\nname = ")
    assert os.listdir(tmp_path / "out") == ["recipe.toml"]


def test_decoded_stream_reports_per_source_counts(tmp_path):
    a = write_shards(tmp_path / "a", "a", 2, 30)
    b = write_shards(tmp_path / "b", "b", 2, 30)
    recipe = Recipe(name="m", source=[SourceSpec(name="A", shards=a, weight=0.7), SourceSpec(name="B", shards=b, weight=0.3)])
    st = DataState()
    for i, batch in enumerate(make_loader(stream_for(None, recipe=recipe, mb=16), 0)):
        st.update(batch.pop("__state__"))
        assert batch["image"].shape[0] == 16 and batch["text"].shape == (16, 16)
        if i == 40:
            break
    per = st.per_source()
    assert per["A"] + per["B"] == 41 * 16 and 0.6 < per["A"] / (41 * 16) < 0.8


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("resampled", [True, False])
def test_resume_gives_the_uninterrupted_keys(tmp_path, resampled):
    """2 simulated ranks x 2 workers: stream 5 batches, keep the position, restart -> the next batches'
    keys equal those of the uninterrupted stream."""
    pattern = write_shards(tmp_path / "d", "k", 8, 25)
    for rank in range(2):
        full = make_loader(stream_for(pattern, rank, 2, resampled=resampled), 2)
        keys, state = [], DataState()
        for i, batch in enumerate(full):
            keys.append(batch["key"])
            if i < 5:
                state.update(batch["__state__"])
            if i == 11:
                break
        resumed = stream_for(pattern, rank, 2, resampled=resampled)
        resumed.set_state(state.state_dict())
        again = []
        for i, batch in enumerate(make_loader(resumed, 2)):
            again.append(batch["key"])
            if i == 5:
                break
        assert again == keys[5:11], f"rank {rank}"
    # and the ranks see different data
    k0 = next(iter(make_loader(stream_for(pattern, 0, 2), 0)))["key"]
    k1 = next(iter(make_loader(stream_for(pattern, 1, 2), 0)))["key"]
    assert k0 != k1


def test_resume_with_other_worker_count_is_refused(tmp_path):
    pattern = write_shards(tmp_path / "d", "k", 4, 10)
    st = DataState()
    for i, b in enumerate(make_loader(stream_for(pattern), 2)):
        st.update(b["__state__"])
        if i == 2:
            break
    s = stream_for(pattern)
    s.set_state(st.state_dict())
    with pytest.raises(RuntimeError, match="keep data.workers unchanged"):
        next(iter(make_loader(s, 0)))


# ------------------------------------------------------------------------------------------------ faults
def truncate_file(path, fraction):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * fraction)])


def _readable_samples(path):
    """Independent count of the complete samples Python's tarfile can read before the damage."""
    keys = []
    try:
        with tarfile.open(path, "r|*") as t:
            for m in t:
                f = t.extractfile(m)
                if f is not None:
                    f.read()
                keys.append(m.name.split(".")[0])
    except (tarfile.TarError, OSError, EOFError):
        pass
    # the last key read may be incomplete (its other member lost): drop it, as the stream does
    uniq = list(dict.fromkeys(keys))
    return len(uniq) - 1 if uniq else 0


def test_corrupt_data_is_skipped_and_counted_exactly(tmp_path):
    n_shards, per = 5, 40  # 200 samples; 2% corrupt JPEGs = 4
    corrupt = {(0, 3), (1, 17), (2, 5), (3, 39)}
    write_shards(tmp_path / "bad", "c", n_shards, per, corrupt=corrupt, no_caption={(1, 2)},
                 empty_caption={(2, 9)}, no_image={(3, 0)})
    extra = tmp_path / "bad" / "00005.tar"  # the truncated shard
    write_shards(tmp_path / "t", "t", 1, per)
    os.replace(tmp_path / "t" / "00000.tar", extra)
    truncate_file(str(extra), 0.55)
    kept_from_truncated = _readable_samples(str(extra))
    assert 0 < kept_from_truncated < per
    stream = stream_for(str(tmp_path / "bad" / "{00000..00005}.tar"), resampled=False, epochs=1, mb=7)
    st, delivered = DataState(), 0
    for batch in make_loader(stream, 0):
        st.update(batch.pop("__state__"))
        delivered += len(batch["key"])
    skips = st.skip_counts()
    assert skips == {"decode_error": 4, "missing_image": 1, "missing_caption": 1, "empty_caption": 1,
                     "unreadable_shard": 0, "truncated_shard": 1}  # read up to the damage: truncated, not unreadable
    assert delivered == n_shards * per - 7 + kept_from_truncated


def test_source_with_only_unreadable_shards_is_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.tar").write_bytes(os.urandom(3000))
    stream = stream_for(str(tmp_path / "{0..2}.tar"))
    with pytest.raises(RuntimeError, match="every shard tried is unreadable"):
        next(iter(make_loader(stream, 0)))
    with pytest.raises(FileNotFoundError, match="none of its 3 shards exist"):
        stream_for(str(tmp_path / "missing_{0..2}.tar"))


def test_epoch_mode_with_too_few_shards_is_refused(tmp_path):
    pattern = write_shards(tmp_path / "d", "k", 2, 5)
    with pytest.raises(ValueError, match="use data.resampled = true"):
        next(iter(make_loader(stream_for(pattern, 0, 2, resampled=False), 2)))


def test_more_rank_workers_than_shards_does_not_hang(tmp_path):
    """2 shards, 2 ranks x 3 workers, resampled: every rank gets batches from every worker, in a subprocess
    with a timeout so a hang fails the test instead of stalling CI."""
    pattern = write_shards(tmp_path / "d", "k", 2, 12)
    code = f"""
import sys; sys.path.insert(0, {REPO!r})
from tests.test_data import stream_for, make_loader
for rank in range(2):
    seen = set()
    for i, b in enumerate(make_loader(stream_for({pattern!r}, rank, 2, mb=4), 3)):
        seen.add(b["__state__"]["worker"])
        if i == 8:
            break
    assert seen == {{0, 1, 2}}, seen
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_shard_reader_keeps_samples_before_damage(tmp_path):
    pattern = write_shards(tmp_path / "d", "k", 1, 20)
    path = expand_pattern(pattern)[0]
    truncate_file(path, 0.5)
    got = []
    with pytest.raises(ShardError):
        for s in iter_tar_samples(path):
            got.append(s["__key__"])
    assert len(got) == _readable_samples(path)


def _tar_bytes(fmt, compress=""):
    """A tar in ``fmt`` with what real shards hold and what a reader must get past: float mtimes (pax records),
    names over 100 characters (ustar prefix / GNU long name / pax path), a directory, a symlink, an empty
    member, a member of exactly one block and a large one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:" + compress, format=fmt) as t:
        def add(name, data, kind=tarfile.REGTYPE, **kw):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), 1796194090.8107529
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("dir", b"", tarfile.DIRTYPE)
        for i in range(6):
            add(f"{i:09d}.jpg", _jpeg(i))
            add(f"{i:09d}.txt", f"caption {i}".encode())
        add("a" * 60 + "/" + "b" * 70 + "/000000006.txt", b"x" * 512)
        add("link.txt", b"", tarfile.SYMTYPE, linkname="000000000.txt")
        add("000000007.txt", b"")
        add("000000008.bin", bytes(range(256)) * 300)
    return buf.getvalue()


def _tarfile_members(data):
    """Python's tarfile as the reference: (name, bytes) of each regular member and where its padded data ends."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
        for m in t:
            if m.isfile():
                out.append((m.name, t.extractfile(m).read(), m.offset_data + -(-m.size // 512) * 512))
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_equals_tarfile_and_stops_at_every_cut(fmt):
    """The shard reader returns tarfile's regular members (names, bytes) in pax, GNU and ustar tars; cut anywhere
    (inside a header, inside data, at a member boundary, inside the end marker), it returns exactly the members
    complete before the cut and then raises, rather than ending as if the shard were whole."""
    from evaclip.data.shards import tar_members

    data = _tar_bytes(fmt)
    ref = _tarfile_members(data)
    assert any(len(n) > 100 for n, _, _ in ref) and len(ref) == 15
    assert list(tar_members(io.BytesIO(data))) == [(n, b) for n, b, _ in ref]
    last = ref[-1][2]  # then the end-of-archive zero blocks: one of them is enough
    assert list(tar_members(io.BytesIO(data[:last + 512]))) == [(n, b) for n, b, _ in ref]
    for cut in sorted(set(range(0, last + 512, 97)) | {end for _, _, end in ref} | {last + 511}):
        got = []
        with pytest.raises(ValueError):
            for member in tar_members(io.BytesIO(data[:cut])):
                got.append(member)
        assert got == [(n, b) for n, b, end in ref if end <= cut], cut
    damaged = bytearray(data)
    damaged[ref[3][2] + 20] ^= 0xFF  # the name field of the header after the 4th member
    got = []
    with pytest.raises(ValueError, match="checksum"):
        for member in tar_members(io.BytesIO(bytes(damaged))):
            got.append(member)
    assert got == [(n, b) for n, b, _ in ref[:4]]


def test_tar_reader_equals_webdatasets_on_a_webdataset_shard(tmp_path):
    """A shard written by webdataset's TarWriter reads as webdataset reads it; so does a shard of `data synth`
    (written by evaclip's one shard writer)."""
    import webdataset as wds

    from evaclip.data.synth import write_train

    write_train(str(tmp_path / "synth"), 1, 30, 32, seed=1)
    synth = str(tmp_path / "synth" / "00000.tar")
    theirs = str(tmp_path / "wds.tar")
    with wds.TarWriter(theirs) as w:
        for s in iter_tar_samples(synth):
            w.write({k: v for k, v in s.items() if k != "__url__"})
    for url in (theirs, synth):
        ref = [{k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": s["__key__"]}
               for s in wds.WebDataset(url, shardshuffle=False)]
        ours = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_tar_samples(url)]
        assert len(ours) == 30 and ours == ref


def test_compressed_tar_shards_read_through_tarfile(tmp_path):
    path = tmp_path / "00000.tar.gz"
    path.write_bytes(_tar_bytes(tarfile.PAX_FORMAT, "gz"))
    samples = list(iter_tar_samples(str(path)))
    assert [s["__key__"] for s in samples][:6] == [f"{i:09d}" for i in range(6)]
    assert samples[0]["jpg"] == _jpeg(0) and samples[0]["txt"] == b"caption 0"


# ------------------------------------------------------------------------------------------------ tools
def test_stats_manifest_round_trips_with_exact_counts(tmp_path):
    pattern = write_shards(tmp_path / "d", "k", 3, 11)
    (tmp_path / "d" / "00001_stats.json").write_text('{"successes": 11, "count": 12}')  # as img2dataset writes
    out = tmp_path / "manifest.parquet"
    r = run_cli(["data", "stats", pattern, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    table = pq.read_table(str(out)).to_pydict()
    assert table["samples"] == [11, 11, 11]
    assert table["counted_from"] == ["tar_headers", "img2dataset_stats", "tar_headers"]
    assert [os.path.basename(s) for s in table["shard"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert count_tar_samples(expand_pattern(pattern)[0]) == 11


def test_verify_and_preview(tmp_path):
    pattern = write_shards(tmp_path / "d", "k", 2, 6, corrupt={(1, 2)})
    r = run_cli(["data", "verify", pattern, "--fail"])
    assert r.returncode == 1 and "00001.tar" in r.stdout and "decode_error" in r.stdout
    png = tmp_path / "sheet.png"
    r = run_cli(["data", "preview", pattern, "-n", "5", "--out", str(png)])
    assert r.returncode == 0 and png.exists() and r.stdout.count("k000") == 5
    assert Image.open(png).size[0] > 0


def test_fsspec_and_pipe_urls(tmp_path):
    """Shards from an fsspec URL (memory://, as s3:// or gs:// would be) and from a pipe: command."""
    import fsspec

    pattern = write_shards(tmp_path / "d", "u", 1, 5)
    local = expand_pattern(pattern)[0]
    with fsspec.open("memory://evaclip-test/00000.tar", "wb") as f:
        f.write(open(local, "rb").read())
    keys = [s["__key__"] for s in iter_tar_samples("memory://evaclip-test/00000.tar")]
    assert keys == [s["__key__"] for s in iter_tar_samples(local)] and len(keys) == 5
    assert len(list(iter_tar_samples(f"pipe:cat {local}"))) == 5


# ------------------------------------------------------------------------------------------------ logical streams
def _global_batches(pattern, topology, steps, streams=12, batch=32, resume=None, stop=None):
    """Keys of each global batch for ``steps`` data steps on (ranks, workers); ``resume``: per-rank states;
    ``stop``: also return the per-rank states after that many steps."""
    ranks, workers = topology
    per_step = [[] for _ in range(steps)]  # sorted lists: resampled streams may draw a sample twice
    states = []
    for rank in range(ranks):
        recipe = Recipe(name="t", source=[SourceSpec(name="s", shards=pattern)])
        spec = build_stream_spec(recipe, "", 0, rank, ranks, True, 20, block_shards=2, num_streams=streams,
                                 step_samples=batch)
        stream = ImageTextStream(spec, batch // ranks, _identity, Tokenizer(16))
        stream.set_state(resume[rank] if resume else None)
        state = DataState()
        it = iter(make_loader(stream, workers))
        for s in range(steps):
            for _ in range(max(1, workers)):  # one piece per worker and data step
                piece = next(it)
                state.update(piece["__state__"])
                per_step[s] = sorted(per_step[s] + piece["key"])
            if stop is not None and s + 1 == stop:
                states.append(state.state_dict())
        stop_workers(it)
    return per_step, states


def test_logical_streams_give_the_same_global_batches_on_any_topology(tmp_path):
    """12 logical streams, global batch 32: 1 rank x 1 worker, 2 ranks x 2 workers, 1 rank x 3 workers see the
    same 32 keys in each of 20 global batches; a resume on another topology continues them exactly."""
    pattern = write_shards(tmp_path / "d", "k", 8, 40)
    ref, _ = _global_batches(pattern, (1, 0), 20)
    assert all(len(b) == 32 for b in ref) and len(set().union(*map(set, ref))) > 200
    for topology in ((2, 2), (1, 3)):
        got, _ = _global_batches(pattern, topology, 20)
        assert got == ref, topology
    _, states = _global_batches(pattern, (2, 2), 8, stop=8)  # 2 x 2 stopped after 8 steps ...
    merged = {k: v for st in states for k, v in st.items()}  # ... the streams' states, whatever rank held them
    rest, _ = _global_batches(pattern, (1, 3), 12, resume=[merged])  # resumed on 1 x 3
    assert rest == ref[8:]


def test_stream_counts_that_a_topology_cannot_serve_are_refused():
    from evaclip.config import ConfigError, load_config
    from evaclip.preflight import resolve
    from evaclip.data.topology import check_streams

    assert check_streams(12, 32, 2, 2) is None and check_streams(12, 32, 1, 3) is None
    assert "streams give" in check_streams(10, 32, 4, 1) and "for 4 workers" in check_streams(12, 36, 4, 4)
    with pytest.raises(ConfigError, match=r"data.streams = 10 cannot serve 4 ranks x 1 data.workers"):
        resolve(load_config("demo_cpu", ["data.root=/d", "data.streams=10", "data.workers=1",
                                         "data.micro_batch_size=8"]), world_size=4)
