#!/usr/bin/env bash
# The parity and docs-snippet tests at the LOWEST declared versions of pyproject.toml's dependencies,
# in a second virtualenv (.venv-lowest; the main environment is not touched). Not in the default test run.
#
#   bash scripts/test_lowest_deps.sh            # build (or reuse) .venv-lowest, then test
#   FRESH=1 bash scripts/test_lowest_deps.sh    # rebuild the venv from scratch
#   bash scripts/test_lowest_deps.sh -x -k gpt2 # extra arguments go to pytest
#
# Every dependency of [project] dependencies with a ">=X" bound is installed at ==X (transformers, ray,
# accelerate, packaging); the unbounded ones at whatever pip resolves. torch is the exception: it is the
# CPU build torch==$TORCH_VERSION (default 2.13.0), never a CUDA build. pip takes it from a local
# wheel (this machine's find-links) or from TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu);
# the "+cpu" local label makes pip fail rather than fall back to PyPI's CUDA wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv-lowest}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
t0=$SECONDS

if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "needs Python >= 3.11 (tomllib)"'
# (this machine's pip config names local index folders that do not all exist: drop those warnings)
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# 1. torch, CPU only, before anything that depends on it
torch_args=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then torch_args=(--index-url "$TORCH_INDEX_URL"); fi
pip_install "${torch_args[@]}" "torch==${TORCH_VERSION}+cpu"
CONSTRAINTS="$VENV/constraints-lowest.txt"
echo "torch==${TORCH_VERSION}+cpu" > "$CONSTRAINTS"   # later installs may not replace it

# 2. the lowest declared versions, read from pyproject.toml (plus the dev extra, unpinned)
"$PY" - "$ROOT/pyproject.toml" > "$VENV/requirements-lowest.txt" <<'EOF'
import sys, tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # not installed yet: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for dep in project["dependencies"]:
    req = Requirement(dep)
    if req.name == "torch":
        continue  # installed above
    lows = [s.version for s in req.specifier if s.operator == ">="]
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    print(f"{req.name}{extras}=={lows[0]}" if lows else dep)
for dep in project["optional-dependencies"]["dev"]:
    print(dep)
EOF
echo "== installing (lowest declared):" $(grep -v '^#' "$VENV/requirements-lowest.txt" | tr '\n' ' ')
pip_install -c "$CONSTRAINTS" -r "$VENV/requirements-lowest.txt"
pip_install --no-deps -e .   # raytrainer itself; its pins are the ones above

# 3. check: CPU torch, nothing from CUDA, a consistent environment
"$PY" - "$TORCH_VERSION" <<'EOF'
import sys
from importlib import metadata
import torch
want = sys.argv[1]
assert torch.__version__ == f"{want}+cpu" and torch.version.cuda is None, f"not a CPU torch {want}: {torch.__version__}"
cuda = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
assert not cuda, f"CUDA packages were installed: {cuda}"
print("== versions:", ", ".join(f"{n} {metadata.version(n)}" for n in ("torch", "transformers", "accelerate", "ray", "packaging", "datasets", "huggingface-hub")))
EOF
"$PY" -m pip check --disable-pip-version-check
"$PY" -c 'import raytrainer._versions as v, sys; bad = v.out_of_range(); print(*bad, sep="\n"); sys.exit(1 if bad else 0)'

# 4. the tests (in-process, num_workers=0: no Ray cluster is started; -m "not ray" keeps it that way)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
"$PY" -m pytest tests/test_parity.py tests/test_docs_snippets.py tests/test_versions.py -q -p no:cacheprovider \
    -m "not ray" "$@" || status=$?
echo "== test_lowest_deps: exit $status in $((SECONDS - t0)) s"
exit $status
