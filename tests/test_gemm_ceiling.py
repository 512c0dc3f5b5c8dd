"""scripts/gemm_ceiling.py: the Gemm shapes it reads from a profile, the FLOP it counts, and its ceiling sums."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

import gemm_ceiling  # noqa: E402  (scripts/ is on pytest's pythonpath)


def _args(*inputs, out):
    return {"input_type_shape": [{"float": list(s)} for s in inputs], "output_type_shape": [{"float": list(out)}]}


def test_gemm_key_tells_a_bias_from_an_unpacked_weight():
    assert gemm_ceiling.gemm_key(_args((8, 4), (16,), out=(8, 16))) == (8, 4, 16, True)  # B prepacked, bias
    assert gemm_ceiling.gemm_key(_args((8, 4), out=(8, 16))) == (8, 4, 16, False)
    assert gemm_ceiling.gemm_key(_args((8, 4), (4, 16), (16,), out=(8, 16))) == (8, 4, 16, True)
    assert gemm_ceiling.gemm_key(_args((8, 4), (4, 16), out=(8, 16))) == (8, 4, 16, False)


def _event(name, op, dur_us):
    return {"name": f"{name}_kernel_time", "dur": dur_us, "args": {"op_name": op}}


def test_ceiling_takes_the_median_run_and_each_other_nodes_fastest_time():
    walls = [3.0, 1.0, 2.0]  # the median run is the third
    per_run = [[_event("g", "Gemm", 2_000_000), _event("c", "Conv", 500_000)],
               [_event("g", "Gemm", 600_000), _event("c", "Conv", 300_000)],
               [_event("g", "Gemm", 1_000_000), _event("c", "Conv", 400_000)]]
    alone = {(64, 64, 64, True): (2, 0.25, 0.5)}  # two nodes of this shape: 0.5 s warm, 1.0 s cold
    figures = gemm_ceiling.ceiling(walls, per_run, alone, peak=100.0, gflop=120.0)
    assert figures["step_s_median"] == 2.0
    assert figures["gemm_in_graph_s"] == 1.0 and figures["time_by_op_s"] == {"Gemm": 1.0, "Conv": 0.4}
    assert figures["gemm_alone_warm_s"] == 0.5 and figures["gemm_alone_cold_s"] == 1.0
    assert figures["rest_floor_s"] == 0.3
    assert figures["ceiling_step_s"] == 0.8
    assert figures["efficiency"] == pytest.approx(120.0 / 2.0 / 100.0)
    assert figures["ceiling_efficiency"] == pytest.approx(120.0 / 0.8 / 100.0)


def _tiny_graph(path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1"),
                    numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b1"),
                    numpy_helper.from_array(rng.standard_normal((96, 32)).astype(np.float32), "w2"),
                    numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "cw"),
                    numpy_helper.from_array(np.array([1, 1, 128, 32], np.int64), "shape")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Gemm", ["s", "w2"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["image"]),
             helper.make_node("Conv", ["image", "cw"], ["out"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [128, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 128, 32])],
                              initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_graph_flops_counts_gemms_and_convolutions(tmp_path):
    _tiny_graph(tmp_path / "tiny.onnx")
    expected = 2 * 128 * 64 * 96 + 2 * 128 * 96 * 32 + 2 * (8 * 128 * 32) * (1 * 3 * 3)
    assert gemm_ceiling.graph_flops(tmp_path / "tiny.onnx") == pytest.approx(expected / 1e9)


def test_main_profiles_a_graph_and_times_its_gemm_shapes(tmp_path):
    _tiny_graph(tmp_path / "tiny.onnx")
    out = tmp_path / "ceiling.json"
    assert gemm_ceiling.main([str(tmp_path / "tiny.onnx"), "--threads", "1", "--warmup", "1", "--runs", "3",
                              "--repeats", "2", "--peak-size", "128", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    shapes = {(r["m"], r["k"], r["n"], r["bias"]) for r in figures["gemm_shapes"]}
    assert shapes == {(128, 64, 96, True), (128, 96, 32, False)}
    assert len(figures["step_s"]) == 3 and figures["peak_gflops"] > 0
    assert figures["ceiling_step_s"] > 0 and figures["gflop"] == pytest.approx(
        gemm_ceiling.graph_flops(tmp_path / "tiny.onnx"), abs=1e-4)


def test_main_rejects_a_missing_graph(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gemm_ceiling.main([str(tmp_path / "absent.onnx")])
    assert "is not a file; pass an exported .onnx graph" in capsys.readouterr().err
