"""CoCa (objective.kind = "coca"): the chunked caption cross-entropy against a float64 reference written from the
formula, generation with the key/value cache against without, the model record, and training runs (accumulation,
ZeRO-2 on 2 gloo ranks with the ring loss and token dropping, resume)."""
import glob
import json
import os

import pytest
import torch

from evaclip.losses.caption import chunked_token_ce
from tests.test_distributed import torchrun

COCA = ["objective.kind=coca", "coca.decoder_layers=1", "coca.n_queries=4", "coca.ce_chunk=100"]


def reference_token_ce(hidden, weight, labels, pad, e):
    """Per-token (1 - e) * (lse - z_y) + e * (lse - mean z), 0 at padding; float64, explicit exp / log / sums."""
    z = hidden.double() @ weight.double()  # [n, V]
    m = z.max(dim=1, keepdim=True).values
    lse = (m + torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))).squeeze(1)
    target = torch.stack([z[i, int(y)] for i, y in enumerate(labels)])
    loss = (1 - e) * (lse - target) + e * (lse - z.sum(dim=1) / z.shape[1])
    return loss * (labels != pad).double()


def ce_inputs(dtype, n=29, w=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(w, v, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    labels = torch.randint(1, v, (n,), generator=g)
    labels[::5] = 0  # padding
    return hidden, weight, labels, torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_chunked_caption_ce_equals_the_float64_reference(smoothing, chunk, dtype, tol):
    """Per-token values and the gradients of hidden states and projection (under random upstream gradients):
    float64 <= 1e-12, fp32 <= 1e-6 relative to the largest value; and PyTorch's cross_entropy agrees."""
    hidden, weight, labels, up = ce_inputs(dtype)
    got = chunked_token_ce(hidden, weight, labels, 0, smoothing, chunk)
    (got.double() * up).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = reference_token_ce(h64, w64, labels, 0, smoothing)
    (ref * up).sum().backward()
    for a, b in ((got, ref), (hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert (a.double() - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
    peer = torch.nn.functional.cross_entropy(h64.detach() @ w64.detach(), labels, ignore_index=0,
                                             label_smoothing=smoothing, reduction="none")
    assert torch.allclose(ref.detach(), peer, atol=1e-12)


def tiny_coca(seed=0, layers=2, queries=8):
    from evaclip.models import create_model

    torch.manual_seed(seed)
    return create_model("EVA02-Ti-8-64", coca={"decoder_layers": layers, "n_queries": queries}).eval()


def test_generation_with_the_kv_cache_equals_without():
    """The cached stepper's logits along a prompt fed in pieces == the whole prefix each time (<= 1e-5); greedy,
    beam and (peaked) top-p captions are the same token for token."""
    from evaclip.models.generate import generate

    model, img = tiny_coca(), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seq = torch.randint(100, 5000, (3, 9), generator=torch.Generator().manual_seed(2))
    seq[:, 0] = 49406
    with torch.no_grad():
        _, context = model.image_context(img)
        step = model.caption_stepper(context)
        diffs = [(step(seq[:, :3]) - model.caption_logits(context, seq[:, :3])).abs().max()]
        for t in range(3, 9):
            diffs.append((step(seq[:, t:t + 1]) - model.caption_logits(context, seq[:, :t + 1])).abs().max())
    assert max(diffs).item() <= 1e-5
    for method, kw in (("greedy", {}), ("beam", {"beams": 3}), ("top_p", {"temperature": 0.05, "seed": 3})):
        with_cache = generate(model, img, 49406, 49407, max_len=12, method=method, cache=True, **kw)
        without = generate(model, img, 49406, 49407, max_len=12, method=method, cache=False, **kw)
        assert with_cache == without and all(len(c) == 11 or 49407 not in c for c in with_cache), method


def test_a_coca_record_rebuilds_the_same_model_and_every_parameter_gets_a_gradient():
    from evaclip.config import ModelConfig
    from evaclip.losses import ContrastiveLoss
    from evaclip.models import CoCa, model_from_record, model_record

    model = tiny_coca().train()
    record = model_record(ModelConfig(name="EVA02-Ti-8-64"), extras={"coca": {"decoder_layers": 2, "n_queries": 8}})
    again = model_from_record(json.loads(json.dumps(record)))
    assert isinstance(again, CoCa)
    again.load_state_dict(model.state_dict(), strict=True)
    text = torch.randint(1, 49000, (4, 32))
    out = model(torch.randn(4, 3, 64, 64), text)
    assert out["caption_tokens"].tolist() == [31] * 4
    loss = ContrastiveLoss("clip", "local")(out["image_features"], out["text_features"], out["logit_scale"])
    (loss + out["caption_nll"].sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def coca_trainer(synth_dir, tmp_path, name="coca", steps=4, extra=()):
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.conftest import tiny_overrides

    cfg = load_config("demo_cpu", tiny_overrides(synth_dir, str(tmp_path), name, steps, [*COCA, *extra]))
    return Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)


@pytest.mark.parametrize("impl", ["local", "ring"])
def test_coca_accumulation_equals_the_big_batch(synth_dir, tmp_path, impl):
    """4 micro-batches of 8 == one batch of 32 (float64, <= 1e-6 after 2 steps, 50% token dropping): each
    micro-batch's caption loss is weighted by the step's token count, not its own."""
    from tests.test_train import accumulated_minus_big_batch

    diff = accumulated_minus_big_batch(lambda name, accum: coca_trainer(
        synth_dir, tmp_path, name, extra=[f"engine.accum_steps={accum}", "engine.grad_clip=0", f"loss.impl={impl}",
                                          "model.vision.patch_dropout=0.5"]))
    assert diff <= 1e-6, diff


def test_a_coca_run_logs_both_losses_and_resumes(synth_dir, tmp_path):
    acc = ["checkpoint.every_steps=2", "engine.accum_steps=2"]
    tr = coca_trainer(synth_dir, tmp_path, steps=3, extra=acc)
    run = tr.train()["run_dir"]
    recs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if "train/loss" in x]
    assert len(recs) == 3
    for r in recs:  # clip_weight 1, caption_weight 2 (the defaults)
        assert abs(r["train/loss"] - r["train/contrastive_loss"] - 2 * r["train/caption_loss"]) < 1e-5 * r["train/loss"]
    with pytest.raises(Exception, match="coca.decoder_layers"):
        coca_trainer(synth_dir, tmp_path, steps=4, extra=[*acc, "checkpoint.resume=auto", "coca.decoder_layers=2"]).train()
    summary = coca_trainer(synth_dir, tmp_path, steps=4, extra=[*acc, "checkpoint.resume=auto"]).train()
    assert summary["steps"] == 4 and summary["checkpoint"].endswith("step-00000004")


@pytest.mark.parametrize("override,needle", [
    (["model.text.kind=hf", "model.text.hf_path=/nowhere"], "model.text.kind"),
    (["engine.compile=towers"], "engine.compile"),
    (["coca.caption_weight=0", "coca.clip_weight=0"], "coca.caption_weight"),
    (["coca.label_smoothing=1.0"], "coca.label_smoothing"),
    (["distill.teacher=/x"], "distill.teacher"),
])
def test_coca_config_errors_name_the_key(synth_dir, tmp_path, override, needle):
    from evaclip.config import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        coca_trainer(synth_dir, tmp_path, extra=override)


@pytest.mark.dist
@pytest.mark.slow
def test_coca_under_zero2_on_two_ranks_with_accumulation_and_the_ring_equals_one_process(synth_dir, tmp_path):
    """10 steps of DeepSpeed ZeRO-2 + LAMB on 2 gloo ranks, 2 accumulation steps each, ring loss and 50% token
    dropping == the plain engine in one process on the whole batch with the local loss (<= 1e-6)."""
    from evaclip.config import load_config
    from evaclip.preflight import resolve
    from evaclip.train import Trainer
    from tests.dist_worker import run_steps, train_overrides
    from tests.test_distributed import EXACT

    shard = os.path.join(synth_dir, "train", "00000.tar")
    common = [*COCA, "model.vision.patch_dropout=0.5", "optim.name=lamb", *EXACT]
    cfg = load_config(None, train_overrides(shard, str(tmp_path / "ref"), ["data.micro_batch_size=8", *common]))
    tr = Trainer(cfg, resolve(cfg, 1), log=lambda *a, **k: None)
    ref_losses = run_steps(tr, 0, 1)
    out = str(tmp_path / "z2.pt")
    torchrun(["tests/dist_worker.py", "train", out, shard, "engine.kind=deepspeed", "engine.zero_stage=2",
              "engine.accum_steps=2", "loss.impl=ring", *common])
    got = torch.load(out)
    assert max(abs(a - b) for a, b in zip(got["losses"], ref_losses)) <= 1e-5
    ref = tr.model.state_dict()
    assert set(got["weights"]) == set(ref)
    assert max((got["weights"][k].float() - ref[k].float()).abs().max().item() for k in ref) <= 1e-6


# ------------------------------------------------------------------------------------- export and captioning
@pytest.fixture(scope="module")
def coca_run(synth_dir, tmp_path_factory):
    return coca_trainer(synth_dir, tmp_path_factory.mktemp("cocarun"), steps=2).train()["run_dir"]


def test_a_coca_export_loads_in_open_clip_and_captions_like_its_run(coca_run, synth_dir, tmp_path):
    """`evaclip export --verify` (open_clip loads the CLIP strictly, embeddings equal) writes the decoder into
    caption_decoder/; `evaclip caption` on the export writes the run's own captions, one JSON line per image."""
    from evaclip.captioning import iter_images, load_captioner
    from tests.conftest import run_cli

    exp, shard = str(tmp_path / "exp"), os.path.join(synth_dir, "zeroshot", "synth_shapes", "test", "0.tar")
    r = run_cli(["export", coca_run, "--out", exp, "--verify"])
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(exp, "caption_decoder", "model.safetensors"))
    images = [im for _, im in iter_images([shard])][:8]
    assert load_captioner(exp).caption(images, "beam") == load_captioner(coca_run).caption(images, "beam")
    out = str(tmp_path / "caps.jsonl")
    r = run_cli(["caption", "--model", exp, shard, "--out", out, "--batch-size", "16"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == sum(1 for _ in iter_images([shard])) and all(set(x) == {"image", "caption"} for x in lines)
    assert len({x["image"] for x in lines}) == len(lines) and all(x["image"].startswith(shard + ":") for x in lines)


def test_caption_skips_unreadable_images_and_refuses_a_model_without_a_decoder(coca_run, mim_teacher, tmp_path):
    from PIL import Image

    from tests.conftest import run_cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "good.png")
    (folder / "bad.jpg").write_bytes(b"not an image")
    r = run_cli(["caption", "--model", coca_run, str(folder)])
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["image"] for x in r.stdout.splitlines()] == [str(folder / "good.png")]
    assert "skipped (unreadable image)" in r.stderr and "bad.jpg" in r.stderr
    r = run_cli(["caption", "--model", mim_teacher, str(folder)])
    assert r.returncode != 0 and "caption_decoder" in r.stderr and "Traceback" not in r.stderr


def test_caption_accuracy_scores_every_held_out_image_and_the_studies_refuse_other_data(coca_run, synth_dir, tmp_path):
    from evaclip import capfilt_study, coca_study, distill_study
    from evaclip.captioning import iter_images

    shapes = os.path.join(synth_dir, "zeroshot", "synth_shapes")
    acc = coca_study.caption_accuracy(coca_run, shapes)
    assert acc["images"] == sum(1 for _ in iter_images(glob.glob(os.path.join(shapes, "test", "*.tar"))))
    assert 0.0 <= acc["accuracy"] <= 1.0 and len(acc["examples"]) == 6
    for study in (coca_study, distill_study, capfilt_study):  # the test data is smaller than `data synth`'s default
        assert study.main(["--data", synth_dir, "--out", str(tmp_path / "s")]) == 2


def test_the_capfilt_study_moves_the_share_of_captions_it_says_and_judges_pairs_by_the_samples_truth(synth_dir,
                                                                                                     tmp_path):
    """The noisy input of `make capfilt`: the same images, metadata and captions (as a multiset), 30% of the
    captions on other images; every synthetic caption names its image (pairs all correct), the noisy ones about
    70% (a moved caption is right only where the other image has the same colour and shape); the control arm's
    recipe names the same shards of the synth data, every pair right."""
    from evaclip import capfilt_study
    from evaclip.data.shards import iter_tar_samples
    from evaclip.data.tools import expand_sources

    recipe, control = capfilt_study.move_captions(synth_dir, str(tmp_path / "noisy"), 0.3, 0, shards=4)
    before = [s for u in sorted(glob.glob(os.path.join(synth_dir, "train", "*.tar"))) for s in iter_tar_samples(u)]
    after = [s for u in sorted(glob.glob(str(tmp_path / "noisy" / "train" / "*.tar"))) for s in iter_tar_samples(u)]
    assert [(s["__key__"], s["jpg"], s["json"]) for s in after] == [(s["__key__"], s["jpg"], s["json"]) for s in before]
    assert sorted(s["txt"] for s in after) == sorted(s["txt"] for s in before)
    moved = sum(a["txt"] != b["txt"] for a, b in zip(after, before))
    assert round(0.3 * len(before)) - 3 <= moved <= round(0.3 * len(before))  # equal captions may swap places
    assert capfilt_study.pairs_correct(os.path.join(synth_dir, "recipe.toml")) == 1.0
    assert 0.69 <= capfilt_study.pairs_correct(recipe) <= 0.8
    # the control arm (the study's ceiling): the same 4 shards of the input with their own captions
    assert capfilt_study.pairs_correct(control) == 1.0
    assert sorted(expand_sources(control, str(tmp_path))[0][1]) == sorted(glob.glob(os.path.join(synth_dir, "train",
                                                                                                 "*.tar")))[:4]


def test_caption_scores_are_pycocoevalcaps_on_lowercased_words():
    """A caption equal to a reference scores BLEU-4 1 and ROUGE-L 1 whatever its case and punctuation; a caption
    sharing no word scores 0; the figures are pycocoevalcap's scorers' on the normalised words."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from evaclip.caption_eval import caption_scores

    refs = {0: ["a red circle in the top left", "red circle, top left"], 1: ["a big blue square"],
            2: ["the green cross sits in the middle"]}
    preds = {0: "A red circle in the top-left.", 1: "yellow triangle", 2: "the green cross in the middle"}
    metrics, skipped = caption_scores(preds, refs)
    assert "spice" in skipped and ("meteor" in metrics) != ("meteor" in skipped)
    gts = {0: ["a red circle in the top left", "red circle top left"], 1: ["a big blue square"],
           2: ["the green cross sits in the middle"]}
    res = {0: ["a red circle in the top left"], 1: ["yellow triangle"], 2: ["the green cross in the middle"]}
    assert metrics["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-12)
    assert metrics["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    alone, _ = caption_scores({0: preds[0]}, refs)
    assert alone["bleu4"] == pytest.approx(1.0, abs=1e-6) and alone["rouge_l"] == pytest.approx(1.0)
    none, _ = caption_scores({1: preds[1]}, refs)
    assert none["bleu1"] < 1e-6 and none["rouge_l"] == 0.0


def test_the_captions_suite_scores_a_coca_and_names_a_clip_as_the_error(coca_run, mim_teacher, synth_dir, tmp_path):
    from tests.conftest import run_cli

    root = os.path.join(synth_dir, "zeroshot")
    r = run_cli(["eval", "--checkpoint", coca_run, "--suite", "captions", "--datasets-root", root,
                 "--out", str(tmp_path / "ev")])
    assert r.returncode == 0, r.stderr
    (res,) = [json.load(open(p)) for p in glob.glob(str(tmp_path / "ev" / "*.json")) if "synth_captions" in p]
    assert res["status"] == "ok" and res["task"] == "captioning"
    assert {"bleu4", "rouge_l", "cider"} <= set(res["metrics"]) and "spice" in res["skipped_metrics"]
    r = run_cli(["eval", "--model", "open_clip:export", "--pretrained", mim_teacher, "--suite", "captions",
                 "--datasets-root", root, "--out", str(tmp_path / "ev2")])
    assert "no caption decoder" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ CapFilt
def capfilt_run(coca_run, shard, out, keep="best", threshold=0.0, captions=2):
    from evaclip.captioning import load_captioner
    from evaclip.curation.capfilt import capfilt
    from evaclip.encoders import load_source

    cap, scorer = load_captioner(coca_run), load_source(coca_run)
    settings = {"captioner": coca_run, "scorer": "", "scorer_identity": scorer.identity, "captions": captions,
                "top_p": 0.9, "max_len": 8, "keep": keep, "threshold": threshold, "seed": 0}
    return capfilt(shard, "", cap, scorer, out, settings, batch_size=32, workers=0), scorer


def read_shard(path):
    from evaclip.data.shards import iter_tar_samples

    return list(iter_tar_samples(path))


def test_capfilt_keeps_by_its_rule_records_every_scored_candidate_and_copies_the_rest(coca_run, synth_dir, tmp_path):
    """best: one sample out per sample in, its caption the top-scoring candidate, the scores the scorer's cosines
    (recomputed here); image and .json members byte for byte; the same run twice writes the same bytes; a rerun
    skips the finished shard; a rerun with another rule is refused. both (threshold -1): two samples each;
    original with an unreachable threshold: every caption synthetic."""
    import io

    import torch.nn.functional as F
    from PIL import Image

    from evaclip.data.transforms import eval_transform
    from evaclip.errors import UserError

    shard = os.path.join(synth_dir, "train", "00000.tar")
    res, scorer = capfilt_run(coca_run, shard, str(tmp_path / "a"))
    (out_shard,) = glob.glob(str(tmp_path / "a" / "shards" / "*.tar"))
    given, got = read_shard(shard), read_shard(out_shard)
    assert res["written"] == res["samples"] == len(given) == len(got) and res["recipe"]
    t = eval_transform(scorer.image_size, scorer.mean, scorer.std, interpolation=scorer.interpolation)
    for raw, new in zip(given[:4], got[:4]):
        rec = json.loads(new["capfilt.json"])
        texts = [rec["original"]["text"]] + [c["text"] for c in rec["synthetic"]]
        scores = [rec["original"]["score"]] + [c["score"] for c in rec["synthetic"]]
        assert len(texts) == 3 and texts[0] == raw["txt"].decode() and new["txt"].decode() == texts[scores.index(max(scores))]
        with torch.no_grad():
            fi = F.normalize(scorer.encode_image(t(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))[None]), dim=-1)
            ft = F.normalize(scorer.encode_text(scorer.tokenizer(texts)), dim=-1)
        assert torch.allclose((ft @ fi[0]).double(), torch.tensor(scores, dtype=torch.float64), atol=1e-5)
        assert new["jpg"] == raw["jpg"] and new["json"] == raw["json"]
    again, _ = capfilt_run(coca_run, shard, str(tmp_path / "b"))
    assert open(out_shard, "rb").read() == open(out_shard.replace("/a/", "/b/"), "rb").read()
    rerun, _ = capfilt_run(coca_run, shard, str(tmp_path / "a"))
    assert rerun["done_before"] == 1 and rerun["shards"] == 0
    with pytest.raises(UserError, match="keep"):
        capfilt_run(coca_run, shard, str(tmp_path / "a"), keep="original")
    both, _ = capfilt_run(coca_run, shard, str(tmp_path / "both"), keep="both", threshold=-1.0)
    assert both["written"] == 2 * len(given) and both["kept"] == {"original": len(given), "synthetic": len(given)}
    synth, _ = capfilt_run(coca_run, shard, str(tmp_path / "syn"), keep="original", threshold=2.0)
    assert synth["kept"] == {"synthetic": len(given)}


def test_capfilt_counts_an_undecodable_sample_and_writes_the_others(coca_run, synth_dir, tmp_path):
    import tarfile

    from evaclip.data.shard_writer import add_sample

    given = read_shard(os.path.join(synth_dir, "train", "00000.tar"))[:3]
    shard = str(tmp_path / "in.tar")
    with tarfile.open(shard, "w") as tar:
        for i, raw in enumerate(given):
            add_sample(tar, raw["__key__"], {"jpg": raw["jpg"] if i != 1 else b"broken", "txt": raw["txt"]})
    res, _ = capfilt_run(coca_run, shard, str(tmp_path / "out"), captions=1)
    assert res["skipped"] == {"decode_error": 1} and res["written"] == 2 and res["samples"] == 3
    assert [s["__key__"] for s in read_shard(glob.glob(str(tmp_path / "out" / "shards" / "*.tar"))[0])] == \
        [given[0]["__key__"], given[2]["__key__"]]


def test_the_caption_loss_skips_padding_and_sums_each_samples_tokens():
    """Per-sample caption NLL (projection only where a token is predicted) == the float64 reference over all
    positions with padding zeroed, for captions of different lengths."""
    model = tiny_coca(layers=1, queries=4).double()
    model.set_caption_loss(0.1, 7)
    g = torch.Generator().manual_seed(5)
    images, text = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64), torch.zeros(3, 32, dtype=torch.long)
    for i, n in enumerate((4, 9, 31)):
        text[i, :n] = torch.randint(1, 49000, (n,), generator=g)
    out = model(images, text)
    with torch.no_grad():
        _, context = model.image_context(images)
        h = model.decoder(model.text.forward_tokens(text)[1][:, :-1], context)
        ref = reference_token_ce(h.reshape(-1, h.shape[-1]), model.decoder.text_projection, text[:, 1:].reshape(-1),
                                 0, 0.1).view(3, 31).sum(1)
    assert out["caption_tokens"].tolist() == [3, 8, 30]
    assert torch.allclose(out["caption_nll"].detach(), ref, atol=1e-9)


@pytest.mark.parametrize("how", ["bf16 inputs", "fp32 under bf16 autocast"])
def test_the_chunked_ce_reduces_half_logits_in_fp32(how):
    """bf16 matmuls, fp32 log-sum-exp and fp32 per-token losses: within bf16's rounding of the logits (1e-2)."""
    hidden, weight, labels, _ = ce_inputs(torch.float32)
    h, w = (hidden.detach().bfloat16(), weight.detach().bfloat16()) if how == "bf16 inputs" else (hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how != "bf16 inputs"):
        got = chunked_token_ce(h, w, labels, 0, 0.1, 7)
    ref = reference_token_ce(hidden.detach(), weight.detach(), labels, 0, 0.1)
    assert got.dtype == torch.float32 and (got.double() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_the_nucleus_from_the_most_probable_tokens_equals_the_one_from_the_whole_sorted_vocabulary(scale):
    """Top-p's set and probabilities taken from the 256 most probable tokens (the whole vocabulary sorted only
    where they fall short) equal those of a full sort, for flat, moderate and peaked distributions."""
    from evaclip.models.generate import nucleus

    probs = torch.softmax(torch.randn(8, 49408, generator=torch.Generator().manual_seed(0)) * scale, dim=-1)
    dense = []
    for head in (256, 49408):
        kept, order = nucleus(probs, 0.9, head)
        dense.append(torch.zeros_like(probs).scatter(1, order, kept))
    assert torch.equal(dense[0], dense[1]) and bool((dense[0] > 0).any(-1).all())


def test_make_cocas_captioner_is_scored_at_every_checkpoint_it_keeps(synth_dir, tmp_path):
    """The captioner arm of `make coca` (4 steps here, so one checkpoint, at step 4; every 300th in the study): its
    held-out captions are scored at each kept checkpoint; a rerun reads the finished run back, not training it."""
    from evaclip import coca_study
    from tests.conftest import tiny_overrides

    common = [o for o in tiny_overrides(synth_dir, str(tmp_path), "x", 4) if not o.startswith(("run.name",
                                                                                              "run.steps"))]
    shapes = os.path.join(synth_dir, "zeroshot", "synth_shapes")
    first = coca_study.captioner(common + ["coca.decoder_layers=1", "coca.n_queries=4"], shapes, 4)
    assert sorted(first["accuracy_by_step"]) == [4], first
    assert all(0.0 <= a <= 1.0 for a in first["accuracy_by_step"].values()) and first["steps"] == 4
    again = coca_study.captioner(common + ["coca.decoder_layers=1", "coca.n_queries=4"], shapes, 4)
    assert again["wall_s"] == first["wall_s"] and again["accuracy_by_step"] == first["accuracy_by_step"]
