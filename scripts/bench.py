"""Benchmark diffusers eager (PyTorch CPU, fp32) against framegraph on ONNX Runtime and MindSpore, side by side.

    python scripts/bench.py --model ../shared/configs/svd-xt --height 128 --width 128 --frames 4 --steps 3 \\
        --json out.json

One run, same random weights for every engine:
  1. a diffusers-format pipeline with seeded random weights is made from the config folder (``--model``) by
     ``scripts/make_random_pipeline.py`` into ``WORK/pipeline`` (reused when its configs and seed match);
  2. it is exported with framegraph (``python -m framegraph.export``, which exports the large components in child
     processes) into ``WORK/artifact-HxW-fFRAMES-FORMAT``: ONNX with the measured frame bucket and a second one
     (``--second-frames``), MindIR with the measured one; an up-to-date export (same pipeline, options and framegraph
     export/model sources) is reused. Export time, peak RSS (process tree) and artifact size are reported;
  3. the fp32 GEMM peak of this machine is measured (numpy, torch and ONNX Runtime's MLAS with B as an input and
     prepacked; 4096^3, best of 5; the fastest of them, before and after the engines) and the UNet FLOPs of one
     denoising step are counted (torch FlopCounterMode, one diffusers UNet call at the guidance batch of 2);
  4. each engine runs in its own process (``scripts/bench_engines.py``) on the same input image, latents and
     conditioning-image noise, guidance on; step ends are timed with ``callback_on_step_end``; peak RSS is the
     process tree's (sampled) or the largest process's (``wait4`` rusage), whichever is larger; frames are compared
     with diffusers'. ``onnxruntime-lowmem`` / ``mindspore-lowmem`` are framegraph with ``low_memory=True``;
     ``onnxruntime-2buckets`` also opens (and runs once) the second frame bucket's UNet and keeps both open
     (``resident_buckets=None``), to show what a second bucket costs in memory; ``-resident1`` does the same with
     the default ``resident_buckets=1``, which closes it again to reopen the first; ``onnxruntime-unshared*`` turn
     ``share_weights`` off, ``onnxruntime-packed`` turns ``pack_exclusive`` on (the UNet packs its own weights);
     ``onnxruntime-nocache`` opens every graph without ONNX Runtime's optimized-graph cache (the other onnxruntime
     engines fill a cache of the run's own first, reported as convert_s);
     ``onnxruntime-int8`` runs an artifact exported with ``--quantize int8`` and reports the PSNR of its frames
     against ``onnxruntime``'s. ``onnxruntime-ffchunk`` runs an artifact exported with the compiled forward
     chunking (``--forward-chunk-size``, the analogue of ``unet.enable_forward_chunking()``) and a one-frame
     decoder graph, ``onnxruntime-decode1`` the same artifact with ``decode_chunk_size=1``,
     ``onnxruntime-decode1-split`` that with ``split_guidance=True`` (guidance's halves as two UNet runs);
     ``onnxruntime-sliced`` runs an artifact exported with ``--attention-slice-mb`` (attention over slices of queries);
     ``mindspore_lite`` runs the Lite graphs of an artifact exported with ``--formats mslite`` (after
     ``framegraph setup-lite``). ``onnxruntime-cache1/2/3`` run an artifact exported with ``--cache-branch``
     (bench.py's ``--cache-branch``, default 0) at ``cache_interval`` 1 (uncached: their reference), 2 and 3;
     ``onnxruntime-animatelcm`` runs that artifact's UNet with AnimateLCM-SVD's sampler (the few-step engine:
     run it at few ``--steps``). ``openvino-peer`` / ``openvino-peer-int8`` are OpenVINO used the way its own SVD
     recipe does (scripts/bench_openvino.py: the diffusers modules converted from PyTorch, f32 hint; NNCF int8
     weights); their IR conversion is reported apart (convert_s), not as load.

Columns: load_s (from_pretrained / from_artifacts + opening the graphs the call uses), first_step_s (call start to
the end of step 1: includes image / prompt encoding), step_s_median (median of steps 2..N), total_s (pipeline call,
image in -> frames out, decode included), stolen CPU s (CPU seconds the hypervisor gave to other guests during that
call, /proc/stat's steal, all CPUs: time the engine could not run), peak_rss_gb, GFLOP/step (UNet, guidance batch),
GFLOP/s (GFLOP/step / step_s_median), eff (GFLOP/s / fp32 GEMM GFLOP/s, the best of the GEMM runs before and after
the engines), GEMM after (the fp32 GEMM, numpy's or ONNX Runtime's, whichever is faster, in the engine's own process
right after its calls: the machine's speed at that moment), eff vs after (GFLOP/s / GEMM after), eff paired (with
--paired-gemm, the default: the median over steps 2..N of the step's GFLOP/s over the GEMM rate measured right
before and after that step, see gemm_probe.py; the rate the machine gave at that moment), max|d| (max abs
difference of the frames in [0, 1] from diffusers'), denoise_s (call start to the end of the last step: encoders and
every UNet step, not the decode), GFLOP/video (UNet GFLOP of all steps; a cached step counted as DeepCache's helper
runs it), PSNR vs onnxruntime (frames against ``onnxruntime``'s, or ``onnxruntime-cache1``'s where that did not run;
with random weights a proxy of quality only).

Real-size models (svd-xt, text-to-video-ms-1.7b) need up to ~10-20 GB per process: on a shared machine run this under
``flock /tmp/realsize.lock python scripts/bench.py ...`` so that only one real-size job runs at a time.
Benchmark tool only: needs the ``bench`` extra (torch, diffusers, psutil) and, for export / MindSpore, ``export``.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from bench_variants import ENGINES, EXPORTS
from measure import folder_bytes, tree_rss

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
INPUT_IMAGE = ROOT / "tests" / "fixtures" / "svd-tiny" / "input.png"
# a worker's child processes that measure the machine, not the engine: their RSS is not the engine's
MEASURING_TOOLS = ("gemm_probe.py",)
KINDS = {"StableVideoDiffusionPipeline": "svd", "TextToVideoSDPipeline": "t2v"}
GIB = 1024 ** 3
DEFAULT_PROMPT = "a squirrel eating a burger in a painting"


# -- subprocesses ----------------------------------------------------------------------------------------------
def run_process(command, timeout=None, env=None):
    """Run ``command`` in its own process group; return (exit code, wall s, peak RSS GB, timed out).

    Peak RSS comes from ``wait4``: the child's own maximum (and that of its own waited-for children), not the
    machine's or this process's. On timeout the group gets SIGTERM, then SIGKILL."""
    logger.info("$ %s", " ".join(map(str, command)))
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in command], start_new_session=True, env=env)
    proc.tree_peak = 0
    try:
        return _wait(proc, start, timeout)
    except BaseException:  # interrupted: do not leave the worker running in its own session
        _kill_group(proc.pid, signal.SIGKILL)
        raise


def _wait(proc, start, timeout):
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.perf_counter() - start > timeout and not timed_out:
            logger.warning("time limit of %.0f s reached: stopping %s", timeout, " ".join(map(str, proc.args[:3])))
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)
            deadline = time.perf_counter() + 15
            while time.perf_counter() < deadline:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.2)
            if not pid:
                _kill_group(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
            break
        proc.tree_peak = max(proc.tree_peak, tree_rss(proc.pid, skip=MEASURING_TOOLS))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, max(usage.ru_maxrss * 1024, proc.tree_peak) / GIB, timed_out


def _kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def worker_env(threads):
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def run_worker(worker, spec_path, result_path, threads, timeout=None):
    result_path = Path(result_path)
    result_path.unlink(missing_ok=True)
    code, wall, peak, timed_out = run_process(
        [sys.executable, SCRIPTS / "bench_engines.py", worker, "--spec", spec_path, "--result", result_path],
        timeout=timeout, env=worker_env(threads))
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"status": "no result"}
    if timed_out:
        result["status"] = f"stopped at the {timeout:.0f} s limit ({result.get('status')})"
    elif code == -signal.SIGKILL:
        result["status"] = f"killed by SIGKILL (out of memory? see dmesg) ({result.get('status')})"
    elif code != 0 and result.get("status") != "failed":
        result["status"] = f"exit code {code} ({result.get('status')})"
    result.update(exit_code=code, wall_s=round(wall, 2), peak_rss_gb=round(peak, 3))
    return result


# -- 1. random-weight pipeline ---------------------------------------------------------------------------------
def make_pipeline(model, folder, seed):
    stamp = folder / "bench_pipeline.json"
    before = stamp.stat().st_mtime if stamp.is_file() else None
    code, wall, peak, _ = run_process([sys.executable, SCRIPTS / "make_random_pipeline.py", model, folder,
                                       "--seed", seed])
    if code != 0:
        raise SystemExit(f"making the random-weight pipeline failed (exit code {code})")
    reused = before is not None and stamp.stat().st_mtime == before
    return {"path": str(folder), "seed": seed, "reused": reused, "wall_s": round(wall, 1),
            "peak_rss_gb": round(peak, 2), "size_gb": round(folder_bytes(folder) / GIB, 3),
            "stamp": json.loads(stamp.read_text())}


# -- 2. export -------------------------------------------------------------------------------------------------
def framegraph_sources_hash():
    """sha256 of framegraph's export and model sources (what decides the exported bytes) and its version."""
    h = hashlib.sha256(metadata.version("framegraph").encode())
    for sub in ("export", "models", "runtime/manifest.py"):
        path = ROOT / sub
        for p in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(p.relative_to(ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def memory_options(args, kind, frames):
    """svd-export options of an export's memory options: "chunks", the compiled forward chunking and a one-frame
    decoder graph beside those of the export's ``frames`` (the onnxruntime-ffchunk and -decode1 engines); "slices",
    attention over slices of queries (onnxruntime-sliced)."""
    if kind == "chunks":
        return ["--forward-chunk-size", str(args.forward_chunk_size),
                "--decode-chunk-sizes", ",".join(map(str, sorted({1, *frames})))]
    if kind == "slices":
        return ["--attention-slice-mb", f"{args.attention_slice_mb:g}"]
    return []


def export_artifact(args, pipeline, key):
    """The artifact of export ``key`` (see EXPORTS): an up-to-date one is reused, else it is exported."""
    export = EXPORTS[key]
    frames = sorted({args.frames, args.second_frames or args.frames + 2}) if export.two_buckets else [args.frames]
    base = f"artifact-{args.height}x{args.width}-f{'-'.join(map(str, frames))}"  # one artifact for 14 then 25
    options = memory_options(args, export.memory, frames)
    wanted = {"pipeline": pipeline["stamp"], "height": args.height, "width": args.width, "frames": frames,
              "check": args.export_check, "quantize": export.quantize, "options": options,
              "cache_branch": args.cache_branch if export.step_cache else None,
              "framegraph_sources": framegraph_sources_hash()}
    artifact = args.work_dir / f"{base}-{key}"  # MindSpore rejects '+' in paths
    stamp_path = artifact.with_name(artifact.name + ".bench.json")
    if stamp_path.is_file() and (artifact / "manifest.json").is_file():
        previous = json.loads(stamp_path.read_text())
        if all(previous.get(k) == v for k, v in wanted.items()):
            logger.info("reusing the export in %s (same pipeline, options and framegraph sources)", artifact)
            return {**previous["figures"], "path": str(artifact), "reused": True}
        if args.skip_export:
            logger.warning("--skip-export: using %s as is (exported by other framegraph sources or options)",
                           artifact)
            return {**previous["figures"], "path": str(artifact), "reused": True, "up_to_date": False}
    stamp_path.unlink(missing_ok=True)
    if artifact.exists():  # stale (no matching stamp): export from scratch, so that the figures are the whole cost
        shutil.rmtree(artifact)
    command = [sys.executable, "-m", "framegraph.export", pipeline["path"], "--out", artifact,
               "--frames", ",".join(map(str, frames)), "--height", args.height, "--width", args.width,
               "--formats", ",".join(export.formats)] + ([] if args.export_check else ["--no-check"])
    if export.quantize:
        command += ["--quantize", export.quantize]
    if export.step_cache:
        command += ["--cache-branch", args.cache_branch]
    command += options
    code, wall, peak, timed_out = run_process(command, timeout=args.export_timeout)
    figures = {"command": " ".join(map(str, command))}
    figures.update(export_s=round(wall, 1), peak_rss_gb=round(peak, 2), formats=list(export.formats), frames=frames,
                   checked=args.export_check, exit_code=code)
    if code != 0:
        figures["status"] = "timed out" if timed_out else (
            "killed by SIGKILL (out of memory? see dmesg)" if code == -signal.SIGKILL else f"failed (exit code {code})")
        logger.error("export %s", figures["status"])
        return {**figures, "path": str(artifact), "reused": False}
    figures.update(status="ok", artifact_gb=round(folder_bytes(artifact) / GIB, 3),
                   artifact_gb_by_format=artifact_sizes(artifact))
    stamp_path.write_text(json.dumps({**wanted, "formats": list(export.formats), "figures": figures}, indent=1))
    return {**figures, "path": str(artifact), "reused": False}


def bucket_disk(artifact, frames):
    """Disk bytes of the files the ``frames`` bucket needs vs all files: what the other bucket adds."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    one, every = {}, {}
    for g in manifest["graphs"]:
        for f in g["files"]:
            size = (artifact / f["path"]).stat().st_size
            every[f["path"]] = size
            if g["name"] != "unet" or g["bucket"].get("num_frames") == frames:
                one[f["path"]] = size
    one_gb, every_gb = sum(one.values()) / GIB, sum(every.values()) / GIB
    return {"one_bucket_gb": round(one_gb, 3), "two_buckets_gb": round(every_gb, 3),
            "second_bucket_adds": round(every_gb / one_gb - 1, 4)}


def artifact_sizes(artifact):
    """Bytes per format from the manifest (shared files counted once per format)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    sizes = {}
    for fmt in sorted({g["format"] for g in manifest["graphs"]}):
        files = {f["path"]: f.get("size", 0) for g in manifest["graphs"] if g["format"] == fmt for f in g["files"]}
        files = {p: (artifact / p).stat().st_size for p in files if (artifact / p).is_file()}
        sizes[fmt] = round(sum(files.values()) / GIB, 3)
    return sizes


# -- 3. inputs -------------------------------------------------------------------------------------------------
def read_config(folder, component):
    return json.loads((Path(folder) / component / "config.json").read_text())


def make_inputs(args, kind, pipeline_dir, runs, step_cache=False):
    """Shared inputs: the conditioning image (resized to the video size), latents, conditioning-image noise;
    ``step_cache``: an engine of the run caches steps (its branch goes into the spec)."""
    from PIL import Image

    vae, unet = read_config(pipeline_dir, "vae"), read_config(pipeline_dir, "unet")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    h, w, f = args.height // scale, args.width // scale, args.frames
    rng = np.random.default_rng(args.seed)
    arrays = {}
    if kind == "svd":
        arrays["latents"] = rng.standard_normal((1, f, unet["in_channels"] // 2, h, w), dtype=np.float32)
        arrays["image_noise"] = rng.standard_normal((1, 3, args.height, args.width), dtype=np.float32)
    else:
        arrays["latents"] = rng.standard_normal((1, unet["in_channels"], f, h, w), dtype=np.float32)
    np.savez(runs / "inputs.npz", **arrays)
    image = runs / "input.png"
    Image.open(INPUT_IMAGE).convert("RGB").resize((args.width, args.height), Image.BICUBIC).save(image)
    spec = {
        "kind": kind, "pipeline": str(pipeline_dir), "height": args.height, "width": args.width, "frames": f,
        "steps": args.steps, "threads": args.threads, "inputs": str(runs / "inputs.npz"), "image": str(image),
        "outputs": str(runs), "vae_scale_factor": scale, "calls": args.calls, "paired_gemm": args.paired_gemm,
        "cache_branch": args.cache_branch if step_cache else None,  # None: no cached step to count
    }
    if kind == "svd":
        spec.update(min_guidance_scale=1.0, max_guidance_scale=args.guidance_scale or 3.0)
    else:
        spec.update(prompt=args.prompt, guidance_scale=args.guidance_scale or 9.0,
                    max_length=int(read_config(pipeline_dir, "text_encoder").get("max_position_embeddings", 77)))
    return spec


# -- 4. figures ------------------------------------------------------------------------------------------------
def video_gflop(flops, steps, cache_interval=1):
    """UNet GFLOP of one video of ``steps`` steps: every step whole, or with step caching every ``cache_interval``-th
    step whole and the others shallow (``flops``: the flops worker's result)."""
    full = flops.get("unet_gflop_per_step")
    if not full:
        return None
    if cache_interval == 1:
        return round(full * steps, 1)
    shallow = flops.get("shallow_gflop_per_step")
    if shallow is None:
        return None
    deep_steps = len(range(0, steps, cache_interval))
    return round(full * deep_steps + shallow * (steps - deep_steps), 1)


def derive(engines, gflop_per_step, gemm_peak, steps, reference_result=None, flops=None):
    """Add GFLOP/s, efficiency, GFLOP per video, estimates for unfinished runs and the difference from diffusers'
    frames (``reference_result``: diffusers' result when it did not run in this invocation)."""
    reference = _outputs(engines.get("diffusers") or reference_result)
    for name, r in engines.items():
        engine = ENGINES.get(name)
        if flops and engine is not None:
            r["gflop_per_video"] = video_gflop(flops, steps, engine.cache_interval)
        # a cached run's steps are whole or shallow: GFLOP/s and eff per step do not apply to it
        per_step = None if engine is not None and engine.cache_interval > 1 else gflop_per_step
        median = r.get("step_s_median")
        if per_step and median:
            r["gflop_per_step"] = per_step
            r["gflops"] = round(per_step / median, 1)
            if gemm_peak:
                r["efficiency"] = round(r["gflops"] / gemm_peak, 3)
            if r.get("gemm_after_gflops"):
                r["efficiency_vs_gemm_after"] = round(r["gflops"] / r["gemm_after_gflops"], 3)
            paired = paired_efficiency(per_step, r.get("step_s"), r.get("probe_gflops"))
            if paired is not None:
                r["efficiency_paired"] = paired
        if r.get("status") != "ok" and r.get("first_step_s") is not None:
            done = r.get("steps_done", 0)
            r["estimated_denoise_s"] = round(r["first_step_s"] + median * (steps - 1), 1)
            logger.info("%s finished %d of %d steps; all steps would take about %.0f s (decode not included)",
                        name, done, steps, r["estimated_denoise_s"])
        outputs = _outputs(r)
        uncached = "onnxruntime" if "onnxruntime" in engines else "onnxruntime-cache1"
        float_frames = _outputs(engines.get(uncached))
        if outputs is not None and float_frames is not None and name != uncached:
            r["psnr_vs_onnxruntime_db"] = psnr(outputs["frames"], float_frames["frames"])
        if reference is not None and outputs is not None and name != "diffusers":
            for key in ("frames", "latents"):
                a, b = outputs[key], reference[key]
                if a.shape == b.shape:
                    r[f"max_abs_diff_{key}_vs_diffusers"] = float(np.abs(a - b).max())
                else:
                    r[f"max_abs_diff_{key}_vs_diffusers"] = f"shape {list(a.shape)} vs {list(b.shape)}"


def paired_efficiency(gflop_per_step, step_s, probe_gflops):
    """Median over steps 2..N of the step's GFLOP/s over the mean of the GEMM rates measured right before and right
    after it (``probe_gflops[i]`` follows step i + 1); None without a probe after every step."""
    if not gflop_per_step or not step_s or not probe_gflops or len(probe_gflops) < len(step_s) or len(step_s) < 2:
        return None
    ratios = [gflop_per_step / step_s[i] / ((probe_gflops[i - 1] + probe_gflops[i]) / 2)
              for i in range(1, len(step_s))]
    return round(statistics.median(ratios), 3)


def psnr(frames, reference):
    """PSNR in dB of frames in [0, 1] against ``reference`` (inf when equal)."""
    if frames.shape != reference.shape:
        return None
    mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else round(10 * np.log10(1.0 / mse), 2)


def earlier_result(path, spec):
    """An earlier run's result for the same spec (same weights, inputs and settings), else None."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    same = {k: v for k, v in (result.get("spec") or {}).items() if k != "artifact"} == {
        k: v for k, v in spec.items() if k != "artifact"}
    if result.get("status") != "ok" or not same:
        return None
    logger.info("comparing with diffusers' frames from an earlier run (%s)", result.get("frames_file"))
    return result


def _outputs(result):
    if not result or result.get("status") != "ok" or not result.get("frames_file"):
        return None
    with np.load(result["frames_file"]) as data:
        return {k: data[k] for k in ("frames", "latents")}


COLUMNS = [("engine", "engine", "{}"), ("load_s", "load_s", "{:.1f}"), ("first_step_s", "first_step_s", "{:.2f}"),
           ("step_s_median", "step_s_median", "{:.2f}"), ("denoise_s", "denoise_s", "{:.1f}"),
           ("total_s", "total_s", "{:.1f}"), ("GFLOP/video", "gflop_per_video", "{:.0f}"),
           ("stolen CPU s", "stolen_cpu_s", "{:.2f}"), ("peak_rss_gb", "peak_rss_gb", "{:.2f}"),
           ("GFLOP/step", "gflop_per_step", "{:.1f}"),
           ("GFLOP/s", "gflops", "{:.1f}"), ("eff", "efficiency", "{:.0%}"),
           ("GEMM after", "gemm_after_gflops", "{:.1f}"), ("eff vs after", "efficiency_vs_gemm_after", "{:.0%}"),
           ("eff paired", "efficiency_paired", "{:.0%}"),
           ("max|d| vs diffusers", "max_abs_diff_frames_vs_diffusers", "{:.2e}"),
           ("PSNR vs onnxruntime", "psnr_vs_onnxruntime_db", "{:.1f} dB"), ("convert_s", "convert_s", "{:.0f}"),
           ("status", "status", "{}")]


def table(engines):
    rows = [[h for h, _, _ in COLUMNS]]
    for name, r in engines.items():
        row = []
        for header, key, fmt in COLUMNS:
            value = name if key == "engine" else r.get(key)
            if name == "diffusers" and key.startswith("max_abs_diff"):
                value = "(reference)"
            row.append("-" if value is None else fmt.format(value) if not isinstance(value, str) else value)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine():
    info = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (OSError, ValueError):
        pass
    return info


def versions():
    out = {}
    for name in ("framegraph", "torch", "diffusers", "transformers", "onnxruntime", "mindspore", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# -- main ------------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers-format config folder (model_index.json + component "
                   "config.json files), e.g. ../shared/configs/svd-xt")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--calls", type=int, default=1, help="pipeline calls per engine process: the timings are the "
                   "last call's, the peak RSS the whole process's (2: what a serving process holds on its second "
                   "request, when the weights of the first are still resident)")
    p.add_argument("--paired-gemm", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the fp32 GEMM rate after every step of the last call, in a process of its own, with "
                   "the step clock paused (the eff paired column); adds about 0.7 s per step to the run")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads per engine "
                   "(default: all cores)")
    p.add_argument("--guidance-scale", type=float, default=None, help="SVD max_guidance_scale (default 3.0) or "
                   "text-to-video guidance_scale (default 9.0); must be > 1 (guidance on)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text-to-video prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the shared inputs")
    p.add_argument("--work-dir", type=Path, default=None, help="cache folder (default ./out/bench/MODEL-NAME)")
    p.add_argument("--skip-export", action="store_true", help="use the artifacts in the work dir as they are, even "
                   "if framegraph's sources changed since they were exported (missing ones are exported)")
    p.add_argument("--forward-chunk-size", type=int, default=64, help="feed-forward positions per slice in the "
                   "onnx-memory export (the onnxruntime-ffchunk and -decode1 engines)")
    p.add_argument("--attention-slice-mb", type=float, default=64, help="the largest attention scores per slice of "
                   "queries, in MB, in the onnx-sliced export (the onnxruntime-sliced engine)")
    p.add_argument("--export-check", action=argparse.BooleanOptionalAction, default=False,
                   help="let the export run every graph and check it against the MindSpore model (framegraph's own "
                   "default). Off by default here: the max|d| column checks the graphs end to end against diffusers, "
                   "and at real size the check's MindSpore runs raise the export's peak RSS past 16 GB")
    p.add_argument("--cache-branch", type=int, default=0, help="the step-caching branch of the onnx-cache export "
                   "(the onnxruntime-cache2/3 engines; 0: the shallowest)")
    p.add_argument("--second-frames", type=int, default=None, help="second UNet frame bucket of the ONNX "
                   "artifact, for the onnxruntime-2buckets engine (default: --frames + 2)")
    p.add_argument("--timeout", type=float, default=None, help="time limit per engine process, seconds; an engine "
                   "stopped by it reports the steps it finished and an estimate")
    p.add_argument("--export-timeout", type=float, default=None, help="time limit of the export, seconds")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [bench] %(message)s")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - set(ENGINES):
        raise SystemExit(f"--engines must be a subset of {','.join(ENGINES)}, got {args.engines!r}")
    if args.calls < 1:
        raise SystemExit("--calls must be at least 1")
    if args.guidance_scale is not None and args.guidance_scale <= 1:
        raise SystemExit("--guidance-scale must be > 1: the benchmark runs with classifier-free guidance on")
    model = Path(args.model).resolve()
    index = json.loads((model / "model_index.json").read_text())
    kind = KINDS.get(index.get("_class_name"))
    if kind is None:
        raise SystemExit(f"{model}: pipeline class {index.get('_class_name')!r} is not one of {sorted(KINDS)}")
    name = model.parent.name if model.name == "pipeline" else model.name
    args.work_dir = (args.work_dir or ROOT / "out" / "bench" / name).resolve()
    runs = args.work_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model), "kind": kind, "settings": {
        "height": args.height, "width": args.width, "frames": args.frames, "steps": args.steps,
        "threads": args.threads, "dtype": "float32", "seed": args.seed, "engines": engines, "calls": args.calls,
        "paired_gemm": args.paired_gemm},
        "machine": machine(), "versions": versions()}

    report["pipeline"] = make_pipeline(model, args.work_dir / "pipeline", args.seed)
    # ONNX: the frame bucket measured plus a second one (stored once: shared weights); MindIR: one bucket (each
    # MindIR graph carries its own copy of the weights, so a second bucket would double the disk use).
    report["exports"] = {}
    for key in sorted({ENGINES[e].export for e in engines if ENGINES[e].export is not None}):
        report["exports"][key] = export_artifact(args, report["pipeline"], key)
    if "onnx" in report["exports"] and report["exports"]["onnx"].get("status", "ok") == "ok":
        report["exports"]["onnx"]["bucket_disk_gb"] = bucket_disk(Path(report["exports"]["onnx"]["path"]),
                                                                  args.frames)
    step_cache = any(EXPORTS[ENGINES[e].export].step_cache for e in engines if ENGINES[e].export)
    spec = make_inputs(args, kind, args.work_dir / "pipeline", runs, step_cache)
    report["settings"].update({k: spec[k] for k in spec if "guidance" in k or k == "prompt"})
    spec_path = runs / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))

    gemm = [run_worker("gemm", spec_path, runs / "gemm-before.json", args.threads)]
    report["unet_flops"] = run_worker("flops", spec_path, runs / "flops.json", args.threads)
    results = {}
    for engine in engines:
        export = report["exports"].get(ENGINES[engine].export)
        if export is not None and export.get("status", "ok") != "ok":
            results[engine] = {"status": f"not run: export {export['status']}"}
            continue
        spec["artifact"] = export and export["path"]
        spec_path.write_text(json.dumps(spec, indent=1))
        results[engine] = run_worker(engine, spec_path, runs / f"{engine}.json", args.threads, args.timeout)
    gemm.append(run_worker("gemm", spec_path, runs / "gemm-after.json", args.threads))
    peaks = [g.get("peak_gflops") for g in gemm if g.get("peak_gflops")]
    report["gemm"] = {"peak_gflops": max(peaks) if peaks else None, "runs": gemm,
                      "method": "fp32 4096^3 matmul, numpy, torch and ONNX Runtime (B input, B prepacked), best of 5, "
                                "the fastest, before and after the engines"}
    earlier = None
    if "diffusers" not in engines:
        earlier = earlier_result(runs / "diffusers.json", spec)
        report["diffusers_reference"] = earlier and {k: earlier.get(k) for k in ("frames_file", "finished_at")}
    derive(results, report["unet_flops"].get("unet_gflop_per_step"), report["gemm"]["peak_gflops"], args.steps,
           earlier, report["unet_flops"])
    report["engines"] = results
    report["machine"]["loadavg_end"] = os.getloadavg()

    print(f"\n{kind} {name}: {args.height}x{args.width}, {args.frames} frames, {args.steps} steps, guidance on, "
          f"fp32, {args.threads} threads; load average {report['machine']['loadavg_start'][0]:.1f} at start")
    for fmt, export in report["exports"].items():
        print(f"export {fmt} frames {export.get('frames')} ({'reused' if export.get('reused') else 'this run'}): "
              f"{export.get('export_s', '-')} s, peak RSS {export.get('peak_rss_gb', '-')} GB, artifact "
              f"{export.get('artifact_gb', '-')} GB [{export.get('status', 'ok')}]")
        if export.get("bucket_disk_gb"):
            print(f"  disk: {export['bucket_disk_gb']}")
    print(f"fp32 GEMM peak: {report['gemm']['peak_gflops']} GFLOP/s; UNet "
          f"{report['unet_flops'].get('unet_gflop_per_step')} GFLOP per step (batch 2, FlopCounterMode)\n")
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"\nfigures written to {args.json}")
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
