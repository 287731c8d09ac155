"""``rlhf upload-size`` (cluster/upload.py) against the zip Ray itself builds for ``ray job submit``.

The oracle is Ray's job-client path minus the HTTP request: ``upload_working_dir_if_needed`` with an
``upload_fn`` that calls ``create_package``, as ``ray/dashboard/modules/dashboard_sdk.py`` does. No
cluster: packaging is local file work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from cluster.upload import job_upload_limit, measure_upload
from tests.conftest import REPO
from trainers.cli import main

SOURCE = ("trainers/__init__.py", "trainers/runs/metrics.py", "trainers/stages/checkpoints.py", "README.md")
"""Files a job needs, some named like run outputs (a `runs/` package, a `checkpoints.py` module)."""
JUNK = (
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
    "runs/demo/sft/model/model.safetensors",
    "myexp/checkpoints/iter_000002/policy/state.pt",
    "myexp/model/model.safetensors",
    "myexp/tensorboard/events.out.tfevents.1.host",
    "trainers/__pycache__/cli.cpython-311.pyc",
    ".git/objects/pack/pack-1.pack",
    ".pytest_cache/v/cache/nodeids",
    "ray_rlhf.egg-info/PKG-INFO",
)
"""What a `--working-dir .` upload must never carry: environments, run outputs (also a `--out` made inside
the repository), weights, caches, the repository's history."""
SMALL_OUTPUTS = ("myexp/metrics.jsonl", "myexp/config.yaml")
"""A run's small text outputs: uploaded (they cost nothing and no pattern can tell them from sources)."""


def make_tree(root: Path) -> None:
    """A repository-like directory with this repository's .gitignore and .rayignore."""
    for name in (".gitignore", ".rayignore"):
        shutil.copy(REPO / name, root / name)
    for rel in (*SOURCE, *SMALL_OUTPUTS, *JUNK, "sub/local.txt", "sub/kept.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"contents of {rel}\n")
    (root / "sub" / ".gitignore").write_text("local.txt\n")  # a nested .gitignore is read too
    (root / "emptydir").mkdir()  # Ray packs an empty directory as an entry


def ray_zip(root: Path, target: Path) -> zipfile.ZipFile:
    """The package Ray's job client would upload for working_dir ``root`` (same switches it reads)."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"

    def upload_fn(working_dir: str, excludes: list[str], is_file: bool = False) -> None:
        create_package(working_dir, target, include_gitignore=include_gitignore, excludes=excludes)

    upload_working_dir_if_needed(
        {"working_dir": str(root)}, include_gitignore=include_gitignore, upload_fn=upload_fn
    )
    return zipfile.ZipFile(target)


def test_the_measured_upload_is_the_zip_ray_builds(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    make_tree(root)
    measured = measure_upload(root)
    with ray_zip(root, tmp_path / "pkg.zip") as z:
        zipped = {info.filename: info.file_size for info in z.infolist()}
    assert dict(measured.entries) == zipped
    assert measured.zip_bytes == (tmp_path / "pkg.zip").stat().st_size
    assert set(zipped) == {*SOURCE, *SMALL_OUTPUTS, "sub/kept.txt", "sub/.gitignore", ".gitignore", ".rayignore",
                           "emptydir/"}  # fmt: skip
    assert set(measured.ignore_files) == {".gitignore", ".rayignore", "sub/.gitignore"}
    assert measured.entries[0][1] >= measured.entries[-1][1]  # largest first


def test_rayignore_alone_keeps_the_junk_out(tmp_path, monkeypatch):
    """With .gitignore turned off and Ray's default excludes emptied, the repository's .rayignore still
    leaves every piece of junk out (and only .gitignore's own entry comes back)."""
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    root = tmp_path / "repo"
    root.mkdir()
    make_tree(root)
    measured = measure_upload(root)
    with ray_zip(root, tmp_path / "pkg.zip") as z:
        assert dict(measured.entries) == {i.filename: i.file_size for i in z.infolist()}
    names = {name for name, _ in measured.entries}
    assert not names & set(JUNK)
    assert "sub/local.txt" in names and measured.excludes == ()
    assert measured.ignore_files == (".rayignore",)


def test_runtime_env_excludes_count(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    make_tree(root)
    names = {name for name, _ in measure_upload(root, ("myexp",)).entries}
    assert not any(name.startswith("myexp/") for name in names) and "README.md" in names


def test_this_repository_uploads_every_file_it_tracks_and_nothing_big():
    """The .rayignore drops no source file (a pattern like `runs` would take trainers/runs/ with it)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listed.returncode:
        pytest.skip("not a git checkout")
    measured = measure_upload(REPO)
    names = {name for name, _ in measured.entries}
    tracked = {name for name in listed.stdout.splitlines() if (REPO / name).is_file()}
    assert tracked <= names, sorted(tracked - names)[:10]
    assert not [n for n in names if n.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in n]
    assert measured.zip_bytes < 10 * 1024**2


def test_the_command_prints_the_totals_and_the_largest_files(tmp_path, capsys):
    root = tmp_path / "repo"
    root.mkdir()
    make_tree(root)
    (root / "data.jsonl").write_bytes(b"x" * 50_000)
    assert main(["upload-size", str(root), "--largest", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    measured = measure_upload(root)
    assert out[0].startswith(
        f"ray job submit --working-dir {root} would upload {len(measured.entries)} files, "
    )
    assert f"a zip of {measured.zip_bytes:,} bytes" in out[0] and "up to 100.0 MiB" in out[0]
    assert (
        out[1]
        == "excluded by: .gitignore, .rayignore, sub/.gitignore; patterns .git, .venv, venv, __pycache__"
    )
    assert out[2:4] == ["largest:", "    48.8 KiB  data.jsonl"] and len(out) == 5
    assert out[4].endswith(f"  {measured.entries[1][0]}")


def test_over_the_limit_is_one_error_line_naming_the_limit_and_the_biggest_files(tmp_path, capsys):
    """Ray's job API refuses a request body over 100 MiB (the dashboard's DASHBOARD_CLIENT_MAX_SIZE)."""
    assert job_upload_limit() == 100 * 1024**2
    root = tmp_path / "repo"
    root.mkdir()
    make_tree(root)
    for name, size in (("data/big.parquet", 80), ("data/bigger.parquet", 90)):
        (root / name).parent.mkdir(exist_ok=True)
        with open(root / name, "wb") as f:
            f.truncate(size * 1024**2)  # sparse: sizes only, nothing is read
    assert main(["upload-size", str(root)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"rlhf: error: ray job submit --working-dir {root} would upload 170.0 MiB"
    )
    assert "more than the 100.0 MiB" in err[0]
    assert "largest: data/bigger.parquet (90.0 MiB), data/big.parquet (80.0 MiB)" in err[0]
    assert ".rayignore" in err[0]
    assert "would upload" in captured.out  # the report still came first


def test_not_a_directory(tmp_path, capsys):
    assert main(["upload-size", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("rlhf: error: upload-size: ")
