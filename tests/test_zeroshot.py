"""Zero-shot metrics against hand-computed values; the runner against clip_benchmark on the same files;
suites with missing datasets; open_clip models through the same runner; classifier caching."""
import json
import shutil
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from evaclip.export.open_clip import export_open_clip
from evaclip.models import create_model, get_variant, model_record
from evaclip.zeroshot import build_classifier, classification_metrics, retrieval_metrics
from tests.conftest import mcfg, run_cli


def test_classification_metrics_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0],   # target 0: right
                           [0.5, 0.5, 0.0],   # target 1: tie 0/1 -> index order puts 0 first: top-1 wrong
                           [0.2, 0.3, 0.1],   # target 2: ranked last -> wrong (top-2 wrong too)
                           [0.0, 0.0, 1.0]])  # target 2: right
    targets = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(2 / 4)
    assert m["acc5"] == pytest.approx(1.0)  # 3 classes: top-5 holds everything
    # per-class recall: class 0 1/1, class 1 0/1, class 2 1/2 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_retrieval_metrics_by_hand_multi_caption_and_ties():
    img = torch.eye(3)  # image i = e_i
    # captions: 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
    txt = torch.tensor([[1.0, 0.0, 0.0],    # best: image 0
                        [0.0, 0.6, 0.8],    # best: image 2, then image 1, then image 0 (its own): rank 3
                        [0.0, 1.0, 0.0],    # best: image 1
                        [0.7, 0.0, 0.7],    # tie image 0 / image 2: index order ranks image 0 first
                        [0.0, 0.0, 1.0]])   # best: image 2
    owner = torch.tensor([0, 0, 1, 2, 2])
    m = retrieval_metrics(img, txt, owner, ks=(1, 2, 3))
    # text -> image @1: captions 0, 2, 4 right; 1 wrong; 3 loses its tie -> 3/5
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)  # caption 3 at rank 2; caption 1 at rank 3
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image -> text: scores per image over captions
    #   image 0: [1, 0, 0, .7, 0]      -> caption 0 first: hit @1
    #   image 1: [0, .6, 1, 0, 0]      -> caption 2 (its own) first: hit @1
    #   image 2: [0, .8, 0, .7, 1]     -> caption 4 (its own) first: hit @1
    assert m["text_retrieval_recall@1"] == pytest.approx(1.0)


def test_prompt_ensemble_classifier():
    class Enc:
        def __call__(self, tok):
            return tok.float()

    tok = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])  # noqa: E731
    W = build_classifier(Enc(), tok, ["ab", "abcd"], ["{c}", "x {c}"], torch.device("cpu"))
    e = F.normalize(torch.tensor([[2.0, 1.0], [4.0, 1.0]]), dim=-1).mean(0)
    assert torch.allclose(W[:, 0], e / e.norm())
    assert torch.allclose(W.norm(dim=0), torch.ones(2))


def test_a_template_without_the_class_placeholder_is_an_error():
    """Issue 32 (12): templates without {c} gave every class the same prompt, chance accuracy and an ok status."""
    tok = lambda texts: torch.tensor([[float(len(t)), 1.0] for t in texts])  # noqa: E731
    with pytest.raises(ValueError, match=r"has no \{c\}"):
        build_classifier(lambda t: t.float(), tok, ["ab", "abcd"], ["{c}", "a photo"], torch.device("cpu"))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(3)
    v = get_variant("EVA02-Ti-8-64")
    out = str(tmp_path_factory.mktemp("oc"))
    export_open_clip(create_model(v.name).state_dict(), model_record(mcfg(v.name)), out)
    return out


def _clip_benchmark(export, dataset_root, name, task, out):
    args = [sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset", f"wds/{name}", "--dataset_root",
            dataset_root, "--model", f"local-dir:{export}", "--pretrained", "none", "--model_type", "open_clip",
            "--task", task, "--no_amp", "--output", out, "--batch_size", "32", "--num_workers", "0"]
    if task == "zeroshot_retrieval":
        args += ["--recall_k", "1", "5", "10"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(out))["metrics"]


