"""Running a benchmarks/ script's ``main`` as a user would, in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_without_vllm(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``benchmarks/<script>``'s ``main(args)`` in a fresh interpreter on one thread; exit code 3
    when it imported vLLM (the GPU machines it is written for have none)."""
    code = (f"import runpy, sys; main = runpy.run_path({str(ROOT / 'benchmarks' / script)!r})['main']; "
            f"code = main({args!r}); sys.exit(code or 3 * ('vllm' in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
