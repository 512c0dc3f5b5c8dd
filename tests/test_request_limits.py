"""Request limits: numbers of any size or kind are a 4xx naming the field (never an OverflowError or a 500), and a
refused request's buffers (the upload, the decoded image) are freed by reference counting at once, not by a
garbage collection later.

The parsing tests need no artifact; the engine and HTTP tests serve the tiny SVD artifact that ships in the package
(no export). HTTP requests go straight to the ASGI app in this process (what Starlette's TestClient does), so that
the memory the server keeps can be measured.
"""

import asyncio
import gc
import io
import logging
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from framegraph.runtime import params as params_module
from framegraph.runtime.params import InvalidRequestError, Param, decode_image, parse_arguments
from http_client import multipart

NUM_FRAMES = Param("num_frames", "int", minimum=1, maximum=1024)
SEED = Param("seed", "int", minimum=0, maximum=2**63 - 1)
STRENGTH = Param("noise_aug_strength", "float", minimum=0.0, maximum=10.0)
UNBOUNDED = Param("scale", "float")
OUTPUT = Param("output_type", "choice", choices=("np", "pil"))
LATENTS = Param("latents", "array")
HUGE = 10**400  # float(HUGE) and math.isfinite(HUGE) raise OverflowError
ENORMOUS = 10**5000  # str(ENORMOUS) raises ValueError (Python's 4300-digit limit)
MAX_NUMBER_TEXT = 64  # params.MAX_NUMBER_TEXT: longer numeric text is refused before int() or float()


def _id(value):
    """A short test id (pytest's own would be str(value): thousands of digits, or a ValueError)."""
    if isinstance(value, Param):
        return value.name
    if isinstance(value, int) and abs(value).bit_length() > 64:
        return f"{'-' if value < 0 else ''}int of {abs(value).bit_length()} bits"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 16 else f"{text[:8]}...({len(text)} chars)"


# -- Param.parse ----------------------------------------------------------------------------------------------------
REFUSED_NUMBERS = [
    (NUM_FRAMES, "9" * 400, f"num_frames must be an integer of at most {MAX_NUMBER_TEXT} characters, got 400"),
    (NUM_FRAMES, "9" * 5000, "at most 64 characters, got 5000"),  # int() itself would refuse it (4300 digits)
    (NUM_FRAMES, "1" * (MAX_NUMBER_TEXT + 1), "at most 64 characters"),
    (NUM_FRAMES, "-" + "9" * 400, "at most 64 characters"),
    (NUM_FRAMES, HUGE, "num_frames=<an integer of about 401 digits> is out of range; it must be in [1, 1024]"),
    (NUM_FRAMES, -HUGE, "num_frames=-<an integer of about 401 digits> is out of range"),
    (NUM_FRAMES, ENORMOUS, "num_frames=<an integer of about 5001 digits> is out of range"),
    (NUM_FRAMES, np.uint64(2**64 - 1), "out of range"),
    (NUM_FRAMES, 1e300, "num_frames=<an integer of about 301 digits> is out of range"),
    (NUM_FRAMES, float("inf"), "num_frames must be an integer, got float inf"),
    (NUM_FRAMES, "1e400", "num_frames must be an integer, got '1e400'"),
    (NUM_FRAMES, "1_000", "plain ASCII decimal digits"),
    (NUM_FRAMES, "\uff11\uff12", "plain ASCII decimal digits"),  # full-width digits, which int() takes
    (SEED, HUGE, "seed=<an integer of about 401 digits> is out of range"),
    (STRENGTH, HUGE, "noise_aug_strength=<an integer of about 401 digits> is out of range; it must be in [0.0, "),
    (STRENGTH, ENORMOUS, "out of range"),
    (STRENGTH, "9" * 400, "noise_aug_strength must be a number of at most 64 characters"),
    (STRENGTH, "nan", "noise_aug_strength must be a finite number in [0.0, 10.0], got nan"),
    (STRENGTH, "inf", "finite number"),
    (STRENGTH, "-Infinity", "finite number"),
    (STRENGTH, "1e400", "finite number"),  # float("1e400") is inf
    (STRENGTH, float("nan"), "finite number"),
    (STRENGTH, np.float64("-inf"), "finite number"),
    (STRENGTH, np.longdouble("1e4000"), "finite number"),  # beyond the float range: inf once a float
    (STRENGTH, 1e300, "out of range"),
    (UNBOUNDED, HUGE, "scale=<an integer of about 401 digits> is beyond the float range"),
    (UNBOUNDED, "1e400", "finite number"),
    (OUTPUT, ENORMOUS, "output_type must be one of ['np', 'pil'], got '<an integer of about 5001 digits>'"),
    (LATENTS, [HUGE], "latents must be an array of finite float32 numbers"),
    (LATENTS, [1e300], "latents must be finite"),  # float32 overflow: inf
]


