"""`tprl bench serve`: a bounded load test of `tprl serve` on loopback.

The bench starts the server (or takes ``url``, a running one on 127.0.0.1), then for each kept fraction
and concurrency sends ``warmup`` untimed and ``requests`` timed chat requests (the split's boards and
questions, each request's ``budget`` the fraction) with that many in flight, stopping a cell at
``time_limit_s``. It reports requests/s, p50 and p99 latency, and each fraction's ratios to the
first one (throughput and p99) at every concurrency. ``--model llava-7b-shape --backend vllm`` on a
GPU machine times vLLM against ``hf`` (run it twice, once per backend).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.bench.config import ServeBenchConfig
from tprl_ray.config import ConfigError


def payloads(cfg: ServeBenchConfig, name: str) -> list[dict]:
    """One chat request per question of the split (cycled by the cells)."""
    from tprl_ray.data.layout import read_split

    samples = read_split(cfg.data)
    images = {}
    for s in samples:
        if s.image not in images:
            data = (cfg.data / "images" / s.image).read_bytes()
            images[s.image] = "data:image/png;base64," + base64.b64encode(data).decode()
    return [
        {
            "model": name,
            "max_tokens": cfg.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": s.text},
                        {"type": "image_url", "image_url": {"url": images[s.image]}},
                    ],
                }
            ],
        }
        for s in samples
    ]


async def run_cell(url: str, bodies: list[dict], fraction: float, concurrency: int, cfg: ServeBenchConfig) -> dict:
    """``warmup`` then ``requests`` requests with ``concurrency`` in flight; latencies, errors, throughput."""
    import httpx

    latencies, errors, kept, sent = [], [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=cfg.time_limit_s) as client:

        async def one(i: int, timed: bool) -> None:
            body = {**bodies[i % len(bodies)], "budget": fraction}
            start = time.perf_counter()
            try:
                response = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:  # a timeout or a dropped connection is an error of the cell
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            if not timed:
                return
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                return
            latencies.append(time.perf_counter() - start)
            kept.append(response.json()["usage"]["visual_tokens"])

        for i in range(0, cfg.warmup, concurrency):
            await asyncio.gather(*(one(j, False) for j in range(i, min(cfg.warmup, i + concurrency))))
        deadline = time.perf_counter() + cfg.time_limit_s
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while sent < cfg.requests and time.perf_counter() < deadline:
                sent += 1
                await one(cfg.warmup + sent, True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {
        "fraction": fraction,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": seconds,
        "requests_per_s": len(latencies) / seconds,
        "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
        "visual_tokens": float(np.mean(kept)) if kept else None,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"url {url}: the load test targets loopback endpoints only (127.0.0.1)")


def llava7b_checkpoint(cfg: ServeBenchConfig) -> Path:
    """The 7B-shaped LLaVA (random weights, ``decoder_layers`` layers) saved once under ``work``."""
    from tprl_ray.bench.scorer import llava7b_workload

    out = cfg.work / f"llava-7b-shape-{cfg.decoder_layers}l-{cfg.serve.backbone.dtype}"
    if not out.is_dir():  # written beside, then renamed: a killed run leaves no half checkpoint
        backbone, *_ = llava7b_workload(cfg.decoder_layers, "cpu", cfg.serve.backbone.dtype)
        vision, processor = backbone.model.config.vision_config, backbone.processor
        processor.image_processor.size = {"shortest_edge": vision.image_size}  # the tiny tokenizer, 7B's images
        processor.image_processor.crop_size = {"height": vision.image_size, "width": vision.image_size}
        processor.patch_size = vision.patch_size
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        backbone.model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Each fraction's throughput and p99 over the first fraction's, per backend and concurrency; and vllm's
    over hf's at each fraction and concurrency."""
    out = []

    def ratio(r: dict, b: dict, against: str) -> None:
        if r["requests"] and b["requests"]:
            out.append(
                {
                    "backend": r["backend"],
                    "fraction": r["fraction"],
                    "concurrency": r["concurrency"],
                    "against": against,
                    "throughput_ratio": r["requests_per_s"] / b["requests_per_s"],
                    "p99_ratio": r["p99_s"] / b["p99_s"],
                }
            )

    first = rows[0]["fraction"]
    cell = {(r["backend"], r["fraction"], r["concurrency"]): r for r in rows}
    for (backend, fraction, concurrency), r in cell.items():
        if fraction != first:
            ratio(r, cell[(backend, first, concurrency)], f"{backend} kept {first:g}")
        if backend == "vllm" and ("hf", fraction, concurrency) in cell:
            ratio(r, cell[("hf", fraction, concurrency)], f"hf kept {fraction:g}")
    return out


