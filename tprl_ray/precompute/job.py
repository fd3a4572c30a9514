"""`tprl precompute`: features, query embeddings, full-token scores and VisPruner demonstrations to Parquet.

The data flow (Ray Data, streaming, one row per shard)::

    shard of question ids --> decode its images (CPU tasks) --> PrecomputeWorker actors (GPU each when present):
        per batch: encode once per image (features + attention), query embedding, full-token score,
        nested VisPruner demonstration masks;
        then write the shard atomically (rows, then its rejects file) on storage every node sees
    --> the driver counts the shards' rows

Only ids and decoded pixels travel to the actors and only counts come back; the questions are read
by each actor from the split. A corrupt image or a question without an answer goes to the rejects
with its reason while the run goes on; re-running skips every complete shard. Schema: :mod:`tprl_ray.precompute.schema`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from tprl_ray.artifacts.atomic import atomic_write_bytes, remove_leftovers, write_parquet
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.artifacts.resume import refuse_other_settings
from tprl_ray.data.layout import DataError, Reject, Sample
from tprl_ray.data.mixture import Mixture
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.precompute.decode import decode_shard
from tprl_ray.precompute.demonstrations import DEMONSTRATORS, demonstration_masks
from tprl_ray.precompute.schema import SCHEMA_VERSION, reject_table, shard_table


def reference_answer(answer: str | list[str]) -> str:
    """The answer scores use: the answer itself, or the most common of several (VQAv2)."""
    return answer if isinstance(answer, str) else Counter(answer).most_common(1)[0][0]


class PrecomputeWorker:
    """One model replica: computes whole shards (in batches of ``pool.batch_size``) and writes each one itself, so
    only its counts go back to the driver."""

    def __init__(self, cfg: dict):
        from tprl_ray.backbones.load import load_backbone

        self.cfg = PrecomputeConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.threads)
        self.backbone = load_backbone(self.cfg.backbone)
        self.demonstrator = DEMONSTRATORS[self.cfg.demonstrator]()
        self.mixture = Mixture.of(self.cfg.data)
        self.samples = {s.question_id: s for s in self.mixture.read(rejects=[])}
        self.ready = time.time()  # start-up ends here for this replica (the bench's breakdown)

    def text_problem(self, sample: Sample) -> str:
        """Why the model cannot score this question ('' if it can): no answer, an answer or a
        question the tokenizer cannot handle."""
        from tprl_ray.backbones.base import BackboneError

        if not sample.answer or not reference_answer(sample.answer).strip():
            return f"question {sample.question_id}: empty answer"
        try:
            self.backbone.answer_ids(sample.text, reference_answer(sample.answer))
            self.backbone.query_embedding(sample.text)
        except BackboneError as exc:
            return f"question {sample.question_id}: {exc}"
        return ""

    def __call__(self, shard: dict) -> dict:
        """Compute one decoded shard (:func:`~tprl_ray.precompute.decode.decode_shard`) and write it: its rows,
        then its rejects. Returns the shard's counts, when its computation began and when this replica was ready."""
        began, k = time.time(), int(shard["shard"])
        ids, images, pixels, errors = (list(shard[key]) for key in ("sample_id", "image", "pixels", "error"))
        good, bad = [], []
        for start in range(0, len(ids), self.cfg.pool.batch_size):
            part = slice(start, start + self.cfg.pool.batch_size)
            rows, failed = self.rows([str(q) for q in ids[part]], pixels[part], [str(e) for e in errors[part]])
            good += rows
            bad += [(start + i, reason) for i, reason in failed]
        bad = [{"sample_id": str(ids[i]), "image": str(images[i]), "reason": reason} for i, reason in bad]
        write_shard(self.cfg, k, good, bad)
        return {"shard": k, "rows": len(good), "rejects": len(bad), "began": began, "ready": self.ready}

    @torch.no_grad()
    def rows(self, ids: list[str], pixels: list, errors: list[str]) -> tuple[list[dict], list[tuple[int, str]]]:
        """One batch: the rows of the questions the model can score, and (position, reason) for the others."""
        errors = [e or self.text_problem(self.samples[q]) for e, q in zip(errors, ids)]
        ok = [i for i, e in enumerate(errors) if not e]
        samples = [self.samples[ids[i]] for i in ok]
        names = list(dict.fromkeys(s.image for s in samples))
        first = {name: ok[[s.image for s in samples].index(name)] for name in names}
        if not samples:
            return [], [(i, e) for i, e in enumerate(errors)]
        visual = self.backbone.encode(
            [Image.fromarray(np.asarray(pixels[first[n]], np.uint8)) for n in names], with_attention=True
        )
        index = [names.index(s.image) for s in samples]
        answers = [reference_answer(s.answer) for s in samples]
        logp, correct = self.backbone.score(
            [s.text for s in samples],
            answers,
            [visual.llm_tokens[j] for j in index],
            grids=[visual.grids[j] for j in index],
        )
        rows = []
        for k, (s, j) in enumerate(zip(samples, index)):
            features, attention = visual.features[j], visual.attention[j]
            query = self.backbone.query_embedding(s.text)
            masks = demonstration_masks(
                self.demonstrator, visual.llm_tokens[j], features, attention, query, self.cfg.demo_schedule
            )
            rows.append(
                {
                    "sample_id": s.question_id,
                    "dataset": self.mixture.dataset(s.question_id),
                    "image": s.image,
                    "question": s.text,
                    "answer": answers[k],
                    "category": s.category,
                    "grid_rows": visual.grids[j][0],
                    "grid_cols": visual.grids[j][1],
                    "features": features.half().cpu().numpy(),
                    "attention": attention.float().cpu().numpy(),
                    "query": query.float().cpu().numpy(),
                    "full_logp": float(logp[k]),
                    "full_correct": bool(correct[k]),
                    "demo_masks": masks.cpu().numpy().T,  # token-major [N, S]
                    **(
                        {}
                        if self.backbone.projects_features
                        else {"llm_tokens": visual.llm_tokens[j].half().cpu().numpy()}
                    ),
                }
            )
        return rows, [(i, e) for i, e in enumerate(errors) if e]


