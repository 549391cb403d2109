"""The tree's arrows point one way: features -> core; senteval_runner stands alone (read with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("diffcse.training", "diffcse.evaluation", "diffcse.search", "diffcse.finetune")
# Orchestration over features (multi-seed experiment grids and their reports): may import features,
# and no feature may import it.
ORCHESTRATION = ("diffcse.experiments",)


def imports(package: str) -> list[tuple[str, str]]:
    """(module, imported name) for every absolute import inside a package's files."""
    out = []
    for file in sorted((ROOT / Path(*package.split("."))).rglob("*.py")):
        module = ".".join(file.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((module, node.module))
            elif isinstance(node, ast.Import):
                out += [(module, alias.name) for alias in node.names]
    return out


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_senteval_runner_imports_nothing_from_diffcse() -> None:
    bad = [(m, n) for m, n in imports("senteval_runner") if under(n, "diffcse")]
    assert not bad, bad


def test_core_imports_no_feature_package() -> None:
    bad = [(m, n) for m, n in imports("diffcse.core") if any(under(n, f) for f in (*FEATURES, *ORCHESTRATION))]
    assert not bad, bad


@pytest.mark.parametrize("feature", FEATURES)
def test_a_feature_imports_only_the_core_and_itself(feature: str) -> None:
    bad = [(m, n) for m, n in imports(feature)
           if any(under(n, f) for f in (*FEATURES, *ORCHESTRATION) if f != feature)
           or n in ("diffcse.cli", "diffcse.__main__")]
    assert not bad, bad


def test_the_checker_sees_imports() -> None:
    found = imports("diffcse.training")
    assert ("diffcse.training.trainer", "diffcse.core.folder") in found  # so an empty list means something


def test_a_deprecation_warning_from_our_modules_fails_the_suite() -> None:
    import warnings

    for module in ("diffcse.core.folder", "senteval_runner.engine"):
        with pytest.raises(DeprecationWarning):
            warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module=module)
    warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module="transformers.x")  # a library's: ignored
