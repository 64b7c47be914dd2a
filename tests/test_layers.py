"""The layers stay visible: physics imports only physics; physics, io, metrics and poses import nothing above
them; none of physics, io, metrics imports Lightning, Hydra or W&B; model code never imports W&B."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cryobench_lab"
LOWER = ("physics", "io", "metrics", "poses")
FRAMEWORKS = ("lightning", "hydra", "omegaconf", "wandb")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _modules(package: str):
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", LOWER)
def test_lower_layers_import_nothing_above_them(package):
    allowed = {"physics": ("physics",), "io": ("io", "physics"), "metrics": ("metrics", "physics"),
               "poses": ("poses", "physics", "metrics")}[package]
    bad = []
    for path in _modules(package):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "cryobench_lab" and len(parts) > 1 and parts[1] not in (*allowed, "errors"):
                if not (package == "io" and name == "cryobench_lab.metrics.masks"):  # known: the replica writer masks with metrics
                    bad.append(f"{path.relative_to(SRC)} -> {name}")
    assert not bad, bad


@pytest.mark.parametrize("package", ["physics", "io", "metrics"])
def test_core_layers_know_no_framework(package):
    bad = [f"{p.relative_to(SRC)} -> {n}" for p in _modules(package) for n in _imports(p)
           if n.split(".")[0] in FRAMEWORKS]
    assert not bad, bad


def test_models_never_import_wandb():
    bad = [str(p.relative_to(SRC)) for p in _modules("models") if any(n.split(".")[0] == "wandb" for n in _imports(p))]
    assert not bad, bad
