"""The evaluation core: one chunk of questions under several pruning settings, in this process.

Each batch of questions is encoded once (with the vision attention only if a pruner needs it); every
setting ``(label, pruner, budget)`` then generates its answers from the same visual tokens. The
records go to the benchmark's scorer (:mod:`tprl_ray.evaluation.metrics`). The engine
(:mod:`tprl_ray.evaluation.engine`) runs :func:`predict` on a Ray Data actor pool; :func:`evaluate`
loops over a split in process (the tiny model's validation, tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from tprl_ray.backbones.backend import Backend
from tprl_ray.data.layout import Sample, load_image
from tprl_ray.evaluation.metrics import score_benchmark
from tprl_ray.pruners.base import NoPruning, PruneBatch, Pruner

Setting = tuple[str, Pruner, float | int]


def prune_batch(
    backbone: Backend, split_dir: str | Path, chunk: list[Sample], with_attention: bool, with_query: bool = False
) -> PruneBatch:
    """Encode the chunk's images (each once) and gather per-question visual inputs."""
    names = sorted({s.image for s in chunk})
    return PruneBatch.encode(
        backbone,
        [load_image(split_dir, n) for n in names],
        [names.index(s.image) for s in chunk],
        [s.text for s in chunk],
        [s.question_id for s in chunk],
        with_attention,
        with_query,
        [s.extra for s in chunk],
    )


@torch.no_grad()
def predict(
    backbone: Backend, split_dir: str | Path, chunk: list[Sample], settings: list[Setting], max_new_tokens: int = 8
) -> dict[str, list[dict]]:
    """Per setting label, one record per question: id, category, prediction, answer, the visual
    tokens the LLM saw (average per layer for in-LLM pruning) and the question's extra fields."""
    batch = prune_batch(
        backbone,
        split_dir,
        chunk,
        any(p.needs_attention for _, p, _ in settings),
        any(p.needs_query for _, p, _ in settings),
    )
    out = {}
    for label, pruner, budget in settings:
        texts, seen = pruner.generate(backbone, batch, budget, max_new_tokens)
        out[label] = [
            {
                **s.extra,
                "question_id": s.question_id,
                "image": s.image,
                "category": s.category,
                "prediction": text,
                "answer": s.answer,
                "visual_tokens": tokens,
            }
            for s, text, tokens in zip(chunk, texts, seen)
        ]
    return out


def summarize(benchmark: str, records: list[dict]) -> dict:
    """The benchmark's scores plus ``accuracy`` (headline score), ``per_type``, ``avg_tokens``, ``n``."""
    metrics = score_benchmark(benchmark, records)
    return {
        "accuracy": metrics["score"],
        "per_type": metrics["per_category"],
        "avg_tokens": sum(r["visual_tokens"] for r in records) / max(1, len(records)),
        "n": len(records),
        "metrics": metrics,
    }


def evaluate(
    backbone: Backend,
    split_dir: str | Path,
    samples: list[Sample],
    pruner: Pruner | None = None,
    budget: float | int = 1.0,
    batch_size: int = 64,
    progress: bool = False,
    benchmark: str = "digits",
) -> dict:
    """One setting (the unpruned model when ``pruner`` is None) over ``samples`` in this process; see
    :func:`summarize`."""
    setting = ("run", pruner or NoPruning(), budget)
    records = []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress, leave=False):
        records += predict(backbone, split_dir, samples[start : start + batch_size], [setting])["run"]
    return summarize(benchmark, records)
