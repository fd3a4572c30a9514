"""Configuration of the embedded tiny LLaVA and its training recipe (`tprl model tiny`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

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


class TinyModelConfig(StageConfig):
    """`tprl model tiny`: data, output and the training recipe."""

    data: Path = Field(Path("runs/data/digits"), description="benchmark directory (tprl data digits)")
    out: Path = Field(Path("runs/models/tiny-llava-digits"), description="checkpoint directory")
    seed: int = Field(0, description="seed for initialisation and scene sampling")
    size: TinyLlavaSize = TinyLlavaSize()
    init_from: Path | None = Field(None, description="start from this checkpoint (its sizes replace `size`)")
    align_steps: int = Field(1800, ge=0, description="stage 1 steps (alignment)")
    tune_steps: int = Field(2000, ge=0, description="stage 2 steps (instruction tuning)")
    batch_scenes: int = Field(24, ge=1, description="scenes per step")
    rounds: int = Field(2, ge=1, description="questions of each category per scene, as one conversation")
    key_word_steps: int = Field(1000, ge=0, description="stage 2 steps that also target the answer at the key word")
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(100, ge=0)
    align_weight: float = Field(0.5, ge=0, description="weight of the alignment loss in stage 2")
    vision_lr_scale: float = Field(0.1, ge=0, description="stage 2 LR factor of vision tower + projector")
    eval_every: int = Field(500, ge=1, description="steps between validation evaluations")
    val_questions: int = Field(400, ge=0, description="validation questions per evaluation (0: none)")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")


COMMANDS = (
    Command(
        ("model", "tiny"), TinyModelConfig, "tprl_ray.models.train_tiny:command", "train the embedded tiny LLaVA on CPU"
    ),
)
