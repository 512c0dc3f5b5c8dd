"""Worker side of ``scripts/bench.py``: one engine (or one measurement) per process, so its peak RSS is its own.

    python scripts/bench_engines.py WORKER --spec SPEC.json --result RESULT.json

WORKER is one of:
  diffusers     diffusers pipeline, PyTorch eager, fp32 (``from_pretrained`` on the random-weight folder)
  onnxruntime   framegraph runtime on the artifact's ONNX graphs
  onnxruntime-lowmem    the same with low_memory=True (one graph resident at a time)
  onnxruntime-2buckets  the same with a second UNet frame bucket opened too and both kept open
                        (resident_buckets=None: what keeping a second bucket costs)
  onnxruntime-2buckets-resident1  the same with resident_buckets=1, the default (one UNet bucket open at a time)
  onnxruntime-unshared[-2buckets]  the same with share_weights=False (each session reads its own weights)
  onnxruntime-packed    the same with pack_exclusive=True (the held UNet bucket loads and packs its own weights)
  onnxruntime-nocache   the same without ONNX Runtime's optimized-graph cache (every session runs the optimizer)
  onnxruntime-int8      framegraph runtime on an artifact exported with --quantize int8
  onnxruntime-ffchunk   framegraph runtime on an artifact exported with --forward-chunk-size (and a one-frame
                        decoder graph)
  onnxruntime-decode1   the same artifact with decode_chunk_size=1
  onnxruntime-decode1-split  the same with split_guidance=True (guidance's halves as two UNet runs)
  onnxruntime-sliced    framegraph runtime on an artifact exported with --attention-slice-mb
  mindspore     framegraph runtime on the artifact's MindIR graphs
  openvino      framegraph runtime on the artifact's ONNX graphs, on the openvino backend
  openvino-cached       the same with OpenVINO's model cache (filled first by the model-cache worker)
  gemm          fp32 GEMM peak of this machine (numpy, torch and ONNX Runtime, square matmuls, best of a few)
  flops         UNet FLOPs of one denoising step (torch FlopCounterMode on one diffusers UNet call)
  model-cache   opens the graphs a call uses as an engine does, filling its backend's cache (ONNX Runtime's
                optimized graphs for the onnxruntime engines, OpenVINO's model cache for openvino-cached)

The result JSON is rewritten after every stage and step, so a worker stopped by the time limit still leaves what it
measured. Engines also save their frames and final latents to ``SPEC["outputs"]/ENGINE.npz`` for the comparison.
torch and diffusers are imported only by the diffusers, gemm and flops workers; MindSpore only by the mindspore
worker.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_openvino import svd_call
from bench_variants import ENGINES
from gemm_probe import GemmProbe
from gemm_timing import best_gflops, gemm_rates, square_pair

logger = logging.getLogger("bench_engines")

GIB = 1024 ** 3
# AnimateLCM-SVD's published sampler settings (tests/fixtures/animatelcm-svd: what its published code builds)
ANIMATELCM_SCHEDULER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "animatelcm-svd" / "scheduler"


def stolen_s(stat_path="/proc/stat"):
    """CPU seconds the hypervisor gave to other guests so far, summed over this machine's CPUs (``steal`` in
    /proc/stat); None where the kernel does not report it."""
    try:
        with open(stat_path) as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def rss_peak_gb():
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


class Result:
    """The worker's figures, written atomically to ``path`` whenever they change."""

    def __init__(self, path, **fields):
        self.path = Path(path)
        self.data = {"status": "started", **fields}
        self.write()

    def update(self, **fields):
        self.data.update(fields)
        self.write()

    def write(self):
        self.data["peak_rss_gb_so_far"] = round(rss_peak_gb(), 3)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


