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
