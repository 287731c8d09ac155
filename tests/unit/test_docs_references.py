"""The docs and the code point only at things that exist in the repository.

Checked: every backticked path under actors/, cluster/, trainers/, tests/ or docs/ in the docs and the
README is a file or folder of the repository; every backticked dotted name ``trainers.x.y`` /
``actors.x`` / ``cluster.x`` in the docs resolves (a module, or an attribute of one); every
"docs/ppo_details.md item N" cited anywhere (code, tests, docs) is an item of that file; and nothing cites
a file that lives outside the repository.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
CODE = [
    p
    for top in ("actors", "cluster", "trainers", "tests")
    for p in sorted((REPO / top).rglob("*.py"))
    if "results" not in p.parts
]
PATH = re.compile(r"`((?:actors|cluster|trainers|tests|docs)/[\w./{},*-]*)`")
NAME = re.compile(r"`((?:actors|cluster|trainers)(?:\.\w+)+)(?:\(\))?`")
ITEM = re.compile(r"docs/ppo_details\.md items? ((?:\d+(?:[-–]\d+)?(?:, | and |/)?)+)")
OUTSIDE = re.compile(r"\b(PPO_DETAILS|DESIGN\.md|ENV_NOTES|STYLE\.md)\b|\.\./shared")


def expand(path: str) -> list[str]:
    """``a/{b,c}.py`` -> ``[a/b.py, a/c.py]`` (the docs name sibling files that way)."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [p for part in match.group(1).split(",") for p in expand(path.replace(match.group(0), part, 1))]


def is_config_key(dotted: str) -> bool:
    """``cluster.ray_address`` and friends: a config key, not a module (the ``cluster`` section)."""
    from trainers.config import Config

    section, _, key = dotted.partition(".")
    return hasattr(Config(), section) and key in vars(getattr(Config(), section))


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module or an attribute (chain) of the longest importable module."""
    if is_config_key(dotted):
        return True
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        if not Path(obj.__file__).resolve().is_relative_to(REPO):
            return False  # another install of the package (a stale checkout): not this repository
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def ppo_detail_items() -> set[int]:
    text = (REPO / "docs" / "ppo_details.md").read_text()
    return {int(n) for n in re.findall(r"^(\d+)\. \*\*", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_in_the_docs_exist(doc):
    missing = [
        p
        for raw in PATH.findall(doc.read_text())
        for p in expand(raw.rstrip("/."))
        if "*" not in p and not (REPO / p).exists()
    ]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_dotted_names_in_the_docs_resolve(doc):
    assert [name for name in NAME.findall(doc.read_text()) if not resolves(name)] == []


def test_ppo_details_citations_name_items_that_exist():
    items = ppo_detail_items()
    assert items == set(range(1, 32))
    bad = []
    for path in [*CODE, *DOCS]:
        for cited in ITEM.findall(path.read_text()):
            for piece in re.findall(r"\d+(?:[-–]\d+)?", cited):
                if not {int(x) for x in re.split(r"[-–]", piece)} <= items:
                    bad.append(f"{path.relative_to(REPO)}: item {piece}")
    assert bad == []


def test_nothing_cites_a_file_outside_the_repository():
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in [*CODE, *DOCS]
        if path.name != "test_docs_references.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []
