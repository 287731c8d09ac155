"""The layering of the project's packages (docs/design.md, "Layout"): what each may import, and no cycles.

Every ``import`` and ``from ... import`` of every module under actors/, cluster/ and trainers/ counts,
at module level and inside functions alike (a function-level import is a dependency that only shows
later). ``from pkg import name`` depends on ``pkg.name`` when that is a module, else on ``pkg``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("actors", "cluster", "trainers")
HEAVY = ("ray", "deepspeed", "vllm")
PPO_TYPES = ("trainers.ppo.batch", "trainers.ppo.schedule")
"""The PPO modules the actors may import: the typed batches and plans they receive (pure, no driver)."""
PPO_PURE = (*PPO_TYPES, "trainers.ppo.experience", "trainers.ppo.metrics")
"""The PPO driver's pure maths and types: unit-tested without Ray, DeepSpeed or vLLM."""
DRIVERS = (
    "trainers.stages",
    "trainers.ppo",
    "trainers.evaluation",
    "trainers.pipeline",
    "trainers.demo",
    "trainers.cli",
)
"""Packages that run whole commands: nothing below them may import them."""

RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (modules, forbidden imports, exceptions among the modules)
    (
        "trainers.algos",
        (*HEAVY, "transformers", "actors", "cluster", "trainers."),
        ("trainers.algos", "trainers.errors"),
    ),
    ("trainers.data", (*HEAVY, "actors", "cluster", *DRIVERS, "trainers.runtime", "trainers.config"), ()),
    ("trainers.errors", ("actors", "cluster", "trainers."), ()),
    ("trainers.files", ("actors", "cluster", "trainers."), ()),
    ("trainers.redact", ("actors", "cluster", "trainers."), ()),
    ("trainers.runs", (*HEAVY, "actors", "cluster", *DRIVERS, "trainers.config", "trainers.runtime"), ()),
    ("trainers.rewards", (*HEAVY, "actors", "cluster", *DRIVERS), ()),
    ("trainers.config", (*HEAVY, "actors", "cluster", *DRIVERS, "trainers.runtime"), ()),
    ("trainers.runtime", ("ray", "vllm", "actors", "cluster", *DRIVERS, "trainers.config"), ()),
    ("cluster", ("actors", *DRIVERS, "trainers.config", "trainers.runtime"), ()),
    ("actors", (*DRIVERS, "trainers.config"), PPO_TYPES),
    (
        "trainers.stages",
        (
            "actors",
            "trainers.ppo",
            "trainers.evaluation",
            "trainers.pipeline",
            "trainers.demo",
            "trainers.cli",
        ),
        (),
    ),
    (
        "trainers.ppo",
        ("trainers.stages", "trainers.evaluation", "trainers.pipeline", "trainers.demo", "trainers.cli"),
        (),
    ),
    *(
        (pure, (*HEAVY, "actors", "cluster", "trainers.ppo.driver", "trainers.ppo.roles"), ())
        for pure in PPO_PURE
    ),
    (
        "trainers.evaluation",
        ("trainers.stages", "trainers.ppo", "trainers.pipeline", "trainers.demo", "trainers.cli"),
        (),
    ),
    ("trainers.pipeline", ("trainers.demo", "trainers.cli"), ()),
    ("trainers.demo", ("trainers.cli",), ()),
)
"""Which modules (by prefix) must not import which (by prefix); docs/design.md's layout table says why."""


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """``dotted module name -> file`` for every ``.py`` file under the packages (``__init__`` = the package)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """Every module ``module`` imports, wherever the import statement stands (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in known else base)
    return out


def import_graph(
    root: Path, packages: Iterable[str] = PACKAGES
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(all imports, imports of project modules)`` per project module."""
    files = module_files(root, packages)
    everything = {m: imports_of(m, p, files) for m, p in files.items()}
    project = {m: {i for i in deps if i in files and i != m} for m, deps in everything.items()}
    return everything, project


def matches(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside it (``trainers.`` matches every trainers module but not the package)."""
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def violations(everything: Mapping[str, set[str]]) -> list[str]:
    """``module imports X (forbidden for PREFIX)`` for every import a rule forbids."""
    found = []
    for prefix, forbidden, allowed in RULES:
        for module, deps in everything.items():
            if not matches(module, prefix):
                continue
            for dep in sorted(deps):
                if any(matches(dep, a) for a in allowed):
                    continue
                if any(matches(dep, f) for f in forbidden):
                    found.append(f"{module} imports {dep} (forbidden for {prefix})")
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_package_imports_what_its_layer_forbids():
    everything, _ = import_graph(REPO)
    assert violations(everything) == []


def test_no_import_cycle_between_the_projects_modules():
    _, project = import_graph(REPO)
    assert cycles(project) == []


def defined_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def dangling_imports(root: Path) -> list[str]:
    """Imports of project modules (or of names from project packages) that this repository lacks: with
    another install of the package on the path they would quietly load stale code."""
    files = module_files(root)
    found = []
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [(node.module, a.name) for a in node.names]
            for target, name in names:
                if target.split(".")[0] not in PACKAGES:
                    continue
                if target not in files:
                    found.append(f"{module} imports {target}")
                elif name and f"{target}.{name}" not in files and name not in defined_names(files[target]):
                    found.append(f"{module} imports {name} from {target}")
    return found


def test_every_project_import_exists_in_this_repository():
    assert dangling_imports(REPO) == []


def test_the_layers_name_real_packages():
    """A rule about a package that was renamed would silently check nothing."""
    modules = module_files(REPO)
    for prefix, _, _ in RULES:
        assert any(matches(m, prefix) for m in modules), prefix


@pytest.fixture
def toy_tree(tmp_path: Path) -> Path:
    """trainers/algos importing ray inside a function, and a cycle a -> b -> a through a relative import."""
    files = {
        "trainers/__init__.py": "",
        "trainers/algos/__init__.py": "def f():\n    import ray\n",
        "trainers/a.py": "from trainers import b\n",
        "trainers/b.py": "def g():\n    from . import a\n",
        "trainers/c.py": "from trainers.a import something\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_sees_function_level_imports_and_relative_cycles(toy_tree):
    everything, project = import_graph(toy_tree, ["trainers"])
    assert violations(everything) == ["trainers.algos imports ray (forbidden for trainers.algos)"]
    assert cycles(project) == [["trainers.a", "trainers.b"]]
    assert project["trainers.c"] == {"trainers.a"}  # `from module import name` depends on the module
