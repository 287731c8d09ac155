"""The HTTP reward against real local servers: the protocol, retries and backoff, errors, the health check."""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainers.errors import ConfigError
from trainers.rewards import HttpReward, RewardSourceError, check_endpoint

Answer = Callable[[dict, int], tuple[int, object]]
"""``(request JSON, call number from 1) -> (status, JSON body)`` of a test server."""


class Server:
    """A server on 127.0.0.1 answering with ``answer``; remembers the requests it got."""

    def __init__(self, answer: Answer):
        self.requests: list[dict] = []
        self.content_types: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.content_types.append(self.headers["Content-Type"])
                status, payload = answer(body, len(server.requests))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)  # a client past its timeout (the 0.1 s case) has hung up

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], Server]]:
    started: list[Server] = []

    def start(answer: Answer) -> Server:
        started.append(Server(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


def lengths(body: dict, call: int) -> tuple[int, object]:
    """The good server: each response's length."""
    return 200, {"scores": [len(r) for r in body["responses"]]}


PROMPTS = ["Hi?", [{"role": "user", "content": "Why?"}]]
RESPONSES = ["Hello.", "Because."]
ROWS = [{"prompt": "Hi?", "answer": "Hello"}, {"prompt": "Why?", "answer": None}]


def test_a_batch_is_posted_as_json_and_its_scores_come_back(serve):
    server = serve(lengths)
    assert HttpReward(server.url).scores(PROMPTS, RESPONSES, ROWS) == [6.0, 8.0]
    assert server.requests == [{"prompts": PROMPTS, "responses": RESPONSES, "rows": ROWS}]
    assert server.content_types == ["application/json"]


def test_values_json_cannot_write_go_as_their_tolist_or_their_text(serve):
    class Vector:  # stands for a numpy array or scalar
        def tolist(self):
            return [1, 2]

    server = serve(lengths)
    rows = [{"when": datetime.date(2024, 5, 1), "price": Decimal("1.5"), "v": Vector()}]
    HttpReward(server.url).scores(["p"], ["r"], rows)
    assert server.requests[0]["rows"] == [{"when": "2024-05-01", "price": "1.5", "v": [1, 2]}]


def test_5xx_answers_are_retried_with_exponential_backoff(serve, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("trainers.rewards.http.time.sleep", waits.append)
    server = serve(lambda body, call: (503, {"error": "busy"}) if call <= 2 else lengths(body, call))
    assert HttpReward(server.url, retries=3, backoff_s=0.5).scores(PROMPTS, RESPONSES, ROWS) == [6.0, 8.0]
    assert len(server.requests) == 3
    assert waits == [0.5, 1.0]


def test_a_timed_out_request_is_retried(serve):
    def slow_first(body: dict, call: int) -> tuple[int, object]:
        if call == 1:
            time.sleep(0.5)
        return lengths(body, call)

    server = serve(slow_first)
    reward = HttpReward(server.url, timeout_s=0.1, retries=1, backoff_s=0.01)
    assert reward.scores(PROMPTS, RESPONSES, ROWS) == [6.0, 8.0]
    assert len(server.requests) == 2


def test_a_server_that_always_fails_is_a_reward_source_error_after_the_retries(serve):
    server = serve(lambda body, call: (500, {"error": "model crashed"}))
    with pytest.raises(RewardSourceError) as err:
        HttpReward(server.url, retries=2, backoff_s=0.01).scores(PROMPTS, RESPONSES, ROWS, first_row=40)
    assert len(server.requests) == 3
    assert err.value.row == 40
    assert err.value.source == f"reward.url={server.url!r}"
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"reward.url={server.url!r}: no answer for the rows 40..41 after 3 tries")
    assert "HTTP 500" in message and "model crashed" in message


def test_a_4xx_answer_is_not_retried(serve):
    server = serve(lambda body, call: (400, {"error": "rows need an answer column"}))
    with pytest.raises(RewardSourceError) as err:
        HttpReward(server.url, retries=3, backoff_s=10.0).scores(PROMPTS, RESPONSES, ROWS, first_row=2)
    assert len(server.requests) == 1
    assert "HTTP 400" in str(err.value) and "rows need an answer column" in str(err.value)
    assert "rows 2..3" in str(err.value)


@pytest.mark.parametrize(
    ("answer", "row", "says"),
    [
        ({"scores": [1.0]}, 7, "returned 1 scores for the 2 rows 7..8"),
        ({"scores": [1.0, None]}, 8, "row 8: the score None is not a number"),
        ({"score": [1.0, 2.0]}, 7, 'the answer has no "scores"'),
    ],
)
def test_a_wrong_answer_is_a_reward_source_error_at_once(serve, answer, row, says):
    server = serve(lambda body, call: (200, answer))
    with pytest.raises(RewardSourceError) as err:
        HttpReward(server.url, backoff_s=10.0).scores(PROMPTS, RESPONSES, ROWS, first_row=7)
    assert len(server.requests) == 1
    assert err.value.row == row
    assert says in str(err.value)


def closed_port_url() -> str:
    """A URL on a local port nothing listens on (bound once, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/score"


def test_a_server_that_is_down_is_retried_then_reported(monkeypatch):
    monkeypatch.setattr("trainers.rewards.http.time.sleep", lambda s: None)
    url = closed_port_url()
    with pytest.raises(RewardSourceError, match=r"after 2 tries: .*refused"):
        HttpReward(url, retries=1).scores(PROMPTS, RESPONSES, ROWS)


def test_the_health_check_passes_a_good_server_with_an_empty_batch(serve):
    server = serve(lengths)
    check_endpoint(server.url, timeout_s=5.0)
    assert server.requests == [{"prompts": [], "responses": [], "rows": []}]


def test_the_health_check_refuses_a_closed_port_a_wrong_answer_and_a_bad_url(serve):
    url = closed_port_url()
    with pytest.raises(ConfigError, match=rf"^reward.url='{url}' is unreachable: .*refused"):
        check_endpoint(url, timeout_s=5.0)
    wrong = serve(lambda body, call: (200, {"scores": [0.0]}))
    with pytest.raises(ConfigError, match=r'answered the health check .* with \{"scores": \[0.0\]\}'):
        check_endpoint(wrong.url, timeout_s=5.0)
    missing = serve(lambda body, call: (404, {"error": "no such route"}))
    with pytest.raises(ConfigError, match=r"answered the health check .* with HTTP 404"):
        check_endpoint(missing.url, timeout_s=5.0)
    for bad in ("ftp://host/score", "localhost:8000/score", "http:///score"):
        with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
            check_endpoint(bad, timeout_s=5.0)
        with pytest.raises(ConfigError):
            HttpReward(bad)
