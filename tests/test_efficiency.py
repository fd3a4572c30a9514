"""Analytic FLOPs and KV cache: the paper's Table 4 KV sizes, hand-computed FLOPs, FastV, Qwen, config lookup."""

import json

import pytest
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from tprl_ray.config import PAPER_CONFIGS
from tprl_ray.evaluation.efficiency import efficiency, model_config


@pytest.mark.parametrize("tokens, megabytes", [(576, 302.4), (192, 100.8), (144, 75.7), (128, 67.3)])
def test_llava_7b_visual_kv_matches_paper_table_4(tokens, megabytes):
    e = efficiency(model_config("llava-1.5-7b"), tokens)
    assert e.kv_parts["visual"] / 1e6 == pytest.approx(megabytes, rel=0.01)


def tiny_llava():
    return LlavaConfig(
        text_config=LlamaConfig(
            hidden_size=4,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=2,
            vocab_size=10,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=2, intermediate_size=4, num_hidden_layers=2, num_attention_heads=1, image_size=4, patch_size=2
        ),
        vision_feature_layer=-2,
    )


def test_hand_computed_flops_and_kv():
    # LLM: d=4, d_q=2*2=4, d_kv=1*2=2, m=8, V=10, 1 layer.
    # prefill, n = 3 visual + 2 text = 5:
    #   projections 2*5*(2*4*4 + 2*4*2) = 480, attention 2*2*5*5*4 = 400, MLP 2*3*5*4*8 = 960, LM head 2*4*10 = 80
    #   -> 1920
    # decode, 2 steps (ctx 6, then 7):
    #   projections 2*48 = 96, attention 2*2*6*4 = 96 / 2*2*7*4 = 112, MLP 2*3*4*8 = 192, LM head 80
    #   -> 464 + 480 = 944
    # vision: CLIP d_v=2, m_v=4, 4 patches + CLS = 5 tokens, feature layer -2 of 2 -> 1 layer:
    #   patch embedding 2*4*(3*2*2*2) = 192
    #   layer 2*5*4*2*2 = 160 + attention 2*2*5*5*2 = 200 + MLP 2*2*5*2*4 = 160 -> 520
    #   projector on the 4 patches (CLS dropped): 2*4*(2*4 + 4*4) = 192  -> 904
    # KV: 2 (K, V) * d_kv 2 * 2 bytes = 8 bytes per token per layer: visual 24, text 16, generated 16.
    e = efficiency(tiny_llava(), visual_tokens=3, text_tokens=2, new_tokens=2, pruner_flops=5.0)
    assert e.flops_parts == {"vision": 904, "pruner": 5, "prefill": 1920, "decode": 944}
    assert e.flops == 904 + 5 + 1920 + 944
    assert e.kv_parts == {"visual": 24, "text": 16, "generated": 16}
    assert e.kv_cache_bytes == 56
    d = json.loads(json.dumps(e.to_dict()))
    assert set(d) == {"flops", "flops_parts", "kv_cache_bytes", "kv_parts", "tokens"}
    assert d["tokens"] == {"visual": 3, "full_visual": 4, "vision_patches": 4, "text": 2, "new": 2, "layer": None}


def test_fastv_layer_tokens_reduce_prefill_decode_and_kv_exactly():
    config = model_config("llava-1.5-7b")
    d, m, layers, k, kept, text = 4096, 11008, 32, 2, 144, 64
    full = efficiency(config, 576, text, new_tokens=1)
    fastv = efficiency(config, 576, text, new_tokens=1, layer_tokens=[576] * k + [kept] * (layers - k))
    a, b = 576 + text, kept + text  # tokens in an unpruned / pruned layer; here d_q = d_kv = d
    prefill_saved = 2 * (a - b) * 4 * d * d + 2 * 2 * (a * a - b * b) * d + 2 * 3 * (a - b) * d * m
    assert full.flops_parts["prefill"] - fastv.flops_parts["prefill"] == (layers - k) * prefill_saved
    assert full.flops_parts["decode"] - fastv.flops_parts["decode"] == (layers - k) * 2 * 2 * (a - b) * d
    assert fastv.flops_parts["vision"] == full.flops_parts["vision"]
    assert fastv.kv_parts["visual"] == 2 * d * 2 * (k * 576 + (layers - k) * kept)
    assert fastv.kv_parts["text"] == full.kv_parts["text"]
    with pytest.raises(ValueError, match="32 layers"):
        efficiency(config, 576, layer_tokens=[576] * 3)


def test_qwen_vision_runs_on_4n_patches_before_pruning():
    config = model_config("qwen2.5-vl-3b")
    n, patches, window = 256, 1024, 64  # 448x448 image: 32x32 patches of 14, merged 2x2; 112/14 = 8x8 windows
    dv, mv, out = 1280, 3420, 2048
    block = 2 * patches * 4 * dv * dv + 2 * 3 * patches * dv * mv
    vision = (
        2 * patches * (3 * 2 * 14 * 14 * dv)
        + 32 * block
        + 2 * 2 * patches * dv * (4 * patches + 28 * window)  # 4 full-attention blocks
        + 2 * n * (4 * dv * 4 * dv + 4 * dv * out)
    )
    pruned = efficiency(config, 64, text_tokens=10, full_visual_tokens=n)
    assert pruned.flops_parts["vision"] == vision == efficiency(config, n).flops_parts["vision"]
    assert pruned.tokens["vision_patches"] == patches
    assert pruned.kv_parts == {"visual": 64 * 36 * 2 * 2 * 128 * 2, "text": 10 * 36864, "generated": 0}


def test_llava_image_size_is_fixed():
    with pytest.raises(ValueError, match="576 patches"):
        efficiency(model_config("llava-1.5-7b"), 144, full_visual_tokens=256)


def test_model_config_names_and_paths(tmp_path):
    assert model_config(PAPER_CONFIGS["llava-1.5-13b"]).text_config.num_hidden_layers == 40
    assert model_config("embedded").vision_config.image_size == 96
    for bad in ("llava-1.5-70b", tmp_path):
        with pytest.raises(ValueError, match="llava-1.5-7b, llava-1.5-13b, qwen2.5-vl-3b"):
            model_config(bad)


def test_efficiency_command_prints_json(capsys):
    from tprl_ray.cli import main

    assert main(["efficiency", "--model", "llava-1.5-7b", "--tokens", "192", "--text-tokens", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_parts"]["visual"] / 1e6 == pytest.approx(100.8, rel=0.01)
    assert out["flops"] == pytest.approx(sum(out["flops_parts"].values()))
    assert main(["efficiency", "--model", "llava-1.5-7b", "--tokens", "144", "--pruner", "fastv"]) == 0
    fastv = json.loads(capsys.readouterr().out)
    assert fastv["tokens"]["layer"] == [576] * 2 + [144] * 30 and fastv["flops_parts"]["pruner"] > 0
    assert main(["efficiency", "--model", "llava-1.5-7b", "--tokens", "600"]) == 2
    assert "exceeds the 576 visual tokens" in capsys.readouterr().err