class StepTimer:
    """Times one pipeline call from its start to each step's end (``callback_on_step_end``) and to its return.

    With a ``probe`` (a GemmProbe), the machine's GEMM rate is measured after every step with the clock paused:
    the step times and the total leave the probes out."""

    def __init__(self, result, probe=None):
        self.result = result
        self.probe = probe
        self.paused = 0.0
        self.start = None
        self.marks = []
        self.probe_gflops = []
        self.latents = None

    def now(self):
        return time.perf_counter() - self.paused

    def begin(self):
        self.start = self.now()

    def step(self, latents):
        self.marks.append(self.now())
        self.latents = np.array(latents, dtype=np.float32, copy=True)
        durations = self.durations()
        logger.info("step %d: %.2f s", len(durations), durations[-1])
        probes = {}
        if self.probe is not None:
            start = time.perf_counter()
            self.probe_gflops.append(self.probe.probe())
            self.paused += time.perf_counter() - start
            logger.info("GEMM after step %d: %.1f GFLOP/s", len(durations), self.probe_gflops[-1])
            probes["probe_gflops"] = self.probe_gflops
        self.result.update(step_s=[round(d, 4) for d in durations], steps_done=len(durations), **probes,
                           **self.summary())

    def durations(self):
        times = [self.start] + self.marks
        return [b - a for a, b in zip(times, times[1:])]

    def summary(self):
        durations = self.durations()
        steady = durations[1:] or durations
        return {"first_step_s": round(durations[0], 3), "step_s_median": round(statistics.median(steady), 3)}

    def end(self):
        stop = self.now()
        return {"total_s": round(stop - self.start, 3), "decode_s": round(stop - self.marks[-1], 3),
                "denoise_s": round(self.marks[-1] - self.start, 3)}


# -- engines ---------------------------------------------------------------------------------------------------
def _probe(spec):
    """A GemmProbe for the last call where the spec asks for a GEMM rate beside each step (``paired_gemm``)."""
    if not spec.get("paired_gemm"):
        return contextlib.nullcontext()
    return GemmProbe(threads=spec["threads"])  # the 4096-cube product of the run's GEMM peak


def run_engine(name, spec, result):
    """Load engine ``name`` (a key of bench_variants.ENGINES), run its calls and record their figures and frames."""
    inputs = np.load(spec["inputs"])
    from PIL import Image

    image = Image.open(spec["image"]).convert("RGB") if spec["kind"] == "svd" else None
    start = time.perf_counter()
    load = import_engine(ENGINES[name])  # libraries are imported before the load clock starts
    result.update(import_s=round(time.perf_counter() - start, 3))
    if ENGINES[name].peer is not None:  # the peer's IR conversion is its export: reported apart, not as load
        import bench_openvino

        _, convert_s = bench_openvino.convert_peer(spec, int8=ENGINES[name].peer == "int8")
        result.update(convert_s=round(convert_s, 1))
    if ENGINES[name].caches:  # filling the cache is the compile step: reported apart, not as load
        result.update(convert_s=round(fill_model_cache(spec, name), 1))
    start = time.perf_counter()
    pipe, call = load(spec, inputs, image, result)
    result.update(load_s=round(time.perf_counter() - start, 3), rss_after_load_gb=round(rss_peak_gb(), 3),
                  status="loaded")
    calls = int(spec.get("calls", 1))
    with _probe(spec) as probe:
        for number in range(1, calls + 1):  # figures of the last call; the peak RSS is the whole process's
            timer = StepTimer(result, probe if number == calls else None)
            stolen = stolen_s()
            timer.begin()
            frames = call(pipe, timer)
            result.update(**timer.end(), **timer.summary(), calls_done=number)
            if stolen is not None:  # a step slowed by the machine, not by the engine, shows here
                result.update(stolen_cpu_s=round(stolen_s() - stolen, 2))
            if number < calls:
                result.update(first_call_total_s=result.data["total_s"], first_call_step_s_median=result.data[
                    "step_s_median"], peak_rss_first_call_gb=round(rss_peak_gb(), 3))
                logger.info("call %d of %d: %.1f s, peak RSS so far %.2f GB", number, calls, result.data["total_s"],
                            rss_peak_gb())
    del pipe, call  # the engine's memory goes before the GEMM's arrays come, so they do not add to its peak RSS
    gc.collect()
    result.update(gemm_after_gflops=gemm_after(spec["threads"]))
    frames = np.asarray(frames, dtype=np.float32)
    out = Path(spec["outputs"]) / f"{name}.npz"
    np.savez(out, frames=frames, latents=timer.latents)
    result.update(status="ok", frames_shape=list(frames.shape), frames_file=str(out), spec=spec,
                  finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))


