"""Configurations of the model service: the PPO scorer's deployment and `tprl serve`'s application."""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np
from pydantic import Field, field_validator, model_validator

from tprl_ray.config import BackboneConfig, Command, PoolConfig, RunConfig, Section, check_budgets, known_name
from tprl_ray.pruners.registry import LEARNED, PRUNERS, REFERENCES


class EmulatedCost(Section):
    """A scorer replica that sleeps instead of running its model (benchmarks of the control plane).

    A batch of ``B`` samples keeping fractions ``f_i`` of their visual tokens costs
    ``max(floor_s, fixed_s + sum_i (per_sample_s + per_token_s * f_i * full_tokens))`` seconds per
    chunk of ``pool.batch_size``. The defaults are the least-squares fit to LLaVA-1.5-7B's fp16
    decoder on one H200 (`tprl bench scorer --device cuda`: 56.2 and 208.4 samples/s with 576 and 144
    visual tokens at batch 64, 53.9 and 191.5 at batch 8, within 3%), ``floor_s`` its launch-bound
    batch of one (21-22 samples/s). Scores are synthetic: the stored full-token score plus
    ``log(f_i)``, so rewards still favour keeping more."""

    full_tokens: int = Field(576, ge=1, description="visual tokens of a whole image on the emulated model")
    fixed_s: float = Field(5.41e-3, ge=0, description="seconds per forward pass")
    per_sample_s: float = Field(3.78e-4, ge=0, description="seconds per sample (its text tokens)")
    per_token_s: float = Field(3.01e-5, ge=0, description="seconds per kept visual token")
    floor_s: float = Field(0.045, ge=0, description="the shortest forward pass (kernel launches)")

    def seconds(self, kept_fractions: np.ndarray) -> float:
        """The emulated seconds of one forward pass over samples keeping ``kept_fractions``."""
        tokens = float(np.sum(kept_fractions)) * self.full_tokens
        return max(self.floor_s, self.fixed_s + len(kept_fractions) * self.per_sample_s + self.per_token_s * tokens)


class ScorerConfig(Section):
    """The scorer pool: model, replicas and batching."""

    backbone: BackboneConfig = Field(
        BackboneConfig(), description="the LVLM each replica hosts (LLaVA: it scores from stored features)"
    )
    pool: PoolConfig = Field(
        PoolConfig(cpus=0.5, batch_size=64), description="Serve replicas; batch_size: samples per forward pass"
    )
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources per replica, e.g. {scorer_slot: 1} to pin replicas to GPU scorer nodes"
    )
    threads: int = Field(2, ge=1, description="torch CPU threads per replica")
    max_batch_requests: int = Field(8, ge=1, description="requests (env steps) merged into one batch")
    batch_wait_s: float = Field(0.01, ge=0)
    cache_shards: int = Field(64, ge=1, description="precompute shards kept in memory per replica")
    emulate: EmulatedCost | None = Field(
        None, description="benchmarks: sleep for a calibrated cost instead of loading and running the model"
    )


class DeploymentConfig(Section):
    """One deployment of the serving application: its replicas (or Serve autoscaling) and batching."""

    pool: PoolConfig = Field(PoolConfig(), description="replicas, CPUs and GPUs each; batch_size: requests per batch")
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve autoscaling_config (e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}); "
        "replaces pool.size",
    )
    batch_wait_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    threads: int = Field(1, ge=1, description="torch CPU threads per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once")


class ServeConfig(RunConfig):
    """`tprl serve`: an OpenAI-compatible chat endpoint with a visual-token pruner in front of the model."""

    wired: ClassVar[frozenset[str]] = frozenset({"path"})

    model: str = Field(
        "embedded",
        description="'embedded' (the shipped tiny LLaVA), 'embedded-qwen' (the shipped tiny Qwen2.5-VL), "
        "a checkpoint directory or hub id",
    )
    backbone: BackboneConfig = Field(BackboneConfig(), description="how the model loads (its path is --model)")
    name: str | None = Field(None, description="the model name clients send (default: --model's last part)")
    pruner: str = Field("lfd", description=f"any of {', '.join(PRUNERS)}")
    policy: str | None = Field(
        None,
        description="learned pruners: a pruner directory or an MLflow model URI (models:/tprl-pruner/1, "
        "models:/tprl-pruner@alias); lfd default: the one shipped for the embedded model",
    )
    budget: float = Field(
        0.25,
        gt=0,
        description="kept fraction in (0, 1] or whole kept token count; a request's 'budget' field overrides it",
    )
    tau: float | None = Field(None, gt=0, lt=1, description="learned pruners: keep every token with p > tau instead")
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 exposes the endpoint to the network)")
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("tprl", description="the Serve application's name")
    allow_remote_images: bool = Field(False, description="fetch http(s) image URLs (default: only data: URLs)")
    fetch_timeout_s: float = Field(10.0, gt=0, description="time limit of a remote image fetch")
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body (and fetched image)")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="larger images are refused (decompression bombs)")
    max_image_side: int = Field(8192, ge=1, description="images with a longer side are refused")
    max_tokens: int = Field(256, ge=1, description="the largest max_tokens a request may ask for")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens of a request that sets none")
    ingress: DeploymentConfig = Field(
        DeploymentConfig(pool=PoolConfig(cpus=0.1)), description="HTTP front: request checks, image decoding"
    )
    vision: DeploymentConfig = Field(
        DeploymentConfig(pool=PoolConfig(cpus=0.5, batch_size=16)),
        description="the vision encoder, query embeddings and the pruner (@serve.batch)",
    )
    llm: DeploymentConfig = Field(
        DeploymentConfig(pool=PoolConfig(cpus=1, batch_size=16)),
        description="the language model (hf: @serve.batch; vllm: the engine's own batching)",
    )

    @field_validator("pruner")
    @classmethod
    def _known_pruner(cls, value: str) -> str:
        return known_name("pruner", value, PRUNERS)

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: float) -> float:
        return check_budgets([value])[0]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} is above max_tokens {self.max_tokens}")
        if self.pruner == "tprl" and self.policy is None:
            raise ValueError("pruner 'tprl' needs --policy (a `tprl train ppo` output or models:/tprl-pruner/N)")
        if self.tau is not None and self.pruner not in LEARNED:
            raise ValueError(f"tau applies to the learned pruners ({', '.join(LEARNED)}), not {self.pruner!r}")
        if self.policy is not None and self.pruner not in LEARNED:
            raise ValueError(f"policy applies to the learned pruners ({', '.join(LEARNED)}), not {self.pruner!r}")
        if self.pruner in REFERENCES:
            raise ValueError(f"pruner {self.pruner!r} reads the benchmark's annotations: it cannot serve requests")
        return self

    def served_backbone(self) -> BackboneConfig:
        """The backbone section with ``path`` set from ``model``."""
        return self.backbone.model_copy(update={"path": self.model})

    def served_name(self) -> str:
        return self.name or self.model.rstrip("/").rsplit("/", 1)[-1]


COMMANDS = (
    Command(("serve",), ServeConfig, "tprl_ray.service.app:command", "serve the pruned model (OpenAI chat API)"),
)
