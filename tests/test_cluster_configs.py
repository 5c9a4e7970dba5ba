"""cluster/: the launcher YAML, KubeRay manifests and local.sh stay valid, safe and able to keep a run.

Parsing and static checks only: nothing here starts Ray or talks to Kubernetes. The KubeRay manifests are
validated against KubeRay v1.7.0's CRD schemas (../shared/schemas/kuberay-v1.7.0/ from the project root),
made strict as `kubectl apply --validate=strict` is: an unknown key is an error, not silently pruned.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# ../shared/schemas/kuberay-v1.7.0 from the project root (a git worktree one level deeper: the nearest ancestor)
SCHEMAS = next((p / "shared" / "schemas" / "kuberay-v1.7.0" for p in REPO.parents
                if (p / "shared" / "schemas" / "kuberay-v1.7.0").is_dir()),
               REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0")
IMAGE_HOME = "/home/ray/raytrainer/"  # docker/Dockerfile's WORKDIR: the checkout's jobs/ are copied there
ENTRYPOINT = re.compile(rf"^python {IMAGE_HOME}jobs/finetune\.py --config {IMAGE_HOME}(jobs/configs/[\w.-]+\.ya?ml)"
                        r"(?P<rest>( --[\w]+ \S+)*)$")
S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
RAY_CONTAINERS = {"ray-head", "ray-worker"}  # the driver runs in ray-head, Ray Train workers in ray-worker
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(name: str) -> dict:
    with open(CLUSTER / name) as f:
        return yaml.load(f, Loader=Loader)


def _dockerfile_images() -> dict[str, str]:
    """docker/Dockerfile* -> the rayproject/ray tag each builds FROM."""
    out = {}
    for path in sorted((REPO / "docker").glob("Dockerfile*")):
        match = re.search(r"^FROM (rayproject/ray:\S+)", path.read_text(), re.M)
        assert match, f"{path} has no FROM rayproject/ray:..."
        out[path.name] = match.group(1)
    return out


# ------------------------------------------------------------------------------------------ CRD schemas
def _strict(schema):
    """A copy of a CRD schema where objects with declared properties refuse other keys."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.fail(f"KubeRay CRD schema missing: {path} (the project expects ../shared/schemas/kuberay-v1.7.0/)")
    with open(path) as f:
        crd = yaml.load(f, Loader=Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _crd_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _crd_validator(doc["kind"]).iter_errors(doc)]


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_manifest_validates_against_kuberay_crd(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(doc) == []


def test_crd_validation_catches_typos_and_wrong_types():
    """The strict schema is not vacuous: what kubectl would refuse or drop is an error here."""
    doc = _load("kuberay-raycluster.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # maxReplicas
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    container_typo = copy.deepcopy(doc)
    container_typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    for bad, where in ((typo, "maxReplica"), (wrong_type, "replicas"), (container_typo, "securityContex")):
        errors = _crd_errors(bad)
        assert errors and any(where in e for e in errors), errors


# ------------------------------------------------------------------------------------------ pod templates
def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_specs(doc: dict) -> dict[str, dict]:
    """Every pod template of a manifest: head, each worker group, the RayJob submitter."""
    spec = _ray_cluster_spec(doc)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({f"worker:{g['groupName']}": g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    if doc["kind"] == "RayJob":
        pods["submitter"] = doc["spec"]["submitterPodTemplate"]["spec"]
    return pods


MANIFESTS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_pods_run_unprivileged_without_service_account_token(name):
    for where, pod in _pod_specs(_load(name)).items():
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}/{c['name']}: a read-only root needs a writable /tmp"
            assert not any("serviceaccount" in m for m in mounts), f"{where}/{c['name']} mounts a service-account token"


def test_only_the_autoscaler_gets_a_service_account_token():
    spec = _load("kuberay-raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    mounts = {m["name"]: m for m in spec["autoscalerOptions"]["volumeMounts"]}
    token = mounts["kube-api-access"]
    assert token["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and token["readOnly"] is True
    volumes = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert any("serviceAccountToken" in s for s in sources)


@pytest.mark.parametrize("name", MANIFESTS)
def test_s3_keys_only_in_ray_containers_from_a_secret(name):
    for where, pod in _pod_specs(_load(name)).items():
        for c in pod["containers"] + pod.get("initContainers", []):
            assert "envFrom" not in c, f"{where}/{c['name']}: envFrom spreads a whole Secret"
            env = {e["name"]: e for e in c.get("env", [])}
            if c["name"] in RAY_CONTAINERS:
                for key in S3_KEYS:
                    assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key, (where, key)
                    assert "value" not in env[key]
            else:
                assert not S3_KEYS & set(env), f"{where}/{c['name']} gets S3 keys it does not need"
    autoscaler = _ray_cluster_spec(_load(name)).get("autoscalerOptions", {})
    assert not S3_KEYS & {e["name"] for e in autoscaler.get("env", [])}


@pytest.mark.parametrize("name", MANIFESTS)
def test_images_resources_and_gpu_group(name):
    doc = _load(name)
    spec = _ray_cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    froms = _dockerfile_images()
    # the image's Ray is the cluster's: the FROM tags of docker/ and rayVersion agree
    assert {t.split(":")[1].split("-")[0] for t in froms.values()} == {spec["rayVersion"]}
    groups = spec["workerGroupSpecs"]
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for where, pod in _pod_specs(doc).items():
        for c in pod["containers"]:
            # the raytrainer image built from docker/, tagged with the Ray version it is built on
            assert re.fullmatch(rf"[\w.-]+/raytrainer:[\w.]+-ray{re.escape(spec['rayVersion'])}-(cpu|cu\d+)",
                                c["image"]), (where, c["image"])
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert requests == limits, (where, "requests = limits: Ray reads the limits")
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no GPU worker group"
    for g in gpu:
        container = g["template"]["spec"]["containers"][0]
        assert re.search(r"-cu\d+$", container["image"]), "a GPU group runs the CUDA image (docker/Dockerfile.cuda)"
        assert "-cu" in froms["Dockerfile.cuda"]
    cpu = [g for g in groups if g not in gpu]
    assert all(g["template"]["spec"]["containers"][0]["image"].endswith("-cpu") for g in cpu)


def test_comments_say_what_binds_where():
    for name in MANIFESTS:
        text = (CLUSTER / name).read_text()
        assert "inside the pod only" not in text  # 0.0.0.0 binds the pod IP, reachable from other pods
        assert re.search(r"dashboard-host: \"0\.0\.0\.0\"\s+# binds the (head )?pod'?s? IP", text), name


# ------------------------------------------------------------------------------------------ the RayJob keeps its run
def _entrypoint(entrypoint: str) -> tuple[str, dict]:
    """The jobs/configs/... path an entrypoint names and its extra flags (asserting the entrypoint's shape)."""
    match = ENTRYPOINT.match(" ".join(entrypoint.split()))
    assert match, f"entrypoint {entrypoint!r} does not run the image's jobs/finetune.py with a jobs/configs file"
    flags = dict(re.findall(r"--(\w+) (\S+)", match.group("rest") or ""))
    return match.group(1), flags


def test_rayjob_keeps_the_run_in_s3():
    spec = _load("kuberay-rayjob.yaml")["spec"]
    config, flags = _entrypoint(spec["entrypoint"])
    assert (REPO / config).is_file()
    # the cluster (and its pods' disks) is deleted after the job: the run must be in a bucket
    assert spec["shutdownAfterJobFinishes"] is True
    assert flags["storage_path"].startswith("s3://"), flags
    assert "runtimeEnvYAML" not in spec  # everything is in the image: no per-job pip install


def test_dockerfiles_copy_what_the_entrypoints_run():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (REPO / "docker" / name).read_text()
        assert f"WORKDIR {IMAGE_HOME.rstrip('/')}" in text and re.search(r"^COPY jobs/ jobs/$", text, re.M), name
        assert "scripts/install_image.sh" in text


def test_local_sh_prints_an_existing_config():
    printed = re.findall(r"python jobs/finetune\.py --config (jobs/configs/[\w.-]+\.ya?ml)",
                         (CLUSTER / "local.sh").read_text())
    assert printed, "local.sh no longer prints the submit command"
    for path in printed:
        assert (REPO / path).is_file(), f"{path} does not exist"


# ------------------------------------------------------------------------------------------ vm.yaml
def _block(text: str, marker: str) -> dict:
    block = re.search(rf"^# >>> {marker}\n(.*?)^# <<< {marker}", text, re.S | re.M)
    assert block, f"vm.yaml lost its commented {marker} block"
    return yaml.safe_load("\n".join(line[2:] for line in block.group(1).splitlines()))


def _vm_configs() -> dict[str, dict]:
    """vm.yaml as written, without Docker, and with its commented AWS block swapped in."""
    text = (CLUSTER / "vm.yaml").read_text()
    local = yaml.safe_load(text)
    no_docker = {k: v for k, v in local.items() if k != "docker"}
    no_docker.update(_block(text, "no-docker"))
    aws = {k: v for k, v in local.items() if k not in ("provider", "auth")}
    aws.update(_block(text, "aws"))
    return {"local": local, "no-docker": no_docker, "aws": aws}


@pytest.mark.parametrize("variant", ["local", "no-docker", "aws"])
def test_vm_launcher_config(variant):
    config = _vm_configs()[variant]
    provider = "aws" if variant == "aws" else "local"
    assert config["provider"]["type"] == provider
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in cmd for cmd in config[key]), key
    assert any("--head" in cmd and "--dashboard-host=127.0.0.1" in cmd for cmd in config["head_start_ray_commands"])
    if variant == "no-docker":
        setup = config["setup_commands"]
        venv = next(i for i, cmd in enumerate(setup) if "python3 -m venv" in cmd)
        apt = next(i for i, cmd in enumerate(setup) if "apt-get install" in cmd and "python3-venv" in cmd)
        assert apt < venv, "python3-venv must be installed before python3 -m venv (stock Ubuntu lacks it)"
        assert any("pip install" in cmd and "raytrainer" in cmd for cmd in setup)
    else:
        image = config["docker"]["image"]
        assert re.fullmatch(r"[\w.-]+/raytrainer:[\w.]+-ray2\.60\.0-cpu", image), image

    if provider == "local":
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        # what `ray up` does first: the on-prem provider turns IPs into one node type
        from ray.autoscaler._private.local.config import prepare_local

        config, _ = prepare_local(config)
    else:
        workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
        assert workers and all(t["resources"].get("CPU", 0) > 0 for t in workers.values())
        assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values()), "no GPU node type"
        assert config["head_node_type"] in config["available_node_types"]

    # Ray's own schema for cluster launcher configs
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))


def test_vm_firewall_note_names_every_pinned_port():
    """Each port the start commands pin is in the firewall note, and no component is left on a random port."""
    text = (CLUSTER / "vm.yaml").read_text()
    note = text.split("\ncluster_name:")[0]
    config = yaml.safe_load(text)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = " ".join(config[key])
        flags = dict(re.findall(r"--([\w-]+port)=(\d+)", command))
        for flag in ("node-manager-port", "object-manager-port", "runtime-env-agent-port",
                     "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
                     "min-worker-port", "max-worker-port"):
            assert flag in flags, f"{key} leaves --{flag} to chance: a firewall cannot name it"
        for flag, port in flags.items():
            assert re.search(rf"\b{port}\b", note), f"the firewall note omits {port} (--{flag})"
    assert re.search(r"\b6379\b", note) and re.search(r"\b22\b", note) and "ephemeral" in note


# ------------------------------------------------------------------------------------------ local.sh
def _run_local(args, env, **kw):
    return subprocess.run([str(CLUSTER / "local.sh"), *args], env=env, capture_output=True, text=True, **kw)


def test_local_sh_syntax_and_env(tmp_path):
    script = CLUSTER / "local.sh"
    assert os.access(script, os.X_OK), "cluster/local.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)

    # `env` makes a token once, keeps it private, and reuses it; it never starts Ray
    env = dict(os.environ, RAYTRAINER_TOKEN_FILE=str(tmp_path / "state" / "token"))
    env.pop("RAY_AUTH_TOKEN", None)
    first = _run_local(["env"], env, check=True)
    second = _run_local(["env"], env, check=True)
    assert first.stdout == second.stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in first.stdout.splitlines())
    assert exports["RAY_AUTH_MODE"] == "token"
    assert re.fullmatch(r"[0-9a-f]{64}", exports["RAY_AUTH_TOKEN"])
    assert exports["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert (tmp_path / "state" / "token").stat().st_mode & 0o077 == 0

    usage = _run_local(["nonsense"], env)
    assert usage.returncode == 2 and "usage" in usage.stderr
    text = script.read_text()
    assert "jobs/finetune.py --config jobs/configs/tiny_gpt2.yaml" in text
    assert re.search(r'ray start --head .*--node-ip-address "\$NODE_IP"', text)


ODD_TOKEN = r'ab/c&d.*e\1$f "g" h'


def test_local_sh_masks_and_quotes_any_token(tmp_path):
    """A token with '/', '&', regex or shell characters is masked in Ray's output and survives `eval`."""
    env = dict(os.environ, RAY_AUTH_TOKEN=ODD_TOKEN, RAYTRAINER_TOKEN_FILE=str(tmp_path / "token"))
    ray_output = f"Local node IP: 127.0.0.1\n  export RAY_AUTH_TOKEN={ODD_TOKEN}\ntwice {ODD_TOKEN}{ODD_TOKEN}\nabcd.*e"
    masked = _run_local(["mask"], env, input=ray_output, check=True).stdout
    assert ODD_TOKEN not in masked and "ab/c" not in masked
    assert masked.splitlines() == ["Local node IP: 127.0.0.1", "  export RAY_AUTH_TOKEN=<token>",
                                   "twice <token><token>", "abcd.*e"]
    exports = _run_local(["env"], env, check=True).stdout
    probe = subprocess.run(["bash", "-c", exports + '\nprintf %s "$RAY_AUTH_TOKEN"'], capture_output=True,
                           text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert probe.stdout == ODD_TOKEN
