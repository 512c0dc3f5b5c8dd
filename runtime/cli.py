"""``framegraph``: ``generate`` a video from an artifact, ``serve`` one over HTTP, or run the bundled ``demo``.

Every argument is checked before any graph is opened: a bad value stops the command at once with an error that
names its flag.
"""

import argparse
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger("framegraph")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# the source checkout's diffusers-saved tiny SVD pipeline, which ``demo --export`` exports first
DEMO_MODEL = PACKAGE_ROOT / "tests" / "fixtures" / "svd-tiny" / "pipeline"

# pipeline call argument -> the generate flag that sets it
FLAGS = {
    "num_frames": "--num-frames", "num_inference_steps": "--steps", "fps": "--fps",
    "motion_bucket_id": "--motion-bucket-id", "noise_aug_strength": "--noise-aug-strength",
    "min_guidance_scale": "--min-guidance-scale", "max_guidance_scale": "--max-guidance-scale",
    "decode_chunk_size": "--decode-chunk-size", "guidance_scale": "--guidance-scale", "eta": "--eta",
    "prompt": "--prompt", "image": "--image", "output_type": "--output-type",
    "height": "the artifact's height (re-export for another)", "width": "the artifact's width",
}


class UsageError(ValueError):
    """A command-line argument is invalid; the message names its flag."""


def _count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _generate_args(p):
    p.add_argument("--num-frames", type=_count(1), default=None, help="default: the artifact's")
    p.add_argument("--steps", type=_count(1), default=None, help="num_inference_steps (default: the artifact's)")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--fps", type=_count(1), default=None,
                   help="video frame rate (default: 7 for SVD, which is also conditioned on it; 8 for text-to-video)")
    p.add_argument("--motion-bucket-id", type=_count(0), default=None, help="SVD (default 127)")
    p.add_argument("--noise-aug-strength", type=_finite, default=None, help="SVD (default 0.02)")
    p.add_argument("--min-guidance-scale", type=_finite, default=None, help="SVD (default 1.0)")
    p.add_argument("--max-guidance-scale", type=_finite, default=None, help="SVD (default 3.0)")
    p.add_argument("--decode-chunk-size", type=_count(1), default=None)
    p.add_argument("--guidance-scale", type=_finite, default=None, help="text-to-video guidance (default 9.0)")
    p.add_argument("--negative-prompt", default=None, help="text-to-video negative prompt")
    p.add_argument("--eta", type=_finite, default=None, help="text-to-video DDIM eta (default 0.0)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "mindspore", "mindspore_lite"))
    p.add_argument("--device", default=None, help="cpu, cuda (onnxruntime); CPU, GPU, Ascend (MindSpore)")
    p.add_argument("--threads", type=_count(1), default=None, help="intra-op threads")
    p.add_argument("--low-memory", action="store_true", help="keep one graph loaded at a time (peak memory of the "
                   "largest graph instead of all of them; graphs are reopened on each call)")
    p.add_argument("--resident-buckets", type=_count(0), default=1, help="how many frame buckets of the UNet stay "
                   "loaded (the least recently used is closed first; default 1: one UNet's memory whatever the frame "
                   "count; 0: all)")
    p.add_argument("--output-type", default="pil", choices=("pil", "np"), help="frames handed to the writer")


def build_parser():
    parser = argparse.ArgumentParser(prog="framegraph", description="Run compiled video diffusion artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render a video from an artifact folder")
    gen.add_argument("artifacts", help="artifact folder written by svd-export")
    gen.add_argument("--image", default=None, help="conditioning image, path or URL (image-to-video artifacts)")
    gen.add_argument("--prompt", default=None, help="text prompt (text-to-video artifacts)")
    gen.add_argument("--out", required=True, help="output .mp4 or .gif (an existing file is replaced)")
    _generate_args(gen)
    demo = sub.add_parser("demo", help="render a video with the tiny SVD artifact that ships with framegraph")
    demo.add_argument("--out", default="out/demo", help="folder for the video (and the artifact, with --export)")
    demo.add_argument("--export", action="store_true", help="first export the source checkout's tiny diffusers "
                      "pipeline with svd-export (needs the export extra), then render from that artifact")
    _serve_parser(sub)
    return parser


def _serve_parser(sub):
    serve = sub.add_parser("serve", help="serve an artifact over HTTP (needs the serve extra)")
    serve.add_argument("artifacts", help="artifact folder written by svd-export")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=_count(0), default=8000)
    serve.add_argument("--workers", type=_count(1), default=1, help="jobs run at the same time")
    serve.add_argument("--max-queue", type=_count(1), default=16, help="jobs that may wait; more are refused (429)")
    serve.add_argument("--sessions", default="shared", choices=("shared", "per_worker"),
                       help="one graph session shared by all workers, or one per worker")
    serve.add_argument("--no-verify", dest="verify", action="store_false",
                       help="trusted fast start: skip the sha256 check of the artifact files (sizes still checked)")
    serve.add_argument("--no-warmup", dest="warmup", action="store_false",
                       help="open graphs at their first request instead of running each once before serving")
    serve.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "mindspore", "mindspore_lite"))
    serve.add_argument("--device", default=None, help="cpu, cuda (onnxruntime); CPU, GPU, Ascend (MindSpore)")
    serve.add_argument("--threads", type=_count(1), default=None, help="intra-op threads per session")


