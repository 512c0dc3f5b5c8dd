"""The Ray Serve deployment on a real local cluster (a head and a worker node process, loopback only): two model
replicas of the demo artifact behind the single-process server's HTTP API. Skipped where Ray is not installed."""

import concurrent.futures
import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("ray", reason="needs Ray Serve: pip install -e '.[ray]'")
pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE  # noqa: E402
from http_client import Client, free_port, serving  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time on the CI machine's two cores
IMAGE = DEMO_IMAGE.read_bytes()
TIMEOUT = 60
LONG = "1000"  # steps of a job that is only ever cancelled or killed
MAX_QUEUE = 2
REPLICA_TIMEOUT_S = 6.0  # short for the test; long enough for a replica starved of CPU by other tests
ENGINE = {"verify": False, "num_threads": 1}  # tiny graphs: intra-op threads only cost


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node (one CPU each: one model replica per node), Serve's proxy on 127.0.0.1."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from framegraph.runtime.ray_serve import APP_NAME, build_app

    nodes = None
    try:
        start = time.perf_counter()
        node = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}
        nodes = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        nodes.add_node(**node)
        assert nodes.address.startswith("127.0.0.1:"), nodes.address
        ray.init(address=nodes.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(build_app(DEMO_ARTIFACT, replicas=2, max_queue=MAX_QUEUE, replica_timeout_s=REPLICA_TIMEOUT_S,
                            **ENGINE), name=APP_NAME, route_prefix="/")
        print(f"cluster up and application deployed in {time.perf_counter() - start:.1f} s")
        yield Client(f"http://127.0.0.1:{port}", IMAGE, timeout=TIMEOUT, poll=0.05)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if nodes is not None:
            nodes.shutdown()


@pytest.fixture(autouse=True)
def clean(cluster):
    """Cancel whatever a test left queued or running, so the next one starts with idle replicas."""
    yield
    for job in cluster.json("GET", "/jobs")[2]:
        if job["state"] in ("queued", "running"):
            cluster.request("DELETE", f"/jobs/{job['id']}")
            cluster.wait(job["id"])


@contextlib.contextmanager
def single_process_server():
    """The single-process server (runtime/server.py) over the same artifact, on 127.0.0.1."""
    from framegraph.runtime.engine import Engine

    with Engine(DEMO_ARTIFACT, workers=1, **ENGINE) as engine, serving(engine, IMAGE) as client:
        yield client


REQUESTS = [[("num_frames", 2), ("num_inference_steps", 2), ("seed", seed)] for seed in (11, 12, 13)] + [
    [("num_frames", 4), ("num_inference_steps", 1), ("seed", 14), ("decode_chunk_size", 2), ("fps", 4)]]


def test_both_replicas_serve_and_frames_equal_the_single_process_servers(cluster, tmp_path):
    def run(client, fields):
        status, headers, body = client.post_job(fields)
        while status == 429:  # four at once overfill the queue of two until the replicas pull: retry, as told
            time.sleep(float(headers["retry-after"]) / 10)
            status, headers, body = client.post_job(fields)
        assert status == 202 and headers["location"] == f"/jobs/{body['id']}", body
        final = client.wait(body["id"])
        assert final["state"] == "done", final
        return final, client.video_frames(body["id"], tmp_path)

    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        on_cluster = list(pool.map(lambda fields: run(cluster, fields), REQUESTS))
    with single_process_server() as single:
        alone = [run(single, fields) for fields in REQUESTS]
    assert len({status["replica"] for status, _ in on_cluster}) == 2, [s["replica"] for s, _ in on_cluster]
    assert len({status["replica"] for status, _ in alone}) == 1 and ":" in alone[0][0]["replica"]
    for (status, frames), (_, reference) in zip(on_cluster, alone):
        assert np.array_equal(frames, reference), f"seed {status['seed']}: frames differ from the single process"
    assert on_cluster[3][1].shape == (4, 32, 32, 3)


def test_errors_are_the_single_process_servers(cluster):
    status, _, body = cluster.post_job([("num_frames", 5)])
    assert status == 422 and body["field"] == "num_frames" and "no exported bucket" in body["error"], body
    assert cluster.json("GET", "/jobs/0123")[0] == 404
    status, _, body = cluster.json("POST", "/jobs", b"{}", {"Content-Type": "application/json"})
    assert status == 415 and "multipart/form-data" in body["error"]
    status, _, info = cluster.json("GET", "/info")
    assert status == 200 and info["pipeline"] == "stable-video-diffusion" and len(info["replicas"]) == 2
    assert cluster.json("GET", "/health")[2]["status"] == "ok"


def test_progress_events_arrive_from_the_replica(cluster):
    code, _, job = cluster.post_job([("num_frames", 4), ("num_inference_steps", 3), ("decode_chunk_size", 2)])
    assert code == 202, job
    status, headers, body = cluster.request("GET", f"/jobs/{job['id']}/events")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in body.decode().strip().split("\n\n")]
    kinds = [(lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))) for lines in events]
    assert [(k, d.get("step", d.get("decode_chunk"))) for k, d in kinds[:-1]] == [
        ("denoise", 1), ("denoise", 2), ("denoise", 3), ("decode", 1), ("decode", 2)]
    assert kinds[-1][0] == "end" and kinds[-1][1]["state"] == "done" and kinds[-1][1]["replica"]


