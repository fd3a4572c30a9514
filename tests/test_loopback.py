"""Every Ray the project starts itself listens on loopback only: the private one of ``init_ray("local")`` and the
tests' own heads (``conftest.ray_head``). Each process of that Ray is listed with its listening TCP and unconnected
UDP sockets; an address off 127.0.0.0/8 and ::1 fails the test, naming the process."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import ray
from conftest import free_port, ray_head

from tprl_ray.ray_setup import init_ray

# What must run, and listen, before the listing is taken. The log monitor and `ray start` listen on nothing.
LISTENERS = {"driver", "gcs_server", "raylet", "worker", "dashboard agent", "runtime env agent", "autoscaler monitor"}
LOCAL = {"required": {*LISTENERS, "log monitor", "dashboard"}, "listening": LISTENERS | {"dashboard"}}
HEAD = {
    "required": {*LISTENERS, "log monitor", "dashboard", "ray client server", "ray start"},
    "listening": LISTENERS | {"dashboard", "ray client server"},
}


def component(p: psutil.Process) -> str:
    """Which part of Ray ``p`` is, from its command line (Ray's own processes retitle themselves ``ray::...``)."""
    if p.pid == os.getpid():
        return "driver"
    cmd = " ".join(p.cmdline())
    exe = Path(p.cmdline()[0]).name if p.cmdline() else ""
    for marker, name in (
        ("ray::DashboardAgent", "dashboard agent"),
        ("ray::RuntimeEnvAgent", "runtime env agent"),
        ("log_monitor.py", "log monitor"),
        ("autoscaler/_private/monitor.py", "autoscaler monitor"),
        ("autoscaler/v2/monitor.py", "autoscaler monitor"),
        ("dashboard/dashboard.py", "dashboard"),
        ("ray.util.client.server", "ray client server"),
    ):
        if marker in cmd:
            return name
    if exe in ("gcs_server", "raylet"):
        return exe
    if cmd.startswith("ray::"):
        return "worker"
    if cmd.startswith("ray-dashboard-") or "from multiprocessing." in cmd:
        return "dashboard module"  # the dashboard's subprocess modules and their fork server
    args = p.cmdline()
    if any(Path(a).name == "ray" and args[i + 1 : i + 2] == ["start"] for i, a in enumerate(args[:2])):
        return "ray start"  # the `ray` script, run by its python
    return p.name()


def ray_processes(marker: str, *, pids: tuple[int, ...] = (), group: bool = False) -> list[psutil.Process]:
    """The processes ``pids``, every process whose command line names ``marker`` (a session or temp dir: Ray passes
    it to each process it starts), all their descendants (the raylet's workers and agents are retitled) and, with
    ``group``, every process in the process group of the ``ray start`` among them."""
    found: dict[int, psutil.Process] = {pid: psutil.Process(pid) for pid in pids}
    everything = list(psutil.process_iter())
    for p in everything:
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(p.cmdline()):
                found[p.pid] = p
    if group:
        groups = set()
        for p in list(found.values()):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if component(p) == "ray start":
                    groups.add(os.getpgid(p.pid))
        for p in everything:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) in groups:
                    found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def components(processes: list[psutil.Process]) -> set[str]:
    """The components among ``processes`` still running."""
    running = set()
    for p in processes:
        with contextlib.suppress(psutil.Error):
            running.add(component(p))
    return running


def sockets(processes: list[psutil.Process]) -> list[tuple[str, int, str, str, int]]:
    """(component, pid, protocol, ip, port) for each listening TCP socket and each bound, unconnected UDP socket
    (one that takes datagrams from anyone) of ``processes``."""
    rows = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            name = component(p)
            for c in p.net_connections(kind="inet"):
                tcp = c.type == socket.SOCK_STREAM
                if c.laddr and (c.status == psutil.CONN_LISTEN if tcp else not c.raddr):
                    rows.append((name, p.pid, "tcp" if tcp else "udp", c.laddr.ip, c.laddr.port))
    return sorted(set(rows))


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 is loopback too


# The ports Ray's servers report in the session dir once bound (-1: not started, e.g. the agent's HTTP port held).
PORT_FILES = ("gcs_server_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port")
AGENT_HTTP = "dashboard_agent_listen_port"


def reported_ports(session: Path) -> dict[str, int] | None:
    """Ray's port files in ``session`` (the dashboard agent writes its HTTP port once that server has started or
    given up); None until all are there."""
    ports = {}
    for name in (*PORT_FILES, AGENT_HTTP):
        files = list(session.glob(f"{name}_*"))
        if not files or not (text := files[0].read_text().strip()):
            return None
        ports[name] = int(text)
    return ports


def assert_loopback_only(find: Callable[[], list[psutil.Process]], expect: dict[str, set[str]], session: Path):
    """Wait until every component of ``expect["required"]`` runs, those of ``expect["listening"]`` and the ports
    reported in ``session`` listen, and the listing has held for 3 s; then fail on any socket off loopback."""
    timeout_s = 120
    deadline, held, since = time.monotonic() + timeout_s, None, time.monotonic()
    while True:
        processes, ports = find(), reported_ports(session)
        rows = sockets(processes)
        missing = (expect["required"] - components(processes)) | (expect["listening"] - {row[0] for row in rows})
        if ports is None:
            missing.add("port files")
        else:
            missing |= {
                f"{name} {port}" for name, port in ports.items() if port > 0 and port not in {r[4] for r in rows}
            }
        if rows != held:
            held, since = rows, time.monotonic()
        if not missing and time.monotonic() - since >= 3:
            break
        assert time.monotonic() < deadline, f"after {timeout_s} s, not running or not listening: {missing}; {rows}"
        time.sleep(1)
    off = [f"{name} (pid {pid}) {proto} {ip}:{port}" for name, pid, proto, ip, port in rows if not is_loopback(ip)]
    assert not off, "listening off loopback:\n" + "\n".join(off)
    return rows


@ray.remote
def pid() -> int:
    return os.getpid()


def metric_ports(monkeypatch):
    """Free ports for the dashboard's and the autoscaler's metrics servers (44227 and 44217 by default, which another
    Ray on this host may hold, leaving nothing to check)."""
    for var in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"):
        monkeypatch.setenv(var, str(free_port()))


def test_init_ray_local_listens_on_loopback_only(monkeypatch):
    metric_ports(monkeypatch)
    ray.shutdown()
    init_ray("local", num_cpus=2)
    try:
        assert ray.get([pid.remote() for _ in range(4)])  # workers exist
        session = ray._private.worker.global_worker.node.get_session_dir_path()
        assert_loopback_only(lambda: ray_processes(session, pids=(os.getpid(),)), LOCAL, Path(session))
    finally:
        ray.shutdown()


def test_test_head_listens_on_loopback_only():
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    ray.shutdown()
    try:
        with ray_head(
            temp,
            "--num-cpus=1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
        ) as address:
            deadline = time.monotonic() + 120
            while not (temp / "ray_current_cluster").is_file():  # written once the head is up
                assert time.monotonic() < deadline, "no Ray head after 120 s"
                time.sleep(1)
            ray.init(address=address, log_to_driver=False)
            try:
                assert ray.get([pid.remote() for _ in range(2)])  # workers exist
                find = lambda: ray_processes(str(temp), pids=(os.getpid(),), group=True)  # noqa: E731
                assert_loopback_only(find, HEAD, temp / "session_latest")
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
