"""The HTTP server with a text-to-video artifact: the request's fields follow the pipeline kind in the manifest.
(Apart from test_server.py, whose module fixtures serve the SVD artifact.)"""

import pytest

pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")

from conftest import FIXTURES  # noqa: E402
from framegraph.runtime.engine import Engine  # noqa: E402
from http_client import serving  # noqa: E402

IMAGE = (FIXTURES / "svd-tiny" / "input.png").read_bytes()  # sent where this kind takes no image


def test_text_to_video_is_served_with_a_prompt(t2v_artifact):
    with Engine(t2v_artifact, workers=1, warmup=False, num_threads=1) as t2v, serving(t2v, IMAGE) as t2v_client:
        status, _, job = t2v_client.post_job([("prompt", "a red ball"), ("num_inference_steps", "2"), ("seed", "3")],
                                             files=())
        assert status == 202, job
        assert t2v_client.wait(job["id"])["state"] == "done"
        assert t2v_client.video(job["id"])[4:8] == b"ftyp"
        status, _, body = t2v_client.post_job([("prompt", "x")])  # an image is not an argument of this kind
        assert status == 422 and body["field"] == "image" and "prompt" in body["error"]


def test_text_to_video_video_rate_is_the_fps_field_default_8(t2v_artifact):
    with Engine(t2v_artifact, workers=1, warmup=False, num_threads=1) as t2v, serving(t2v, IMAGE) as client:
        rates = []
        for fields in ([], [("fps", "5")]):
            status, _, job = client.post_job([("prompt", "a red ball"), ("num_inference_steps", "1"), *fields],
                                             files=())
            assert status == 202, job
            assert client.wait(job["id"])["state"] == "done"
            rates.append(_video_fps(client, job["id"]))
        assert rates == [8.0, 5.0]
        status, _, body = client.post_job([("prompt", "x"), ("fps", "0")], files=())
        assert status == 422 and body["field"] == "fps"
        status, _, body = client.post_job([("prompt", "x"), ("num_frames", "16")], files=())
        assert status == 422 and body["field"] == "num_frames" and "available: 4" in body["error"]


def _video_fps(client, job_id):
    import tempfile
    from pathlib import Path

    from framegraph.runtime.video import read_video_info

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "v.mp4"
        path.write_bytes(client.video(job_id))
        return read_video_info(path).fps
