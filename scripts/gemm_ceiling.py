"""How close can a graph's step get to the machine's fp32 GEMM peak? Its own GEMM shapes, timed alone, say.

    python scripts/gemm_ceiling.py out/bench/svd-xt/artifact-128x128-f4-6-onnx/unet/unet_f4_b2_h128_w128.onnx \\
        --gflop 583.9 --json ceiling.json

In one run, on ONNX Runtime's CPU provider with ``--threads`` intra-op threads:
  1. the fp32 GEMM peak: a 4096-cube product with numpy and with ONNX Runtime (B as an input and B prepacked), best
     of 5, the fastest of them, measured before and after the rest (as bench.py measures it);
  2. the graph (random inputs of its declared shapes) runs ``--warmup`` times, then ``--runs`` times profiled: the
     wall time of each run, and per op type the time of the median run;
  3. every distinct Gemm of the graph (rows M, depth K, columns N, with or without a bias) is built alone with a
     prepacked weight, as the graph's are, and timed: the best of ``--repeats`` runs with its operands in cache
     (warm), and the median with a 64 MiB buffer written between runs (cold: weights and activations come from
     memory, as they do in a step that reads every weight once).

The ceiling is the step if every Gemm ran at its warm best alone while the rest of the graph (convolutions,
normalisations, attention) took its fastest profiled time: ``--gflop`` (the step's FLOP count, for example
diffusers' from bench.py; default: the graph's Gemm and Conv FLOP) divided by it, and by the peak, is the best
efficiency this graph's shapes allow on this machine with these kernels.
"""

import argparse
import collections
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gemm_timing import gemm_rates, ort_matmul, square_pair

logger = logging.getLogger("gemm_ceiling")

FLUSH_BYTES = 64 * 2 ** 20  # twice the largest L3 this project has run on
GEMM_OPS = ("Gemm", "FusedGemm")  # FusedGemm: a Gemm with its activation folded in by ONNX Runtime


def random_feeds(session, seed=0):
    """Inputs of the session's declared (static) shapes: standard normal floats, zeros for integers."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for item in session.get_inputs():
        if any(not isinstance(d, int) for d in item.shape):
            raise ValueError(f"input {item.name} has the dynamic shape {item.shape}; export static-shape graphs")
        if item.type == "tensor(float)":
            feeds[item.name] = rng.standard_normal(item.shape).astype(np.float32)
        else:
            feeds[item.name] = np.zeros(item.shape, np.int64)
    return feeds


def _shapes(entries):
    return [next(iter(entry.values())) for entry in entries]


def gemm_key(args):
    """(M, K, N, biased) of a profiled Gemm node from its shapes. A prepacked B is not listed among the inputs,
    so the second input is B only when it is the (K, N) matrix."""
    inputs, (out,) = _shapes(args["input_type_shape"]), _shapes(args["output_type_shape"])
    m, k = inputs[0]
    n = out[-1]
    rest = inputs[1:]
    if rest and list(rest[0]) == [k, n]:
        rest = rest[1:]
    return int(m), int(k), int(n), bool(rest)


def profile_runs(path, threads, warmup, runs):
    """Wall times of ``runs`` profiled runs of the graph at ``path``, and its profile's node events per run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    prefix = tempfile.mkdtemp(prefix="gemm_ceiling_")
    options.profile_file_prefix = os.path.join(prefix, "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = random_feeds(session)
    for _ in range(warmup):
        session.run(None, feeds)
    walls = []
    for number in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        walls.append(time.perf_counter() - start)
        logger.info("profiled run %d: %.3f s", number + 1, walls[-1])
    events = json.loads(Path(session.end_profiling()).read_text())
    del session
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][-runs:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = [[e for e in nodes if start <= e["ts"] <= end] for start, end in spans]
    shutil.rmtree(prefix)
    return walls, per_run


def single_gemm(m, k, n, biased, threads, seed=0):
    """A callable running one Gemm of the given shape, with a prepacked random weight (and bias), in ONNX Runtime."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if biased else None
    return ort_matmul(a, weight, threads, constant_b=True, op="Gemm", bias=bias)


def time_alone(run, repeats, flush):
    """(best warm seconds, median cold seconds) of ``run``; cold runs follow a write over ``flush``."""
    for _ in range(3):
        run()
    warm, cold = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        warm.append(time.perf_counter() - start)
        flush += 1.0
        start = time.perf_counter()
        run()
        cold.append(time.perf_counter() - start)
    return min(warm), statistics.median(cold)


def graph_flops(path):
    """GFLOP of the graph's Gemm, MatMul and Conv nodes (2 per multiply-add), from ONNX shape inference."""
    import onnx

    from framegraph.export.onnx_fusions import static_shapes

    model = onnx.load(str(path), load_external_data=False)
    shapes = {**{init.name: list(init.dims) for init in model.graph.initializer}, **static_shapes(model)}
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if out is None:
            continue
        if node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a is None:
                continue
            transposed = any(att.name == "transA" and att.i for att in node.attribute)
            k = a[-2] if transposed and node.op_type == "Gemm" else a[-1]
            total += 2 * int(np.prod(out)) * k
        elif node.op_type == "Conv":
            w = shapes.get(node.input[1])
            if w is not None:
                total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return total / 1e9


def median_run(walls, per_run):
    """The node events of the run whose wall time is the median."""
    return per_run[sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]]


