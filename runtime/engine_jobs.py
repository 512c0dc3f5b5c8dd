"""The jobs an :class:`~framegraph.runtime.engine.Engine` runs (states, progress, cancellation, the bounded queue)
and the checking of their request arguments (:class:`Param`, :func:`parse_arguments`, :func:`decode_image`).

A :class:`Job` is created by ``Engine.submit``, waits in the :class:`JobQueue` (bounded: a full queue raises
:class:`QueueFullError` at once instead of blocking), is run by one worker and ends ``done``, ``failed`` or
``cancelled``. The pipeline calls :meth:`Job.progress` after every denoising step and every decode chunk; that is
where a cancellation takes effect (it raises :class:`JobCancelled` out of the pipeline, so the job's latents and
decoded frames are released with the pipeline's frame).
"""

import collections
import enum
import io
import logging
import math
import os
import threading
import time

import numpy as np

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


class InvalidRequestError(ValueError):
    """A request argument is missing, unknown or out of range; ``field`` names it (None: the combination)."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


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


# -- request arguments -------------------------------------------------------------------------------------------------
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_image(data, max_pixels=MAX_IMAGE_PIXELS):
    """An RGB PIL image from encoded bytes (PNG, JPEG, WebP, BMP, GIF); InvalidRequestError for anything else."""
    import PIL.Image
    import PIL.ImageOps

    problem = None
    try:
        with PIL.Image.open(io.BytesIO(bytes(data)), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise InvalidRequestError(
                    f"image is {image.width}x{image.height}, more than {max_pixels} pixels; downscale it first",
                    field="image")
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except InvalidRequestError:
        raise
    except PIL.UnidentifiedImageError:  # its message shows the address of the in-memory buffer: say it plainly
        problem = "not an image in a format read here"
        image = None
    except Exception as exc:  # untrusted bytes: any decoder error is the sender's problem, not the server's
        problem = f"{type(exc).__name__}: {_brief(exc, 200)}"
        image = None  # a half-decoded image, which the traceback of the error raised below would keep
    # raised out here, not in the except block: the decoder's exception (its traceback holds the frames that hold the
    # bytes and the half-decoded image) is not kept as __context__, so a refused upload is freed at once
    raise InvalidRequestError(
        f"image could not be decoded ({problem}); send a {', '.join(IMAGE_FORMATS)} file", field="image")


MAX_NUMBER_TEXT = 64  # characters of a number given as text (an HTTP form field); longer text is refused unparsed


def _brief(value, limit=40):
    """``value`` for an error message: short, and computable for anything a client sends (``str`` of an int over
    4300 digits raises, and a 400-digit one is no help to read)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        bits = abs(int(value)).bit_length()
        if bits > 128:
            return f"{'-' if value < 0 else ''}<an integer of about {int(bits * math.log10(2)) + 1} digits>"
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a client's object whose __str__ fails
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _number(value, name, kind):
    """Accept ints/floats (numpy ones too) and, from HTTP forms, their decimal text; never bools. An "an integer"
    comes back as an int, "a number" as an int or a float (possibly inf or nan: the caller checks the range)."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(f"{name} must be {kind}, got a bool ({value!r})", field=name)
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMBER_TEXT:  # before int(): parsing thousands of digits costs, and int() refuses 4300+
            raise InvalidRequestError(
                f"{name} must be {kind} of at most {MAX_NUMBER_TEXT} characters, got {len(text)} characters "
                f"({_brief(text)!r})", field=name)
        if not text.isascii() or "_" in text:  # int() and float() also take "1_000" and non-ASCII digits
            raise InvalidRequestError(f"{name} must be {kind} in plain ASCII decimal digits, got {_brief(value)!r}",
                                      field=name)
        try:
            return int(text) if kind == "an integer" else float(text)
        except ValueError:
            raise InvalidRequestError(f"{name} must be {kind}, got {_brief(value)!r}", field=name) from None
    if isinstance(value, (int, np.integer)):
        return int(value)  # exact, also for "a number": float(10**400) would overflow before the range check
    if isinstance(value, (float, np.floating)):
        number = float(value)  # numpy's long double beyond the float range becomes inf, refused by the caller
        if kind != "an integer":
            return number
        if number.is_integer():
            return int(number)
    raise InvalidRequestError(f"{name} must be {kind}, got {type(value).__name__} {_brief(value)}", field=name)


class Param:
    """One request argument: its kind ("int", "float", "choice", "text", "image", "array"), range (for text: the
    longest length) and whether HTTP offers it.

    ``parse`` checks a value (typed from Python, or text from an HTTP form) and returns it in its Python type, or
    raises :class:`InvalidRequestError` naming the argument.
    """

    def __init__(self, name, kind, *, minimum=None, maximum=None, choices=None, required=False, http=True,
                 help=""):
        self.name, self.kind, self.minimum, self.maximum = name, kind, minimum, maximum
        self.choices, self.required, self.http, self.help = choices, required, http, help

    def parse(self, value):
        name = self.name
        if self.kind in ("int", "float"):
            value = _number(value, name, "an integer" if self.kind == "int" else "a number")
            # ints are exact and always finite (math.isfinite(10**400) raises OverflowError); int-float comparisons
            # are exact in Python, so a huge int against a float bound cannot overflow either
            if isinstance(value, float) and not math.isfinite(value):
                bounds = f" in [{self.minimum}, {self.maximum}]" if (self.minimum, self.maximum) != (None, None) else ""
                raise InvalidRequestError(f"{name} must be a finite number{bounds}, got {value!r}", field=name)
            low = self.minimum is not None and value < self.minimum
            if low or (self.maximum is not None and value > self.maximum):
                raise InvalidRequestError(
                    f"{name}={_brief(value)} is out of range; it must be in [{self.minimum}, {self.maximum}]",
                    field=name)
            if self.kind == "float" and not isinstance(value, float):
                try:
                    value = float(value)
                except OverflowError:  # only without a maximum: ints in range are exact
                    raise InvalidRequestError(f"{name}={_brief(value)} is beyond the float range", field=name) from None
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise InvalidRequestError(f"{name} must be one of {list(self.choices)}, got {_brief(value)!r}",
                                          field=name)
            return value
        if self.kind == "text":
            if not isinstance(value, str):
                raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}", field=name)
            if self.maximum is not None and len(value) > self.maximum:
                raise InvalidRequestError(f"{name} has {len(value)} characters, more than {self.maximum}", field=name)
            return value
        if self.kind == "image":
            return self._image(value)
        if self.kind == "array":
            problem = None
            try:
                with np.errstate(over="ignore"):  # float64 beyond the float32 range: inf, refused below
                    array = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int beyond the float range
                problem = _brief(exc, 200)
            if problem is not None:
                raise InvalidRequestError(f"{name} must be an array of finite float32 numbers ({problem})", field=name)
            if not np.all(np.isfinite(array)):
                raise InvalidRequestError(f"{name} must be finite (no NaN or inf)", field=name)
            return array
        raise TypeError(f"Param {name!r} has unknown kind {self.kind!r}")

    def _image(self, value):
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image(value)
        if isinstance(value, (str, os.PathLike)):
            raise InvalidRequestError(
                f"{self.name} must be an image (a PIL image, a numpy array or encoded image bytes), not a path or "
                "text; open files with framegraph.runtime.load_image(path), or upload the file over HTTP",
                field=self.name)
        return value  # PIL images and arrays: the pipeline's own checks name what is wrong

    def describe(self):
        """A JSON-ready description (for the server's /info)."""
        out = {"name": self.name, "type": self.kind, "required": self.required}
        for key in ("minimum", "maximum", "choices", "help"):
            value = getattr(self, key)
            if value is not None and value != "":
                out[key] = list(value) if key == "choices" else value
        return out


def parse_arguments(params, arguments, what):
    """Check ``arguments`` against ``params``: unknown names and missing required ones are refused by name."""
    by_name = {p.name: p for p in params}
    unknown = sorted(set(arguments) - set(by_name))
    if unknown:
        raise InvalidRequestError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for {what}; it takes: {', '.join(sorted(by_name))}",
            field=unknown[0])
    parsed = {}
    # the cheap checks first: a request with a bad number is refused before its image is decoded
    for param in sorted(params, key=lambda p: p.kind == "image"):
        value = arguments.get(param.name)
        if value is None:
            if param.required:
                raise InvalidRequestError(f"{param.name} is required for {what}", field=param.name)
            continue
        parsed[param.name] = param.parse(value)
    return {p.name: parsed[p.name] for p in params if p.name in parsed}