def serve(args):
    try:
        from framegraph.runtime.server import serve as run_server
    except ImportError as exc:
        raise SystemExit(str(exc))
    options = {k: v for k, v in (("device", args.device), ("num_threads", args.threads)) if v is not None}
    run_server(args.artifacts, host=args.host, port=args.port, workers=args.workers, max_queue=args.max_queue,
               sessions=args.sessions, verify=args.verify, warmup=args.warmup, backend=args.backend, **options)
    return 0


def _check_output(out):
    from framegraph.runtime.video import WRITERS

    path = Path(out)
    if path.suffix.lower() not in WRITERS:
        raise UsageError(f"--out {out}: the video is written by its suffix, one of {', '.join(sorted(WRITERS))}")
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; pass a file path such as {path / 'video.mp4'}")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a folder; choose another --out")


def _image(args):
    from framegraph.runtime import load_image

    if args.image is None:
        raise UsageError(f"{args.artifacts} is an image-to-video artifact: pass --image PATH")
    if args.prompt is not None or args.negative_prompt is not None:
        raise UsageError("--prompt and --negative-prompt are for text-to-video artifacts; this one takes --image")
    try:
        return load_image(args.image)
    except (TypeError, ValueError, OSError) as exc:
        raise UsageError(f"--image: {exc}") from None


def _image_to_video_call(args):
    return dict(num_frames=args.num_frames, num_inference_steps=args.steps, fps=args.fps,
                motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
                min_guidance_scale=args.min_guidance_scale, max_guidance_scale=args.max_guidance_scale,
                height=None, width=None)


def _text_to_video_call(args):
    if args.prompt is None:
        raise UsageError(f"{args.artifacts} is a text-to-video artifact: pass --prompt TEXT")
    if args.image is not None:
        raise UsageError("--image is for image-to-video artifacts; this one takes --prompt")
    return dict(num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                eta=args.eta, height=None, width=None)


def _refuse_other_kind(args, flags):
    given = [flag for flag, value in flags.items() if getattr(args, value) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} do not apply to this artifact's pipeline; leave them out")


