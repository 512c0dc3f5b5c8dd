"""Measurements of the benchmark scripts that do not need torch: the fp32 GEMM peak (scripts/gemm_timing.py)
includes ONNX Runtime's MatMul (its products must be right, or the peak it reports would not be a GEMM rate), and
scripts/bench_engines.py reads the CPU time stolen by the hypervisor during a call."""

import numpy as np
import pytest

pytest.importorskip("onnx")

import bench_engines  # noqa: E402  (scripts/ is on pytest's pythonpath)
import gemm_timing  # noqa: E402


@pytest.mark.parametrize("constant_b", [False, True])
def test_onnxruntime_matmul_computes_the_product(constant_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((48, 32), dtype=np.float32)
    b = rng.standard_normal((32, 40), dtype=np.float32)
    (product,) = gemm_timing.ort_matmul(a, b, threads=1, constant_b=constant_b)()
    np.testing.assert_allclose(product, a @ b, rtol=1e-5, atol=1e-5)


def test_onnxruntime_gemm_adds_the_bias_and_refuses_one_on_matmul():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((16, 8), dtype=np.float32)
    b = rng.standard_normal((8, 12), dtype=np.float32)
    bias = rng.standard_normal(12, dtype=np.float32)
    (product,) = gemm_timing.ort_matmul(a, b, threads=1, constant_b=True, op="Gemm", bias=bias)()
    np.testing.assert_allclose(product, a @ b + bias, rtol=1e-5, atol=1e-5)
    (product,) = gemm_timing.ort_matmul(a, b, threads=1, constant_b=True, op="Gemm")()
    np.testing.assert_allclose(product, a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a bias needs op='Gemm'"):
        gemm_timing.ort_matmul(a, b, threads=1, constant_b=True, bias=bias)


def test_gemm_rates_measure_numpy_and_both_onnxruntime_forms():
    a, b = gemm_timing.square_pair(64)
    rates = gemm_timing.gemm_rates(a, b, threads=1, repeats=2)
    assert set(rates) == {"numpy_gflops", "onnxruntime_gflops", "onnxruntime_prepacked_gflops"}
    assert all(rate > 0 for rate in rates.values())


def test_stolen_cpu_time_is_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 5 0 0 250 0 0\ncpu0 50 0 25 500 2 0 0 125 0 0\n")
    ticks = bench_engines.os.sysconf("SC_CLK_TCK")
    assert bench_engines.stolen_s(stat) == pytest.approx(250 / ticks)
    stat.write_text("cpu  100 0 50\n")  # a kernel that does not report steal
    assert bench_engines.stolen_s(stat) is None
