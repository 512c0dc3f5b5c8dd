"""The one interface every backend implements, the registry that finds them, and the checked graph call.

A backend turns a manifest :class:`~framegraph.runtime.manifest.GraphEntry` plus its artifact folder into a
:class:`Graph`: its ``_load`` opens the graph file on its engine as a :class:`LoadedGraph`, which the Graph wraps.
The manifest is not trusted: its file paths must stay inside the folder (``resolve_in_folder``), and when a graph is
opened its declared inputs and outputs are checked against what the engine reads from the graph file
(:func:`check_signature`). Every call of a graph is checked against the manifest (input names, dtypes and shapes,
exactly) before the backend sees it, and the outputs come back as a dict keyed by the manifest's output names.

Backends import their engine (onnxruntime, mindspore, mindspore_lite) only when constructed, so importing this
package never imports MindSpore.
"""

import logging
from pathlib import Path

import numpy as np

from ..manifest import ArtifactError, resolve_in_folder

logger = logging.getLogger(__name__)

_REGISTRY = {}


class BackendUnavailableError(ImportError):
    """The engine a backend needs is not installed (or cannot run on this machine)."""


class GraphInputError(ValueError):
    """A graph was called with feeds that do not match the manifest (name, dtype or shape)."""


def register_backend(cls):
    """Class decorator: make ``cls`` loadable as ``load_backend(cls.name)``."""
    if not getattr(cls, "name", None) or not getattr(cls, "format", None):
        raise TypeError(f"{cls.__name__} must define the class attributes `name` and `format` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a backend named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def available_backends():
    """Names of the registered backends (whether or not their engine is installed)."""
    return sorted(_REGISTRY)


def backends_for_format(fmt):
    """Names of the registered backends that run graphs of manifest format ``fmt`` ("onnx", "mindir")."""
    return [name for name, cls in _REGISTRY.items() if cls.format == fmt]


def load_backend(name, low_memory=False, **options):
    """The backend called ``name`` ("onnxruntime", "mindspore", "mindspore_lite"), built with ``options``.

    Common options: ``device`` ("cpu", "cuda"/"gpu", "ascend" where the engine supports it) and ``num_threads``.
    ``low_memory=True`` adds the backend's ``low_memory_options`` that ``options`` does not set. A Backend instance
    is returned as is, so callers may pass either a name or a configured backend. Raises
    :class:`BackendUnavailableError` (an ImportError) when the engine is not installed.
    """
    if isinstance(name, Backend):
        return name
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backend {name!r}; available: {', '.join(available_backends())}"
        ) from None
    return cls(**({**cls.low_memory_options, **options} if low_memory else options))


def _spec_text(dtype, shape):
    """``dtype float32, shape [1, 2, 3]`` for a signature entry; an unknown dtype or shape reads "?"."""
    dims = "?" if shape is None else "[" + ", ".join("?" if _dynamic(d) else str(d) for d in shape) + "]"
    return f"dtype {dtype or '?'}, shape {dims}"


def _dynamic(dim):
    """Whether a graph file's dimension is left open (None, a symbolic name such as 'batch', or negative)."""
    return not isinstance(dim, (int, np.integer)) or dim < 0


def _manifest_dtype(spec, path, entry):
    try:
        return np.dtype(spec.dtype).name
    except TypeError:
        raise ArtifactError(
            f"the manifest entry {entry.key} gives {spec.name!r} the dtype {spec.dtype!r}, which is not a numpy dtype "
            f"(the graph file is {path}); re-export the artifact (svd-export)"
        ) from None


def _signature_differences(kind, specs, have, path, entry):
    """What differs between the manifest's ``specs`` and the graph file's ``have`` ({name: (dtype, shape)})."""
    differences = []
    for spec in specs:
        dtype, shape = have[spec.name]
        want_dtype = _manifest_dtype(spec, path, entry)
        want_shape = [int(d) for d in spec.shape]
        same_dtype = dtype is None or dtype == want_dtype
        same_shape = shape is None or (len(shape) == len(want_shape) and all(
            _dynamic(d) or int(d) == w for d, w in zip(shape, want_shape)))
        if not (same_dtype and same_shape):
            differences.append(f"{kind} {spec.name!r}: the manifest says {_spec_text(want_dtype, want_shape)}, the "
                               f"graph file has {_spec_text(dtype, shape)}")
    return differences


