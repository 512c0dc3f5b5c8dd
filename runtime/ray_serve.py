"""Serve an artifact on a Ray cluster with Ray Serve (the ``ray`` extra), behind the same HTTP API as
:mod:`framegraph.runtime.server`.

    framegraph serve out/svd --ray --replicas 2 --port 8000             # a local Ray instance
    framegraph serve out/svd --ray --address auto --replicas 4          # the cluster this node belongs to
    serve deploy framegraph/runtime/ray_serve.yaml                      # the same app from a Serve config file

One Serve application, three deployments (docs/scale-out.md has the design):

* ``ModelReplica`` (``replicas`` of them, one CPU each by default): opens the artifact once, warms it up, and runs
  jobs on an :class:`~framegraph.runtime.engine.Engine`. It checks requests for the ingress (``check``: the 422s)
  and pulls queued jobs from the board whenever one of its engine workers is free.
* ``Board`` (one replica): the :class:`~framegraph.runtime.ray_jobs.JobBoard`, where every job's state lives: the
  bounded queue (429), each job's progress and replica, the videos of finished jobs, the replicas' heartbeats.
* ``Ingress``: the Starlette app of :mod:`framegraph.runtime.server` over the board, so every path, JSON body and
  status code is the single-process server's. Any number of ingress replicas answer for any job.

The artifact path must name the same artifact on every node that runs a model replica (a shared or synced folder).
"""

import logging
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

try:
    import ray
    from ray import serve
    from starlette.responses import JSONResponse, Response, StreamingResponse
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"serving on Ray needs Ray Serve and Starlette: pip install 'framegraph[ray,serve]' ({exc})") \
        from exc

from framegraph.runtime import server as http
from framegraph.runtime.engine import Engine
from framegraph.runtime.engine_jobs import EngineClosedError, EngineError, Job, JobState, QueueFullError, \
    UnknownJobError
from framegraph.runtime.params import InvalidRequestError, parse_arguments
from framegraph.runtime.ray_jobs import REPLICA_TIMEOUT_S, JobBoard

logger = logging.getLogger(__name__)

APP_NAME = "framegraph"
SYNC_S = 0.05  # a model replica's heartbeat / progress report period (it also reports after every step)
SYNC_TIMEOUT_S = 30
EVENTS_POLL_S = 0.05
ERRORS = {cls.__name__: cls for cls in (InvalidRequestError, QueueFullError, EngineClosedError, UnknownJobError)}


def _guarded(method, *args):
    """``("ok", method(*args))``, or the refusal as plain data: ``("error", class name, message, field)``. Errors
    cross Serve handles as values, so the ingress raises the engine's own exception type (and status code)."""
    try:
        return "ok", method(*args)
    except tuple(ERRORS.values()) as exc:
        return "error", type(exc).__name__, str(exc), getattr(exc, "field", None)


def _unwrap(outcome):
    if outcome[0] == "ok":
        return outcome[1]
    _, name, message, field = outcome
    if name == "InvalidRequestError":
        raise InvalidRequestError(message, field=field)
    raise ERRORS[name](message)


