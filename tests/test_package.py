"""The package as a user gets it: a non-editable wheel install run from an empty folder; user-defined model
files through training, checkpoint rebuild and open_clip export; the one model factory's round trip."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, tiny_overrides

USER_MODEL = """\
# a user's own architecture: 32 px, 4x4 patches (64 tokens), width 192, 4 blocks; text width 128
name = "my-eva-192"
embed_dim = 96

[vision]
img_size = 32
patch_size = 4
embed_dim = 192
depth = 4
num_heads = 3
qkv_fused = false
mlp_ratio = 2.0
swiglu_mlp = true
scale_mlp = true
use_rot_pos_emb = true
ref_feat_shape = [8, 8]

[text]
context_length = 32
width = 128
heads = 4
layers = 2

[preprocess]
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
interpolation = "bilinear"
"""


def _run(cmd, cwd, env, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_install_works_from_an_empty_folder(tmp_path):
    """pip install --no-deps . (not editable) into a new venv, then synth -> train -> eval -> export by the
    built-in names of the experiment and the suite, from a folder that holds nothing of the repository. The new
    venv sees this environment's locked dependencies (pip included) through a .pth line (installing the lock
    again costs minutes; `make setup` installs it on every CI run), never its editable evaclip: a .pth adds a
    folder to the path without running the .pth files in it, and the venv's own site-packages comes first."""
    import sysconfig

    src = tmp_path / "src"  # a copy of the files git has (or would add): the build never touches the checkout
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True).stdout.split("\0")
    for f in filter(None, files):
        dst = src / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(os.path.join(REPO, f)):
            os.symlink(os.readlink(os.path.join(REPO, f)), dst)
        elif os.path.exists(os.path.join(REPO, f)):
            shutil.copy2(os.path.join(REPO, f), dst)
    venv = tmp_path / "venv"
    # --without-pip: the venv's bundled pip / setuptools would come before the locked ones (and lack `wheel`)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, os.environ)
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, os.environ).stdout
    with open(os.path.join(site.strip(), "locked_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    # --no-build-isolation: build with the locked setuptools instead of fetching one
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--no-build-isolation",
          str(src)], src, env)
    work = tmp_path / "empty"
    work.mkdir()
    evaclip = str(venv / "bin" / "evaclip")
    loc = _run([str(venv / "bin" / "python"), "-c", "import evaclip; print(evaclip.__file__)"], work, env).stdout
    assert str(venv) in loc and REPO not in loc  # the installed copy, not the checkout
    _run([evaclip, "data", "synth", "--out", "d"], work, env)
    _run([evaclip, "train", "demo_cpu", "run.steps=20", "data.root=d", "data.workers=1", "log.progress=false"],
         work, env)
    r = _run([evaclip, "eval", "--checkpoint", "runs/demo_cpu", "--suite", "quick", "--datasets-root", "d/zeroshot",
              "--out", "results"], work, env)
    assert "synth_shapes" in r.stdout and "synth_retrieval" in r.stdout and "missing" not in r.stdout.split("results:")[0]
    r = _run([evaclip, "export", "runs/demo_cpu", "--out", "export", "--verify"], work, env)
    assert "open_clip reload" in r.stdout
    assert os.path.exists(work / "export" / "open_clip_model.safetensors")
    assert json.load(open(work / "results" / "synth_shapes.json"))["status"] == "ok"


