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


CASES = [  # (id, argv from tmp_path, the input files, what the message must name)
    ("world-size-negative", lambda t: ["train", "demo_cpu", "--dry-run", "--world-size", "-1", "data.root=x"],
     lambda t: [], "--world-size"),
    ("synth-zero-shards", lambda t: ["data", "synth", "--out", str(t / "s"), "--shards", "0"], lambda t: [],
     "--shards"),
    ("synth-zero-per-shard", lambda t: ["data", "synth", "--out", str(t / "s"), "--per-shard", "0"], lambda t: [],
     "--per-shard"),
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
    last = err[-1] if err else ""
    assert "Traceback" not in "\n".join(err) and last.startswith("evaclip ") and names in last, err
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
