"""Pairwise LLM-as-judge comparison of two outputs files, with position-bias control and statistics.

Typical use::

    from neftune.generate import read_outputs
    from neftune.judge import judge_pairs, make_judge

    judge = make_judge("http", base_url="https://api.openai.com/v1", model="gpt-4o-mini")
    result = judge_pairs(read_outputs("runs/a/outputs.json"),      # baseline  (A)
                         read_outputs("runs/b/outputs.json"),      # candidate (B)
                         judge, cache_dir="runs/judge-cache")
    print(result.summary()); result.save("runs/judge.json")

Protocol.  Every pair is asked twice, once with the baseline shown first and once with the candidate
shown first, and the judge answers ``A`` (first answer better), ``B`` (second better) or ``tie``.  The
two answers, translated back to "baseline"/"candidate"/"tie", give the pair's score for the
candidate: 1 if both orders prefer the candidate, 0 if both prefer the baseline, 0.5 otherwise (a tie
in either order, or the two orders disagreeing -- the signature of position bias).  Position
consistency is the share of *judged* pairs whose two orders agree.  Two identical outputs are scored
0.5 without asking the judge and are left out of the consistency (they would inflate it).

Backends (:data:`JUDGES`, built by :func:`make_judge`):

* ``http`` -- :class:`HttpJudge`, any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI,
  vLLM, llama.cpp server, Ollama...).  The API key is read from the environment variable named by
  ``api_key_env`` and is never logged, cached or written to results.
* ``local`` -- :class:`LocalJudge`, a transformers causal LM that is scored, not sampled: the verdict
  is whichever of the tokens ``A`` and ``B`` it finds more probable as its reply.
* ``length`` (alias ``dummy``) -- :class:`LengthJudge`, a deterministic, dependency-free stand-in
  for tests and offline demos.

A verdict that cannot be obtained (network errors or unparseable replies after all retries) makes its
pair *failed*: it is counted in ``n_failed``, listed, and left out of every statistic -- never scored
as a tie.  Successful verdicts are cached on disk (JSONL, keyed by a hash of the judge identity and
the exact prompt), so rerunning a judgement only asks for what is missing.

Statistics: :func:`win_rate`, a percentile :func:`bootstrap_ci`, and
:func:`length_controlled_win_rate`, which removes the part of the win rate explained by the
candidate writing longer (or shorter) answers than the baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from neftune.errors import ConfigError, JudgeError, ModelError
from neftune.stats import bootstrap_ci, length_controlled_win_rate, win_rate

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGES",
    "HttpJudge",
    "Judge",
    "JudgeResult",
    "LengthJudge",
    "LocalJudge",
    "PairVerdict",
    "Query",
    "Verdict",
    "VerdictUnavailable",
    "bootstrap_ci",
    "judge_messages",
    "judge_pairs",
    "length_controlled_win_rate",
    "make_judge",
    "parse_verdict",
    "win_rate",
]

VERDICTS: tuple[str, ...] = ("A", "B", "tie")

JUDGE_SYSTEM = (
    "You are an impartial expert judge. You compare two answers to the same user instruction and decide "
    "which one follows the instruction better: more helpful, correct, relevant and complete, without "
    "unnecessary padding. The order in which the answers are shown and their length must not influence "
    "you. Reply with exactly one word: A, B, or tie."
)

JUDGE_TEMPLATE = (
    "[Instruction]\n{instruction}\n[End of instruction]\n\n"
    "[Answer A]\n{first}\n[End of answer A]\n\n"
    "[Answer B]\n{second}\n[End of answer B]\n\n"
    "Which answer is better? Reply with exactly one word: A, B, or tie."
)


def judge_messages(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    """Return the chat messages asking which of ``first`` (A) and ``second`` (B) is better."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_TEMPLATE.format(instruction=instruction, first=first, second=second)},
    ]


_STRIP_CHARS = " \t\r\n\"'`*_.,:;!()[]{}<>"
_LABEL_WORDS = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie", "tied": "tie"}
_PREFIXES = ("final verdict", "verdict", "answer", "winner", "better answer", "best answer", "output", "response")
# A verdict word that opens a longer reply, set off by punctuation: "B. It is more complete", "Tie:
# both ...".  Punctuation is required so that prose such as "A good answer would..." is not read as A.
_LEADING_LABEL = re.compile(r"^[\s\"'`*_(\[{<]*(a|b|tie)[\"'`*_)\]}>]*\s*[.:;,!\u2013\u2014-](?:\s|$)")


