"""The machine's fp32 GEMM rate measured beside each denoising step, in a process of its own.

This VM's speed drifts by whole phases (the 4096-cube GEMM measured 263-421 GFLOP/s within hours), so an
efficiency taken against a GEMM peak measured minutes before the steps says as much about the machine as about the
engine. ``GemmProbe`` keeps a child process that holds one ONNX Runtime session of the fp32 ``n``-cube product with
a prepacked B (the form the GEMM peak takes on this CPU) and, on each request, times ``repeats`` runs of it and
answers the fastest rate. bench_engines asks for one after every step of the timed call, with the step clock
paused, so each step has a GEMM rate measured seconds before and after it.

The child is its own process so that its arrays (about 0.2 GB at n=4096) never count in the engine's peak RSS;
its ONNX Runtime threads do not spin, so that it takes no CPU while the engine runs.

    python scripts/gemm_probe.py --n 4096 --threads 2 --repeats 2    # the child side: one rate per input line
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from gemm_timing import ort_matmul, square_pair


class GemmProbeError(RuntimeError):
    pass


class GemmProbe:
    """``probe()`` -> the best GFLOP/s of ``repeats`` fp32 ``n``-cube products, run in the child process."""

    def __init__(self, n=4096, threads=1, repeats=2, timeout=120.0):
        self.n = int(n)
        self.timeout = timeout
        command = [sys.executable, str(Path(__file__).resolve()), "--n", str(self.n), "--threads", str(threads),
                   "--repeats", str(repeats)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            self.close()
            raise GemmProbeError(f"the GEMM probe process did not start (it said {ready!r}); run "
                                 f"{' '.join(command)} to see why")

    def probe(self):
        if self.proc.poll() is not None:
            raise GemmProbeError(f"the GEMM probe process exited with {self.proc.returncode}")
        self.proc.stdin.write("probe\n")
        answer = self.proc.stdout.readline().strip()
        try:
            return float(answer)
        except ValueError:
            raise GemmProbeError(f"the GEMM probe process answered {answer!r}, not a rate") from None

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=self.timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(n, threads, repeats, lines=sys.stdin, out=sys.stdout):
    """The child side: one best-of-``repeats`` rate written per line read, until the input ends."""
    a, b = square_pair(n)
    matmul = ort_matmul(a, b, threads, constant_b=True, spinning=False)
    matmul()  # B is packed at the session build; this run settles the arena
    out.write("ready\n")
    out.flush()
    for _ in lines:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul()
            best = min(best, time.perf_counter() - start)
        out.write(f"{2.0 * n ** 3 / best / 1e9:.1f}\n")
        out.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    serve(args.n, args.threads, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
