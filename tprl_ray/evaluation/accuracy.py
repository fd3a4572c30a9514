"""In-process evaluation of a backbone (optionally pruned) on a split in the LLaVA layout."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tprl_ray.backbones.base import Backbone
from tprl_ray.data.layout import Sample, load_image
from tprl_ray.pruners.base import Pruner


def normalize(answer: str) -> str:
    return " ".join(answer.strip().lower().split())


@torch.no_grad()
def evaluate(backbone: Backbone, split_dir: str | Path, samples: list[Sample],
             pruner: Pruner | None = None, budget: float | int = 1.0, batch_size: int = 64,
             progress: bool = False) -> dict:
    """Greedy-decode every sample with the kept tokens; exact-match accuracy overall and per category.

    Returns ``{"accuracy", "per_type", "avg_tokens", "n"}``.
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    kept_total = 0
    for start in tqdm(range(0, len(samples), batch_size), desc=f"eval {pruner.name if pruner else 'none'}",
                      unit="batch", disable=not progress, leave=False):
        chunk = samples[start:start + batch_size]
        names = sorted({s.image for s in chunk})
        visual = backbone.encode([load_image(split_dir, n) for n in names])
        index = [names.index(s.image) for s in chunk]
        tokens, grids = [visual.llm_tokens[j] for j in index], [visual.grids[j] for j in index]
        questions = [s.text for s in chunk]
        keep = None if pruner is None else pruner.keep(tokens, [s.question_id for s in chunk], questions, budget)
        kept_total += sum(len(t) for t in tokens) if keep is None else sum(len(k) for k in keep)
        for s, pred in zip(chunk, backbone.generate(questions, tokens, keep, grids)):
            hits[s.category].append(normalize(pred) == normalize(s.answer))
    every = [h for v in hits.values() for h in v]
    return {
        "accuracy": sum(every) / max(1, len(every)),
        "per_type": {c: sum(v) / len(v) for c, v in sorted(hits.items())},
        "avg_tokens": kept_total / max(1, len(samples)),
        "n": len(every),
    }