@pytest.mark.parametrize("param, value, message", REFUSED_NUMBERS,
                         ids=[f"{p.name}={_id(v)}" for p, v, _ in REFUSED_NUMBERS])
def test_numbers_of_any_size_are_refused_naming_the_field(param, value, message):
    with pytest.raises(InvalidRequestError) as info:
        param.parse(value)
    assert message in str(info.value) and info.value.field == param.name
    assert len(str(info.value)) < 200, "an error message quotes a whole number"


VALID_NUMBERS = [
    (NUM_FRAMES, " 12 ", 12),
    (NUM_FRAMES, "0" * (MAX_NUMBER_TEXT - 1) + "7", 7),  # the longest text still parsed
    (NUM_FRAMES, np.int64(5), 5),
    (NUM_FRAMES, 3.0, 3),
    (SEED, str(2**63 - 1), 2**63 - 1),
    (STRENGTH, 3, 3.0),
    (STRENGTH, "-0", 0.0),
    (STRENGTH, "2.5e-1", 0.25),
    (STRENGTH, "1e-400", 0.0),
    (UNBOUNDED, 10**300, 1e300),
]


@pytest.mark.parametrize("param, value, want", VALID_NUMBERS, ids=[f"{p.name}={_id(v)}" for p, v, _ in VALID_NUMBERS])
def test_valid_numbers_come_back_in_their_type(param, value, want):
    got = param.parse(value)
    assert got == want and type(got) is type(want)


def test_cheap_arguments_are_checked_before_the_image_is_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(params_module, "decode_image", lambda data: decoded.append(data))
    params = (SEED, Param("image", "image", required=True), NUM_FRAMES, STRENGTH)
    with pytest.raises(InvalidRequestError, match="num_frames") as info:
        parse_arguments(params, {"image": b"\x89PNG...", "num_frames": "9" * 400, "seed": "1"}, "a test")
    assert info.value.field == "num_frames" and not decoded
    parsed = parse_arguments(params, {"noise_aug_strength": "1", "image": b"png", "seed": "2"}, "a test")
    assert list(parsed) == ["seed", "image", "noise_aug_strength"] and decoded == [b"png"]  # in declaration order


def test_an_undecodable_image_is_refused_without_the_decoders_exception():
    with pytest.raises(InvalidRequestError, match="image could not be decoded") as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
    # no chained exception: the decoder's traceback holds the frames that hold the bytes
    assert info.value.__context__ is None and info.value.__cause__ is None and info.value.field == "image"


@pytest.mark.parametrize("data", [b"GIF89a-not-really", b"plain text", b"\x89PNG\r\n\x1a\nbroken"])
def test_image_errors_show_no_object_address(data):
    """PIL's own message for bytes it cannot identify names the in-memory buffer by its address."""
    with pytest.raises(InvalidRequestError) as info:
        decode_image(data)
    assert " at 0x" not in str(info.value) and "send a PNG" in str(info.value)


# -- the engine -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    from framegraph.runtime.demo import DEMO_ARTIFACT
    from framegraph.runtime.engine import Engine

    with Engine(DEMO_ARTIFACT, workers=1, max_queue=2, warmup=False, num_threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def demo_image():
    from framegraph.runtime.demo import DEMO_IMAGE

    return DEMO_IMAGE.read_bytes()


@pytest.mark.parametrize("name, value", [
    ("num_frames", HUGE), ("num_frames", -HUGE), ("num_frames", ENORMOUS), ("num_frames", "9" * 400),
    ("seed", HUGE), ("fps", 1e300), ("noise_aug_strength", HUGE), ("noise_aug_strength", float("inf")),
    ("noise_aug_strength", "1e400"), ("max_guidance_scale", "nan"), ("latents", np.full((2,), 1e300)),
], ids=lambda value: _id(value) if not isinstance(value, str) or len(value) > 16 else value)
def test_engine_submit_refuses_huge_numbers_naming_the_field(engine, demo_image, name, value):
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(image=demo_image, num_inference_steps=1, **{name: value})
    assert info.value.field == name and len(str(info.value)) < 200


# -- HTTP -----------------------------------------------------------------------------------------------------------
async def _post(app, fields, image, on_response=None):
    """POST /jobs to the ASGI ``app``: (status, response body, name of an exception that escaped the app or None).
    The request body is built here and handed over once, so that only the server can keep it alive;
    ``on_response()`` is awaited when the response starts (the server waits for it there)."""
    pending = [multipart(fields, () if image is None else [("image", "x.png", image)])]
    content_type = pending[0][1]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/jobs", "raw_path": b"/jobs", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", content_type.encode()),
                         (b"content-length", str(len(pending[0][0])).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent = []

    async def receive():
        if pending:
            return {"type": "http.request", "body": pending.pop()[0], "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start" and on_response is not None:
            await on_response()
        sent.append(message)

    escaped = None
    try:
        await app(scope, receive, send)
    except Exception as exc:  # Starlette re-raises what its 500 handler answered, for the ASGI server to log
        escaped = type(exc).__name__
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), escaped


@pytest.fixture(scope="module")
def app(engine):
    pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
    from framegraph.runtime.server import create_app

    return create_app(engine)


BAD_NUMBERS = [
    ([("num_frames", "9" * 400)], "num_frames", "at most 64 characters"),
    ([("num_frames", "9" * 64)], "num_frames", "is out of range"),
    ([("seed", "9" * 5000)], "seed", "at most 64 characters"),
    ([("fps", "1e400")], "fps", "must be an integer"),
    ([("noise_aug_strength", "9" * 310)], "noise_aug_strength", "at most 64 characters"),
    ([("noise_aug_strength", "1e400")], "noise_aug_strength", "finite number"),
    ([("min_guidance_scale", "inf")], "min_guidance_scale", "finite number"),
    ([("max_guidance_scale", "nan")], "max_guidance_scale", "finite number"),
    ([("motion_bucket_id", "-" + "9" * 63)], "motion_bucket_id", "out of range"),
]


@pytest.mark.parametrize("fields, field, message", BAD_NUMBERS,
                         ids=[f"{name}={_id(value)}" for ((name, value),), _, _ in BAD_NUMBERS])
def test_http_huge_numbers_are_a_422_naming_the_field_and_log_no_traceback(app, demo_image, caplog, fields, field,
                                                                           message):
    import json

    caplog.set_level(logging.DEBUG)
    status, body, escaped = asyncio.run(_post(app, fields + [("num_inference_steps", "1")], demo_image))
    error = json.loads(body)
    assert (status, error["field"], escaped) == (422, field, None), error
    assert message in error["error"] and len(error["error"]) < 200
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not logged, f"a client error was logged: {logged[0].getMessage()}"


def _big_png():
    """A PNG of noise: about 7 MiB, as large when decoded."""
    pixels = np.random.default_rng(0).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=0)
    return out.getvalue()


