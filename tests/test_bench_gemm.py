"""The benchmark's fp32 GEMM peak includes ONNX Runtime's MatMul (scripts/bench_engines.py): its products must be
right, or the peak it reports would not be a GEMM rate."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_engines  # noqa: E402  (scripts/ is not a package)


@pytest.mark.parametrize("constant_b", [False, True])
def test_onnxruntime_matmul_computes_the_product(constant_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((48, 32), dtype=np.float32)
    b = rng.standard_normal((32, 40), dtype=np.float32)
    (product,) = bench_engines.ort_matmul(a, b, threads=1, constant_b=constant_b)()
    np.testing.assert_allclose(product, a @ b, rtol=1e-5, atol=1e-5)


def test_gemm_rates_measure_numpy_and_both_onnxruntime_forms():
    a, b = bench_engines._square_pair(64)
    rates = bench_engines.gemm_rates(a, b, threads=1, repeats=2)
    assert set(rates) == {"numpy_gflops", "onnxruntime_gflops", "onnxruntime_prepacked_gflops"}
    assert all(rate > 0 for rate in rates.values())
