"""Which ``ninja`` DeepSpeed's JIT build finds: the one next to the interpreter, whatever the launching shell's
``PATH`` (trainers.runtime.dist.path_for_jit). Two ninja versions alternating in one build folder rebuild the
shared-memory op on every switch."""

from __future__ import annotations

import os
import shutil

from trainers.runtime.dist import path_for_jit


def executable(path, name="ninja"):
    path.mkdir(parents=True, exist_ok=True)
    tool = path / name
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    return tool


def test_the_interpreters_ninja_comes_first_and_nothing_is_lost(tmp_path):
    venv, system, other = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin", tmp_path / "opt"
    executable(venv)
    executable(system)
    other.mkdir()
    path = os.pathsep.join([str(system), str(other), str(venv)])
    pinned = path_for_jit(path, venv)
    assert pinned.split(os.pathsep) == [str(venv), str(system), str(other)]  # moved, not duplicated
    assert shutil.which("ninja", path=pinned) == str(venv / "ninja")


def test_path_is_kept_when_it_already_finds_that_ninja_or_the_interpreter_has_none(tmp_path):
    venv, system = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    executable(venv)
    executable(system)
    already = os.pathsep.join([str(venv), str(system)])
    assert path_for_jit(already, venv) == already
    bare = tmp_path / "bare" / "bin"
    executable(bare, "python")
    path = os.pathsep.join([str(system)])
    assert path_for_jit(path, bare) == path  # no ninja of its own: the system's stays in use
