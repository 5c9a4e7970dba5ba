#!/usr/bin/env bash
# Install raytrainer from a source folder (default: this checkout) with torch, transformers, Ray and
# DeepSpeed pinned, into $PYTHON (default python3). docker/Dockerfile and docker/Dockerfile.cuda run it;
# tests/test_dockerfiles.py runs it in a fresh venv. Not editable: the folder can go after the install.
#
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/install_image.sh /src/raytrainer
set -euo pipefail
SRC="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.24.0}"
RAY_VERSION="${RAY_VERSION:-2.60.0}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"   # CPU wheels; cuXXX for the CUDA image
PIP=("$PY" -m pip install --no-cache-dir)

# torch first, from its own index: PyPI's default torch is a multi-GB CUDA build
"${PIP[@]}" "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple
# DeepSpeed compiles against the installed torch: no build isolation, no compiled ops (ZeRO runs without
# them), torch pinned in the same command so pip cannot replace it
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" "torch==${TORCH_VERSION}"
"${PIP[@]}" --no-build-isolation "${SRC}" "torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
    "ray[default,train,tune,data]==${RAY_VERSION}" "deepspeed==${DEEPSPEED_VERSION}"
# the versions asked for, or stop the build
"$PY" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" "$RAY_VERSION" "$DEEPSPEED_VERSION" <<'PY'
import sys
from importlib.metadata import version

want = dict(zip(["torch", "transformers", "ray", "deepspeed"], sys.argv[1:]))
got = {name: version(name).split("+")[0] for name in want}
bad = {name: (got[name], want[name]) for name in want if got[name] != want[name]}
if bad:
    sys.exit(f"install_image.sh: installed versions differ from the pins (installed, pinned): {bad}")
print("install_image.sh: raytrainer", version("raytrainer"), "with", ", ".join(f"{k} {v}" for k, v in got.items()))
PY
