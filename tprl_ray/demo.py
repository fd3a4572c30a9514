"""`make demo` / `tprl demo`: the main job on the embedded default.

Builds the digits benchmark, obtains the tiny LLaVA (the shipped checkpoint, or trains one), evaluates
it on the held-out test split unpruned and with every pruner at every budget, prints a table, writes
``OUT/report.json`` and logs the run to MLflow (sqlite store in ``OUT/mlflow.db``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from pydantic import Field

from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.load import EMBEDDED_MODEL, load_backbone
from tprl_ray.config import StageConfig
from tprl_ray.data.digits import CATEGORIES, DigitsConfig, build_digits
from tprl_ray.data.layout import atomic_write_bytes, read_split
from tprl_ray.evaluation.accuracy import evaluate
from tprl_ray.evaluation.report import format_table, report_row
from tprl_ray.models.train_tiny import TinyModelConfig, train_tiny
from tprl_ray.pruners.random import RandomPruner
from tprl_ray.tracking import mlflow_run

PAPER_BUDGETS = [192 / 576, 144 / 576, 128 / 576]


class DemoConfig(StageConfig):
    """`tprl demo`: the end-to-end run on the embedded default."""

    out: Path = Field(Path("runs/demo"), description="output directory")
    seed: int = Field(0, description="benchmark seed (the shipped model was trained on seed 0)")
    model: str = Field("embedded", description="'embedded' (shipped checkpoint), 'train', or a path")
    budgets: list[float] = Field(PAPER_BUDGETS, description="kept fractions of the visual tokens")
    pruners: list[str] = Field(["random"], description="pruners to compare against the full model")
    eval_questions: int = Field(0, ge=0, description="test questions to evaluate (0: all)")
    batch_size: int = Field(64, ge=1)
    mlflow_uri: str | None = Field(None, description="tracking URI (default: sqlite under out)")


def prepare_data(cfg: DemoConfig) -> Path:
    data_cfg = DigitsConfig(out=cfg.out / "data", seed=cfg.seed)
    meta = data_cfg.out / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["config"] == json.loads(data_cfg.model_dump_json()):
        print(f"[demo] data: reusing {data_cfg.out}")
    else:
        print(f"[demo] data: building {data_cfg.out}")
        build_digits(data_cfg)
    return data_cfg.out


def prepare_model(cfg: DemoConfig, data: Path) -> Path:
    if cfg.model == "train":
        model_cfg = TinyModelConfig(data=data, out=cfg.out / "model", seed=cfg.seed)
        print(f"[demo] model: training {model_cfg.out}")
        train_tiny(model_cfg)
        return model_cfg.out
    path = EMBEDDED_MODEL if cfg.model == "embedded" else Path(cfg.model)
    card = path / "tprl_model_card.json"
    if card.is_file():
        trained_on = json.loads(card.read_text())["benchmark"]["test_pool_fingerprint"]
        if trained_on != json.loads((data / "meta.json").read_text())["test_pool_fingerprint"]:
            raise BackboneError(f"{path} was trained on a benchmark with another digit split "
                                f"(seed); its test digits would leak. Use --model train.")
    print(f"[demo] model: {path}")
    return path


def pruner_by_name(name: str, seed: int):
    if name == "random":
        return RandomPruner(seed)
    raise ValueError(f"unknown pruner {name!r} (available: random)")


def run_demo(cfg: DemoConfig) -> dict:
    data = prepare_data(cfg)
    model_path = prepare_model(cfg, data)
    backbone = load_backbone(model_path)
    samples = read_split(data / "test", categories=CATEGORIES)
    if cfg.eval_questions:
        samples = samples[: cfg.eval_questions]
    runs = [("none", None, 1.0)] + [(p, pruner_by_name(p, cfg.seed), b) for p in cfg.pruners for b in cfg.budgets]
    rows = []
    with mlflow_run(cfg.out, "tprl-demo", "demo", cfg.mlflow_uri, params=cfg.flat()):
        for name, pruner, budget in runs:
            result = evaluate(backbone, data / "test", samples, pruner, budget, cfg.batch_size, progress=True)
            base = rows[0]["accuracy"] if rows else result["accuracy"]
            rows.append(report_row(name, budget, result, base))
            print(f"[demo] {name:>8} @ {budget:.3f}: accuracy {result['accuracy']:.3f}")
            tag = f"{name}_{round(budget * 100)}"
            mlflow.log_metrics({f"{tag}.accuracy": result["accuracy"], f"{tag}.avg_tokens": result["avg_tokens"]})
        report = {"benchmark": "digits", "model": str(model_path), "rows": rows}
        atomic_write_bytes(cfg.out / "report.json", json.dumps(report, indent=2).encode())
        mlflow.log_artifact(str(cfg.out / "report.json"))
    print(format_table(report))
    print(f"[demo] wrote {cfg.out / 'report.json'}; MLflow store {cfg.mlflow_uri or cfg.out / 'mlflow.db'}")
    return report
