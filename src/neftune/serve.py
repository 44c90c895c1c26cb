"""Answers from an OpenAI-compatible server (``generate.backend=openai``): vLLM, SGLang, llama.cpp, others.

Typical use::

    from neftune.serve import ServerEngine

    engine = ServerEngine("http://127.0.0.1:8000/v1", "alpha5", tokenizer, server="vllm",
                          max_new_tokens=512, repetition_penalty=1.2)
    records = generate_outputs(None, tokenizer, examples, generator_name="alpha5",
                               dataset_name="builtin:ifeval", engine=engine)

**Same prompt, same stop, same decoding as the hf backend.**  The prompt is rendered here, by the
model's own tokenizer and chat template (:func:`neftune.data.template.encode_prompt`, as in training
and in :func:`neftune.generate.generate_completions`), and sent to the plain ``/completions``
endpoint.  The chat endpoint is not used: it would render the messages with the *server's* template
(llama.cpp reads one from the GGUF file, vLLM from its tokenizer, each with its own default system
prompt), so the same messages could reach the model as different tokens than in training.  vLLM and
SGLang receive the prompt as token ids; llama.cpp and other servers, which take text only, receive
those ids decoded, and every reply's ``usage.prompt_tokens`` is checked against the number of ids, so
a server that tokenizes the text differently (e.g. adds a begin-of-sequence token) is refused
rather than answered.  The stop tokens are :func:`neftune.generate.stop_token_ids`, sent as ids
(vLLM, SGLang) and as their text.  An answer reached the cap when the server reports
``finish_reason == "length"``.

**Greedy with HF's repetition penalty.**  Decoding is greedy (``temperature`` 0).  transformers'
``repetition_penalty`` is CTRL's multiplicative penalty: every token already in the sequence, prompt
included, has its logit divided by the penalty when positive and multiplied by it when negative.
vLLM's and SGLang's ``repetition_penalty`` are defined the same way over prompt and output tokens,
and are sent as is.  llama.cpp's ``repeat_penalty`` applies the same formula, but to the tokens it has
generated only (a window of the last ``repeat_last_n``): measured against llama-cpp-python 0.3.36's
server with SmolLM2, its answers at 1.2 match transformers' with the penalty restricted to the answer's
tokens, and not transformers' own, which also penalises every token of the prompt.  So llama.cpp
gets ``repeat_penalty: 1.0`` (its server's default is 1.1, which would penalise silently), and any other
value is refused.  OpenAI's own API and Ollama's OpenAI-compatible endpoint have only the additive
``frequency_penalty``/``presence_penalty``, a different function: with ``server="other"`` a penalty
other than 1.0 is refused too.  A refusal is one line, never a silent substitute.
"""

from __future__ import annotations

import logging
import queue
import threading
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neftune.choices import Server
from neftune.errors import ConfigError, NeftuneError
from neftune.generate import Completion, stop_token_ids
from neftune.http_api import Endpoint, RequestFailed

__all__ = ["SERVERS", "ServerEngine", "penalty_fields"]

logger = logging.getLogger(__name__)

#: What may serve ``generate.url``; decides how the prompt and the repetition penalty are sent.
SERVERS: tuple[str, ...] = typing.get_args(Server)
_TAKES_TOKEN_IDS = ("vllm", "sglang")


