"""The GEMM rate measured beside each benchmark step (scripts/gemm_probe.py): the child process answers rates, the
step clock leaves the probes out, and bench.py pairs each step with the rates around it."""

import io
import os
import time

import pytest

pytest.importorskip("onnx")

import bench  # noqa: E402  (scripts/ is on pytest's pythonpath)
import bench_engines  # noqa: E402
import gemm_probe  # noqa: E402
import measure  # noqa: E402


def test_the_probe_process_answers_a_rate_per_request_and_exits_when_closed():
    # n=128: a product long enough that its rate, written to one decimal, stays above 0.0 on a busy machine
    with gemm_probe.GemmProbe(n=128, threads=1, repeats=2) as probe:
        rates = [probe.probe() for _ in range(3)]
        assert all(rate > 0 for rate in rates)
    assert probe.proc.returncode == 0
    with pytest.raises(gemm_probe.GemmProbeError, match="exited"):
        probe.probe()


def test_the_serving_side_writes_ready_then_one_line_per_request():
    out = io.StringIO()
    gemm_probe.serve(128, threads=1, repeats=1, lines=io.StringIO("probe\nprobe\n"), out=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "ready" and len(lines) == 3
    assert all(float(line) > 0 for line in lines[1:])


class SlowProbe:
    def __init__(self, seconds, rate):
        self.seconds, self.rate, self.calls = seconds, rate, 0

    def probe(self):
        self.calls += 1
        time.sleep(self.seconds)
        return self.rate


class Figures:
    def __init__(self):
        self.data = {}

    def update(self, **fields):
        self.data.update(fields)


@pytest.mark.parametrize("probed", [False, True])
def test_the_step_clock_pauses_while_the_gemm_is_measured(probed):
    probe = SlowProbe(0.2, 321.0) if probed else None
    figures = Figures()
    timer = bench_engines.StepTimer(figures, probe)
    timer.begin()
    for _ in range(3):
        time.sleep(0.02)
        timer.step([0.0])
    totals = timer.end()
    assert totals["total_s"] < 0.2  # three 0.2 s probes would show here
    assert all(0.015 < step < 0.2 for step in figures.data["step_s"])
    if probed:
        assert probe.calls == 3 and figures.data["probe_gflops"] == [321.0] * 3
    else:
        assert "probe_gflops" not in figures.data


def test_paired_efficiency_divides_each_steady_step_by_the_rates_around_it():
    # steps 2 and 3 take 1 s and 2 s; the GEMM ran at 100 before step 2, 300 after it, 50 after step 3
    assert bench.paired_efficiency(400.0, [5.0, 1.0, 2.0], [100.0, 300.0, 50.0]) == pytest.approx(
        (400 / 1 / 200 + 400 / 2 / 175) / 2, abs=1e-3)
    assert bench.paired_efficiency(400.0, [5.0, 1.0, 2.0], [100.0, 300.0]) is None  # a step without its probe
    assert bench.paired_efficiency(400.0, [5.0, 1.0], None) is None
    assert bench.paired_efficiency(None, [5.0, 1.0], [1.0, 1.0]) is None


def test_derive_reports_the_paired_efficiency_beside_the_peak_one():
    engines = {"onnxruntime": {"status": "failed", "step_s_median": 2.0, "step_s": [3.0, 2.0, 2.0],
                               "probe_gflops": [400.0, 400.0, 400.0]}}
    bench.derive(engines, gflop_per_step=600.0, gemm_peak=500.0, steps=3)
    assert engines["onnxruntime"]["efficiency"] == pytest.approx(0.6)
    assert engines["onnxruntime"]["efficiency_paired"] == pytest.approx(0.75)
    assert "eff paired" in bench.table(engines)


def test_the_probe_process_is_left_out_of_the_engine_tree_rss():
    psutil = pytest.importorskip("psutil")
    with gemm_probe.GemmProbe(n=256, threads=1, repeats=1) as probe:
        probe_rss = psutil.Process(probe.proc.pid).memory_info().rss
        whole = measure.tree_rss(os.getpid())
        without = measure.tree_rss(os.getpid(), skip=bench.MEASURING_TOOLS)
    assert probe_rss > 20 * 2 ** 20  # python, numpy and onnxruntime
    assert whole - without > 0.8 * probe_rss