def _diffusers(spec, inputs, image, result):
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "svd":
        from diffusers import StableVideoDiffusionPipeline as Pipeline
    else:
        from diffusers import TextToVideoSDPipeline as Pipeline
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(spec["pipeline"])  # fp32
    pipe.set_progress_bar_config(disable=True)
    result.update(from_pretrained_s=round(time.perf_counter() - start, 3), torch=torch.__version__,
                  torch_threads=torch.get_num_threads())
    latents = torch.from_numpy(inputs["latents"])
    if spec["kind"] == "svd":
        return pipe, lambda p, timer: _diffusers_svd(p, timer, spec, image, latents, inputs["image_noise"])

    def call(p, timer):
        with torch.no_grad():
            frames = p(spec["prompt"], height=spec["height"], width=spec["width"], num_frames=spec["frames"],
                       num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"], latents=latents,
                       output_type="np", callback=lambda i, t, lat: timer.step(lat.numpy()), callback_steps=1).frames
        return frames

    return pipe, call


def _diffusers_svd(pipe, timer, spec, image, latents, image_noise):
    """One diffusers SVD call with the shared latents and conditioning-image noise (bench_openvino.svd_call, which
    the OpenVINO peer's pipeline runs too)."""
    import torch

    return svd_call(pipe, timer, spec, image, latents, torch.from_numpy(image_noise))


def _framegraph(engine):
    def load(spec, inputs, image, result):
        from framegraph.runtime import StableVideoDiffusionPipeline, TextToVideoSDPipeline

        cls = StableVideoDiffusionPipeline if spec["kind"] == "svd" else TextToVideoSDPipeline
        start = time.perf_counter()
        # no cache is False: from_artifacts passes None on as "the backend's default"
        options = {"cache_dir": model_cache_dir(spec, engine.backend) if engine.caches else False} if (
            engine.backend in ("onnxruntime", "openvino")) else {}
        pipe = cls.from_artifacts(spec["artifact"], backend=engine.backend, num_threads=spec["threads"],
                                  low_memory=engine.low_memory, resident_buckets=engine.resident_buckets,
                                  share_weights=engine.share_weights, pack_exclusive=engine.pack_exclusive,
                                  split_guidance=engine.split_guidance, **options)
        pipe.set_progress_bar_config(disable=True)
        if engine.scheduler == "animatelcm":  # the few-step sampler, selected the diffusers way
            from framegraph.runtime.schedulers import load_scheduler

            pipe.scheduler = load_scheduler(ANIMATELCM_SCHEDULER)
        result.update(from_artifacts_s=round(time.perf_counter() - start, 3))
        # Graphs open lazily on first use; open the ones this call uses now, so that load_s means "ready to run"
        # on every engine (from_artifacts_s is the lazy part alone).
        start = time.perf_counter()
        if not engine.low_memory:  # low-memory mode opens each graph when it is needed, one at a time
            for graph, bucket in _graphs_used(pipe, spec, engine.decode_chunk_size, engine.cache_interval):
                pipe.artifact.graph(graph, **bucket)
        if engine.extra_bucket:
            bucket = _other_unet_bucket(pipe, spec)
            pipe.artifact.graph("unet", **bucket)(**_zeros(pipe.artifact.manifest.find("unet", "onnx", **bucket)))
            result.update(extra_bucket=bucket)
        result.update(open_graphs_s=round(time.perf_counter() - start, 3))

        def call(p, timer):
            def on_step_end(pipe, i, t, kwargs):
                timer.step(kwargs["latents"])
                return {}

            common = dict(height=spec["height"], width=spec["width"], num_frames=spec["frames"],
                          num_inference_steps=spec["steps"], latents=inputs["latents"], output_type="np",
                          decode_chunk_size=engine.decode_chunk_size, cache_interval=engine.cache_interval,
                          callback_on_step_end=on_step_end)
            if spec["kind"] == "svd":
                return p(image, min_guidance_scale=spec["min_guidance_scale"],
                         max_guidance_scale=spec["max_guidance_scale"], image_noise=inputs["image_noise"],
                         **common).frames
            return p(spec["prompt"], guidance_scale=spec["guidance_scale"], **common).frames

        return pipe, call

    return load


