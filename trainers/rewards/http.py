"""A reward served over HTTP (``reward.url``): one POST per batch, standard library only.

The protocol (docs/design.md, "Estimators, reward sources, evaluation while training (issue 15)")::

    POST <url>   Content-Type: application/json
                 {"prompts": [...], "responses": [...], "rows": [...]}      (as in trainers.rewards.RewardFn)
    200          {"scores": [one number per row]}

:func:`check_endpoint` POSTs an empty batch before any actor starts (it must answer ``{"scores": []}``);
a failure there is the user's to fix (:class:`ConfigError`, exit 2). During the run
:meth:`HttpReward.scores` retries connection errors, timeouts and 5xx answers with exponential backoff;
a 4xx answer, an answer that is not ``{"scores": [...]}`` and the last failed retry are a
:class:`RewardSourceError` (the driver stops the run, exit 3). Proxies follow urllib's usual
``http_proxy`` / ``no_proxy`` environment variables.

Rows go as JSON: the prompt records of :func:`trainers.data.read_conversations` are plain Python
(pyarrow's ``to_pylist``), and anything JSON cannot write -- a numpy value, a timestamp, a decimal,
bytes -- is sent as its ``tolist()`` when it has one, else as ``str(value)``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request

from trainers.errors import ConfigError
from trainers.rewards.function import RewardSourceError, check_scores, describe, rows_text

log = logging.getLogger(__name__)

ANSWER_EXCERPT = 200
"""Characters of an error answer's body quoted in the message (servers often say what was wrong)."""


class _PostFailed(Exception):
    """One POST that gave no usable answer: ``retry`` says whether trying again may help, ``answered``
    whether the server answered at all (an HTTP error, a body that is not the protocol's)."""

    def __init__(self, reason: str, retry: bool, answered: bool = True):
        super().__init__(reason)
        self.retry, self.answered = retry, answered


def jsonable(value: object) -> object:
    """JSON's fallback for a value it cannot write (module docstring): ``tolist()``, else ``str``."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else str(value)


def _excerpt(err: urllib.error.HTTPError) -> str:
    """``: <first line of the error answer's body>`` (shortened), or nothing when it has none."""
    try:
        body = err.read().decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        body = ""
    finally:
        err.close()
    return f": {body.splitlines()[0][:ANSWER_EXCERPT]}" if body else ""


def _reason(err: BaseException) -> str:
    """What a failed connection says, without urllib's ``<urlopen error ...>`` wrapping."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err.reason, str):
        return describe(err.reason)
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return describe(err)


def _post_json(url: str, payload: dict, timeout_s: float) -> object:
    """POST ``payload`` as JSON, once; the decoded JSON answer of a 2xx, else :class:`_PostFailed`."""
    body = json.dumps(payload, default=jsonable).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as err:  # before OSError: an HTTPError is a URLError is an OSError
        raise _PostFailed(f"HTTP {err.code} {err.reason}{_excerpt(err)}", retry=err.code >= 500) from None
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut short
        raise _PostFailed(_reason(err), retry=True, answered=False) from None
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        raise _PostFailed(f"the answer is not JSON: {raw[:ANSWER_EXCERPT]!r}", retry=False) from None


def _scores_of(answer: object) -> object:
    """The ``scores`` of a decoded answer, else :class:`_PostFailed` saying what came instead."""
    if not isinstance(answer, dict) or "scores" not in answer:
        raise _PostFailed(f'the answer has no "scores": {json.dumps(answer)[:ANSWER_EXCERPT]}', retry=False)
    return answer["scores"]


def check_url(url: str) -> None:
    """:class:`ConfigError` unless ``url`` is an ``http://`` or ``https://`` URL with a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"reward.url={url!r}: not an http:// or https:// URL")


class HttpReward:
    """Scores from a reward server at ``url``; safe to call from a driver thread."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5):
        """``retries``: further tries after a failed POST that may succeed on another try; before try
        ``k + 1`` (k = 0, 1, ...) it waits ``backoff_s * 2**k`` seconds."""
        check_url(url)
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.source = f"reward.url={url!r}"

    def scores(
        self, prompts: list, responses: list[str], rows: list[dict], first_row: int = 0
    ) -> list[float]:
        """One finite score per row (rows ``first_row``.. of the whole batch, for the messages)."""
        n = len(rows)
        if not len(prompts) == len(responses) == n:
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {n} rows")
        payload = {"prompts": list(prompts), "responses": list(responses), "rows": list(rows)}
        answer = self._answer(payload, rows_text(first_row, n), first_row)
        return check_scores(answer, n, self.source, first_row)

    def _answer(self, payload: dict, where: str, first_row: int) -> object:
        """The ``scores`` the server answers for ``payload``, trying again while that may help."""
        for attempt in itertools.count():
            try:
                return _scores_of(_post_json(self.url, payload, self.timeout_s))
            except _PostFailed as err:
                if not err.retry:
                    raise RewardSourceError(
                        f"{self.source}: {err} (for the {where})", self.source, first_row
                    ) from None
                if attempt == self.retries:
                    raise RewardSourceError(
                        f"{self.source}: no answer for the {where} after {attempt + 1} tries: {err}",
                        self.source,
                        first_row,
                    ) from None
                wait = self.backoff_s * 2**attempt
                log.warning("%s: %s; trying again in %.1f s", self.source, err, wait)
                time.sleep(wait)


def check_endpoint(url: str, timeout_s: float) -> None:
    """The health check before any actor starts: an empty batch must be answered 200 ``{"scores": []}``.
    A malformed URL, a server that cannot be reached or a wrong answer is a one-line :class:`ConfigError`."""
    check_url(url)
    try:
        answer = _post_json(url, {"prompts": [], "responses": [], "rows": []}, timeout_s)
    except _PostFailed as err:
        if not err.answered:
            raise ConfigError(f"reward.url={url!r} is unreachable: {err}") from None
        wrong = str(err)
    else:
        if answer == {"scores": []}:
            return
        wrong = json.dumps(answer)[:ANSWER_EXCERPT]
    raise ConfigError(
        f"reward.url={url!r} answered the health check (POST of an empty batch) with {wrong}, "
        'expected 200 {"scores": []}'
    )
