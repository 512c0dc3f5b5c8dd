"""The jobs an :class:`~framegraph.runtime.engine.Engine` runs (states, progress, cancellation, the bounded queue);
their request arguments are checked by :mod:`framegraph.runtime.params`.

A :class:`Job` is created by ``Engine.submit``, waits in the :class:`JobQueue` (bounded: a full queue raises
:class:`QueueFullError` at once instead of blocking), is run by one worker and ends ``done``, ``failed`` or
``cancelled``. The pipeline calls :meth:`Job.progress` after every denoising step and every decode chunk; that is
where a cancellation takes effect (it raises :class:`JobCancelled` out of the pipeline, so the job's latents and
decoded frames are released with the pipeline's frame).
"""

import collections
import enum
import logging
import threading
import time

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self):
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class EngineError(RuntimeError):
    """Base class of the engine's own errors (bad requests are :class:`InvalidRequestError`, a ValueError)."""


class QueueFullError(EngineError):
    """The engine's queue holds ``max_queue`` waiting jobs; retry later or start the engine with a larger queue."""


class EngineClosedError(EngineError):
    """The engine was closed and takes no more jobs."""


class JobCancelledError(EngineError):
    """``result()`` of a job that was cancelled."""


class JobFailedError(EngineError):
    """``result()`` of a job whose pipeline call raised; the message is the pipeline's error."""


class UnknownJobError(LookupError):
    """No job with this id (never submitted, or finished long enough ago to have been forgotten)."""

    def __str__(self):
        return str(self.args[0]) if self.args else "unknown job"



class JobCancelled(Exception):
    """Raised from the pipeline's progress callback to stop a cancelled job (internal)."""


class Job:
    """One request: its checked arguments, its seed, its progress and, once finished, its result or error."""

    def __init__(self, job_id, pipeline, arguments, seed, num_steps, num_decode_chunks, on_progress=None,
                 postprocess=None):
        self.id = job_id
        self.pipeline = pipeline
        self.arguments = arguments  # keyword arguments of the pipeline call (dropped when the job ends)
        self.summary = {k: v for k, v in arguments.items() if isinstance(v, (bool, int, float, str))}
        self.seed = seed
        self.num_steps = num_steps
        self.num_decode_chunks = num_decode_chunks
        self.on_progress = on_progress
        self.postprocess = postprocess
        self.step = 0
        self.decode_chunk = 0
        self.state = JobState.QUEUED
        self.error = None
        self.result = None
        self.created_at = time.time()
        self.started_at = None
        self.finished_at = None
        self.cancel_requested = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()

    # -- called by the worker and the pipeline ---------------------------------------------------------------------
    def start(self):
        with self._lock:
            if self.state is not JobState.QUEUED:
                return False
            self.state = JobState.RUNNING
            self.started_at = time.time()
            return True

    def progress(self, kind):
        """The pipeline's ``progress`` callback: count a "denoise" step or a "decode" chunk, then honour a cancel."""
        with self._lock:
            if kind == "denoise":
                self.step += 1
            elif kind == "decode":
                self.decode_chunk += 1
        if self.on_progress is not None:
            try:
                self.on_progress(self.id, kind, self.step if kind == "denoise" else self.decode_chunk)
            except Exception:  # a listener's bug must not kill the job
                logger.exception("job %s: on_progress listener raised; ignoring it", self.id)
        if self.cancel_requested.is_set():
            raise JobCancelled(self.id)

    def _end(self, state, result=None, error=None):
        with self._lock:
            if self.state.finished:
                return False
            self.state = state
            self.result = result
            self.error = error
            self.arguments = None  # the input image, latents, ... are not needed any more
            self.postprocess = None
            self.on_progress = None
            self.finished_at = time.time()
        self.finished.set()
        return True

    def succeed(self, result):
        if self.cancel_requested.is_set():
            return self._end(JobState.CANCELLED)
        return self._end(JobState.DONE, result=result)

    def fail(self, exc):
        return self._end(JobState.FAILED, error=f"{type(exc).__name__}: {exc}")

    def cancelled(self):
        return self._end(JobState.CANCELLED)

    # -- called by clients -------------------------------------------------------------------------------------------
    def request_cancel(self):
        """Ask the job to stop; a queued job is cancelled by the engine, a running one at its next step or chunk."""
        self.cancel_requested.set()

    def snapshot(self, queue_position=None):
        """The job's status as a JSON-ready dict."""
        with self._lock:
            status = {
                "id": self.id,
                "pipeline": self.pipeline,
                "state": self.state.value,
                "seed": self.seed,
                "step": self.step,
                "num_steps": self.num_steps,
                "decode_chunk": self.decode_chunk,
                "num_decode_chunks": self.num_decode_chunks,
                "cancel_requested": self.cancel_requested.is_set(),
                "error": self.error,
                "arguments": dict(self.summary),
                "created_at": self.created_at,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
            }
        if queue_position is not None:
            status["queue_position"] = queue_position
        return status


class JobQueue:
    """A FIFO of waiting jobs with a hard bound (``put`` raises when full) and removal of cancelled jobs."""

    def __init__(self, max_size):
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_size!r}")
        self.max_size = max_size
        self._jobs = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self):
        with self._cond:
            return len(self._jobs)

    def put(self, job):
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed and takes no more jobs; start a new Engine")
            if len(self._jobs) >= self.max_size:
                raise QueueFullError(
                    f"the queue is full ({self.max_size} jobs waiting); retry when a job has finished, cancel one, "
                    "or start the engine with a larger max_queue"
                )
            self._jobs.append(job)
            self._cond.notify()

    def get(self):
        """The next job, blocking; None once the queue is closed and empty."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            return self._jobs.popleft() if self._jobs else None

    def remove(self, job):
        """Take ``job`` out of the queue; False when a worker already took it."""
        with self._cond:
            try:
                self._jobs.remove(job)
                return True
            except ValueError:
                return False

    def position(self, job):
        with self._cond:
            try:
                return self._jobs.index(job)
            except ValueError:
                return None

    def close(self):
        """Refuse new jobs, wake every worker, and return the jobs that were still waiting."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        return waiting
