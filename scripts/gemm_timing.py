"""fp32 GEMM timing shared by the benchmark scripts: square operands, best-of-N rates, ONNX Runtime products.

bench_engines (the GEMM peak and the rate after an engine's calls), gemm_probe (the rate beside each step) and
gemm_ceiling (the peak and each Gemm shape alone) import these; this module imports no other script. numpy only at
import time: ONNX Runtime and onnx are imported by the calls that build a session.
"""

import gc
import logging
import time

import numpy as np

logger = logging.getLogger("gemm_timing")


def square_pair(n):
    """Two seeded standard-normal fp32 ``n`` x ``n`` matrices: the operands of every square GEMM measured."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)


def best_gflops(name, matmul, n, repeats):
    """GFLOP/s of the fastest of ``repeats`` calls of ``matmul`` (an fp32 ``n``^3 product, 2 n^3 FLOP)."""
    matmul()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - start)
    logger.info("%s %d^3 fp32 matmul: best %.3f s, %.1f GFLOP/s", name, n, best, 2.0 * n ** 3 / best / 1e9)
    return round(2.0 * n ** 3 / best / 1e9, 1)


def ort_matmul(a, b, threads, constant_b, op="MatMul", bias=None, spinning=True):
    """A callable running ``a @ b`` in ONNX Runtime's CPU provider (MLAS: the kernels framegraph's graphs run on),
    with ``b`` a graph input, or an initializer that ONNX Runtime prepacks (``constant_b``) as it does the UNet's
    weights. ``op="Gemm"`` runs it as a Gemm node, as the exported graphs do, adding ``bias`` (a constant row) if
    one is given. ``spinning=False`` lets its threads sleep between runs instead of spinning for more work."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape if name == "a" else b.shape))

    if bias is not None and op != "Gemm":
        raise ValueError(f"a bias needs op='Gemm', not {op!r}")
    inputs = [info("a")] + ([] if constant_b else [info("b")])
    initializers = [numpy_helper.from_array(b, "b")] if constant_b else []
    operands = ["a", "b"]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "bias"))
        operands.append("bias")
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [a.shape[0], b.shape[1]])
    graph = helper.make_graph([helper.make_node(op, operands, ["c"])], "product", inputs, [out], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"a": a} if constant_b else {"a": a, "b": b}
    return lambda: session.run(None, feeds)


def gemm_rates(a, b, threads, repeats, label=""):
    """{name_gflops: rate} of the fp32 product ``a @ b`` with numpy's BLAS and ONNX Runtime (B as an input and B
    prepacked). Each ONNX Runtime session is built right before it is measured and freed after, so that no other
    session's threads compete with it."""
    n = a.shape[0]
    makers = (("numpy", lambda: lambda: a @ b),
              ("onnxruntime", lambda: ort_matmul(a, b, threads, constant_b=False)),
              ("onnxruntime_prepacked", lambda: ort_matmul(a, b, threads, constant_b=True)))
    rates = {}
    for name, make in makers:
        matmul = make()
        rates[f"{name}_gflops"] = best_gflops(name + label, matmul, n, repeats)
        del matmul
        gc.collect()
    return rates
