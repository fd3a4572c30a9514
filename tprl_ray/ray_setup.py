"""Joining or starting Ray: the cluster of ``ray job submit`` or a private local one bound to loopback."""

from __future__ import annotations

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """``address``: None joins the cluster this process runs in (``RAY_ADDRESS`` or a running one)
    or starts one; ``"local"`` always starts a private one on 127.0.0.1; anything else is a cluster address."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    else:
        ray.init(address=address, log_to_driver=False)


def gpus_per_actor(requested: float | None) -> float:
    """``requested``, or by default one GPU per actor when the cluster has any."""
    return requested if requested is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
