"""``framegraph serve --ray`` against a Ray cluster it did not start (a head with its dashboard and a worker node,
started here as separate processes, loopback only): the CLI joins it with ``--address`` and Ctrl-C removes only its
application; the Serve config file written by ``--serve-config`` is deployed with Ray's own ``serve deploy`` and
Serve's autoscaler adds a replica when jobs queue and removes it when they are gone. Skipped where Ray is not
installed."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray", reason="needs Ray Serve: pip install -e '.[ray]'")
pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
yaml = pytest.importorskip("yaml", reason="needs PyYAML, which Ray installs")

from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE  # noqa: E402
from http_client import Client, free_port  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time on the CI machine's two cores

LONG = "1000"  # steps of a job that is only ever cancelled
STARTUP_S = 120


@pytest.fixture(scope="module")
def existing_cluster():
    """A two-node cluster as an operator would have it running (dashboard on, for ``serve deploy``). Its replicas
    report autoscaling metrics every 0.5 s instead of Serve's 10 s (set before the nodes start: they inherit it)."""
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S")
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    dashboard = free_port()
    nodes = None
    try:
        node = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
        nodes = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": True,
                                                              "dashboard_host": "127.0.0.1",
                                                              "dashboard_port": dashboard})
        nodes.add_node(**node)
        assert nodes.address.startswith("127.0.0.1:"), nodes.address  # loopback only, whatever routes exist
        yield {"address": nodes.address, "dashboard": f"http://127.0.0.1:{dashboard}", "port": free_port()}
    finally:
        if nodes is not None:
            nodes.shutdown()
        if saved is None:
            os.environ.pop("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", None)
        else:
            os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = saved


def framegraph(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "framegraph.runtime.cli", *map(str, args)], **popen)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.25)
    return value


def answering(client):
    """Whether the application answers (Serve's proxy answers 404 for a route not deployed yet or any more)."""
    try:
        return client.request("GET", "/health")[0] == 200
    except OSError:
        return False


def live_replicas(client):
    return len(client.json("GET", "/info")[2]["replicas"])


def test_cli_joins_an_existing_cluster_and_ctrl_c_removes_only_its_application(existing_cluster, tmp_path):
    port = existing_cluster["port"]
    client = Client(f"http://127.0.0.1:{port}", DEMO_IMAGE.read_bytes(), timeout=60, poll=0.05)
    log = open(tmp_path / "serve.log", "w+")
    proc = framegraph("serve", DEMO_ARTIFACT, "--ray", "--address", existing_cluster["address"], "--replicas", 1,
                      "--no-verify", "--port", port, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answering(client) or proc.poll() is not None, STARTUP_S, "the application")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        info = client.json("GET", "/info")[2]
        assert info["threads"] == 1  # the one CPU Ray granted the replica
        _, _, job = client.post_job([("num_frames", 2), ("num_inference_steps", 1), ("seed", 5)])
        assert client.wait(job["id"])["state"] == "done"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "stopping" in (tmp_path / "serve.log").read_text()
    assert not answering(client)  # the application is gone ...
    import ray

    ray.init(address=existing_cluster["address"], log_to_driver=False)
    try:  # ... and the cluster it joined is still up, both nodes alive
        assert sum(node["Alive"] for node in ray.nodes()) == 2
    finally:
        ray.shutdown()


def test_serve_deploy_of_the_written_config_autoscales_on_queue_length(existing_cluster, tmp_path):
    serve_cli = shutil.which("serve")
    assert serve_cli, "Ray's `serve` command is missing: pip install -e '.[ray]'"
    config = tmp_path / "app.yaml"
    port = existing_cluster["port"]
    written = framegraph("serve", DEMO_ARTIFACT, "--ray", "--serve-config", config, "--replicas", 1,
                         "--max-replicas", 2, "--max-queue", 4, "--port", port, "--no-verify",
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert written.wait(60) == 0, written.stdout.read()
    app = yaml.safe_load(config.read_text())
    args = app["applications"][0]["args"]
    assert args["artifact"] == str(DEMO_ARTIFACT.resolve()) and args["max_replicas"] == 2
    args.update(upscale_delay_s=0.5, downscale_delay_s=2.0)  # Serve's reaction times, short for the test
    config.write_text(yaml.safe_dump(app))
    deploy = subprocess.run([serve_cli, "deploy", str(config), "--address", existing_cluster["dashboard"]],
                            capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    client = Client(f"http://127.0.0.1:{port}", DEMO_IMAGE.read_bytes(), timeout=60, poll=0.05)
    try:
        wait_until(lambda: answering(client), STARTUP_S, "the deployed application")
        assert live_replicas(client) == 1
        jobs = [client.post_job([("num_inference_steps", LONG)])[2]["id"] for _ in range(3)]
        # a new replica loads the artifact as the first did: the same time budget (it took over 90 s while another test worker exported)
        wait_until(lambda: live_replicas(client) == 2, STARTUP_S, "a second replica while jobs queue")
        wait_until(lambda: len({s["replica"] for s in (client.json("GET", f"/jobs/{j}")[2] for j in jobs)
                                if s["state"] == "running"}) == 2, 60, "both replicas running a job")
        for job_id in jobs:
            client.request("DELETE", f"/jobs/{job_id}")
        assert {client.wait(job_id)["state"] for job_id in jobs} == {"cancelled"}
        wait_until(lambda: live_replicas(client) == 1, 90, "the idle replica removed")
    finally:
        with contextlib.suppress(Exception):
            subprocess.run([serve_cli, "shutdown", "--address", existing_cluster["dashboard"], "-y"],
                           capture_output=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--replicas", 3, "--max-replicas", 2], "max_replicas (--max-replicas) must be an integer >= replicas (3)"),
    (["--replica-cpus", 0], "replica_cpus (--replica-cpus) must be a number > 0"),
    (["--address", "auto"], "--address does not go with --serve-config"),
    (["--existing"], "exists; pass a new path to --serve-config (an existing file is never replaced)"),
])
def test_serve_config_refusals_name_the_flag_and_replace_nothing(tmp_path, args, message):
    config = tmp_path / "app.yaml"
    if "--existing" in args:
        args = []
        config.write_text("mine")
    proc = framegraph("serve", DEMO_ARTIFACT, "--ray", "--serve-config", config, *args,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.wait(60) == 2 and message in proc.stdout.read()
    assert not config.exists() or config.read_text() == "mine"
