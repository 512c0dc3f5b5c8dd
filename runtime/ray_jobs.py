"""Where the jobs of a Ray Serve cluster live: the :class:`JobBoard` (plain Python; ``ray_serve`` runs one copy of it
as a single-replica Serve deployment).

The rule: the board is the one source of truth for every job, so any ingress replica can answer for any job.

* ``POST /jobs`` puts the job in the board's bounded queue (full: :class:`QueueFullError`, a 429). Nothing is sent to a
  model replica yet: replicas *pull* work (``sync(..., free=n)``) when one of their engine workers is free, so a job
  never waits behind another on a busy replica while a second one idles.
* Each model replica calls ``sync`` every few tens of milliseconds and after every denoising step and decode chunk:
  it pushes the status of the jobs it runs (progress, then the MP4 bytes or the error once finished) and gets back
  the jobs it takes and the ids to cancel. A cancel of a queued job takes effect at once (the board drops it); a
  running job's cancel reaches its replica with the next ``sync``.
* A replica that has not called ``sync`` for ``replica_timeout_s`` is dead (process killed, node lost, hung): every
  job it was running is failed with an error naming the replica. A job is never retried behind the client's back
  (its seed and arguments are in its status, so resubmitting is one request).
"""

import collections
import logging
import time

from framegraph.runtime.engine_jobs import JobState, QueueFullError, UnknownJobError

logger = logging.getLogger(__name__)

KEEP_FINISHED = 256
REPLICA_TIMEOUT_S = 15.0


class JobBoard:
    """Job id -> status, the queue of jobs no replica took yet, and the replica of every running job."""

    def __init__(self, max_queue=16, keep_finished=KEEP_FINISHED, replica_timeout_s=REPLICA_TIMEOUT_S):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.max_queue, self.keep_finished, self.replica_timeout_s = max_queue, keep_finished, replica_timeout_s
        self._jobs = {}  # id -> status dict (the engine's snapshot keys, plus "replica")
        self._arguments = {}  # id -> (arguments, seed) of a queued job
        self._results = {}  # id -> MP4 bytes of a done job
        self._queue = collections.deque()
        self._finished = collections.OrderedDict()
        self._seen = {}  # replica -> time of its last sync
        self._closed = False

    # -- the ingress ---------------------------------------------------------------------------------------------------
    def enqueue(self, job_id, arguments, seed, status):
        """Queue a checked job (``status``: its initial snapshot); raises QueueFullError when ``max_queue`` wait."""
        self._reap()
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(
                f"the queue is full ({self.max_queue} jobs waiting for a replica); retry when a job has finished, "
                "cancel one, or deploy with more replicas or a larger max_queue"
            )
        self._jobs[job_id] = dict(status, id=job_id, state=JobState.QUEUED.value, replica=None)
        self._arguments[job_id] = (arguments, seed)
        self._queue.append(job_id)
        return self.status(job_id)

    def _job(self, job_id):
        job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise UnknownJobError(f"no job {str(job_id)[:64]!r}: it was never submitted here or has been discarded")
        return job

    def status(self, job_id):
        """The job's status; a queued job's has its ``queue_position``."""
        self._reap()
        status = dict(self._job(job_id))
        if job_id in self._arguments:
            status["queue_position"] = self._queue.index(job_id)
        return status

    def jobs(self):
        self._reap()
        return [dict(job) for job in self._jobs.values()]

    def cancel(self, job_id):
        """Cancel a job: a queued one at once, a running one when its replica next syncs (after its current step)."""
        job = self._job(job_id)
        if not JobState(job["state"]).finished:
            job["cancel_requested"] = True
            if job_id in self._arguments:
                self._queue.remove(job_id)
                self._finish(job_id, JobState.CANCELLED)
        return self.status(job_id)

    def discard(self, job_id):
        """Forget a job and free its video; a job still queued or running is cancelled first."""
        self.cancel(job_id)
        self._jobs.pop(job_id, None)
        self._results.pop(job_id, None)
        self._finished.pop(job_id, None)

    def result(self, job_id):
        """The MP4 bytes of a done job."""
        self._job(job_id)
        return self._results[job_id]

    def stats(self):
        self._reap()
        states = collections.Counter(job["state"] for job in self._jobs.values())
        now = time.monotonic()
        return {"queued": len(self._queue), "max_queue": self.max_queue, "closed": self._closed,
                "jobs": dict(states), "replicas": {name: round(now - seen, 3) for name, seen in self._seen.items()}}

    # -- the model replicas --------------------------------------------------------------------------------------------
    def sync(self, replica, statuses, free):
        """One model replica's report and its orders. ``statuses``: the replica's jobs by board id (a finished one
        carries its MP4 bytes under ``video``, reported once). ``free``: how many jobs it can start now. Returns
        ``{"take": [(id, arguments, seed)], "cancel": [ids], "queued": n}``: the jobs it now runs, the ones it must
        stop, and how many jobs still wait in the queue (what the autoscaler reads, through the replicas)."""
        self._seen[replica] = time.monotonic()
        self._reap()
        cancel = []
        for job_id, status in statuses.items():
            job = self._jobs.get(job_id)
            if job is None or job["replica"] != replica or JobState(job["state"]).finished:
                cancel.append(job_id)  # discarded, or failed here when the replica was thought dead
                continue
            video = status.pop("video", None)
            requested = job["cancel_requested"]
            job.update(status, id=job_id, replica=replica, created_at=job["created_at"],
                       cancel_requested=requested or status["cancel_requested"])
            if requested and not status["cancel_requested"]:
                cancel.append(job_id)
            if JobState(job["state"]).finished:
                if video is not None:
                    self._results[job_id] = video
                self._retire(job_id)
        take = []
        while self._queue and len(take) < free and not self._closed:
            job_id = self._queue.popleft()
            arguments, seed = self._arguments.pop(job_id)
            self._jobs[job_id].update(replica=replica)
            take.append((job_id, arguments, seed))
        return {"take": take, "cancel": cancel, "queued": len(self._queue)}

    def leave(self, replica):
        """A replica shutting down cleanly: its unfinished jobs fail now rather than after the timeout."""
        self._seen[replica] = float("-inf")
        self._reap()

    # -- bookkeeping ---------------------------------------------------------------------------------------------------
    def _reap(self):
        """Fail the running jobs of replicas that stopped syncing (see the module docstring)."""
        now = time.monotonic()
        dead = [name for name, seen in self._seen.items() if now - seen > self.replica_timeout_s]
        for name in dead:
            del self._seen[name]
            lost = [job_id for job_id, job in self._jobs.items()
                    if job["replica"] == name and not JobState(job["state"]).finished]
            for job_id in lost:
                self._finish(job_id, JobState.FAILED, error=(
                    f"ReplicaLost: replica {name} stopped reporting for over {self.replica_timeout_s:g} s (its "
                    "process died, its node was lost, or it hung) while running this job; submit it again (its seed "
                    "and arguments are in this status)"))
            if lost:
                logger.warning("replica %s lost: failed %d job(s) it was running", name, len(lost))

    def _finish(self, job_id, state, error=None):
        job = self._jobs[job_id]
        job.update(state=state.value, error=error, finished_at=time.time())
        self._arguments.pop(job_id, None)
        self._retire(job_id)

    def _retire(self, job_id):
        self._finished[job_id] = None
        while len(self._finished) > self.keep_finished:
            old, _ = self._finished.popitem(last=False)
            self._jobs.pop(old, None)
            self._results.pop(old, None)
