"""The launcher that starts the server of `vllm-tokenprune eval` and `bench`: it serves where
``--host`` and ``--port`` say and looks there, or refuses them before anything starts; and
the server it started (its whole process group) stops when the command is interrupted or
terminated. Fast tests on a stand-in server (fake_server.py); the last one runs `eval`
with the real server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fake_server
import psutil
import pytest

from vllm_tokenprune.cli import main
from vllm_tokenprune.tools import launcher
from vllm_tokenprune.tools.client import served_model
from vllm_tokenprune.tools.launcher import LaunchError, Server, free_port, target

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launcher, "serve_command", fake_server.command)
    monkeypatch.setattr(launcher, "STARTUP_TIMEOUT_S", 20)  # a port mix-up fails instead of waiting


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_it_serves_and_looks_at_the_host_and_port_given(fake, form, tmp_path):
    port = free_port()
    args = ["--host", "0.0.0.0", "--port", str(port)] if form == "separate" else ["--host=0.0.0.0", f"--port={port}"]
    with Server(None, *args, log_path=tmp_path / "server.log") as server:
        assert server.root == f"http://127.0.0.1:{port}"  # any address: reached through loopback
        assert served_model(server.url) == fake_server.MODEL
        processes = server_processes(server.proc.pid)
    assert_stopped(processes, port)


def test_arguments_it_cannot_honour_are_refused_before_anything_starts(fake, tmp_path, capsys):
    log = tmp_path / "server.log"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        for args, message in [(["--port", str(taken.getsockname()[1])], "Address already in use"),
                              (["--port", "0"], "from 1 to 65535"), (["--uds", "/tmp/sock"], "plain HTTP")]:
            with pytest.raises(LaunchError, match=message):
                Server(None, *args, log_path=log)
            assert not log.exists()  # opened just before the server starts
    with pytest.raises(LaunchError, match="with --url"), target("http://127.0.0.1:9", None, ["--port", "8210"], log):
        pass
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"image": "data:image/png;base64,AAAA", "question": "q", "answer": "a"}))
    assert main(["eval", "--url", "http://127.0.0.1:9", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--allow-dirty", "--port", "8210"]) == 2
    assert "with --url" in capsys.readouterr().err
    assert main(["bench", "--against-stock", "--port", "8210"]) == 2
    assert "two servers" in capsys.readouterr().err


# A command holding a started stand-in server until it is stopped.
HOLD = """import sys, time
from pathlib import Path
import fake_server
from vllm_tokenprune.tools import launcher
launcher.serve_command = fake_server.command
with launcher.target(None, None, sys.argv[2:], Path(sys.argv[1])):
    time.sleep(600)
"""


@pytest.mark.parametrize("delay", [0, 600], ids=["serving", "starting"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_or_terminated_command_stops_its_server(signum, delay, tmp_path):
    port = free_port()
    output = tmp_path / "output"
    with open(output, "wb") as out:
        tool = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "server.log"), "--port", str(port),
                                 "--delay", str(delay)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=ENV)
    try:
        processes = wait_for_server(tool, lambda: delay > 0 or "server healthy" in output.read_text(), 30)
        os.killpg(tool.pid, signum)  # as a terminal's Ctrl-C reaches its foreground group
        tool.wait(timeout=30)
        assert_stopped(processes, port)
    finally:
        kill(tool)


@pytest.mark.server
def test_eval_serves_on_the_port_given_and_its_server_stops_on_sigterm(tmp_path):
    """The reported hang: `eval --port P` started its server on P and waited on another port."""
    assert main(["make-eval-set", "--variant", "plain", "--n", "400", "--out", str(tmp_path / "set")]) == 0
    port = free_port()
    output = tmp_path / "output"
    with open(output, "wb") as out:
        tool = subprocess.Popen([sys.executable, "-m", "vllm_tokenprune.cli", "eval", "--port", str(port),
                                 "--data", str(tmp_path / "set" / "items.jsonl"), "--out", str(tmp_path / "out"),
                                 "--allow-dirty"], stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        processes = wait_for_server(tool, lambda: "server healthy" in output.read_text(), launcher.STARTUP_TIMEOUT_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        tool.terminate()
        assert tool.wait(timeout=60) == 130, output.read_text()[-3000:]
        assert_stopped(processes, port)
    finally:
        kill(tool)


def wait_for_server(tool: subprocess.Popen, ready, timeout: float) -> list[psutil.Process]:
    """The processes of the server ``tool`` started, once ``ready()`` and once it has two (the
    server and the engine, or the stand-in's child)."""
    deadline = time.monotonic() + timeout
    while True:
        assert tool.poll() is None, f"the command ended with {tool.returncode}"
        assert time.monotonic() < deadline, "no server"
        processes = psutil.Process(tool.pid).children(recursive=True)
        if ready() and len(processes) >= 2:
            return processes
        time.sleep(0.2)


def server_processes(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def assert_stopped(processes: list[psutil.Process], port: int) -> None:
    _, alive = psutil.wait_procs(processes, timeout=60)
    for process in alive:
        process.kill()
    assert not alive, alive
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more


def kill(tool: subprocess.Popen) -> None:
    """The command and its server, if a failed test left them running."""
    if tool.poll() is None:
        for process in [*psutil.Process(tool.pid).children(recursive=True), psutil.Process(tool.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        tool.wait()
