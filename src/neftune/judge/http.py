"""A judge served by any OpenAI-compatible ``/chat/completions`` endpoint, called with ``httpx``.

Tested against loopback servers that imitate llama.cpp's server (with and without logprobs), vLLM,
Ollama's OpenAI-compatible endpoint and reasoning models (``<think>`` blocks, ``reasoning_content``);
OpenAI's own API speaks the same protocol.

Requests go through :class:`neftune.http_api.Endpoint`, the client answer generation uses too.
Retry policy -- ask again only when asking again can change the answer:

* transport errors, timeouts, HTTP 408, 429 and 5xx (not 501/505) are retried up to
  ``max_retries`` times, waiting ``backoff * 2**k`` seconds, or the server's ``Retry-After``,
  capped at ``max_backoff``;
* a reply that names no single answer fails its query at once when ``temperature == 0`` (the same
  prompt gets the same reply), quoting the reply; it is retried only when sampling at a positive
  temperature;
* HTTP 401/403 (bad key) and 404 (bad URL or model) abort the run with :class:`JudgeError`, since
  every other request would fail the same way; other 4xx and malformed bodies fail that query;
* a server that gives no answer at all (refused or dropped connections, timeouts) through a query's
  whole retry budget is gone: that query raises :class:`~neftune.judge.base.JudgeUnreachable`, the
  queries still in flight stop without asking, and the run stops once what was answered is cached.

Log-probabilities: each request asks for ``logprobs: true, top_logprobs: k``; the probability that
the first answer is better is read from the verdict token (:mod:`neftune.judge.logprobs`).  A server
that returns none is judged by its text verdicts, and the result says so once; a server that rejects
the fields outright (an error mentioning logprobs) is asked again without them for the rest of the run.

The API key is read from the environment variable named by ``api_key_env`` when the judge is built,
sent only in the ``Authorization`` header, and kept out of ``repr``, the identity, the cache, logs
and error messages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

from neftune.errors import ConfigError, JudgeError
from neftune.http_api import Endpoint, EndpointOptions, RequestFailed, Transient
from neftune.judge.base import (
    Judge,
    JudgeUnreachable,
    OnResult,
    Outcome,
    Query,
    Verdict,
    VerdictUnavailable,
    judge_messages,
)
from neftune.judge.logprobs import p_first_better
from neftune.judge.parse import parse_verdict, strip_reasoning

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["HttpJudge"]

logger = logging.getLogger(__name__)


class _LogprobsRejected(Exception):
    """The server refused the request because of the logprobs fields."""


class HttpJudge(Judge):
    """Judge served by an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: API root such as ``http://127.0.0.1:8080/v1`` or ``https://api.openai.com/v1``
            (``/chat/completions`` is appended unless the URL already ends with it).
        model: model name sent in the request (llama.cpp's server accepts any name).
        temperature: sampling temperature; at 0 an unparseable reply is final.
        max_tokens: longest reply (``None`` omits the field).  The default suits a one-word verdict;
            a reasoning model needs room for its thinking (e.g. 2048).
        logprobs: ask for the verdict token's top log-probabilities.
        top_logprobs: how many alternatives to ask for (OpenAI and vLLM allow up to 20).
        endpoint: :class:`~neftune.http_api.Endpoint`'s settings, with its defaults: ``api_key_env``
            (NAME of the environment variable holding the API key; unset, no ``Authorization``
            header is sent, fine for local servers), ``timeout`` (seconds per HTTP request),
            ``max_retries`` (extra attempts after the first for failures a retry can cure, see
            the module doc), ``backoff``, ``max_backoff`` and ``workers`` (concurrent requests).
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        temperature: float = 0.0,
        max_tokens: int | None = 16,
        logprobs: bool = True,
        top_logprobs: int = 20,
        **endpoint: Unpack[EndpointOptions],
    ) -> None:
        self.endpoint = Endpoint(base_url, role="judge", fatal=JudgeError, **endpoint)
        if not model or not isinstance(model, str):
            raise ConfigError("judge model name is empty")
        if not temperature >= 0 or (max_tokens is not None and max_tokens < 1) or not 0 < top_logprobs <= 20:
            raise ConfigError("judge needs temperature >= 0, max_tokens >= 1 (or None) and 1 <= top_logprobs <= 20")
        self.url = self.endpoint.url("/chat/completions")
        self.model = model
        self.api_key_env, self.timeout = self.endpoint.api_key_env, self.endpoint.timeout
        self.max_retries, self.workers = self.endpoint.max_retries, self.endpoint.workers
        self.backoff, self.max_backoff = self.endpoint.backoff, self.endpoint.max_backoff
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.chunk_size = self.workers * 4
        self.logprobs = bool(logprobs)
        self.top_logprobs = int(top_logprobs)
        self._lock = threading.Lock()
        self._send_logprobs = self.logprobs
        self._rejected: str | None = None  # why the server refused the logprobs fields (kept across runs)
        self._without_logprobs = 0  # replies of this run that carried no logprobs
        self._unusable_logprobs = 0  # replies of this run whose logprobs held no verdict token agreeing with the text
        self._sleep: Callable[[float], object] = self.endpoint.sleep  # replaceable, so tests can record the waits
        self._gone: str | None = None  # why the server counts as gone (this run): other queries stop asking

    def __repr__(self) -> str:
        return f"HttpJudge(url={self._public_url()!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _public_url(self) -> str:
        return Endpoint.public(self.url)

    @property
    def identity(self) -> str:
        """Endpoint, model, temperature, max_tokens and the logprobs request: everything that shapes a verdict."""
        probs = f"|top_logprobs={self.top_logprobs}" if self.logprobs else ""
        return f"http|{self._public_url()}|{self.model}|t={self.temperature}|max_tokens={self.max_tokens}{probs}"

    def begin_run(self) -> None:
        """Reset the per-run counts behind :meth:`notes`."""
        with self._lock:
            self._without_logprobs = self._unusable_logprobs = 0
            self._gone = None

    def notes(self) -> list[str]:
        """Fallbacks taken during the run, each said once."""
        notes = []
        if self._rejected is not None:
            notes.append(f"the server rejected the logprobs request ({self._rejected}): judged by text verdicts only")
        if self._without_logprobs:
            notes.append(
                f"the server returned no logprobs for {self._without_logprobs} replies: "
                "those are scored by their text verdicts only"
            )
        if self._unusable_logprobs:
            notes.append(
                f"{self._unusable_logprobs} replies had logprobs but no verdict token agreeing with the text: "
                "scored by their text verdicts only"
            )
        return notes

    def _redact(self, text: str) -> str:
        return self.endpoint.redact(text)

    def _payload(self, messages: list[dict[str, str]], with_logprobs: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        if with_logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = self.top_logprobs
        return payload

    def _post(self, client: httpx.Client, messages: list[dict[str, str]], with_logprobs: bool) -> dict[str, Any]:
        """One request; the parsed JSON body, or the failure classified for the retry policy."""

        def refused_logprobs(status: int, detail: str) -> None:
            if with_logprobs and "logprob" in detail.lower() and status in (400, 422, 500, 501):
                raise _LogprobsRejected(f"HTTP {status} {detail}")

        payload = self._payload(messages, with_logprobs)
        try:
            data = self.endpoint.post_once(client, self.url, payload, model=self.model, on_error=refused_logprobs)
        except RequestFailed as exc:
            raise VerdictUnavailable(str(exc)) from None
        try:
            if not isinstance(data["choices"][0]["message"], dict):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise VerdictUnavailable(f"malformed response {self._redact(str(data)[:80])!r}") from None
        return data

    def _logprobs_rejected(self, reason: str) -> None:
        with self._lock:
            if self._send_logprobs:
                self._send_logprobs = False
                self._rejected = reason[:120]
                logger.warning("the judge server rejected the logprobs request (%s): asking without", self._rejected)

    def _count_logprobs(self, logprobs: Any, p_first: float | None) -> None:
        with self._lock:
            if logprobs is None:
                if not self._without_logprobs:
                    logger.warning("the judge server returned no logprobs: scoring by text verdicts")
                self._without_logprobs += 1
            elif p_first is None:
                self._unusable_logprobs += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        return self.endpoint.delay(attempt, retry_after)

    def _ask(self, client: httpx.Client, query: Query) -> Verdict:
        messages = judge_messages(query.instruction, query.first, query.second)
        attempt = 0
        while True:
            attempt += 1
            if self._gone is not None:
                raise JudgeUnreachable(self._gone)
            with_logprobs = self._send_logprobs
            try:
                data = self._post(client, messages, with_logprobs)
            except _LogprobsRejected as exc:
                self._logprobs_rejected(str(exc))
                attempt -= 1  # the same question, asked properly: not a failed attempt
                continue
            except Transient as exc:
                if attempt > self.max_retries and exc.unanswered:
                    with self._lock:
                        self._gone = self._gone or f"{self._public_url()}: {exc} (after {attempt} attempts)"
                    raise JudgeUnreachable(self._gone) from None
                if attempt > self.max_retries:
                    raise VerdictUnavailable(f"{exc} (after {attempt} attempts)") from None
                self._sleep(self._delay(attempt, exc.retry_after))
                continue
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content") if isinstance(message.get("content"), str) else ""
            label = parse_verdict(content)
            if label is not None:
                logprobs = choice.get("logprobs") if with_logprobs else None
                p_first = p_first_better(logprobs, label, content) if with_logprobs else None
                if with_logprobs:
                    self._count_logprobs(logprobs, p_first)
                return Verdict(label, content.strip()[:200], p_first)
            if self.temperature > 0 and attempt <= self.max_retries:
                self._sleep(self._delay(attempt, None))
                continue
            raise VerdictUnavailable(self._unparseable(content, message, choice.get("finish_reason"), attempt))

    def _unparseable(self, content: str, message: dict[str, Any], finish: Any, attempts: int) -> str:
        quoted = self._redact(" ".join(content.split()))
        quoted = quoted if len(quoted) <= 160 else quoted[:120] + " ... " + quoted[-35:]
        reason = f"reply names no single answer (A, B or tie): {quoted!r}"
        thinking = message.get("reasoning_content") or message.get("reasoning") or strip_reasoning(content) is None
        if finish == "length":
            where = " inside its reasoning" if thinking else ""
            reason += f"; the reply was cut at max_tokens={self.max_tokens}{where}: raise the judge's max_tokens"
        if attempts > 1:
            reason += f" (after {attempts} attempts)"
        return reason

    def judge(self, query: Query) -> Verdict:
        """Ask the endpoint about one query (see the module doc for retries)."""
        with self._client() as client:
            return self._ask(client, query)

    def _client(self) -> httpx.Client:
        return self.endpoint.client()

    def judge_batch(self, queries: Sequence[Query], on_result: OnResult | None = None) -> list[Outcome]:
        """Ask about several queries, ``workers`` at a time, over one connection pool; ``on_result``
        hears of each answer as it arrives (from the worker threads)."""

        with self._client() as client:

            def one(position: int, query: Query) -> Outcome:
                outcome: Outcome
                try:
                    outcome = self._ask(client, query)
                except VerdictUnavailable as exc:
                    outcome = exc
                if on_result is not None:
                    on_result(position, outcome)
                return outcome

            if self.workers == 1 or len(queries) <= 1:
                return [one(i, q) for i, q in enumerate(queries)]
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                return list(pool.map(one, range(len(queries)), queries))
