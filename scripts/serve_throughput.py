"""Jobs per minute and p50 / p95 latency of the HTTP API on the demo artifact: the single-process server (1 and 2
engine workers) against Ray Serve with 1 and 2 model replicas (a local Ray instance on 127.0.0.1).

    python scripts/serve_throughput.py --jobs 24 --concurrency 4 --steps 2

Every client thread posts a job, polls it until done and downloads its video; a job's latency runs from its POST to
its video. Ray's figures include the replica startup (open + warm-up), measured separately. Needs the ``ray`` extra.
"""

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid

# before Ray is imported: its processes bind and advertise 127.0.0.1 only, and report no usage
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

logger = logging.getLogger("serve_throughput")
POLL_S = 0.05  # a client's status poll period: each poll is a request through the server under test


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(base, image, fields):
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'.encode()
                 + image + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{base}/jobs", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return json.loads(response.read())["id"]
        except urllib.error.HTTPError as exc:
            if exc.code != 429:
                raise
            time.sleep(0.05)  # a full queue: retry, as a client should


def _get(base, path):
    with urllib.request.urlopen(f"{base}{path}", timeout=60) as response:
        return response.read()


def _one_job(base, image, fields):
    start = time.perf_counter()
    job_id = _post(base, image, fields)
    while True:
        status = json.loads(_get(base, f"/jobs/{job_id}"))
        if status["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(POLL_S)
    if status["state"] != "done":
        raise RuntimeError(f"job {job_id} ended {status['state']}: {status['error']}")
    _get(base, f"/jobs/{job_id}/video")
    return time.perf_counter() - start, status["replica"]


def measure(base, image, jobs, concurrency, fields):
    """``{"jobs_per_min", "p50_s", "p95_s", "replicas"}`` of ``jobs`` jobs from ``concurrency`` client threads."""
    _one_job(base, image, fields)  # first request paths warmed, not counted
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: _one_job(base, image, fields), range(jobs)))
    wall = time.perf_counter() - start
    latencies = sorted(latency for latency, _ in results)
    return {"jobs_per_min": round(jobs / wall * 60, 1), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "replicas": len({replica for _, replica in results})}


@contextlib.contextmanager
def single_process(artifact, workers):
    import uvicorn

    from framegraph.runtime.engine import Engine
    from framegraph.runtime.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with Engine(artifact, workers=workers, max_queue=64, verify=False, num_threads=1) as engine:
        server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per job")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--replicas", default="1,2", help="Ray Serve replica counts to measure")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_IMAGE

    image = DEMO_IMAGE.read_bytes()
    fields = [("num_frames", args.frames), ("num_inference_steps", args.steps), ("seed", 1)]
    rows = []
    for workers in (1, 2):
        with single_process(DEMO_ARTIFACT, workers) as base:
            rows.append({"server": f"single process, {workers} worker(s)",
                         **measure(base, image, args.jobs, args.concurrency, fields)})
            logger.info("%s", rows[-1])

    import ray
    from ray import serve

    from framegraph.runtime.ray_serve import APP_NAME, build_app

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        for replicas in (int(r) for r in args.replicas.split(",")):
            start = time.perf_counter()
            serve.run(build_app(DEMO_ARTIFACT, replicas=replicas, max_queue=64, replica_cpus=args.cpus / replicas,
                                verify=False, num_threads=1), name=APP_NAME, route_prefix="/")
            deploy_s = time.perf_counter() - start
            base = f"http://127.0.0.1:{port}"
            startup = json.loads(_get(base, "/info"))["replica_startup_s"]
            rows.append({"server": f"Ray Serve, {replicas} replica(s)", "deploy_s": round(deploy_s, 1),
                         "replica_startup_s": round(startup, 2),
                         **measure(base, image, args.jobs, args.concurrency, fields)})
            logger.info("%s", rows[-1])
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    header = f"{'server':<30} {'jobs/min':>9} {'p50 s':>7} {'p95 s':>7} {'replicas':>8} {'deploy s':>9}"
    lines = [header] + [f"{r['server']:<30} {r['jobs_per_min']:>9} {r['p50_s']:>7} {r['p95_s']:>7} "
                        f"{r['replicas']:>8} {r.get('deploy_s', '-'):>9}" for r in rows]
    logger.info("%d jobs of %d frames x %d steps, %d client threads:\n%s", args.jobs, args.frames, args.steps,
                args.concurrency, "\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