def _where(cfg: PrecomputeConfig) -> str:
    return str(cfg.data) if isinstance(cfg.data, Path) else ", ".join(str(p.path) for p in cfg.data)


def shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    return out / "shards" / f"shard-{shard:05d}.parquet", out / "rejects" / f"shard-{shard:05d}.parquet"


def write_manifest(cfg: PrecomputeConfig, samples: list[Sample], extra: dict | None = None) -> None:
    """Refuse to mix runs: an existing manifest must describe the same inputs and settings."""
    ids = hashlib.sha256("\n".join(s.question_id for s in samples).encode()).hexdigest()
    identity = {
        "schema_version": SCHEMA_VERSION,
        "model": cfg.backbone.path,
        "data": str(cfg.data) if isinstance(cfg.data, Path) else Mixture.of(cfg.data).describe(),
        "demo_schedule": cfg.demo_schedule,
        "demonstrator": cfg.demonstrator,
        "shard_size": cfg.shard_size,
        "sample_ids_sha256": ids,
    }
    path = cfg.out / "manifest.json"
    if path.is_file():
        old = {"demonstrator": "vispruner", **json.loads(path.read_text())}  # the one before the setting
        refuse_other_settings({k: old.get(k) for k in identity}, identity, cfg.out, "precompute")
    atomic_write_bytes(path, json.dumps({**identity, **(extra or {})}, indent=2).encode())


def run_precompute(cfg: PrecomputeConfig, progress: bool = True, engine: str = "ray") -> dict:
    """Compute every pending shard; ``engine="local"`` runs the same steps in this process without Ray
    (the baseline of `tprl bench precompute`)."""
    from tprl_ray.backbones.inputs import ModelInputs

    started = time.time()
    check_writable(cfg.out)
    for directory in (cfg.out, cfg.out / "shards", cfg.out / "rejects"):  # what a killed run left half-written
        remove_leftovers(directory)
    unanswered: list[Reject] = []
    mixture = Mixture.of(cfg.data)
    samples = mixture.read(rejects=unanswered, limit=cfg.limit)
    model = ModelInputs.load(cfg.backbone)
    samples, too_long = model.within_length(
        samples, cfg.backbone, lambda s: model.question_tokens(reference_answer(s.answer))
    )
    if not samples:
        example = f", e.g. {(unanswered + too_long)[0].reason}" if unanswered + too_long else ""
        raise DataError(f"{_where(cfg)}: no question is left to precompute{example}")
    by_part = {part.name: [s for s in samples if mixture.dataset(s.question_id) == part.name] for part in mixture.parts}
    vocabulary = {name: model.unknown_words(name, part, "precompute") for name, part in by_part.items()}
    write_manifest(cfg, samples)
    for name, rejects in (("unanswered", unanswered), ("too_long", too_long)):
        write_parquet(
            reject_table([{"sample_id": r.question_id, "image": r.image, "reason": r.reason} for r in rejects]),
            cfg.out / "rejects" / f"{name}.parquet",
        )
    shards = [samples[i : i + cfg.shard_size] for i in range(0, len(samples), cfg.shard_size)]
    pending = [k for k in range(len(shards)) if not shard_paths(cfg.out, k)[1].is_file()]
    items = [
        {
            "shard": k,
            "sample_id": [s.question_id for s in shards[k]],
            "image": [s.image for s in shards[k]],
            "path": [str(mixture.image_path(s.image)) for s in shards[k]],
        }
        for k in pending
    ]
    prepared = ray_up = first_ready = first_shard = started
    if items:
        prepared = time.time()
        if engine == "ray":
            from tprl_ray.ray_setup import init_ray

            init_ray(cfg.ray_address)
        ray_up = time.time()
        done = ray_shards(cfg, items) if engine == "ray" else local_shards(cfg, items)
        first_shard, first_ready = follow(done, sum(len(shards[k]) for k in pending), progress)
    counts = dataset_counts(cfg.out, len(shards))
    left_out = {"unanswered": len(unanswered), "too_long": len(too_long)}
    datasets = dict(Counter(mixture.dataset(s.question_id) for s in samples))
    extra = {"shards": len(shards), **counts, **left_out, "datasets": datasets, "vocabulary": vocabulary}
    write_manifest(cfg, samples, extra)
    return {
        **counts,
        "datasets": datasets,
        **left_out,
        "vocabulary": vocabulary,
        "shards": len(shards),
        "shards_computed": len(pending),
        "shards_skipped": len(shards) - len(pending),
        "seconds": round(time.time() - started, 3),
        "startup_seconds": round(first_shard - started, 3),
        "startup": {  # seconds from the start: where the start-up went
            "prepared": round(prepared - started, 3),
            "ray_init": round(ray_up - prepared, 3),
            "first_worker_ready": round(first_ready - started, 3),
        },
    }