def test_runner_equals_clip_benchmark(synth_dir, export_dir, tmp_path):
    """The same export and files through our runner and through the clip_benchmark package: <= 0.1 point."""
    zs = os.path.join(synth_dir, "zeroshot")
    r = run_cli(["eval", "--model", "open_clip:EVA02-Ti-8-64", "--pretrained", export_dir, "--suite",
                 "eval/suites/quick.toml", "--datasets-root", zs, "--out", str(tmp_path / "ours")])
    assert r.returncode == 0, r.stderr
    for name, task in (("synth_shapes", "zeroshot_classification"), ("synth_retrieval", "zeroshot_retrieval")):
        ours = json.load(open(tmp_path / "ours" / f"{name}.json"))["metrics"]
        ref = _clip_benchmark(export_dir, os.path.join(zs, name), name, task, str(tmp_path / f"cb_{name}.json"))
        assert set(ref) <= set(ours)
        for k in ref:
            assert abs(100 * ours[k] - 100 * ref[k]) <= 0.1, (name, k, ours[k], ref[k])


def test_missing_dataset_is_reported_not_fatal(synth_dir, export_dir, tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\ndatasets = ["synth_shapes", "imagenet1k"]\n')
    common = ["eval", "--model", "open_clip:x", "--pretrained", export_dir, "--suite", str(suite),
              "--datasets-root", os.path.join(synth_dir, "zeroshot")]
    r = run_cli(common + ["--out", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "a" / "imagenet1k.json"))["status"] == "missing"
    assert "1 missing: imagenet1k" in r.stdout and "missing" in open(tmp_path / "a" / "results.md").read()
    r = run_cli(common + ["--out", str(tmp_path / "b"), "--strict"])
    assert r.returncode == 2 and "imagenet1k" in r.stderr and "Traceback" not in r.stderr


def test_suite_with_unknown_dataset_is_an_error(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\ndatasets = ["imagenet1k", "imagenet-z"]\n')
    from evaclip.config import ConfigError
    from evaclip.evalsuite import load_suite

    with pytest.raises(ConfigError, match="'imagenet-z' is not in the registry"):
        load_suite(str(suite))


def test_classifier_cache_is_reused(synth_dir, export_dir, tmp_path, monkeypatch):
    from evaclip import cli, zeroshot

    args = ["eval", "--model", "open_clip:x", "--pretrained", export_dir, "--suite", "eval/suites/quick.toml",
            "--datasets-root", os.path.join(synth_dir, "zeroshot"), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    first = json.load(open(tmp_path / "synth_shapes.json"))["metrics"]
    calls = []
    real = zeroshot.build_classifier
    monkeypatch.setattr(zeroshot, "build_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli.main(args) == 0
    assert not calls and json.load(open(tmp_path / "synth_shapes.json"))["metrics"] == first
    # issue 32 (3): other class names (here: the same names in another order, so every label now means another
    # class) build a new classifier; the cached one used to be reused with the old figure
    data = tmp_path / "renamed"
    shutil.copytree(os.path.join(synth_dir, "zeroshot"), data)
    names = (data / "synth_shapes" / "classnames.txt").read_text().splitlines()
    (data / "synth_shapes" / "classnames.txt").write_text("\n".join(names[1:] + names[:1]) + "\n")
    assert cli.main(args[:-4] + ["--datasets-root", str(data), "--out", str(tmp_path)]) == 0
    assert calls and json.load(open(tmp_path / "synth_shapes.json"))["metrics"] != first


def test_compare_table(tmp_path):
    for name, v in (("a", 0.5), ("b", 0.25)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"dataset": "imagenet1k", "task": "zeroshot_classification", "metrics": {"acc1": v}}))
    r = run_cli(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert r.returncode == 0 and "| imagenet1k | 50.00 | 25.00 |" in r.stdout
