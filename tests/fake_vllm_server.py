"""A stand-in for ``python -m vllm.entrypoints.openai.api_server`` that speaks enough of its API.

Run by ``tests/test_vllm_server.py`` through a wrapper "python" (generate.vllm_python), so that the
managed-server code path runs end to end without vLLM: it parses the flags neftune passes, appends
them (and the logits processors it could import, as vLLM does) and every request to the JSON Lines file ``$FAKE_VLLM_RECORD``, serves ``GET /v1/models``,
``POST /v1/load_lora_adapter`` and ``POST /v1/completions`` (an answer naming the model asked,
cut at the cap on every second prompt), and stops on SIGTERM.  ``$FAKE_VLLM_MODE``: ``ok``; ``exit``
(prints an error and exits with status 3 before listening); ``silent`` (never listens).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--served-model-name", "--host", "--port", "--dtype", "--max-lora-rank", "--max-loras"):
        parser.add_argument(flag)
    parser.add_argument("--logits-processors", nargs="+", default=[])
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--enable-lora", action="store_true")
    args, extra = parser.parse_known_args()
    record = os.environ["FAKE_VLLM_RECORD"]
    lock = threading.Lock()

    def write(entry: dict) -> None:
        with lock, open(record, "a", encoding="utf-8") as sink:
            sink.write(json.dumps(entry) + "\n")

    env = {
        k: os.environ.get(k)
        for k in (
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
            "PYTHONPATH",
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_NUM_OF_RESERVED_CPU",
        )
    }
    # as vLLM does: import each processor "module:Class" from this process's sys.path
    loaded = [
        getattr(importlib.import_module(m), c).__name__ for m, c in (p.split(":") for p in args.logits_processors)
    ]
    write({"start": vars(args), "extra": extra, "pid": os.getpid(), "env": env, "processors": loaded})
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    if mode == "exit":
        print("INFO starting", flush=True)
        print("RuntimeError: this CPU lacks the instructions the engine was built for", flush=True)
        sys.exit(3)
    if mode == "silent":
        time.sleep(3600)
    adapters: set[str] = set()
    asked = [0]

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            served = [args.served_model_name, *sorted(adapters)]
            self._send(200, json.dumps({"data": [{"id": m} for m in served]}))

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            write({"path": self.path, "payload": payload})
            if self.path == "/v1/load_lora_adapter" and args.enable_lora:
                adapters.add(payload["lora_name"])
                return self._send(200, "Success: LoRA adapter added successfully.")
            if self.path != "/v1/completions" or payload["model"] not in {args.served_model_name, *adapters}:
                return self._send(404, '{"detail": "Not Found"}')
            with lock:
                asked[0] += 1
                cut = asked[0] % 2 == 0
            choice = {"index": 0, "text": f"answer of {payload['model']}", "finish_reason": "length" if cut else "stop"}
            self._send(200, json.dumps({"choices": [choice], "usage": {"prompt_tokens": len(payload["prompt"])}}))

        def log_message(self, *_: object) -> None:
            pass

    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