@pytest.fixture(scope="module")
def user_run(synth_dir, tmp_path_factory):
    """Train the user's model file (non-default knobs everywhere) for a few steps."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer

    tmp = tmp_path_factory.mktemp("user_model")
    (tmp / "models").mkdir()
    (tmp / "models" / "my-eva-192.toml").write_text(USER_MODEL)
    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp / "runs"), "user", steps=3, extra=[
        f"model.model_dir={tmp / 'models'}", "model.name=my-eva-192", "model.max_logit_scale=50.0",
        "model.init_temperature=0.05", "model.vision.attn_impl=sdpa_math", "model.text.act=quick_gelu",
        "model.use_logit_bias=true", "model.init_logit_bias=-5.0"]))
    tr = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)
    summary = tr.train()
    return tr, summary


def test_user_model_file_trains_and_is_rebuilt_from_its_checkpoint_alone(user_run):
    """train -> checkpoint -> rebuild from the checkpoint's record (the model file no longer needed): the same
    state dict keys and shapes, the same knobs, the same forward outputs (to 1e-5: two models with equal weights
    differed in the last bits here, 1e-6 in two of three runs of this file on one day; a knob the record lost moves
    the normalized features far more)."""
    from evaclip.checkpoint import load_weights
    from evaclip.models import model_from_record

    tr, summary = user_run
    sd, meta = load_weights(summary["checkpoint"])
    os.remove(os.path.join(tr.cfg.model.model_dir, "my-eva-192.toml"))
    rebuilt = model_from_record(meta["model"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    rebuilt.load_state_dict(sd)
    trained = tr.model.eval()
    rebuilt.eval()
    assert rebuilt.max_logit_scale == trained.max_logit_scale == pytest.approx(__import__("math").log(50.0))
    assert rebuilt.visual.trunk.blocks[0].attn.attn_impl == "sdpa_math"
    assert rebuilt.visual.trunk.patch_embed.img_size == (32, 32) and rebuilt.visual.trunk.embed_dim == 192
    torch.manual_seed(0)
    img, txt = torch.randn(3, 3, 32, 32), torch.randint(1, 49000, (3, 32))
    with torch.no_grad():
        a, b = trained(img, txt), rebuilt(img, txt)
    assert set(a) == set(b) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k


def test_user_model_export_reloads_in_open_clip_and_timm(user_run, tmp_path):
    from evaclip.checkpoint import load_weights
    from evaclip.export.open_clip import export_open_clip, verify_export

    _, summary = user_run
    sd, meta = load_weights(summary["checkpoint"])
    out = str(tmp_path / "export")
    export_open_clip(sd, meta["model"], out)
    diffs = verify_export(out, sd, meta["model"])
    assert set(diffs) == {"image", "text", "timm_image"} and max(diffs.values()) <= 1e-5, diffs
    cfg = json.load(open(os.path.join(out, "open_clip_config.json")))
    assert cfg["evaclip"]["model"]["arch"]["vision"]["embed_dim"] == 192
    assert cfg["preprocess_cfg"]["interpolation"] == "bilinear" and cfg["preprocess_cfg"]["mean"] == [0.5] * 3
    # a fresh interpreter that imports only open_clip (no evaclip model registry involved)
    code = (f"import open_clip; m = open_clip.create_model('local-dir:{out}'); "
            "print(m.visual.trunk.embed_dim, len(m.visual.trunk.blocks))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["192", "4"], r.stderr[-2000:]


def test_every_builtin_model_file_builds_on_meta_to_its_published_size():
    from evaclip.models import create_model, list_models
    from evaclip.models.registry import get_variant

    checked = 0
    for name in list_models():
        v = get_variant(name)
        n = sum(p.numel() for p in create_model(name, device="meta").parameters())
        if v.published_params:
            assert abs(n - v.published_params) / v.published_params < 0.01, (name, n, v.published_params)
            checked += 1
    assert checked >= 7


def test_a_bad_model_file_names_the_key(tmp_path):
    from evaclip.files import ConfigError
    from evaclip.models.registry import load_model_file

    p = tmp_path / "bad.toml"
    p.write_text(USER_MODEL.replace("num_heads = 3", "num_head = 3"))
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'vision.num_head'; valid keys in \[vision\]"):
        load_model_file(str(p))
    p.write_text(USER_MODEL.replace("depth = 4", 'depth = "four"'))
    with pytest.raises(ConfigError, match="vision.depth: expected int"):
        load_model_file(str(p))
    p.write_text(USER_MODEL.replace('interpolation = "bilinear"', 'interpolation = "lanczos"'))
    with pytest.raises(ConfigError, match="preprocess.interpolation"):
        load_model_file(str(p))


def test_models_cli_lists_builtins_and_user_files(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "my.toml").write_text(USER_MODEL)
    r = run_cli(["models"])
    assert r.returncode == 0 and "EVA02-B-16" in r.stdout and "149.7M" in r.stdout
    r = run_cli(["models", str(tmp_path)])
    assert r.returncode == 0 and "my-eva-192" in r.stdout, r.stderr


def _lint_imports(root: str) -> subprocess.CompletedProcess:
    """import-linter over the evaclip package found first on the path under ``root`` (contracts: pyproject.toml)."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([lint, "--no-cache", "--config", os.path.join(root, "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layering_holds_and_an_upward_import_breaks_it(tmp_path):
    """The layers contracts pass on the tree; a copy where files.py (the bottom layer) imports the trainer, and
    train/healing.py (a part of training) the loop, breaks both."""
    r = _lint_imports(REPO)
    assert r.returncode == 0 and "2 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    copy = tmp_path / "tree"
    shutil.copytree(os.path.join(REPO, "evaclip"), copy / "evaclip", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "pyproject.toml"), copy / "pyproject.toml")
    files_py = copy / "evaclip" / "files.py"
    files_py.write_text(files_py.read_text() + "\n\ndef _planted():\n    import evaclip.train.trainer  # noqa: F401\n")
    healing_py = copy / "evaclip" / "train" / "healing.py"
    healing_py.write_text(healing_py.read_text() + "\n\ndef _planted():\n    import evaclip.train.trainer  # noqa: F401\n")
    r = _lint_imports(str(copy))
    assert r.returncode != 0 and "0 kept, 2 broken" in r.stdout, r.stdout[-3000:]
    assert "evaclip.files -> evaclip.train.trainer" in r.stdout
    assert "evaclip.train.healing -> evaclip.train.trainer" in r.stdout


