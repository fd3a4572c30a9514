"""The cluster configs: cluster/aws.yaml against Ray's launcher schema, the KubeRay manifests against it, and the
scorer pool scaling a GPU node type up and down with Ray's fake multi-node provider."""

import json
import shutil
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from conftest import free_port, ray_head
from ray import serve
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def workers(aws: dict) -> dict:
    """The worker node types of a launcher config."""
    return {name: t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]}


def test_aws_config_passes_the_launcher_schema_and_pins_scorer_slots_to_gpu_nodes():
    aws = prepare_config(load("aws.yaml"))  # offline: merges the AWS defaults, no AWS call
    validate_config(aws)
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # every stage scales out onto workers
    slots = {name: t["resources"] for name, t in workers(aws).items() if "scorer_slot" in t["resources"]}
    assert list(slots) == ["gpu-scorer"] and slots["gpu-scorer"]["scorer_slot"] == slots["gpu-scorer"]["GPU"] == 1
    assert all(t["min_workers"] == 0 for t in workers(aws).values())  # idle clusters cost only the head
    assert sum(t["max_workers"] for t in workers(aws).values()) <= aws["max_workers"]
    assert "--dashboard-host=127.0.0.1" in " ".join(aws["head_start_ray_commands"])
    setup = aws["setup_commands"]
    assert setup[0] == "pip install torch==2.13.0" and "-e ." in setup[1]

    fractional = load("aws.yaml")
    fractional["available_node_types"]["gpu-scorer"]["resources"]["scorer_slot"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        validate_config(prepare_config(fractional))


def ray_resources(group: dict) -> dict:
    """Ray resources a KubeRay worker group advertises: GPUs from the container limits, custom ones from
    rayStartParams (a JSON string quoted for the shell, hence decoded twice)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    custom = group["rayStartParams"].get("resources")
    gpus = {"GPU": int(limits["nvidia.com/gpu"])} if "nvidia.com/gpu" in limits else {}
    return {**gpus, **(json.loads(json.loads(custom)) if custom else {})}


def test_kuberay_manifests_mirror_the_aws_node_types():
    aws, cluster, job = load("aws.yaml"), load("kuberay/raycluster.yaml"), load("kuberay/rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == (
        "ray.io/v1",
        "RayCluster",
        "ray.io/v1",
        "RayJob",
    )
    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == aws["idle_timeout_minutes"] * 60
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups.keys() == workers(aws).keys()
    for name, node_type in workers(aws).items():
        group = groups[name]
        assert (group["minReplicas"], group["maxReplicas"]) == (node_type["min_workers"], node_type["max_workers"])
        assert ray_resources(group) == {k: v for k, v in node_type["resources"].items() if k != "CPU"}
    pods = [spec["headGroupSpec"], *groups.values()]
    assert len({c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}) == 1
    dockerfile = (CLUSTER / "Dockerfile").read_text().splitlines()
    assert next(line.split()[1] for line in dockerfile if line.startswith("FROM")) == aws["docker"]["image"]
    assert job["spec"]["entrypoint"] == "python pipelines/full.py --config cluster/configs/full.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def fake_cluster_config(port: int) -> dict:
    """cluster/aws.yaml's worker node types (same names and resources, at most one node each) on Ray's fake
    multi-node provider, whose nodes are raylets on this machine; idle nodes go after 6 s."""
    aws = load("aws.yaml")
    types = {
        name: {"resources": t["resources"], "node_config": {}, "min_workers": 0, "max_workers": 1}
        for name, t in workers(aws).items()
    }
    types["ray.head.default"] = {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}
    provider = {
        "type": "fake_multinode",
        "gcs_address": f"127.0.0.1:{port}",
        "disable_launch_config_check": True,
        "disable_node_updaters": True,
        "use_node_id_as_ip": True,
    }  # fake nodes share one ip: else their load is never matched, never idle
    empty = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "cluster_synced_files",
        "rsync_exclude",
        "rsync_filter",
    )
    return {
        "cluster_name": "fake",
        "max_workers": len(types),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": provider,
        "auth": {},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty},
    }


@pytest.fixture
def fake_cluster():
    """A head whose autoscaler launches fake nodes; the driver of this process is connected to it."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    port = free_port()
    config = temp / "autoscaling.json"
    config.write_text(json.dumps(fake_cluster_config(port)))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    try:
        with ray_head(
            temp,
            "--num-cpus=1",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--autoscaling-config={config}",
            env=env,
            port=port,
        ) as address:
            wait_for(lambda: (temp / "ray_current_cluster").is_file(), 120, "Ray head")  # written once it is up
            ray.init(address=address, log_to_driver=False)
            yield
            serve.shutdown()
            ray.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def wait_for(predicate, timeout_s: float, what: str):
    """Poll ``predicate`` every second until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(1)
    return value


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def test_scorer_replica_scales_up_a_gpu_scorer_node_that_is_removed_when_idle(fake_cluster, precomputed):
    from tprl_ray.service.config import ScorerConfig
    from tprl_ray.service.scorer import APP, start_scorer

    assert len(alive_nodes()) == 1 and "GPU" not in ray.cluster_resources()  # the head alone, no GPU
    start_scorer(
        ScorerConfig(pool={"gpus": 1, "cpus": 1}, resources={"scorer_slot": 1}), data=precomputed / "train"
    )  # returns once the replica is up
    nodes = alive_nodes()
    gpu = [n["Resources"] for n in nodes if n["Resources"].get("scorer_slot")]
    assert len(nodes) == 2 and len(gpu) == 1  # only a gpu-scorer node was launched, no cpu-worker
    declared = workers(load("aws.yaml"))["gpu-scorer"]["resources"]
    assert {k: gpu[0][k] for k in declared} == declared  # CPU 8, GPU 1, scorer_slot 1
    assert ray.available_resources().get("scorer_slot", 0) == 0  # held by the replica, on that node

    serve.delete(APP)  # the replica goes; its node is idle
    wait_for(lambda: len(alive_nodes()) == 1, 120, "scale-down of the idle gpu-scorer node")  # about 6 s
    assert "scorer_slot" not in ray.cluster_resources()
