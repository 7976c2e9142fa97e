"""Start a real ``nbchat serve`` in a subprocess on a free loopback port, for the server tests.

The process runs this checkout (``PYTHONPATH``), logs to a file the tests read, and is always
stopped (SIGTERM, then SIGKILL) when the ``with`` block ends. ``startup_statuses`` are the /health
statuses seen while it started, in order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    api_key: str | None
    log_path: Path
    startup_statuses: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **options):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", max_retries=0,
                             **options)

    def async_client(self, **options):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", max_retries=0,
                                  **options)


@contextmanager
def running_server(model: str, *, api_key: str | None = None) -> Iterator[RunningServer]:
    """A started server whose model is loaded (/health 200)."""
    port = free_port()
    command = [sys.executable, "-m", "nbchat.cli", "serve", "--model", model, "--port", str(port)]
    if api_key:
        command += ["--api-key", api_key]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("NBCHAT_API_KEY", None)
    log_file = tempfile.NamedTemporaryFile("wb", prefix="nbchat-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = RunningServer(process, port, api_key, Path(log_file.name))
    try:
        _wait_until_ready(server)
        yield server
    finally:
        stop(server)
        log_file.close()


def _wait_until_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"nbchat serve exited with {server.process.returncode}:\n{server.log()}")
        try:
            status = httpx.get(f"{server.url}/health", timeout=5).status_code
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        server.startup_statuses.append(status)
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nbchat serve was not ready after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def stop(server: RunningServer, timeout: float = 30) -> int:
    """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            return server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
    return server.process.wait(timeout)
