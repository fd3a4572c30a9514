"""`tprl viz`: the tokens a learned pruner keeps, step by step, drawn on the image.

Step ``T = 0`` keeps every visual token. Step ``T = t`` runs the policy over the tokens step ``t - 1``
kept (dropped ones masked out of its attention, as in the MDP) and keeps the top ``b_t * N`` of them
by keep logit, ``b_t`` the ``t``-th budget. At every step the model answers the question and scores
the reference answer (mean log-likelihood) from the kept tokens. One PNG per question shows the
steps side by side, dropped tokens dimmed; ``trajectories.json`` holds the same numbers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.backbones.backend import Backend
from tprl_ray.data.layout import DataError, Sample, load_image, read_split
from tprl_ray.evaluation.config import VizConfig
from tprl_ray.evaluation.figures import pyplot, save_png
from tprl_ray.evaluation.predict import prune_batch
from tprl_ray.precompute.job import reference_answer
from tprl_ray.pruners.base import budget_tokens
from tprl_ray.pruners.lfd import LearnedPruner

DIM = 0.3  # a dropped token keeps this much of its pixels, the rest is SHADE
SHADE = (60.0, 70.0, 120.0)


@torch.no_grad()
def trajectory(backbone: Backend, pruner: LearnedPruner, split_dir: Path, sample: Sample, cfg: VizConfig) -> dict:
    """The kept token indices at every step, with the answer and the reference answer's score there."""
    batch = prune_batch(backbone, split_dir, [sample], with_attention=False, with_query=True)
    features, query, grid = batch.features[0], batch.queries[0], batch.grids[0]
    n = features.shape[0]
    kept = [torch.arange(n)]
    for budget in cfg.budgets:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kept[-1]] = True
        logits = pruner.keep_logits(features, query, grid, mask)[kept[-1]]
        top = logits.topk(min(budget_tokens(budget, n), len(kept[-1]))).indices
        kept.append(kept[-1][top].sort().values)
    steps = len(kept)
    tokens, grids = [batch.tokens[0]] * steps, [grid] * steps
    keep = [k.to(batch.tokens[0].device) for k in kept]
    answer = reference_answer(sample.answer)
    logp, _ = backbone.score([sample.text] * steps, [answer] * steps, tokens, keep, grids)
    answers = backbone.generate([sample.text] * steps, tokens, keep, grids, cfg.max_new_tokens)
    return {
        "question_id": sample.question_id,
        "image": sample.image,
        "question": sample.text,
        "answer": answer,
        "grid": list(grid),
        "steps": [
            {"step": t, "kept": k.tolist(), "prediction": a, "answer_logp": float(lp)}
            for t, (k, a, lp) in enumerate(zip(kept, answers, logp.tolist()))
        ],
    }


def dimmed(image: Image.Image, kept: list[int], grid: tuple[int, int]) -> np.ndarray:
    """``image`` as an RGB array with the cells of the tokens not ``kept`` (raster order on ``grid``)
    dimmed: :data:`DIM` of their pixels blended with :data:`SHADE`, which stands out on dark images too."""
    rows, cols = grid
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = np.zeros(rows * cols, dtype=bool)
    keep[kept] = True
    h, w = pixels.shape[:2]
    dropped = ~keep.reshape(rows, cols)[np.arange(h) * rows // h][:, np.arange(w) * cols // w]
    pixels[dropped] = DIM * pixels[dropped] + (1 - DIM) * np.array(SHADE, dtype=np.float32)
    return pixels.round().astype(np.uint8)


def shown_image(split_dir: Path, name: str, grid: tuple[int, int], pad_to_square: bool) -> Image.Image:
    """The image as a square grid of tokens covers it (LLaVA): padded to a square with its mean colour,
    or centre-cropped to one, as the processor does; any other grid covers the whole image."""
    image = load_image(split_dir, name)
    if grid[0] != grid[1] or image.width == image.height:
        return image
    side = max(image.size) if pad_to_square else min(image.size)
    if not pad_to_square:
        return ImageOps.fit(image, (side, side))
    mean = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(axis=0))
    return ImageOps.pad(image, (side, side), color=mean)


