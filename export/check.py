"""Run an exported graph on sample inputs and compare it with the MindSpore model it came from."""

import logging

import numpy as np

logger = logging.getLogger(__name__)

TOLERANCE = {"float32": 1e-4, "float16": 5e-2}
# int8 weights: a sanity bound that catches a broken graph; the accuracy that matters (PSNR of the frames against
# the float graphs) is measured by scripts/bench.py.
INT8_TOLERANCE = 0.25


class ExportCheckError(RuntimeError):
    """An exported graph does not reproduce the MindSpore model within tolerance."""


def run_mindspore(cell, inputs):
    import mindspore as ms

    out = cell(*[ms.Tensor(x) for x in inputs])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.asnumpy() for o in outs]


def run_reference(cell, inputs):
    """The MindSpore model's outputs, run op by op (PyNative), without a third compile of it beside the ONNX and
    MindIR exports, and with its convolutions computed as matrix products over patches
    (``framegraph.models.layers.convolutions_as_matmul``): MindSpore's CPU convolution kernel would make the
    reference of a real-size graph take hours."""
    import mindspore as ms

    from framegraph.models.layers import convolutions_as_matmul

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        with convolutions_as_matmul():
            return run_mindspore(cell, inputs)
    finally:
        ms.set_context(mode=mode)


def run_onnx(path, names, inputs):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, inputs)))


def run_mindir(path, inputs):
    import mindspore as ms
    from mindspore import nn

    graph = nn.GraphCell(ms.load(str(path)))
    return run_mindspore(graph, inputs)


def compare(graph_label, outputs, references, dtype, tolerance=None):
    """Max abs error scaled as in the fixtures: error / max(1, max|ref|); raises above ``tolerance`` (default: the
    dtype's)."""
    worst = 0.0
    for out, ref in zip(outputs, references):
        ref64 = ref.astype(np.float64)
        if out.shape != ref.shape:
            raise ExportCheckError(f"{graph_label}: output shape {out.shape} != MindSpore's {ref.shape}")
        if not np.all(np.isfinite(out)):
            raise ExportCheckError(f"{graph_label}: output has NaN/inf")
        err = float(np.abs(out.astype(np.float64) - ref64).max()) / max(1.0, float(np.abs(ref64).max()))
        worst = max(worst, err)
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    if worst > tolerance:
        raise ExportCheckError(
            f"{graph_label}: exported graph differs from the MindSpore model by {worst:.3e} (scaled max abs error), "
            f"above its tolerance {tolerance:.2g} ({dtype}); the export was not written. Report this with the model "
            "config, or export with --no-check to inspect it."
        )
    logger.info("%s: max scaled error %.2e (tolerance %.0e)", graph_label, worst, tolerance)
    return worst
