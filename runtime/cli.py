"""``framegraph``: ``generate`` a video from an artifact, ``serve`` one over HTTP, or run the bundled ``demo``.

Every argument is checked before any graph is opened: a bad value stops the command at once with an error that
names its flag.
"""

import argparse
import logging
import sys
from pathlib import Path

from .backends import available_backends

logger = logging.getLogger("framegraph")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# the source checkout's diffusers-saved tiny SVD pipeline, which ``demo --export`` exports first
DEMO_MODEL = PACKAGE_ROOT / "tests" / "fixtures" / "svd-tiny" / "pipeline"



def _pipelines():
    """The registered pipeline classes by kind: their declared call arguments are the generate flags."""
    from framegraph.runtime.pipelines import pipeline_classes

    return pipeline_classes()


def _declared(cls):
    """The pipeline's arguments the command line offers: its call arguments and its video's frame rate."""
    return [p for p in dict.fromkeys((*cls.call_params, cls.video_fps_param)) if p.cli]


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


def _count_or_auto(minimum):
    count = _count(minimum)

    def parse(text):
        return "auto" if text == "auto" else count(text)

    parse.__name__ = "integer or auto"
    return parse


def _typed(param):
    """An argparse type that checks a flag's text against its declaration (kind and range)."""
    from framegraph.runtime.params import InvalidRequestError

    def parse(text):
        try:
            return param.parse(text)
        except InvalidRequestError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = {"int": "integer", "float": "number"}.get(param.kind, param.kind)
    return parse


def _generate_args(p):
    """The generate flags: each pipeline's declared call arguments (one flag per name), then the run options."""
    seen = {}  # name -> [(kind, its Param)]
    for kind, cls in _pipelines().items():
        for param in _declared(cls):
            seen.setdefault(param.name, []).append((kind, param))
    for name, declared in seen.items():
        param = declared[0][1]
        which = "" if len(declared) == len(_pipelines()) else f" [{', '.join(kind for kind, _ in declared)}]"
        defaults = {kind: p.default for kind, p in declared if p.default is not None}
        if len(set(defaults.values())) > 1:
            default = "; default " + ", ".join(f"{value} ({kind})" for kind, value in defaults.items())
        else:
            default = f"; default {next(iter(defaults.values()))}" if defaults else ""
        p.add_argument(param.flag, dest=name, type=_typed(param), default=None,
                       help=f"{param.help}{default}{which}")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--backend", default="onnxruntime", choices=available_backends())
    p.add_argument("--device", default=None, help="cpu, cuda (onnxruntime); CPU, GPU, Ascend (MindSpore)")
    p.add_argument("--threads", type=_count(1), default=None, help="intra-op threads")
    p.add_argument("--low-memory", action="store_true", help="keep one graph loaded at a time (peak memory of the "
                   "largest graph instead of all of them; graphs are reopened on each call)")
    p.add_argument("--split-guidance", action="store_true", help="run classifier-free guidance's unconditional and "
                   "conditional halves as two UNet runs (same frames, half the UNet's working memory)")
    p.add_argument("--resident-buckets", type=_count(0), default=1, help="how many frame buckets of the UNet stay "
                   "loaded (the least recently used is closed first; default 1: one UNet's memory whatever the frame "
                   "count; 0: all)")
    p.add_argument("--output-type", default="pil", choices=("pil", "np"), help="frames handed to the writer")


def build_parser():
    parser = argparse.ArgumentParser(prog="framegraph", description="Run compiled video diffusion artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render a video from an artifact folder")
    gen.add_argument("artifacts", help="artifact folder written by svd-export")
    for param in _inputs():
        kinds = ", ".join(kind for kind, cls in _pipelines().items() if cls.input_param.name == param.name)
        gen.add_argument(param.flag, dest=param.name, default=None, help=f"{param.help} [{kinds}]")
    gen.add_argument("--out", required=True, help="output .mp4 or .gif (an existing file is replaced)")
    _generate_args(gen)
    sub.add_parser("export", add_help=False, help="export a diffusers-format pipeline folder to an artifact (the same "
                   "command as svd-export; needs the export extra): framegraph export MODEL --out DIR ...")
    demo = sub.add_parser("demo", help="render a video with the tiny SVD artifact that ships with framegraph")
    demo.add_argument("--out", default="out/demo", help="folder for the video (and the artifact, with --export)")
    demo.add_argument("--export", action="store_true", help="first export the source checkout's tiny diffusers "
                      "pipeline with svd-export (needs the export extra), then render from that artifact")
    _serve_parser(sub)
    lite = sub.add_parser("setup-lite", help="set up the MindSpore Lite runtime and converter for backend "
                          "mindspore_lite and export --formats mslite: an existing Lite package, or the PyPI wheel's "
                          "libraries fetched into a cache; builds framegraph's shim (needs g++)")
    lite.add_argument("--mslite-home", default=None, help="a MindSpore Lite package folder to use (default: the "
                      "MSLITE_HOME environment variable, else fetch mindspore-lite from the package index)")
    lite.add_argument("--cache", default=None, help="where the fetched libraries and the built shim go (default: "
                      "$FRAMEGRAPH_CACHE or ~/.cache/framegraph)")
    return parser


