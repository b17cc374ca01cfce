"""The launcher that starts the server of `vllm-tokenprune eval` and `bench`: it serves where
``--host`` and ``--port`` say and looks there, or refuses them before anything starts. Fast
tests on a stand-in server (fake_server.py)."""

from __future__ import annotations

import json
import socket

import fake_server
import psutil
import pytest

from vllm_tokenprune.cli import main
from vllm_tokenprune.tools import launcher
from vllm_tokenprune.tools.client import served_model
from vllm_tokenprune.tools.launcher import LaunchError, Server, free_port, target


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

