"""A long-lived engine: load an artifact once, warm every graph up, and serve many requests from a worker pool.

    from framegraph.runtime.engine import Engine

    with Engine("out/svd", workers=2, max_queue=8) as engine:
        job = engine.submit(image=load_image("cat.png"), num_frames=14, seed=7)
        engine.status(job)          # {"state": "running", "step": 3, "num_steps": 25, "decode_chunk": 0, ...}
        frames = engine.result(job)  # what the pipeline returns as .frames; or engine.cancel(job)

The engine serves the pipeline registered (``framegraph.runtime.pipelines.PIPELINES``) under the manifest's ``pipeline``
field; what it needs of it (request arguments, per-worker copies, how to count steps) the pipeline class declares, read
by :class:`EnginePipeline`. Every job gets its own pipeline copy with a fresh scheduler (schedulers keep per-call state)
and its own seed (drawn and reported when the request has none), so a job's frames do not depend on what else is
running. The compiled graphs are shared: ONNX Runtime's ``InferenceSession.run`` is thread-safe.
``sessions="per_worker"`` opens one set of sessions per worker instead (more memory; ``python scripts/soak.py sessions``
compares the two).
"""

import collections
import copy
import logging
import os
import secrets
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from framegraph.runtime.engine_jobs import (
    EngineClosedError,
    EngineError,
    Job,
    JobCancelled,
    JobCancelledError,
    JobFailedError,
    JobQueue,
    JobState,
    QueueFullError,
    UnknownJobError,
)
from framegraph.runtime.manifest import MANIFEST_NAME, ArtifactError, Manifest
from framegraph.runtime.params import InvalidRequestError, Param, parse_arguments
from framegraph.runtime.pipelines import PIPELINES, pipeline_class

logger = logging.getLogger(__name__)

SESSIONS = ("shared", "per_worker")
MAX_SEED = 2**63 - 1

__all__ = [
    "Engine", "EngineClosedError", "EngineError", "EnginePipeline", "InvalidRequestError", "JobCancelledError",
    "JobFailedError", "JobState", "QueueFullError", "UnknownJobError", "warm_up",
]


SEED_PARAM = Param("seed", "int", minimum=0, maximum=MAX_SEED, cli=False, help="random seed; drawn when omitted")


class EnginePipeline:
    """How the engine serves one pipeline kind, all of it read from the pipeline class (``framegraph.runtime.
    pipelines.PIPELINES``): its request arguments are the seed, the pipeline's ``input_param``, its declared call
    arguments and the video's frame rate; ``check`` resolves and checks a request with the pipeline's
    ``request`` / ``check_request`` / ``work``. Every job gets its own pipeline copy with a fresh scheduler
    (``for_job``: schedulers keep per-call state)."""

    def __init__(self, pipeline_class):
        self.pipeline_class = pipeline_class
        self.kind = pipeline_class.kind
        params = (SEED_PARAM, pipeline_class.input_param, *pipeline_class.call_params)
        video = pipeline_class.video_fps_param
        self.params = params if video in params else params + (video,)

    def load(self, path, backend, verify, backend_options):
        """The pipeline for the artifact at ``path``."""
        return self.pipeline_class.from_artifacts(path, backend=backend, verify=verify, **backend_options)

    def for_worker(self, pipeline):
        """The pipeline one worker thread uses for all its jobs: a copy of whatever is not thread-safe."""
        return pipeline.for_thread()

    def for_job(self, pipeline):
        """A copy of ``pipeline`` that one job may use while others run: shared graphs, its own scheduler."""
        from framegraph.runtime.schedulers import load_scheduler

        job_pipeline = copy.copy(pipeline)
        job_pipeline.scheduler = load_scheduler(pipeline.artifact.manifest.scheduler)
        job_pipeline.set_progress_bar_config(disable=True)
        return job_pipeline

    def check(self, pipeline, arguments):
        """``(resolved request, number of denoising steps, number of decode chunks)`` for parsed arguments; raises
        InvalidRequestError when the artifact cannot serve them."""
        request = pipeline.request(arguments)
        refuse_unless(pipeline.check_request, request)
        steps, chunks = pipeline.work(request)
        return request, steps, chunks

    def run(self, pipeline, request, seed, progress):
        """Run one job: the pipeline output's frames."""
        return pipeline(**pipeline.call_of(request), generator=seed, progress=progress).frames

    def video_fps(self, request):
        """Playback frames per second of the job's video (for MP4 writing)."""
        return request[self.pipeline_class.video_fps_param.name]


