"""The HTTP API with real requests on loopback: jobs, progress, cancel, full queue, errors, fuzzed payloads, the CLI."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES

pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

import http_client  # noqa: E402
from framegraph.runtime.engine import Engine  # noqa: E402
from http_client import Client, frames_of  # noqa: E402

IMAGE = (FIXTURES / "svd-tiny" / "input.png").read_bytes()
MAX_BODY = 64 * 1024
TIMEOUT = 30
LONG = "1000"  # steps of a job that is only ever cancelled


# -- a real server on 127.0.0.1 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(svd_artifact):
    with Engine(svd_artifact, workers=2, max_queue=4, num_threads=1) as e:  # tiny graphs: threads only cost
        yield e


def serving(engine):
    """uvicorn serving ``engine`` on 127.0.0.1 with a small body limit; yields a Client uploading the fixture image."""
    return http_client.serving(engine, IMAGE, max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def client(engine):
    with serving(engine) as c:
        yield c


@pytest.fixture(autouse=True)
def clean(client):
    """Cancel whatever a test left queued or running, so the next one starts with free workers."""
    yield
    _, _, jobs = client.json("GET", "/jobs")
    for job in jobs:
        if job["state"] in ("queued", "running"):
            client.request("DELETE", f"/jobs/{job['id']}")
            client.wait(job["id"])


# -- jobs --------------------------------------------------------------------------------------------------------------
REQUESTS = [
    [("num_frames", 2), ("num_inference_steps", 2), ("seed", 11)],
    [("num_frames", 3), ("num_inference_steps", 2), ("seed", 12), ("decode_chunk_size", 1)],
    [("num_frames", 3), ("num_inference_steps", 1), ("seed", 13), ("fps", 4)],
    [("num_frames", 2), ("num_inference_steps", 2), ("seed", 11), ("motion_bucket_id", 40)],
]


def test_concurrent_http_jobs_equal_sequential_ones(client, engine, tmp_path):
    def run(fields):
        status, headers, body = client.post_job(fields)
        assert status == 202, body
        assert headers["location"] == f"/jobs/{body['id']}"
        assert client.wait(body["id"])["state"] == "done"
        return client.video(body["id"])

    sequential = [run(fields) for fields in REQUESTS]
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        concurrent_ = list(pool.map(run, REQUESTS))
    for i, (a, b) in enumerate(zip(sequential, concurrent_)):
        assert np.array_equal(frames_of(a, tmp_path), frames_of(b, tmp_path)), f"request {i} differs when concurrent"
    frames = frames_of(sequential[1], tmp_path)
    assert frames.shape == (3, 32, 32, 3)


def test_status_reports_progress_and_the_seed(client):
    status, _, body = client.post_job([("num_frames", 3), ("num_inference_steps", 3), ("decode_chunk_size", 1)])
    assert status == 202 and body["state"] in ("queued", "running")
    seen = set()
    while body["state"] not in ("done", "failed"):
        body = client.json("GET", f"/jobs/{body['id']}")[2]
        seen.add((body["step"], body["decode_chunk"]))
    assert body["state"] == "done"
    assert (body["step"], body["num_steps"], body["decode_chunk"], body["num_decode_chunks"]) == (3, 3, 3, 3)
    assert isinstance(body["seed"], int) and body["arguments"]["num_frames"] == 3
    assert body["replica"] == f"{socket.gethostname()}:{os.getpid()}"  # the process that ran it
    assert all(step <= 3 and (chunk == 0 or step == 3) for step, chunk in seen)  # decoding follows denoising


def test_events_stream_once_per_step_and_decode_chunk(client):
    _, _, job = client.post_job([("num_frames", 3), ("num_inference_steps", 3), ("decode_chunk_size", 1)])
    status, headers, body = client.request("GET", f"/jobs/{job['id']}/events")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block.split("\n") for block in body.decode().strip().split("\n\n")]
    kinds = [(lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))) for lines in events]
    assert [(k, d.get("step", d.get("decode_chunk"))) for k, d in kinds[:-1]] == [
        ("denoise", 1), ("denoise", 2), ("denoise", 3), ("decode", 1), ("decode", 2), ("decode", 3)]
    assert kinds[-1][0] == "end" and kinds[-1][1]["state"] == "done"


def test_delete_cancels_within_one_step_and_others_finish(client, engine):
    _, _, long_job = client.post_job([("num_inference_steps", LONG)])
    _, _, other = client.post_job([("num_inference_steps", 2), ("seed", 5)])
    while client.json("GET", f"/jobs/{long_job['id']}")[2]["step"] < 1:
        time.sleep(0.02)
    status, _, cancelled = client.json("DELETE", f"/jobs/{long_job['id']}")
    assert status == 202 and cancelled["cancel_requested"]
    final = client.wait(long_job["id"])
    assert final["state"] == "cancelled" and final["step"] <= cancelled["step"] + 1
    assert client.json("GET", f"/jobs/{long_job['id']}/video")[0] == 410
    assert client.wait(other["id"])["state"] == "done"
    assert client.video(other["id"])[4:8] == b"ftyp"
    status, _, gone = client.json("DELETE", f"/jobs/{other['id']}")  # a finished job is forgotten
    assert status == 200 and gone["discarded"]
    assert client.json("GET", f"/jobs/{other['id']}")[0] == 404


def test_full_queue_is_refused_with_429(client, engine):
    running = [client.post_job([("num_inference_steps", LONG)])[2]["id"] for _ in range(2)]
    for job_id in running:
        client.wait(job_id, until=("running",))
    queued = [client.post_job([("num_inference_steps", LONG)]) for _ in range(4)]
    assert [q[0] for q in queued] == [202] * 4 and queued[3][2]["queue_position"] == 3
    status, headers, body = client.post_job([("num_inference_steps", "1")])
    assert status == 429 and int(headers["retry-after"]) > 0
    assert "queue is full" in body["error"]
    status, _, cancelled = client.json("DELETE", f"/jobs/{queued[0][2]['id']}")
    assert status == 202 and cancelled["state"] == "cancelled"  # a queued job is cancelled at once


def test_video_before_done_is_409(client):
    _, _, job = client.post_job([("num_inference_steps", LONG)])
    status, _, body = client.json("GET", f"/jobs/{job['id']}/video")
    assert status == 409 and "poll GET /jobs/" in body["error"]


# -- errors ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, files, code, field, message", [
    ([("num_frames", 5)], None, 422, "num_frames", "num_frames=5 has no exported bucket; available: 2, 3"),
    ([("num_inference_steps", "many")], None, 422, "num_inference_steps", "must be an integer"),
    ([("motion_bucket_id", "2000")], None, 422, "motion_bucket_id", "out of range"),
    ([("noise_aug_strength", "nan")], None, 422, "noise_aug_strength", "finite"),
    ([("strength", "1")], None, 422, "strength", "unknown argument 'strength'"),
    ([("cache_interval", "2")], None, 422, "cache_interval", "svd-export --cache-branch"),
    ([("cache_interval", "0")], None, 422, "cache_interval", "out of range"),
    ([("output_type", "latent")], None, 422, "output_type", "unknown argument"),
    ([("seed", "1"), ("seed", "2")], None, 422, "seed", "given twice"),
    ([("image", "/etc/passwd")], (), 422, "image", "uploaded as a file part"),
    ([], (), 422, "image", "image is required"),
    ([], [("image", "x.png", b"\x89PNG\r\n\x1a\nbroken")], 422, "image", "could not be decoded"),
    ([], [("seed", "seed.txt", b"1")], 422, "seed", "not a file"),
    ([], [("image", "big.png", b"\0" * (MAX_BODY + 1))], 413, None, "over the limit"),
])
def test_bad_requests_get_clear_4xx(client, fields, files, code, field, message):
    status, _, body = client.post_job(fields, **({} if files is None else {"files": files}))
    assert status == code and body["field"] == field and message in body["error"], body


@pytest.mark.parametrize("method, path, body, headers, code, message", [
    ("POST", "/jobs", b'{"image": "x"}', {"Content-Type": "application/json"}, 415, "multipart/form-data"),
    ("POST", "/jobs", b"--x\r\ngarbage", {"Content-Type": "multipart/form-data; boundary=x"}, 422, "image"),
    ("POST", "/jobs", b"abc", {"Content-Type": "multipart/form-data"}, 400, "malformed multipart"),
    ("GET", "/jobs/0123", None, {}, 404, "no job '0123'"),
    ("DELETE", "/jobs/0123", None, {}, 404, "no job"),
    ("GET", "/nowhere", None, {}, 404, "Not Found"),
    ("PUT", "/jobs", b"", {}, 405, "Method Not Allowed"),
])
def test_bad_http_gets_clear_4xx(client, method, path, body, headers, code, message):
    status, _, data = client.json(method, path, body, headers)
    assert status == code and message in data["error"], data


def test_info_and_health(client):
    status, _, info = client.json("GET", "/info")
    assert status == 200 and info["pipeline"] == "stable-video-diffusion"
    names = {a["name"] for a in info["arguments"]}
    assert {"image", "num_frames", "seed"} <= names and "latents" not in names
    assert client.json("GET", "/health")[2]["status"] == "ok"


# -- fuzzing -----------------------------------------------------------------------------------------------------------
JUNK = st.one_of(st.text(max_size=12), st.floats().map(str), st.integers(-2**70, 2**70).map(str),
                 st.sampled_from(["", " 2 ", "1e309", "-0", "0x10", "true", "None", "[1]"]))


def _text(valid):
    """Form text: mostly a valid value (7 in 8; the simplest draw, so hypothesis starts there), else junk."""
    return st.integers(0, 7).flatmap(lambda pick: JUNK if pick == 7 else valid.map(str))


FIELDS = st.fixed_dictionaries({}, optional={
    "num_frames": _text(st.sampled_from([2, 3, 3, 4])),
    "fps": _text(st.integers(0, 30)),
    "seed": _text(st.integers(-1, 2**40)),
    "height": _text(st.sampled_from([32, 32, 32, 64])),
    "decode_chunk_size": _text(st.integers(0, 3)),
    "motion_bucket_id": _text(st.integers(-1, 1024)),
    "noise_aug_strength": _text(st.floats(-0.5, 10.5)),
    "max_guidance_scale": _text(st.floats(0, 5)),
}).map(lambda d: list(d.items()))
EXTRA = st.integers(0, 7).flatmap(  # now and then a field HTTP does not take, or one given twice
    lambda pick: st.sampled_from([[("latents", "0")], [("bogus", "1")], [("fps", "7"), ("fps", "7")]]) if pick == 7
    else st.just([]))
IMAGES = st.integers(0, 7).flatmap(
    lambda pick: st.binary(max_size=48) if pick == 7 else st.just(IMAGE[:300] if pick == 6 else IMAGE))
FILES = st.integers(0, 7).map(  # mostly one image part; else none, two, or a file where a field belongs
    lambda pick: {5: [], 6: [("image", "a"), ("image", "b")], 7: [("seed", "s")]}.get(pick, [("image", "x.png")])
).flatmap(lambda names: st.tuples(*[IMAGES.map(lambda data, n=n: (n[0], n[1], data)) for n in names]).map(list))
CONTENT_TYPES = st.sampled_from([None, "multipart/form-data", "text/plain", "multipart/form-data; boundary=",
                                 "multipart/form-data; boundary=zz", "application/x-www-form-urlencoded"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(fields=st.tuples(FIELDS, EXTRA).map(lambda t: t[0] + t[1]), files=FILES,
       raw=st.integers(0, 7).flatmap(  # now and then a raw body of any content type
           lambda pick: st.tuples(CONTENT_TYPES, st.binary(max_size=96)) if pick == 7 else st.none()))
def test_fuzzed_payloads_never_crash_or_hang_the_server(client, fields, files, raw):
    if raw is None:
        status, _, body = client.post_job(fields + [("num_inference_steps", "1")], files)
    else:
        content_type, data = raw
        status, _, body = client.json("POST", "/jobs", data, {"Content-Type": content_type} if content_type else {})
    event(f"{status} {body.get('field')}")
    assert status in (202, 400, 413, 415, 422), body
    assert isinstance(body["id"] if status == 202 else body["error"], str)
    if status == 202:
        client.request("DELETE", f"/jobs/{body['id']}")
        assert client.wait(body["id"])["state"] in ("done", "cancelled")
    assert client.json("GET", "/health")[0] == 200


# -- the CLI -----------------------------------------------------------------------------------------------------------
def test_cli_serve_starts_answers_and_stops(svd_artifact, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "framegraph.runtime.cli", "serve", str(svd_artifact), "--host", "127.0.0.1", "--port",
         str(port), "--no-verify", "--no-warmup"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        client = Client(f"http://127.0.0.1:{port}", IMAGE)
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, health = client.json("GET", "/health")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "framegraph serve did not start"
                time.sleep(0.2)
        assert status == 200 and health["pipeline"] == "stable-video-diffusion"
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output[-2000:]


def test_cli_serve_refuses_a_damaged_artifact(tmp_path, caplog):
    from framegraph.runtime.cli import main

    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    assert main(["serve", str(tmp_path)]) == 2
    assert "schema_version 99 is not supported" in caplog.text and "manifest.json" in caplog.text
