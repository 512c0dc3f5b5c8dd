"""Test helpers: tolerance checks and a MindSpore -> ONNX -> onnxruntime round trip."""

from contextlib import contextmanager

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
