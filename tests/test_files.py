"""The one file loader (evaclip.files): built-in assets by name, the relative-path rule for every file kind,
strict errors; all-or-nothing writes (one atomic_write for every file evaclip publishes); and the module hygiene
it enables (no private names imported across modules)."""
import ast
import glob
import os

import pytest

from evaclip.config import load_config

from evaclip.preflight import resolve
from evaclip.files import ConfigError, asset_file, atomic_write, builtin_names, find, replace_dir, replace_file
from tests.conftest import REPO


def test_builtin_names_resolve_to_packaged_files():
    assert find("experiment", "demo_cpu") == asset_file("launch/experiments/demo_cpu.toml")
    assert find("recipe", "merged2b").endswith(os.path.join("data_recipes", "merged2b.toml"))
    assert find("suite", "quick").endswith(os.path.join("eval", "suites", "quick.toml"))
    assert find("model", "EVA02-B-16").endswith(os.path.join("launch", "models", "EVA02-B-16.toml"))
    assert find("overlay", "zero2").endswith(os.path.join("launch", "deepspeed", "zero2.json"))
    with pytest.raises(ConfigError, match=r"no built-in recipe named 'merged3b'; built-in: .*merged2b"):
        find("recipe", "merged3b")


def test_relative_paths_in_a_file_resolve_against_that_file(tmp_path, monkeypatch):
    """base, recipe, suite, model file, inits, dataset roots and shard patterns: one rule for all of them."""
    exp = tmp_path / "exps" / "sub"
    exp.mkdir(parents=True)
    (tmp_path / "exps" / "recipes").mkdir()
    (tmp_path / "exps" / "recipes" / "mine.toml").write_text(
        'name = "mine"\n[[source]]\nname = "a"\nshards = "shards/{0..1}.tar"\n[[source]]\nname = "b"\n'
        'shards = "{root}/b/{0..1}.tar"\n')
    (tmp_path / "exps" / "base.toml").write_text(
        'base = "sub/parent.toml"\n[data]\nrecipe = "recipes/mine.toml"\nroot = "data"\n')
    (exp / "parent.toml").write_text(
        '[model]\ninit = "../weights/w.safetensors"\n[model.vision]\ninit = "/abs/mim.pt"\n'
        '[eval]\nsuite = "quick"\ndatasets_root = "{root}/zs"\n[run]\nsteps = 1\n')
    monkeypatch.chdir(tmp_path / "exps" / "sub")  # the current directory plays no part for paths in files
    cfg = load_config(str(tmp_path / "exps" / "base.toml"))
    d = str(tmp_path / "exps")
    assert cfg.data.recipe == os.path.join(d, "recipes", "mine.toml")
    assert cfg.data.root == os.path.join(d, "data")
    assert cfg.model.init == os.path.join(d, "weights", "w.safetensors")  # relative to parent.toml's folder
    assert cfg.model.vision.init == "/abs/mim.pt" and cfg.eval.suite == "quick"
    assert cfg.eval.datasets_root == "{root}/zs"
    from evaclip.data.recipes import load_recipe

    r = load_recipe(cfg.data.recipe)
    assert r.source[0].shards == os.path.join(d, "recipes", "shards", "{0..1}.tar")
    assert r.source[1].shards == "{root}/b/{0..1}.tar"


def test_relative_paths_on_the_command_line_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo_cpu", ["data.root=d", "model.init=w.pt", "data.recipe=synthetic",
                                   "checkpoint.resume=auto", "data.shards=pipe:cat x.tar"])
    assert cfg.data.root == str(tmp_path / "d") and cfg.model.init == str(tmp_path / "w.pt")
    assert cfg.data.recipe == "synthetic" and cfg.checkpoint.resume == "auto"
    assert cfg.data.shards == "pipe:cat x.tar"  # schemes are left alone


def test_a_missing_referenced_file_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.recipe: recipe file not found: .*nope.toml"):
        resolve(load_config("demo_cpu", ["data.root=d", "data.recipe=nope.toml"]))
    with pytest.raises(ConfigError, match=r"eval.suite: no built-in suite named 'nope'"):
        resolve(load_config("demo_cpu", ["data.root=d", "eval.suite=nope"]))
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'EVA03'"):
        resolve(load_config("demo_cpu", ["data.root=d", "model.name=EVA03"]))


def test_every_typed_file_kind_rejects_unknown_keys(tmp_path):
    from evaclip.data.recipes import load_recipe
    from evaclip.evalsuite import load_registry, load_suite

    bad = tmp_path / "x.toml"
    bad.write_text('colour = "red"\n')
    for load in (load_recipe, load_suite, load_registry, lambda p: load_config(p)):
        with pytest.raises(ConfigError, match=r"x.toml: unknown key 'colour'"):
            load(str(bad))


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in glob.glob(os.path.join(REPO, "evaclip", "**", "*.py"), recursive=True):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("evaclip"):
                offenders += [f"{os.path.relpath(path, REPO)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and node.module != "evaclip"]
    assert not offenders, offenders


def test_builtin_assets_are_listed():
    assert {"demo_cpu", "eva02_clip_b16"} <= set(builtin_names("experiment"))
    assert {"quick", "eva27", "retrieval"} <= set(builtin_names("suite"))
    assert {"EVA02-B-16", "EVA02-Ti-8-64"} <= set(builtin_names("model"))


def test_atomic_write_publishes_whole_files_and_leaves_the_old_one_on_an_error(tmp_path):
    path = str(tmp_path / "a.json")
    with atomic_write(path) as f:
        f.write("one")
    assert open(path).read() == "one"
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half of tw")
            raise RuntimeError("the writer failed")
    assert open(path).read() == "one" and os.listdir(tmp_path) == ["a.json"]  # no temporary file left
    with atomic_write(path, "wb") as f:
        assert open(path).read() == "one"  # readers see the old file meanwhile
        f.write(b"two")
    assert open(path).read() == "two" and os.listdir(tmp_path) == ["a.json"]


def test_replace_file_and_replace_dir_publish_what_a_writer_finished(tmp_path):
    (tmp_path / ".t.tmp").write_text("x")
    replace_file(str(tmp_path / ".t.tmp"), str(tmp_path / "t"))
    assert (tmp_path / "t").read_text() == "x" and not (tmp_path / ".t.tmp").exists()
    for content in ("old", "new"):
        (tmp_path / ".d.tmp").mkdir()
        (tmp_path / ".d.tmp" / content).write_text(content)
        replace_dir(str(tmp_path / ".d.tmp"), str(tmp_path / "d"))
    assert os.listdir(tmp_path / "d") == ["new"] and not (tmp_path / ".d.tmp").exists()


def test_files_are_published_only_through_evaclip_files():
    """Every rename into place goes through files.atomic_write / replace_file / replace_dir (fsync of the file and
    the folder), not a hand-written temp-and-rename."""
    sources = glob.glob(os.path.join(REPO, "evaclip", "**", "*.py"), recursive=True)
    hits = [f"{os.path.relpath(p, REPO)}:{i}" for p in sources if not p.endswith(os.path.join("evaclip", "files.py"))
            for i, line in enumerate(open(p), 1) if "os.replace(" in line or "os.rename(" in line]
    assert not hits, hits