QUIET = {"enable_access_log": False}  # the board and replicas answer a sync every SYNC_S: no log line per call


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}, logging_config=QUIET)
class Board:
    """The job board (see :mod:`framegraph.runtime.ray_jobs`) as a single-replica deployment."""

    def __init__(self, max_queue=16, replica_timeout_s=REPLICA_TIMEOUT_S):
        self.board = JobBoard(max_queue, replica_timeout_s=replica_timeout_s)
        self.lock = threading.Lock()

    def call(self, method, *args):
        with self.lock:
            return _guarded(getattr(self.board, method), *args)


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1}, logging_config=QUIET)
class ModelReplica:
    """One Engine over the artifact, opened and warmed up once; runs the jobs it pulls from the board."""

    def __init__(self, board, artifact, workers=1, engine_options=None):
        start = time.perf_counter()
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.name = f"{replica_id}@{socket.gethostname()}:{os.getpid()}"
        self.engine = Engine(artifact, workers=workers, max_queue=workers, **(engine_options or {}))
        self.startup_s = time.perf_counter() - start
        self.board = board
        self._ids = {}  # board job id -> engine job id
        self._refused = {}  # board job id -> status of a job the engine refused to start
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._pump, name="framegraph-board-sync", daemon=True)
        self._thread.start()
        logger.info("replica %s ready in %.2f s (artifact opened and warmed up)", self.name, self.startup_s)

    # -- called by the ingress -----------------------------------------------------------------------------------------
    def describe(self):
        """What the ingress needs to parse requests and answer GET /info."""
        artifact = self.engine.pipeline.artifact
        return {
            "params": [p for p in self.engine.spec.params if p.http],
            "info": {"pipeline": self.engine.kind, "defaults": artifact.defaults,
                     "buckets": [g.bucket | {"graph": g.name} for g in artifact.manifest.graphs
                                 if g.format == artifact.format],
                     "workers": self.engine.workers, "sessions": self.engine.sessions},
            "replica": self.name, "startup_s": self.startup_s,
        }

    def check(self, arguments):
        """Check a request as ``Engine.submit`` does (drawing the seed when it has none): ``{"seed", "status"}``
        with the job's initial status, or the refusal (InvalidRequestError) as data."""
        return _guarded(self._check, arguments)

    def _check(self, arguments):
        spec = self.engine.spec
        parsed = parse_arguments(spec.params, dict(arguments), f"a {spec.kind!r} engine")
        seed = parsed.pop("seed", None)
        if seed is None:
            seed = secrets.randbits(32)
        call, steps, chunks = spec.check(self.engine.pipeline, parsed)
        return {"seed": seed, "status": Job("", spec.kind, call, seed, steps, chunks).snapshot()}

    def check_health(self):
        if not self._thread.is_alive():
            raise RuntimeError(f"replica {self.name}: its board sync thread stopped; Serve restarts the replica")

    # -- the board sync ------------------------------------------------------------------------------------------------
    def _pump(self):
        while not self._stop.is_set():
            self._wake.wait(SYNC_S)
            self._wake.clear()
            try:
                self._sync()
            except Exception:  # the board restarting, a slow cluster: the next sync reports everything again
                logger.warning("replica %s: sync with the job board failed; retrying", self.name, exc_info=True)
                self._stop.wait(1.0)

    def _sync(self):
        statuses, done = dict(self._refused), list(self._refused)
        for job_id, engine_id in self._ids.items():
            status = self.engine.status(engine_id)
            for key in ("id", "queue_position", "created_at"):
                status.pop(key, None)
            if JobState(status["state"]).finished:
                if status["state"] == JobState.DONE.value:
                    status["video"] = self.engine.result(engine_id)
                done.append(job_id)
            statuses[job_id] = status
        free = max(0, self.engine.workers - (len(self._ids) + len(self._refused) - len(done)))
        reply = _unwrap(self.board.call.remote("sync", self.name, statuses, free).result(timeout_s=SYNC_TIMEOUT_S))
        for job_id in done:  # reported: the board holds them now
            self._refused.pop(job_id, None)
            engine_id = self._ids.pop(job_id, None)
            if engine_id is not None:
                self.engine.discard(engine_id)
        for job_id in reply["cancel"]:
            if job_id in self._ids:
                self.engine.cancel(self._ids[job_id])
        for job_id, arguments, seed in reply["take"]:
            self._start(job_id, arguments, seed)
        if reply["take"]:
            self._wake.set()  # report them running at once

    def _start(self, job_id, arguments, seed):
        spec = self.engine.spec
        try:
            self._ids[job_id] = self.engine.submit(
                **dict(arguments, seed=seed), output_type="np", on_progress=lambda *_: self._wake.set(),
                postprocess=lambda frames, call: http.encode_mp4(frames[0], spec.video_fps(call)))
        except (InvalidRequestError, EngineError) as exc:
            self._refused[job_id] = {"state": JobState.FAILED.value, "error": f"{type(exc).__name__}: {exc}",
                                     "cancel_requested": False, "finished_at": time.time()}

    def __del__(self):
        """Serve's graceful shutdown: stop syncing, fail this replica's jobs on the board now, close the engine."""
        self._stop.set()
        self._wake.set()
        try:
            self.board.call.remote("leave", self.name).result(timeout_s=5)
        except Exception:  # the board may be going down with the application
            logger.info("replica %s: could not tell the board it leaves", self.name)
        self.engine.close()