def check_signature(entry, path, inputs, outputs=None):
    """Raise ArtifactError unless the graph file at ``path`` takes and gives what the manifest ``entry`` says.

    ``inputs`` and ``outputs`` are what the backend read from its engine once the graph was opened: lists of
    ``(name, dtype, shape)`` with ``dtype`` a numpy dtype name (None: the engine does not say) and ``shape`` a list
    of dimensions (None: the engine does not say; a None, symbolic or negative dimension is left open by the graph
    and matches any size). ``outputs=None``: the engine does not list its outputs (they are then checked on each
    call). The rule: the graph's input names are exactly the manifest's, every manifest output is among the
    graph's outputs, and each of those has the manifest's dtype and, where the graph fixes it, its shape (rank and
    every fixed dimension). A backend that feeds its graph by position passes the manifest's names in order.
    """
    have_inputs = {name: (dtype, shape) for name, dtype, shape in inputs}
    have_outputs = None if outputs is None else {name: (dtype, shape) for name, dtype, shape in outputs}
    want_inputs = [s.name for s in entry.inputs]
    want_outputs = [s.name for s in entry.outputs]
    outputs_missing = have_outputs is not None and not set(want_outputs) <= set(have_outputs)
    if set(have_inputs) != set(want_inputs) or outputs_missing:
        raise ArtifactError(
            f"{path} has inputs {sorted(have_inputs)} and outputs "
            f"{'(not listed by the engine)' if have_outputs is None else sorted(have_outputs)} but the manifest entry "
            f"{entry.key} lists inputs {sorted(want_inputs)} and outputs {want_outputs}; re-export the artifact "
            "(svd-export)"
        )
    differences = _signature_differences("input", entry.inputs, have_inputs, path, entry)
    if have_outputs is not None:
        differences += _signature_differences("output", entry.outputs, have_outputs, path, entry)
    if differences:
        raise ArtifactError(
            f"{path} does not match its manifest entry {entry.key}: {'; '.join(differences)}. The manifest or the "
            "graph file was changed after the export; re-export the artifact (svd-export)"
        )


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"dtype {value.dtype}, shape {list(value.shape)}"
    return f"a {type(value).__name__}"


class LoadedGraph:
    """What a backend's ``_load`` returns: one graph opened on its engine, fed and read in the manifest's order, with
    no checks of its own (:class:`Graph` checks every call, then delegates here).

    A backend subclasses it and implements ``run``; ``release_memory`` and ``prefetch_memory`` give 0 unless the
    engine maps weights it can give back and bring in. ``native`` is the engine's own object (see Graph.native).
    """

    def __init__(self, native):
        self.native = native

    def run(self, arrays, shrink=False):
        """The output arrays in manifest order for the input ``arrays`` in manifest order (contiguous numpy arrays
        of the manifest's dtypes and shapes). ``shrink=True``: the engine also gives back, at the end of this run, the
        working memory it kept from its runs; an engine that keeps none ignores it."""
        raise NotImplementedError

    def release_memory(self):
        """Give back the resident pages of the memory-mapped weights; the bytes released (0: none are mapped)."""
        return 0

    def prefetch_memory(self):
        """Bring in, in one pass, the pages of the memory-mapped weights that the runs read in place; the bytes
        brought in (0: none are mapped, or the runs read none of them in place)."""
        return 0


