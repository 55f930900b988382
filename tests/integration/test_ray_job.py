"""pdserve submitted as a Ray job to a Ray cluster of its own, served, then stopped with `stop_job`.

The cluster is a real head on this machine (`ray start --head --block`, its dashboard on loopback, Ray's token
authentication on with a token of its own), in its own process group and its own temporary folder, so it
neither joins nor disturbs the local Ray that other tests start in this process. The job runs what
deploy/ray/README.md tells an operator to run: the entrypoint `pdserve serve --config config.yaml` with
deploy/ray/runtime_env.yaml, the config being deploy/ray/config.yaml with the tiny model and free loopback
ports, its TLS files those of a throwaway CA. The test waits for the router to announce itself in the job's logs,
sends one request through the SDK over TLS with the token, stops the job and checks that the entrypoint shut down
on SIGTERM (not killed after the grace period) and that every actor of the job is dead.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from pdserve_client import Client, Tls
from tests.conftest import TINY_ENGINE, free_port, poll
from tests.pki import Authority, Pair

pytestmark = pytest.mark.integration

DEPLOY_RAY = Path(__file__).resolve().parents[2] / "deploy" / "ray"
ENTRYPOINT = "pdserve serve --config config.yaml"  # as deploy/ray/README.md submits it
API_TOKEN_ENV, API_TOKEN = "PDSERVE_API_TOKEN", secrets.token_hex(16)


@dataclass
class RayHead:
    process: subprocess.Popen[bytes]
    temp_dir: Path
    dashboard_url: str
    token: str  # the cluster's authentication token (Ray's token authentication, on by default)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def dashboard_answers(head: RayHead) -> bool:
    if head.process.poll() is not None:
        raise AssertionError(f"`ray start --head` exited with {head.process.returncode}")
    request = urllib.request.Request(f"{head.dashboard_url}/api/version", headers=head.headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def processes_of(temp_dir: Path) -> list[psutil.Process]:
    """Processes of the test's Ray cluster: they all name its temporary folder on their command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short folder: Ray's unix sockets live under it, and their paths may not exceed 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="pdserve-ray-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A token of this cluster's own, in its processes' environment: the user's ~/.ray/auth_token is left alone.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # The router's bearer token (the shipped config's `router.auth.token_env`): the job inherits the head's env.
    env[API_TOKEN_ENV] = API_TOKEN
    # The job's entrypoint runs `pdserve` from the PATH of the head's processes.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--port={gcs_port}",
        "--num-cpus=2",
        # One node of both pools: the shipped config places each pool by its custom resource.
        '--resources={"pdserve-prefill": 1, "pdserve-decode": 1}',
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Ports with fixed defaults, which another Ray on this machine may hold.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    log = (temp_dir / "ray-start.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(process, temp_dir, f"http://127.0.0.1:{dashboard_port}", token)
    try:
        poll(lambda: dashboard_answers(head), "the Ray dashboard to answer", timeout=180, period=0.5)
        yield head
    finally:
        # Only this cluster's processes: `ray stop` would stop every Ray on the machine. On SIGTERM the blocking
        # `ray start` stops its processes in order; whatever is left of its process group then gets SIGKILL.
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=90)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()
        leftovers = processes_of(temp_dir)
        for p in leftovers:
            p.kill()
        psutil.wait_procs(leftovers, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_config(folder: Path, tiny_model: Path, server: Pair) -> None:
    """deploy/ray/config.yaml with the tiny model, free ports on loopback and the test's server certificate."""
    config = yaml.safe_load((DEPLOY_RAY / "config.yaml").read_text())
    assert config["ray"]["address"] == "auto"
    config["engine"] = {**config["engine"], "model": str(tiny_model), **TINY_ENGINE}
    config["router"].update(host="127.0.0.1", port=0, http_port=0, metrics_port=0)
    assert set(config["router"]["tls"]) == {"cert_file", "key_file"}  # TLS on, as shipped
    config["router"]["tls"] = {"cert_file": str(server.cert), "key_file": str(server.key)}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def list_actors(head: RayHead, filters: list[tuple[str, str, str]]) -> list[Any]:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=head.dashboard_url, headers=head.headers)
    options = ListApiOptions(filters=filters, detail=True)
    return list(client.list(StateResource.ACTORS, options=options, raise_on_missing_output=True))


