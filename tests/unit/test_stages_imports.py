"""The import structure of trainers/stages: no cycle between its modules (counting imports inside
functions too), a static package ``__init__``, and a CLI that loads the config before torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO, subprocess_env

STAGES = REPO / "trainers" / "stages"


def _imports(path) -> set[str]:
    """Every trainers.stages module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from pkg import module
    modules = {f"trainers.stages.{p.stem}" for p in STAGES.glob("*.py") if p.stem != "__init__"}
    return {name for name in found if name in modules}


def test_the_stage_modules_import_each_other_without_a_cycle():
    graph = {f"trainers.stages.{p.stem}": _imports(p) for p in STAGES.glob("*.py") if p.stem != "__init__"}
    assert {"trainers.stages.driver", "trainers.stages.worker", "trainers.stages.plan"} <= set(graph)
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_the_package_init_is_static():
    source = (STAGES / "__init__.py").read_text()
    assert "importlib" not in source and "__import__" not in source


def test_the_stage_cli_imports_no_torch():
    code = "import sys, trainers.stages.cli, trainers.stages; assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
