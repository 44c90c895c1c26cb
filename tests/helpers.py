"""Test helpers: observe the embeddings a model's first decoder layer actually receives."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import nn

SECRET = "sk-test-NEFTUNE-DO-NOT-WRITE-0123456789"
"""OPENAI_API_KEY while the shared runs of conftest.py train: no file they write may contain it."""

ALPACA = [
    {"instruction": "Say hi", "output": "hi there"},
    {"instruction": "Add 2 and 3", "input": "", "output": "5"},
    {"instruction": "Reverse the word", "input": "abc", "output": "cba"},
    {"instruction": "Uppercase the word dog", "output": "DOG"},
    {"instruction": "Name a color", "output": "blue"},
    {"instruction": "Count to three", "output": "1 2 3"},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {"messages": [{"role": "user", "content": "Reverse abc"}, {"role": "assistant", "content": "cba"}]},
    {"messages": [{"role": "user", "content": "Uppercase dog"}, {"role": "assistant", "content": "DOG"}]},
]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise AssertionError("no decoder layers found")


@contextlib.contextmanager
def record_noise(model: nn.Module) -> Iterator[list[dict]]:
    """Record, for every forward, ``noise = hidden_states entering layer 0 - clean embedding``.

    The clean embedding is recomputed from the embedding weights and the token ids of the call, so
    the recording is independent of any hook under test.
    """
    records: list[dict] = []
    embedding = model.get_input_embeddings()
    current: dict = {}

    def capture_ids(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        current["input_ids"] = ids
        current["training"] = module.training

    def capture_hidden(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        ids = current["input_ids"]
        with torch.no_grad():
            clean = embedding.weight[ids].to(hidden.dtype)
            records.append(
                {"noise": (hidden.detach() - clean).float(), "input_ids": ids, "training": current["training"]}
            )

    handles = [
        embedding.register_forward_pre_hook(capture_ids, with_kwargs=True),
        decoder_layers(model)[0].register_forward_pre_hook(capture_hidden, with_kwargs=True),
    ]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def record_dpo_forwards(model: nn.Module, trainer: str = "dpo_trainer") -> Iterator[list[dict]]:
    """record_noise plus, per forward: the attention mask, the log-probs, whether grad was enabled, and whether TRL ran it as the
    reference (inside the ``use_adapter`` context of ``trl.trainer.<trainer>``, whichever way neftune
    tells the two apart)."""
    import importlib

    dpo_module = importlib.import_module(f"trl.trainer.{trainer}")

    in_reference = [False]
    original = dpo_module.use_adapter

    @contextlib.contextmanager
    def marked_use_adapter(*args, **kwargs):
        in_reference[0] = True
        try:
            with original(*args, **kwargs):
                yield
        finally:
            in_reference[0] = False

    calls: list[dict] = []
    pre = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(
            {"attention_mask": kw.get("attention_mask"), "reference": in_reference[0], "grad": torch.is_grad_enabled()}
        ),
        with_kwargs=True,
    )
    post = model.register_forward_hook(lambda m, a, out: calls[-1].update(log_probs=out.log_probs.detach().clone()))
    dpo_module.use_adapter = marked_use_adapter
    try:
        with record_noise(model) as records:
            yield records
    finally:
        dpo_module.use_adapter = original
        pre.remove()
        post.remove()
    for record, call in zip(records, calls, strict=True):
        record.update(call)


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on all modules of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class OpenAIStyleServer:
    """OpenAI-style /v1/chat/completions and /v1/completions on 127.0.0.1; ``behaviour(payload,
    nth_call_for_prompt, headers)`` returns ``(status, body)`` or ``(status, body, response_headers)``."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.models: list[str] | None = None  # what GET /v1/models lists (None: 404, as many servers)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(body)
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "payload": payload})
                    # chat requests are told apart by their last message, completions by their prompt
                    key = payload["messages"][-1]["content"] if "messages" in payload else str(payload.get("prompt"))
                    server.seen[key] = server.seen.get(key, 0) + 1
                    nth = server.seen[key]
                if self.path not in ("/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"):
                    status, text, *extra = 404, '{"error": "not found"}'
                else:
                    status, text, *extra = server.behaviour(payload, nth, dict(self.headers))
                data = text.encode("utf-8")
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():  # optional third item: headers
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                listed = server.models
                status = 200 if self.path == "/v1/models" and listed is not None else 404
                data = json.dumps({"data": [{"id": m} for m in listed or []]}).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_reply(content: str) -> str:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
    )
