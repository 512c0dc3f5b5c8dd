"""HTTP API over an :class:`~framegraph.runtime.engine.Engine` (Starlette on uvicorn: the ``serve`` extra).

    framegraph serve out/svd --host 127.0.0.1 --port 8000

    POST   /jobs              multipart/form-data: the image file ("image") and pipeline arguments as fields
                              -> 202 {"id", "status_url", "video_url", ...}
    GET    /jobs/{id}         state, seed, step / num_steps, decode_chunk / num_decode_chunks
    GET    /jobs              the status of every job the engine still knows
    DELETE /jobs/{id}         cancel a queued or running job; forget (free) a finished one
    GET    /jobs/{id}/video   the MP4 once the job is done
    GET    /jobs/{id}/events  server-sent events: "denoise" once per step, "decode" once per chunk, then "end"
    GET    /info, /health     the artifact's kind, arguments and limits; liveness and queue length

Errors are JSON ``{"error": message, "field": argument or null}``: 400 malformed body, 404 unknown job, 409 video
not ready, 410 cancelled, 413 body too large, 415 not multipart, 422 invalid argument, 429 queue full (with
Retry-After), 503 engine closed. Image inputs are accepted as uploaded files only (never as server paths or URLs).
"""

import asyncio
import json
import logging
import os
import socket
import tempfile

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"the framegraph HTTP server needs Starlette and uvicorn: pip install 'framegraph[serve]' ({exc})"
    ) from exc

from framegraph.runtime.engine import Engine
from framegraph.runtime.engine_jobs import EngineClosedError, JobState, QueueFullError, UnknownJobError
from framegraph.runtime.params import InvalidRequestError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_FIELD_BYTES = 16 * 1024  # a 4000-character prompt in UTF-8
RETRY_AFTER_S = 2
EVENTS_POLL_S = 0.02
SHUTDOWN_GRACE_S = 5
# what GET /jobs/{id} names as the job's "replica": this process (a Ray Serve cluster names its model replicas)
PROCESS_NAME = f"{socket.gethostname()}:{os.getpid()}"


def _detached(exc):
    """A copy of a refusal from the engine with no traceback and no chained exception.

    The engine's exception carries the frames that hold the request (the uploaded bytes, the decoded image, the
    pipeline's checked call). Raised through the worker thread's future it is in a reference cycle (its traceback
    holds the frame awaiting the future, the future holds it): unless something clears its traceback, a refused
    upload would stay in memory until a garbage collection."""
    if isinstance(exc, InvalidRequestError):
        return InvalidRequestError(str(exc), field=exc.field)
    return type(exc)(str(exc))


class ApiError(Exception):
    def __init__(self, status, message, field=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def _sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _error(status, message, field=None, headers=None):
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def encode_mp4(frames, fps):
    """MP4 bytes of one video's frames (F, H, W, 3)."""
    from framegraph.runtime.video import export_to_video

    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="framegraph-")
    os.close(fd)
    try:
        export_to_video(frames, path, fps=fps)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def video_ready(job_id, status):
    """Raise the ApiError (410 cancelled, 409 failed or not done yet) unless the job's video can be fetched."""
    state = JobState(status["state"])
    if state is JobState.CANCELLED:
        raise ApiError(410, f"job {job_id} was cancelled; it has no video")
    if state is JobState.FAILED:
        raise ApiError(409, f"job {job_id} failed: {status['error']}")
    if state is not JobState.DONE:
        raise ApiError(409, f"job {job_id} is {state.value} (step {status['step']}/{status['num_steps']}); poll "
                            f"GET /jobs/{job_id} until its state is 'done'")