MIB = 2**20


async def _held(baseline, settle_s=3.0):
    """The Python memory allocated since ``baseline``: once under a MiB, else after ``settle_s`` (a worker thread
    may still be dropping its last reference to what it returned)."""
    deadline = time.monotonic() + settle_s
    while True:
        held = tracemalloc.get_traced_memory()[0] - baseline
        if held < MIB or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.02)


async def _measure(app, requests, image):
    """Send ``requests`` [(fields, expected)] with ``image`` (once each to warm up, then again measured) with the
    garbage collector off: their (status, escaped exception) pairs, the most memory any held while its response
    started, and what they all left held after."""
    for fields, _ in requests:  # first calls import and cache what every later request reuses
        await _post(app, fields, image)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        at_response = []

        async def measure():
            at_response.append(await _held(baseline))

        got = [(await _post(app, fields, image, measure))[::2] for fields, _ in requests]
        return got, max(at_response), await _held(baseline)
    finally:
        tracemalloc.stop()
        gc.enable()


REFUSED = [
    ([("num_frames", "9" * 400)], (422, None)),  # a huge number: was an OverflowError, a 500
    ([("num_frames", "5")], (422, None)),  # no bucket: refused by the pipeline's check, after the image is decoded
    ([("noise_aug_strength", "nan")], (422, None)),
    ([("seed", "1"), ("bogus", "1")], (422, None)),  # refused while reading the form
    ([("num_inference_steps", "1e400")], (422, None)),
] * 2


def test_refused_uploads_are_freed_at_once_not_by_a_gc(app):
    image = _big_png()
    assert len(image) > 6 * MIB  # one upload left behind is over the limits below
    got, at_response, after = asyncio.run(_measure(app, REFUSED, image))
    assert got == [expected for _, expected in REFUSED]
    assert after < 3 * MIB, f"{after / MIB:.1f} MiB still allocated after {len(REFUSED)} refused requests"
    # freed before the error is even answered: the server keeps no frame or exception that holds the upload
    assert at_response < 3 * MIB, f"a refused request held {at_response / MIB:.1f} MiB while its 422 was sent"


def test_an_internal_error_frees_the_request_too(app, engine, monkeypatch):
    from framegraph.runtime import server

    def fails(pipeline, arguments):
        raise RuntimeError("a bug in a pipeline's check")

    monkeypatch.setattr(engine.spec, "check", fails)  # after the image is decoded, in the worker thread
    monkeypatch.setattr(server.logger, "disabled", True)  # pytest keeps log records, and so their tracebacks
    image = _big_png()
    requests = [([("num_inference_steps", "1")], (500, "RuntimeError"))] * 4
    got, _, after = asyncio.run(_measure(app, requests, image))  # the 500 is answered while its exception is alive
    assert got == [expected for _, expected in requests]
    assert after < 3 * MIB, f"{after / MIB:.1f} MiB still allocated after {len(requests)} failed requests"
