"""Configurations of the Ray Train stages (`tprl train autoencoder`, `tprl train lfd`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tprl_ray.config import Command, RunConfig


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
)
