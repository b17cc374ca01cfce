"""A stand-in for `vllm-tokenprune serve` in the launcher's fast tests: it reads ``--host`` and
``--port`` as vLLM does (the last one given wins), answers ``/health`` and ``/v1/models``
there, and starts a child process, as vLLM starts its engine, so that a test can see the
whole process group stop. ``--delay S``: sleep that long before serving (a slow start-up)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

MODEL = "fake"


def command(model, *args: str, port: int, host: str = "127.0.0.1", stock: bool = False) -> list[str]:
    """In place of ``launcher.serve_command``."""
    return [sys.executable, __file__, "--port", str(port), "--host", host, *args]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": {}, "/v1/models": {"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]}}.get(self.path)
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--delay", type=float, default=0)
    args, _ = parser.parse_known_args()
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(args.delay)
    HTTPServer((args.host, args.port), Handler).serve_forever()
