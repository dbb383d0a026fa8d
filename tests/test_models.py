"""Towers against their peers (timm Eva, open_clip text tower), sizes, gradients, token dropping, kernels,
converters. All weights are random and made here."""
import pytest
import torch

from tests.conftest import mcfg

import open_clip
import timm
from evaclip.models import create_model, get_variant
from evaclip.models.registry import builtin_variants
from evaclip.models.attention import attention
from evaclip.models.convert import (eva_to_timm, evaclip_to_open_clip, image_tower_from_checkpoint, load_into,
                                    open_clip_to_evaclip, text_from_clip, timm_to_eva)
from evaclip.models.eva_vit import Eva

TINY = [n for n, v in builtin_variants().items() if v.register_in_timm]
NAMED = [n for n, v in builtin_variants().items() if not v.register_in_timm]


def _timm_tower(v):
    return timm.create_model(v.timm_name, num_classes=v.embed_dim, global_pool="token").eval()


@pytest.mark.parametrize("name", TINY + ["EVA02-B-16"])
def test_image_tower_equals_timm(name):
    torch.manual_seed(0)
    v = get_variant(name)
    ours = create_model(name).visual.trunk.eval()
    ref = _timm_tower(v)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def _open_clip_text(v):
    from open_clip.transformer import TextTransformer

    t = v.text
    return TextTransformer(context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"],
                           heads=t["heads"], layers=t["layers"], output_dim=v.embed_dim).eval()


@pytest.mark.parametrize("name", ["EVA02-Ti-8-64", "EVA02-B-16"])
def test_text_tower_equals_open_clip(name):
    torch.manual_seed(0)
    v = get_variant(name)
    ref = open_clip.create_model(name).text.eval() if name == "EVA02-B-16" else _open_clip_text(v)
    ours = create_model(name).text.eval()
    ours.load_state_dict({k: x for k, x in ref.state_dict().items() if k != "attn_mask"}, strict=True)
    tok = open_clip.get_tokenizer("EVA02-B-16")(["a photo of a cat", "two red squares on grey, top left"],
                                                 context_length=v.context_length)
    with torch.no_grad():
        assert (ours(tok) - ref(tok)).abs().max().item() <= 1e-5