def penalty_fields(
    server: str,
    penalty: float,
    spare_stop_tokens: bool = False,
    *,
    sparing_plugin: bool = False,
    stops: Sequence[int] = (),
) -> dict[str, Any]:
    """The request fields that make ``server`` apply transformers' repetition penalty ``penalty``.

    With ``spare_stop_tokens`` the penalty must spare the stop tokens ``stops``
    (:class:`neftune.generate.PenaltySparingStops`).  No server's own penalty does; a vLLM server that
    neftune runs (``sparing_plugin``) has neftune's logits processor loaded
    (``neftune/_vllm/neftune_vllm_penalty.py``), which does, and is asked for it through ``vllm_xargs``.
    Raises :class:`ConfigError` (one line) for a server that has no such penalty and ``penalty != 1``,
    and for a sparing penalty that the server cannot apply.
    """
    if server not in SERVERS:
        raise ConfigError(f"generate.server must be one of {', '.join(SERVERS)}, got {server!r}")
    sparing = spare_stop_tokens and penalty != 1.0
    if sparing and server == "vllm" and sparing_plugin:
        return {"repetition_penalty": 1.0, "vllm_xargs": {"neftune_penalty": penalty, "neftune_spared": list(stops)}}
    if sparing and server in _TAKES_TOKEN_IDS:
        ours = "generate.backend=vllm (neftune's vLLM spares them), " if server == "vllm" else ""
        raise ConfigError(
            f"generate.repetition_penalty={penalty:g} sparing the stop tokens cannot be honoured by "
            f"generate.server={server}, whose penalty lowers every prompt's end-of-turn token: use "
            f"{ours}generate.spare_stop_tokens=false (answers may run to the cap) or generate.repetition_penalty=1.0"
        )
    if server in _TAKES_TOKEN_IDS:
        return {"repetition_penalty": penalty}
    if penalty != 1.0:
        why = {
            "llama.cpp": "its repeat_penalty skips the prompt's tokens, which transformers' penalises too",
            "other": "the OpenAI API has only additive frequency/presence penalties, not transformers' multiplicative one",
        }[server]
        raise ConfigError(
            f"generate.repetition_penalty={penalty:g} cannot be honoured by generate.server={server}: {why}; "
            "serve with vllm or sglang, or set generate.repetition_penalty=1.0"
        )
    # llama.cpp's server penalises by default (1.1); the OpenAI API has no such field
    return {"repeat_penalty": 1.0} if server == "llama.cpp" else {}