def refuse_unless(check, *args, **kwargs):
    """Run a pipeline's ``check(*args, **kwargs)``; a refusal is raised as an InvalidRequestError naming the field.

    The error is raised after the ``except`` block, so it carries no reference to the check's frames (which hold
    the request's decoded image), and no local of this frame holds it: a refused request's memory is freed at once,
    not by the garbage collector."""
    problem = None  # (message, field): no local may hold the error, whose traceback holds this frame (a cycle)
    try:
        check(*args, **kwargs)
    except InvalidRequestError as exc:
        problem = str(exc), exc.field
    except (TypeError, ValueError) as exc:
        problem = str(exc), None
    if problem is not None:
        raise InvalidRequestError(*problem)


def warm_up(artifact):
    """Open every graph of the artifact's format and run it once on zeros (first-call costs paid before serving).

    A graph that cannot be opened or run is reported by file: with ``verify=False`` this is where a corrupted file
    shows up."""
    start = time.perf_counter()
    for entry in artifact.manifest.graphs:
        if entry.format != artifact.format:
            continue
        try:
            graph = artifact.graph(entry.name, **entry.bucket)
            graph(**{s.name: np.zeros(s.shape, dtype=s.dtype) for s in entry.inputs})
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(
                f"{artifact.path / entry.main_file} ({entry.key}) failed its warm-up run ({type(exc).__name__}: "
                f"{str(exc)[:300]}); the file may be corrupted: load with verify=True (no --no-verify) to check the "
                "hashes, or re-export the artifact"
            ) from exc
    logger.info("warmed up %s in %.2f s", artifact.path, time.perf_counter() - start)


