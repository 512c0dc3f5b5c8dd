"""Soak and session benchmarks for the framegraph Engine (a script, not a test).

    # 100 sequential generations on one engine; RSS after each (first vs last, growth over the second half)
    python scripts/soak.py soak ARTIFACT --runs 100 [--http]

    # shared sessions vs one set per worker: throughput and memory, each configuration in a fresh process
    python scripts/soak.py sessions ARTIFACT --workers 1 2 --jobs 8

ARTIFACT is an ``svd-export`` folder (e.g. the tiny one: python -m framegraph.export
tests/fixtures/svd-tiny/pipeline --out /tmp/svd-art --frames 2,3 --height 32 --width 32 --decode-chunk-sizes 1,2
--formats onnx). ``--http`` runs the soak through the HTTP API on 127.0.0.1 (multipart upload, MP4 download).
"""

import argparse
import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "tests" / "fixtures" / "svd-tiny" / "input.png"
MIB = 1024 * 1024


def rss_bytes():
    """Resident set size of this process now (not the peak)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _slope(values):
    """Least-squares growth per step of ``values``."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


# -- soak --------------------------------------------------------------------------------------------------------------
def _engine_runner(engine, image, call):
    def run(seed):
        job = engine.submit(image=image, seed=seed, **call)
        frames = engine.result(job, timeout=600)
        engine.discard(job)
        return frames.shape
    return run


