"""Bad input on the command line (issue 32's table, growing): each case exits 2 with one line naming the setting
or file, prints no traceback, and leaves its input files as they were. In-process through ``cli.main``."""
import hashlib
import os

import pytest

from evaclip import cli


def _digest(paths):
    return {p: hashlib.sha1(open(p, "rb").read()).hexdigest() for p in paths if os.path.isfile(p)}


def _bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{bad")
    return [str(p)]


def _not_a_result(tmp_path):
    p = tmp_path / "other.json"
    p.write_text('[{"x": 1}]')
    return [str(p)]


def _file(t, name, text):
    p = t / name
    p.write_text(text)
    return str(p)


def _dry(*overrides):
    """``train demo_cpu --dry-run`` with overrides: the config checks, no run."""
    return lambda t: ["train", "demo_cpu", "--dry-run", "data.root=x", *overrides]


def _none(t):
    return []


# a config value and the key its error must name (issue 32 point 13: NaN / inf / out-of-range values passed
# --dry-run and then misbehaved, a NaN threshold turning its guard off)
CONFIG_VALUES = [
    ("optim.lr", "nan"), ("optim.lr", "-1"), ("optim.lr", "0"), ("optim.lr", "inf"), ("optim.eps", "0"),
    ("optim.eps", "nan"), ("optim.betas", "[0.9,1.0]"), ("optim.betas", "[-0.1,0.9]"), ("optim.weight_decay", "-0.1"),
    ("optim.trust_clip", "[5.0,1.0]"), ("optim.visual.lr", "-2"), ("optim.visual.layer_decay", "0"),
    ("optim.text.layer_decay", "1.5"), ("model.init_temperature", "0"), ("model.init_temperature", "nan"),
    ("model.max_logit_scale", "-1"), ("loss.tile_size", "0"), ("data.crop_scale", "[0.0,1.0]"),
    ("data.crop_scale", "[0.9,1.5]"), ("data.crop_scale", "[0.9,0.5]"), ("data.shuffle_buffer", "0"),
    ("data.max_skip_fraction", "nan"), ("data.max_skip_fraction", "2"), ("data.batch_timeout_s", "nan"),
    ("data.batch_timeout_s", "-1"), ("data.micro_batch_size", "0"), ("data.micro_batch_size", "abc"),
    ("data.streams", "-1"), ("spike.k_mad", "nan"), ("spike.window", "2"), ("spike.lr_scale", "0"),
    ("schedule.min_lr_ratio", "2"), ("schedule.warmup_steps", "-1"), ("engine.grad_clip", "nan"),
    ("engine.grad_clip", "-1"), ("engine.max_bad_steps", "0"), ("engine.accum_steps", "0"),
    ("run.collective_timeout_s", "nan"), ("run.collective_timeout_s", "0"), ("mim.mask_ratio", "1.0"),
    ("model.vision.patch_dropout", "1.0"), ("checkpoint.keep_last", "0"), ("eval.batch_size", "0"),
    ("log.every_steps", "0"), ("run.device", "tpu"), ("model.name", "NOPE"), ("eval.suite", "nope"),
]

CASES = [  # (id, argv from tmp_path, the input files, what the message must name)
    *[(f"{k}={v}", _dry(f"{k}={v}"), _none, k) for k, v in CONFIG_VALUES],
    ("unknown-key", _dry("foo.bar=1"), _none, "'foo'"),
    ("overlay-bad-json", lambda t: _dry(f"engine.deepspeed_overlay={_file(t, 'o.json', '{bad')}")(t),
     lambda t: [str(t / "o.json")], "o.json"),
    ("recipe-negative-samples", lambda t: _dry("data.recipe=" + _file(
        t, "r.toml", 'name = "r"\n[[source]]\nname = "a"\nshards = "a.tar"\nsamples = -5\n'))(t),
     lambda t: [str(t / "r.toml")], "samples"),
    ("experiment-bad-toml", lambda t: ["train", _file(t, "e.toml", "x = [1,\n"), "--dry-run"],
     lambda t: [str(t / "e.toml")], "e.toml"),
    ("experiment-missing", lambda t: ["train", str(t / "nope.toml"), "--dry-run"], _none, "nope.toml"),
    ("init-missing", lambda t: ["train", "demo_cpu", "data.root=x", f"model.init={t / 'w.pt'}"], _none,
     "model.init"),
    ("resume-not-a-checkpoint", lambda t: ["train", "demo_cpu", "data.root=x", f"checkpoint.resume={t}"], _none,
     "checkpoint.resume"),
    ("world-size-negative", lambda t: ["train", "demo_cpu", "--dry-run", "--world-size", "-1", "data.root=x"],
     _none, "--world-size"),
    ("synth-zero-shards", lambda t: ["data", "synth", "--out", str(t / "s"), "--shards", "0"], _none, "--shards"),
    ("synth-zero-per-shard", lambda t: ["data", "synth", "--out", str(t / "s"), "--per-shard", "0"], _none,
     "--per-shard"),
    ("synth-image-size-0", lambda t: ["data", "synth", "--out", str(t / "s"), "--image-size", "0"], _none,
     "--image-size"),
    ("synth-out-is-a-file", lambda t: ["data", "synth", "--out", _file(t, "f.txt", "x")],
     lambda t: [str(t / "f.txt")], "f.txt"),
    ("preview-nothing-readable", lambda t: ["data", "preview", _file(t, "x.tar", "garbage"), "--out",
                                            str(t / "p.png")], lambda t: [str(t / "x.tar")], "x.tar"),
    ("preview-n-0", lambda t: ["data", "preview", "x.tar", "-n", "0"], _none, "-n"),
    ("score-batch-size-0", lambda t: ["data", "score", "x.tar", "--out", str(t / "o"), "--batch-size", "0"], _none,
     "--batch-size"),
    ("filter-top-0", lambda t: ["data", "filter", str(t), "--out", str(t / "o"), "--top", "0"], _none, "--top"),
    ("filter-bottom-nan", lambda t: ["data", "filter", str(t), "--out", str(t / "o"), "--bottom", "nan"], _none,
     "--bottom"),
    ("filter-shard-size-0", lambda t: ["data", "filter", str(t), "--out", str(t / "o"), "--shard-size", "0"],
     _none, "--shard-size"),
    ("eval-batch-size-0", lambda t: ["eval", "--suite", "quick", "--batch-size", "0"], _none, "--batch-size"),
    ("eval-workers-negative", lambda t: ["eval", "--suite", "quick", "--workers", "-1"], _none, "--workers"),
    ("eval-require-acc1-2", lambda t: ["eval", "--suite", "quick", "--require-acc1", "2"], _none, "--require-acc1"),
    ("eval-no-suite", lambda t: ["eval", "--checkpoint", str(t)], _none, "--suite"),
    ("eval-suite-bad-toml", lambda t: ["eval", "--suite", _file(t, "s.toml", "x = [1,\n"), "--checkpoint", str(t)],
     lambda t: [str(t / "s.toml")], "s.toml"),
    ("eval-not-a-checkpoint", lambda t: ["eval", "--suite", "quick", "--checkpoint", str(t)], _none, "neither a checkpoint"),
    ("export-not-a-checkpoint", lambda t: ["export", str(t), "--out", str(t / "x")], _none, "neither a checkpoint"),
    ("export-tolerance-negative", lambda t: ["export", str(t), "--out", str(t / "x"), "--tolerance", "-1"], _none,
     "--tolerance"),
    ("export-verify-image-tower", lambda t: ["export", str(t), "--out", str(t / "x"), "--tower", "image", "--verify"],
     _none, "--verify"),
    ("export-verify-fp16", lambda t: ["export", str(t), "--out", str(t / "x"), "--dtype", "fp16", "--verify"],
     _none, "--verify"),
    ("compare-missing", lambda t: ["eval", "--compare", str(t / "gone.json")], _none, "gone.json"),
    ("compare-malformed-json", lambda t: ["eval", "--compare", *_bad_json(t)], lambda t: [str(t / "bad.json")],
     "bad.json"),
    ("compare-not-a-result", lambda t: ["eval", "--compare", *_not_a_result(t)], lambda t: [str(t / "other.json")],
     "other.json"),
]


@pytest.mark.parametrize("argv,inputs,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, capsys, argv, inputs, names):
    args = argv(tmp_path)
    before = _digest(inputs(tmp_path))
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if " error: " in x]  # argparse prints its usage lines first
    assert "Traceback" not in "\n".join(err) and len(errors) == 1 and errors[0] == err[-1], err
    assert err[-1].startswith("evaclip ") and names in err[-1], err
    assert _digest(inputs(tmp_path)) == before


def test_a_stale_deepspeed_build_lock_is_named_not_waited_on(tmp_path, monkeypatch):
    """Issue 32 (16): a DeepSpeed op build killed midway leaves ``lock``; later runs waited on it forever. A lock
    whose builder is long gone (older than STALE_LOCK_S) is now an error naming the file; a fresh one is left to
    its build. The extensions folder defaults to this Python environment's."""
    import sys
    import time

    from evaclip.engine.deepspeed_engine import STALE_LOCK_S, check_extension_builds
    from evaclip.errors import UserError

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert check_extension_builds() == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    assert check_extension_builds() == str(tmp_path)  # a build in progress: not ours to judge
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(UserError, match="lock is 1[01] minutes old"):
        check_extension_builds()
