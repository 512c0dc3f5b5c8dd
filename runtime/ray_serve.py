"""Serve an artifact on a Ray cluster with Ray Serve (the ``ray`` extra), behind the same HTTP API as
:mod:`framegraph.runtime.server`.

    framegraph serve out/svd --ray --replicas 2 --port 8000             # a local Ray instance
    framegraph serve out/svd --ray --address auto --replicas 4          # the cluster this node belongs to
    framegraph serve out/svd --ray --serve-config app.yaml; serve deploy app.yaml  # the same app, declaratively

One Serve application, three deployments (docs/scale-out.md has the design):

* ``ModelReplica`` (``replicas`` of them, or between ``replicas`` and ``max_replicas`` as Serve's autoscaler decides
  from the queue length: :class:`QueueLengthPolicy`): opens the artifact once, warms it up, and runs jobs on an
  :class:`~framegraph.runtime.engine.Engine` whose threads are the CPUs Ray granted the replica (``replica_cpus``).
  It checks requests for the ingress (``check``: the 422s) and pulls queued jobs from the board whenever one of its
  engine workers is free. Stopped (scale-down, redeploy, shutdown), it takes no new job and finishes its running
  ones for up to ``drain_timeout_s`` before it leaves.
* ``Board`` (one replica): the :class:`~framegraph.runtime.ray_jobs.JobBoard`, where every job's state lives: the
  bounded queue (429), each job's progress and replica, the videos of finished jobs, the replicas' heartbeats.
* ``Ingress``: the Starlette app of :mod:`framegraph.runtime.server` over the board, so every path, JSON body and
  status code is the single-process server's. Any number of ingress replicas answer for any job.

The artifact path must name the same artifact on every node that runs a model replica (a shared or synced folder).
"""

