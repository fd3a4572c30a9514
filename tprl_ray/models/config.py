"""Configuration of the embedded tiny LLaVA and its training recipe (`tprl model tiny`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from tprl_ray.config import Command, StageConfig


class TinyLlavaSize(BaseModel):
    """Layer sizes of the tiny LLaVA (defaults: the shipped checkpoint)."""

    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    patch_size: int = Field(12, description="96 px / 12 px patches = 64 visual tokens, 4 per cell")
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 384


class TinyQwenSize(BaseModel):
    """Layer sizes of the tiny Qwen2.5-VL (defaults: the shipped checkpoint).

    M-RoPE is interleaved (by default ``mrope_section`` is one 1 per rotary pair: the class cycles
    t, h, w over the sections, as Qwen3-VL does): with Qwen2.5-VL's contiguous ``[16, 24, 24]``
    split the width axis gets only the slowest frequencies, which cannot tell a dozen columns apart
    in a 32-wide head, and the time axis the fastest, which leave no slow pair to match content
    across the sequence."""

    vision_hidden: int = 64
    vision_depth: int = 4
    vision_heads: int = 4
    patch_size: int = Field(6, description="6-px patches merged 2x2: one LLM token per 12 px, 4 per 24-px cell")
    window_tokens: int = Field(4, description="side of a vision attention window, in LLM tokens")
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 384
    rope_theta: float = 10000.0
    mrope_section: list[int] | None = Field(
        None, description="rotary pairs per section, sections cycling t, h, w (sum: head_dim / 2; None: all 1s)"
    )


class TinyModelConfig(StageConfig):
    """`tprl model tiny`: data, output and the training recipe."""

    data: Path = Field(Path("runs/data/digits"), description="benchmark directory (tprl data digits)")
    out: Path = Field(Path("runs/models/tiny-llava-digits"), description="checkpoint directory")
    seed: int = Field(0, description="seed for initialisation and scene sampling")
    family: Literal["llava", "qwen"] = Field("llava", description="LlavaForConditionalGeneration or Qwen2.5-VL")
    size: TinyLlavaSize = TinyLlavaSize()
    qwen_size: TinyQwenSize = TinyQwenSize()
    init_from: Path | None = Field(None, description="start from this checkpoint (its sizes replace the sizes)")
    align_steps: int = Field(1800, ge=0, description="stage 1 steps (alignment)")
    tune_steps: int = Field(2000, ge=0, description="stage 2 steps (instruction tuning)")
    batch_scenes: int = Field(24, ge=1, description="scenes per step")
    rounds: int = Field(2, ge=1, description="questions of each category per scene, as one conversation")
    key_word_steps: int = Field(1000, ge=0, description="stage 2 steps that also target the answer at the key word")
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(100, ge=0)
    align_weight: float = Field(0.5, ge=0, description="weight of the alignment loss in stage 2")
    position_weight: float = Field(
        0.5, ge=0, description="Qwen2.5-VL, stage 2: weight of the cell and digit loss on the visual tokens' states"
    )
    position_layers: list[int] = Field(
        [1, 2], min_length=1, description="Qwen2.5-VL: the decoder layers whose visual states name their cell and digit"
    )
    vision_lr_scale: float = Field(0.1, ge=0, description="stage 2 LR factor of vision tower + projector")
    eval_every: int = Field(500, ge=1, description="steps between validation evaluations")
    val_questions: int = Field(400, ge=0, description="validation questions per evaluation (0: none)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")

    @model_validator(mode="after")
    def _position_layer(self):
        layers = self.qwen_size.text_layers
        inside = all(1 <= k < layers for k in self.position_layers)
        if self.family == "qwen" and self.position_weight > 0 and not inside:
            raise ValueError(f"position_layers must be below the {layers} text layers (intermediate layers)")
        return self


COMMANDS = (
    Command(
        ("model", "tiny"),
        TinyModelConfig,
        "tprl_ray.models.train_tiny:command",
        "train an embedded tiny model (LLaVA or Qwen2.5-VL) on CPU",
    ),
)
