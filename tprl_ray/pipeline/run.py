"""`tprl pipeline` / `pipelines/full.py` / `make demo`: the whole pipeline, by default on the embedded model.

Builds the digits benchmark and obtains the tiny LLaVA (the shipped checkpoint, or trains one). With
``policy: train`` (the default) it then runs every stage into ``OUT``: precompute of the train and
val splits (Ray Data), the autoencoder and the LfD policy (Ray Train), PPO against the scorer
service (RLlib, Ray Serve). Finally the evaluation engine runs the held-out test split unpruned and
with every pruner at every budget (``lfd`` and ``tprl`` are the policies just trained): a table with
each setting's FLOPs and KV cache, ``OUT/report.json``, the Pareto plot ``OUT/pareto.png`` and the
trajectory figures of the pruner (``OUT/trajectories``, :mod:`tprl_ray.evaluation.trajectory`). With
``finetune`` the language model is then fine-tuned on inputs the pruner pruned (``OUT/llm``) and the
test split evaluated again with it: its rows (``tprl+ft``) join the report, relative to the frozen
unpruned model. One
MLflow parent run holds every stage as a child run (sqlite ``OUT/mlflow.db`` by default); PPO
registers the pruner as a model version. A re-run with the same ``OUT`` resumes or skips finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.backbones.base import BackboneError
from tprl_ray.data.config import GRID, DigitsConfig
from tprl_ray.data.digits import SCHEMA_VERSION, build_digits
from tprl_ray.data.layout import DataError, read_split
from tprl_ray.data.mixture import Mixture
from tprl_ray.evaluation.engine import run_eval, run_suite, suite_configs, write_table1
from tprl_ray.evaluation.metrics import BENCHMARK_CATEGORIES
from tprl_ray.evaluation.report import finetuned_rows, format_table, mean_report, pareto_plot
from tprl_ray.evaluation.table1 import format_suite, mean_suites
from tprl_ray.evaluation.trajectory import run_viz
from tprl_ray.pipeline.config import PipelineConfig, stage_configs, training_sources
from tprl_ray.tracking import pipeline_run, tracking_uri


def model_boards(cfg: PipelineConfig) -> list[int]:
    """The digits board sides the model was trained on (its card's), 4x4 for a model trained here."""
    card = Path(cfg.backbone.resolved_path()) / "tprl_model_card.json"
    if cfg.backbone.path == "train" or not card.is_file():
        return [GRID]
    return json.loads(card.read_text())["benchmark"].get("boards", [GRID])


def prepare_data(cfg: PipelineConfig) -> Path:
    """The benchmark directory: ``data``, or the digits built in ``out/data`` (not built when a mixture
    and a suite name every split)."""
    if cfg.data is None and cfg.mixture and cfg.suite:
        print(f"[pipeline] data: mixture {', '.join(p.name for p in cfg.mixture)}")
        return cfg.out / "data"
    if cfg.data is not None:
        needed = [*([] if cfg.mixture else ["train", "val"]), *([] if cfg.suite else ["test"])]
        missing = [split for split in needed if not (cfg.data / split).is_dir()]
        if missing:
            raise DataError(f"{cfg.data}: no {', '.join(missing)} split(s)")
        print(f"[pipeline] data: {cfg.data}")
        return cfg.data
    data_cfg = DigitsConfig(out=cfg.out / "data", seed=cfg.seed, boards=model_boards(cfg))
    meta = data_cfg.out / "meta.json"
    built = json.loads(meta.read_text()) if meta.is_file() else {}
    if built.get("config") == json.loads(data_cfg.model_dump_json()) and built.get("schema_version") == SCHEMA_VERSION:
        print(f"[pipeline] data: reusing {data_cfg.out}")
    else:
        print(f"[pipeline] data: building {data_cfg.out}")
        build_digits(data_cfg)
    return data_cfg.out


def prepare_model(cfg: PipelineConfig, data: Path) -> Path:
    if cfg.backbone.path == "train":
        from tprl_ray.models.config import TinyModelConfig
        from tprl_ray.models.train_tiny import train_tiny

        model_cfg = TinyModelConfig(data=data, out=cfg.out / "model", seed=cfg.seed)
        print(f"[pipeline] model: training {model_cfg.out}")
        train_tiny(model_cfg)
        return model_cfg.out
    path = Path(cfg.backbone.resolved_path())
    card = path / "tprl_model_card.json"
    if card.is_file() and (data / "meta.json").is_file():
        trained_on = json.loads(card.read_text())["benchmark"]["test_pool_fingerprint"]
        if trained_on != json.loads((data / "meta.json").read_text())["test_pool_fingerprint"]:
            raise BackboneError(
                f"{path} was trained on a benchmark with another digit split "
                f"(seed); its test digits would leak. Use --backbone.path train."
            )
    print(f"[pipeline] model: {path}")
    return path


def check_splits(cfg: PipelineConfig, data: Path) -> dict[str, list]:
    """Each split read as its stage will read it, before any stage runs: the test split (or every suite
    benchmark's) as the evaluation does, and the train and val questions the precompute reads (returned)."""
    tests = {e.data: e.scorer for e in cfg.suite} if cfg.suite else {data / "test": cfg.benchmark}
    for split, scorer in tests.items():
        read_split(split, categories=BENCHMARK_CATEGORIES.get(scorer))
    return {
        split: Mixture.of(source).read(rejects=[], limit=cfg.train_questions)
        for split, source in training_sources(cfg, data).items()
    }


def check_inputs(cfg: PipelineConfig, splits: dict[str, list], stages: dict) -> dict:
    """What the stages would refuse against the model, before the first computes: the evaluation's
    inputs and the trajectory figures' policy (but the policies this run trains); the words outside the
    model's vocabulary, per split."""
    from tprl_ray.evaluation.engine import check_inputs as check_evaluation
    from tprl_ray.pruners.lfd import LearnedPruner

    evaluation = stages["evaluation"]
    untrained = [n for n in evaluation.pruners if n not in evaluation.policies]
    evaluation = evaluation.model_copy(update={"pruners": untrained, "policies": {}})
    evaluations = suite_configs(evaluation) if evaluation.suite else {"test": evaluation}
    checks = {name: check_evaluation(e) for name, e in evaluations.items()}
    model = next(iter(checks.values())).model
    if cfg.trajectories and cfg.policy == "shipped":
        LearnedPruner(stages["viz"].policy).check_widths(model.feature_width, model.embedding_width)
    if cfg.finetune:
        from tprl_ray.training.llm import check_model

        check_model(stages["llm"])
    vocabulary = {split: model.unknown_words(split, samples, "pipeline") for split, samples in splits.items()}
    if not evaluation.suite:
        return {**vocabulary, **checks["test"].vocabulary}
    return {**vocabulary, **{f"suite/{name}": next(iter(c.vocabulary.values())) for name, c in checks.items()}}


def train_policies(stages: dict) -> None:
    """Precompute, autoencoder, LfD and PPO into the pipeline's output directory."""
    from tprl_ray.precompute.job import run_precompute
    from tprl_ray.rl.train import train_ppo
    from tprl_ray.training.autoencoder import train_autoencoder
    from tprl_ray.training.lfd import train_lfd

    for split in ("train", "val"):
        if f"precompute_{split}" in stages:
            print(f"[pipeline] precompute: {split}")
            run_precompute(stages[f"precompute_{split}"])
    print("[pipeline] autoencoder (Ray Train)")
    train_autoencoder(stages["autoencoder"])
    print("[pipeline] LfD policy (Ray Train)")
    train_lfd(stages["lfd"])
    print("[pipeline] PPO (RLlib, Ray Serve scorer)")
    train_ppo(stages["ppo"])


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage as a child run of one MLflow pipeline run; writes ``report.json`` and ``pareto.png``."""
    import mlflow

    check_writable(cfg.out)
    data = prepare_data(cfg)
    splits = check_splits(cfg, data)
    model = vocabulary = None
    if cfg.backbone.path != "train":  # else training the model is the first stage, checked after it
        model = prepare_model(cfg, data)
        vocabulary = check_inputs(cfg, splits, stage_configs(cfg, data, model))
    with pipeline_run(cfg.out, cfg.experiment, "pipeline", cfg.mlflow_uri, params=cfg.flat()):
        if model is None:
            model = prepare_model(cfg, data)
            vocabulary = check_inputs(cfg, splits, stage_configs(cfg, data, model))
        reports = []
        for seed in cfg.seeds or [None]:
            if seed is not None:
                print(f"[pipeline] seed {seed}")
            stages = stage_configs(cfg, data, model, seed)
            if cfg.policy == "train":
                train_policies(stages)
            report = run_suite(stages["evaluation"]) if cfg.suite else run_eval(stages["evaluation"])
            if cfg.finetune:
                from tprl_ray.training.llm import train_llm

                print(f"[pipeline] language model fine-tuned on pruned inputs (Ray Train): {stages['llm'].out}")
                train_llm(stages["llm"])
                report["rows"] += finetuned_rows(report, run_eval(stages["evaluation_finetuned"]))
                atomic_write_bytes(stages["evaluation"].out, json.dumps(report, indent=2).encode())
            reports.append(report)
            if cfg.trajectories:
                print(f"[pipeline] trajectory figures: {stages['viz'].out}")
                run_viz(stages["viz"])
        report = reports[0]
        if cfg.seeds:  # the per-seed reports stay in out/seed-N
            report = (mean_suites if cfg.suite else mean_report)(reports, cfg.seeds)
        report["vocabulary"] = vocabulary
        if cfg.suite:
            write_table1(report, cfg.out / "report.json")
            mlflow.log_artifact(str(cfg.out / "report.md"))
        else:
            atomic_write_bytes(cfg.out / "report.json", json.dumps(report, indent=2).encode())
        mlflow.log_artifact(str(cfg.out / "report.json"))
        pareto_plot(report, cfg.out / "pareto.png")
        mlflow.log_artifact(str(cfg.out / "pareto.png"))
    print(format_suite(report) if cfg.suite else format_table(report))
    print(
        f"[pipeline] wrote {cfg.out / 'report.json'} and {cfg.out / 'pareto.png'}; "
        f"MLflow store {tracking_uri(cfg.out, cfg.mlflow_uri)}, experiment {cfg.experiment!r}"
    )
    return report


def command(cfg: PipelineConfig) -> None:
    """`tprl pipeline`."""
    run_pipeline(cfg)
