"""The evaluation engine: a benchmark split unpruned and under every (pruner, budget) setting.

``tprl eval``, ``tprl pipeline`` and ``make demo`` all run :func:`run_eval`. Only question ids travel
through Ray Data, in fixed chunks of ``pool.batch_size`` questions; each actor of the pool (one GPU
per actor when the cluster has GPUs) loads the model once, encodes each chunk's images once and
answers the chunk under every setting (:func:`tprl_ray.evaluation.predict.predict`). The driver joins
the predictions with the answers, scores each setting with the benchmark's scorer and adds its
FLOPs and KV cache: the report's rows. ``OUT`` (the report) and ``OUT.predictions.jsonl`` are written
atomically and logged to MLflow with one metric per setting and field (``vispruner_25.accuracy``;
``prumerge-plus_25.accuracy``, since MLflow names take no ``+``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.backbones.inputs import ModelInputs
from tprl_ray.config import ConfigError
from tprl_ray.data.layout import DataError, Reject, Sample, read_split
from tprl_ray.evaluation.config import EvalConfig, budget_value, setting_label
from tprl_ray.evaluation.metrics import BENCHMARK_CATEGORIES
from tprl_ray.evaluation.predict import Setting, predict, summarize
from tprl_ray.evaluation.report import format_table, report_row
from tprl_ray.pruners.registry import build_pruner

LOGGED = ("accuracy", "relative", "avg_tokens", "flops")


def settings(cfg: EvalConfig) -> list[Setting]:
    """The unpruned setting ``none_100``, then every pruner at every budget."""
    out: list[Setting] = [("none_100", build_pruner("none"), 1.0)]
    for name in dict.fromkeys(n for n in cfg.pruners if n != "none"):
        pruner = build_pruner(name, cfg.seed, cfg.policies.get(name))
        out += [(setting_label(name, b), pruner, budget_value(b)) for b in cfg.budgets]
    return out


class Predictor:
    """A Ray Data actor: one model replica answering chunks of question ids under every setting."""

    def __init__(self, cfg: dict):
        from tprl_ray.backbones.load import load_backbone

        self.cfg = EvalConfig.model_validate(cfg)
        self.backbone = load_backbone(self.cfg.backbone)
        self.samples = {s.question_id: s for s in read_split(self.cfg.data, check_images=False)}
        self.settings = settings(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for ids in batch["question_ids"]:
            chunk = [self.samples[str(q)] for q in ids]
            for label, records in predict(
                self.backbone, self.cfg.data, chunk, self.settings, self.cfg.max_new_tokens
            ).items():
                rows += [
                    {
                        "setting": label,
                        "question_id": r["question_id"],
                        "prediction": r["prediction"],
                        "visual_tokens": float(r["visual_tokens"]),
                        "text_tokens": self.backbone.text_tokens(self.samples[r["question_id"]].text),
                    }
                    for r in records
                ]
        return {
            key: [row[key] for row in rows]
            for key in ("setting", "question_id", "prediction", "visual_tokens", "text_tokens")
        }


def predictions(cfg: EvalConfig, chunks: list[list[str]]) -> list[dict]:
    """Every setting's prediction for every question, from the actor pool. A dead actor (process
    killed, node lost) is restarted and the chunks it held run again (Ray Data's actor pool does both
    by default; ``tests/test_faults.py`` kills one)."""
    import ray

    from tprl_ray.ray_setup import gpus_per_actor, init_ray

    init_ray(cfg.ray_address)
    ds = ray.data.from_items([{"question_ids": ids} for ids in chunks])
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"cfg": json.loads(cfg.model_dump_json())},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.pool.size),
        num_cpus=cfg.pool.cpus,
        num_gpus=gpus_per_actor(cfg.pool.gpus),
    ).take_all()


@dataclass
class Checked:
    """What :func:`check_inputs` found: the model's input limits, the questions to answer, those rejected,
    the words outside the vocabulary, every setting (its pruner loaded) and each capped budget's
    effective token count."""

    model: ModelInputs
    samples: list[Sample]
    rejects: list[Reject]
    vocabulary: dict
    settings: list[Setting]
    effective: dict[float, int]


def check_inputs(cfg: EvalConfig) -> Checked:
    """Everything checked in the driver before Ray starts: the output directory, the split (categories
    of the benchmark, images), question lengths, budgets against the model's visual tokens and the
    learned pruners' directories against the model."""
    from tprl_ray.pruners.lfd import LearnedPruner

    check_writable(cfg.out.parent)
    model = ModelInputs.load(cfg.backbone)
    samples = read_split(cfg.data, categories=BENCHMARK_CATEGORIES.get(cfg.benchmark))
    if cfg.limit:
        samples = samples[: cfg.limit]
    samples, rejects = model.within_length(samples, cfg.backbone, cfg.max_new_tokens)
    if not samples:
        raise DataError(f"{cfg.data}: every question is rejected, e.g. {rejects[0].reason}")
    effective = {}
    for b in cfg.budgets:
        if model.visual_tokens is not None and b > model.visual_tokens:
            if not cfg.cap_budgets:
                raise ConfigError(
                    f"budget {b:g} is above the {model.visual_tokens} visual tokens of {model.path} "
                    "(--cap-budgets true keeps them all)"
                )
            effective[b] = model.visual_tokens
    chosen = settings(cfg)
    for _, pruner, _ in chosen:
        if isinstance(pruner, LearnedPruner):
            pruner.check_widths(model.feature_width, model.embedding_width)
    vocabulary = {cfg.data.name: model.unknown_words(cfg.data.name, samples, "eval")}
    for reject in rejects:
        print(f"[eval] rejected: {reject.reason}")
    return Checked(model, samples, rejects, vocabulary, chosen, effective)


