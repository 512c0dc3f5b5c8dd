"""The export command: diffusers-format pipeline folder -> artifact folder.

One parser under three names: ``framegraph export`` (the documented one), ``svd-export`` (kept: users know it) and
``python -m framegraph.export``. :func:`main` takes the name to show in usage and help as ``prog``.
"""

import argparse
import errno
import logging
import sys

from framegraph.export.artifact import check_output_folder
from framegraph.export.driver import export_pipeline
from framegraph.export.options import DEFAULT_ATTENTION_SLICE_MB, ISOLATE_MODES, QUANTIZE_MODES, ExportOptions
from framegraph.export.pipeline_folder import PipelineFolder
from framegraph.export.registry import recipe_function
from framegraph.models.loading import resolve_model_path
from framegraph.runtime.manifest import DEFAULT_FORMATS

logger = logging.getLogger("framegraph.export")

PROG = "svd-export"  # the console script's name; runtime/cli.py passes "framegraph export"


def _positive_int(text):
    """A size or count: a positive integer (0 or less is refused, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r} (omit the flag for the default)")
    return value


def _positive_ints(text):
    """Bucket sizes: a non-empty comma-separated list of positive integers (an empty list is refused, never read as
    "the default")."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, e.g. 14,25; got {text!r} "
                                         "(omit the flag for the default)")
    return values


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 0, e.g. 0; got {text!r}")
    return value


def _formats(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser(prog=PROG):
    """The export command's parser; ``prog`` is the name its usage and help show."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a diffusers-format video diffusion pipeline (folder or hub id) to static-shape "
        "MindIR and ONNX graphs in one artifact folder with a manifest.json.",
    )
    p.add_argument("model", help="local diffusers-format pipeline folder, or a hub repo id (needs network)")
    p.add_argument("--out", required=True, help="artifact folder to write (written atomically when done); an existing "
                   "one must be empty or a framegraph artifact, replaced only with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the framegraph artifact already at --out (its "
                   "graphs that still match are reused); other folders are never replaced")
    p.add_argument("--frames", type=_positive_ints, default=None, help="frame-count buckets, e.g. 14,25 "
                   "(default: unet.config.num_frames)")
    p.add_argument("--height", type=_positive_int, default=None,
                   help="video height (default: the pipeline's, 576 for SVD)")
    p.add_argument("--width", type=_positive_int, default=None,
                   help="video width (default: the pipeline's, 1024 for SVD)")
    p.add_argument("--batch", type=_positive_int, default=1, help="videos per graph call (default 1)")
    p.add_argument("--formats", type=_formats, default=DEFAULT_FORMATS, help="any of onnx,mindir,mslite (default "
                   "onnx,mindir); mslite (MindSpore Lite, converted from the ONNX graphs) needs `framegraph setup-lite`")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="compute dtype of the graphs")
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (*.fp16.safetensors)")
    p.add_argument("--decode-chunk-sizes", type=_positive_ints, default=None,
                   help="VAE decode chunk lengths to compile (default: the frame count)")
    p.add_argument("--random-weights", action="store_true", help="build from configs with random weights "
                   "(benchmarks at real size; no weight files needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    p.add_argument("--check", dest="check", action="store_true", default=True,
                   help="run every exported graph and compare it with the MindSpore model (default)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the numerical check")
    p.add_argument("--full-check", action="store_true",
                   help="check graphs larger than 512x512 at their size (hours on a CPU at 576x1024) instead of on "
                   "four small probe sizes whose program they are shown to be (docs/export.md)")
    p.add_argument("--forward-chunk-size", type=_positive_int, default=None,
                   help="run the UNet's feed-forward layers over slices of this many positions inside the graph (the "
                   "compiled unet.enable_forward_chunking(): same numbers, lower peak memory at large sizes)")
    p.add_argument("--attention-slice-mb", type=float, default=DEFAULT_ATTENTION_SLICE_MB,
                   help="compute each attention over slices of its queries whose float32 scores take at most this "
                   f"many MB (default {DEFAULT_ATTENTION_SLICE_MB:g}; same numbers; whole [batch, heads, queries, "
                   "keys] scores grow with the square of the positions: 85 GB in SVD-XT's first level at 576x1024, "
                   "25 frames); 0 computes every attention whole")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="int8 UNet weights in the ONNX graphs (ONNX Runtime dynamic quantization of the linear "
                   "layers, 7-bit weights; convolutions stay float; faster on CPU, less exact: compare the frames)")
    p.add_argument("--cache-branch", type=_non_negative_int, default=None, metavar="B",
                   help="step caching (DeepCache): also export, per UNet bucket, a deep graph that outputs the feature "
                   "entering the (B+1)-th up layer from the end and a shallow graph that reuses it (0: the shallowest "
                   "and fastest); a call then runs the full UNet every cache_interval-th step only")
    p.add_argument("--isolate", choices=ISOLATE_MODES, default="auto",
                   help="export components in child processes so MindSpore's compile memory is returned after each "
                   "graph (auto: components with >= 1 GiB of parameters; needed at real size on 24 GiB)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None, prog=PROG):
    """Run the export command on ``argv`` (default: sys.argv[1:]); returns the exit status (2: refused)."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_output_folder(args.out, args.overwrite)  # before any work: a refused --out costs nothing
        folder = resolve_model_path(args.model)
        pipeline = PipelineFolder(folder, variant=args.variant, dtype=args.dtype,
                                  random_weights=args.random_weights, seed=args.seed)
        options = ExportOptions(
            frames=args.frames, height=args.height, width=args.width, batch=args.batch, formats=args.formats,
            dtype=args.dtype, decode_chunk_sizes=args.decode_chunk_sizes, check=args.check,
            full_check=args.full_check,
            isolate=args.isolate, forward_chunk_size=args.forward_chunk_size, quantize=args.quantize,
            attention_slice_mb=args.attention_slice_mb or None, overwrite=args.overwrite,
            cache_branch=args.cache_branch,
        )
        out = export_pipeline(pipeline, args.out, options, recipe_function(pipeline), source_name=args.model,
                              show_progress=True)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        logger.error("no space left on the disk of %s: the export stopped and removed its partial output. An "
                     "artifact holds each UNet once in ONNX and once per bucket in MindIR: free space, pass --out on a "
                     "larger disk, or export fewer --formats/--frames", args.out)
        return 2
    logger.info("done: %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