class ServerEngine:
    """Greedy answers from one model (or LoRA adapter) served by an OpenAI-compatible ``/completions``.

    Args:
        base_url: API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the name the server knows the model or adapter by (vLLM: a ``--lora-modules`` name).
        tokenizer: the model's tokenizer: it renders prompts and names the stop tokens.
        server: one of :data:`SERVERS`.
        max_new_tokens: the cap on each answer.
        repetition_penalty: transformers' repetition penalty (see the module doc).
        spare_stop_tokens: whether the penalty must spare the stop tokens (refused by every server
            but one neftune runs: see :func:`penalty_fields`).
        sparing_plugin: the server is vLLM run by neftune, with its sparing penalty loaded.
        workers: requests in flight at once (the server batches them).
        api_key_env: NAME of the environment variable holding the API key.
        timeout: seconds per request (a long answer on a CPU takes minutes).
        max_retries: retries of transient failures (:class:`neftune.http_api.Endpoint`).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Any,
        *,
        server: str = "other",
        max_new_tokens: int = 256,
        repetition_penalty: float = 1.2,
        spare_stop_tokens: bool = False,
        sparing_plugin: bool = False,
        workers: int = 8,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 600.0,
        max_retries: int = 4,
    ) -> None:
        if not model:
            raise ConfigError("generate.served_model is empty: name the model or adapter the server serves")
        if max_new_tokens < 1:
            raise ConfigError(f"generate.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.stops = stop_token_ids(tokenizer)
        self.penalty = penalty_fields(
            server, repetition_penalty, spare_stop_tokens, sparing_plugin=sparing_plugin, stops=self.stops
        )
        self.endpoint = Endpoint(
            base_url,
            role="generation",
            fatal=NeftuneError,
            url_setting="generate.url",
            api_key_env=api_key_env,
            timeout=timeout,
            max_retries=max_retries,
            workers=workers,
        )
        self.url = self.endpoint.url("/completions")
        self.model, self.tokenizer, self.server = model, tokenizer, server
        self.max_new_tokens = int(max_new_tokens)

    def ensure_served(self, adapter: Path | None) -> None:
        """Have a vLLM server load ``adapter`` (a LoRA adapter directory) as :attr:`model` unless it serves it.

        Uses vLLM's ``/v1/load_lora_adapter`` (the server needs ``--enable-lora`` and
        ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; the path must be readable where it runs), so that the
        arms of ``compare``, trained one after another, are answered by one base engine.  Other servers,
        full-weight arms and names already served are left alone: the first request says what is wrong.
        """
        if self.server != "vllm" or adapter is None or not (adapter / "adapter_config.json").is_file():
            return
        where = Endpoint.public(self.endpoint.base_url)
        with self.endpoint.client() as client:
            try:
                listed = self.endpoint.post(client, self.endpoint.url("/models"), None, model=self.model)
            except (RequestFailed, NeftuneError):  # no model list: ask to load, which says what is wrong
                listed = {}
            if any(isinstance(m, dict) and m.get("id") == self.model for m in listed.get("data") or []):
                return
            load = {"lora_name": self.model, "lora_path": str(adapter.resolve())}
            try:
                self.endpoint.post(
                    client, self.endpoint.url("/load_lora_adapter"), load, model=self.model, expect_json=False
                )
            except (RequestFailed, NeftuneError) as exc:
                raise NeftuneError(
                    f"vLLM at {where} could not load the adapter {adapter} as {self.model!r} ({exc}); start it with "
                    f"--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or with --lora-modules {self.model}={adapter}"
                ) from None
        logger.info("vLLM at %s loaded the adapter %s as %r", where, adapter, self.model)

    def identity(self) -> dict[str, Any]:
        """What shapes the answers besides the prompts and the weights (for the generate fingerprint)."""
        return {"url": Endpoint.public(self.url), "server": self.server, "served_model": self.model}

    def _payload(self, prompt: list[int]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt if self.server in _TAKES_TOKEN_IDS else self.tokenizer.decode(prompt),
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "stop": [self.tokenizer.decode([t]) for t in self.stops],
            **self.penalty,
        }
        if self.server in _TAKES_TOKEN_IDS:
            payload["stop_token_ids"] = self.stops
            payload["skip_special_tokens"] = True
        return payload

    def _answer(self, client: Any, index: int, prompt: list[int]) -> Completion:
        where = f"generation with {self.model!r}, prompt {index}"
        try:
            data = self.endpoint.post(client, self.url, self._payload(prompt), model=self.model)
        except RequestFailed as exc:
            raise NeftuneError(f"{where}: {exc}") from None
        try:
            choice = data["choices"][0]
            text, finish = choice["text"], choice.get("finish_reason")
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise NeftuneError(f"{where}: the reply has no choices[0].text: {str(data)[:80]!r}") from None
        read = (data.get("usage") or {}).get("prompt_tokens")
        if isinstance(read, int) and read != len(prompt):
            raise NeftuneError(
                f"{where}: the server read the prompt as {read} tokens, the model's tokenizer renders it as "
                f"{len(prompt)}: it tokenizes differently (a begin-of-sequence token?), so it would answer another "
                "prompt; serve the same tokenizer, or set generate.server=vllm/sglang to send token ids"
            )
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Completion(ids, finish == "length", text)

    def __call__(self, prompts: Sequence[Sequence[int]], progress: bool = True) -> list[Completion]:
        """Answer every prompt (token ids); the completions in the order of ``prompts``.

        :attr:`endpoint`'s ``workers`` requests are in flight at once (the server batches them), and the
        progress bar counts answers as they arrive.  The first error (or Ctrl-C) ends the call at once:
        prompts not sent yet are dropped, and requests in flight are abandoned rather than waited for
        (they are daemon threads; a server neftune runs is stopped right after, which ends them).
        """
        from tqdm.auto import tqdm

        if not prompts:
            return []
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(prompts)):
            todo.put(index)
        arrived: queue.SimpleQueue[tuple[int, Completion | BaseException]] = queue.SimpleQueue()
        stop = threading.Event()
        client = self.endpoint.client()

        def work() -> None:
            while not stop.is_set():
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    arrived.put((index, self._answer(client, index, list(prompts[index]))))
                except BaseException as exc:  # handed to the caller's thread, which raises it
                    stop.set()  # no other prompt is sent
                    arrived.put((index, exc))

        for _ in range(min(self.endpoint.workers, len(prompts))):
            threading.Thread(target=work, name="neftune-generate", daemon=True).start()
        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, dynamic_ncols=True)
        try:
            for _ in range(len(prompts)):
                index, answer = _next(arrived)
                if isinstance(answer, BaseException):
                    raise answer
                results[index] = answer
                bar.update(1)
        finally:
            stop.set()
            bar.close()
            if all(r is not None for r in results):
                client.close()  # else threads may still use it: it goes with them
        return typing.cast(list[Completion], results)


def _next(arrived: queue.SimpleQueue) -> Any:
    """The next answer to arrive; waits in short slices so that Ctrl-C is seen at once."""
    while True:
        try:
            return arrived.get(timeout=0.5)
        except queue.Empty:
            continue
