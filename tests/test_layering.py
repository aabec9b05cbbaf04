"""The package's layers (shared/DESIGN.md's table): no import circles, lower modules never import higher ones."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bptt_jax"

# Each module's level, bottom to top; a module may import only modules of a lower level (and none
# of its own level). Mirrors the design table, with `kernels` where the table plans it.
LEVELS = {
    "activations": 0,
    "cells": 0.5,  # a package: one module per cell, importing activations only
    "params": 1,
    "checks": 2,
    "cell": 2,
    "kernels": 2,
    "losses": 2,
    "scan": 3,
    "bptt": 4,
    "vjp": 5,
    "interop": 5,
    "layers": 6,  # a package: one module per other library (flax nnx, equinox), over vjp.rnn_states
    "train": 6,
    "checkpoint": 6,
    "parallel": 7,
    "config": 6,
    "data": 6,
    "generate": 7,
    "runner": 8,
    "study": 9,
    "gradflow": 9,
    "launch": 9,
    "cli": 10,
}


def _imports(path: Path) -> set[str]:
    """bptt_jax modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "bptt_jax":
                found.update(a.name for a in node.names)
            elif node.module.startswith("bptt_jax."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bptt_jax."))
    return found


def _files(module: str) -> list[Path]:
    """The module's file, or every file of a subpackage."""
    sub = PACKAGE / module
    return sorted(sub.glob("*.py")) if sub.is_dir() else [PACKAGE / f"{module}.py"]


def test_every_module_has_a_level():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == set(LEVELS), f"add the new module to LEVELS: {sorted(modules ^ set(LEVELS))}"


@pytest.mark.parametrize("module", sorted(LEVELS))
def test_imports_go_down_only(module):
    imports = set().union(*(_imports(f) for f in _files(module))) - {module}  # a package's own modules
    for imported in imports:
        assert imported in LEVELS, f"{module} imports unknown bptt_jax.{imported}"
        assert LEVELS[imported] < LEVELS[module], (
            f"{module} (level {LEVELS[module]}) imports {imported} (level {LEVELS[imported]}): "
            "lower modules must not import higher ones"
        )


def test_the_core_never_imports_the_optional_libraries():
    # flax (and torch) are extras: only bptt_jax.layers.<library> may import its library.
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("flax", "equinox", "torch"), f"{path.name} imports {name}"