def ray_shards(cfg: PrecomputeConfig, items: list[dict]):
    """The Ray Data pipeline (on the Ray joined or started), one row per shard: decoding tasks, then the model's actor
    pool, which writes each shard; only the shards' counts come back."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows
    size, gpus = pool_size(cfg)
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(decode_shard, num_cpus=cfg.decode_cpus, compute=ray.data.TaskPoolStrategy(size=cfg.decode_tasks))
        .map(
            PrecomputeWorker,
            fn_constructor_kwargs={"cfg": json.loads(cfg.model_dump_json())},
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cfg.pool.cpus,
            num_gpus=gpus,
        )
        .iter_rows()
    )


def pool_size(cfg: PrecomputeConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): ``pool.size``; with ``pool.gpus`` None (detect), at most as many actors as the GPUs,
    or else the CPUs the decoding tasks leave, that the cluster has now (none waits for a device that is not
    there)."""
    import ray

    from tprl_ray.ray_setup import gpus_per_actor

    gpus = gpus_per_actor(cfg.pool.gpus)
    if cfg.pool.gpus is not None:
        return cfg.pool.size, gpus
    have = ray.cluster_resources()
    fit = have["GPU"] // gpus if gpus else (have.get("CPU", 0) - cfg.decode_cpus * cfg.decode_tasks) // cfg.pool.cpus
    return max(1, min(cfg.pool.size, int(fit))), gpus


def local_shards(cfg: PrecomputeConfig, items: list[dict]):
    """The same decode and worker steps, shard after shard, in this process (with its own torch threads)."""
    worker = PrecomputeWorker(json.loads(cfg.model_copy(update={"threads": torch.get_num_threads()}).model_dump_json()))
    return (worker(decode_shard(item)) for item in items)


def follow(done, total: int, progress: bool) -> tuple[float, float]:
    """Count the written shards' rows on a progress bar; returns when the first shard's computation began (start-up
    ends there) and when the first model replica was ready."""
    began, ready = [], []
    with tqdm(total=total, desc="precompute", unit="row", disable=not progress) as bar:
        for shard in done:
            began.append(shard["began"])
            ready.append(shard["ready"])
            bar.update(shard["rows"] + shard["rejects"])
    return min(began), min(ready)


def write_shard(cfg: PrecomputeConfig, shard: int, good: list[dict], bad: list[dict]) -> None:
    rows_path, rejects_path = shard_paths(cfg.out, shard)
    if good:
        write_parquet(shard_table(good, cfg.demo_schedule, cfg.backbone.path), rows_path)
    write_parquet(reject_table(bad), rejects_path)


def dataset_counts(out: Path, n_shards: int) -> dict:
    rows = sum(pq.read_metadata(p).num_rows for k in range(n_shards) if (p := shard_paths(out, k)[0]).is_file())
    rejects = sum(
        pq.read_metadata(shard_paths(out, k)[1]).num_rows for k in range(n_shards) if shard_paths(out, k)[1].is_file()
    )
    return {"rows": rows, "rejects": rejects}


def command(cfg: PrecomputeConfig) -> None:
    """`tprl precompute`."""
    print(json.dumps(run_precompute(cfg)))
    print(f"wrote {cfg.out}")