class Graph:
    """One opened graph: ``graph(**feeds) -> {output name: np.ndarray}``, with every feed checked first.

    ``loaded`` is the backend's :class:`LoadedGraph`: it takes the input arrays in manifest order and returns the
    output arrays in manifest order. ``native`` is the engine's own object (an onnxruntime InferenceSession, or the
    list of them for a graph ONNX Runtime runs in parts; a MindSpore GraphCell, a MindSpore Lite Model) for callers
    that need engine-specific features.

    ``float32_io`` (off for a graph a backend opens; the artifact's graphs, which the pipelines run, have it on):
    floating feeds are cast to the graph's floating input dtype before the check, and floating outputs come back
    as float32, so that a float16 artifact computes in float16 while the pipelines' numpy math (schedulers,
    guidance) stays float32. Off, every feed must already have the manifest's dtype.
    """

    def __init__(self, entry, loaded, backend):
        self.entry = entry
        self.backend = backend
        self._loaded = loaded
        self.float32_io = False

    @property
    def native(self):
        return self._loaded.native

    def release_memory(self):
        """Give back the resident pages of this graph's memory-mapped weights (backends that map them); the next
        call reads them again from the page cache or the artifact. Returns the bytes released (0 if none)."""
        return self._loaded.release_memory()

    def prefetch_memory(self):
        """Bring in, in one pass, the pages of this graph's memory-mapped weights that its runs read in place
        (backends that map them), instead of one page fault at a time during the next run. Returns the bytes
        brought in (0 if none)."""
        return self._loaded.prefetch_memory()

    @property
    def name(self):
        return self.entry.key

    @property
    def inputs(self):
        return list(self.entry.inputs)

    @property
    def outputs(self):
        return list(self.entry.outputs)

    def __repr__(self):
        return f"Graph({self.name!r}, backend={self.backend!r})"

    def check_feeds(self, feeds):
        """Raise :class:`GraphInputError` unless ``feeds`` has exactly the manifest's inputs, dtypes and shapes."""
        expected = [spec.name for spec in self.entry.inputs]
        missing = [n for n in expected if n not in feeds]
        unexpected = sorted(n for n in feeds if n not in expected)
        if missing or unexpected:
            raise GraphInputError(
                f"graph {self.name}: feeds do not match its inputs (missing: {missing or 'none'}, unexpected: "
                f"{unexpected or 'none'}); it takes exactly {expected}"
            )
        for spec in self.entry.inputs:
            value = feeds[spec.name]
            want = f"dtype {np.dtype(spec.dtype)}, shape {list(spec.shape)}"
            if isinstance(value, np.generic):
                value = np.asarray(value)
            if not isinstance(value, np.ndarray):
                raise GraphInputError(
                    f"graph {self.name}: input {spec.name!r} must be a numpy array with {want}, got "
                    f"{_describe(value)}; pass np.asarray(value, dtype=np.{np.dtype(spec.dtype)})"
                )
            if value.dtype != np.dtype(spec.dtype):
                raise GraphInputError(
                    f"graph {self.name}: input {spec.name!r} expected {want}, got {_describe(value)}; "
                    f"cast it with .astype(np.{np.dtype(spec.dtype)})"
                )
            if list(value.shape) != list(spec.shape):
                raise GraphInputError(
                    f"graph {self.name}: input {spec.name!r} expected {want}, got {_describe(value)}; the artifact "
                    f"was exported for this shape only (bucket {self.entry.bucket}): reshape the input or re-export "
                    "for the shape you need"
                )

    def __call__(self, **feeds):
        return self.run(feeds)

    def run(self, feeds, shrink=False):
        """``graph(**feeds)``; with ``shrink=True`` the engine also gives back, at the end of this run, the working
        memory it kept from its runs (ONNX Runtime: its arena's free chunks), for the last run of a series (the
        denoising loop's last step: the UNet's activations need not stay through the decode)."""
        if self.float32_io:
            feeds = _cast_floating(feeds, {spec.name: np.dtype(spec.dtype) for spec in self.entry.inputs})
        self.check_feeds(feeds)
        arrays = [np.asarray(feeds[spec.name], order="C") for spec in self.entry.inputs]  # 0-d stays 0-d
        outputs = list(self._loaded.run(arrays, shrink=bool(shrink)))
        if len(outputs) != len(self.entry.outputs):
            raise ArtifactError(
                f"graph {self.name} returned {len(outputs)} outputs but the manifest lists {len(self.entry.outputs)} "
                f"({[s.name for s in self.entry.outputs]}); the artifact is inconsistent, re-export it"
            )
        result = {}
        for spec, value in zip(self.entry.outputs, outputs):
            value = np.asarray(value)
            if value.dtype != np.dtype(spec.dtype) or list(value.shape) != list(spec.shape):
                raise ArtifactError(
                    f"graph {self.name} output {spec.name!r} is {_describe(value)} but the manifest says dtype "
                    f"{np.dtype(spec.dtype)}, shape {list(spec.shape)}; the artifact is inconsistent, re-export it"
                )
            if self.float32_io and _floating(value.dtype):
                value = value.astype(np.float32, copy=False)
            result[spec.name] = value
        return result


