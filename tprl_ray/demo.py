"""`make demo` / `tprl demo`: the whole pipeline on the embedded default.

Builds the digits benchmark and obtains the tiny LLaVA (the shipped checkpoint, or trains one). With
``policy: train`` (the default) it then runs every stage into ``OUT``: precompute of the train and
val splits (Ray Data), the autoencoder and the LfD policy (Ray Train), PPO against the scorer
service (RLlib, Ray Serve). Finally it evaluates the held-out test split unpruned and with every
pruner at every budget (one vision pass per batch serves every setting; ``lfd`` and ``tprl`` are the
policies just trained), prints a table with each setting's FLOPs and KV cache, writes
``OUT/report.json`` and the Pareto plot ``OUT/pareto.png``. Every stage logs to one MLflow store
(sqlite ``OUT/mlflow.db`` by default). A re-run with the same ``OUT`` resumes or skips finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import mlflow
from pydantic import Field, field_validator, model_validator

from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.load import EMBEDDED_MODEL, load_backbone
from tprl_ray.config import StageConfig
from tprl_ray.data.digits import CATEGORIES, DigitsConfig, build_digits
from tprl_ray.data.layout import atomic_write_bytes, read_split
from tprl_ray.evaluation.accuracy import evaluate_settings
from tprl_ray.evaluation.efficiency import pruned_efficiency
from tprl_ray.evaluation.report import format_table, pareto_plot, report_row
from tprl_ray.models.train_tiny import TinyModelConfig, train_tiny
from tprl_ray.pruners.base import budget_tokens
from tprl_ray.pruners.registry import BASELINES, PRUNERS, build_pruner
from tprl_ray.tracking import mlflow_run, tracking_uri

PAPER_BUDGETS = [192 / 576, 144 / 576, 128 / 576]


class DemoConfig(StageConfig):
    """`tprl demo`: the end-to-end run on the embedded default."""

    out: Path = Field(Path("runs/demo"), description="output directory")
    seed: int = Field(0, description="benchmark seed (the shipped model was trained on seed 0)")
    model: str = Field("embedded", description="'embedded' (shipped checkpoint), 'train', or a path")
    budgets: list[float] = Field(PAPER_BUDGETS, description="kept fractions of the visual tokens")
    policy: Literal["train", "shipped"] = Field(
        "train", description="train: precompute, autoencoder, LfD and PPO in out; shipped: the LfD policy "
                             "shipped for the embedded model, no training (no tprl rows)")
    pruners: list[str] = Field([*BASELINES, "lfd", "tprl"], description="pruners to compare against the full model")
    eval_questions: int = Field(0, ge=0, description="test questions to evaluate (0: all)")
    train_questions: int = Field(0, ge=0, description="first N questions of the train and val splits to train on "
                                                       "(0: all)")
    autoencoder_epochs: int = Field(3, ge=1)
    lfd_epochs: int = Field(5, ge=1)
    ppo_iterations: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=1)
    ray_address: str | None = Field(None, description="None: join or start Ray; 'local': a private local Ray")
    mlflow_uri: str | None = Field(None, description="tracking URI (default: sqlite under out)")

    @field_validator("pruners")
    @classmethod
    def _known_pruners(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in PRUNERS or n == "none"]
        if unknown:
            raise ValueError(f"unknown pruner(s) {unknown} (available: {', '.join(BASELINES)}, lfd, tprl)")
        return names

    @model_validator(mode="after")
    def _tprl_needs_training(self):
        if self.policy == "shipped" and "tprl" in self.pruners:
            self.pruners = [n for n in self.pruners if n != "tprl"]
        return self


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


def train_policies(cfg: DemoConfig, data: Path, model_path: Path) -> dict[str, Path]:
    """Precompute, autoencoder, LfD and PPO into ``cfg.out``; the ``lfd`` and ``tprl`` policy directories."""
    from tprl_ray.precompute.job import PrecomputeConfig, run_precompute
    from tprl_ray.rl.train import PpoConfig, train_ppo
    from tprl_ray.training.autoencoder import AutoencoderConfig, train_autoencoder
    from tprl_ray.training.lfd import LfdConfig, train_lfd

    out, uri = cfg.out, tracking_uri(cfg.out, cfg.mlflow_uri)
    for split in ("train", "val"):
        print(f"[demo] precompute: {split}")
        run_precompute(PrecomputeConfig(data=data / split, out=out / "precompute" / split, model=str(model_path),
                                        limit=cfg.train_questions, ray_address=cfg.ray_address))
    common = dict(data=out / "precompute" / "train", val_data=out / "precompute" / "val", seed=cfg.seed,
                  ray_address=cfg.ray_address, mlflow_uri=uri)
    print("[demo] autoencoder (Ray Train)")
    train_autoencoder(AutoencoderConfig(out=out / "autoencoder", epochs=cfg.autoencoder_epochs, batch_size=128,
                                        lr=2e-3, **common))
    print("[demo] LfD policy (Ray Train)")
    train_lfd(LfdConfig(out=out / "lfd", autoencoder=out / "autoencoder", epochs=cfg.lfd_epochs, **common))
    print("[demo] PPO (RLlib, Ray Serve scorer)")
    train_ppo(PpoConfig(init=out / "lfd", out=out / "ppo", iterations=cfg.ppo_iterations,
                        scorer={"model": str(model_path)}, **common))
    return {"lfd": out / "lfd", "tprl": out / "ppo"}


def run_demo(cfg: DemoConfig) -> dict:
    data = prepare_data(cfg)
    model_path = prepare_model(cfg, data)
    policies = train_policies(cfg, data, model_path) if cfg.policy == "train" else {}
    backbone = load_backbone(model_path)
    samples = read_split(data / "test", categories=CATEGORIES)
    if cfg.eval_questions:
        samples = samples[: cfg.eval_questions]
    pruners = {name: build_pruner(name, cfg.seed, policies.get(name)) for name in cfg.pruners}
    settings = [("none_100", build_pruner("none"), 1.0)] + [
        (f"{name}_{round(budget * 100)}", pruner, budget) for name, pruner in pruners.items() for budget in cfg.budgets]
    with mlflow_run(cfg.out, "tprl-demo", "demo", cfg.mlflow_uri, params=cfg.flat()):
        results = evaluate_settings(backbone, data / "test", samples, settings, batch_size=cfg.batch_size,
                                    progress=True)
        base = results["none_100"]
        full_tokens = round(base["avg_tokens"])
        text_tokens = round(sum(backbone.text_tokens(s.text) for s in samples) / len(samples))
        rows = []
        for label, pruner, budget in settings:
            result = results[label]
            kept = budget_tokens(budget, full_tokens)
            cost = pruned_efficiency(backbone.model.config, pruner, full_tokens, kept, text_tokens)
            rows.append(report_row(pruner.name, budget, result, base["accuracy"],
                                   {"flops": cost.flops, "kv_cache_mb": cost.kv_cache_bytes / 1e6}))
            print(f"[demo] {pruner.name:>9} @ {budget:.3f}: accuracy {result['accuracy']:.3f}")
            mlflow.log_metrics({f"{label}.accuracy": result["accuracy"], f"{label}.avg_tokens": result["avg_tokens"],
                                f"{label}.flops": cost.flops})
        report = {"benchmark": "digits", "model": str(model_path), "text_tokens": text_tokens, "rows": rows}
        atomic_write_bytes(cfg.out / "report.json", json.dumps(report, indent=2).encode())
        pareto_plot(report, cfg.out / "pareto.png")
        mlflow.log_artifact(str(cfg.out / "report.json"))
        mlflow.log_artifact(str(cfg.out / "pareto.png"))
    print(format_table(report))
    print(f"[demo] wrote {cfg.out / 'report.json'} and {cfg.out / 'pareto.png'}; "
          f"MLflow store {cfg.mlflow_uri or cfg.out / 'mlflow.db'}")
    return report