def figure(record: dict, image: Image.Image, path: Path) -> None:
    """One PNG: a panel per step, the kept tokens bright, the question and the reference answer above."""
    steps, grid = record["steps"], tuple(record["grid"])
    n = grid[0] * grid[1]
    fig, axes = pyplot().subplots(1, len(steps), figsize=(2.6 * len(steps), 3.3), squeeze=False)
    for ax, step in zip(axes[0], steps):
        ax.imshow(dimmed(image, step["kept"], grid), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        right = step["prediction"].strip().lower() == record["answer"].strip().lower()
        ax.set_title(
            f"T = {step['step']}: {len(step['kept'])}/{n} kept\n"
            f"says {step['prediction']!r} ({'right' if right else 'wrong'})\n"
            f"log p(answer) {step['answer_logp']:.2f}",
            fontsize=8,
            color="black" if right else "firebrick",
        )
    fig.suptitle(f"{record['question']}   (answer: {record['answer']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    save_png(fig, path, dpi=110)


def chosen(samples: list[Sample], cfg: VizConfig) -> list[Sample]:
    """The named questions, or ``cfg.count`` of them taking the categories in turn."""
    if cfg.questions:
        by_id = {s.question_id: s for s in samples}
        unknown = [q for q in cfg.questions if q not in by_id]
        if unknown:
            raise DataError(f"{cfg.data}: no question(s) {', '.join(unknown)}")
        return [by_id[q] for q in cfg.questions]
    queues = defaultdict(list)
    for s in samples:
        queues[s.category].append(s)
    picked: list[Sample] = []
    while len(picked) < min(cfg.count, len(samples)):
        for queue in queues.values():
            if queue and len(picked) < cfg.count:
                picked.append(queue.pop(0))
    return picked


def run_viz(cfg: VizConfig) -> list[Path]:
    """Every chosen question's trajectory as ``OUT/<question id>.png`` and ``OUT/trajectories.json``,
    logged to MLflow (a child run ``trajectories`` inside a pipeline run); the PNG paths."""
    import mlflow
    from tqdm.auto import tqdm

    from tprl_ray.artifacts.outputs import check_writable
    from tprl_ray.backbones.inputs import ModelInputs
    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.tracking import mlflow_run

    check_writable(cfg.out)
    model = ModelInputs.load(cfg.backbone)
    samples, rejects = model.within_length(chosen(read_split(cfg.data), cfg), cfg.backbone, cfg.max_new_tokens)
    if rejects:
        raise DataError(f"{cfg.data}: {rejects[0].reason}")
    pruner = LearnedPruner(cfg.policy)
    pruner.check_widths(model.feature_width, model.embedding_width)
    backbone = load_backbone(cfg.backbone)
    records, paths = [], []
    for sample in tqdm(samples, desc="viz", unit="question"):
        record = trajectory(backbone, pruner, cfg.data, sample, cfg)
        path = cfg.out / f"{sample.question_id}.png"
        image = shown_image(cfg.data, sample.image, tuple(record["grid"]), cfg.backbone.pad_to_square)
        figure(record, image, path)
        records.append(record)
        paths.append(path)
    atomic_write_bytes(cfg.out / "trajectories.json", json.dumps(records, indent=2).encode())
    with mlflow_run(cfg.out, "tprl-viz", "trajectories", cfg.mlflow_uri, params=cfg.flat()):
        for path in [*paths, cfg.out / "trajectories.json"]:
            mlflow.log_artifact(str(path), artifact_path="trajectories")
    return paths


def command(cfg: VizConfig) -> None:
    """`tprl viz`."""
    paths = run_viz(cfg)
    print(f"wrote {len(paths)} figure(s) and trajectories.json to {cfg.out}")