def test_shipped_job_config_joins_the_cluster_and_listens_on_every_interface():
    from pdserve.config import load_config

    config = load_config(DEPLOY_RAY / "config.yaml")
    assert config.ray.address == "auto" and config.ray.num_cpus is None
    assert config.router.host == "0.0.0.0" and config.workers.mode == "disaggregated"
    assert config.router.auth.token_env == API_TOKEN_ENV and config.router.max_outstanding > 0
    assert config.router.tls.enabled
    assert config.workers.prefill.resources and config.workers.decode.resources
    env = yaml.safe_load((DEPLOY_RAY / "runtime_env.yaml").read_text())
    assert set(env) == {"env_vars"} and int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30


def test_pdserve_runs_as_a_ray_job_and_stops_cleanly(ray_head, tiny_model, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.headers)
    pki = tmp_path / "pki"  # outside the job's working_dir, as the certificate files are on a real head node
    pki.mkdir()
    authority = Authority(pki, "ca")
    (tmp_path / "job").mkdir()
    job_config(tmp_path / "job", tiny_model, authority.issue("server", server=True))
    runtime_env = yaml.safe_load((DEPLOY_RAY / "runtime_env.yaml").read_text())
    job_id = jobs.submit_job(entrypoint=ENTRYPOINT, runtime_env={**runtime_env, "working_dir": str(tmp_path / "job")})

    def serving_port() -> str | None:
        status = jobs.get_job_status(job_id)
        if status.is_terminal():
            raise AssertionError(f"the job ended ({status}) before serving:\n{jobs.get_job_logs(job_id)[-5000:]}")
        m = re.search(r"serving gRPC on [\d.]+:(\d+)", jobs.get_job_logs(job_id))
        return m.group(1) if m else None

    port = poll(serving_port, "the router to announce its gRPC port in the job's logs", timeout=420)
    assert jobs.get_job_status(job_id) == JobStatus.RUNNING
    with Client(f"127.0.0.1:{port}", token=API_TOKEN, tls=Tls.from_files(authority.pair.cert)) as client:
        done = client.complete([31, 32, 33, 34, 35], max_tokens=4, temperature=0.0, ignore_eos=True, timeout=120)
    assert done.final.finish_reason == "length" and len(done.token_ids) == 4

    # The driver's Ray job id names the actors the job created; its engine instance among them.
    driver_job = jobs.get_job_info(job_id).driver_info.id
    actors = list_actors(ray_head, [("job_id", "=", driver_job)])
    for pool in ("prefill", "decode"):
        assert [a.state for a in actors if a.name.startswith(f"{pool}-0@")] == ["ALIVE"], actors

    assert jobs.stop_job(job_id)
    poll(lambda: jobs.get_job_status(job_id) == JobStatus.STOPPED, "the job to stop", timeout=120)
    supervisor_log = ray_head.temp_dir / "session_latest" / "logs" / "jobs" / f"supervisor-{job_id}.log"
    assert "has been terminated gracefully with SIGTERM" in supervisor_log.read_text()

    def job_actors_dead() -> list[Any] | None:
        actors = list_actors(ray_head, [("job_id", "=", driver_job)])
        return actors if actors and all(a.state == "DEAD" for a in actors) else None

    actors = poll(job_actors_dead, "every actor of the job to be dead", timeout=60)
    instances = [a for a in actors if a.name.startswith(("prefill-0@", "decode-0@"))]
    assert len(instances) == 2, actors
    for instance in instances:  # killed by the router's orderly stop, not reaped because the driver died
        assert "ray.kill" in str(instance.death_cause), instance.death_cause
    alive = list_actors(ray_head, [("state", "=", "ALIVE")])
    assert alive == [], alive
