"""Report rows, the methods x budgets table and the Pareto plot (relative accuracy vs kept tokens).

`tprl report` reads reports (``report.json`` of `tprl pipeline` or `tprl eval`), prints one
table, writes the table (Markdown) and the plot (PNG) beside ``--out`` and logs both to MLflow.
Reports of several benchmarks (or a suite report of `tprl eval --suite`, or any reports with
``--table1``) give the paper's Table 1 layout instead (:mod:`tprl_ray.evaluation.table1`):
Markdown at ``--out``, JSON beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.evaluation.config import ReportConfig
from tprl_ray.evaluation.figures import pyplot, save_png
from tprl_ray.pruners.registry import REFERENCES


def ratio(value: float, reference: float) -> float:
    """``value / reference``, 0 when the reference is 0."""
    return value / reference if reference else 0.0


def relative_scores(result: dict, base: dict) -> dict:
    """``relative`` accuracy and ``relative_per_type`` of a summary (or row) ``result`` against ``base``."""
    return {
        "relative": ratio(result["accuracy"], base["accuracy"]),
        "relative_per_type": {c: ratio(v, base["per_type"].get(c, 0.0)) for c, v in result["per_type"].items()},
    }


def report_row(label: str, pruner: str, budget: float, result: dict, base: dict, cost: dict) -> dict:
    """One setting's row: its summary (:func:`tprl_ray.evaluation.predict.summarize`), ``relative`` scores
    against the unpruned summary ``base``, and ``cost`` (``flops``, ``kv_cache_mb``)."""
    scores = relative_scores(result, base)
    return {
        "label": label,
        "pruner": pruner,
        "budget": budget,
        "avg_tokens": result["avg_tokens"],
        "accuracy": result["accuracy"],
        "relative": scores["relative"],
        "per_type": result["per_type"],
        "relative_per_type": scores["relative_per_type"],
        "n": result["n"],
        **cost,
        "metrics": result["metrics"],
    }


def finetuned_rows(frozen: dict, tuned: dict) -> list[dict]:
    """The rows of a fine-tuned model's report (labels ``<label>_ft``, pruners ``<pruner>+ft``) with
    ``relative`` against the frozen model's unpruned accuracy, as the paper's Table 5 reports them."""
    base = next(row for row in frozen["rows"] if row["pruner"] == "none")
    return [
        {**row, "label": f"{row['label']}_ft", "pruner": f"{row['pruner']}+ft", **relative_scores(row, base)}
        for row in tuned["rows"]
    ]


MEANS = ("avg_tokens", "accuracy", "relative", "flops", "kv_cache_mb")


def mean_report(reports: list[dict], seeds: list[int]) -> dict:
    """One report from runs that differ only in their training seed: each row's mean (as the single-run
    fields) with ``accuracy_std`` and ``relative_std`` (sample standard deviation over the seeds),
    ``seeds`` and the mean per type."""
    import statistics

    first = reports[0]
    rows = []
    for i, row in enumerate(first["rows"]):
        runs = [r["rows"][i] for r in reports]
        if any(run["label"] != row["label"] for run in runs):
            raise ValueError(f"reports of the seeds list other settings at row {i}")
        mean = {key: statistics.fmean(run[key] for run in runs) for key in MEANS if key in row}
        spread = {f"{key}_std": statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0
                  for key in ("accuracy", "relative")}  # fmt: skip
        per_type = {
            field: {t: statistics.fmean(run[field][t] for run in runs) for t in row[field]}
            for field in ("per_type", "relative_per_type")
        }
        rest = {k: v for k, v in row.items() if k != "metrics"}  # each seed's scorer output stays in its report
        rows.append({**rest, **mean, **spread, **per_type, "seeds": list(seeds)})
    return {**first, "seeds": list(seeds), "rows": rows}


def is_reference(row: dict) -> bool:
    """A reference row (``oracle``): shown beside the methods, never on their Pareto front."""
    return row["pruner"] in REFERENCES


def format_table(report: dict) -> str:
    rows = report["rows"]
    types = sorted({t for row in rows for t in row["per_type"]})
    costs = [c for c in ("flops", "kv_cache_mb") if all(c in row for row in rows)]
    spread = all("relative_std" in row for row in rows)
    head = ["pruner", "budget", "tokens", "accuracy", "relative", *(["rel. std"] if spread else []), *types, *costs]
    lines = [" | ".join(f"{h:>11}" for h in head)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = [
            f"{row['pruner']}*" if is_reference(row) else row["pruner"],
            f"{row['budget']:.3f}",
            f"{row['avg_tokens']:.1f}",
            f"{row['accuracy']:.3f}",
            f"{row['relative']:.3f}",
            *([f"{row['relative_std']:.3f}"] if spread else []),
            *[f"{row['per_type'].get(t, float('nan')):.3f}" for t in types],
            *([f"{row['flops']:.3e}"] if "flops" in costs else []),
            *([f"{row['kv_cache_mb']:.4f}"] if "kv_cache_mb" in costs else []),
        ]
        lines.append(" | ".join(f"{c:>11}" for c in cells))
    note = "\n* reference row (knows the question's cells), not a method" if any(map(is_reference, rows)) else ""
    seeds = f" (mean of seeds {', '.join(map(str, report['seeds']))})" if "seeds" in report else ""
    return f"{report['benchmark']} / {report['model']}{seeds}\n" + "\n".join(lines) + note


def pareto_front(rows: list[dict], key: str = "avg_tokens") -> list[dict]:
    """Rows no other row beats on both a lower ``key`` (tokens, FLOPs) and a higher relative accuracy."""
    front = [
        r
        for r in rows
        if not any(
            o[key] <= r[key] and o["relative"] >= r["relative"] and (o[key], o["relative"]) != (r[key], r["relative"])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r[key])


def pareto_plot(report: dict, path: Path) -> None:
    """Relative accuracy against the average visual tokens kept and (when the rows have them) against
    FLOPs per sample: one series per pruner, each panel's Pareto front of the methods dashed, reference
    rows (``oracle``) dotted grey. In-LLM pruners see different token counts per layer, so the FLOPs
    panel is the fairer one for them."""
    plt = pyplot()
    rows = report["rows"]
    axes_keys = [("avg_tokens", "average visual tokens per LLM layer")]
    if all("flops" in r for r in rows):
        axes_keys.append(("flops", "FLOPs per sample"))
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6.4 * len(axes_keys), 4.8), dpi=120, squeeze=False)
    methods = [r for r in rows if not is_reference(r)]
    shades = plt.get_cmap("tab20").colors  # dark shades first, then the light ones: 20 distinct series
    colors = shades[0::2] + shades[1::2]
    for ax, (key, label) in zip(axes[0], axes_keys):
        for i, name in enumerate(dict.fromkeys(r["pruner"] for r in rows)):
            series = sorted((r for r in rows if r["pruner"] == name), key=lambda r: r[key])
            style = dict(color="grey", ls=":", marker="x", label=f"{name} (reference)") \
                if is_reference(series[0]) else dict(color=colors[i % 20], marker="o", label=name)  # fmt: skip
            ax.plot([r[key] for r in series], [r["relative"] for r in series], **style)
        front = pareto_front(methods, key)
        ax.plot([r[key] for r in front], [r["relative"] for r in front], "k--", lw=0.8, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy relative to the unpruned model")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{report['benchmark']}: {Path(str(report['model'])).name}")
    save_png(fig, path, bbox_inches="tight")


def merge_reports(paths: list[Path]) -> dict:
    """One report from several files; the unpruned row appears once per model."""
    rows, benchmarks, models = [], [], []
    for path in paths:
        data = read_report(path)
        new = data["rows"]
        benchmarks.append(data["benchmark"])
        models.append(str(data["model"]))
        rows += [r for r in new if not (r["pruner"] == "none" and any(o["pruner"] == "none" for o in rows))]
    if len(set(benchmarks)) > 1 or len(set(models)) > 1:
        raise ValueError(f"reports mix benchmarks {sorted(set(benchmarks))} or models {sorted(set(models))}")
    return {"benchmark": benchmarks[0], "model": models[0], "rows": rows}


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: report file not found")
    data = json.loads(path.read_text())
    if "rows" not in data:
        raise ValueError(f"{path}: not a report (no rows)")
    return data


def table1_command(cfg: ReportConfig, reports: list[dict]) -> dict:
    """`tprl report` over a suite report, or over reports of several benchmarks: the Table 1 layout
    (Markdown at ``out``, JSON beside it), logged to MLflow. A column is named by its benchmark, or
    by its report's folder when two reports share a benchmark."""
    import mlflow

    from tprl_ray.evaluation.table1 import format_suite, suite_metrics, suite_table
    from tprl_ray.tracking import mlflow_run

    if len(reports) == 1 and "suite" in reports[0]:
        table = reports[0]
    else:
        if any("suite" in r for r in reports):
            raise ValueError("a suite report is a Table 1 already: give it alone, or the benchmarks' own reports")
        scorers = [r["benchmark"] for r in reports]
        names = scorers if len(set(scorers)) == len(scorers) else [p.parent.name for p in cfg.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"reports {[str(p) for p in cfg.inputs]} repeat a benchmark and a folder name")
        table = suite_table(dict(zip(names, reports)), dict(zip(names, scorers)))
    if cfg.out.suffix == ".json":
        raise ValueError(f"--out {cfg.out}: the Markdown table's file (the JSON goes beside it, as .json)")
    text = format_suite(table)
    atomic_write_bytes(cfg.out, (text + "\n").encode())
    atomic_write_bytes(cfg.out.with_suffix(".json"), json.dumps(table, indent=2).encode())
    with mlflow_run(cfg.out.parent, "tprl-report", "table1", cfg.mlflow_uri, params=cfg.flat()):
        mlflow.log_metrics(suite_metrics(table))
        mlflow.log_artifact(str(cfg.out))
        mlflow.log_artifact(str(cfg.out.with_suffix(".json")))
    print(text)
    print(f"wrote {cfg.out} and {cfg.out.with_suffix('.json')}")
    return table


def command(cfg: ReportConfig) -> dict:
    import mlflow

    from tprl_ray.tracking import mlflow_run

    reports = [read_report(path) for path in cfg.inputs]
    if cfg.table1 or any("suite" in r for r in reports) or len({r["benchmark"] for r in reports}) > 1:
        return table1_command(cfg, reports)
    report = merge_reports(cfg.inputs)
    table = format_table(report)
    plot = cfg.out.with_suffix(".png")
    atomic_write_bytes(cfg.out, f"```\n{table}\n```\n".encode())
    pareto_plot(report, plot)
    with mlflow_run(cfg.out.parent, "tprl-report", report["benchmark"], cfg.mlflow_uri, params=cfg.flat()):
        mlflow.log_artifact(str(cfg.out))
        mlflow.log_artifact(str(plot))
    print(table)
    print(f"wrote {cfg.out} and {plot}")
    return report
