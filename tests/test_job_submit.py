"""`ray job submit` of examples/recover_on_cluster.py against a Ray head started with `ray start --head`.

The head runs with Ray's token authentication on (its default); the client finds the token
in ~/.ray/auth_token with RAY_AUTH_MODE=token, as the README says.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import ecdist

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_agent(port: int, head: subprocess.Popen, deadline_s: float = 300) -> None:
    """Poll the head's dashboard agent until its health check answers.

    "Ray runtime started" comes before the agent, which runs jobs, is up; the job head waits
    only 10 s for it and then refuses a submission ("No available agent to submit job") — seen
    on this 2-core machine with both cores busy. The agent registers itself right after its HTTP
    server starts, so an answer here means a submission will find it.
    """
    url = f"http://127.0.0.1:{port}/api/local_raylet_healthz"
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode} before its job agent came up")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # refused or reset: not listening yet
            pass
        time.sleep(0.2)  # a readiness poll: the condition above decides, not this pause
    pytest.fail(f"the dashboard agent did not answer {url} within {deadline_s:.0f} s")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` in its own temp dir; stopped (with all it started) at the end."""
    import ray

    ray.shutdown()  # this process must not hold another Ray
    temp = tmp_path_factory.mktemp("rayhead")
    port, dash, agent = _free_port(), _free_port(), _free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=2", f"--temp-dir={temp}",
         "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in head.stdout:  # `ray start` prints this line once every process is up
        seen.append(line)
        if "Ray runtime started" in line:
            break
    else:
        pytest.fail("ray start --head did not start:\n" + "".join(seen[-30:]))
    _wait_for_job_agent(agent, head)
    yield f"http://127.0.0.1:{dash}", env
    head.send_signal(signal.SIGTERM)
    head.wait(timeout=120)


def test_ray_job_submit_runs_the_example(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "job-out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           sys.executable, "examples/recover_on_cluster.py", "--out", str(out), "--arch", "8-2-1",
           "--n-students", "4", "--queries", "1000"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs  # the job's final status, as `ray job submit` reports it
    assert "recovered [2] (teacher [2])" in logs  # the driver's own output, streamed back
    result = ecdist.load(out)
    assert result.layer_sizes == [2]
    assert result.plan["backend"] == "ray" and result.plan["ray_started_here"] is False  # the cluster, as is
    assert len(result.plan["pack_nodes"]) == 2 and all(result.plan["pack_nodes"])
    assert max(result.comparison.max_weight_distance) < 1e-6
