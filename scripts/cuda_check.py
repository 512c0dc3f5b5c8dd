"""The CUDA checks, for a machine with an NVIDIA GPU and onnxruntime-gpu (run by hand; CI has no GPU).

Two steps, because a real-size artifact's weights do not travel to a lent GPU machine:

    python scripts/cuda_check.py skeleton ARTIFACT unet/unet_f25_b2_h576_w1024.onnx OUT
        (here) the UNet graph without its float weights: the graph file with its non-float external tensors
        inlined, and its manifest entry. On the GPU machine the float weights are drawn at random (timing only).

    python scripts/cuda_check.py run --tiny DIR [DIR ...] --full SKELETON --out RESULTS.json
        (there) 1. golden parity: each tiny artifact's pipeline on ONNX Runtime's CUDA provider against diffusers'
        golden frames in tests/fixtures (the sessions must run on CUDAExecutionProvider, not a fallback);
        2. the real-size UNet step: the skeleton's graph with random float16 weights through framegraph's
        onnxruntime backend (device="cuda", with each of CUDA_VARIANTS' provider options), and diffusers'
        UNetSpatioTemporalConditionModel (torch, float16, scaled_dot_product_attention) on the same shapes, step
        times and GPU memory (NVML's device-wide peak above the process's start) side by side.

The figures go to docs/performance.md.
"""

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
logger = logging.getLogger("cuda_check")


# -- here: the skeleton ------------------------------------------------------------------------------------------
def skeleton(artifact, graph_file, out):
    """Write ``out``/``graph_file`` (float external tensors still pointing at weights.bin, which is not written)
    and ``out``/entry.json (the manifest entry of that graph)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    artifact, out = Path(artifact), Path(out)
    manifest = json.loads((artifact / "manifest.json").read_text())
    entry = next(g for g in manifest["graphs"] if g["files"][0]["path"] == graph_file)
    model = onnx.load(str(artifact / graph_file), load_external_data=False)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    spans, inlined = [], 0
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        if tensor.data_type in floats:
            spans.append({"name": tensor.name, "file": info["location"], "offset": int(info.get("offset", 0)),
                          "length": int(info["length"]), "dtype": int(tensor.data_type),
                          "dims": list(tensor.dims)})
            continue
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str((artifact / graph_file).parent))
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        inlined += 1
    target = out / graph_file
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    entry = dict(entry, files=[{"path": graph_file, "sha256": "not hashed: weights drawn at random", "size": 0}])
    (out / "entry.json").write_text(json.dumps({"entry": entry, "spans": spans}))
    logger.info("skeleton %s: %d float tensors to draw (%.2f GB), %d others inlined", target, len(spans),
                sum(s["length"] for s in spans) / 1e9, inlined)


def draw_weights(folder, spans, seed=0):
    """Write the float tensors ``spans`` lists into their files under ``folder``: N(0, 0.02) for matrices and
    kernels, 1 + N(0, 0.02) for vectors (norm scales, biases), so that activations stay finite."""
    rng = np.random.default_rng(seed)
    files = {}
    for span in spans:
        end = span["offset"] + span["length"]
        files[span["file"]] = max(files.get(span["file"], 0), end)
    for name, size in files.items():
        with open(folder / name, "wb") as f:
            f.truncate(size)
    from onnx import helper

    for name in files:
        data = np.memmap(folder / name, dtype=np.uint8, mode="r+")
        for span in (s for s in spans if s["file"] == name):
            dtype = helper.tensor_dtype_to_np_dtype(span["dtype"])
            count = span["length"] // np.dtype(dtype).itemsize
            values = rng.standard_normal(count, dtype=np.float32) * 0.02
            if len(span["dims"]) <= 1:
                values += 1.0
            data[span["offset"]:span["offset"] + span["length"]] = values.astype(dtype).view(np.uint8)
        data.flush()
        del data


# -- there: the checks ---------------------------------------------------------------------------------------------
class GpuMemory:
    """The most GPU memory in use (NVML, the whole device) sampled every 20 ms while it runs."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = self.used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def used(self):
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return (self.peak - self.baseline) / 2**30


def session_providers(pipe):
    """The providers every opened session of ``pipe``'s artifact runs on."""
    found = set()
    for graph in pipe.artifact._graphs.values():
        natives = graph.native if isinstance(graph.native, list) else [graph.native]
        for session in natives:
            found.add(tuple(session.get_providers()))
    return sorted(found)


