"""LLaVA-1.5 adapter over ``LlavaForConditionalGeneration``.

Images are padded to a square with the mean colour before the CLIP resize and crop (LLaVA-1.5's
``image_aspect_ratio=pad``), prompts follow the ``vicuna_v1`` conversation (or the checkpoint's own
chat template, which the embedded tiny model is trained with), and positions of the pruned LLM input
are recompacted (``0..L-1`` over the real tokens), as LLaVA's pruning papers do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

from tprl_ray.backbones.base import Backbone, BackboneError, Grid, Row, VisualTokens, load_model

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

PromptFormat = Literal["vicuna_v1", "chat_template"]


class LlavaBackbone(Backbone):
    """A ``LlavaForConditionalGeneration`` and its processor, driven with kept-token indices."""

    projects_features = True

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor: LlavaProcessor,
        device: str | torch.device = "cpu",
        prompt_format: PromptFormat = "chat_template",
    ):
        super().__init__(model, processor.tokenizer, device)
        self.processor = processor
        self.prompt_format = prompt_format
        self.end_id = self.tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        prompt_format: PromptFormat = "vicuna_v1",
        pad_to_square: bool = True,
    ) -> LlavaBackbone:
        """Load a LLaVA checkpoint (local directory or hub id) with its tokenizer and a PIL image
        processor built from its preprocessing settings (padding to square if asked)."""
        model = load_model(LlavaForConditionalGeneration, LlavaConfig, "LLaVA", path, dtype)
        image_processor = LlavaImageProcessorPil.from_pretrained(path, do_pad=pad_to_square)
        processor = LlavaProcessor.from_pretrained(path, image_processor=image_processor)
        return cls(model, processor, device, prompt_format)

    def prompt(self, question: str) -> str:
        if self.prompt_format == "vicuna_v1":
            return f"{VICUNA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    # ---- vision --------------------------------------------------------------------------
    def pixel_values(self, images: Sequence) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)

    def trainable_tokens(self, images: Sequence) -> tuple[list[torch.Tensor], list[Grid]]:
        """LLM-ready visual tokens (post-projector) of each image, with gradients (for training), and
        their grids."""
        out = self.model.get_image_features(pixel_values=self.pixel_values(images).to(self.model.dtype))
        tokens = list(out.pooler_output)
        side = math.isqrt(tokens[0].shape[0])
        return tokens, [(side, side)] * len(tokens)

    @torch.no_grad()
    def encode(self, images: Sequence, with_attention: bool = False) -> VisualTokens:
        """One vision pass: LLM tokens, pre-projector features of the feature layer (CLS dropped)
        and, if asked, that layer's head-averaged attention from [CLS] to each patch.

        Attention weights need eager attention; the vision tower switches to it for this call only
        (SDPA returns no weights), and the language model is never touched.
        """
        config = self.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise BackboneError("encode supports vision_feature_select_strategy='default' with one feature layer")
        pixel_values = self.pixel_values(images).to(self.model.dtype)
        tower_impl = config.vision_config._attn_implementation
        if with_attention:
            self.model.set_attn_implementation({"vision_config": "eager"})
        try:
            out = self.model.get_image_features(
                pixel_values=pixel_values, output_hidden_states=True, output_attentions=with_attention
            )
        finally:
            if with_attention:
                self.model.set_attn_implementation({"vision_config": tower_impl})
        layer = config.vision_feature_layer
        features = out.hidden_states[layer][:, 1:]
        attention = None
        if with_attention:
            # hidden_states[i + 1] is the output of layer i, so hidden_states[layer] comes from attentions[layer]
            attention = out.attentions[layer if layer < 0 else layer - 1][:, :, 0, 1:].mean(dim=1)
        side = math.isqrt(features.shape[1])
        return VisualTokens(
            torch.stack(list(out.pooler_output)),
            features,
            attention,
            [(side, features.shape[1] // side)] * features.shape[0],
        )

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """LLM-ready visual tokens from stored pre-projector features (``[..., N, d_v]``)."""
        projector = self.model.model.multi_modal_projector
        return projector(features.to(self.device, self.model.dtype))

    def position_ids(self, rows: list[Row], mask: torch.Tensor) -> torch.Tensor:
        """Recompacted 1-D positions: ``0..L-1`` over each row's real tokens."""
        return (mask.cumsum(-1) - 1).clamp(min=0)


def llava_patches(config: LlavaConfig) -> int:
    """Patches (= LLM visual tokens) per image: the fixed image size over the patch size, squared."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def llava_vision_flops(config: LlavaConfig, full_tokens: int | None, kept: int) -> tuple[int, int, int]:
    """(FLOPs of CLIP + projector on the whole image, patches, LLM visual tokens): the formula of
    :mod:`tprl_ray.evaluation.efficiency`. The fixed image size gives the patch count (``full_tokens``,
    if given, must match it)."""
    v, d = config.vision_config, config.text_config.hidden_size
    p, dv, mv = v.patch_size, v.hidden_size, v.intermediate_size
    patches = llava_patches(config)
    if full_tokens not in (None, patches):
        raise ValueError(f"LLaVA encodes {patches} patches per image, not full_visual_tokens={full_tokens}")
    n = patches + 1  # + CLS
    layers = (
        v.num_hidden_layers + 1 + config.vision_feature_layer
        if config.vision_feature_layer < 0
        else config.vision_feature_layer
    )  # hidden_states[0] is the embedding output
    projected = patches + (config.vision_feature_select_strategy == "full")
    flops = (
        2 * patches * (v.num_channels * p * p * dv)
        + layers * (2 * n * 4 * dv * dv + 2 * 2 * n * n * dv + 2 * 2 * n * dv * mv)
        + 2 * projected * (dv * d + d * d)
    )
    return flops, patches, patches
