"""`tprl bench scorer`: samples/s of `Backbone.score` by batch size and kept-token fraction.

Two models: the shipped tiny LLaVA on real test images, and a random-initialised LLaVA with
LLaVA-1.5-7B's layer dimensions (d=4096, 32 heads, MLP 11008, vocabulary 32064, 576 visual tokens)
and ``decoder_layers`` decoder layers (32: the whole 7B decoder), on ``device`` in ``dtype``. The
scorer receives LLM-ready visual tokens (as the scorer service will, from its cache), so the vision
tower is outside the timed region.
"""

from __future__ import annotations

import json
import time

import torch
from tqdm.auto import tqdm

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.backbones.base import Backbone
from tprl_ray.backbones.llava import LlavaBackbone
from tprl_ray.backbones.load import load_backbone, resolve_device
from tprl_ray.bench.config import ScorerBenchConfig, WorkloadBenchConfig
from tprl_ray.config import PAPER_CONFIGS, BackboneConfig


def tiny_workload(device: str, dtype: str) -> tuple[Backbone, torch.Tensor, list[str], list[str]]:
    """The shipped model with 64 real test boards and their questions."""
    from PIL import Image

    from tprl_ray.data.digits import DigitsConfig, SceneSampler, load_digit_pools, split_rng

    backbone = load_backbone(BackboneConfig(path="embedded", device=device, dtype=dtype))
    cfg = DigitsConfig()
    sampler = SceneSampler(load_digit_pools(cfg.seed, cfg.test_digit_fraction)["test"], split_rng(cfg.seed, "test"))
    scenes = [sampler.sample() for _ in range(64)]
    features = backbone.encode([Image.fromarray(s.image).convert("RGB") for s, _ in scenes]).llm_tokens
    questions = [qs[i % 4][1] for i, (_, qs) in enumerate(scenes)]
    answers = [qs[i % 4][2] for i, (_, qs) in enumerate(scenes)]
    return backbone, features, questions, answers


def llava7b_workload(layers: int, device: str, dtype: str) -> tuple[LlavaBackbone, torch.Tensor, list[str], list[str]]:
    """The shipped LLaVA-1.5-7B ``config.json`` cut to ``layers`` decoder layers and one vision layer,
    random weights (initialised on ``device`` in ``dtype``) and random visual tokens; prompts use the
    tiny tokenizer (its ids fit the vocabulary)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from tprl_ray.models.tiny_llava import TinyLlavaSize, build_processor

    processor = build_processor(TinyLlavaSize())
    config = AutoConfig.from_pretrained(PAPER_CONFIGS["llava-1.5-7b"])
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = 1
    config.vision_feature_layer = -1
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config.text_config.dtype = config.dtype = dtype
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    features = (torch.randn(64, 576, 4096) * 0.02).to(device, getattr(torch, dtype))
    return LlavaBackbone(model, processor, device), features, ["what digit is at c2 ?"] * 64, ["7"] * 64


def time_cell(backbone, features, questions, answers, batch: int, fraction: float, min_seconds: float) -> float:
    """Samples per second of ``score`` at one batch size and kept fraction (after one warm-up call)."""
    from tprl_ray.pruners.random import random_keep

    feats, qs, ans = features[:batch], questions[:batch], answers[:batch]
    keep = None if fraction >= 1.0 else random_keep(feats, fraction)
    backbone.score(qs, ans, feats, keep)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        backbone.score(qs, ans, feats, keep)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def workloads(cfg: WorkloadBenchConfig) -> dict:
    """Workload builders by model name, checked against the known ones; sets torch's thread count."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    makers = {
        "tiny": lambda: tiny_workload(device, cfg.dtype),
        "llava-7b-shape": lambda: llava7b_workload(cfg.decoder_layers, device, cfg.dtype),
    }
    unknown = set(cfg.models) - set(makers)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {sorted(makers)}")
    return {name: makers[name] for name in cfg.models}


def run_scorer_bench(cfg: ScorerBenchConfig) -> dict:
    rows = []
    for name, make in workloads(cfg).items():
        workload = make()
        sizes = cfg.batch_sizes if name == "tiny" else cfg.large_batch_sizes
        cells = [(b, f) for b in sizes for f in cfg.fractions]
        for batch, fraction in tqdm(cells, desc=f"bench {name}", unit="cell"):
            rate = time_cell(*workload, batch=batch, fraction=fraction, min_seconds=cfg.min_seconds)
            rows.append({"model": name, "batch": batch, "fraction": fraction, "samples_per_s": rate})
    result = {
        "bench": "scorer",
        "device": device_name(cfg.device),
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "ratios": ratios(rows),
    }
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    return result


def device_name(device: str) -> str:
    """The name of the GPU that ``device`` (a bench config's) resolves to, or 'cpu'."""
    resolved = torch.device(resolve_device(device))
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu"


def ratios(rows: list[dict]) -> dict:
    """Batching gain (each batch vs the smallest) and pruning gain (smallest vs largest fraction)."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        rate = {(r["batch"], r["fraction"]): r["samples_per_s"] for r in rows if r["model"] == model}
        batches, fracs = sorted({b for b, _ in rate}), sorted({f for _, f in rate})
        full = max(fracs)
        out[model] = {
            **{f"batch{b}_over_batch{batches[0]}": rate[(b, full)] / rate[(batches[0], full)] for b in batches[1:]},
            **{f"frac{fracs[0]}_over_{full}_batch{b}": rate[(b, fracs[0])] / rate[(b, full)] for b in batches},
        }
    return out


def format_bench(result: dict) -> str:
    lines = [f"{'model':>15} | {'batch':>5} | {'kept':>5} | {'samples/s':>10}", "-" * 46]
    lines += [
        f"{r['model']:>15} | {r['batch']:>5} | {r['fraction']:>5.2f} | {r['samples_per_s']:>10.1f}"
        for r in result["rows"]
    ]
    lines += [f"{m}: " + ", ".join(f"{k} {v:.2f}x" for k, v in d.items()) for m, d in result["ratios"].items()]
    return "\n".join(lines)


def command(cfg: ScorerBenchConfig) -> None:
    """`tprl bench scorer`."""
    print(format_bench(run_scorer_bench(cfg)))
    print(f"wrote {cfg.out}")