def load_test(cfg: ServeBenchConfig, server, backend: str, bodies: list[dict]) -> list[dict]:
    """Every (fraction, concurrency) cell against ``server`` (started here unless ``cfg.url``)."""
    from ray import serve

    from tprl_ray.service.app import start

    server = server.model_copy(update={"backbone": server.backbone.model_copy(update={"backend": backend})})
    rows = []
    try:
        url = cfg.url.rstrip("/") if cfg.url is not None else start(server)
        for fraction in cfg.fractions:
            for concurrency in cfg.concurrency:
                rows.append({"backend": backend, **asyncio.run(run_cell(url, bodies, fraction, concurrency, cfg))})
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if cfg.url is None:
            serve.delete(server.app_name)
    return rows


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    """The load tests (``backend`` vllm: vllm's, then hf's on the same machine, after vllm's agreement with hf)."""
    from tprl_ray.ray_setup import init_ray

    model = str(llava7b_checkpoint(cfg)) if cfg.model == "llava-7b-shape" else cfg.model
    # one port for every server of the run: Serve's HTTP proxy keeps the port it started with
    server = cfg.serve.model_copy(
        update={"model": model, "ray_address": cfg.ray_address, "host": "127.0.0.1", "port": free_port()}
    )
    if cfg.url is not None:
        check_loopback(cfg.url)
    if cfg.url is None or cfg.backend == "vllm":
        init_ray(cfg.ray_address)
    result = {"model": cfg.model, "backend": cfg.backend, "pruner": server.pruner, "max_tokens": cfg.max_tokens}
    backends = ["hf"]
    if cfg.backend == "vllm":
        from tprl_ray.bench.vllm import agreement, format_agreement

        result["agreement"] = agreement(server.served_backbone(), cfg.data, 64, cfg.fractions)
        print(format_agreement(result["agreement"]), flush=True)
        backends = ["vllm"] if cfg.url is not None else ["vllm", "hf"]
    bodies = payloads(cfg, server.served_name())
    rows = [row for backend in backends for row in load_test(cfg, server, backend, bodies)]
    result.update(rows=rows, ratios=ratios(rows))
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    return result


def format_rows(rows: list[dict]) -> str:
    head = f"{'backend':>7} {'kept':>5} {'conc':>5} {'done':>5} {'err':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [head + f" {'visual':>7}"]
    ms = lambda v: f"{1e3 * v:8.1f}" if v is not None else f"{'-':>8}"
    for r in rows:
        lines.append(
            f"{r['backend']:>7} {r['fraction']:5.2f} {r['concurrency']:5d} {r['requests']:5d} {r['errors']:4d} "
            f"{r['requests_per_s']:8.2f} {ms(r['p50_s'])} {ms(r['p99_s'])} {r['visual_tokens'] or 0:7.1f}"
        )
    return "\n".join(lines)


def format_serve(result: dict) -> str:
    lines = [f"tprl serve: {result['model']}, pruner {result['pruner']}", format_rows(result["rows"])]
    for r in result["ratios"]:
        lines.append(
            f"{r['backend']} kept {r['fraction']:.2f} at concurrency {r['concurrency']} vs {r['against']}: "
            f"throughput x{r['throughput_ratio']:.2f}, p99 x{r['p99_ratio']:.2f}"
        )
    for r in [row for row in result["rows"] if row["errors"]]:
        lines.append(
            f"{r['backend']} kept {r['fraction']:.2f} at {r['concurrency']}: {r['errors']} errors, {r['first_error']}"
        )
    return "\n".join(lines)


def command(cfg: ServeBenchConfig) -> None:
    result = run_serve_bench(cfg)
    print(format_serve(result))
    print(f"wrote {cfg.out}")