def _graphs_used(pipe, spec, decode_chunk_size=None, cache_interval=1):
    h, w, f = spec["height"], spec["width"], spec["frames"]
    batch = pipe.batch
    bucket = {"num_frames": f, "batch": pipe.unet_batch(cfg=True), "height": h, "width": w}  # guidance on
    # with step caching a call runs the deep and shallow graphs, not the plain one
    unet = [("unet", bucket)] if cache_interval == 1 else [("unet_deep", bucket), ("unet_shallow", bucket)]
    if spec["kind"] == "svd":
        return [("image_encoder", {"batch": batch}), ("vae_encoder", {"batch": batch, "height": h, "width": w}),
                *unet, ("vae_decoder", {"chunk": min(decode_chunk_size or f, f), "height": h, "width": w})]
    chunk = decode_chunk_size or max(pipe.artifact.buckets("vae_decoder", "chunk"))
    return [("text_encoder", {"batch": batch}), *unet, ("vae_decoder", {"chunk": chunk, "height": h, "width": w})]


def _other_unet_bucket(pipe, spec):
    """A guidance-batch UNet bucket with another frame count (run once, so that its session is fully built)."""
    frames = [f for f in pipe.artifact.buckets("unet", "num_frames") if f != spec["frames"]]
    if not frames:
        raise RuntimeError(f"{spec['artifact']} has one frame bucket; export it with a second (bench.py "
                           "--second-frames) to measure what a second bucket costs")
    return {"num_frames": frames[0], "batch": pipe.unet_batch(cfg=True), "height": spec["height"],
            "width": spec["width"]}


def _zeros(entry):
    return {t.name: np.zeros(t.shape, t.dtype) for t in entry.inputs}


def import_engine(engine):
    """Import the libraries ``engine`` (a bench_variants.Engine) runs on and return its loader: diffusers and torch
    where it has no backend, else framegraph's pipelines, ONNX Runtime and, on the mindspore backend, MindSpore."""
    if engine.peer is not None:
        import bench_openvino

        bench_openvino.import_peer()
        return lambda spec, inputs, image, result: bench_openvino.load_peer(spec, inputs, image, result,
                                                                            int8=engine.peer == "int8")
    if engine.backend is None:
        import diffusers  # noqa: F401
        import torch  # noqa: F401

        return _diffusers
    import framegraph.runtime.pipelines.stable_video_diffusion  # noqa: F401
    import framegraph.runtime.pipelines.text_to_video_sd  # noqa: F401
    import onnxruntime  # noqa: F401

    if engine.backend == "mindspore":
        import mindspore  # noqa: F401
    if engine.backend == "openvino":
        import openvino  # noqa: F401
    return _framegraph(engine)


def model_cache_dir(spec, backend):
    """The run's own cache of compiled (OpenVINO) or optimized (ONNX Runtime) graphs, per backend and artifact."""
    return Path(spec["outputs"]) / f"{backend}-cache" / Path(spec["artifact"]).name


