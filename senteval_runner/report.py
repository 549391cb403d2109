"""Printing the papers' tables and writing reports atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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


def write_json_atomic(path: str | os.PathLike[str], obj: object) -> Path:
    """Write JSON to a temp file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
