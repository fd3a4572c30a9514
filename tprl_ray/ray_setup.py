"""Joining or starting Ray: the cluster of ``ray job submit``, or a Ray of this process's own whose every process
(GCS, raylet, workers, this driver, the dashboard and runtime-env agents, the monitors and the dashboard) listens
on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray
from ray._private import services

# Ray binds each of its servers to loopback only when the node IP is loopback. But `ray.init` and `ray start` turn a
# loopback node IP, or a loopback GCS address to connect to, into the host's external one unless Ray's single-node
# switch is set (`ray._private.services.get_node_ip_address`; the default on macOS and Windows). The switch also
# stops `ray start --address` from joining a node to the Ray, so it is for a Ray of our own only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def loopback() -> Iterator[None]:
    """Ray's single-node switch while a Ray is started, or used, here: in the environment that its processes (and
    any CLI run from here) inherit, and in this process, where Ray read it once, at import
    (``ray_constants.ENABLE_RAY_CLUSTER``). Both are restored after."""
    from ray._private import ray_constants

    saved_env, saved = {name: os.environ.get(name) for name in LOOPBACK_ENV}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """``address``: None joins the cluster this process runs in (``RAY_ADDRESS``, or the last ``ray start`` here) or
    else starts one; ``"local"`` always starts a private one (no dashboard UI); anything else is a cluster address.
    A Ray started here listens on 127.0.0.1 only; one joined is left as it is."""
    if ray.is_initialized():
        return
    if address == "local":
        with loopback():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    elif address is None and services.get_ray_address_from_environment(None, None) is None:  # as ray.init decides
        with loopback():
            ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def gpus_per_actor(requested: float | None) -> float:
    """``requested``, or by default one GPU per actor when the cluster has any."""
    return requested if requested is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