def test_open_clip_model_state_dict_round_trip():
    torch.manual_seed(0)
    oc = open_clip.create_model("EVA02-B-16").eval()
    ours = create_model("EVA02-B-16").eval()
    ours.load_state_dict(open_clip_to_evaclip(oc.state_dict()), strict=True)
    back = evaclip_to_open_clip(ours.state_dict())
    oc_sd = {k: v for k, v in oc.state_dict().items() if not k.endswith("attn_mask")}
    assert set(back) == set(oc_sd) and all(torch.equal(back[k], oc_sd[k]) for k in back)
    x = torch.randn(1, 3, 224, 224)
    tok = open_clip.get_tokenizer("EVA02-B-16")(["a diagram"])
    with torch.no_grad():
        assert (ours.encode_image(x, False) - oc.encode_image(x)).abs().max() <= 1e-5
        assert (ours.encode_text(tok, False) - oc.encode_text(tok)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", NAMED)
def test_param_count_matches_published(name):
    v = get_variant(name)
    m = create_model(name, device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - v.published_params) / v.published_params <= 0.01, f"{name}: {n / 1e6:.1f}M"


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    v = get_variant(name)
    m = create_model(mcfg(name, patch_dropout=0.5)).train()
    out = m(torch.randn(3, 3, v.image_size, v.image_size), torch.randint(1, 49000, (3, v.context_length)))
    loss = out["image_features"].sum() + out["text_features"].sum() + out["logit_scale"]
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_token_dropping_counts_and_eval():
    torch.manual_seed(0)
    v = get_variant("EVA02-Ti-8-64")
    tower = create_model(mcfg(v.name, patch_dropout=0.5)).visual.trunk
    seen = []
    tower.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    n = tower.patch_embed.num_patches  # 64
    tower.train()
    y = tower(torch.randn(4, 3, 64, 64))
    assert seen[-1] == 1 + n // 2 and torch.isfinite(y).all()
    tower.eval()
    tower(torch.randn(4, 3, 64, 64))
    assert seen[-1] == 1 + n
    tower.train()
    tower.set_patch_dropout(0.0)  # unmasked tuning phase
    tower(torch.randn(4, 3, 64, 64))
    assert seen[-1] == 1 + n


def test_token_dropping_keeps_rope_positions():
    """The kept tokens must be rotated by their own positions: with the same kept set, dropping equals
    running the unmasked tower on a copy whose other tokens cannot be attended to."""
    torch.manual_seed(0)
    v = get_variant("EVA02-Ti-8-64")
    tower = create_model(mcfg(v.name, patch_dropout=0.5)).visual.trunk.train()
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(5)
    keep = torch.argsort(torch.rand(1, 64), dim=-1)[:, :32]
    torch.manual_seed(5)
    dropped = tower.forward_features(x)[:, 0]
    # reference: same blocks, tokens gathered by hand and RoPE tables gathered at `keep`
    t = tower.patch_embed(x)
    t = torch.cat([tower.cls_token, t], 1) + tower.pos_embed
    t = torch.cat([t[:, :1], t[:, 1:][:, keep[0]]], 1)
    rope = tower.rope.sin[keep[0]], tower.rope.cos[keep[0]]
    for blk in tower.blocks:
        t = blk(t, rope=rope)
    assert torch.allclose(tower.norm(t)[:, 0], dropped, atol=1e-6)


@pytest.mark.parametrize("name", NAMED)
def test_named_configs_forward_backward_with_token_drop(name):
    """Every named image tower at its real width (depth cut to 2) trains with 50% token dropping."""
    v = get_variant(name)
    torch.manual_seed(0)
    tower = Eva(**dict(v.vision, depth=2), num_classes=v.embed_dim, patch_drop_rate=0.5).train()
    y = tower(torch.randn(1, 3, v.image_size, v.image_size))
    y.float().pow(2).mean().backward()
    assert torch.isfinite(y).all() and all(p.grad is not None for p in tower.parameters())


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_flash", "sdpa_math"])  # the SDPA kernels torch has on CPU
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backends_match_math(impl, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 32) for _ in range(3))
    ref = attention(q, k, v, impl="math", is_causal=causal)
    out = attention(q, k, v, impl=impl, is_causal=causal)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_attention_kernels_match_math(impl, causal):
    """On a GPU: every kernel in bf16 against the fp32 math reference; fp32 inputs run too (the half-precision-only
    kernels hand them to SDPA's own choice: evaluation of fp32 weights) and match it tightly."""
    if impl == "flash_attn":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 257, 64, device="cuda") for _ in range(3))
    ref = attention(q, k, v, impl="math", is_causal=causal)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), impl=impl, is_causal=causal).float()
    assert (out - ref).abs().max().item() <= 2e-2
    assert (attention(q, k, v, impl=impl, is_causal=causal) - ref).abs().max().item() <= 1e-5


def test_attn_impl_switch_keeps_outputs():
    torch.manual_seed(0)
    m = create_model("EVA02-Ti-8-64").eval()
    x, tok = torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 32))
    with torch.no_grad():
        a = m.encode_image(x), m.encode_text(tok)
        m.visual.trunk.set_attn_impl("math")
        m.text.set_attn_impl("math")
        b = m.encode_image(x), m.encode_text(tok)
    assert all((i - j).abs().max() <= 1e-5 for i, j in zip(a, b))
    with pytest.raises(ValueError, match="unknown attention impl"):
        m.text.set_attn_impl("bogus")


def test_flash_attn_unavailable_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    with pytest.raises(ValueError, match="flash-attn"):
        create_model(mcfg("EVA02-Ti-8-64", attn_impl="flash_attn"))


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = create_model("EVA02-Ti-8-64").train()
    x, tok = torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 32))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt, ckpt)
        out = m(x, tok)
        (out["logit_scale"] * out["image_features"] @ out["text_features"].t()).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ------------------------------------------------------------------------------------------ converters
def _eva_original(tower_sd):
    """Our (timm-layout) tower state dict written the way BAAI's EVA repo saves a MIM checkpoint."""
    sd = timm_to_eva(tower_sd)
    sd["mask_token"] = torch.zeros(1, 1, tower_sd["cls_token"].shape[-1])
    sd["lm_head.weight"] = torch.zeros(10, tower_sd["cls_token"].shape[-1])
    sd["lm_head.bias"] = torch.zeros(10)
    sd["rope.freqs_cos"] = torch.zeros(4, 4)
    return {"module": sd}


