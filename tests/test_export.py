"""Export contract: the open_clip folder loads with plain open_clip (and the tower with timm) and gives the
trained model's embeddings; key sets; dtype; tower selection."""
import json
import os

import pytest
import torch

import open_clip
from evaclip.checkpoint import load_weights
from evaclip.export.open_clip import export_open_clip, verify_export
from evaclip.models import create_model, get_variant, model_record
from tests.conftest import mcfg, run_cli
from tests.test_train import make_trainer


@pytest.fixture(scope="module")
def trained_run(synth_dir, tmp_path_factory):
    tr = make_trainer(synth_dir, tmp_path_factory.mktemp("runs"), "exp", steps=2)
    return tr.train()["run_dir"]


@pytest.mark.parametrize("name", ["EVA02-Ti-8-64", "EVA01-Ti-8-64", "EVA02E-Ti-8-64"])
def test_export_loads_in_open_clip_and_timm(tmp_path, name):
    torch.manual_seed(0)
    v = get_variant(name)
    sd = create_model(name).state_dict()
    export_open_clip(sd, model_record(mcfg(name)), str(tmp_path))
    diffs = verify_export(str(tmp_path), sd, model_record(mcfg(name)))
    assert set(diffs) == {"image", "text", "timm_image"} and max(diffs.values()) <= 1e-5, diffs
    cfg = json.load(open(tmp_path / "open_clip_config.json"))
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == v.timm_name
    assert cfg["preprocess_cfg"]["size"] == v.image_size
    tok = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    assert tok(["a red circle"]).shape == (1, v.context_length)


def test_export_of_a_trained_run_via_cli(trained_run, tmp_path):
    out = tmp_path / "oc"
    r = run_cli(["export", trained_run, "--out", str(out), "--verify"])
    assert r.returncode == 0, r.stderr
    assert "open_clip reload" in r.stdout
    # a fresh interpreter with only open_clip imported (the venv's import hook registers evaclip_* timm names)
    code = (f"import open_clip, torch; m, _, p = open_clip.create_model_and_transforms('local-dir:{out}'); "
            f"print(sum(x.numel() for x in m.parameters()))")
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sd, _ = load_weights(trained_run)
    assert int(res.stdout.strip().splitlines()[-1]) == sum(v.numel() for v in sd.values())


def test_export_dtype_and_towers(trained_run, tmp_path):
    from safetensors.torch import load_file

    sd, meta = load_weights(trained_run)
    export_open_clip(sd, meta["model"], str(tmp_path / "bf16"), dtype="bf16")
    oc = load_file(str(tmp_path / "bf16" / "open_clip_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in oc.values()) and oc["logit_scale"].shape == ()
    export_open_clip(sd, meta["model"], str(tmp_path / "img"), tower="image")
    files = set(os.listdir(tmp_path / "img"))
    assert "timm_image_tower" in files and "open_clip_model.safetensors" not in files
    export_open_clip(sd, meta["model"], str(tmp_path / "txt"), tower="text")
    txt = load_file(str(tmp_path / "txt" / "text_tower" / "text.safetensors"))
    assert txt and all(k.startswith("text.") for k in txt)