def test_cancel_reaches_the_replica(cluster):
    _, _, job = cluster.post_job([("num_inference_steps", LONG)])
    running = cluster.wait(job["id"], until=("running",), check=lambda s: s["step"] >= 1)
    status, _, cancelled = cluster.json("DELETE", f"/jobs/{job['id']}")
    assert status == 202 and cancelled["cancel_requested"]
    final = cluster.wait(job["id"])
    assert final["state"] == "cancelled" and final["replica"] == running["replica"]
    assert final["step"] < int(LONG)
    assert cluster.json("GET", f"/jobs/{job['id']}/video")[0] == 410


def test_full_queue_is_refused_with_429(cluster):
    running = [cluster.post_job([("num_inference_steps", LONG)])[2]["id"] for _ in range(2)]
    for job_id in running:
        cluster.wait(job_id, until=("running",))
    queued = [cluster.post_job([("num_inference_steps", LONG)]) for _ in range(MAX_QUEUE)]
    assert [q[0] for q in queued] == [202] * MAX_QUEUE and queued[-1][2]["queue_position"] == MAX_QUEUE - 1
    status, headers, body = cluster.post_job([("num_inference_steps", "1")])
    assert status == 429 and int(headers["retry-after"]) > 0 and "queue is full" in body["error"]
    status, _, cancelled = cluster.json("DELETE", f"/jobs/{queued[0][2]['id']}")
    assert status == 202 and cancelled["state"] == "cancelled"  # a queued job is cancelled at once


def test_a_killed_replica_fails_its_job_and_the_other_keeps_serving(cluster):
    jobs = [cluster.post_job([("num_inference_steps", LONG)])[2]["id"] for _ in range(2)]
    statuses = [cluster.wait(job_id, until=("running",), check=lambda s: s["step"] >= 1) for job_id in jobs]
    victim, survivor = statuses
    assert victim["replica"] != survivor["replica"]
    os.kill(int(victim["replica"].rsplit(":", 1)[1]), signal.SIGKILL)  # the replica process Ray started for us
    failed = cluster.wait(victim["id"], timeout=REPLICA_TIMEOUT_S + 30)
    assert failed["state"] == "failed" and "ReplicaLost" in failed["error"] and victim["replica"] in failed["error"]
    assert cluster.json("GET", f"/jobs/{survivor['id']}")[2]["state"] == "running"
    cluster.request("DELETE", f"/jobs/{survivor['id']}")
    assert cluster.wait(survivor["id"])["state"] == "cancelled"
    _, _, job = cluster.post_job([("num_inference_steps", "1"), ("seed", 3)])
    assert cluster.wait(job["id"])["state"] == "done"
