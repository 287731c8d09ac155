"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from tests.conftest import world_corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small world tokenizer (600 entries) saved once per test module."""
    from trainers.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(world_corpus(), path, vocab_size=600)
    return path
