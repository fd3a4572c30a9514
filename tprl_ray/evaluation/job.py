"""`tprl eval`: a benchmark in the LLaVA layout, unpruned and pruned, on a Ray Data actor pool.

Only question ids travel through Ray Data; each actor loads the model once, reads the split itself,
encodes each batch's images once and answers every question unpruned and with the pruner. The
driver joins the predictions with the answers, scores them with the benchmark's scorer and writes
``OUT`` (scores, relative scores, average kept tokens) and ``OUT.predictions.jsonl`` atomically,
then logs both to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from tprl_ray.backbones.load import BackboneConfig, Dtype, load_backbone
from tprl_ray.config import StageConfig, known_name
from tprl_ray.data.layout import atomic_write_bytes, read_split
from tprl_ray.evaluation.accuracy import predict, summarize
from tprl_ray.evaluation.metrics import BENCHMARKS
from tprl_ray.pruners.registry import PRUNERS, build_pruner
from tprl_ray.tracking import mlflow_run


class EvalConfig(StageConfig):
    """`tprl eval`: which model, benchmark split, pruner and budget; how many actors."""

    model: str = Field("embedded", description="'embedded', a checkpoint directory or a hub id")
    dtype: Dtype = Field("float32", description="weights' dtype on the actors")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    data: Path = Field(Path("runs/demo/data/test"), description="split directory in the LLaVA layout")
    benchmark: str = Field("digits", description=f"scorer: {', '.join(BENCHMARKS)}")
    pruner: str = Field("random", description=f"one of {', '.join(PRUNERS)}")
    budget: float = Field(0.25, gt=0, description="kept fraction (<= 1) or kept token count (> 1)")
    policy: str | None = Field(None, description="lfd/tprl: directory of the learned pruner "
                                                 "(lfd default: the shipped one)")
    out: Path = Field(Path("runs/eval/result.json"), description="result JSON (predictions beside it)")
    seed: int = 0
    limit: int = Field(0, ge=0, description="first N questions only (0: all)")
    batch_size: int = Field(32, ge=1, description="questions per actor call")
    actors: int = Field(1, ge=1, description="model replicas in the actor pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 if the cluster has GPUs, else 0")
    max_new_tokens: int = Field(8, ge=1)
    ray_address: str | None = Field(None, description="None: join or start Ray; 'local': a private local Ray")
    mlflow_uri: str | None = None

    @field_validator("benchmark", "pruner")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        return known_name(info.field_name, value, BENCHMARKS if info.field_name == "benchmark" else tuple(PRUNERS))

    def budget_value(self) -> float | int:
        return self.budget if self.budget <= 1 else int(self.budget)


class Predictor:
    """A Ray Data actor: one model replica answering batches of question ids under every setting."""

    def __init__(self, cfg: dict):
        self.cfg = EvalConfig.model_validate(cfg)
        self.backbone = load_backbone(BackboneConfig(path=self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device))
        self.samples = {s.question_id: s for s in read_split(self.cfg.data, check_images=False)}
        self.settings = [("none", build_pruner("none"), 1.0)]
        if self.cfg.pruner != "none":
            pruner = build_pruner(self.cfg.pruner, self.cfg.seed, self.cfg.policy)
            self.settings.append((self.cfg.pruner, pruner, self.cfg.budget_value()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        chunk = [self.samples[str(q)] for q in batch["question_id"]]
        out = predict(self.backbone, self.cfg.data, chunk, self.settings, self.cfg.max_new_tokens)
        rows = [{"setting": label, **r} for label, records in out.items() for r in records]
        return {key: [row[key] for row in rows] for key in ("setting", "question_id", "prediction", "visual_tokens")}


def run_eval(cfg: EvalConfig) -> dict:
    import ray

    from tprl_ray.ray_setup import gpus_per_actor, init_ray

    samples = read_split(cfg.data)  # validates everything (images included) before any actor starts
    if cfg.limit:
        samples = samples[: cfg.limit]
    init_ray(cfg.ray_address)
    gpus = gpus_per_actor(cfg.gpus_per_actor)
    ds = ray.data.from_items([{"question_id": s.question_id} for s in samples])
    predictions = ds.map_batches(Predictor, fn_constructor_kwargs={"cfg": json.loads(cfg.model_dump_json())},
                                 batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                                 num_cpus=cfg.cpus_per_actor, num_gpus=gpus).take_all()
    by_setting: dict[str, dict[str, dict]] = {}
    for row in predictions:
        by_setting.setdefault(row["setting"], {})[row["question_id"]] = row
    records = {}
    for label, rows in by_setting.items():
        missing = [s.question_id for s in samples if s.question_id not in rows]
        if missing:
            raise RuntimeError(f"{label}: no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
        records[label] = [{**s.extra, "question_id": s.question_id, "category": s.category, "answer": s.answer,
                           "prediction": rows[s.question_id]["prediction"],
                           "visual_tokens": float(rows[s.question_id]["visual_tokens"])} for s in samples]
    summaries = {label: summarize(cfg.benchmark, recs) for label, recs in records.items()}
    result = relative_result(cfg, summaries)
    predictions_path = cfg.out.with_suffix(".predictions.jsonl")
    atomic_write_bytes(predictions_path, "".join(
        json.dumps({"setting": label, **r}) + "\n" for label, recs in records.items() for r in recs).encode())
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    with mlflow_run(cfg.out.parent, "tprl-eval", f"{cfg.benchmark}-{cfg.pruner}-{cfg.budget:g}", cfg.mlflow_uri,
                    params=cfg.flat()):
        mlflow.log_metrics({"score": result["score"], "relative": result["relative"],
                            "avg_tokens": result["avg_tokens"], "unpruned_score": result["unpruned"]["score"]})
        mlflow.log_artifact(str(cfg.out))
        mlflow.log_artifact(str(predictions_path))
    return result


def relative_result(cfg: EvalConfig, summaries: dict[str, dict]) -> dict:
    """The pruned run's scores with each divided by the unpruned one's."""
    base, run = summaries["none"], summaries[cfg.pruner]

    def ratio(value: float, reference: float) -> float:
        return value / reference if reference else 0.0

    return {
        "benchmark": cfg.benchmark, "model": cfg.model, "data": str(cfg.data), "pruner": cfg.pruner,
        "budget": cfg.budget, "n": run["n"], "score": run["accuracy"], "avg_tokens": run["avg_tokens"],
        "relative": ratio(run["accuracy"], base["accuracy"]), "per_category": run["per_type"],
        "relative_per_category": {c: ratio(v, base["per_type"].get(c, 0.0)) for c, v in run["per_type"].items()},
        "unpruned": {"score": base["accuracy"], "per_category": base["per_type"], "avg_tokens": base["avg_tokens"]},
        "metrics": run["metrics"],
    }