def parse_verdict(text: str) -> str | None:
    """Extract ``"A"``, ``"B"`` or ``"tie"`` from a judge reply; ``None`` if it is not one of them.

    Accepted: the bare word (any case, with surrounding quotes, brackets, markdown or punctuation, e.g.
    ``"**B**."``, ``"[[A]]"``), optionally after a label such as ``Answer:``, ``Verdict -`` or
    ``Answer A``, or the word opening a sentence and followed by punctuation (``"B. It is more
    complete"``) -- looking only at the first line.  Anything else (prose, both letters, empty) is
    ``None`` so the caller can retry instead of guessing.
    """
    if not text:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    candidate = line.strip(_STRIP_CHARS).lower()
    for prefix in _PREFIXES:
        # "Answer: B", "Verdict - tie", "Answer B" (but not "answers")
        if candidate.startswith(prefix) and (len(candidate) == len(prefix) or not candidate[len(prefix)].isalpha()):
            candidate = candidate[len(prefix) :].strip(_STRIP_CHARS + "-=").lower()
            break
    if candidate in _LABEL_WORDS:
        return _LABEL_WORDS[candidate]
    match = _LEADING_LABEL.match(line.lower())
    return _LABEL_WORDS[match.group(1)] if match else None


class Query(NamedTuple):
    """One question to a judge: which of ``first`` (A) or ``second`` (B) better answers ``instruction``."""

    instruction: str
    first: str
    second: str
    reference: str | None = None


class Verdict(NamedTuple):
    """A judge's answer: ``label`` in :data:`VERDICTS` and the raw ``reply`` it was parsed from."""

    label: str
    reply: str = ""


class VerdictUnavailable(Exception):
    """A single verdict could not be obtained (after retries); its pair is counted as failed."""


class Judge(ABC):
    """A pairwise judge backend.

    Subclasses implement :meth:`judge` (one query) and may override :meth:`judge_batch` to batch or
    parallelise.  :attr:`identity` names the judge for the verdict cache: two judges with the same
    identity must give the same verdicts; ``None`` disables caching.
    """

    name: ClassVar[str] = "judge"
    #: How many queries :func:`judge_pairs` hands to :meth:`judge_batch` at once.
    chunk_size: int = 32

    @property
    def identity(self) -> str | None:
        """A string naming the judge and every setting that affects its verdicts (never secrets)."""
        return self.name

    @abstractmethod
    def judge(self, query: Query) -> Verdict:
        """Return the verdict for ``query``; raise :class:`VerdictUnavailable` if none can be had."""

    def judge_batch(self, queries: Sequence[Query]) -> list[Verdict | VerdictUnavailable]:
        """Judge several queries; a failed one is returned as its :class:`VerdictUnavailable`."""
        results: list[Verdict | VerdictUnavailable] = []
        for query in queries:
            try:
                results.append(self.judge(query))
            except VerdictUnavailable as exc:
                results.append(exc)
        return results


