"""``framegraph``: ``generate`` a video from an artifact, or run the bundled ``demo``."""

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("framegraph")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = PACKAGE_ROOT / "tests" / "fixtures" / "svd-tiny"
DEMO_SIZE = 32
DEMO_FRAMES = 4


def _generate_args(p):
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=7, help="video frame rate (SVD also conditions on it)")
    p.add_argument("--motion-bucket-id", type=int, default=127)
    p.add_argument("--noise-aug-strength", type=float, default=0.02)
    p.add_argument("--min-guidance-scale", type=float, default=1.0)
    p.add_argument("--max-guidance-scale", type=float, default=3.0)
    p.add_argument("--decode-chunk-size", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None, help="text-to-video guidance (default 9.0)")
    p.add_argument("--negative-prompt", default=None, help="text-to-video negative prompt")
    p.add_argument("--eta", type=float, default=0.0, help="text-to-video DDIM eta")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "mindspore", "mindspore_lite"))
    p.add_argument("--device", default=None, help="MindSpore device: CPU, GPU or Ascend")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--low-memory", action="store_true", help="keep one graph loaded at a time (peak memory of the "
                   "largest graph instead of all of them; graphs are reopened on each call)")
    p.add_argument("--resident-buckets", type=int, default=1, help="how many frame buckets of the UNet stay loaded "
                   "(the least recently used is closed first; default 1: one UNet's memory whatever the frame "
                   "count; 0: all)")
    p.add_argument("--output-type", default="pil", choices=("pil", "np"), help="frames handed to the writer")


def build_parser():
    parser = argparse.ArgumentParser(prog="framegraph", description="Run compiled video diffusion artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render a video from an artifact folder")
    gen.add_argument("artifacts", help="artifact folder written by svd-export")
    gen.add_argument("--image", default=None, help="conditioning image, path or URL (image-to-video artifacts)")
    gen.add_argument("--prompt", default=None, help="text prompt (text-to-video artifacts)")
    gen.add_argument("--out", required=True, help="output .mp4 or .gif")
    _generate_args(gen)
    demo = sub.add_parser("demo", help="export the bundled tiny model and render a video from the bundled image")
    demo.add_argument("--out", default="out/demo", help="folder for the artifact and the video")
    _serve_parser(sub)
    return parser


def _serve_parser(sub):
    serve = sub.add_parser("serve", help="serve an artifact over HTTP (needs the serve extra)")
    serve.add_argument("artifacts", help="artifact folder written by svd-export")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="jobs run at the same time")
    serve.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more are refused (429)")
    serve.add_argument("--sessions", default="shared", choices=("shared", "per_worker"),
                       help="one graph session shared by all workers, or one per worker")
    serve.add_argument("--no-verify", dest="verify", action="store_false",
                       help="trusted fast start: skip the sha256 check of the artifact files (sizes still checked)")
    serve.add_argument("--no-warmup", dest="warmup", action="store_false",
                       help="open graphs at their first request instead of running each once before serving")
    serve.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "mindspore", "mindspore_lite"))
    serve.add_argument("--device", default=None, help="cpu, cuda (onnxruntime); CPU, GPU, Ascend (MindSpore)")
    serve.add_argument("--threads", type=int, default=None, help="intra-op threads per session")


def serve(args):
    try:
        from framegraph.runtime.server import serve as run_server
    except ImportError as exc:
        raise SystemExit(str(exc))
    options = {k: v for k, v in (("device", args.device), ("num_threads", args.threads)) if v is not None}
    run_server(args.artifacts, host=args.host, port=args.port, workers=args.workers, max_queue=args.max_queue,
               sessions=args.sessions, verify=args.verify, warmup=args.warmup, backend=args.backend, **options)
    return 0


def _image_to_video(artifacts, args):
    from framegraph.runtime import StableVideoDiffusionPipeline, load_image

    if args.image is None:
        raise ValueError(f"{artifacts} is an image-to-video artifact: pass --image")
    pipe = StableVideoDiffusionPipeline.from_artifacts(artifacts, backend=args.backend, device=args.device,
                                                       num_threads=args.threads, low_memory=args.low_memory,
                                                       resident_buckets=args.resident_buckets or None)
    pipe.set_progress_bar_config(desc="generate", unit="step")
    kwargs = {} if args.steps is None else {"num_inference_steps": args.steps}
    return pipe(
        load_image(args.image), num_frames=args.num_frames, generator=args.seed, fps=args.fps,
        motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
        min_guidance_scale=args.min_guidance_scale, max_guidance_scale=args.max_guidance_scale,
        decode_chunk_size=args.decode_chunk_size, output_type=args.output_type, **kwargs,
    ).frames[0]


def _text_to_video(artifacts, args):
    from framegraph.runtime import TextToVideoSDPipeline

    if args.prompt is None:
        raise ValueError(f"{artifacts} is a text-to-video artifact: pass --prompt")
    pipe = TextToVideoSDPipeline.from_artifacts(artifacts, backend=args.backend, device=args.device,
                                                num_threads=args.threads, low_memory=args.low_memory,
                                                resident_buckets=args.resident_buckets or None)
    pipe.set_progress_bar_config(desc="generate", unit="step")
    kwargs = {k: v for k, v in (("num_frames", args.num_frames), ("num_inference_steps", args.steps),
                                ("guidance_scale", args.guidance_scale)) if v is not None}
    return pipe(args.prompt, negative_prompt=args.negative_prompt, eta=args.eta, generator=args.seed,
                decode_chunk_size=args.decode_chunk_size, output_type=args.output_type, **kwargs).frames[0]


GENERATORS = {"stable-video-diffusion": _image_to_video, "text-to-video-sd": _text_to_video}


def generate(artifacts, out, args):
    from framegraph.runtime import export_to_video
    from framegraph.runtime.manifest import Manifest

    kind = Manifest.load(artifacts).pipeline
    if kind not in GENERATORS:
        raise ValueError(f"{artifacts} holds a {kind!r} artifact, which framegraph generate cannot run")
    return export_to_video(GENERATORS[kind](artifacts, args), out, fps=args.fps)


def demo(out):
    try:
        from framegraph.export.cli import main as export_main
    except ImportError as exc:
        raise SystemExit(f"the demo exports the bundled model and needs MindSpore: pip install -e '.[export]' ({exc})")
    if not (DEMO_MODEL / "pipeline" / "model_index.json").is_file():
        raise SystemExit(f"bundled demo model not found at {DEMO_MODEL}; run the demo from a source checkout")
    out = Path(out)
    artifact = out / "artifact"
    code = export_main([str(DEMO_MODEL / "pipeline"), "--out", str(artifact), "--frames", str(DEMO_FRAMES),
                        "--height", str(DEMO_SIZE), "--width", str(DEMO_SIZE), "--formats", "onnx"])
    if code:
        raise SystemExit(code)
    args = build_parser().parse_args(["generate", str(artifact), "--image", str(DEMO_MODEL / "input.png"),
                                      "--out", str(out / "video.mp4"), "--steps", "10"])
    return generate(artifact, args.out, args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "demo":
            path = demo(args.out)
        else:
            path = generate(args.artifacts, args.out, args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    print(f"video written to {Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