def setup_lite(args):
    """``setup-lite``: the Lite runtime ready for the mindspore_lite backend; logs where it is."""
    from framegraph.runtime.lite.install import LiteSetupError, setup_lite as install

    try:
        found = install(mslite_home=args.mslite_home, cache_dir=args.cache)
    except LiteSetupError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("MindSpore Lite is set up: libraries in %s, shim %s, converter %s", found.lib_dir, found.shim,
                found.converter)
    return 0


def _serve_parser(sub):
    serve = sub.add_parser("serve", help="serve an artifact over HTTP (needs the serve extra)")
    serve.add_argument("artifacts", help="artifact folder written by svd-export")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=_count(0), default=8000)
    serve.add_argument("--workers", type=_count(1), default=1, help="jobs run at the same time")
    serve.add_argument("--max-queue", type=_count(1), default=16, help="jobs that may wait; more are refused (429)")
    serve.add_argument("--sessions", default="shared", choices=("shared", "per_worker"),
                       help="one graph session shared by all workers, or one per worker")
    verify = serve.add_mutually_exclusive_group()
    verify.add_argument("--no-verify", dest="verify", action="store_false",
                        help="trusted fast start: skip the sha256 check of the artifact files (sizes still checked)")
    verify.add_argument("--verify-full", dest="verify", action="store_const", const="full",
                        help="hash every artifact file, also those this machine already checked unchanged")
    serve.add_argument("--no-warmup", dest="warmup", action="store_false",
                       help="open graphs at their first request instead of running each once before serving")
    serve.add_argument("--backend", default="onnxruntime", choices=available_backends())
    serve.add_argument("--device", default=None, help="cpu, cuda (onnxruntime); CPU, GPU, Ascend (MindSpore)")
    serve.add_argument("--threads", type=_count(1), default=None, help="intra-op threads per session")
    ray = serve.add_argument_group("Ray Serve (needs the ray extra; docs/scale-out.md)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: model replicas behind the same HTTP API "
                     "(--workers and --max-queue then apply per replica and to the whole cluster)")
    ray.add_argument("--address", default=None, help="the Ray cluster to join: 'auto' (this node's) or HOST:PORT; "
                     "default: start a local Ray instance")
    ray.add_argument("--replicas", type=_count_or_auto(1), default=None, help="model replicas, each opening the "
                     "artifact once (default 2); 'auto': one per --replica-cpus CPUs of the cluster")
    ray.add_argument("--max-replicas", type=_count(1), default=None, help="autoscale between --replicas and this "
                     "many replicas on the queue length (Serve's autoscaler)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves, and its "
                     "intra-op threads unless --threads is given (default 1)")
    ray.add_argument("--serve-config", metavar="FILE", default=None, help="write the Serve config file of these "
                     "options for `serve deploy FILE` on a running cluster, and exit")


def serve(args):
    if args.ray:
        return serve_ray(args)
    for flag, value in (("--address", args.address), ("--replicas", args.replicas),
                        ("--max-replicas", args.max_replicas), ("--serve-config", args.serve_config)):
        if value is not None:
            raise UsageError(f"{flag} applies to Ray Serve only; add --ray, or leave it out")
    try:
        from framegraph.runtime.server import serve as run_server
    except ImportError as exc:
        raise SystemExit(str(exc))
    options = {k: v for k, v in (("device", args.device), ("num_threads", args.threads)) if v is not None}
    run_server(args.artifacts, host=args.host, port=args.port, workers=args.workers, max_queue=args.max_queue,
               sessions=args.sessions, verify=args.verify, warmup=args.warmup, backend=args.backend, **options)
    return 0


