"""Engine: concurrent jobs equal sequential runs; progress, cancel, bounded queue; artifact integrity; fuzzing."""

import gc
import json
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import FIXTURES
from framegraph.runtime.engine import (
    Engine,
    EngineClosedError,
    InvalidRequestError,
    JobCancelledError,
    JobFailedError,
    QueueFullError,
    UnknownJobError,
)
from framegraph.runtime.manifest import ArtifactError

LONG = 1000  # steps of a job that is only ever cancelled


@pytest.fixture(scope="module")
def image():
    return Image.open(FIXTURES / "svd-tiny" / "input.png").convert("RGB")


@pytest.fixture(scope="module")
def engine(svd_artifact):
    with Engine(svd_artifact, workers=2, max_queue=4, num_threads=1) as e:  # tiny graphs: threads only cost
        yield e


@pytest.fixture(scope="module")
def reference(engine):
    """The plain pipeline (on the engine's already opened graphs), run one call at a time."""
    from framegraph.runtime import StableVideoDiffusionPipeline
    from framegraph.runtime.schedulers import load_scheduler

    artifact = engine.pipeline.artifact
    pipe = StableVideoDiffusionPipeline(artifact, load_scheduler(artifact.manifest.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hold(release):
    """An on_progress listener that keeps its worker busy until ``release`` is set (a deterministic busy job)."""
    def listener(job_id, kind, count):
        release.wait(30)
    return listener


def _wait_running(engine, job, timeout=30):
    deadline = time.monotonic() + timeout
    while engine.status(job)["state"] == "queued":
        assert time.monotonic() < deadline, f"job {job} did not start"
        time.sleep(0.01)


# -- results ---------------------------------------------------------------------------------------------------------
REQUESTS = [
    {"num_frames": 2, "num_inference_steps": 2, "seed": 1},
    {"num_frames": 3, "num_inference_steps": 2, "seed": 2, "decode_chunk_size": 1},
    {"num_frames": 3, "num_inference_steps": 3, "seed": 3, "max_guidance_scale": 1.0},
    {"num_frames": 2, "num_inference_steps": 2, "seed": 1, "motion_bucket_id": 30, "fps": 5},
]


def test_concurrent_requests_equal_sequential_runs(engine, reference, image):
    expected = []
    for request in REQUESTS:
        call = {k: v for k, v in request.items() if k != "seed"}
        call.setdefault("decode_chunk_size", 2 if call["num_frames"] == 3 else None)
        expected.append(reference(image, generator=request["seed"], output_type="np", **call).frames)
    results = [None] * len(REQUESTS)

    def client(i):
        results[i] = engine.generate(image=image, timeout=60, **REQUESTS[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got is not None and np.array_equal(got, want), f"request {i} differs from its sequential run"


def test_seed_is_drawn_reported_and_reproducible(engine, image):
    first = engine.submit(image=image, num_inference_steps=1)
    frames = engine.result(first, timeout=30)
    seed = engine.status(first)["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**53
    assert np.array_equal(engine.generate(image=image, num_inference_steps=1, seed=seed, timeout=30), frames)


def test_progress_once_per_step_and_decode_chunk(engine, image):
    events = []
    job = engine.submit(image=image, num_frames=3, num_inference_steps=3, decode_chunk_size=1, seed=0,
                        on_progress=lambda job_id, kind, count: events.append((kind, count)))
    engine.result(job, timeout=30)
    assert events == [("denoise", 1), ("denoise", 2), ("denoise", 3), ("decode", 1), ("decode", 2), ("decode", 3)]
    status = engine.status(job)
    assert (status["state"], status["step"], status["num_steps"]) == ("done", 3, 3)
    assert (status["decode_chunk"], status["num_decode_chunks"]) == (3, 3)

    latent = []
    job = engine.submit(image=image, num_frames=2, num_inference_steps=2, output_type="latent", seed=0,
                        on_progress=lambda job_id, kind, count: latent.append(kind))
    assert engine.result(job, timeout=30).shape == (1, 2, 4, 16, 16)
    assert latent == ["denoise", "denoise"] and engine.status(job)["num_decode_chunks"] == 0


# -- cancellation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("at", [("denoise", 2), ("decode", 1)])
def test_cancel_takes_effect_at_the_next_step_or_chunk(engine, image, at):
    def listener(job_id, kind, count):
        if (kind, count) == at:
            engine.cancel(job_id)

    steps = 4 if at[0] == "denoise" else 1
    job = engine.submit(image=image, num_frames=3, decode_chunk_size=1, num_inference_steps=steps, seed=0,
                        on_progress=listener)
    with pytest.raises(JobCancelledError, match="cancelled"):
        engine.result(job, timeout=30)
    status = engine.status(job)
    assert status["state"] == "cancelled"
    assert (status["step"], status["decode_chunk"]) == ((2, 0) if at[0] == "denoise" else (1, 1))


def test_cancel_running_job_leaves_the_other_unaffected_and_frees_its_inputs(engine, reference, image):
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    latents = np.random.default_rng(0).standard_normal((1, 2, 4, 16, 16)).astype(np.float32)
    refs = [weakref.ref(pixels), weakref.ref(latents)]
    started = threading.Event()
    long_job = engine.submit(image=pixels, latents=latents, num_inference_steps=LONG, seed=0,
                             on_progress=lambda *a: started.set())
    del pixels, latents
    other = engine.submit(image=image, num_frames=3, num_inference_steps=2, seed=9)
    assert started.wait(30)
    cancelled_at = engine.cancel(long_job)["step"]
    with pytest.raises(JobCancelledError):
        engine.result(long_job, timeout=30)
    assert engine.status(long_job)["step"] <= cancelled_at + 1
    want = reference(image, num_frames=3, num_inference_steps=2, generator=9, decode_chunk_size=2,
                     output_type="np").frames
    assert np.array_equal(engine.result(other, timeout=30), want)
    gc.collect()
    assert all(r() is None for r in refs), "a cancelled job still holds its input arrays"


def test_cancel_queued_job_and_full_queue(engine, image):
    release = threading.Event()
    busy = [engine.submit(image=image, num_inference_steps=2, seed=0, on_progress=_hold(release)) for _ in range(2)]
    try:
        for job in busy:
            _wait_running(engine, job)
        queued = [engine.submit(image=image, num_inference_steps=1, seed=i) for i in range(4)]
        with pytest.raises(QueueFullError, match="queue is full .*max_queue"):
            engine.submit(image=image, num_inference_steps=1, seed=5)
        assert engine.status(queued[1])["queue_position"] == 1
        status = engine.cancel(queued[1])
        assert status["state"] == "cancelled" and status["step"] == 0
        engine.submit(image=image, num_inference_steps=1, seed=6)  # the cancelled job's place is free again
    finally:
        release.set()
    for job in busy + queued[::2]:
        assert engine.wait(job, timeout=30)["state"] == "done"


def test_failed_job_reports_its_error_and_the_worker_survives(engine, image):
    job = engine.submit(image=image, num_inference_steps=1, latents=np.zeros((1, 2, 4, 8, 8), np.float32))
    with pytest.raises(JobFailedError, match="latents must have shape"):
        engine.result(job, timeout=30)
    assert engine.status(job)["state"] == "failed"
    assert engine.generate(image=image, num_inference_steps=1, seed=0, timeout=30).shape == (1, 2, 32, 32, 3)


def test_unknown_and_discarded_jobs(engine, image):
    with pytest.raises(UnknownJobError, match="never submitted"):
        engine.status("no-such-job")
    job = engine.submit(image=image, num_inference_steps=1, seed=0)
    engine.wait(job, timeout=30)
    engine.discard(job)
    with pytest.raises(UnknownJobError):
        engine.result(job)


@pytest.mark.parametrize("arguments, field, message", [
    ({"num_frames": 5}, "num_frames", "num_frames=5 has no exported bucket"),
    ({"num_inference_steps": 0}, "num_inference_steps", "out of range"),
    ({"fps": "seven"}, "fps", "must be an integer"),
    ({"motion_bucket_id": True}, "motion_bucket_id", "got a bool"),
    ({"max_guidance_scale": float("nan")}, "max_guidance_scale", "finite"),
    ({"decode_chunk_size": 3, "num_frames": 3}, "decode_chunk_size", "decode_chunk_size=3"),
    ({"strength": 0.5}, "strength", "unknown argument"),
    ({"image": None}, "image", "image is required"),
    ({"image": "cat.png"}, "image", "not a path"),
    ({"image": b"GIF89a-not-really"}, "image", "could not be decoded"),
    ({"image": np.zeros((4, 4), np.float32)}, "image", "image"),
    ({"seed": -1}, "seed", "out of range"),
])
def test_invalid_arguments_are_named(engine, image, arguments, field, message):
    call = {"image": image, "num_inference_steps": 1, **arguments}
    with pytest.raises(InvalidRequestError, match=message) as info:
        engine.submit(**call)
    assert info.value.field == field


# -- fuzzing -----------------------------------------------------------------------------------------------------------
def _values(valid):
    junk = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.floats(allow_nan=True),
                     st.integers(-2**70, 2**70), st.lists(st.integers(), max_size=2))
    # mostly valid values (7 in 8), so that many jobs actually run
    return st.integers(0, 7).flatmap(lambda pick: junk if pick == 0 else valid)


FUZZ = {
    "num_frames": _values(st.sampled_from([1, 2, 3, 4, "2"])),
    "num_inference_steps": _values(st.integers(1, 2)),
    "height": _values(st.sampled_from([16, 32, "32"])),
    "decode_chunk_size": _values(st.integers(0, 3)),
    "fps": _values(st.integers(-1, 30)),
    "motion_bucket_id": _values(st.integers(-5, 1030)),
    "noise_aug_strength": _values(st.floats(-1, 11)),
    "min_guidance_scale": _values(st.floats(0, 5)),
    "seed": _values(st.integers(0, 2**32)),
    "output_type": _values(st.sampled_from(["np", "latent", "pil", "mp4"])),
    "image": st.one_of(
        st.binary(max_size=64),
        st.builds(lambda w, h, mode: Image.new(mode, (w, h)), st.integers(1, 48), st.integers(1, 48),
                  st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"])),
        st.builds(np.ones, st.lists(st.integers(0, 9), max_size=5).map(tuple),
                  st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_, np.complex64])),
    ),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(st.fixed_dictionaries({}, optional=FUZZ))
def test_fuzzed_arguments_give_a_clear_error_or_a_result(engine, image, arguments):
    arguments.setdefault("image", image)
    steps = arguments.get("num_inference_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps > 2:
        arguments["num_inference_steps"] = 1  # keep every accepted job short
    try:
        job = engine.submit(**arguments)
    except InvalidRequestError as exc:
        assert str(exc)
        event(f"refused ({exc.field})")
        return
    try:
        frames = engine.result(job, timeout=60)
    except JobFailedError as exc:
        assert "failed:" in str(exc)
        event("job failed")
        return
    assert frames is not None
    event("done")


# -- artifact integrity ------------------------------------------------------------------------------------------------
def _damaged_copy(src, dst, target=None, damage=None):
    """``src`` hard-linked file by file into ``dst`` (a symlink out of the artifact would be refused), with ``target`` (relative path) copied and damaged: "flip",
    "truncate", "garbage" (same size), "delete", or a function of the manifest dict."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        out = dst / rel
        if path.is_dir():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) != target:
            os.link(path, out)
        elif damage == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            out.write_bytes(bytes(data))
        elif damage == "truncate":
            out.write_bytes(path.read_bytes()[:-100])
        elif damage == "garbage":
            out.write_bytes(b"\xff" * path.stat().st_size)
        elif callable(damage):
            out.write_text(json.dumps(damage(json.loads(path.read_text()))))
        # "delete": leave it out
    return dst


def _graph_file(artifact, name, weights=False):
    manifest = json.loads((artifact / "manifest.json").read_text())
    entry = next(g for g in manifest["graphs"] if g["name"] == name and g["format"] == "onnx")
    return entry["files"][1 if weights else 0]["path"]


def _manifest_with(**changes):
    return lambda manifest: {**manifest, **changes}


@pytest.mark.parametrize("case, damage, message", [
    ("unet graph", "flip", r"unet_.*\.onnx does not match its sha256 .* re-export or re-copy it"),
    ("unet weights", "truncate", r"unet/weights\.bin is \d+ bytes but the manifest says \d+ .* re-export or re-copy"),
    ("vae_decoder graph", "delete", r"vae_decoder_.*\.onnx is missing from the artifact; re-export it"),
    ("manifest", _manifest_with(schema_version=99), r"manifest\.json.*schema_version 99 is not supported.*re-export"),
    ("manifest", _manifest_with(pipeline="audio-diffusion"), r"manifest\.json.*'audio-diffusion'.*cannot serve"),
])
def test_damaged_artifact_is_refused_naming_the_file(svd_artifact, tmp_path, case, damage, message):
    src = Path(svd_artifact)
    if case == "manifest":
        target = "manifest.json"
    else:
        name, kind = case.split()
        target = _graph_file(src, name, weights=kind == "weights")
    broken = _damaged_copy(src, tmp_path / "broken", target, damage)
    with pytest.raises(ArtifactError, match=message):
        Engine(broken, warmup=False)


def test_trusted_fast_start_skips_hashes_but_not_sizes(svd_artifact, tmp_path):
    src = Path(svd_artifact)
    weights = _graph_file(src, "unet", weights=True)
    flipped = _damaged_copy(src, tmp_path / "flipped", weights, "flip")
    with Engine(flipped, verify=False, warmup=False) as engine:  # trusted: the hash is not checked
        assert engine.stats()["pipeline"] == "stable-video-diffusion"
    truncated = _damaged_copy(src, tmp_path / "truncated", weights, "truncate")
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        Engine(truncated, verify=False, warmup=False)


def test_artifact_of_another_kind_is_refused(svd_artifact):
    with pytest.raises(ArtifactError, match="holds a 'stable-video-diffusion' artifact, not 'text-to-video'"):
        Engine(svd_artifact, kind="text-to-video", warmup=False)


def test_closed_engine_refuses_and_cancels_waiting_jobs(svd_artifact, image):
    engine = Engine(svd_artifact, workers=1, max_queue=2, verify=False, warmup=False, num_threads=1)
    release = threading.Event()
    running = engine.submit(image=image, num_inference_steps=LONG, seed=0, on_progress=_hold(release))
    waiting = engine.submit(image=image, num_inference_steps=1, seed=0)
    release.set()
    engine.close()
    assert engine.status(waiting)["state"] == "cancelled"
    assert engine.status(running)["state"] == "cancelled"
    with pytest.raises(EngineClosedError, match="closed"):
        engine.submit(image=image)


def test_trusted_start_reports_an_unloadable_graph_by_file(svd_artifact, tmp_path):
    src = Path(svd_artifact)
    graph = _graph_file(src, "vae_encoder")
    broken = _damaged_copy(src, tmp_path / "garbage", graph, "garbage")  # same size: only a hash would notice
    with pytest.raises(ArtifactError, match=r"vae_encoder_.*\.onnx .* failed its warm-up run .* verify=True"):
        Engine(broken, verify=False)


def test_text_to_video_plugs_in_by_its_manifest_kind(t2v_artifact):
    from framegraph.runtime import TextToVideoSDPipeline
    from framegraph.runtime.schedulers import load_scheduler

    requests = [("a red ball", 1), ("a blue cube", 2)]
    with Engine(t2v_artifact, workers=2, warmup=False, num_threads=1) as engine:
        assert engine.kind == "text-to-video-sd"
        jobs = [engine.submit(prompt=prompt, num_inference_steps=2, seed=seed) for prompt, seed in requests]
        frames = [engine.result(job, timeout=60) for job in jobs]
        assert engine.status(jobs[0])["num_decode_chunks"] > 0
        with pytest.raises(InvalidRequestError, match="unknown argument.*'image'"):
            engine.submit(prompt="x", image=b"")
        with pytest.raises(InvalidRequestError, match="prompt is required"):
            engine.submit(num_inference_steps=1)
        artifact = engine.pipeline.artifact  # the plain pipeline on the same graphs, one call at a time
        pipe = TextToVideoSDPipeline(artifact, load_scheduler(artifact.manifest.scheduler), engine.pipeline.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    for (prompt, seed), got in zip(requests, frames):
        want = pipe(prompt, num_frames=got.shape[1], num_inference_steps=2, generator=seed, output_type="np").frames
        assert np.array_equal(got, want)