def generate(artifacts, out, args):
    """Check every argument, open the artifact (no graph yet), check the call against it, then render and write."""
    from framegraph.runtime import StableVideoDiffusionPipeline, TextToVideoSDPipeline, export_to_video
    from framegraph.runtime.manifest import Manifest
    from framegraph.runtime.pipelines.common import CallArgumentError

    _check_output(out)
    kind = Manifest.load(artifacts).pipeline
    if kind == StableVideoDiffusionPipeline.kind:
        _refuse_other_kind(args, {"--guidance-scale": "guidance_scale", "--eta": "eta"})
        image, call, cls = _image(args), _image_to_video_call(args), StableVideoDiffusionPipeline
    elif kind == TextToVideoSDPipeline.kind:
        _refuse_other_kind(args, {"--motion-bucket-id": "motion_bucket_id", "--noise-aug-strength":
                                  "noise_aug_strength", "--min-guidance-scale": "min_guidance_scale",
                                  "--max-guidance-scale": "max_guidance_scale"})
        image, call, cls = None, _text_to_video_call(args), TextToVideoSDPipeline
    else:
        raise UsageError(f"{artifacts} holds a {kind!r} artifact, which framegraph generate cannot run")
    pipe = cls.from_artifacts(artifacts, backend=args.backend, device=args.device, num_threads=args.threads,
                              low_memory=args.low_memory, resident_buckets=args.resident_buckets or None)
    call = pipe.call_arguments(**call)
    try:
        if image is not None:
            pipe.check_inputs(**call, decode_chunk_size=args.decode_chunk_size, output_type=args.output_type)
        else:
            pipe.check_inputs(args.prompt, **call, decode_chunk_size=args.decode_chunk_size,
                              output_type=args.output_type)
    except CallArgumentError as exc:
        raise UsageError(f"{FLAGS.get(exc.argument, exc.argument)}: {exc}") from None
    fps = call.get("fps") or args.fps or pipe.video_fps
    pipe.set_progress_bar_config(desc="generate", unit="step")
    if image is not None:
        frames = pipe(image, **call, decode_chunk_size=args.decode_chunk_size, generator=args.seed,
                      output_type=args.output_type).frames[0]
    else:
        frames = pipe(args.prompt, **call, negative_prompt=args.negative_prompt, generator=args.seed,
                      decode_chunk_size=args.decode_chunk_size, output_type=args.output_type).frames[0]
    return export_to_video(frames, out, fps=fps)


def demo(out, export=False):
    """Render the demo video from the artifact that ships with framegraph (base install), or, with ``export``,
    from a fresh export of the source checkout's tiny pipeline."""
    from framegraph.runtime.demo import DEMO_ARTIFACT, DEMO_FRAMES, DEMO_IMAGE, DEMO_SIZE, DEMO_STEPS

    out = Path(out)
    artifact = DEMO_ARTIFACT
    if export:
        try:
            from framegraph.export.cli import main as export_main
        except ImportError as exc:
            raise UsageError(f"demo --export needs MindSpore: pip install -e '.[export]' ({exc})") from None
        if not (DEMO_MODEL / "model_index.json").is_file():
            raise UsageError(f"demo --export exports {DEMO_MODEL}, which only a source checkout has; run "
                             "'framegraph demo' without --export to use the artifact that ships with framegraph")
        artifact = out / "artifact"
        overwrite = ["--overwrite"] if (artifact / "manifest.json").is_file() else []
        code = export_main([str(DEMO_MODEL), "--out", str(artifact), "--frames", ",".join(map(str, DEMO_FRAMES)),
                            "--height", str(DEMO_SIZE), "--width", str(DEMO_SIZE), "--formats", "onnx", *overwrite])
        if code:
            raise SystemExit(code)
    args = build_parser().parse_args(["generate", str(artifact), "--image", str(DEMO_IMAGE), "--out",
                                      str(out / "video.mp4"), "--num-frames", str(max(DEMO_FRAMES)),
                                      "--steps", str(DEMO_STEPS)])
    return generate(artifact, args.out, args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "demo":
            path = demo(args.out, export=args.export)
        else:
            path = generate(args.artifacts, args.out, args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    except ImportError as exc:  # a backend's engine that is not installed
        logger.error("%s", exc)
        return 2
    print(f"video written to {Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
