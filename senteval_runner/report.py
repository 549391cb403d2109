"""Printing the papers' tables."""

from __future__ import annotations

SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


def format_table(report: dict) -> str:
    """The papers' tables as Markdown: tasks as columns, scores ×100 with two decimals, then Avg."""
    lines: list[str] = []
    mode = report.get("settings", {}).get("mode", "test")
    for name, row in report.get("table", {}).items():
        if lines:
            lines.append("")
        heads = [SHORT.get(k, k) for k in row]
        title = f"{name} ({'dev' if mode == 'dev' else 'test'}, " + (
            "Spearman x100)" if name == "sts" else "accuracy)")
        lines.append(title)
        lines.append("| " + " | ".join(heads) + " |")
        lines.append("|" + "|".join("---" for _ in heads) + "|")
        lines.append("| " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    return "\n".join(lines)
