"""The test tree itself: pytest imports test modules by basename (the test folders are not packages), so
two files with the same name in tests/unit and tests/integration stop collection of the whole suite."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "bench" not in p.parts)
    assert [name for name, count in names.items() if count > 1] == []