def _floating(dtype):
    return np.issubdtype(dtype, np.floating)


def _cast_floating(feeds, dtypes):
    """``feeds`` with each floating array cast to the floating dtype in ``dtypes`` of its name; the rest as given."""
    cast = dict(feeds)
    for name, value in feeds.items():
        want = dtypes.get(name)
        if (want is not None and _floating(want) and isinstance(value, (np.ndarray, np.generic))
                and _floating(value.dtype) and value.dtype != want):
            cast[name] = value.astype(want)
    return cast


class Backend:
    """Base class: subclasses set ``name`` and ``format`` and implement
    ``_load(path, entry, exclusive, streamed) -> LoadedGraph``."""

    name = None
    format = None
    # options a low-memory artifact (``low_memory=True``) gives the backend where the caller sets none: less peak
    # memory for some speed, as the low-memory mode's one-graph-at-a-time does
    low_memory_options = {}

    def __repr__(self):
        return f"{type(self).__name__}()"

    def open(self, folder, entry, exclusive=False, streamed=False):
        """Open ``entry`` (a manifest GraphEntry) from the artifact ``folder`` as a checked :class:`Graph`.

        ``exclusive=True`` tells the backend that no other session of this graph's weights will be open at the same
        time (the caller keeps one frame bucket of it open), so it need not share them between sessions.
        ``streamed=True`` tells it that the caller runs the graph once per call (or once per chunk) outside its
        denoising loop (the encoders, the VAE decoder), so nothing of it need stay resident between runs."""
        if entry.format != self.format:
            raise ArtifactError(
                f"graph {entry.key} is in format {entry.format!r} but the {self.name} backend runs {self.format!r} "
                f"graphs; pick the {self.format!r} entry of this graph or another backend"
            )
        folder = Path(folder)
        paths = [resolve_in_folder(folder, f.path) for f in entry.files]  # refuses paths leading out of the folder
        missing = [f.path for f, full in zip(entry.files, paths) if not full.exists()]
        if missing:
            raise ArtifactError(
                f"graph {entry.key}: {', '.join(missing)} missing from {folder}; copy the whole artifact folder or "
                "re-export it"
            )
        path = resolve_in_folder(folder, entry.main_file)
        logger.info("opening %s with %s from %s", entry.key, self.name, path)
        loaded = self._load(path, entry, exclusive, streamed)
        if not isinstance(loaded, LoadedGraph):
            raise TypeError(
                f"{type(self).__name__}._load returned {type(loaded).__name__}; it must return a LoadedGraph "
                "(subclass framegraph.runtime.backends.base.LoadedGraph and implement run)"
            )
        return Graph(entry, loaded, self.name)

    def _load(self, path, entry, exclusive, streamed):
        """The :class:`LoadedGraph` of the graph file at ``path``; before returning, a backend checks the graph's
        inputs and outputs against ``entry`` with :func:`check_signature` as far as its engine lists them."""
        raise NotImplementedError
