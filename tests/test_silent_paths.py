"""Paths that used to end quietly now say what happened (issue 19, item 9): the Hub refusing a token,
a background upload that never finishes, the driver's event pump losing its box."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

BAD_TOKEN = "hf_badTokenNeverShown0123456789"


class Refuses(http.server.BaseHTTPRequestHandler):
    """What the Hub answers a bad token: 401 with its JSON error (a stand-in: the real Hub is not reachable here)."""

    def _refuse(self):
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args):
        pass


def test_a_refused_hub_token_is_reported_as_such_not_as_unreachable(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = textwrap.dedent(f"""
        import raytrainer
        from tests.helpers import tiny_gpt2
        args = raytrainer.TrainingArguments(output_dir={str(tmp_path)!r}, push_to_hub=True, hub_model_id="someone/tiny",
                                            hub_token={BAD_TOKEN!r}, report_to="none")
        try:
            raytrainer.Trainer(model=tiny_gpt2(), args=args)
        except ValueError as e:
            print("ERROR:", e)
        """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", PYTHONPATH=os.getcwd())
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    out = done.stdout + done.stderr
    error = next((line for line in done.stdout.splitlines() if line.startswith("ERROR:")), None)
    assert error is not None, out[-3000:]
    assert "refused the token" in error and "401" in error and "hub_token" in error and "unreachable" not in error
    assert BAD_TOKEN not in out


def test_wait_for_uploads_is_bounded_with_one_clear_line(monkeypatch):
    from types import SimpleNamespace

    from raytrainer.checkpoint.ray_checkpoints import RayCheckpoints

    monkeypatch.setenv("RAYTRAINER_STORAGE_RETRY_S", "-299.9")  # bound = retries + 300 s margin = 0.1 s
    run = RayCheckpoints.__new__(RayCheckpoints)
    run.spec = SimpleNamespace(run_dir="bucket/runs/r1")
    run._pending, run._drained = 1, threading.Condition()  # an upload that never returns
    with pytest.raises(TimeoutError, match=r"1 checkpoint upload\(s\) to bucket/runs/r1 not finished after 0.1 s"):
        run.wait_for_uploads()


@pytest.mark.ray
def test_the_event_pump_reports_a_lost_box(ray_cluster, caplog):
    import ray

    from raytrainer.event_stream import DriverStream

    stream = DriverStream(SimpleTrainer(), display=False)
    with caplog.at_level("WARNING", logger="raytrainer"):
        stream.__enter__()
        ray.kill(stream.box)  # the box dies while the run goes on (its node lost)
        stream._thread.join(timeout=60)  # the pump meets the RayError at its next poll: it says so and ends
        assert not stream._thread.is_alive()
    assert isinstance(stream.error, ray.exceptions.RayError)
    assert [r for r in caplog.records if "lost the event stream from rank 0" in r.getMessage()]
    with pytest.raises(ray.exceptions.RayError):  # what rank 0 sent last (its final state) is lost: not quiet either
        stream.__exit__(None, None, None)


class SimpleTrainer:
    class callback_handler:  # noqa: N801 - the attribute DriverStream reads
        callbacks: list = []
