"""Both sides of a call in a child process: :func:`run_in_child` (the parent) and the entry point the child runs,
``python -m framegraph.export.child REQUEST REPLY PARENT_PID``.

REQUEST is a pickle of (function, args, log level); REPLY receives (True, result) or (False, exception). A fresh
interpreter rather than multiprocessing, whose spawn re-runs the caller's main script. A child whose parent dies
(a killed export) exits at once instead of finishing its graph into a removed staging folder.
"""

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PARENT_POLL_S = 1.0


class ExportChildDied(RuntimeError):
    """A child process died without reporting an error (killed by a signal, usually out of memory)."""


def run_in_child(label, function, *args):
    """``function(*args)`` in a fresh Python process; returns its result, and re-raises its exceptions here.
    ``function`` and ``args`` must pickle (a module-level function; ``label`` names the work in errors)."""
    level = logging.getLogger().getEffectiveLevel()
    with tempfile.TemporaryDirectory(prefix="framegraph-child-") as tmp:
        request, reply = Path(tmp) / "request.pkl", Path(tmp) / "reply.pkl"
        with open(request, "wb") as f:
            pickle.dump((function, args, level), f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "framegraph.export.child", str(request), str(reply),
                               str(os.getpid())], env=env)
        if proc.returncode == 0 and reply.is_file():
            with open(reply, "rb") as f:
                ok, value = pickle.load(f)
            if ok:
                return value
            raise value
        if proc.returncode < 0:
            how = f"was killed by {signal.Signals(-proc.returncode).name}"
        else:
            how = f"exited with status {proc.returncode}"
        raise ExportChildDied(
            f"the child process for {label} {how} without reporting an error (running out of memory is the usual "
            "cause): close other programs, or export fewer formats or buckets per run"
        )


def exit_with_parent(parent_pid):
    """Exit this process (status 3) as soon as ``parent_pid`` is no longer its parent."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(request, reply):
    """The child's side: run the pickled call in ``request`` and pickle its outcome into ``reply``."""
    with open(request, "rb") as f:
        function, args, level = pickle.load(f)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[child]: %(message)s")
    try:
        result = (True, function(*args))
    except Exception as exc:  # noqa: BLE001 -- handed to the parent, which re-raises it
        result = (False, exc)
    try:
        data = pickle.dumps(result)
    except Exception:  # noqa: BLE001 -- an exception that does not pickle is passed on as text
        data = pickle.dumps((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]}")))
    with open(reply, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    exit_with_parent(int(sys.argv[3]))
    main(sys.argv[1], sys.argv[2])