import logging
import math
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
DRAIN_TIMEOUT_S = 120
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

    def __init__(self, board, artifact, workers=1, engine_options=None, drain_timeout_s=DRAIN_TIMEOUT_S):
        start = time.perf_counter()
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.name = f"{replica_id}@{socket.gethostname()}:{os.getpid()}"
        options = dict(engine_options or {})
        options.setdefault("num_threads", granted_threads(workers))
        self.threads = options["num_threads"]
        self.engine = Engine(artifact, workers=workers, max_queue=workers, **options)
        self.startup_s = time.perf_counter() - start
        self.board, self.drain_timeout_s = board, drain_timeout_s
        self._ids = {}  # board job id -> engine job id
        self._refused = {}  # board job id -> status of a job the engine refused to start
        self._queued = 0  # jobs waiting on the board at the last sync (the autoscaler's metric)
        self._draining = False
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._pump, name="framegraph-board-sync", daemon=True)
        self._thread.start()
        logger.info("replica %s ready in %.2f s (artifact opened and warmed up; %s thread(s) per session)", self.name,
                    self.startup_s, self.threads)

    # -- called by the ingress -----------------------------------------------------------------------------------------
    def describe(self):
        """What the ingress needs to parse requests and answer GET /info."""
        artifact = self.engine.pipeline.artifact
        return {
            "params": [p for p in self.engine.spec.params if p.http],
            "info": {"pipeline": self.engine.kind, "defaults": artifact.defaults,
                     "buckets": [g.bucket | {"graph": g.name} for g in artifact.manifest.graphs
                                 if g.format == artifact.format],
                     "workers": self.engine.workers, "sessions": self.engine.sessions,
                     "threads": self.threads},
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

    def record_autoscaling_stats(self):
        """Serve's custom autoscaling metrics (read by :class:`QueueLengthPolicy`): the board's queue length at the
        last sync and the jobs this replica runs."""
        return {"queued": self._queued, "running": len(self._ids)}

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
        free = 0 if self._draining else max(0, self.engine.workers - (len(self._ids) + len(self._refused) - len(done)))
        reply = _unwrap(self.board.call.remote("sync", self.name, statuses, free).result(timeout_s=SYNC_TIMEOUT_S))
        self._queued = reply["queued"]
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
        """Serve's graceful shutdown (scale-down, redeploy, shutdown): take no new job, let the running ones finish and
        be reported for up to ``drain_timeout_s``, then stop syncing, fail what is left on the board now (rather than
        after the replica timeout) and close the engine."""
        self._draining = True
        deadline = time.monotonic() + self.drain_timeout_s
        while (self._ids or self._refused) and self._thread.is_alive() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(SYNC_S)
        if self._ids:
            logger.warning("replica %s stops with %d job(s) still running after %g s; they fail", self.name,
                           len(self._ids), self.drain_timeout_s)
        self._stop.set()
        self._wake.set()
        try:
            self.board.call.remote("leave", self.name).result(timeout_s=5)
        except Exception:  # the board may be going down with the application
            logger.info("replica %s: could not tell the board it leaves", self.name)
        self.engine.close()


def granted_threads(workers):
    """Intra-op threads per engine session: the CPUs Ray granted this replica, shared by its ``workers`` (at least
    one each)."""
    granted = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, int(granted // workers))


class QueueLengthPolicy:
    """Serve's autoscaling policy for the model replicas: one replica per ``jobs_per_replica`` jobs running or waiting
    (a replica runs as many jobs as its engine has workers). It reads the replicas' custom metrics
    (``ModelReplica.record_autoscaling_stats``): the board's queue length, which every replica reports alike (the
    largest report counts), and each replica's running jobs (summed). Serve applies ``min_replicas`` /
    ``max_replicas`` and the up- and downscale delays around it."""

    def __init__(self, jobs_per_replica=1):
        self.jobs_per_replica = jobs_per_replica

    def __call__(self, ctx):
        metrics = ctx.aggregated_metrics or {}
        queued, running = metrics.get("queued"), metrics.get("running")
        if not queued or not running:  # no report yet: keep the current target
            return ctx.target_num_replicas, {}
        work = max(queued.values()) + sum(running.values())
        return math.ceil(work / self.jobs_per_replica), {}


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


def check_app_options(artifact, replicas=2, max_replicas=None, workers=1, max_queue=16, replica_cpus=1, **_):
    """Refuse bad application options before any Ray process starts; returns the artifact's absolute path."""
    for name, value in (("workers", workers), ("max_queue", max_queue)) + (
            () if replicas == "auto" else (("replicas", replicas),)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_replicas is not None and (not isinstance(max_replicas, int) or isinstance(max_replicas, bool) or (
            replicas != "auto" and max_replicas < replicas)):
        raise ValueError(f"max_replicas (--max-replicas) must be an integer >= replicas ({replicas}), got "
                         f"{max_replicas!r}")
    if not isinstance(replica_cpus, (int, float)) or not replica_cpus > 0:
        raise ValueError(f"replica_cpus (--replica-cpus) must be a number > 0, got {replica_cpus!r}")
    path = Path(artifact).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"artifact {artifact} is not a folder here; pass the artifact folder written by svd-export "
                         "(every node that runs a replica needs it at the same path)")
    return path


def cluster_replicas(replica_cpus):
    """``replicas="auto"``: as many replicas as the cluster's CPUs hold at ``replica_cpus`` each (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", 0) // replica_cpus))


def build_app(artifact, replicas=2, max_replicas=None, workers=1, max_queue=16, replica_cpus=1,
              replica_timeout_s=REPLICA_TIMEOUT_S, drain_timeout_s=DRAIN_TIMEOUT_S, upscale_delay_s=10.0,
              downscale_delay_s=60.0, max_body_bytes=http.MAX_BODY_BYTES, **engine_options):
    """The Serve application: model replicas of ``artifact`` (``workers`` engine workers and ``replica_cpus`` Ray CPUs
    each, so a node of C CPUs holds C // replica_cpus of them), one board with a queue of ``max_queue``, one ingress.

    ``replicas``: how many, or "auto" for one per ``replica_cpus`` CPUs of the cluster (needs Ray initialized). With
    ``max_replicas`` above it, Serve autoscales between the two on the queue length (:class:`QueueLengthPolicy`,
    reacting after ``upscale_delay_s`` / ``downscale_delay_s``). ``engine_options`` go to each replica's Engine
    (``verify``, ``warmup``, ``backend``, ``device``, ``num_threads`` -- by default the replica's granted CPUs)."""
    path = check_app_options(artifact, replicas, max_replicas, workers, max_queue, replica_cpus)
    if replicas == "auto":
        replicas = cluster_replicas(replica_cpus)
        max_replicas = None if max_replicas is None else max(max_replicas, replicas)
    if max_replicas is None or max_replicas == replicas:
        scaling = {"num_replicas": replicas}
    else:
        scaling = {"autoscaling_config": {
            "min_replicas": replicas, "max_replicas": max_replicas, "initial_replicas": replicas,
            "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s, "look_back_period_s": 2.0,
            "policy": {"policy_function": f"{__name__}:QueueLengthPolicy",
                       "policy_kwargs": {"jobs_per_replica": workers}}}}
    board = Board.bind(max_queue, replica_timeout_s)
    model = ModelReplica.options(**scaling, ray_actor_options={"num_cpus": replica_cpus},
                                 graceful_shutdown_timeout_s=drain_timeout_s + 10).bind(
        board, str(path), workers, engine_options, drain_timeout_s)
    return Ingress.bind(board, model, max_body_bytes)


def app_builder(args):
    """``import_path`` of a Serve config file (``serve deploy``): the ``args`` mapping is build_app's keywords."""
    return build_app(**args)


def serve_config(artifact, host="127.0.0.1", port=8000, **app_options):
    """The Serve config (a dict; write it as YAML) that deploys this application with ``serve deploy`` on a running
    cluster: ``app_options`` are build_app's keywords, the artifact path is made absolute."""
    path = check_app_options(artifact, **app_options)
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": f"{__name__}:app_builder",
                              "args": {"artifact": str(path), **app_options}}]}


def write_serve_config(out, artifact, **options):
    """Write :func:`serve_config` to ``out`` as YAML (refusing to replace an existing file); returns its path."""
    import yaml

    config = serve_config(artifact, **options)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; pass a new path to --serve-config (an existing file is never replaced)")
    with open(out, "x") as f:
        f.write("# Serve config for `serve deploy` on a running Ray cluster, written by framegraph serve --ray "
                "--serve-config.\n# `artifact` must name the same artifact folder on every node that can run a "
                "model replica.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return out


def serve_on_ray(artifact, address=None, host="127.0.0.1", port=8000, **app_options):
    """Deploy the application on Ray (a local instance when ``address`` is None, else ``auto`` or HOST:PORT of a
    cluster) with its HTTP proxy on ``host``:``port``, and keep it up until interrupted."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: the API has no authentication; put it behind a proxy that has", host)
    check_app_options(artifact, **app_options)  # argument errors before any Ray process starts
    local = address is None
    ray.init(address=address, namespace=APP_NAME, **({"include_dashboard": False} if local else {}))
    try:
        app = build_app(artifact, **app_options)
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        start = time.perf_counter()
        serve.run(app, name=APP_NAME, route_prefix="/")
        logger.info("%s served on http://%s:%d by %s replica(s), deployed in %.1f s; Ctrl-C stops it", artifact,
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
