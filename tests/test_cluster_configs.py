"""cluster/: the launcher YAML, KubeRay manifests and local.sh stay valid and consistent.

Parsing and static checks only: nothing here starts Ray or talks to Kubernetes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
ENTRYPOINT = re.compile(r"^python jobs/finetune\.py --config (jobs/configs/[\w.-]+\.ya?ml)$")


def _load(name: str) -> dict:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def _entrypoint_config(entrypoint: str) -> str:
    """The jobs/configs/... path an entrypoint names (asserting the entrypoint's shape)."""
    match = ENTRYPOINT.match(entrypoint.strip())
    assert match, f"entrypoint {entrypoint!r} does not run jobs/finetune.py with a jobs/configs file"
    return match.group(1)


def _check_ray_cluster_spec(spec: dict) -> None:
    """Head + at least one worker group with CPU/memory requests, token auth on."""
    assert spec["authOptions"]["mode"] == "token"
    head = _containers(spec["headGroupSpec"])
    assert head and all(c.get("image") for c in head)
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in _containers(group):
            requests = container["resources"]["requests"]
            assert float(requests["cpu"]) > 0 and requests["memory"]
            assert container["resources"]["limits"]["cpu"] == requests["cpu"]
    # the image tag and rayVersion agree
    for container in head + [c for g in groups for c in _containers(g)]:
        if container["image"].startswith("rayproject/ray:"):
            assert container["image"].split(":")[1].startswith(spec["rayVersion"])


def test_kuberay_raycluster():
    doc = _load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob():
    doc = _load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and any("raytrainer" in p for p in runtime_env["pip"])
    assert spec["shutdownAfterJobFinishes"] is True
    _entrypoint_config(spec["entrypoint"])


def test_entrypoints_name_existing_files():
    """The RayJob entrypoint and the command local.sh prints point at files in the repo."""
    if not (REPO / "jobs" / "finetune.py").is_file():
        pytest.skip("jobs/finetune.py not written yet")
    configs = {_entrypoint_config(_load("kuberay-rayjob.yaml")["spec"]["entrypoint"])}
    printed = re.findall(r"python jobs/finetune\.py --config (jobs/configs/[\w.-]+\.ya?ml)",
                         (CLUSTER / "local.sh").read_text())
    assert printed, "local.sh no longer prints the submit command"
    for path in configs | set(printed):
        assert (REPO / path).is_file(), f"{path} does not exist"


def _vm_configs() -> list[tuple[str, dict]]:
    """vm.yaml as written, and with its commented AWS block swapped in."""
    text = (CLUSTER / "vm.yaml").read_text()
    local = yaml.safe_load(text)
    block = re.search(r"^# >>> aws\n(.*?)^# <<< aws", text, re.S | re.M)
    assert block, "vm.yaml lost its commented AWS block"
    aws_part = yaml.safe_load("\n".join(line[2:] for line in block.group(1).splitlines()))
    aws = {k: v for k, v in local.items() if k not in ("provider", "auth")}
    aws.update(aws_part)
    return [("local", local), ("aws", aws)]


@pytest.mark.parametrize("variant", ["local", "aws"])
def test_vm_launcher_config(variant):
    config = dict(_vm_configs())[variant]
    assert config["provider"]["type"] == variant
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in cmd for cmd in config[key]), key
    assert any("--head" in cmd and "--dashboard-host" in cmd for cmd in config["head_start_ray_commands"])
    assert any("pip install" in cmd for cmd in config["setup_commands"])

    if variant == "local":
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        # what `ray up` does first: the on-prem provider turns IPs into one node type
        from ray.autoscaler._private.local.config import prepare_local

        config, _ = prepare_local(config)
    else:
        workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
        assert workers and all(t["resources"].get("CPU", 0) > 0 for t in workers.values())
        assert config["head_node_type"] in config["available_node_types"]

    # Ray's own schema for cluster launcher configs
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_local_sh_syntax_and_env(tmp_path):
    script = CLUSTER / "local.sh"
    assert os.access(script, os.X_OK), "cluster/local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)

    # `env` makes a token once, keeps it private, and reuses it; it never starts Ray
    env = dict(os.environ, RAYTRAINER_TOKEN_FILE=str(tmp_path / "state" / "token"))
    env.pop("RAY_AUTH_TOKEN", None)
    first = subprocess.run([str(script), "env"], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([str(script), "env"], env=env, capture_output=True, text=True, check=True)
    assert first.stdout == second.stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in first.stdout.splitlines())
    assert exports["RAY_AUTH_MODE"] == "token"
    assert re.fullmatch(r"[0-9a-f]{64}", exports["RAY_AUTH_TOKEN"])
    assert exports["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert (tmp_path / "state" / "token").stat().st_mode & 0o077 == 0

    usage = subprocess.run([str(script), "nonsense"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    assert "jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml" in script.read_text()