async def progress_events(job_id, fetch_status, poll_s=EVENTS_POLL_S):
    """The server-sent events of one job from successive ``await fetch_status(job_id)`` polls: one "denoise" event
    per step and one "decode" event per chunk (counters, so none is lost or repeated between polls), then "end".
    ``fetch_status`` raises UnknownJobError once the job is discarded."""
    sent = {"step": 0, "decode_chunk": 0}
    while True:
        try:
            status = await fetch_status(job_id)
        except UnknownJobError:
            yield _sse("end", {"id": job_id, "state": "discarded"})
            return
        for kind, key, total in (("denoise", "step", "num_steps"), ("decode", "decode_chunk", "num_decode_chunks")):
            while sent[key] < status[key]:
                sent[key] += 1
                yield _sse(kind, {"id": job_id, key: sent[key], total: status[total]})
        if JobState(status["state"]).finished:
            yield _sse("end", status)
            return
        await asyncio.sleep(poll_s)


class JobsApi:
    """The endpoints; one instance per app, holding the engine and the request limits. ``replica`` is the name
    GET /jobs/{id} reports as the job's replica (default: this host and process id)."""

    def __init__(self, engine, max_body_bytes=MAX_BODY_BYTES, replica=PROCESS_NAME):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.replica = replica
        self.http_params = {p.name: p for p in engine.spec.params if p.http}

    async def _body(self, request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise ApiError(413, f"request body of {length[:20]} bytes is over the limit of {self.max_body_bytes}; "
                                "send smaller inputs")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {self.max_body_bytes} bytes; send smaller "
                                    "inputs")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _form(self, request):
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, f"POST /jobs takes multipart/form-data (arguments as form fields, images as file "
                                f"parts), got {content_type[:80]!r}")
        pending = [await self._body(request)]  # handed over once: the raw body is freed as soon as it is parsed

        async def receive():
            return {"type": "http.request", "body": pending.pop() if pending else b"", "more_body": False}

        replay = Request(request.scope, receive)
        try:
            form = await replay.form(max_files=4, max_fields=64, max_part_size=MAX_FIELD_BYTES)
        except HTTPException as exc:
            raise ApiError(400, f"malformed multipart body: {exc.detail}") from None
        except Exception as exc:  # the multipart parser on arbitrary bytes
            raise ApiError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
        finally:
            pending.clear()
        arguments, uploads, seen = {}, [], set()
        try:
            for name, value in form.multi_items():
                if name in seen:
                    raise ApiError(422, f"argument {name!r} is given twice; give it once", field=name)
                seen.add(name)
                param = self.http_params.get(name)
                if param is None:
                    raise ApiError(422, f"unknown argument {name!r}; POST /jobs takes: "
                                        f"{', '.join(sorted(self.http_params))}", field=name)
                if isinstance(value, UploadFile):
                    if param.kind != "image":
                        raise ApiError(422, f"{name} must be a form field, not a file", field=name)
                    uploads.append((name, value))
                elif param.kind == "image":
                    raise ApiError(422, f"{name} must be uploaded as a file part (multipart filename=...)",
                                   field=name)
                else:
                    arguments[name] = param.parse(value)  # the cheap checks, before any upload is read
            for name, upload in uploads:
                arguments[name] = await upload.read()
        except BaseException:
            arguments.clear()  # a refused request's upload is not held by this frame while its error is answered
            raise
        finally:
            uploads.clear()
            await form.close()
        return arguments

    async def create(self, request):
        arguments = await self._form(request)
        spec = self.engine.spec

        def submit():  # parsing may decode a large image: off the event loop
            try:
                return self.engine.submit(**arguments, output_type="np",
                                          postprocess=lambda frames, call: encode_mp4(frames[0], spec.video_fps(call)))
            except (InvalidRequestError, QueueFullError, EngineClosedError) as exc:
                return _detached(exc)  # returned, not raised: see _detached
            finally:
                arguments.clear()  # the uploaded bytes; a queued job holds its decoded image

        outcome = await run_in_threadpool(submit)
        if isinstance(outcome, Exception):
            raise outcome
        job_id = outcome
        status = self.engine.status(job_id)
        status.update(status_url=f"/jobs/{job_id}", video_url=f"/jobs/{job_id}/video")
        return JSONResponse(status, status_code=202, headers={"Location": f"/jobs/{job_id}"})

    async def index(self, request):
        return JSONResponse(self.engine.jobs())

    async def get(self, request):
        return JSONResponse(self.engine.status(request.path_params["job_id"]) | {"replica": self.replica})

    async def delete(self, request):
        job_id = request.path_params["job_id"]
        status = self.engine.status(job_id)
        if JobState(status["state"]).finished:
            self.engine.discard(job_id)
            status["discarded"] = True
            return JSONResponse(status)
        return JSONResponse(self.engine.cancel(job_id), status_code=202)

    async def events(self, request):
        """Server-sent events: one "denoise" event per step and one "decode" event per chunk, then "end"."""
        job_id = request.path_params["job_id"]
        self.engine.status(job_id)  # 404 before the stream starts

        async def fetch(job_id):
            return self.engine.status(job_id)

        return StreamingResponse(progress_events(job_id, fetch), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def video(self, request):
        job_id = request.path_params["job_id"]
        video_ready(job_id, self.engine.status(job_id))
        data = self.engine.result(job_id)
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.mp4"'})

    async def info(self, request):
        artifact = self.engine.pipeline.artifact
        return JSONResponse({
            "pipeline": self.engine.kind,
            "defaults": artifact.defaults,
            "buckets": [g.bucket | {"graph": g.name} for g in artifact.manifest.graphs if g.format == artifact.format],
            "arguments": [p.describe() for p in self.http_params.values()],
            "max_body_bytes": self.max_body_bytes,
            **self.engine.stats(),
        })

    async def health(self, request):
        stats = self.engine.stats()
        return JSONResponse({"status": "closing" if stats["closed"] else "ok", **stats},
                            status_code=503 if stats["closed"] else 200)


async def _api_error(request, exc):
    return _error(exc.status, exc.message, exc.field, exc.headers)


async def _invalid(request, exc):
    return _error(422, str(exc), getattr(exc, "field", None))


async def _queue_full(request, exc):
    return _error(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})


