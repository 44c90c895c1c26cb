"""One HTTP client for OpenAI-compatible servers, shared by the judge and by answer generation.

:class:`Endpoint` holds what every request to a server shares: its base URL (credentials embedded in
it kept out of logs), the API key (read from an environment variable, sent only in the
``Authorization`` header, redacted from every message), timeouts, the connection pool and the
retry policy.  Its callers (:class:`neftune.judge.http.HttpJudge`, :mod:`neftune.serve`) add only what
their requests mean.

Retry policy -- ask again only when asking again can change the answer:

* transport errors, timeouts, HTTP 408, 429 and 5xx (not 501/505) are :class:`Transient` and are
  retried up to ``max_retries`` times, waiting ``backoff * 2**k`` seconds, or the server's
  ``Retry-After``, capped at ``max_backoff``;
* HTTP 401/403 (bad key) and 404 (bad URL or model) raise the caller's ``fatal`` error class at once,
  since every other request would fail the same way;
* other 4xx and malformed bodies raise :class:`RequestFailed` for that request alone.

Every message is one line.
"""

from __future__ import annotations

import email.utils
import os
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypedDict

import httpx

from neftune.errors import ConfigError, NeftuneError

__all__ = ["RETRY_STATUS", "Endpoint", "RequestFailed", "Transient", "retry_after"]

#: Statuses that asking again may cure.
RETRY_STATUS = frozenset({408, 429}) | (frozenset(range(500, 600)) - {501, 505})


class Transient(Exception):
    """A failure that asking again may cure."""

    def __init__(self, reason: str, retry_after: float | None = None, *, unanswered: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.unanswered = unanswered
        """No answer came at all (refused, reset, timed out): the server may be gone, not just busy."""


class RequestFailed(Exception):
    """One request failed for good (a 4xx other than 401/403/404, or a body that is not JSON)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class EndpointOptions(TypedDict, total=False):
    """The settings of :class:`Endpoint` that its callers take and pass on unchanged (same defaults)."""

    api_key_env: str
    timeout: float
    max_retries: int
    backoff: float
    max_backoff: float
    workers: int


class Endpoint:
    """An OpenAI-compatible API root and the policy every request to it follows.

    Args:
        base_url: API root such as ``http://127.0.0.1:8080/v1``.
        role: who asks, for messages (``"judge"``, ``"generation"``).
        fatal: the error raised when no request can succeed (bad key, URL or model).
        url_setting: the setting that holds ``base_url``, named by the 404 message.
        api_key_env: NAME of the environment variable holding the API key (unset: no header).
        timeout: seconds per HTTP request.
        max_retries: extra attempts after the first for :class:`Transient` failures.
        backoff: delay before the first retry, doubled each retry; ``Retry-After`` is honoured.
        max_backoff: longest wait between two attempts.
        workers: concurrent connections the pool keeps.
    """

    def __init__(
        self,
        base_url: str,
        *,
        role: str,
        fatal: type[NeftuneError],
        url_setting: str = "base_url",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        workers: int = 4,
    ) -> None:
        parsed = urllib.parse.urlsplit(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"{role} base_url must be an http(s) URL, got {base_url!r}")
        if not api_key_env or not isinstance(api_key_env, str):
            raise ConfigError(f"{role} api_key_env must name an environment variable")
        if max_retries < 0 or workers < 1 or timeout <= 0:
            raise ConfigError(f"{role} needs max_retries >= 0, workers >= 1 and timeout > 0")
        self.base_url = str(base_url).rstrip("/")
        self.role, self.fatal, self.url_setting = role, fatal, url_setting
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.workers = int(workers)
        # Read once; kept private and out of identity/repr so it can never reach a cache or log.
        self._api_key = os.environ.get(api_key_env) or None
        self.sleep: Callable[[float], object] = time.sleep  # replaceable, so tests can record the waits

    def url(self, path: str) -> str:
        """``base_url`` with ``path`` (e.g. ``/completions``) appended unless it already ends with it."""
        return self.base_url if self.base_url.endswith(path) else self.base_url + path

    @staticmethod
    def public(url: str) -> str:
        """``url`` without any ``user:password@``, so credentials embedded in it are not cached or logged."""
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def client(self) -> httpx.Client:
        """A connection pool for a batch of requests (use it as a context manager)."""
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
        return httpx.Client(headers=headers, timeout=self.timeout, limits=limits)

    def delay(self, attempt: int, after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return min(max(self.backoff * 2 ** (attempt - 1), after or 0.0), self.max_backoff)

    def post_once(
        self,
        client: httpx.Client,
        url: str,
        payload: dict[str, Any] | None,
        *,
        model: str,
        on_error: Callable[[int, str], None] | None = None,
        expect_json: bool = True,
    ) -> dict[str, Any]:
        """One request (a GET when ``payload`` is None); its JSON object body, or the failure classified
        for the retry policy.

        ``on_error(status, detail)`` sees an error reply first and may raise the caller's own exception.
        Without ``expect_json`` a successful reply's body is not read (``{}`` is returned).
        """
        where = self.public(url)
        try:
            response = client.get(url) if payload is None else client.post(url, json=payload)
        except httpx.TransportError as exc:
            raise Transient(self.redact(f"{type(exc).__name__}: {exc}"), unanswered=True) from None
        status = response.status_code
        if status >= 400:
            detail = self.redact(" ".join(response.text[:300].split()))[:200]
            if status in (401, 403):
                raise self.fatal(
                    f"{self.role} endpoint {where} refused the request (HTTP {status}): check ${self.api_key_env}"
                )
            if status == 404:
                raise self.fatal(
                    f"{self.role} endpoint {where} returned HTTP 404: check {self.url_setting} and model {model!r}"
                )
            if on_error is not None:
                on_error(status, detail)
            if status in RETRY_STATUS:
                raise Transient(f"HTTP {status} {detail}".strip(), retry_after(response.headers.get("Retry-After")))
            raise RequestFailed(f"HTTP {status} {detail}".strip(), status)
        if not expect_json:
            return {}
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise RequestFailed(f"malformed response {self.redact(response.text[:80])!r}")
        return data

    def post(
        self, client: httpx.Client, url: str, payload: dict[str, Any] | None, *, model: str, expect_json: bool = True
    ) -> dict[str, Any]:
        """:meth:`post_once`, retrying :class:`Transient` failures; raises :class:`RequestFailed` after the last."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.post_once(client, url, payload, model=model, expect_json=expect_json)
            except Transient as exc:
                if attempt > self.max_retries:
                    raise RequestFailed(f"{exc} (after {attempt} attempts)") from None
                self.sleep(self.delay(attempt, exc.retry_after))
