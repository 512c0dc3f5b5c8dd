"""Entry point of the export's child processes: ``python -m framegraph.export.child REQUEST REPLY PARENT_PID``.

REQUEST is a pickle of (function, args, log level); REPLY receives (True, result) or (False, exception). A child
whose parent dies (a killed export) exits at once instead of finishing its graph into a removed staging folder.
"""

import logging
import os
import pickle
import sys
import threading
import time

PARENT_POLL_S = 1.0


def exit_with_parent(parent_pid):
    """Exit this process (status 3) as soon as ``parent_pid`` is no longer its parent."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(request, reply):
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
