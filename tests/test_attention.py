"""attention.py gives the same rows as eager attention weights, whatever the model's implementation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tokenreduce.attention import QKCapture, attention_probs

VISION = {
    "clip": (CLIPVisionModel, CLIPVisionConfig),
    "siglip": (SiglipVisionModel, SiglipVisionConfig),
}


def vision_model(kind: str, attn: str):
    cls, cfg_cls = VISION[kind]
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=56, patch_size=14)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vision_rows_equal_eager_weights(kind, impl):
    pixels = torch.randn(2, 3, 56, 56)
    reference = vision_model(kind, "eager")
    with torch.no_grad():
        weights = reference(pixel_values=pixels, output_attentions=True).attentions
    model = vision_model(kind, impl)
    layers = model.encoder.layers
    with QKCapture({i: layers[i].self_attn for i in range(3)}) as cap, torch.no_grad():
        model(pixel_values=pixels)
    for i in range(3):
        torch.testing.assert_close(cap.probs(i, rows=slice(0, 1)), weights[i][:, :, :1].float(), atol=1e-5, rtol=0)
        rows = torch.tensor([3, 7, 11])
        torch.testing.assert_close(cap.probs(i, rows=rows), weights[i][:, :, rows].float(), atol=1e-5, rtol=0)


def test_capture_hooks_only_inside_the_block():
    model = vision_model("clip", "sdpa")
    attn = model.encoder.layers[1].self_attn
    with QKCapture({1: attn}):
        assert attn.q_proj._forward_hooks
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks
    with pytest.raises(RuntimeError, match="nothing captured"):
        QKCapture({1: attn}).probs(1)
    with pytest.raises(TypeError, match="has no q_proj"):
        QKCapture({0: torch.nn.Linear(2, 2)})


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llm_rows_with_rope_gqa_and_padding(impl):
    """Last text-query rows of a Llama layer (RoPE, 4 heads over 2 KV heads, left padding, causal)."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    ref = LlamaModel(cfg).eval()
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = impl
    model = LlamaModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        weights = ref(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions
    rope = {}
    hook = model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: rope.update(cs=kw["position_embeddings"]), with_kwargs=True
    )
    with QKCapture({1: model.layers[1].self_attn}) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    hook.remove()
    rows = torch.arange(8, 12)
    got = cap.probs(1, rows=rows, rope=rope["cs"], mask=mask, causal=True)
    torch.testing.assert_close(got, weights[1][:, :, rows].float(), atol=1e-5, rtol=0)


def test_half_precision_inputs_give_finite_fp32_rows():
    q = (torch.randn(1, 2, 5, 8) * 300).half()
    k = (torch.randn(1, 2, 5, 8) * 300).half()
    p = attention_probs(q, k, 8**-0.5)
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 5))
