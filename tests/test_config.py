"""Config: every shipped experiment/recipe/suite loads; strict errors name the key; derived values; CLI errors."""
import glob
import os
import re
import tomllib

import pytest

from evaclip.config import (ConfigError, ExperimentConfig, describe, dumps_toml, load_config, load_run_config,
                            parse_override, save_run_config, to_dict)
from evaclip.preflight import missing_inputs, resolve
from tests.conftest import REPO, run_cli

from evaclip.files import builtin_names, find

EXPERIMENTS = builtin_names("experiment")


def load_demo(overrides=()):
    """The demo experiment by its built-in name, with the data.root it needs."""
    return load_config("demo_cpu", ["data.root=/tmp/synth", *overrides])

RECIPES = builtin_names("recipe")
SUITES = builtin_names("suite")


def test_package_ships_every_repo_asset():
    """The packaged assets are the repository's top-level files (what `pip install .` carries)."""
    for kind, folder in [("experiment", "launch/experiments"), ("recipe", "data_recipes"), ("suite", "eval/suites"),
                         ("model", "launch/models")]:
        repo = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, folder, "*.toml")))
        assert repo and builtin_names(kind) == repo, kind


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_loads_and_resolves(name):
    cfg = load_config(name, ["data.root=/datasets"])
    if cfg.objective.kind == "mim" and not cfg.mim.teacher:  # mim_demo_cpu names its teacher on the command line
        cfg = load_config(name, ["data.root=/datasets", "mim.teacher=/runs/teacher"])
    if cfg.objective.kind == "distill" and not cfg.distill.teacher:  # so does distill_demo_cpu
        cfg = load_config(name, ["data.root=/datasets", "distill.teacher=/runs/teacher"])
    d = resolve(cfg, world_size=8, inputs_here=False)  # the cluster's init files are not on this machine
    assert d.global_batch == cfg.data.micro_batch_size * 8 * cfg.engine.accum_steps
    assert d.steps > 0 and d.train_samples == d.steps * d.global_batch
    for line in missing_inputs(cfg):  # ... and are named when the run would start here
        with pytest.raises(ConfigError, match=re.escape(line)):
            resolve(cfg, world_size=8)
        break


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_references_shipped_files(name):
    """Recipes, suites and DeepSpeed overlays an experiment names are built-in assets of the package."""
    cfg = load_config(name)
    for kind, ref in (("recipe", cfg.data.recipe), ("suite", cfg.eval.suite), ("overlay", cfg.engine.deepspeed_overlay)):
        if ref:
            assert find(kind, ref).startswith(os.path.dirname(find("recipe", "synthetic")).rsplit("data_recipes")[0])


def test_registry_prompt_files_exist():
    from evaclip.evalsuite import load_registry

    for d in load_registry().values():
        for path in (d.classnames, d.templates):
            if path:
                assert os.path.isabs(path) and os.path.exists(path), (d.name, path)
        if d.templates:
            assert all("{c}" in t for t in open(d.templates) if t.strip()), d.name


def test_overlay_may_not_set_what_the_experiment_decides(tmp_path):
    p = tmp_path / "o.json"
    p.write_text('{"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}')
    cfg = load_demo(["engine.kind=deepspeed", f"engine.deepspeed_overlay={p}"])
    with pytest.raises(ConfigError, match="gradient_clipping, zero_optimization.stage"):
        resolve(cfg, 2)


@pytest.mark.parametrize("path", RECIPES)
def test_every_recipe_loads(path):
    from evaclip.data.recipes import load_recipe

    r = load_recipe(path)
    w = r.weights()
    assert abs(sum(w) - 1) < 1e-9 and all(x > 0 for x in w)


@pytest.mark.parametrize("path", SUITES)
def test_every_suite_names_known_datasets(path):
    from evaclip.evalsuite import load_registry, load_suite

    reg = load_registry()
    entries = load_suite(path, reg)
    assert entries and all(e.name in reg for e in entries)


def test_experiments_exist():
    assert "demo_cpu" in EXPERIMENTS


def test_overrides_are_typed():
    cfg = load_demo(["optim.lr=3e-4", "model.vision.patch_dropout=0.5", "model.name=EVA02-B-16",
                       "optim.betas=[0.9, 0.99]", "engine.grad_clip=1", "log.progress=false"])
    assert cfg.optim.lr == 3e-4 and cfg.model.vision.patch_dropout == 0.5
    assert cfg.model.name == "EVA02-B-16" and cfg.optim.betas == [0.9, 0.99]
    assert isinstance(cfg.engine.grad_clip, float) and cfg.engine.grad_clip == 1.0
    assert cfg.log.progress is False


