"""Entry point of the export's child processes: ``python -m framegraph.export.child REQUEST REPLY``.

REQUEST is a pickle of (function, args, log level); REPLY receives (True, result) or (False, exception).
"""

import logging
import pickle
import sys


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
    main(sys.argv[1], sys.argv[2])
