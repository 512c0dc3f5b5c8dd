"""Run a command and report its wall time, its peak memory and the size of an output folder.

Peak memory is reported two ways: ``peak_rss_gb``, the largest sum of RSS over the whole process tree (sampled
every 0.2 s with psutil, so the command's child processes count together), and ``max_process_rss_gb``, the
largest RSS of any single process (exact, from the kernel's accounting).

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


def tree_rss(pid, skip=()):
    """RSS in bytes of ``pid`` and all its descendants (0 if psutil is missing or the process is gone), leaving out
    the descendants whose command line contains one of the strings in ``skip`` (measuring tools such as
    gemm_probe.py)."""
    try:
        import psutil

        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except Exception:  # noqa: BLE001 -- psutil missing or the process ended between samples
        return 0
    total = 0
    for proc in procs:
        try:
            if proc.pid != pid and skip and any(word in part for part in proc.cmdline() for word in skip):
                continue
            total += proc.memory_info().rss
        except Exception:  # noqa: BLE001 -- a child ended while sampling
            pass
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-of", default=None, help="folder whose size to report after the command")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    tree_peak = 0
    while proc.poll() is None:
        tree_peak = max(tree_peak, tree_rss(proc.pid))
        time.sleep(0.2)
    code = proc.returncode
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    figures = {"command": " ".join(command), "exit_code": code, "wall_s": round(wall, 1),
               "peak_rss_gb": round(max(tree_peak, peak_kb * 1024) / 1024 ** 3, 2),
               "max_process_rss_gb": round(peak_kb / 1024 ** 2, 2)}
    if args.size_of:
        figures["size_gb"] = round(folder_bytes(args.size_of) / 1024 ** 3, 3)
    logger.info(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
