"""The package's layers (shared/DESIGN.md's table): the folders are the layers, imports go down only.

command/   -> training/, layers/, core/      the bptt-jax command: config, data, runner, CLI, studies
training/  -> core/                          train step, data parallelism, checkpoints, sampling
layers/    -> core/                          Flax NNX, Equinox, PyTorch interop
core/                                        cells, forward, plan, backward, segments, gradient, vjp
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bptt_jax"

# Each module's level, bottom to top; a module may import only modules of a lower level (and none
# of its own level). Names are paths below bptt_jax; a package (core.cells) is one module here.
LEVELS = {
    "core.activations": 0,
    "core.precision": 0,  # the computation dtype: imports jax only
    "core.host": 0,  # the cache directory and the processor: the standard library only
    "core.native": 1.5,  # the cells' compiled kernel: built, registered, called (kernels.resolve picks it)
    "core.cells": 0.5,  # one module per cell, importing activations only
    "core.params": 1,
    "core.checks": 2,
    "core.kernels": 2,
    "core.losses": 2,
    "core.forward": 3,
    "core.plancache": 3.5,  # the on-disk cache of tuned plans
    "core.plan": 4,
    "core.budget": 4.5,  # max_memory: candidates, lower bounds, the choice
    "core.backward": 5,
    "core.segments": 6,
    "core.sequence": 6,  # one layer's custom VJP of the recurrence alone (the vmapped layers')
    "core.vjp": 6.5,  # the custom VJP: its segments are segments.py's
    "core.gradient": 7,
    "core.tune": 8,
    "layers.biases": 9,
    "layers.torch": 10,
    "layers.nnx": 10,
    "layers.equinox": 10,
    "training.train": 10,
    "training.checkpoint": 10,
    "training.generate": 10,
    "training.parallel": 11,
    "command.config": 20,
    "command.arrays": 19,
    "command.data": 20,
    "command.report": 20.5,
    "command.runner": 21,
    "command.study": 22,
    "command.gradflow": 22,
    "command.launch": 22,
    "command.cli": 23,
}
LAYERS = {"core": 0, "layers": 1, "training": 1, "command": 2}  # layers and training never import each other


def _name(dotted: str) -> str | None:
    """'bptt_jax.core.cells.base' -> 'core.cells': the entry of LEVELS a module path falls in."""
    parts = dotted.split(".")[1:]
    for n in (2, 1):
        if ".".join(parts[:n]) in LEVELS or (n == 1 and parts[:1] and parts[0] in LAYERS):
            return ".".join(parts[:n])
    return None


def _imports(path: Path) -> set[str]:
    """bptt_jax modules imported anywhere in the file (module level or inside functions)."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bptt_jax":
            if node.module.count(".") <= 1:  # from bptt_jax[.core] import a, b: the names are modules
                found.update(_name(f"{node.module}.{a.name}") or _name(node.module) for a in node.names)
            else:
                found.add(_name(node.module))
        elif isinstance(node, ast.Import):
            found.update(_name(a.name) for a in node.names if a.name.startswith("bptt_jax."))
    return {f for f in found if f is not None}


def _files(module: str) -> list[Path]:
    """The module's file, or every file of a subpackage."""
    sub = PACKAGE.joinpath(*module.split("."))
    return sorted(sub.glob("*.py")) if sub.is_dir() else [sub.with_suffix(".py")]


def test_every_module_has_a_level():
    modules = set()
    for layer in LAYERS:
        modules |= {f"{layer}.{p.stem}" for p in (PACKAGE / layer).glob("*.py")} - {f"{layer}.__init__"}
        modules |= {f"{layer}.{p.parent.name}" for p in (PACKAGE / layer).glob("*/__init__.py")}
    assert modules == set(LEVELS), f"add the new module to LEVELS: {sorted(modules ^ set(LEVELS))}"


def test_the_package_is_its_layers():
    # Only the package's front (and the one-release shims of moved modules) sits beside the layers.
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert set(LAYERS) <= top
    for path in PACKAGE.glob("*.py"):
        if path.name not in ("__init__.py", "__main__.py", "_moved.py"):
            assert "_moved.alias(" in path.read_text(encoding="utf-8"), f"{path.name}: put it in a layer"


@pytest.mark.parametrize("module", sorted(LEVELS))
def test_imports_go_down_only(module):
    imports = set().union(*(_imports(f) for f in _files(module))) - {module}  # a package's own modules
    for imported in imports:
        assert imported in LEVELS, f"{module} imports unknown bptt_jax.{imported}"
        assert LEVELS[imported] < LEVELS[module], (
            f"{module} (level {LEVELS[module]}) imports {imported} (level {LEVELS[imported]}): "
            "lower modules must not import higher ones"
        )
        mine, theirs = module.split(".")[0], imported.split(".")[0]
        assert mine == theirs or LAYERS[theirs] < LAYERS[mine], f"{module} imports {imported}: across layers"


def test_the_layering_check_sees_imports():
    # The check itself: it must resolve every import form the package uses (or it passes vacuously).
    assert _imports(PACKAGE / "core" / "gradient.py") >= {"core.backward", "core.plan", "core.segments", "core.checks"}
    assert _imports(PACKAGE / "command" / "runner.py") >= {"training.train", "command.data", "command.config"}
    assert "core.cells" in _imports(PACKAGE / "core" / "cells" / "gru.py")


def test_the_core_never_imports_the_optional_libraries():
    # flax, equinox and torch are extras: only bptt_jax.layers.<library> may import its library.
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("flax", "equinox", "torch"), f"{path.name} imports {name}"
