"""cluster.connect's diagnosis of a failed join: does anything answer at the address Ray could not join?"""

from __future__ import annotations

import socket

import pytest

from cluster.connect import TOKEN_FIX, address_answers


@pytest.fixture
def listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_an_address_with_a_listener_answers_in_every_form(listening_port):
    port = listening_port
    assert address_answers(f"127.0.0.1:{port}")
    assert address_answers(f"ray://127.0.0.1:{port}")
    assert address_answers(f"ray://user:secret@127.0.0.1:{port}")


def test_nothing_listening_or_no_host_port_does_not_answer():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not address_answers(f"127.0.0.1:{port}", timeout_s=1.0)
    for address in (None, "", "auto", "localhost", "ray://host:notaport"):
        assert not address_answers(address)


def test_the_fix_names_every_way_to_give_the_token():
    for part in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "~/.ray/auth_token"):
        assert part in TOKEN_FIX