async def _closed(request, exc):
    return _error(503, str(exc))


async def _unknown(request, exc):
    return _error(404, str(exc))


async def _http(request, exc):
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _internal(request, exc):
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    # Starlette re-raises it to the ASGI server once answered: without the frames (logged just above), which hold the
    # request's buffers in a cycle through the worker thread's future until a garbage collection
    exc.__traceback__ = None
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def create_app(engine, max_body_bytes=MAX_BODY_BYTES, replica=PROCESS_NAME):
    """The Starlette app serving ``engine``."""
    app = api_app(JobsApi(engine, max_body_bytes, replica))
    app.state.engine = engine
    return app


def api_app(api):
    """The Starlette app of the HTTP API over ``api`` (a JobsApi, or the Ray Serve ingress's cluster version)."""
    routes = [
        Route("/jobs", api.create, methods=["POST"]),
        Route("/jobs", api.index, methods=["GET"]),
        Route("/jobs/{job_id}", api.get, methods=["GET"]),
        Route("/jobs/{job_id}", api.delete, methods=["DELETE"]),
        Route("/jobs/{job_id}/video", api.video, methods=["GET"]),
        Route("/jobs/{job_id}/events", api.events, methods=["GET"]),
        Route("/info", api.info, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    handlers = {
        ApiError: _api_error, InvalidRequestError: _invalid, QueueFullError: _queue_full,
        EngineClosedError: _closed, UnknownJobError: _unknown, HTTPException: _http, Exception: _internal,
    }
    return Starlette(routes=routes, exception_handlers=handlers)


def serve(artifacts, host="127.0.0.1", port=8000, log_level="info", **engine_options):
    """Load ``artifacts`` into an Engine and serve it with uvicorn until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the API has no authentication; put it behind a proxy that has", host)
    with Engine(artifacts, **engine_options) as engine:
        # open event streams would otherwise hold a shutdown until their jobs end
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
