"""What the user asks of an export (:class:`ExportOptions`, one field per flag of ``framegraph export``) and its
validation.

A leaf: it imports no other ``framegraph.export`` module, so every one of them may import it.
"""

import dataclasses
import json
import numbers

from framegraph import __version__
from framegraph.runtime.manifest import DEFAULT_FORMATS, FORMATS

# The largest float32 attention scores one slice of queries may hold (see models.layers.attention): it leaves every
# attention of the sizes measured here whole (SVD-XT's largest at 256x256, 8 frames: 335 MB) and slices those
# of the published sizes (576x1024, 25 frames: 85 GB whole).
DEFAULT_ATTENTION_SLICE_MB = 1024
SCRATCH = ".scratch"  # an export's bookkeeping inside its staging folder (child processes, probes); removed before the commit
ISOLATE_MODES = ("auto", "always", "never")  # --isolate: export components in child processes (see isolation.py)
QUANTIZE_MODES = ("int8",)  # --quantize (see quantize.py)

# ExportOptions field -> (its export flag, whether None (the default) is allowed)
_COUNTS = {"batch": ("--batch", False), "height": ("--height", True), "width": ("--width", True),
           "forward_chunk_size": ("--forward-chunk-size", True)}
_COUNT_LISTS = {"frames": "--frames", "decode_chunk_sizes": "--decode-chunk-sizes"}


@dataclasses.dataclass
class ExportOptions:
    """The options of one export. ``None`` asks for the pipeline's default, which its recipe fills in."""

    frames: list = None  # frame-count buckets; default from the model config
    height: int = None
    width: int = None
    batch: int = 1
    formats: tuple = DEFAULT_FORMATS  # any of FORMATS; mslite is converted from the (checked) ONNX graphs
    dtype: str = "float32"
    decode_chunk_sizes: list = None
    check: bool = True
    full_check: bool = False  # check graphs above probe_check.PROBE_ABOVE_PIXELS at their size, not on probes
    isolate: str = "auto"  # export components in child processes: auto (large ones), always, never
    forward_chunk_size: int = None  # UNet feed-forward over slices of this many positions (lower peak memory)
    attention_slice_mb: float = DEFAULT_ATTENTION_SLICE_MB  # attention over query slices of at most this many MB
    quantize: str = None  # "int8": int8 UNet weights in the ONNX graphs (CPU)
    cache_branch: int = None  # step caching: also export the deep and shallow UNet graphs of this branch
    overwrite: bool = False  # replace an existing framegraph artifact at ``out`` (and reuse its matching graphs)

    def __post_init__(self):
        """Sizes and counts are positive integers and bucket lists are non-empty: ``None`` asks for the default, a
        zero or an empty list is refused (it must not silently become the default)."""
        check_sizes_and_counts(self)

    def fingerprint(self, source_hash):
        """What decides the graphs: a previous artifact with the same fingerprint may lend its graphs. The fields
        that change no graph (check, full_check, isolate, overwrite) are left out."""
        fields = dataclasses.asdict(self)
        fields.pop("check")
        fields.pop("full_check")
        fields.pop("isolate")
        fields.pop("overwrite")
        fields["formats"] = list(fields["formats"])
        return json.dumps({"framegraph": __version__, "source": source_hash, **fields}, sort_keys=True)


def _positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_sizes_and_counts(options):
    """Every size and count of ``options`` is a positive integer, and every bucket list a non-empty list of them;
    ``None`` (the default) is allowed where the pipeline supplies one. Errors name the flag and never
    suggest a value."""
    for name, (flag, optional) in _COUNTS.items():
        value = getattr(options, name)
        if value is None and optional:
            continue
        if not _positive_int(value):
            default = f"; leave ExportOptions.{name} None (omit {flag}) for the default" if optional else ""
            raise ValueError(f"{flag} (ExportOptions.{name}) must be a positive integer, got {value!r}{default}")
    for name, flag in _COUNT_LISTS.items():
        values = getattr(options, name)
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values or not all(
                _positive_int(v) for v in values):
            raise ValueError(f"{flag} (ExportOptions.{name}) must be a non-empty list of positive integers, e.g. "
                             f"{flag} 14,25; got {values!r}; leave it None (omit {flag}) for the default")
    branch = options.cache_branch
    if branch is not None and not (isinstance(branch, numbers.Integral) and not isinstance(branch, bool)
                                   and branch >= 0):
        raise ValueError(f"--cache-branch (ExportOptions.cache_branch) must be an integer of at least 0, got "
                         f"{branch!r}; leave it None (omit --cache-branch) for no step-caching graphs")
    if not isinstance(options.overwrite, bool):
        raise ValueError(f"ExportOptions.overwrite (--overwrite) must be True or False, got {options.overwrite!r}")


def validate_options(options, size_multiple, folder):
    """Options with the pipeline's defaults filled in: sizes are multiples of ``size_multiple`` (the model's total
    down-sampling), and every choice is one framegraph knows. Errors name the flag to change."""
    check_sizes_and_counts(options)
    for name in ("height", "width"):
        value = getattr(options, name)
        if value is None or value % size_multiple:
            raise ValueError(f"--{name} {value} must be a positive multiple of {size_multiple} for {folder}")
    if not options.frames:
        raise ValueError(f"--frames must be positive integers, got {options.frames}")
    if not options.formats or set(options.formats) - set(FORMATS):
        raise ValueError(f"--formats must be a subset of {','.join(FORMATS)}; got {','.join(options.formats)}")
    if options.dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {options.dtype}")
    if options.attention_slice_mb is not None and not options.attention_slice_mb > 0:
        raise ValueError(f"--attention-slice-mb must be a positive number of MB, got {options.attention_slice_mb}; "
                         "0 on the command line (None in ExportOptions) computes each attention whole")
    if options.quantize is not None and "mslite" in options.formats:
        raise ValueError("--quantize does not go with --formats mslite (MindSpore Lite runs the float graphs); export "
                         "the int8 ONNX artifact and the Lite artifact separately")
    if options.quantize is not None and (options.quantize not in QUANTIZE_MODES or "onnx" not in options.formats):
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)} and needs --formats with onnx "
                         f"(it applies to the ONNX graphs); got {options.quantize!r} with {','.join(options.formats)}")
    if options.isolate not in ISOLATE_MODES:
        raise ValueError(f"--isolate must be one of {', '.join(ISOLATE_MODES)}, got {options.isolate!r}")