def ceiling(walls, per_run, alone, peak, gflop):
    """The figures of the summary (see the module docstring); times in seconds to the profile's microsecond."""
    by_op = collections.Counter()
    for event in median_run(walls, per_run):
        by_op[event["args"]["op_name"]] += event["dur"] / 1e6
    floors = collections.defaultdict(lambda: float("inf"))  # each node's fastest run
    for run in per_run:
        for event in run:
            key = (event["name"], event["args"]["op_name"])
            floors[key] = min(floors[key], event["dur"] / 1e6)
    rest_floor = sum(t for (_, op), t in floors.items() if op not in GEMM_OPS)
    gemm_alone = sum(count * warm for count, warm, _ in alone.values())
    ceiling_s = gemm_alone + rest_floor
    step = statistics.median(walls)
    return {
        "step_s_median": round(step, 6), "step_s": [round(w, 6) for w in walls],
        "time_by_op_s": {op: round(t, 6) for op, t in by_op.most_common()},
        "gemm_in_graph_s": round(sum(by_op[op] for op in GEMM_OPS), 6), "gemm_alone_warm_s": round(gemm_alone, 6),
        "gemm_alone_cold_s": round(sum(count * cold for count, _, cold in alone.values()), 6),
        "rest_floor_s": round(rest_floor, 6), "ceiling_step_s": round(ceiling_s, 6),
        "gflop": round(gflop, 4), "peak_gflops": peak,
        "efficiency": round(gflop / step / peak, 3), "ceiling_efficiency": round(gflop / ceiling_s / peak, 3),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", help="an ONNX graph with static input shapes (its external weights beside it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled runs first (the arena settles)")
    parser.add_argument("--runs", type=int, default=5, help="profiled runs")
    parser.add_argument("--repeats", type=int, default=15, help="runs of each Gemm shape alone")
    parser.add_argument("--gflop", type=float, default=None,
                        help="FLOP of one step in GFLOP (default: the graph's Gemm, MatMul and Conv FLOP)")
    parser.add_argument("--peak-size", type=int, default=4096, help="the side of the square GEMM of the peak")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.graph).is_file():
        parser.error(f"{args.graph} is not a file; pass an exported .onnx graph")

    a, b = square_pair(args.peak_size)
    peak_before = max(gemm_rates(a, b, args.threads, repeats=5).values())
    walls, per_run = profile_runs(args.graph, args.threads, args.warmup, args.runs)
    median = median_run(walls, per_run)
    shapes = collections.Counter(gemm_key(e["args"]) for e in median if e["args"]["op_name"] in GEMM_OPS)
    flush = np.zeros(FLUSH_BYTES // 4, np.float32)
    alone = {}
    logger.info("%d Gemm nodes of %d shapes; timing each shape alone", sum(shapes.values()), len(shapes))
    for (m, k, n, biased), count in shapes.items():
        warm, cold = time_alone(single_gemm(m, k, n, biased, args.threads), args.repeats, flush)
        alone[(m, k, n, biased)] = (count, warm, cold)
    peak_after = max(gemm_rates(a, b, args.threads, repeats=5, label=" (after)").values())
    del a, b
    peak = max(peak_before, peak_after)
    gflop = args.gflop if args.gflop is not None else graph_flops(args.graph)
    figures = {**ceiling(walls, per_run, alone, peak, gflop), "peak_before_gflops": peak_before,
               "peak_after_gflops": peak_after}

    in_graph = collections.defaultdict(float)
    for event in median:
        if event["args"]["op_name"] in GEMM_OPS:
            in_graph[gemm_key(event["args"])] += event["dur"] / 1e6
    rows = []
    logger.info("%-22s %5s %10s %12s %12s %12s", "Gemm M x K x N", "nodes", "in graph s", "in graph GF/s",
                "alone warm", "alone cold")
    for key, (count, warm, cold) in sorted(alone.items(), key=lambda kv: -in_graph[kv[0]]):
        m, k, n, biased = key
        gf = 2 * m * k * n / 1e9
        rows.append({"m": m, "k": k, "n": n, "bias": biased, "nodes": count, "in_graph_s": round(in_graph[key], 5),
                     "in_graph_gflops": round(count * gf / in_graph[key], 1),
                     "alone_warm_gflops": round(gf / warm, 1), "alone_cold_gflops": round(gf / cold, 1)})
        logger.info("%-22s %5d %10.4f %12.1f %12.1f %12.1f", f"{m}x{k}x{n}{' +b' if biased else ''}", count,
                    in_graph[key], rows[-1]["in_graph_gflops"], rows[-1]["alone_warm_gflops"],
                    rows[-1]["alone_cold_gflops"])
    logger.info("fp32 GEMM peak %.1f GFLOP/s (%.1f before, %.1f after); step median %.3f s (%s); %.4g GFLOP per "
                "step", peak, peak_before, peak_after, figures["step_s_median"],
                ", ".join(f"{w:.3f}" for w in walls), gflop)
    logger.info("Gemm: %.3f s in the median run, %.3f s alone warm, %.3f s alone cold; the rest's floor %.3f s",
                figures["gemm_in_graph_s"], figures["gemm_alone_warm_s"], figures["gemm_alone_cold_s"],
                figures["rest_floor_s"])
    logger.info("efficiency %.1f%% of the peak; ceiling %.3f s = %.1f%% of the peak", 100 * figures["efficiency"],
                figures["ceiling_step_s"], 100 * figures["ceiling_efficiency"])
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "gemm_shapes": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