class ClusterJobsApi(http.JobsApi):
    """The HTTP API's endpoints over the board and the model replicas (the request parsing is JobsApi's)."""

    def __init__(self, board, model, description, max_body_bytes=http.MAX_BODY_BYTES):
        self.board, self.model, self.max_body_bytes = board, model, max_body_bytes
        self.http_params = {p.name: p for p in description["params"]}
        self.description = description["info"]
        self.startup_s = description["startup_s"]  # of the replica that answered describe: open and warm up

    async def _board(self, method, *args):
        return _unwrap(await self.board.call.remote(method, *args))

    async def create(self, request):
        arguments = await self._form(request)
        try:
            checked = _unwrap(await self.model.check.remote(arguments))
            job_id = uuid.uuid4().hex
            status = await self._board("enqueue", job_id, arguments, checked["seed"], checked["status"])
        finally:
            arguments.clear()
        status.update(status_url=f"/jobs/{job_id}", video_url=f"/jobs/{job_id}/video")
        return JSONResponse(status, status_code=202, headers={"Location": f"/jobs/{job_id}"})

    async def index(self, request):
        return JSONResponse(await self._board("jobs"))

    async def get(self, request):
        return JSONResponse(await self._board("status", request.path_params["job_id"]))

    async def delete(self, request):
        job_id = request.path_params["job_id"]
        status = await self._board("status", job_id)
        if JobState(status["state"]).finished:
            await self._board("discard", job_id)
            return JSONResponse(status | {"discarded": True})
        return JSONResponse(await self._board("cancel", job_id), status_code=202)

    async def events(self, request):
        job_id = request.path_params["job_id"]
        await self._board("status", job_id)  # 404 before the stream starts

        async def fetch(job_id):
            return await self._board("status", job_id)

        return StreamingResponse(http.progress_events(job_id, fetch, EVENTS_POLL_S), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def video(self, request):
        job_id = request.path_params["job_id"]
        http.video_ready(job_id, await self._board("status", job_id))
        data = await self._board("result", job_id)
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.mp4"'})

    async def info(self, request):
        stats = await self._board("stats")
        return JSONResponse({**self.description, "max_body_bytes": self.max_body_bytes,
                             "replica_startup_s": self.startup_s, **stats})

    async def health(self, request):
        stats = await self._board("stats")
        return JSONResponse({"status": "ok", "pipeline": self.description["pipeline"], **stats})


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API (server.api_app) over the board and the model replicas."""

    async def __init__(self, board, model, max_body_bytes=http.MAX_BODY_BYTES):
        self.api = ClusterJobsApi(board, model, await model.describe.remote(), max_body_bytes)

    def __serve_build_asgi_app__(self):
        return http.api_app(self.api)


def build_app(artifact, replicas=2, workers=1, max_queue=16, replica_cpus=1, replica_timeout_s=REPLICA_TIMEOUT_S,
              max_body_bytes=http.MAX_BODY_BYTES, **engine_options):
    """The Serve application: ``replicas`` model replicas of ``artifact`` (``workers`` engine threads and
    ``replica_cpus`` Ray CPUs each), one board with a queue of ``max_queue``, one ingress. ``engine_options`` go to
    each replica's Engine (``verify``, ``warmup``, ``backend``, ``device``, ``num_threads``, ...)."""
    for name, value in (("replicas", replicas), ("workers", workers), ("max_queue", max_queue)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    path = Path(artifact).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"artifact {artifact} is not a folder here; pass the artifact folder written by svd-export "
                         "(every node that runs a replica needs it at the same path)")
    board = Board.bind(max_queue, replica_timeout_s)
    model = ModelReplica.options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus}).bind(
        board, str(path), workers, engine_options)
    return Ingress.bind(board, model, max_body_bytes)


def app_builder(args):
    """``import_path`` of a Serve config file (``serve deploy``): the ``args`` mapping is build_app's keywords."""
    return build_app(**args)


def serve_on_ray(artifact, address=None, host="127.0.0.1", port=8000, **app_options):
    """Deploy the application on Ray (a local instance when ``address`` is None, else ``auto`` or HOST:PORT of a
    cluster) with its HTTP proxy on ``host``:``port``, and keep it up until interrupted."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the API has no authentication; put it behind a proxy that has", host)
    app = build_app(artifact, **app_options)  # argument errors before any Ray process starts
    local = address is None
    ray.init(address=address, namespace=APP_NAME, **({"include_dashboard": False} if local else {}))
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        start = time.perf_counter()
        serve.run(app, name=APP_NAME, route_prefix="/")
        logger.info("%s served on http://%s:%d by %d replica(s), deployed in %.1f s; Ctrl-C stops it", artifact,
                    host, port, app_options.get("replicas", 2), time.perf_counter() - start)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        logger.info("stopping")
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        if local:
            serve.shutdown()
        else:  # the cluster and its Serve instance stay up for other applications
            serve.delete(APP_NAME)
        ray.shutdown()