@pytest.mark.parametrize("name", ["EVA02-Ti-8-64", "EVA01-Ti-8-64", "EVA02E-Ti-8-64"])
def test_eva_original_and_timm_layouts_load_identically(name):
    torch.manual_seed(0)
    v = get_variant(name)
    src = create_model(v.name).visual.trunk.eval()
    x = torch.randn(2, 3, v.image_size, v.image_size)
    outs = []
    for ckpt in (_eva_original(src.state_dict()), src.state_dict()):
        dst = create_model(v.name).visual.trunk.eval()
        rep = load_into(dst, image_tower_from_checkpoint(ckpt, dst), "test")
        assert not rep.missing and not rep.unexpected, str(rep)
        with torch.no_grad():
            outs.append(dst(x))
    with torch.no_grad():
        ref = src(x)
    assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)


def test_eva_original_key_names_and_round_trip():
    v = get_variant("EVA02-Ti-8-64")
    sd = create_model(v.name).visual.trunk.state_dict()
    orig = timm_to_eva(sd)
    assert "blocks.0.mlp.w1.weight" in orig and "blocks.0.mlp.ffn_ln.weight" in orig
    assert "blocks.0.attn.inner_attn_ln.weight" in orig and "blocks.0.attn.q_bias" in orig
    back = eva_to_timm(orig)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_patch_embed_and_pos_embed_are_resized():
    """EVA02-CLIP-B/16 starts from the /14 MIM model: 14x14 kernels -> 16x16, pos-embed grid resampled."""
    v = get_variant("EVA02-Ti-8-64")
    src = Eva(**dict(v.vision, patch_size=4, img_size=64, ref_feat_shape=(16, 16)), num_classes=v.embed_dim)
    dst = create_model(v.name).visual.trunk
    sd = image_tower_from_checkpoint(timm_to_eva(src.state_dict()), dst)
    assert sd["patch_embed.proj.weight"].shape == dst.patch_embed.proj.weight.shape
    assert sd["pos_embed"].shape == dst.pos_embed.shape
    rep = load_into(dst, sd, "resized")
    assert not rep.missing


def test_load_reports_mismatch_and_missing():
    v = get_variant("EVA02-Ti-8-64")
    dst = create_model(v.name).visual.trunk
    sd = dict(dst.state_dict())
    sd["blocks.0.norm1.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match="blocks.0.norm1.weight"):
        load_into(dst, sd, "bad")
    sd = dict(dst.state_dict())
    sd.pop("norm.weight")
    sd["extra.thing"] = torch.zeros(1)
    rep = load_into(dst, sd, "partial")
    assert rep.missing == ["norm.weight"] and rep.unexpected == ["extra.thing"]
    assert "missing 1: norm.weight" in str(rep) and "unexpected 1: extra.thing" in str(rep)
    with pytest.raises(ValueError, match="missing"):
        load_into(dst, sd, "strict", strict=True)


def test_text_from_openai_and_open_clip_layouts():
    torch.manual_seed(0)
    m = create_model("EVA02-Ti-8-64")
    flat = {k[5:]: v for k, v in m.state_dict().items() if k.startswith("text.")}
    openai = dict(flat, **{"visual.proj": torch.zeros(1), "logit_scale": torch.zeros(())})
    prefixed = {"text." + k: v for k, v in flat.items()}
    prefixed["text.attn_mask"] = torch.zeros(1)
    for sd in (openai, prefixed):
        got = text_from_clip(sd)
        assert set(got) == set(flat)


def test_hf_text_tower_from_local_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=49408, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    from evaclip.models.text import HFTextEncoder

    tower = HFTextEncoder(str(tmp_path), output_dim=32, pooler="mean")
    tok = torch.randint(1, 1000, (3, 16))
    tok[:, 10:] = 0
    y = tower(tok)
    y.sum().backward()
    assert y.shape == (3, 32) and tower.proj.weight.grad is not None
    assert tower.layer_id("transformer.encoder.layer.1.attention.self.query.weight") == 2
    assert tower.layer_id("transformer.embeddings.word_embeddings.weight") == 0
