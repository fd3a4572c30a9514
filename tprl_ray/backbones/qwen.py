"""Qwen2.5-VL adapter over ``Qwen2_5_VLForConditionalGeneration``.

Dynamic resolution: an image of ``h x w`` pixels gives ``(h/28) x (w/28)`` LLM tokens (one per 2x2
group of 14-px patches merged by the PatchMerger), so token counts differ per image and the visual
side comes back as per-image lists. Prompts use the checkpoint's chat template with one
``<|image_pad|>`` that the adapter expands itself (the stock processor needs torchvision). Pruned
tokens keep their original 3-D M-RoPE positions: the image starting at text position ``s`` puts
token (row, col) at ``(s, s + row, s + col)`` and the text after it at ``s + max(rows, cols)``
onwards, exactly what ``get_rope_index`` gives the full sequence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from tprl_ray.backbones.base import Backbone, BackboneError, Grid, Row, VisualTokens, load_model

END_OF_TURN = "<|im_end|>"


def _chat_template(path: str | Path, tokenizer) -> str:
    """The checkpoint's chat template: the tokenizer's, else ``chat_template.json``/``.jinja``."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = Path(path) / name
        if file.is_file():
            text = file.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise BackboneError(f"{path}: no chat template (tokenizer_config.json, chat_template.jinja or .json)")


class QwenBackbone(Backbone):
    """A ``Qwen2_5_VLForConditionalGeneration`` with its tokenizer and image processor."""

    answer_separator = ""

    def __init__(
        self, model: Qwen2_5_VLForConditionalGeneration, tokenizer, image_processor, device: str | torch.device = "cpu"
    ):
        super().__init__(model, tokenizer, device)
        self.image_processor = image_processor
        self.end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        vision = model.config.vision_config
        if image_processor.patch_size != vision.patch_size or image_processor.merge_size != vision.spatial_merge_size:
            raise BackboneError(
                f"image processor patch {image_processor.patch_size}/merge {image_processor.merge_size} does not "
                f"match the vision config's {vision.patch_size}/{vision.spatial_merge_size}"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu") -> QwenBackbone:
        """Load a Qwen2.5-VL checkpoint (local directory or hub id)."""
        model = load_model(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, "Qwen2.5-VL", path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.chat_template = _chat_template(path, tokenizer)
        return cls(model, tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path), device)

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ---- vision --------------------------------------------------------------------------
    def pixel_inputs(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened patches ``[sum of patches, C*T*p*p]`` and ``image_grid_thw`` ``[B, 3]``."""
        out = self.image_processor(images, return_tensors="pt")
        return out["pixel_values"].to(self.device, self.model.dtype), out["image_grid_thw"].to(self.device)

    def grids(self, grid_thw: torch.Tensor) -> list[Grid]:
        """Each image's grid of LLM tokens: its patch grid over the merge size."""
        merge = self.model.config.vision_config.spatial_merge_size
        return [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]

    def trainable_tokens(self, images: Sequence) -> tuple[list[torch.Tensor], list[Grid]]:
        """Each image's LLM tokens (post-merger), with gradients (for training), and their grids."""
        pixel_values, grid_thw = self.pixel_inputs(images)
        out = self.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)
        return list(out.pooler_output), self.grids(grid_thw)

    @torch.no_grad()
    def encode(self, images: Sequence, with_attention: bool = False) -> VisualTokens:
        """One vision pass: LLM tokens, the last block's output averaged over each 2x2 merge group
        (``[N_i, d_v]``) and, if asked, the attention each token receives in the last block (mean
        over heads and queries of its image) averaged over the group.

        The attention is computed from the last block's queries and keys, so any attention
        implementation works. The tower runs in window order; results come back in raster order.
        """
        pixel_values, grid_thw = self.pixel_inputs(images)
        visual = self.model.model.visual
        last = visual.blocks[-1]
        seen: dict = {}
        hooks = [
            last.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], kw=kw), with_kwargs=True),
            last.register_forward_hook(lambda m, a, out: seen.update(out=out)),
        ]
        try:
            out = self.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)
        finally:
            for hook in hooks:
                hook.remove()
        unit = visual.spatial_merge_unit
        window_index, _ = get_vision_window_index(
            grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        raster = torch.argsort(window_index.to(self.device))
        sizes = [t.shape[0] for t in out.pooler_output]
        features = seen["out"].view(-1, unit, seen["out"].shape[-1]).mean(dim=1)[raster]
        attention = None
        if with_attention:
            received = self._received_attention(last.attn, last.norm1(seen["x"]), seen["kw"])
            attention = list(received.view(-1, unit).mean(dim=1)[raster].split(sizes))
        return VisualTokens(list(out.pooler_output), list(features.split(sizes)), attention, self.grids(grid_thw))

    @staticmethod
    def _received_attention(attn, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Per patch (window order), the attention it receives, averaged over heads and over the
        queries of its attention chunk (the whole image in a full-attention block)."""
        n = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
        bounds = kwargs["cu_seqlens"].tolist()
        received = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)  # [heads, n, d]
            weights = torch.softmax((qs @ ks.transpose(1, 2)).float() * attn.scaling, dim=-1)
            received.append(weights.mean(dim=(0, 1)))
        return torch.cat(received)

    def position_ids(self, rows: list[Row], mask: torch.Tensor) -> torch.Tensor:
        """Original M-RoPE positions ``[3, B, L]`` of every kept token; padding gets 0."""
        if any(row.grid is None for row in rows):
            raise BackboneError("Qwen2.5-VL needs each image's token grid (VisualTokens.grids) for positions")
        width = mask.shape[1]
        positions = torch.zeros(3, len(rows), width, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            s, (grid_rows, cols) = len(row.before), row.grid
            keep = row.keep.to(self.device)
            text_before = torch.arange(s, device=self.device).expand(3, -1)
            image = torch.stack([torch.full_like(keep, s), s + keep // cols, s + keep % cols])
            after = s + max(grid_rows, cols) + torch.arange(len(row.after), device=self.device).expand(3, -1)
            seq = torch.cat([text_before, image, after], dim=1)
            positions[:, i, width - seq.shape[1] :] = seq
        return positions


def qwen_vision_flops(config: Qwen2_5_VLConfig, full_tokens: int | None, kept: int) -> tuple[int, int, int]:
    """(FLOPs of the ViT + merger for ``full_tokens`` LLM tokens, patches, ``full_tokens``): the formula of
    :mod:`tprl_ray.evaluation.efficiency`. Without ``full_tokens`` the image is taken to give the ``kept`` tokens."""
    full_tokens = kept if full_tokens is None else full_tokens
    v = config.vision_config
    p, dv, mv = v.patch_size, v.hidden_size, v.intermediate_size
    merge = v.spatial_merge_size**2
    patches = merge * full_tokens
    window = min(patches, (v.window_size // p) ** 2)
    flops = 2 * patches * (v.in_channels * v.temporal_patch_size * p * p * dv)
    for block in range(v.depth):
        attended = patches if block in v.fullatt_block_indexes else window
        flops += 2 * patches * 4 * dv * dv + 2 * 2 * patches * attended * dv + 2 * 3 * patches * dv * mv
    flops += 2 * full_tokens * (merge * dv * merge * dv + merge * dv * v.out_hidden_size)
    return flops, patches, full_tokens
