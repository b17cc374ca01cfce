"""Tests start servers with the package's own launcher (benchmarks use it too)."""

from vllm_tokenprune.tools.launcher import Server, free_port, serve_command  # noqa: F401
