"""The check on probe sizes (export/probe_check.py): the comparison of a full-size graph with its probes, on small
hand-written ONNX graphs, and an export of the tiny SVD checked that way."""

import json

import numpy as np
import pytest

SIZES = [(4, 8), (8, 8), (4, 16), (8, 16)]
TARGET = (12, 20)


def _graph(path, h, w, shape=None, weight=None, op="Relu"):
    """x [1, h*w*3] -Reshape [h, w, 3]- -MatMul W [3, 2]- -op- y: the reshape target is the size-dependent integer;
    W sits in an external weights file beside the graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.arange(6, dtype=np.float32).reshape(3, 2) if weight is None else weight
    weights = path.parent / "weights.bin"
    weights.write_bytes(weight.tobytes())
    w_tensor = numpy_helper.from_array(weight, "W")
    w_tensor.ClearField("raw_data")
    w_tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(weight.nbytes))):
        entry = w_tensor.external_data.add()
        entry.key, entry.value = key, value
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(
            np.array(shape or [h, w, 3], dtype=np.int64), "shape")),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["m"]),
        helper.make_node(op, ["m"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h * w * 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [h, w, 2])], [w_tensor])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _probes(tmp_path):
    paths = []
    for h, w in SIZES:
        folder = tmp_path / f"p{h}x{w}"
        folder.mkdir()
        paths.append(_graph(folder / "g.onnx", h, w))
    return paths


def _full(tmp_path, **kwargs):
    folder = tmp_path / "full"
    folder.mkdir(exist_ok=True)
    return _graph(folder / "g.onnx", *TARGET, **kwargs)


def test_a_full_size_graph_whose_integers_follow_the_size_law_is_the_probes_program(tmp_path):
    from framegraph.export.probe_check import prove_same_program

    laws = prove_same_program(_probes(tmp_path), _full(tmp_path), SIZES, TARGET)
    assert laws == 2  # h and w in the reshape target


@pytest.mark.parametrize("change, why", [
    ({"shape": [20, 12, 3]}, "integer"),  # height and width exchanged
    ({"shape": [12, 20, 3], "weight": np.ones((3, 2), np.float32)}, "different weights"),
    ({"op": "Sigmoid"}, "different operators"),
])
def test_a_full_size_graph_that_differs_from_its_probes_is_refused(tmp_path, change, why):
    from framegraph.export.check import ExportCheckError
    from framegraph.export.probe_check import prove_same_program

    with pytest.raises(ExportCheckError, match=why) as raised:
        prove_same_program(_probes(tmp_path), _full(tmp_path, **change), SIZES, TARGET)
    assert "--full-check" in str(raised.value)


def test_the_law_is_bilinear_in_height_and_width():
    from framegraph.export.probe_check import _law

    def f(h, w):
        return 7 + 3 * h - 2 * w + 5 * h * w

    assert _law([f(h, w) for h, w in SIZES], SIZES, (72, 128)) == f(72, 128)
    assert _law([h * h for h, w in SIZES], SIZES, (72, 128)) != 72 * 72  # a square is not extrapolated


class _Folder:
    def __init__(self, root):
        self.root = root

    def path(self, rel):
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def test_a_large_unet_graph_is_checked_on_probes_and_equals_the_model_at_its_size(tmp_path, monkeypatch, ms,
                                                                                  svd_tiny):
    """The tiny SVD UNet at 24x40 with the probe threshold lowered: checked on 4x8 (its entry says so), its
    attention sliced at that size and not at the probes', the probes removed before a commit, and the graph equals
    the MindSpore model at its own size (what --full-check would run)."""
    import onnx

    from framegraph.export import probe_check
    from framegraph.export.check import run_onnx, run_reference
    from framegraph.export.graph_export import apply_graph_options, check_graph, export_graph, probe_multiple
    from framegraph.export.onnx_graph import SharedWeights
    from framegraph.export.options import ExportOptions
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.stable_video_diffusion import recipe as svd_recipe

    monkeypatch.setattr(probe_check, "PROBE_ABOVE_PIXELS", 16 * 32)
    options = ExportOptions(formats=("onnx",), frames=[2], height=24, width=40, attention_slice_mb=2.4)
    pipeline = PipelineFolder(svd_tiny)
    recipe = svd_recipe(pipeline, options)
    component, factories = next((c, f) for c, f in recipe.components if "unet" in f)
    net = apply_graph_options(pipeline.build(component), options)
    spec, bucket = recipe.specs["unet"], {"num_frames": 2, "batch": 2, "height": 24, "width": 40}
    folder = _Folder(tmp_path)
    (graph,) = export_graph(folder, spec, lambda b: factories["unet"](net, b), [bucket], ["onnx"], "float32",
                            weights=SharedWeights(folder.path("unet/weights.bin")),
                            probes=probe_multiple(recipe, options))
    assert probe_multiple(recipe, options) == 4
    assert graph.entry.checked_on == dict(bucket, height=4, width=8)
    assert check_graph(graph, "float32") <= 1e-4
    unet = graph.files[0]
    slices = sum(n.op_type == "Slice" for n in onnx.load(str(unet), load_external_data=False).graph.node)
    probe_slices = sum(n.op_type == "Slice" for n in onnx.load(str(graph.check_file),
                                                              load_external_data=False).graph.node)
    assert slices > probe_slices
    assert len(list(tmp_path.rglob(".probe-*"))) == 5  # four graphs and their scratch weights
    probe_check.remove_probes(tmp_path)
    assert not list(tmp_path.rglob(".probe-*")) and unet.is_file()

    inputs = spec.sample_inputs(bucket)
    (ref,) = run_reference(factories["unet"](net, bucket), inputs)
    (got,) = run_onnx(unet, [t.name for t in spec.input_specs(bucket)], inputs)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_a_large_export_in_formats_the_probes_cannot_check_is_refused_before_any_work(tmp_path, monkeypatch, ms,
                                                                                      svd_tiny):
    from framegraph.export import probe_check
    from framegraph.export.options import ExportOptions
    from framegraph.export.pipeline_folder import PipelineFolder
    from framegraph.export.stable_video_diffusion import export_stable_video_diffusion

    monkeypatch.setattr(probe_check, "PROBE_ABOVE_PIXELS", 16 * 32)
    options = ExportOptions(formats=("onnx", "mindir"), frames=[2], height=24, width=40)
    with pytest.raises(ValueError, match="--formats onnx.*--full-check"):
        export_stable_video_diffusion(PipelineFolder(svd_tiny), tmp_path / "art", options)
    assert not list(tmp_path.iterdir())