def _http_runner(engine, call):
    import socket

    import uvicorn

    from framegraph.runtime.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    data = IMAGE.read_bytes()

    def request(method, path, body=None, headers=None):
        req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=600) as response:
            return response.read()

    def run(seed):
        boundary = uuid.uuid4().hex
        fields = {**call, "seed": seed}
        body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n\r\n'.encode()
                 + data + f"\r\n--{boundary}--\r\n".encode())
        job = json.loads(request("POST", "/jobs", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        while json.loads(request("GET", f"/jobs/{job['id']}"))["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.01)
        video = request("GET", f"/jobs/{job['id']}/video")
        request("DELETE", f"/jobs/{job['id']}")
        return len(video)
    return run, server


def soak(args):
    from PIL import Image

    from framegraph.runtime.engine import Engine

    call = {"num_frames": args.frames, "num_inference_steps": args.steps}
    start = rss_bytes()
    with Engine(args.artifact, workers=1, verify=True) as engine:
        loaded = rss_bytes()
        server = None
        if args.http:
            run, server = _http_runner(engine, call)
        else:
            run = _engine_runner(engine, Image.open(IMAGE).convert("RGB"), call)
        rss, times = [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - t0)
            rss.append(rss_bytes())
            if (i + 1) % 10 == 0:
                logging.info("run %d/%d: RSS %.1f MiB, %.3f s/run", i + 1, args.runs, rss[-1] / MIB, times[-1])
        if server is not None:
            server.should_exit = True
    half = rss[len(rss) // 2:]
    report = {
        "runs": args.runs, "via": "http" if args.http else "engine", "call": call,
        "rss_mib": {"before_load": start / MIB, "after_load_and_warmup": loaded / MIB, "after_first_run": rss[0] / MIB,
                    "after_run_10": rss[min(9, len(rss) - 1)] / MIB, "after_last_run": rss[-1] / MIB,
                    "max": max(rss) / MIB, "min_second_half": min(half) / MIB, "max_second_half": max(half) / MIB},
        "growth_first_to_last_mib": (rss[-1] - rss[0]) / MIB,
        "growth_per_run_second_half_kib": _slope(half) / 1024,
        "seconds_per_run": {"first": times[0], "median": sorted(times)[len(times) // 2], "last": times[-1]},
    }
    print(json.dumps(report, indent=1))
    steady = report["growth_per_run_second_half_kib"] <= args.max_growth_kib
    print(f"RSS first run {rss[0] / MIB:.1f} MiB -> last run {rss[-1] / MIB:.1f} MiB; "
          f"{'steady' if steady else 'GROWING'} ({report['growth_per_run_second_half_kib']:.1f} KiB/run over the "
          f"second half, limit {args.max_growth_kib})")
    return 0 if steady else 1


# -- sessions: shared vs per worker ------------------------------------------------------------------------------------
def sessions_one(args):
    """One configuration, in this (fresh) process: load, warm up, then ``jobs`` requests submitted at once."""
    from PIL import Image

    from framegraph.runtime.engine import Engine

    image = Image.open(IMAGE).convert("RGB")
    options = {"num_threads": args.threads} if args.threads else {}
    base = rss_bytes()
    t0 = time.perf_counter()
    with Engine(args.artifact, workers=args.workers[0], sessions=args.sessions, max_queue=max(args.jobs, 1),
                verify=False, **options) as engine:
        load_s = time.perf_counter() - t0
        loaded = rss_bytes()
        call = {"image": image, "num_frames": args.frames, "num_inference_steps": args.steps}
        engine.generate(seed=0, **call)  # one untimed request
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda seed: engine.generate(seed=seed, **call), range(args.jobs)))
        wall = time.perf_counter() - t0
        peak = rss_bytes()
    print(json.dumps({"sessions": args.sessions, "workers": args.workers[0], "threads": args.threads or "default",
                      "jobs": args.jobs, "wall_s": round(wall, 3), "jobs_per_s": round(args.jobs / wall, 3),
                      "load_and_warmup_s": round(load_s, 2), "rss_after_load_mib": round((loaded - base) / MIB, 1),
                      "rss_after_jobs_mib": round((peak - base) / MIB, 1)}))
    return 0


def sessions(args):
    """Every configuration ``repeat`` times, interleaved (so that machine load drifts hit all alike); medians."""
    configs = [(workers, mode, threads) for workers in args.workers for mode in ("shared", "per_worker")
               for threads in args.thread_counts if not (mode == "per_worker" and workers == 1)]
    runs = {config: [] for config in configs}
    for _ in range(args.repeat):
        for workers, mode, threads in configs:
            command = [sys.executable, __file__, "sessions-one", str(args.artifact), "--sessions", mode,
                       "--workers", str(workers), "--jobs", str(args.jobs), "--steps", str(args.steps),
                       "--frames", str(args.frames)] + (["--threads", str(threads)] if threads else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[(workers, mode, threads)].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[(workers, mode, threads)][-1]), flush=True)
    print(f"\nmedians over {args.repeat} run(s), {args.jobs} jobs of {args.steps} steps, {args.frames} frames, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'workers':>7} {'sessions':>10} {'threads':>7} {'jobs/s':>7} {'load s':>7} {'RSS MiB':>8}")
    for (workers, mode, threads), rows in runs.items():
        def median(key):
            values = sorted(r[key] for r in rows)
            return values[len(values) // 2]
        print(f"{workers:>7} {mode:>10} {threads or 'default':>7} {median('jobs_per_s'):>7.2f} "
              f"{median('load_and_warmup_s'):>7.1f} {median('rss_after_jobs_mib'):>8.0f}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("soak", "sessions", "sessions-one"):
        p = sub.add_parser(name)
        p.add_argument("artifact", type=Path)
        p.add_argument("--steps", type=int, default=2, help="num_inference_steps per request")
        p.add_argument("--frames", type=int, default=2, help="num_frames per request")
    soak_p = sub.choices["soak"]
    soak_p.add_argument("--runs", type=int, default=100)
    soak_p.add_argument("--http", action="store_true", help="go through the HTTP API on 127.0.0.1")
    soak_p.add_argument("--max-growth-kib", type=float, default=64.0,
                        help="fail when RSS grows faster than this per run over the second half")
    for name in ("sessions", "sessions-one"):
        p = sub.choices[name]
        p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
        p.add_argument("--jobs", type=int, default=8, help="requests submitted at once")
    sub.choices["sessions"].add_argument("--repeat", type=int, default=3, help="runs of every configuration")
    sub.choices["sessions"].add_argument("--thread-counts", type=int, nargs="+", default=[0, 1],
                                         help="intra-op threads per session (0: the engine's default)")
    sub.choices["sessions-one"].add_argument("--sessions", choices=("shared", "per_worker"), default="shared")
    sub.choices["sessions-one"].add_argument("--threads", type=int, default=0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command == "soak" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return {"soak": soak, "sessions": sessions, "sessions-one": sessions_one}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