def serve_ray(args):
    """``serve --ray``: the artifact on Ray Serve (runtime/ray_serve.py) until interrupted."""
    try:
        from framegraph.runtime.ray_serve import check_app_options, serve_on_ray, write_serve_config
    except ImportError as exc:
        raise SystemExit(str(exc))
    options = {k: v for k, v in (("device", args.device), ("num_threads", args.threads),
                                 ("max_replicas", args.max_replicas)) if v is not None}
    options.update(replicas=args.replicas or 2, replica_cpus=args.replica_cpus, workers=args.workers,
                   max_queue=args.max_queue, sessions=args.sessions, verify=args.verify, warmup=args.warmup,
                   backend=args.backend)
    if args.serve_config and args.address is not None:
        raise UsageError("--address does not go with --serve-config: pass the cluster to `serve deploy --address`")
    try:
        check_app_options(args.artifacts, **options)
        if args.serve_config:
            path = write_serve_config(args.serve_config, args.artifacts, host=args.host, port=args.port, **options)
            logger.info("wrote %s; deploy it with: serve deploy %s", path, path)
            return 0
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    serve_on_ray(args.artifacts, address=args.address, host=args.host, port=args.port, **options)
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


def _first_argument(cls, args):
    """The call's first argument from its flag (``input_param``: an image loaded from a path or URL, a text)."""
    from framegraph.runtime import load_image

    param = cls.input_param
    value = getattr(args, param.name)
    if value is None:
        raise UsageError(f"{args.artifacts} is a {cls.kind!r} artifact: pass {param.flag}")
    others = [p.flag for p in _inputs() if p.name != param.name and getattr(args, p.name) is not None]
    if others:
        raise UsageError(f"{', '.join(others)} do not apply to a {cls.kind!r} artifact; it takes {param.flag}")
    if param.kind != "image":
        return value
    try:
        return load_image(value)
    except (TypeError, ValueError, OSError) as exc:
        raise UsageError(f"{param.flag}: {exc}") from None


def _inputs():
    """The pipelines' first-argument Params, one per name."""
    return list({cls.input_param.name: cls.input_param for cls in _pipelines().values()}.values())


def generate(artifacts, out, args):
    """Check every argument, open the artifact (no graph yet), check the call against it, then render and write.
    The process makes one call, so it opens the graphs for the shortest load (no weight packing on ONNX Runtime)."""
    from framegraph.runtime import export_to_video
    from framegraph.runtime.manifest import Manifest
    from framegraph.runtime.params import InvalidRequestError

    _check_output(out)
    kind = Manifest.load(artifacts).pipeline
    pipelines = _pipelines()
    if kind not in pipelines:
        raise UsageError(f"{artifacts} holds a {kind!r} artifact, which framegraph generate cannot run")
    cls = pipelines[kind]
    declared = _declared(cls)
    mine = {p.name for p in declared}
    others = sorted({p.flag for other in pipelines.values() for p in _declared(other)
                     if p.name not in mine and getattr(args, p.name) is not None})
    if others:
        raise UsageError(f"{', '.join(others)} do not apply to a {kind!r} artifact; leave them out")
    arguments = {p.name: getattr(args, p.name) for p in declared}
    arguments.update({cls.input_param.name: _first_argument(cls, args), "output_type": args.output_type})
    pipe = cls.from_artifacts(artifacts, backend=args.backend, device=args.device, num_threads=args.threads,
                              low_memory=args.low_memory, resident_buckets=args.resident_buckets or None,
                              split_guidance=args.split_guidance)
    request = pipe.request(arguments)  # resolved and checked as the engine does, before any graph is opened
    try:
        pipe.check_request(request)
    except InvalidRequestError as exc:
        flag = next((p.flag for p in declared if p.name == exc.field), exc.field)
        raise UsageError(f"{flag}: {exc}") from None
    pipe.set_progress_bar_config(desc="generate", unit="step")
    frames = pipe(**pipe.call_of(request), generator=args.seed).frames[0]
    return export_to_video(frames, out, fps=request[cls.video_fps_param.name])


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


def export(argv):
    """``framegraph export ...``: svd-export under its documented name."""
    try:
        from framegraph.export.cli import main as export_main
    except ImportError as exc:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logger.error("framegraph export needs MindSpore: pip install 'framegraph[export]' (%s)", exc)
        return 2
    return export_main(argv, prog="framegraph export")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # every flag after it is svd-export's
        return export(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "setup-lite":
            return setup_lite(args)
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