class LengthJudge(Judge):
    """Deterministic stand-in judge that needs no model (also registered as ``dummy``).

    With a reference answer it prefers the answer with the higher ROUGE-L against the reference;
    without one, or when both score the same, it prefers the longer answer (in characters), which is
    the well-known bias of real LLM judges.  Equal on both counts is a tie.  Its verdicts never
    depend on the order of presentation, so its position consistency is always 1.
    """

    name = "length"
    chunk_size = 256

    def judge(self, query: Query) -> Verdict:
        from neftune.evaluate import rouge_l

        if query.reference is not None:
            first = rouge_l(query.first, query.reference)
            second = rouge_l(query.second, query.reference)
            if first != second:
                return Verdict("A" if first > second else "B", "rouge-l")
        first_len, second_len = len(query.first.strip()), len(query.second.strip())
        if first_len == second_len:
            return Verdict("tie", "length")
        return Verdict("A" if first_len > second_len else "B", "length")


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class HttpJudge(Judge):
    """Judge served by an OpenAI-compatible chat-completions endpoint, called with urllib.

    Args:
        base_url: API root such as ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``
            (``/chat/completions`` is appended unless the URL already ends with it).
        model: model name sent in the request.
        api_key_env: NAME of the environment variable holding the API key.  If it is unset no
            ``Authorization`` header is sent (fine for local servers).
        timeout: seconds per HTTP request.
        max_retries: extra attempts after the first for transient failures (network errors,
            timeouts, HTTP 408/409/425/429/5xx, malformed JSON, replies that are not a verdict).
        backoff: delay before the first retry, doubled each retry (capped at ``max_backoff``); a
            server's ``Retry-After`` header is honoured up to ``max_backoff``.
        temperature, max_tokens: sampling settings sent with each request (``max_tokens=None`` omits
            the field, for endpoints that reject it).
        workers: concurrent requests.

    HTTP 401/403 (bad key) and 404 (bad URL or model) abort the whole run with a :class:`JudgeError`
    since every other request would fail the same way; HTTP 400/413/422 fail only that query.
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        temperature: float = 0.0,
        max_tokens: int | None = 16,
        workers: int = 4,
    ) -> None:
        parsed = urllib.parse.urlsplit(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"judge base_url must be an http(s) URL, got {base_url!r}")
        if not model or not isinstance(model, str):
            raise ConfigError("judge model name is empty")
        if not api_key_env or not isinstance(api_key_env, str):
            raise ConfigError("judge api_key_env must name an environment variable")
        if max_retries < 0 or workers < 1 or timeout <= 0:
            raise ConfigError("judge needs max_retries >= 0, workers >= 1 and timeout > 0")
        url = str(base_url).rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.workers = int(workers)
        self.chunk_size = self.workers * 4
        # Read once; kept private and out of identity/repr so it can never reach a cache or log.
        self._api_key = os.environ.get(api_key_env) or None

    def __repr__(self) -> str:
        return f"HttpJudge(url={self._public_url()!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _public_url(self) -> str:
        # Drop any user:password@ so credentials embedded in a URL are not cached or logged.
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))

    @property
    def identity(self) -> str:
        return f"http|{self._public_url()}|{self.model}|t={self.temperature}|max_tokens={self.max_tokens}"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _post(self, messages: list[dict[str, str]]) -> str:
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
        )
        where = self._public_url()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read(300).decode("utf-8", "replace")
            except Exception:  # the body is only decoration for the message
                detail = ""
            detail = self._redact(" ".join(detail.split()))[:200]
            if exc.code in (401, 403):
                raise JudgeError(
                    f"judge endpoint {where} refused the request (HTTP {exc.code}): check ${self.api_key_env}"
                ) from None
            if exc.code == 404:
                raise JudgeError(
                    f"judge endpoint {where} returned HTTP 404: check base_url and model {self.model!r}"
                ) from None
            if exc.code in (408, 409, 425, 429) or exc.code >= 500:
                retry_after = None
                header = exc.headers.get("Retry-After") if exc.headers else None
                if header:
                    try:
                        retry_after = float(header)
                    except ValueError:
                        retry_after = None
                raise _Retryable(f"HTTP {exc.code} {detail}".strip(), retry_after) from None
            raise VerdictUnavailable(f"HTTP {exc.code} {detail}".strip()) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise _Retryable(self._redact(f"{type(exc).__name__}: {reason}")) from None
        try:
            data = json.loads(body)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._redact(body[:80].decode("utf-8", "replace"))
            raise _Retryable(f"malformed response {snippet!r}") from None
        return content if isinstance(content, str) else ""

    def judge(self, query: Query) -> Verdict:
        messages = judge_messages(query.instruction, query.first, query.second)
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            try:
                content = self._post(messages)
            except _Retryable as exc:
                reason = str(exc)
                delay = self.backoff * (2**attempt)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
            else:
                label = parse_verdict(content)
                if label is not None:
                    return Verdict(label, content.strip()[:200])
                reason = f"reply is not A, B or tie: {self._redact(content.strip()[:60])!r}"
                delay = self.backoff * (2**attempt)
            if attempt < self.max_retries:
                time.sleep(min(delay, self.max_backoff))
        raise VerdictUnavailable(f"{reason} (after {self.max_retries + 1} attempts)")

    def judge_batch(self, queries: Sequence[Query]) -> list[Verdict | VerdictUnavailable]:
        if self.workers == 1 or len(queries) <= 1:
            return super().judge_batch(queries)

        def one(query: Query) -> Verdict | VerdictUnavailable:
            try:
                return self.judge(query)
            except VerdictUnavailable as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(one, queries))


class LocalJudge(Judge):
    """Judge run in-process with a transformers causal LM, by scoring rather than sampling.

    The judge prompt (system text folded into the user turn, since some chat templates have no system
    role) is rendered and tokenized by :func:`neftune.data.template.encode_prompt`; the verdict compares the
    log-probability of the reply starting with ``A`` versus ``B`` (each summed over the spellings
    that are single tokens, e.g. ``"A"`` and ``" A"``).  ``tie`` when the two are within
    ``tie_margin`` nats.  Every query gets a verdict unless its prompt exceeds the model's context,
    in which case that pair fails.

    Args:
        model: a loaded causal LM, or a path / hub id loaded with ``AutoModelForCausalLM``.
        tokenizer: the model's tokenizer (loaded from ``model`` when it is a path).
        batch_size: prompts per forward pass (left-padded).
        tie_margin: log-probability gap below which the verdict is a tie.
        max_length: longest prompt in tokens; defaults to the model's ``max_position_embeddings``.
    """

    name = "local"

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None = None,
        *,
        batch_size: int = 4,
        tie_margin: float = 0.0,
        max_length: int | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer = self._load(str(model), tokenizer)
        if tokenizer is None:
            raise ConfigError("local judge: a tokenizer is required with an in-memory model")
        if batch_size < 1 or tie_margin < 0:
            raise ConfigError("local judge needs batch_size >= 1 and tie_margin >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.chunk_size = self.batch_size * 4
        self.tie_margin = float(tie_margin)
        config = getattr(model, "config", None)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None)
        self.choice_ids = {label: self._single_token_ids(label) for label in ("A", "B")}
        self._model_name = str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")

    @staticmethod
    def _load(path: str, tokenizer: Any | None) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"local judge: cannot load model {path!r}: {first_line}") from None
        return model, tokenizer

    def _single_token_ids(self, label: str) -> list[int]:
        ids = []
        for spelling in (label, " " + label):
            encoded = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        if not ids:
            raise ModelError(f"local judge: the tokenizer has no single token for {label!r}")
        return ids

    @property
    def identity(self) -> str | None:
        # An in-memory model without a name cannot be told apart from another one: do not cache.
        if not self._model_name:
            return None
        return f"local|{self._model_name}|margin={self.tie_margin}"

    def _prompt_ids(self, query: Query) -> list[int]:
        from neftune.data.template import encode_prompt

        system, user = judge_messages(query.instruction, query.first, query.second)
        merged = {"role": "user", "content": system["content"] + "\n\n" + user["content"]}
        return list(encode_prompt(self.tokenizer, [merged]))

    def judge(self, query: Query) -> Verdict:
        result = self.judge_batch([query])[0]
        if isinstance(result, VerdictUnavailable):
            raise result
        return result

    def judge_batch(self, queries: Sequence[Query]) -> list[Verdict | VerdictUnavailable]:
        import torch

        from neftune.generate import model_device

        results: list[Verdict | VerdictUnavailable] = [VerdictUnavailable("not judged")] * len(queries)
        encoded: list[tuple[int, list[int]]] = []
        for index, query in enumerate(queries):
            ids = self._prompt_ids(query)
            if self.max_length is not None and len(ids) > self.max_length:
                results[index] = VerdictUnavailable(
                    f"judge prompt has {len(ids)} tokens, more than the judge's context of {self.max_length}"
                )
            else:
                encoded.append((index, ids))

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        device = model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(encoded), self.batch_size):
                    batch = encoded[start : start + self.batch_size]
                    width = max(len(ids) for _, ids in batch)
                    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, (_, ids) in enumerate(batch):
                        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        mask[row, width - len(ids) :] = 1
                    # Explicit positions so a left-padded row is scored exactly as it would be alone.
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    logits = (
                        self.model(
                            input_ids=input_ids.to(device),
                            attention_mask=mask.to(device),
                            position_ids=positions.to(device),
                        )
                        .logits[:, -1, :]
                        .float()
                    )
                    logprobs = torch.log_softmax(logits, dim=-1)
                    score_a = torch.logsumexp(logprobs[:, self.choice_ids["A"]], dim=-1)
                    score_b = torch.logsumexp(logprobs[:, self.choice_ids["B"]], dim=-1)
                    for row, (index, _) in enumerate(batch):
                        gap = float(score_a[row] - score_b[row])
                        label = "tie" if abs(gap) <= self.tie_margin else ("A" if gap > 0 else "B")
                        results[index] = Verdict(label, f"logp(A)-logp(B)={gap:.4f}")
        finally:
            if was_training:
                self.model.train()
        return results


#: Judge backends by name, for configs and the command line (see :func:`make_judge`).
JUDGES: dict[str, type[Judge]] = {
    "http": HttpJudge,
    "local": LocalJudge,
    "length": LengthJudge,
    "dummy": LengthJudge,
}


def make_judge(name: str, **options: Any) -> Judge:
    """Build the judge backend registered as ``name`` in :data:`JUDGES` with keyword ``options``.

    Raises :class:`ConfigError` for an unknown name or options the backend does not take.
    """
    try:
        cls = JUDGES[name]
    except KeyError:
        raise ConfigError(f"unknown judge {name!r}; choose one of {', '.join(sorted(JUDGES))}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"judge {name!r}: {exc}") from None


def build_judge(
    backend: str,
    *,
    model: str = "",
    base_url: str = "",
    api_key_env: str = "OPENAI_API_KEY",
    trust_remote_code: bool = False,
) -> Judge | None:
    """The judge for a backend name and its settings (``"none"`` gives None).

    ``local`` loads ``model`` (a directory, alias or hub id) through :mod:`neftune.models`; ``http``
    takes ``model`` as the endpoint's model name.
    """
    if backend == "none":
        return None
    if backend == "http":
        return make_judge("http", base_url=base_url, model=model, api_key_env=api_key_env)
    if backend == "local":
        from neftune.models import load_model_and_tokenizer

        loaded, tokenizer = load_model_and_tokenizer(model, for_training=False, trust_remote_code=trust_remote_code)
        return make_judge("local", model=loaded, tokenizer=tokenizer)
    return make_judge(backend)


# --------------------------------------------------------------------------------------------------
# Cache and the pairwise protocol
# --------------------------------------------------------------------------------------------------


class _VerdictCache:
    """Append-only JSONL of successful verdicts: ``{"key", "verdict", "judge", "reply"}`` per line."""

    FILENAME = "verdicts.jsonl"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / self.FILENAME
        self.entries: dict[str, str] = {}
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JudgeError(f"{self.path.parent}: cannot create judge cache directory ({exc.strerror})") from None
        if self.path.exists():
            with self.path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        entry = json.loads(line)
                        if entry["verdict"] in VERDICTS:
                            self.entries[str(entry["key"])] = entry["verdict"]
                    except (ValueError, KeyError, TypeError):
                        # A line cut short by an interrupted run: skip it, the query is simply re-asked.
                        logger.warning("%s:%d: ignoring unreadable cache line", self.path, number)

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, verdict: Verdict, judge: str) -> None:
        line = json.dumps(
            {"key": key, "verdict": verdict.label, "judge": judge, "reply": verdict.reply[:200]}, ensure_ascii=False
        )
        with self._lock:
            self.entries[key] = verdict.label
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def _cache_key(identity: str, query: Query) -> str:
    # The rendered prompt contains the instruction and both answers in their shown order, so the
    # order is part of the key; the reference is added because some judges read it.
    material = json.dumps(
        {
            "judge": identity,
            "messages": judge_messages(query.instruction, query.first, query.second),
            "reference": query.reference,
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass
class PairVerdict:
    """Outcome of one pair.  ``verdict_ab``: judge's answer with the baseline shown first (A);
    ``verdict_ba``: with the candidate shown first.  ``winner_*`` translate them to ``"baseline"``,
    ``"candidate"`` or ``"tie"``; ``score`` is the candidate's 1 / 0.5 / 0, or None if ``error``."""

    index: int
    instruction: str
    len_a: int
    len_b: int
    verdict_ab: str | None = None
    verdict_ba: str | None = None
    winner_ab: str | None = None
    winner_ba: str | None = None
    score: float | None = None
    consistent: bool | None = None
    error: str | None = None
    identical: bool = False


