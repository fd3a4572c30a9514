"""Configurations of the Ray Train stages (`tprl train autoencoder`, `tprl train lfd`, `tprl train llm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tprl_ray.config import BackboneConfig, Command, RunConfig, Section, check_budgets


class TrainStageConfig(RunConfig):
    """Fields every Ray Train stage has."""

    data: Path = Field(Path("runs/precompute/train"), description="precompute dataset (tprl precompute --out)")
    val_data: Path | None = Field(
        None, description="precompute dataset for validation (default: a tenth of the images of data)"
    )
    out: Path = Field(Path("runs/train"), description="output directory (exports, checkpoints, MLflow)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="samples (images x questions) per worker step")
    lr: float = Field(1e-3, gt=0)
    workers: int = Field(2, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = Field(False, description="one GPU per worker")
    cache_mb: float = Field(
        256,
        ge=0,
        description="a dataset whose Parquet shards hold at most this many MiB on disk is read once into the "
        "object store and every epoch streams it from memory (0: read every epoch); in memory it takes "
        "more, its token rows padded to the longest",
    )


class AutoencoderConfig(TrainStageConfig):
    """`tprl train autoencoder` (defaults: the demo's recipe)."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1, description="samples (images x questions) per worker step")
    lr: float = Field(2e-3, gt=0)
    latent: int = Field(64, ge=1, description="code size d_l (the paper's default 64)")
    hidden: int = Field(256, ge=1)


class LfdConfig(TrainStageConfig):
    """`tprl train lfd` (defaults: the demo's recipe)."""

    epochs: int = Field(5, ge=1)
    autoencoder: Path = Field(Path("runs/train/autoencoder"), description="directory of the trained autoencoder")
    attention: bool = Field(True, description="False: the MLP-only ablation")
    positions: bool = Field(False, description="add each token's place in its grid to its code (Fourier features)")
    heads: int = Field(4, ge=1)
    hidden: int = Field(256, ge=1)


LANGUAGE_MODEL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSettings(Section):
    """The LoRA adapter of `tprl train llm` (peft), on the language model's layers only."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        LANGUAGE_MODEL_LINEARS, min_length=1, description="names of the language model's linear layers to adapt"
    )


class LlmConfig(TrainStageConfig):
    """`tprl train llm`: the LVLM's language model fine-tuned on inputs a fixed trained pruner pruned
    (defaults: the demo's recipe)."""

    backbone: BackboneConfig = BackboneConfig()
    policy: Path = Field(Path("runs/ppo"), description="the fixed pruner: a `tprl train ppo` (or lfd) output")
    pruner: Literal["tprl", "lfd"] = Field("tprl", description="how the policy selects: as that pruner evaluates")
    budget_range: list[float] = Field(
        [0.08, 0.4], min_length=2, max_length=2, description="each batch keeps a fraction drawn from this range"
    )
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: a peft adapter; full: every language-model weight but the input embeddings"
    )
    lora: LoraSettings = LoraSettings()
    gradient_checkpointing: bool = Field(False, description="recompute the decoder's activations in backward")
    merge: bool = Field(False, description="lora: also save the weights with the adapter merged in (OUT/merged)")
    out: Path = Field(Path("runs/llm"), description="output directory (adapter or model, checkpoints, MLflow)")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1, description="samples (images x questions) per worker step")
    lr: float = Field(5e-4, gt=0)

    @field_validator("budget_range")
    @classmethod
    def _range(cls, value: list[float]) -> list[float]:
        low, high = check_budgets(value, counts=False)
        if low > high:
            raise ValueError(f"budget_range {value} must be [low, high]")
        return [low, high]


COMMANDS = (
    Command(
        ("train", "autoencoder"),
        AutoencoderConfig,
        "tprl_ray.training.autoencoder:command",
        "fit the token autoencoder (Ray Train)",
    ),
    Command(
        ("train", "lfd"),
        LfdConfig,
        "tprl_ray.training.lfd:command",
        "pre-train the policy on VisPruner demonstrations (Ray Train)",
    ),
    Command(
        ("train", "llm"),
        LlmConfig,
        "tprl_ray.training.llm:command",
        "fine-tune the language model on inputs a trained pruner pruned (LoRA via peft, Ray Train)",
    ),
)