def evaluate(cfg: EvalConfig, checked: Checked | None = None) -> tuple[dict, dict[str, list[dict]]]:
    """The report (rows with scores, relative scores, tokens, FLOPs and KV cache; the rejected questions
    and the words outside the vocabulary) and each setting's records; ``checked`` is what
    :func:`check_inputs` found for ``cfg`` if the caller ran it already."""
    from transformers import AutoConfig

    from tprl_ray.evaluation.efficiency import pruned_efficiency
    from tprl_ray.pruners.base import budget_tokens

    checked = checked or check_inputs(cfg)
    samples, chosen = checked.samples, checked.settings
    chunks = [
        [s.question_id for s in samples[i : i + cfg.pool.batch_size]]
        for i in range(0, len(samples), cfg.pool.batch_size)
    ]
    by_setting: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in predictions(cfg, chunks):
        if row["question_id"] in by_setting[row["setting"]]:
            raise RuntimeError(f"{row['setting']}: more than one prediction for question {row['question_id']!r}")
        by_setting[row["setting"]][row["question_id"]] = row
    records = {}
    for label, _, _ in chosen:
        rows = by_setting[label]
        missing = [s.question_id for s in samples if s.question_id not in rows]
        if missing:
            raise RuntimeError(f"{label}: no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
        records[label] = [
            {
                **s.extra,
                "question_id": s.question_id,
                "image": s.image,
                "category": s.category,
                "answer": s.answer,
                "prediction": rows[s.question_id]["prediction"],
                "visual_tokens": float(rows[s.question_id]["visual_tokens"]),
            }
            for s in samples
        ]
    summaries = {label: summarize(cfg.benchmark, recs) for label, recs in records.items()}
    base = summaries["none_100"]
    full_tokens = round(base["avg_tokens"])
    text = by_setting["none_100"]
    text_tokens = round(sum(text[s.question_id]["text_tokens"] for s in samples) / len(samples))
    config = AutoConfig.from_pretrained(cfg.backbone.resolved_path())
    rows = []
    for label, pruner, budget in chosen:
        cost = pruned_efficiency(config, pruner, full_tokens, budget_tokens(budget, full_tokens), text_tokens)
        row = report_row(
            label,
            pruner.name,
            budget,
            summaries[label],
            base,
            {"flops": cost.flops, "kv_cache_mb": cost.kv_cache_bytes / 1e6},
        )
        if label != "none_100" and budget in checked.effective:
            row["effective_budget"] = checked.effective[budget]
        rows.append(row)
    report = {
        "benchmark": cfg.benchmark,
        "model": str(cfg.backbone.resolved_path()) + (f" + {cfg.backbone.adapter}" if cfg.backbone.adapter else ""),
        "data": str(cfg.data),
        "n": len(samples),
        "text_tokens": text_tokens,
        "rows": rows,
        "rejects": [{"question_id": r.question_id, "reason": r.reason} for r in checked.rejects],
        "vocabulary": checked.vocabulary,
    }
    return report, records


def run_eval(cfg: EvalConfig, checked: Checked | None = None) -> dict:
    """:func:`evaluate`, then the report and the predictions written and logged to MLflow (a child run
    ``evaluation`` inside a pipeline run)."""
    import mlflow

    from tprl_ray.tracking import mlflow_run

    print(
        f"[eval] {cfg.benchmark}: {len(cfg.pruners)} pruner(s) x {len(cfg.budgets)} budget(s) on "
        f"{cfg.pool.size} actor(s)"
    )
    report, records = evaluate(cfg, checked)
    predictions_path = cfg.out.with_suffix(".predictions.jsonl")
    atomic_write_bytes(
        predictions_path,
        "".join(json.dumps({"setting": label, **r}) + "\n" for label, recs in records.items() for r in recs).encode(),
    )
    atomic_write_bytes(cfg.out, json.dumps(report, indent=2).encode())
    with mlflow_run(cfg.out.parent, "tprl-eval", cfg.run_name, cfg.mlflow_uri, params=cfg.flat()):
        for row in report["rows"]:
            label = row["label"].replace("+", "-plus")  # MLflow names take no '+': prumerge-plus_25.accuracy
            mlflow.log_metrics({f"{label}.{key}": row[key] for key in LOGGED})
        mlflow.log_artifact(str(cfg.out))
        mlflow.log_artifact(str(predictions_path))
    return report


def suite_configs(cfg: EvalConfig) -> dict[str, EvalConfig]:
    """Each suite benchmark's evaluation: ``cfg`` on its split with its scorer, written to
    ``<out's folder>/<name>/report.json``."""
    base = cfg.model_dump()
    return {
        entry.name: EvalConfig.model_validate(
            {
                **base,
                "suite": None,
                "data": entry.data,
                "benchmark": entry.scorer,
                "limit": cfg.limit if entry.limit is None else entry.limit,
                "out": cfg.out.parent / entry.name / "report.json",
                "run_name": f"{cfg.run_name}-{entry.name}",
            }
        )
        for entry in cfg.suite
    }


def run_suite(cfg: EvalConfig) -> dict:
    """Every benchmark of ``cfg.suite`` (:func:`run_eval`, each checked before the first runs), then the
    Table 1 report: ``out`` (JSON) and ``out`` with ``.md``, logged to MLflow with a metric per cell."""
    import mlflow

    from tprl_ray.evaluation.table1 import format_suite, suite_metrics, suite_table
    from tprl_ray.tracking import mlflow_run

    if cfg.out.suffix == ".md":
        raise ValueError(f"--out {cfg.out}: the Table 1 report's JSON file (the Markdown goes beside it, as .md)")
    configs = suite_configs(cfg)
    checks = {name: check_inputs(sub) for name, sub in configs.items()}  # every benchmark before the first runs
    reports = {name: run_eval(sub, checks[name]) for name, sub in configs.items()}
    table = suite_table(reports, {name: sub.benchmark for name, sub in configs.items()})
    write_table1(table, cfg.out)
    with mlflow_run(cfg.out.parent, "tprl-eval", cfg.run_name, cfg.mlflow_uri, params=cfg.flat()):
        mlflow.log_metrics(suite_metrics(table))
        mlflow.log_artifact(str(cfg.out))
        mlflow.log_artifact(str(cfg.out.with_suffix(".md")))
    print(format_suite(table))
    return table


def write_table1(table: dict, out) -> None:
    """The Table 1 report as JSON at ``out`` and as Markdown beside it."""
    from tprl_ray.evaluation.table1 import format_suite

    atomic_write_bytes(out, json.dumps(table, indent=2).encode())
    atomic_write_bytes(out.with_suffix(".md"), (format_suite(table) + "\n").encode())


def command(cfg: EvalConfig) -> None:
    """`tprl eval`: the table on stdout (with a suite, the Table 1 report)."""
    if cfg.suite:
        run_suite(cfg)
        print(f"wrote {cfg.out} and {cfg.out.with_suffix('.md')}; each benchmark's report in {cfg.out.parent}/<name>")
        return
    print(format_table(run_eval(cfg)))
    print(f"wrote {cfg.out} and {cfg.out.with_suffix('.predictions.jsonl')}")
