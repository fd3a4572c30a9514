"""Configuration of the model service's scorer deployment."""

from __future__ import annotations

from pydantic import Field

from tprl_ray.config import BackboneConfig, PoolConfig, Section


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
    retries: int = Field(5, ge=0, description="Ray task retries of a request whose replica died")