@pytest.mark.parametrize("override,needle", [
    ("model.vison.patch_dropout=0.5", "unknown key 'model.vison'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("run.seed=1.5", "run.seed: expected an integer"),
    ("engine.zero_stage=4", "engine.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ("log.progress=1", "log.progress: expected true or false"),
    ("optim.name=sgd", "optim.name: 'sgd' is not one of lamb, adamw"),
    ("nonsense", "must look like section.key=value"),
])
def test_strict_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_demo([override])
    assert needle in str(e.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg and str(p) in msg


def test_base_file_is_merged(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[run]\nname = "a"\nsteps = 10\n[data]\nshards = "x/{0..1}.tar"\n[optim]\nlr = 0.5\n')
    child = tmp_path / "child.toml"
    child.write_text('base = "base.toml"\n[optim]\nweight_decay = 0.2\n')
    cfg = load_config(str(child))
    assert cfg.run.name == "a" and cfg.optim.lr == 0.5 and cfg.optim.weight_decay == 0.2


def test_derived_values():
    cfg = load_config(None, ["data.shards=a/{0..1}.tar", "run.train_samples=1000", "data.micro_batch_size=16",
                             "engine.accum_steps=2", "schedule.unmasked_tuning_samples=200"])
    d = resolve(cfg, world_size=4)
    assert d.global_batch == 128 and d.steps == 8  # ceil(1000 / 128)
    assert d.unmasked_from_step == 8 - 2  # ceil(200 / 128) = 2 unmasked steps at the end
    with pytest.raises(ConfigError, match="warmup_steps"):
        resolve(load_config(None, ["data.shards=a.tar", "run.steps=5", "schedule.warmup_steps=5"]))
    with pytest.raises(ConfigError, match="run.steps or run.train_samples"):
        resolve(load_config(None, ["data.shards=a.tar"]))
    with pytest.raises(ConfigError, match="model.name"):
        resolve(load_config(None, ["data.shards=a.tar", "run.steps=2", "model.name=ViT-Z"]))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_demo()
    d = resolve(cfg, 2)
    save_run_config(str(tmp_path), cfg, d, {"git_sha": "abc"})
    back, derived = load_run_config(str(tmp_path))
    assert to_dict(back) == to_dict(cfg)
    assert derived["global_batch"] == d.global_batch and derived["git_sha"] == "abc"
    assert tomllib.loads(dumps_toml(to_dict(cfg))) == to_dict(cfg)


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=EVA02-B-16") == (["a", "b"], "EVA02-B-16")
    assert parse_override('a.b="x y"') == (["a", "b"], "x y")


def test_describe_documents_every_key():
    lines = describe()
    keys = [line.split()[0] for line in lines if line.startswith("  ")]
    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                flat.append(prefix + k)

    walk(to_dict(ExperimentConfig()))
    assert sorted(keys) == sorted(flat)
    assert all(": " in line and not line.rstrip().endswith(":") for line in lines if line.startswith("  "))


def test_cli_bad_override_is_one_clear_line():
    r = run_cli(["train", "demo_cpu", "data.root=/tmp/synth", "optim.lrr=1", "--dry-run"])
    assert r.returncode == 2
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "unknown key 'optim.lrr'" in lines[0] and "Traceback" not in r.stderr


def test_cli_bad_experiment_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[run\nname = 1\n")
    r = run_cli(["train", str(p)])
    assert r.returncode == 2 and "invalid TOML" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["train", str(tmp_path / "missing.toml")])
    assert r.returncode == 2 and "not found" in r.stderr


def test_cli_dry_run_prints_derived():
    r = run_cli(["train", "demo_cpu", "data.root=/tmp/synth", "--dry-run", "--world-size", "4",
                 "engine.kind=deepspeed", "engine.zero_stage=1"])
    assert r.returncode == 0, r.stderr
    assert "global_batch = 256" in r.stdout and '"stage": 1' in r.stdout and '"gradient_clipping"' in r.stdout


def test_dry_runs_deepspeed_config_is_the_one_a_run_here_writes():
    """--dry-run prints the DeepSpeed config adjusted to the backend a run on this machine uses (gloo without a GPU:
    ZeRO-3 gathers one blocking all-gather at a time, as ``build_engine`` writes it) and names that backend."""
    import torch

    r = run_cli(["train", "demo_cpu", "data.root=/tmp/synth", "--dry-run", "--world-size", "2", "run.device=cpu",
                 "engine.kind=deepspeed", "engine.zero_stage=3"])
    assert r.returncode == 0, r.stderr
    assert "gloo process group; a GPU run (nccl) differs in zero_optimization.stage3_allgather_sequential" in r.stdout
    assert '"stage3_allgather_sequential": true' in r.stdout
    if not torch.cuda.is_available():  # auto = cpu here
        r = run_cli(["train", "demo_cpu", "data.root=/tmp/synth", "--dry-run", "--world-size", "2",
                     "engine.kind=deepspeed", "engine.zero_stage=3"])
        assert "gloo process group" in r.stdout, r.stderr
    r = run_cli(["train", "demo_cpu", "data.root=/tmp/synth", "--dry-run", "--world-size", "2", "run.device=cpu",
                 "engine.kind=deepspeed", "engine.zero_stage=2"])  # ZeRO-2: the same config on both backends
    assert r.returncode == 0 and "(as a run on this machine writes it: gloo process group)" in r.stdout, r.stderr


def test_cli_help_is_usable():
    for args in (["--help"], ["train", "--help"], ["eval", "--help"], ["export", "--help"], ["data", "--help"],
                 ["data", "synth", "--help"]):
        r = run_cli(args)
        assert r.returncode == 0 and "usage:" in r.stdout, args


def test_the_command_a_study_spawns_runs():
    """``evaclip.study.CLI`` (how ``make capfilt`` calls ``evaclip data capfilt`` in a child process) is a runnable
    command: ``python -m evaclip`` was not (the package has no ``__main__``)."""
    import subprocess

    from evaclip.study import CLI

    r = subprocess.run([*CLI, "data", "capfilt", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--captioner" in r.stdout, r.stderr


def test_every_commands_help_renders_and_shows_no_doubled_percent():
    """Every command and subcommand's --help formats; a literal '%%' in the text is a description written as if
    argparse %-formatted it (it formats only the options' help)."""
    import argparse

    from evaclip.cli import build_parser

    def walk(p, name):
        yield name, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, q in action.choices.items():
                    yield from walk(q, f"{name} {sub}")

    seen = []
    for name, p in walk(build_parser(), "evaclip"):
        text = p.format_help()
        assert text.startswith("usage:") and "%%" not in text, name
        seen.append(name)
    assert {"evaclip data filter", "evaclip data capfilt", "evaclip train", "evaclip plan"} <= set(seen)