def parity(folder, device="cuda"):
    """Max |frames - diffusers' golden frames| of the tiny artifact ``folder`` on CUDA."""
    from PIL import Image

    from framegraph.runtime import StableVideoDiffusionPipeline, TextToVideoSDPipeline

    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    svd = manifest["pipeline"] == "stable-video-diffusion"
    kind = "svd-tiny" if svd else "t2v-tiny"
    golden = np.load(FIXTURES / kind / "golden.npz")
    meta = json.loads((FIXTURES / kind / "golden.json").read_text())
    cls = StableVideoDiffusionPipeline if svd else TextToVideoSDPipeline
    start = time.perf_counter()
    pipe = cls.from_artifacts(folder, device=device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    if svd:
        image = Image.open(FIXTURES / kind / "input.png").convert("RGB")
        call = dict(meta["pipeline_call"], latents=golden["pipeline.latents"],
                    image_noise=golden["pipeline.image_noise"], output_type="np")
        run, key = (lambda: pipe(image, **call).frames), "pipeline.frames"
    else:
        call = dict(meta["pipeline_call"], latents=golden["pipeline.latents"], output_type="np")
        run, key = (lambda: pipe(meta["prompt"], **call).frames), "pipeline.frames_ddim"
    run()  # the first call builds the CUDA kernels' state: time the second
    start = time.perf_counter()
    frames = run()
    call_s = time.perf_counter() - start
    error = float(np.abs(frames - golden[key]).max())
    return {"artifact": str(folder), "dtype": manifest["dtype"], "golden": key, "max_abs_error": error,
            "providers": session_providers(pipe), "load_s": round(load_s, 2), "second_call_s": round(call_s, 3)}


def feeds_for(entry, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in entry["inputs"]:
        if spec["name"] == "timestep":
            feeds["timestep"] = np.asarray(700.0, spec["dtype"]).reshape(spec["shape"])
        elif spec["name"] == "added_time_ids":
            feeds[spec["name"]] = np.tile(np.array([6.0, 127.0, 0.02]), (spec["shape"][0], 1)).astype(spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
    return feeds


# the settings the step is timed with: ONNX Runtime's CUDA provider options and framegraph's backend options
CUDA_VARIANTS = {  # name: (CUDA provider options, backend options)
    "defaults": ({}, {}),
    "arena same-as-requested": ({"arena_extend_strategy": "kSameAsRequested"}, {}),
    "arena same-as-requested, cudnn no max workspace": (
        {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_use_max_workspace": "0"}, {}),
    "arena same-as-requested, nhwc": ({"arena_extend_strategy": "kSameAsRequested", "prefer_nhwc": "1"}, {}),
    "no memory pattern": ({}, {"memory_pattern": False}),
    "no memory pattern, arena same-as-requested": ({"arena_extend_strategy": "kSameAsRequested"},
                                                   {"memory_pattern": False}),
    "no memory pattern, arena same-as-requested, optimization basic": (
        {"arena_extend_strategy": "kSameAsRequested"}, {"memory_pattern": False, "optimization": "basic"}),
}


def framegraph_step(skeleton_dir, steps, fuse_attention=True, device="cuda", variant="defaults"):
    """Step times of the skeleton's UNet with drawn weights on framegraph's onnxruntime backend (CUDA) with the
    settings of CUDA_VARIANTS[variant]."""
    from framegraph.runtime.backends import load_backend
    from framegraph.runtime.manifest import GraphEntry

    skeleton_dir = Path(skeleton_dir)
    spec = json.loads((skeleton_dir / "entry.json").read_text())
    graph_file = skeleton_dir / spec["entry"]["files"][0]["path"]
    weights = graph_file.parent / spec["spans"][0]["file"]
    if not weights.exists():
        start = time.perf_counter()
        draw_weights(graph_file.parent, spec["spans"])
        logger.info("drew %.2f GB of weights in %.1f s", weights.stat().st_size / 1e9, time.perf_counter() - start)
    entry = GraphEntry.from_dict(spec["entry"])
    memory = GpuMemory() if device == "cuda" else None
    start = time.perf_counter()
    provider, backend_options = CUDA_VARIANTS[variant]
    options = {"CUDAExecutionProvider": provider} if device == "cuda" else None
    backend = load_backend("onnxruntime", device=device, fuse_attention=fuse_attention, provider_options=options,
                           **backend_options)
    graph = backend.open(skeleton_dir, entry, exclusive=True)
    open_s = time.perf_counter() - start
    feeds = feeds_for(spec["entry"])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = graph(**feeds)
        times.append(time.perf_counter() - start)
    peak = memory.stop() if memory else None
    noise = next(iter(out.values()))
    return {"engine": f"framegraph onnxruntime-{device}{'' if fuse_attention else ' (attention unfused)'}",
            "variant": variant,
            "providers": graph.native.get_providers(), "open_s": round(open_s, 1), "first_s": round(times[0], 3),
            "step_s": [round(t, 3) for t in times[1:]], "gpu_peak_gib": peak and round(peak, 2),
            "output_finite": bool(np.isfinite(noise).all())}


def diffusers_step(config, entry, steps):
    """Step times of diffusers' UNetSpatioTemporalConditionModel (float16, random weights) on the same inputs."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    memory = GpuMemory()
    unet = UNetSpatioTemporalConditionModel.from_config(json.loads(Path(config).read_text()))
    unet = unet.to("cuda", torch.float16).eval()
    feeds = {k: torch.from_numpy(v).cuda() for k, v in feeds_for(entry).items()}
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
                 added_time_ids=feeds["added_time_ids"], return_dict=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"engine": f"diffusers {__import__('diffusers').__version__} torch {torch.__version__}",
            "first_s": round(times[0], 3), "step_s": [round(t, 3) for t in times[1:]],
            "gpu_peak_gib": round(memory.stop(), 2),
            "torch_max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


CHILD_FUNCTIONS = ("parity", "diffusers_step", "framegraph_step")


def run_in_child(function, *args):
    """``function(*args)`` in a fresh interpreter (its own GPU memory), its JSON result back."""
    done = subprocess.run([sys.executable, __file__, "child", function, json.dumps(args)], capture_output=True,
                          text=True)
    sys.stderr.write(done.stderr[-4000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"function": function, "failed": done.returncode, "stderr": done.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def run(args):
    import onnxruntime as ort

    results = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers()}
    nvidia = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True)
    results["gpu"] = nvidia.stdout.strip()
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(results, indent=1))
        logger.info("%s", json.dumps(results, indent=1))

    results["parity"] = [run_in_child("parity", str(folder)) for folder in args.tiny]
    save()
    if args.full:
        entry = json.loads((Path(args.full) / "entry.json").read_text())["entry"]
        results["step"] = [run_in_child("diffusers_step", str(args.config), entry, args.steps)]
        save()
        for variant in args.variants:
            results["step"].append(run_in_child("framegraph_step", str(args.full), args.steps, True, "cuda", variant))
            save()
        if args.unfused:
            results["step"].append(run_in_child("framegraph_step", str(args.full), args.steps, False))
            save()


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("skeleton", help="the real-size UNet graph without its float weights")
    p.add_argument("artifact")
    p.add_argument("graph_file", help="the graph's path in the artifact, e.g. unet/unet_f25_b2_h576_w1024.onnx")
    p.add_argument("out")
    p = sub.add_parser("run", help="the checks on the GPU machine")
    p.add_argument("--tiny", nargs="*", default=[], help="tiny artifacts of tests/fixtures' pipelines")
    p.add_argument("--full", default=None, help="a skeleton folder (the skeleton command's OUT)")
    p.add_argument("--config", default=str(FIXTURES / "configs" / "svd-xt" / "unet" / "config.json"))
    p.add_argument("--steps", type=int, default=3, help="timed steps after one untimed")
    p.add_argument("--variants", nargs="*", default=list(CUDA_VARIANTS), choices=list(CUDA_VARIANTS),
                   help="the settings (CUDA_VARIANTS) to time the step with (default: all)")
    p.add_argument("--unfused", action="store_true", help="also time the UNet with fuse_attention=False")
    p.add_argument("--out", required=True)
    p = sub.add_parser("child", help="one check in this process (run_in_child)")
    p.add_argument("function", choices=CHILD_FUNCTIONS)
    p.add_argument("arguments", help="its arguments, a JSON list")
    args = parser.parse_args(argv)
    if args.command == "skeleton":
        skeleton(args.artifact, args.graph_file, args.out)
    elif args.command == "child":
        print("RESULT " + json.dumps(globals()[args.function](*json.loads(args.arguments))), flush=True)
    else:
        run(args)


if __name__ == "__main__":
    main()