@dataclass
class JudgeResult:
    """Everything :func:`judge_pairs` measured.  Rates are NaN when no pair could be scored.

    ``n`` counts scored pairs, ``n_failed`` pairs left out because a verdict was unavailable,
    ``n_identical`` pairs with identical answers (tied without asking, excluded from ``consistency``);
    ``n_wins``/``n_losses``/``n_ties`` split the scored pairs by score 1/0/0.5 (``n_ties`` includes
    pairs whose two orders disagreed).  ``lc`` is the full :func:`length_controlled_win_rate` dict;
    lengths are in characters.
    """

    judge: str
    pairs: list[PairVerdict]
    n: int
    n_failed: int
    n_wins: int
    n_losses: int
    n_ties: int
    win_rate: float
    ci: tuple[float, float]
    lc_win_rate: float
    lc_ci: tuple[float, float]
    consistency: float
    level: float
    n_identical: int = 0
    lc: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes null)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (parents created); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    def summary(self) -> str:
        """A few human-readable lines: win rate with CI, length-controlled rate, consistency, failures."""
        pct = round(self.level * 100)

        def rate(value: float, ci: tuple[float, float]) -> str:
            if math.isnan(value):
                return "n/a"
            return f"{100 * value:.1f}% ({pct}% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f})"

        lines = [
            f"judge: {self.judge}",
            f"pairs scored: {self.n} (wins {self.n_wins}, ties/disagreements {self.n_ties}, losses {self.n_losses})",
            f"win rate of B over A: {rate(self.win_rate, self.ci)}",
            f"length-controlled win rate: {rate(self.lc_win_rate, self.lc_ci)}",
            "position consistency: "
            + ("n/a" if math.isnan(self.consistency) else f"{100 * self.consistency:.1f}%")
            + f" of {self.n - self.n_identical} judged pairs ({self.n_identical} identical pairs scored as ties unasked)",
        ]
        if self.n_failed:
            lines.append(f"failed pairs: {self.n_failed} (excluded from all rates)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _winner(label: str, baseline_first: bool) -> str:
    if label == "tie":
        return "tie"
    first_won = label == "A"
    return "baseline" if first_won == baseline_first else "candidate"


def _check_records(records: Sequence[Mapping[str, Any]], side: str) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise JudgeError(f"outputs {side}: record {index} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise JudgeError(f"outputs {side}: record {index} has no string '{key}'")


def judge_pairs(
    records_a: Sequence[Mapping[str, Any]],
    records_b: Sequence[Mapping[str, Any]],
    backend: Judge | str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    max_consecutive_failures: int = 20,
    progress: bool = False,
) -> JudgeResult:
    """Judge candidate outputs ``records_b`` against baseline outputs ``records_a``, pair by pair.

    Args:
        records_a, records_b: AlpacaEval records (:func:`neftune.generate.read_outputs`) for the
            same instructions in the same order.  A ``reference`` in ``records_a`` (else
            ``records_b``) is passed to the judge.
        backend: a :class:`Judge`, or a name in :data:`JUDGES` built with default options.
        cache_dir: directory for the verdict cache (``verdicts.jsonl``); ``None`` disables it.
        n_boot, seed, level: bootstrap settings for both confidence intervals.
        max_consecutive_failures: abort with :class:`JudgeError` after this many failed queries in a
            row (a dead endpoint), keeping every verdict obtained so far in the cache.
        progress: show a tqdm progress bar over judge queries.

    Raises :class:`JudgeError` if the files differ in length or in the instruction at some index
    (the message names the first mismatching index), or if the backend reports a fatal error.
    """
    from tqdm.auto import tqdm

    judge = make_judge(backend) if isinstance(backend, str) else backend
    _check_records(records_a, "A")
    _check_records(records_b, "B")
    if len(records_a) != len(records_b):
        raise JudgeError(f"outputs A has {len(records_a)} records but outputs B has {len(records_b)}")
    for index, (ra, rb) in enumerate(zip(records_a, records_b, strict=False)):
        if ra["instruction"] != rb["instruction"]:
            raise JudgeError(
                f"outputs A and B differ in instruction at index {index}: not the same prompts in the same order"
            )

    notes: list[str] = []
    identity = judge.identity
    cache = None
    if cache_dir is not None:
        if identity is None:
            notes.append("verdict cache disabled: this judge has no stable identity (unnamed in-memory model)")
        else:
            cache = _VerdictCache(cache_dir)

    pairs: list[PairVerdict] = []
    # (pair index, baseline shown first?) -> query, for the verdicts still to obtain
    pending: list[tuple[int, bool, Query]] = []
    labels: dict[tuple[int, bool], str] = {}
    errors: dict[int, str] = {}
    cached_hits = 0
    for index, (ra, rb) in enumerate(zip(records_a, records_b, strict=False)):
        out_a, out_b = ra["output"], rb["output"]
        pairs.append(PairVerdict(index=index, instruction=ra["instruction"], len_a=len(out_a), len_b=len(out_b)))
        if out_a == out_b:
            labels[(index, True)] = labels[(index, False)] = "tie"
            pairs[-1].identical = True
            continue
        reference = ra.get("reference") if ra.get("reference") is not None else rb.get("reference")
        for baseline_first in (True, False):
            first, second = (out_a, out_b) if baseline_first else (out_b, out_a)
            query = Query(ra["instruction"], first, second, reference if isinstance(reference, str) else None)
            hit = cache.get(_cache_key(identity, query)) if cache is not None and identity is not None else None
            if hit is not None:
                labels[(index, baseline_first)] = hit
                cached_hits += 1
            else:
                pending.append((index, baseline_first, query))

    consecutive = 0
    last_reason = ""
    chunk = max(1, int(getattr(judge, "chunk_size", 32)))
    with tqdm(total=len(pending), desc="judging", unit="query", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(pending), chunk):
            batch = pending[start : start + chunk]
            outcomes = judge.judge_batch([q for _, _, q in batch])
            for (index, baseline_first, query), outcome in zip(batch, outcomes, strict=False):
                if isinstance(outcome, VerdictUnavailable):
                    consecutive += 1
                    reason = last_reason = str(outcome) or "verdict unavailable"
                    errors.setdefault(index, reason)
                    logger.warning("pair %d: no verdict: %s", index, reason)
                    continue
                consecutive = 0
                labels[(index, baseline_first)] = outcome.label
                if cache is not None and identity is not None:
                    cache.put(_cache_key(identity, query), outcome, identity)
            bar.update(len(batch))
            if consecutive >= max_consecutive_failures:
                raise JudgeError(
                    f"judge failed on {consecutive} queries in a row (last: {last_reason}); "
                    "verdicts obtained so far are cached, rerun to resume"
                )

    scores: list[float] = []
    len_a: list[int] = []
    len_b: list[int] = []
    consistent = judged = 0
    for pair in pairs:
        ab = labels.get((pair.index, True))
        ba = labels.get((pair.index, False))
        pair.verdict_ab, pair.verdict_ba = ab, ba
        if ab is None or ba is None:
            pair.error = errors.get(pair.index, "verdict unavailable")
            continue
        pair.winner_ab, pair.winner_ba = _winner(ab, True), _winner(ba, False)
        pair.consistent = pair.winner_ab == pair.winner_ba
        if pair.consistent and pair.winner_ab == "candidate":
            pair.score = 1.0
        elif pair.consistent and pair.winner_ab == "baseline":
            pair.score = 0.0
        else:
            pair.score = 0.5
        if not pair.identical:
            consistent += int(pair.consistent)
            judged += 1
        scores.append(pair.score)
        len_a.append(pair.len_a)
        len_b.append(pair.len_b)

    n = len(scores)
    n_failed = len(pairs) - n
    if n_failed:
        notes.append(f"{n_failed} of {len(pairs)} pairs failed to get both verdicts and are excluded from all rates")
    if cached_hits:
        notes.append(f"{cached_hits} verdicts read from the cache")
    lc = length_controlled_win_rate(scores, len_a, len_b, n_boot=n_boot, seed=seed, level=level)
    if n and not lc["identifiable"]:
        notes.append("length ratio is the same for every pair: length-controlled rate equals the raw rate")
    return JudgeResult(
        judge=identity or judge.name,
        pairs=pairs,
        n=n,
        n_failed=n_failed,
        n_wins=sum(1 for s in scores if s == 1.0),
        n_losses=sum(1 for s in scores if s == 0.0),
        n_ties=sum(1 for s in scores if s == 0.5),
        win_rate=win_rate(scores),
        ci=bootstrap_ci(scores, n_boot=n_boot, seed=seed, level=level),
        lc_win_rate=lc["win_rate"],
        lc_ci=lc["ci"],
        consistency=consistent / judged if judged else float("nan"),
        n_identical=sum(p.identical for p in pairs),
        level=level,
        lc=lc,
        notes=notes,
    )
