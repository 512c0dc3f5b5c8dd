"""Run a command and report its wall time, the peak RSS of its process tree and the size of an output folder.

    python scripts/measure.py --size-of OUT -- svd-export --random-weights ../shared/configs/svd-xt --out OUT ...
"""

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("measure")


def folder_bytes(path):
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-of", default=None, help="folder whose size to report after the command")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    code = subprocess.call(command)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    figures = {"command": " ".join(command), "exit_code": code, "wall_s": round(wall, 1),
               "peak_rss_gb": round(peak_kb / 1024 ** 2, 2)}
    if args.size_of:
        figures["size_gb"] = round(folder_bytes(args.size_of) / 1024 ** 3, 3)
    logger.info(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
