"""A reward function given by the user: finding it from its spec, calling it, checking its scores.

``reward.function`` names a Python callable ``fn(prompts, responses, rows) -> scores`` (docs/design.md,
"Estimators, reward sources, evaluation while training (issue 15)")::

    reward.function=trainers.data.gold:reward      # package.module:function, imported as usual
    reward.function=rewards/exact_match.py:score   # a file (relative to the current directory)

The driver loads it once before anything starts, so a bad spec is a one-line :class:`ConfigError`
(exit 2); the CPU actors of ``actors/reward_function.py`` load it again by the same spec. What goes
wrong while it runs -- it raises, returns the wrong number of scores, a non-number, NaN or inf -- is a
:class:`RewardSourceError` naming the source and the first offending row of the whole batch, which
the driver turns into ``rlhf: stopped: ...`` (exit 3).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from functools import reduce
from pathlib import Path

from trainers.errors import ConfigError

RewardFn = Callable[[list, list[str], list[dict]], Sequence[float]]
"""``fn(prompts, responses, rows) -> one score per row``: ``prompts`` are the prompt records' ``prompt``
values (a string, or a list of ``{"role", "content"}`` messages), ``responses`` the decoded replies,
``rows`` the prompt records themselves with their extra columns (a reference answer, a task name...)."""


class RewardSourceError(RuntimeError):
    """A reward source failed on a batch while the run was going on; ``str(err)`` is one line.

    ``source`` is how the message names the source (``reward.function='m:fn'``, ``reward.url='...'``);
    ``row`` is the absolute index, in the whole batch, of the first row the failure is about (for a
    call that raised, the first row of that call's part), or None when no row is to blame.
    """

    def __init__(self, message: str, source: str, row: int | None):
        super().__init__(message)
        self.source = source
        self.row = row

    def __reduce__(self):
        # Travels between Ray processes by pickle: rebuild from all three fields, not ``args`` alone.
        return type(self), (str(self), self.source, self.row)


def describe(err: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` for an empty message), for one-line errors."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def is_file_spec(module: str) -> bool:
    """Whether a spec's module part is a file path (``x.py``, ``dir/x``) rather than a dotted module."""
    return module.endswith(".py") or "/" in module


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative file path made absolute against the current directory, so a process with
    another working directory (a Ray worker) finds the same file; a module spec stays as it is."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not is_file_spec(module):
        return spec
    return f"{Path(module).expanduser().absolute()}:{attr}"


def _import_file(path: Path) -> object:
    """Execute a Python file as a module under a private name derived from its absolute path.

    The module is registered in ``sys.modules`` (dataclasses and ``typing`` look modules up there) and
    its directory is on ``sys.path`` only while it executes, so it can import files next to it.
    """
    name = "_rlhf_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_reward_function(spec: str, where: str = "reward.function") -> RewardFn:
    """The callable ``spec`` names (``package.module:fn`` or ``path/to/file.py:fn``); ``fn`` may be dotted
    (``Class.method``). Anything that stops it from being found is a one-line :class:`ConfigError`
    ``<where>='<spec>': <what is wrong>``."""
    head = f"{where}={spec!r}"
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConfigError(f"{head}: expected 'package.module:function' or 'path/to/file.py:function'")
    path = Path(module_name).expanduser().absolute() if is_file_spec(module_name) else None
    if path is not None and not path.is_file():
        raise ConfigError(f"{head}: no such file {path}")
    try:
        module = importlib.import_module(module_name) if path is None else _import_file(path)
    except Exception as err:
        raise ConfigError(f"{head}: importing {module_name} failed: {describe(err)}") from None
    try:
        fn = reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise ConfigError(f"{head}: {module_name} has no attribute {attr!r}") from None
    if not callable(fn):
        raise ConfigError(f"{head}: {attr} is a {type(fn).__name__}, not a callable")
    return fn


def rows_text(first_row: int, n: int) -> str:
    """``row 4`` or ``rows 4..7``: the ``n`` rows from ``first_row``, for messages."""
    return f"row {first_row}" if n == 1 else f"rows {first_row}..{first_row + n - 1}"


def check_scores(scores: object, n: int, source: str, first_row: int = 0) -> list[float]:
    """``scores`` as ``n`` finite floats, else :class:`RewardSourceError` naming ``source`` and the first
    offending row (``first_row`` + its index; ``first_row`` itself for a wrong type or length).

    Any sized iterable of numbers passes (a list, a tuple, a numpy array, a 1-D tensor; a bool counts as
    0 or 1); a string, a mapping, a generator or a non-number in it (``None``, ``"0.5"``) does not.
    """
    if isinstance(scores, str | bytes | dict) or not hasattr(scores, "__len__"):
        raise RewardSourceError(
            f"{source}: returned a {type(scores).__name__} for {rows_text(first_row, n)}, "
            f"expected a sequence of {n} numbers",
            source,
            first_row,
        )
    values = list(scores)
    if len(values) != n:
        raise RewardSourceError(
            f"{source}: returned {len(values)} scores for the {n} {rows_text(first_row, n)}",
            source,
            first_row,
        )
    out = []
    for i, value in enumerate(values):
        row = first_row + i
        try:
            if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise RewardSourceError(
                f"{source}: row {row}: the score {value!r:.60} is not a number", source, row
            ) from None
        if not math.isfinite(number):
            raise RewardSourceError(f"{source}: row {row}: the score is {number}", source, row)
        out.append(number)
    return out


def call_reward_function(
    fn: RewardFn,
    prompts: list,
    responses: list[str],
    rows: list[dict],
    source: str,
    first_row: int = 0,
) -> list[float]:
    """``fn(prompts, responses, rows)`` checked by :func:`check_scores`; an exception from ``fn`` becomes a
    :class:`RewardSourceError` naming ``source``, the exception and ``first_row`` (where this part of the
    batch starts)."""
    if not len(prompts) == len(responses) == len(rows):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(rows)} rows")
    try:
        scores = fn(prompts, responses, rows)
    except Exception as err:
        raise RewardSourceError(
            f"{source}: raised {describe(err)} on the {rows_text(first_row, len(rows))}",
            source,
            first_row,
        ) from err
    return check_scores(scores, len(rows), source, first_row)
