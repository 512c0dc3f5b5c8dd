"""A small HTTP client of the jobs API for the server tests (stdlib only), its multipart bodies, and uvicorn serving
an Engine on 127.0.0.1 in a thread. Shared by the single-process server tests and the Ray Serve test."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid


def multipart(fields, files):
    """A multipart/form-data body: ``fields`` (name, text) and ``files`` (name, filename, bytes); and its
    Content-Type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + str(value).encode() + b"\r\n")
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """Requests to ``base`` (each with ``timeout`` seconds); ``post_job`` uploads ``image`` unless told other files;
    ``wait`` polls a job every ``poll`` seconds."""

    def __init__(self, base, image, timeout=30, poll=0.02):
        self.base, self.image, self.timeout, self.poll = base, image, timeout, poll

    def request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, dict(exc.headers), exc.read()

    def json(self, method, path, body=None, headers=None):
        status, headers, data = self.request(method, path, body, headers)
        return status, headers, json.loads(data)

    def post_job(self, fields=(), files=None):
        files = (("image", "input.png", self.image),) if files is None else files
        body, content_type = multipart(fields, files)
        return self.json("POST", "/jobs", body, {"Content-Type": content_type})

    def wait(self, job_id, until=("done", "failed", "cancelled"), timeout=60, check=None):
        """The job's status once its state is one of ``until`` (and ``check(status)`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.json("GET", f"/jobs/{job_id}")[2]
            if status["state"] in until and (check is None or check(status)):
                return status
            assert time.monotonic() < deadline, f"job {job_id} stuck in {status}"
            time.sleep(self.poll)

    def video(self, job_id):
        """The job's MP4 bytes."""
        status, headers, data = self.request("GET", f"/jobs/{job_id}/video")
        assert status == 200 and headers["content-type"] == "video/mp4", data[:200]
        return data

    def video_frames(self, job_id, tmp_path):
        """The job's video decoded to frames."""
        return frames_of(self.video(job_id), tmp_path)


def frames_of(data, tmp_path):
    """The frames of MP4 bytes (written to ``tmp_path`` first)."""
    from framegraph.runtime.video import read_video_frames

    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(data)
    return read_video_frames(path)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine, image, **app_options):
    """uvicorn serving ``engine`` (``create_app(engine, **app_options)``) on 127.0.0.1, a free port, in a thread;
    yields a Client that uploads ``image``."""
    import uvicorn

    from framegraph.runtime.server import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, **app_options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Client(f"http://127.0.0.1:{sock.getsockname()[1]}", image)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