class Engine:
    """Serve one artifact: ``submit`` / ``status`` / ``cancel`` / ``result`` from a pool of ``workers`` threads.

    ``max_queue`` bounds the jobs waiting for a worker (``submit`` raises :class:`QueueFullError` beyond it);
    ``keep_finished`` bounds how many finished jobs (and their results) are kept for ``status``/``result``.
    ``verify`` is the check of the artifact's files (:func:`framegraph.runtime.manifest.verify_files`): True
    (sizes, and sha256 of the files this machine has not yet hashed unchanged), "full" (sha256 of every file) or
    False (sizes only, a trusted fast start). ``kind`` (optional) is the pipeline kind the caller expects; backend options (``device``, ``num_threads``,
    ``providers``) go to the backend; with several workers ``num_threads`` defaults to ``cpu_count // workers``.
    """

    def __init__(self, path, *, kind=None, backend="onnxruntime", workers=1, max_queue=16, sessions="shared",
                 verify=True, warmup=True, keep_finished=64, **backend_options):
        manifest = self._manifest(path)
        self.spec = self._spec(path, manifest.pipeline, kind)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if sessions not in SESSIONS:
            raise ValueError(f"sessions must be one of {SESSIONS}, got {sessions!r}")
        if not isinstance(keep_finished, int) or keep_finished < 1:
            raise ValueError(f"keep_finished must be an integer >= 1, got {keep_finished!r}")
        self.path, self.workers, self.sessions, self.keep_finished = path, workers, sessions, keep_finished
        if workers > 1 and backend_options.get("num_threads") is None:
            # concurrent jobs each running an engine-default (all cores) intra-op pool oversubscribe the CPU
            backend_options["num_threads"] = max(1, (os.cpu_count() or 1) // workers)
            logger.info("%d workers: %d intra-op thread(s) per graph call (pass num_threads to choose)", workers,
                        backend_options["num_threads"])
        self._queue = JobQueue(max_queue)
        self._pipelines = [self.spec.load(path, backend, verify, backend_options)]
        if sessions == "per_worker":  # files were verified by the first load; the others re-check sizes only
            self._pipelines += [self.spec.load(path, backend, False, backend_options) for _ in range(workers - 1)]
        if warmup:
            for pipe in self._pipelines:
                warm_up(pipe.artifact)
        self._jobs = {}
        self._finished = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"framegraph-engine-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()
        logger.info("engine ready: %s (%s), %d worker(s), %s sessions, queue of %d", path, self.spec.kind, workers,
                    sessions, max_queue)

    @staticmethod
    def _manifest(path):
        manifest_path = Path(path) / MANIFEST_NAME
        try:
            return Manifest.load(path)
        except ArtifactError as exc:
            if str(manifest_path) in str(exc):
                raise
            raise ArtifactError(f"{manifest_path}: {exc}") from None

    @staticmethod
    def _spec(path, kind, expected):
        manifest_path = Path(path) / MANIFEST_NAME
        if expected is not None and kind != expected:
            raise ArtifactError(
                f"{manifest_path} holds a {kind!r} artifact, not {expected!r}; serve it without kind= or pass an "
                f"artifact exported for {expected!r}"
            )
        if kind not in PIPELINES:
            raise ArtifactError(
                f"{manifest_path} holds a {kind!r} artifact, which this framegraph cannot serve (it serves "
                f"{', '.join(sorted(PIPELINES))}); install the framegraph version that exported it"
            )
        return EnginePipeline(pipeline_class(kind))

    @property
    def kind(self):
        """The artifact's pipeline kind (the manifest's ``pipeline`` field)."""
        return self.spec.kind

    @property
    def pipeline(self):
        """The loaded pipeline (the first worker's, with per_worker sessions); for reading its artifact."""
        return self._pipelines[0]

    # -- the job API -------------------------------------------------------------------------------------------------
    def submit(self, *, on_progress=None, postprocess=None, **arguments):
        """Queue a request; returns its job id at once. ``on_progress(job_id, kind, count)`` is called after every
        denoising step ("denoise") and decode chunk ("decode"); ``postprocess(frames, call_arguments)`` runs on the
        worker before the result is stored (e.g. to encode a video). Raises InvalidRequestError, QueueFullError or
        EngineClosedError."""
        if self._closed:
            raise EngineClosedError("the engine is closed and takes no more jobs; start a new Engine")
        parsed = parse_arguments(self.spec.params, arguments, f"a {self.spec.kind!r} engine")
        seed = parsed.pop("seed", None)
        if seed is None:
            seed = secrets.randbits(32)  # JSON-safe (< 2**53) for any HTTP client
        call, num_steps, num_chunks = self.spec.check(self.pipeline, parsed)
        job = Job(uuid.uuid4().hex, self.spec.kind, call, seed, num_steps, num_chunks, on_progress, postprocess)
        with self._lock:
            self._jobs[job.id] = job
        try:
            self._queue.put(job)
        except EngineError:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise
        logger.debug("job %s queued (seed %d)", job.id, seed)
        return job.id

    def _job(self, job_id):
        with self._lock:
            job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise UnknownJobError(f"no job {str(job_id)[:64]!r}: it was never submitted here or has been discarded")
        return job

    def status(self, job_id):
        """The job's state, seed and progress (step / num_steps, decode_chunk / num_decode_chunks) as a dict."""
        job = self._job(job_id)
        return job.snapshot(self._queue.position(job) if job.state is JobState.QUEUED else None)

    def cancel(self, job_id):
        """Cancel a job: a queued one at once, a running one after its current denoising step or decode chunk
        (its buffers are released then). Finished jobs are left as they are. Returns the job's status."""
        job = self._job(job_id)
        if not job.state.finished:
            job.request_cancel()
            if self._queue.remove(job) and job.cancelled():
                self._retire(job)
        return self.status(job_id)

    def wait(self, job_id, timeout=None):
        """Block until the job has finished (or ``timeout`` seconds passed); returns its status."""
        job = self._job(job_id)
        job.finished.wait(timeout)
        return self.status(job_id)

    def result(self, job_id, timeout=None):
        """The job's frames (or what its ``postprocess`` returned), waiting for it up to ``timeout`` seconds."""
        job = self._job(job_id)
        if not job.finished.wait(timeout):
            raise TimeoutError(f"job {job_id} has not finished after {timeout} s (step {job.step}/{job.num_steps}); "
                               "wait longer, or cancel it")
        if job.state is JobState.CANCELLED:
            raise JobCancelledError(f"job {job_id} was cancelled; it has no result")
        if job.state is JobState.FAILED:
            raise JobFailedError(f"job {job_id} failed: {job.error}")
        return job.result

    def discard(self, job_id):
        """Forget a finished job and free its result; a job still queued or running is cancelled first."""
        job = self._job(job_id)
        if not job.state.finished:
            self.cancel(job_id)
        with self._lock:
            self._jobs.pop(job.id, None)
            self._finished.pop(job.id, None)

    def generate(self, timeout=None, **arguments):
        """Submit and wait: the frames of one request (blocking convenience over submit + result)."""
        return self.result(self.submit(**arguments), timeout=timeout)

    def jobs(self):
        """The status of every job the engine still knows (queued, running, and the last finished ones)."""
        with self._lock:
            jobs = list(self._jobs.values())
        return [job.snapshot() for job in jobs]

    def stats(self):
        with self._lock:
            states = collections.Counter(job.state.value for job in self._jobs.values())
        return {"pipeline": self.spec.kind, "workers": self.workers, "sessions": self.sessions,
                "queued": len(self._queue), "max_queue": self._queue.max_size, "closed": self._closed,
                "jobs": dict(states)}

    # -- workers -----------------------------------------------------------------------------------------------------
    def _work(self, index):
        pipeline = self.spec.for_worker(self._pipelines[index if self.sessions == "per_worker" else 0])
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.start():
                self._run(job, pipeline)
            self._retire(job)

    def _run(self, job, pipeline):
        try:
            if job.cancel_requested.is_set():
                raise JobCancelled(job.id)
            output = self.spec.run(self.spec.for_job(pipeline), job.arguments, job.seed, job.progress)
            if job.postprocess is not None:
                output = job.postprocess(output, job.arguments)
            job.succeed(output)
        except JobCancelled:
            job.cancelled()
            logger.info("job %s cancelled at step %d/%d, decode chunk %d/%d", job.id, job.step, job.num_steps,
                        job.decode_chunk, job.num_decode_chunks)
        except Exception as exc:  # a failed request must not take its worker down
            logger.error("job %s failed: %s", job.id, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            job.fail(exc)

    def _retire(self, job):
        with self._lock:
            if job.id not in self._jobs:
                return
            self._finished[job.id] = None
            while len(self._finished) > self.keep_finished:
                old, _ = self._finished.popitem(last=False)
                self._jobs.pop(old, None)

    # -- shutdown ----------------------------------------------------------------------------------------------------
    def close(self, cancel_running=True, timeout=None):
        """Stop taking jobs, cancel the waiting ones (and the running ones unless ``cancel_running=False``), and
        wait for the workers to finish."""
        self._closed = True
        for job in self._queue.close():
            if job.cancelled():
                self._retire(job)
        if cancel_running:
            with self._lock:
                running = [job for job in self._jobs.values() if job.state is JobState.RUNNING]
            for job in running:
                job.request_cancel()
        for thread in self._threads:
            thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
