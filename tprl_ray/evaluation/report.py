"""Rows of ``report.json`` and the table printed from them."""

from __future__ import annotations


def report_row(pruner: str, budget: float, result: dict, base_accuracy: float) -> dict:
    """One row: ``relative`` is accuracy divided by the unpruned model's accuracy."""
    return {
        "pruner": pruner,
        "budget": budget,
        "avg_tokens": result["avg_tokens"],
        "accuracy": result["accuracy"],
        "relative": result["accuracy"] / base_accuracy if base_accuracy else 0.0,
        "per_type": result["per_type"],
    }


def format_table(report: dict) -> str:
    types = sorted({t for row in report["rows"] for t in row["per_type"]})
    head = ["pruner", "budget", "tokens", "accuracy", "relative", *types]
    lines = [" | ".join(f"{h:>9}" for h in head)]
    lines.append("-" * len(lines[0]))
    for row in report["rows"]:
        cells = [row["pruner"], f"{row['budget']:.3f}", f"{row['avg_tokens']:.1f}",
                 f"{row['accuracy']:.3f}", f"{row['relative']:.3f}",
                 *[f"{row['per_type'].get(t, float('nan')):.3f}" for t in types]]
        lines.append(" | ".join(f"{c:>9}" for c in cells))
    return f"{report['benchmark']} / {report['model']}\n" + "\n".join(lines)
