"""Test helpers: tolerance checks and a MindSpore -> ONNX -> onnxruntime round trip."""

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def assert_close_scaled(out, ref, rel=1e-4, name="output"):
    """max |out - ref| <= rel * max(1, max |ref|), the fixtures' tolerance for component outputs."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"{name}: shape {out.shape} != reference {ref.shape}"
    err = float(np.abs(out - ref).max())
    bound = rel * max(1.0, float(np.abs(ref).max()))
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
    return err


def run_cli(*args, module="framegraph.runtime.cli", env=None, timeout=300):
    """``python -m MODULE ARGS`` (the framegraph CLI by default) in a subprocess, its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_config(path: Path) -> dict:
    """A JSON config file (a scheduler's, a model's) as a dict."""
    return json.loads(path.read_text(encoding="utf-8"))


def assert_close(actual, reference, what: str = "", rtol: float = 1e-5) -> None:
    """Scheduler goldens: within ``rtol`` relative, and ``rtol`` times max(1, max|reference|) absolute."""
    reference = np.asarray(reference)
    atol = rtol * max(1.0, float(np.max(np.abs(reference)))) if reference.size else 0.0
    np.testing.assert_allclose(np.asarray(actual), reference, rtol=rtol, atol=atol, err_msg=what)


@contextmanager
def pynative(ms):
    """Run op by op (seconds on the tiny models, where a graph-mode compile takes 20-40 s). Graph mode is what the
    export compiles, and the export checks every graph against a PyNative run of the same cell."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def onnx_roundtrip(net, inputs, path):
    """Export ``net`` (a MindSpore cell) to ONNX at ``path`` with framegraph's post-pass fixes of the exporter's
    output (Conv pads order), and run it in onnxruntime on ``inputs`` (numpy)."""
    import mindspore as ms
    import onnx
    import onnxruntime as ort

    from framegraph.export.onnx_graph import fix_conv_pads

    stem = str(path)[: -len(".onnx")] if str(path).endswith(".onnx") else str(path)
    ms.export(net, *[ms.Tensor(x) for x in inputs], file_name=stem, file_format="ONNX")
    model = onnx.load(stem + ".onnx")
    fix_conv_pads(model)
    onnx.save(model, stem + ".onnx")
    session = ort.InferenceSession(stem + ".onnx", providers=["CPUExecutionProvider"])
    feeds = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds), stem + ".onnx"


def fail_with_value_error(text):
    """Run in an export child process by the isolation tests: an ordinary error."""
    raise ValueError(text)


def kill_own_process():
    """Run in an export child process by the isolation tests: a death without an error, as the OOM killer does."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def sleep_then_write(path, seconds):
    """Run in an export child process by the isolation tests: outlives a killed parent unless stopped."""
    import time
    from pathlib import Path

    time.sleep(seconds)
    Path(path).write_text("the child outlived its parent")


def find_cycle(graph):
    """One cycle of ``graph`` ({node: nodes it points to}) as a list of nodes (first == last), or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def tiny_onnx_model(sample_shape=(1, 2, 3), out_shape=(1, 2, 3)):
    """out = sample * timestep + 1, doubled = sample * 2: a tiny graph written with the onnx helper API (a dimension
    may be symbolic, e.g. "batch"; a shape of None declares none)."""
    from onnx import TensorProto, helper

    sample_shape = None if sample_shape is None else list(sample_shape)
    out_shape = None if out_shape is None else list(out_shape)
    nodes = [
        helper.make_node("Mul", ["sample", "timestep"], ["scaled"]),
        helper.make_node("Add", ["scaled", "one"], ["out"]),
        helper.make_node("Mul", ["sample", "two"], ["doubled"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, sample_shape),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("doubled", TensorProto.FLOAT, sample_shape)],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                     helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
