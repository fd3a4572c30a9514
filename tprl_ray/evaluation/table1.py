"""The paper's Table 1 layout: one row per (pruner, budget), per benchmark the absolute score and the
score relative to the unpruned model, and the average relative score over the benchmarks.

Scores are shown as the benchmarks report them: percentages for the 0..1 scores, MME's perception
total on its own 0..2000 scale. ``Tokens`` is the mean over the benchmarks of the average visual
tokens the LLM saw. With several training seeds each cell is the mean over the seeds and the
average carries its standard deviation (over the seeds' averages).
"""

from __future__ import annotations

import statistics


def suite_table(reports: dict[str, dict], scorers: dict[str, str]) -> dict:
    """The Table 1 report of per-benchmark reports (``name -> report`` of `tprl eval`, same settings)."""
    names = list(reports)
    first = reports[names[0]]
    labels = [row["label"] for row in first["rows"]]
    for name, report in reports.items():
        if [row["label"] for row in report["rows"]] != labels:
            raise ValueError(f"the reports list other settings: {name} has {[r['label'] for r in report['rows']]}")
    rows = []
    for i, label in enumerate(labels):
        cells = {}
        for name in names:
            row = reports[name]["rows"][i]
            cells[name] = {"score": row["accuracy"], "relative": row["relative"], "avg_tokens": row["avg_tokens"]}
        base = first["rows"][i]
        rows.append(
            {
                "label": label,
                "pruner": base["pruner"],
                "budget": base["budget"],
                "avg_tokens": statistics.fmean(c["avg_tokens"] for c in cells.values()),
                "relative": statistics.fmean(c["relative"] for c in cells.values()),
                **(
                    {"flops": statistics.fmean(reports[n]["rows"][i]["flops"] for n in names)}
                    if all("flops" in reports[n]["rows"][i] for n in names)
                    else {}
                ),  # fmt: skip
                "cells": cells,
            }
        )
    return {
        "benchmark": "suite",
        "model": first["model"],
        "suite": [
            {"name": n, "benchmark": scorers[n], "data": reports[n]["data"], "n": reports[n]["n"]} for n in names
        ],
        "rows": rows,
    }


def mean_suites(tables: list[dict], seeds: list[int]) -> dict:
    """One Table 1 from the tables of several training seeds: cell means, the averages' spread."""
    first = tables[0]
    rows = []
    for i, row in enumerate(first["rows"]):
        runs = [t["rows"][i] for t in tables]
        if any(run["label"] != row["label"] for run in runs):
            raise ValueError(f"the seeds' tables list other settings at row {i}")
        cells = {
            name: {key: statistics.fmean(run["cells"][name][key] for run in runs) for key in cell}
            for name, cell in row["cells"].items()
        }
        averages = [run["relative"] for run in runs]
        rows.append(
            {
                **row,
                "avg_tokens": statistics.fmean(run["avg_tokens"] for run in runs),
                "relative": statistics.fmean(averages),
                "relative_std": statistics.stdev(averages) if len(runs) > 1 else 0.0,
                "cells": cells,
            }
        )
    return {**first, "seeds": list(seeds), "rows": rows}


def _score(value: float, scorer: str) -> str:
    return f"{value:.1f}" if scorer == "mme" else f"{100 * value:.1f}"


def _budget(row: dict) -> str:
    if row["pruner"] == "none":
        return "100%"
    return f"{100 * row['budget']:.1f}%" if row["budget"] <= 1 else f"{int(row['budget'])}t"


def format_suite(table: dict) -> str:
    """The Markdown table: ``score (relative%)`` per benchmark, ``- (average%)`` last."""
    scorers = {entry["name"]: entry["benchmark"] for entry in table["suite"]}
    spread = "seeds" in table
    head = ["Method", "Budget", "Tokens", *scorers, "Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        cells = [f"{_score(row['cells'][n]['score'], s)} ({100 * row['cells'][n]['relative']:.1f}%)"
                 for n, s in scorers.items()]  # fmt: skip
        average = f"- ({100 * row['relative']:.1f}%" + (f" ± {100 * row['relative_std']:.1f}" if spread else "") + ")"
        method = f"{row['pruner']} (upper bound)" if row["pruner"] == "none" else row["pruner"]
        lines.append("| " + " | ".join([method, _budget(row), f"{row['avg_tokens']:.1f}", *cells, average]) + " |")
    seeds = f", mean of seeds {', '.join(map(str, table['seeds']))}" if spread else ""
    sizes = ", ".join(f"{e['name']} {e['n']}" for e in table["suite"])
    return f"Table 1: {table['model']} ({sizes} questions{seeds})\n\n" + "\n".join(lines)


def suite_metrics(table: dict) -> dict[str, float]:
    """MLflow metrics: ``<label>.avg_relative`` and ``<label>.<benchmark>.relative`` / ``.score``."""
    out = {}
    for row in table["rows"]:
        label = row["label"].replace("+", "-plus")
        out[f"{label}.avg_relative"] = row["relative"]
        for name, cell in row["cells"].items():
            out[f"{label}.{name}.relative"] = cell["relative"]
            out[f"{label}.{name}.score"] = cell["score"]
    return out