def _python_files(*roots):
    import pathlib

    return [p for r in roots for p in sorted(pathlib.Path(REPO, r).rglob("*.py"))]


def test_no_module_over_400_lines_and_no_function_over_60_unless_it_says_why():
    """Issue 26's size rule over evaclip/: a module is at most 400 lines; a function at most 60, or its docstring
    holds "Long because" and the reason."""
    import ast

    too_long = []
    for p in _python_files("evaclip"):
        src = p.read_text()
        if src.count("\n") > 400:
            too_long.append(f"{p.relative_to(REPO)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60 and "Long because" not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long


def test_no_private_name_crosses_a_module():
    """No ``from <our module> import _name`` and no ``<our module>._name`` outside the module that defines it,
    in evaclip/, tests/ and bench/ (third-party privates are the peers' business, and named where used)."""
    import ast

    ours = ("evaclip", "tests", "bench")
    crossing = []
    for p in _python_files(*ours):
        tree = ast.parse(p.read_text())
        modules = {}  # local name -> our module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_shim":
                        crossing.append(f"{p.relative_to(REPO)}:{node.lineno} from {node.module} import {a.name}")
                    modules[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ours:
                        modules[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{p.relative_to(REPO)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not crossing, crossing


def test_evaclip_imports_sit_at_the_top_unless_a_comment_says_why():
    """Issue 26's import rule: an evaclip module imported inside a function is preceded by a comment giving the
    reason (a real cycle, an import hook), except in the CLI, whose commands import their work inside themselves so
    that a command loads only what it runs (importing the CLI loads no torch: checked in a fresh interpreter)."""
    import ast

    hidden = []
    for p in _python_files("evaclip"):
        if "cli" in p.relative_to(REPO).parts:
            continue
        lines = p.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(n.split(".")[0] == "evaclip" for n in names) and \
                        not lines[node.lineno - 2].strip().startswith("#"):
                    hidden.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert not hidden, hidden
    probe = "import sys, evaclip.cli; print(sorted(m for m in ('torch', 'deepspeed', 'open_clip') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
