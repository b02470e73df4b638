"""Adapter for LLaVA-1.5: transformers' `LlavaForConditionalGeneration` (any size, any attention)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tokenreduce.adapter import Adapter, ImageLayout, VisualInputs
from tokenreduce.encoder import LayerBranches, VisionTower
from tokenreduce.errors import InputError
from tokenreduce.flops import TransformerDims
from tokenreduce.registry import register_adapter


def config_dims(cfg, gated: bool = True, vocab: int = 0) -> TransformerDims:
    """`TransformerDims` of a transformers text or vision config (Llama/Qwen2 gated, CLIP/SigLIP plain)."""
    return TransformerDims(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        vocab=vocab,
        gated=gated,
    )


def hf_vision_tower(vision_model: nn.Module, feature_layer: int | list[int]) -> VisionTower:
    """`VisionTower` of a transformers CLIP- or SigLIP-style vision model (`CLIPVisionModel`, ...).

    `feature_layer` is the VLM's `vision_feature_layer`: an index (or indices) into the tower's
    hidden states (0 = embeddings, -1 = last layer's output), as transformers uses it.
    """
    vm = getattr(vision_model, "vision_model", vision_model)
    layers = vm.encoder.layers
    pre = getattr(vm, "pre_layrnorm", None)
    embed = (lambda pv: pre(vm.embeddings(pv))) if pre is not None else vm.embeddings
    n = len(layers) + 1
    wanted = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    hs = [i + n if i < 0 else i for i in wanted]
    for i, h in zip(wanted, hs):
        if not 0 <= h < n:
            raise InputError(f"vision_feature_layer {i} does not exist in a {len(layers)}-layer vision tower")
    has_cls = getattr(vm.embeddings, "class_embedding", None) is not None
    return VisionTower(
        embed=embed, layers=layers, attention=lambda layer: layer.self_attn, prefix=int(has_cls), feature_layers=hs,
        branches=_pre_ln_branches,
    )


def _pre_ln_branches(layer: nn.Module) -> LayerBranches:
    """The residual branches of a CLIP/SigLIP encoder layer (pre-LN: layer_norm1 -> self_attn, layer_norm2 -> mlp)."""
    return LayerBranches(
        attn=lambda x, mask: layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=mask)[0],
        mlp=lambda x: layer.mlp(layer.layer_norm2(x)),
    )


def vicuna_turn(text: str, media_token: str | None) -> str:
    """A LLaVA-1.5 (vicuna_v1) user turn ending where the answer starts."""
    return f"USER: {media_token}\n{text} ASSISTANT:" if media_token else f"USER: {text} ASSISTANT:"


def feature_options(model: nn.Module, kwargs: dict[str, Any], has_cls: bool = True) -> int | list[int]:
    """Pop `vision_feature_layer`/`vision_feature_select_strategy`; the feature layer to use.

    Only the strategy that leaves the patch grid is served: "default" (drop the CLS token), or "full"
    on a tower without a CLS token (SigLIP), where both mean the same.
    """
    layer = kwargs.pop("vision_feature_layer", None)
    strategy = kwargs.pop("vision_feature_select_strategy", None)
    cfg = model.config
    strategy = strategy or getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy != "default" and not (strategy == "full" and not has_cls):
        raise InputError(
            f"vision_feature_select_strategy={strategy!r} is not supported with token reduction "
            "(only 'default', which drops the CLS token from the visual features)"
        )
    return cfg.vision_feature_layer if layer is None else layer


@register_adapter("LlavaForConditionalGeneration")
class LlavaAdapter(Adapter):
    """LLaVA-1.5: one CLIP grid per image (24x24 = 576 tokens for CLIP-L/14-336), projected by an MLP."""

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        pixel_values = kwargs.pop("pixel_values", None)
        kwargs.pop("image_sizes", None)
        layer = feature_options(self.model, kwargs)
        if pixel_values is None:
            return None
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        layouts = [ImageLayout.single((side, side)) for _ in range(pixel_values.shape[0])]
        return VisualInputs(pixel_values=pixel_values, layouts=layouts, options={"feature_layer": layer})

    def feature_layer(self, vis: VisualInputs | None) -> int | list[int]:
        """The call's `vision_feature_layer` (the model's default when the call gave none)."""
        if vis is not None and vis.options.get("feature_layer") is not None:
            return vis.options["feature_layer"]
        return self.model.config.vision_feature_layer

    def tower(self, vis: VisualInputs | None = None) -> VisionTower:
        return hf_vision_tower(self.model.model.vision_tower, self.feature_layer(vis))

    def project(self, features: Tensor) -> Tensor:
        return self.model.model.multi_modal_projector(features)

    def llm_dims(self) -> TransformerDims:
        tc = self.model.config.text_config
        return config_dims(tc, vocab=tc.vocab_size)

    def vision_dims(self) -> TransformerDims:
        return config_dims(self.model.config.vision_config, gated=False)

    def chat(self, text: str, media: str | None = None) -> str:
        return vicuna_turn(text, {"image": "<image>", "video": "<video>"}.get(media) if media else None)