def fill_model_cache(spec, name):
    """Run the model-cache worker for engine ``name`` in a child process (a cold process, as the engine's own load
    is); seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(dict(spec, cache_engine=name)))
        subprocess.run([sys.executable, __file__, "model-cache", "--spec", str(spec_path), "--result",
                        str(Path(tmp) / "result.json")], check=True)
    return time.perf_counter() - start


def run_model_cache(spec, result):
    """Open the graphs one call uses as engine ``spec["cache_engine"]`` opens them, which fills its backend's cache
    (OpenVINO's model cache, ONNX Runtime's optimized graphs)."""
    engine = ENGINES[spec["cache_engine"]]
    import_engine(engine)
    pipe, _ = _framegraph(dataclasses.replace(engine, low_memory=False))(spec, np.load(spec["inputs"]), None, {})
    result.update(status="ok", cache_dir=str(model_cache_dir(spec, engine.backend)))


# -- measurements ----------------------------------------------------------------------------------------------
def run_gemm(spec, result, n=4096, repeats=5):
    """Best-of-``repeats`` fp32 ``n``^3 matmul with numpy's BLAS, torch and ONNX Runtime: the machine's fp32 GEMM
    limit is the fastest of them (on AVX-512 machines ONNX Runtime's MLAS measured ~1.8x numpy's OpenBLAS)."""
    import torch

    torch.set_num_threads(spec["threads"])
    a, b = square_pair(n)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    figures = gemm_rates(a, b, spec["threads"], repeats)
    figures["torch_gflops"] = best_gflops("torch", lambda: torch.mm(ta, tb), n, repeats)
    result.update(n=n, repeats=repeats, threads=spec["threads"], **figures,
                  peak_gflops=max(figures.values()), status="ok")


def gemm_after(threads, n=4096, repeats=3):
    """The fp32 GEMM rate (the best of numpy and ONNX Runtime) measured in an engine's process right after its
    calls: the machine's speed at that moment, beside the run's peak measured before and after all engines (its
    speed drifts by minutes)."""
    a, b = square_pair(n)
    return max(gemm_rates(a, b, threads, repeats, label=" (after the calls)").values())


def unet_call(spec, h, w, f, device="meta"):
    """The diffusers UNet of ``spec``'s pipeline and the arguments of one call at the guidance batch of 2.

    On ``device="meta"`` the UNet is built from its config with no weights and the call computes shapes only: the
    FLOP count depends on shapes alone, so it is the same as a real call's, in seconds and without the call's
    memory (tens of GB at 576x1024 and 25 frames). ``"cpu"`` loads the weights (DeepCache's helper needs real
    outputs). Attention runs through diffusers' ``AttnProcessor`` (explicit baddbmm/bmm), which the counter counts.
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    folder = Path(spec["pipeline"]) / "unet"
    batch = 2  # classifier-free guidance: the unconditional and conditional halves run as one batch
    if spec["kind"] == "svd":
        from diffusers import UNetSpatioTemporalConditionModel as UNet
    else:
        from diffusers import UNet3DConditionModel as UNet
    if device == "meta":  # shapes only
        with torch.device("meta"):
            unet = UNet.from_config(UNet.load_config(folder)).eval().to("meta")  # some buffers ignore the context
    else:
        unet = UNet.from_pretrained(folder).eval()  # fp32
    unet.set_attn_processor(AttnProcessor())
    config = unet.config
    with torch.device(device):
        if spec["kind"] == "svd":
            args = (torch.randn(batch, f, config.in_channels, h, w), torch.tensor(1.0))
            kwargs = {"encoder_hidden_states": torch.randn(batch, 1, config.cross_attention_dim),
                      "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * batch)}
        else:
            args = (torch.randn(batch, config.in_channels, f, h, w), torch.tensor(999))
            kwargs = {"encoder_hidden_states": torch.randn(batch, spec["max_length"], config.cross_attention_dim)}
    return unet, args, kwargs


def run_flops(spec, result):
    """Count one UNet call at the step's batch (2 with guidance on) with torch's FlopCounterMode, on the meta device
    (see ``unet_call``; on the CPU where DeepCache's cached step is counted too).

    Attention runs through diffusers' ``AttnProcessor`` (explicit baddbmm/bmm) for the count, because the counter
    has no formula for the CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) and would leave the
    attention matmuls out. Counted: matmul, bmm/baddbmm, addmm and convolutions, 2 FLOP per multiply-add; element-
    wise ops (norms, activations, softmax) are not counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(spec["threads"])
    h, w, f = spec["height"] // spec["vae_scale_factor"], spec["width"] // spec["vae_scale_factor"], spec["frames"]
    device = "meta" if spec.get("cache_branch") is None else "cpu"
    unet, args, kwargs = unet_call(spec, h, w, f, device)
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with torch.no_grad(), torch.device(device), counter:  # tensors the forward makes land on the same device
        unet(*args, **kwargs, return_dict=False)
    by_op = {str(op): n / 1e9 for op, n in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops() / 1e9
    if spec.get("cache_branch") is not None:
        result.update(shallow_gflop_per_step=shallow_gflop(unet, args, kwargs, spec["cache_branch"]),
                      shallow_method="the second of two UNet calls under DeepCache 0.1.1's DeepCacheSDHelper "
                                     "(cache_interval 2): a cached step of that branch")
    batch = args[0].shape[0]
    logger.info("UNet batch %d: %.1f GFLOP (%s)", batch, total, ", ".join(f"{k} {v:.1f}" for k, v in by_op.items()))
    result.update(unet_gflop_per_step=round(total, 2), unet_batch=batch, by_op_gflop={k: round(v, 2) for k, v in
                  by_op.items()}, forward_s=round(time.perf_counter() - start, 2),
                  parameters_m=round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
                  method=f"torch.utils.flop_counter.FlopCounterMode on one diffusers UNet forward at batch 2 on "
                         f"{device} (AttnProcessor, so attention bmm is counted); 2 FLOP per MAC; elementwise ops "
                         "not counted",
                  status="ok")


def shallow_gflop(unet, args, kwargs, cache_branch):
    """GFLOP of a cached step of ``cache_branch``: a whole UNet call fills DeepCache's helper cache, the next one
    (counted) runs the shallow branch. On ModelScope's UNet the helper also reruns the temporal layers of the layers
    it skips (it caches only resnets and attentions), which framegraph's shallow graph leaves out: an upper bound."""
    from types import SimpleNamespace

    import torch
    from DeepCache import DeepCacheSDHelper
    from torch.utils.flop_counter import FlopCounterMode

    sample, timestep = args
    steps = [timestep, timestep - 1]
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=steps)))
    helper.set_params(cache_interval=2, cache_branch_id=cache_branch)
    helper.enable()
    try:
        with torch.no_grad():
            unet(sample, steps[0], **kwargs, return_dict=False)
            counter = FlopCounterMode(display=False)
            with counter:
                unet(sample, steps[1], **kwargs, return_dict=False)
    finally:
        helper.disable()
    return round(counter.get_total_flops() / 1e9, 2)


WORKERS = {"gemm": run_gemm, "flops": run_flops, "model-cache": run_model_cache}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("worker", choices=sorted(ENGINES) + sorted(WORKERS))
    p.add_argument("--spec", required=True, help="JSON written by bench.py")
    p.add_argument("--result", required=True, help="JSON file to write the figures to")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{args.worker}] %(message)s")
    spec = json.loads(Path(args.spec).read_text())
    result = Result(args.result, worker=args.worker, pid=os.getpid())
    try:
        if args.worker in ENGINES:
            run_engine(args.worker, spec, result)
        else:
            WORKERS[args.worker](spec, result)
    except Exception as exc:
        logger.exception("%s failed", args.worker)
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
